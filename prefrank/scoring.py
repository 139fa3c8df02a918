"""Scoring: token ids → Σ log π(completion | prompt) for every completion of every item.

Three methods, same answers:
  packed every item is one row: the prompt, then each completion (but its last token), under a
         block mask: a token sees the prompt and its own completion, never another completion;
         positions restart at the prompt's length for each completion. One forward pass per
         batch of rows, the prompt computed once, no cache to copy. Needs a model that takes a
         custom 4D mask (sdpa or eager attention); with sliding-window layers, sequences that fit
         the window.
  kv     the prompt's forward pass runs once; its KV cache serves every completion. Prompts are
         batched by prompt length (right-padded: attention stays purely causal), then the
         continuations of the prompts held in memory are regrouped by their own length, each
         continuation batch taking its rows of the prompt caches. Any attention implementation; no
         sliding windows.
  naive  the oracle: prompt + completion concatenated per completion, the model's full logits,
         log_softmax, gather, sum over the completion positions.
"auto" picks the first of packed, kv, naive that is exact for the model and items, and kv over
packed where packed's block mask would waste much attention work (resolve_method). packed and kv
take log-probs from the final hidden states through the chunked head op, only at completion
positions: the full logits never exist. Token log-probs are fp32 whatever the model's dtype; sums are float64.
"""
import functools
from dataclasses import dataclass
from itertools import accumulate

import torch

from prefrank import ops
from prefrank.batching import length_batches, pad
from prefrank.errors import InputError
from prefrank.ops import IGNORE_INDEX
from prefrank.options import option, options
from prefrank.tokenization import Tokenized

METHODS = ("auto", "packed", "kv", "naive")
PAD_ID = 0  # padded positions are masked out of attention and scoring; any valid id will do
CACHE_BYTES = 2 << 30  # prompt KV caches held at once before their continuations are scored
BAND = 1.5  # ... or before a prompt this many times longer than the shortest held one
# auto prefers kv to packed above this share (bench/RESULTS.md: packed won at 0.08 on CPU and at
# ≤ 0.02 on GPU; kv won at 0.5)
PACKED_ATTENTION_LIMIT = 0.2


def _without_autograd(fn):
    """Run a scorer fn(lm, ...) in lm's no-autograd context (CausalLM.no_autograd)."""
    @functools.wraps(fn)
    def run(lm, *args, **kwargs):
        with lm.no_autograd():
            return fn(lm, *args, **kwargs)
    return run


@dataclass
class TokenCounts:
    """Tokens pushed through the model: `real` ones and all including padding."""
    real: int = 0
    padded: int = 0

    def add(self, seqs: list[list[int]], padded: torch.Tensor):
        """`seqs` as pushed through, `padded` any tensor of their padded [B, T] shape."""
        self.real += sum(map(len, seqs))  # from the host-side lists: no device sync
        self.padded += padded.numel()


class SequenceLogprobs:
    """Per completion, flattened in item order (item 0's completions first): float64 sums of the
    token log-probs, optionally the fp32 per-token log-probs and the float64 sums of the hidden
    states that predict its tokens (`hidden`: CHES), the token counts pushed through, and the
    method that computed them. The sums stay on the model's device until finish() (one transfer,
    not one per batch)."""

    def __init__(self, n_sequences: int, per_token: bool, device, method: str, hidden: int | None = None):
        self.method = method
        self.logps = torch.zeros(n_sequences, dtype=torch.float64, device=device)
        self.token_logps = [[] for _ in range(n_sequences)] if per_token else None
        # [n_sequences, d] (hidden: d), or None
        self.hidden_sums = None if hidden is None else torch.zeros(n_sequences, hidden, dtype=torch.float64,
                                                                   device=device)
        self.counts = TokenCounts()

    def add_hidden(self, seqs: torch.Tensor, rows: torch.Tensor):
        """Add hidden states `rows` [n, d], each predicting a token of completion `seqs` [n]."""
        if self.hidden_sums is not None:
            self.hidden_sums.index_add_(0, seqs, rows.double())

    def add(self, seqs: list[int], token_lp: torch.Tensor, lengths: list[int]):
        """Add rows of per-token log-probs ([len(seqs), T] fp32, 0 past each row's length)."""
        self.logps[torch.tensor(seqs, device=self.logps.device)] += token_lp.double().sum(1)
        if self.token_logps is not None:
            for s, row, n in zip(seqs, token_lp.tolist(), lengths):
                self.token_logps[s] += row[:n]

    def finish(self) -> "SequenceLogprobs":
        self.logps = self.logps.cpu()
        return self

    @classmethod
    def concat(cls, parts: list["SequenceLogprobs"]) -> "SequenceLogprobs":
        """The parts' completions one after the other (the parts of one method)."""
        out = cls(0, parts[0].token_logps is not None, parts[0].logps.device, parts[0].method)
        out.logps = torch.cat([p.logps for p in parts])
        if out.token_logps is not None:
            out.token_logps = [row for p in parts for row in p.token_logps]
        if parts[0].hidden_sums is not None:
            out.hidden_sums = torch.cat([p.hidden_sums for p in parts])
        out.counts = TokenCounts(sum(p.counts.real for p in parts), sum(p.counts.padded for p in parts))
        return out

    def hidden_grams(self, items: list[Tokenized]) -> list[list[float]]:
        """Per item, the K×K inner products ⟨Σh_i, Σh_j⟩ of its completions' hidden sums (row-major,
        float64), computed on the device: CHES(x, y_i, y_j) = G_ij − G_ii (Razin et al. 2025)."""
        first = first_completion(items)
        grams = [self.hidden_sums[a:b] @ self.hidden_sums[a:b].T for a, b in zip(first[:-1], first[1:])]
        return [g.flatten().tolist() for g in grams]


def first_completion(items: list[Tokenized]) -> list[int]:
    """[n + 1] offsets: item i's completions are flat indices first[i] .. first[i + 1] - 1."""
    return list(accumulate((len(it.completion_ids) for it in items), initial=0))


def flatten_completions(items: list[Tokenized]) -> tuple[list[int], list[list[int]]]:
    """For each completion (flattened): its item's index, and its ids."""
    owner = [i for i, it in enumerate(items) for _ in it.completion_ids]
    completions = [c for it in items for c in it.completion_ids]
    return owner, completions


@dataclass
class _PromptBatch:
    """One prompt forward pass: its items, their completions' flat indices, its KV cache."""
    seqs: list[list[int]]  # per row: the flat indices of that item's completions
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, heads, P, head_dim]
    mask: torch.Tensor  # [B, P], right-padded

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def _gather_cache(lm, batches: list[_PromptBatch], rows: list[tuple[int, int]]):
    """A cache and attention mask holding prompt rows (batch, row) of several prompt batches,
    right-padded to the longest real prompt among these rows (not the widest prompt batch, whose
    pad columns every continuation would attend over, masked)."""
    lengths = {b: batches[b].mask.sum(1).tolist() for b in {b for b, _ in rows}}  # one device sync per batch
    width = max(lengths[b][r] for b, r in rows)
    dev = batches[0].mask.device
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
    layers = [(k.new_zeros(len(rows), k.shape[1], width, k.shape[3]),
               v.new_zeros(len(rows), v.shape[1], width, v.shape[3])) for k, v in batches[rows[0][0]].layers]
    for b in sorted({b for b, _ in rows}):
        out_rows = torch.tensor([j for j, (bb, _) in enumerate(rows) if bb == b], device=dev)
        src_rows = torch.tensor([r for bb, r in rows if bb == b], device=dev)
        p = min(batches[b].mask.shape[1], width)
        mask[out_rows, :p] = batches[b].mask[src_rows, :p]
        for (k_out, v_out), (k, v) in zip(layers, batches[b].layers):
            k_out[out_rows, :, :p] = k[src_rows, :, :p]
            v_out[out_rows, :, :p] = v[src_rows, :, :p]
    return lm.new_cache(layers), mask


def prompt_pass(lm, prompts: list[list[int]]) -> tuple[_PromptBatch, torch.Tensor]:
    """One right-padded forward pass over `prompts`: their KV cache (in a _PromptBatch whose seqs
    are left for the caller) and each prompt's last hidden state [B, d], which predicts the first
    completion token. Under the causal mask a real prompt token only sees real tokens, so no
    padding mask is needed and attention runs purely causal (SDPA skips the upper triangle: half
    the work); the pads' keys enter the cache and the continuation pass masks them."""
    ids, mask = pad(prompts, PAD_ID, device=lm.device)
    cache = lm.new_cache()
    positions = torch.arange(ids.shape[1], device=lm.device).expand_as(ids)
    hidden = lm.hidden(ids, None, positions, cache)
    last_hidden = hidden[torch.arange(len(prompts), device=lm.device), mask.sum(1) - 1]
    return _PromptBatch([], [(layer.keys, layer.values) for layer in cache.layers], mask), last_hidden


def continuation_pass(lm, batches: list[_PromptBatch], rows: list[tuple[int, int]], continuations: list[list[int]]):
    """Completions continued from their prompts' caches: `continuations[j]` (each of length >= 2)
    follows prompt row rows[j] = (batch, row). Tokens 0..n-2 go in and predict tokens 1..n-1.
    Returns the hidden states [b, T, d] and their targets [b, T] (IGNORE_INDEX past each end)."""
    inputs, cont_mask = pad([c[:-1] for c in continuations], PAD_ID, device=lm.device)
    targets, _ = pad([c[1:] for c in continuations], IGNORE_INDEX, device=lm.device)
    cache, prompt_mask = _gather_cache(lm, batches, rows)
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(inputs.shape[1], device=lm.device)
    return lm.hidden(inputs, torch.cat([prompt_mask, cont_mask], 1), positions, cache), targets


def _score_continuations(lm, batches: list[_PromptBatch], completions, sums: SequenceLogprobs, budget: int):
    """Continuations batched by their own length across all the given prompt batches."""
    cont = [(b, r, s) for b, pb in enumerate(batches) for r, seqs in enumerate(pb.seqs) for s in seqs
            if len(completions[s]) > 1]
    for batch in length_batches([len(completions[s]) - 1 for _, _, s in cont], budget):
        seqs = [cont[x][2] for x in batch]
        hidden, targets = continuation_pass(lm, batches, [cont[x][:2] for x in batch], [completions[s] for s in seqs])
        sums.counts.add([completions[s][:-1] for s in seqs], targets)
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
        lp = ops.logprobs_from_hidden(hidden, lm.weight, targets, **lm.head_kwargs)
        sums.add(seqs, lp.view(len(seqs), -1), [len(completions[s]) - 1 for s in seqs])
        if sums.hidden_sums is not None:
            keep = targets != IGNORE_INDEX
            owner = torch.tensor(seqs, device=lm.device).repeat_interleave(len(targets) // len(seqs))
            sums.add_hidden(owner[keep], hidden[keep])


@_without_autograd
def score_kv(lm, items: list[Tokenized], budget: int, per_token: bool = False, hidden: bool = False,
             cache_bytes: int = CACHE_BYTES) -> SequenceLogprobs:
    _, completions = flatten_completions(items)
    sums = SequenceLogprobs(len(completions), per_token, lm.device, "kv", lm.hidden_size if hidden else None)
    first_seq = first_completion(items)
    held, held_bytes = [], 0
    for batch in length_batches([len(it.prompt_ids) for it in items], budget):
        prompts = [items[i].prompt_ids for i in batch]
        prompt_batch, last_hidden = prompt_pass(lm, prompts)
        sums.counts.add(prompts, prompt_batch.mask)
        prompt_batch.seqs = [list(range(first_seq[i], first_seq[i + 1])) for i in batch]
        flat = [s for row in prompt_batch.seqs for s in row]
        rows = torch.tensor([r for r, row in enumerate(prompt_batch.seqs) for _ in row], device=lm.device)
        first_targets = torch.tensor([completions[s][0] for s in flat], device=lm.device)
        first = ops.logprobs_from_hidden(last_hidden[rows], lm.weight, first_targets, **lm.head_kwargs)
        sums.add(flat, first[:, None], [1] * len(flat))
        sums.add_hidden(torch.tensor(flat, device=lm.device), last_hidden[rows])
        held.append(prompt_batch)
        # Score what the held caches serve, then free them: when they use their memory budget, or
        # when the next prompts are much longer, since every continuation attends over the
        # longest held prompt (shorter ones are padded).
        held_bytes += prompt_batch.nbytes
        if held_bytes >= cache_bytes or prompt_batch.mask.shape[1] > BAND * held[0].mask.shape[1] + 16:
            _score_continuations(lm, held, completions, sums, budget)
            held, held_bytes = [], 0
    if held:
        _score_continuations(lm, held, completions, sums, budget)
    return sums.finish()


def packed_rows(items: list[Tokenized]) -> list[list[int]]:
    """Each item as one row: its prompt, then each completion but its last token (a completion's
    tokens 0..n-2 go in; its token 0 is predicted from the prompt's last position)."""
    return [it.prompt_ids + [t for c in it.completion_ids for t in c[:-1]] for it in items]


@dataclass
class PackedBatch:
    """The model inputs of a batch of packed rows, and where each target token's hidden state is.
    Per target token of the batch's completions, in completion order: `source`, its flat index in
    [B·T] (whose hidden state predicts it); `targets`, its id; `owner`, its completion (0-based
    within the batch); `rank`, its position within that completion."""
    ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]: each completion restarts at its prompt's length
    # [B, 1, T, T], additive in the model's dtype: a token sees the prompt up to itself and its own
    # completion up to itself, never another completion (padding sees earlier padding: no row is empty)
    mask: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    rank: torch.Tensor


def packed_layout(lm, items: list[Tokenized], batch: list[int], rows: list[list[int]]) -> PackedBatch:
    """The PackedBatch of items `batch` (`rows[i]` is item i's, from packed_rows)."""
    ids, _ = pad([rows[i] for i in batch], PAD_ID, device=lm.device)
    width = ids.shape[1]
    segments, positions = [], []  # per row: 0 prompt, s + 1 the batch's completion s; position ids
    source, targets, owner, rank = [], [], [], []
    seq = 0  # the batch's completions, counted
    for r, i in enumerate(batch):
        p = len(items[i].prompt_ids)
        segment, position = [0] * p, list(range(p))
        for c in items[i].completion_ids:
            col, n = r * width + len(segment), len(c) - 1
            source += [r * width + p - 1] + list(range(col, col + n))
            targets += c
            owner += [seq] * len(c)
            rank += range(len(c))
            segment += [seq + 1] * n
            position += range(p, p + n)
            seq += 1
        segments.append(segment)
        positions.append(position)
    segment = pad(segments, -1, device=lm.device)[0]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=lm.device).tril_()
    allowed = ((key == 0) | (key == query)) & causal
    dtype = lm.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=lm.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    as_tensor = lambda values: torch.tensor(values, device=lm.device)  # noqa: E731
    return PackedBatch(ids, pad(positions, 0, device=lm.device)[0], mask[:, None], as_tensor(source),
                       as_tensor(targets), as_tensor(owner), as_tensor(rank))


def _next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T - 1] fp32 log-probs of ids[:, 1:] under logits [B, T, V]: log_softmax and gather."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)


def full_logits_logprobs(lm, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The naive step: [B, T - 1] fp32 log-probs of ids[:, 1:] from the model's full logits,
    log_softmax and gather (every position; `targets`, ids[:, 1:] with IGNORE_INDEX outside the
    completions, is for steps that can skip the rest)."""
    return _next_token_logprobs(lm.logits(ids, mask), ids)


@_without_autograd
def score_packed(lm, items: list[Tokenized], budget: int, per_token: bool = False,
                 hidden: bool = False) -> SequenceLogprobs:
    _, completions = flatten_completions(items)
    sums = SequenceLogprobs(len(completions), per_token, lm.device, "packed", lm.hidden_size if hidden else None)
    first_seq = first_completion(items)
    rows = packed_rows(items)
    for batch in length_batches([len(r) for r in rows], budget):
        packed = packed_layout(lm, items, batch, rows)
        sums.counts.add([rows[i] for i in batch], packed.ids)
        rows_hidden = lm.hidden(packed.ids, packed.mask, packed.positions).flatten(0, 1)[packed.source]
        token_lp = ops.logprobs_from_hidden(rows_hidden, lm.weight, packed.targets, **lm.head_kwargs)
        seqs = [s for i in batch for s in range(first_seq[i], first_seq[i + 1])]
        sums.add_hidden(torch.tensor(seqs, device=lm.device)[packed.owner], rows_hidden)
        lengths = [len(completions[s]) for s in seqs]
        table = torch.zeros(len(seqs), max(lengths), dtype=token_lp.dtype, device=lm.device)
        table[packed.owner, packed.rank] = token_lp
        sums.add(seqs, table, lengths)
    return sums.finish()


@_without_autograd
def score_naive(lm, items: list[Tokenized], budget: int, per_token: bool = False, hidden: bool = False,
                token_logprobs=full_logits_logprobs) -> SequenceLogprobs:
    """`token_logprobs(lm, ids, mask, targets) -> [B, T - 1]` computes each batch's per-token
    log-probs (bench/ plugs in peer libraries' log-prob paths here; `hidden` takes the model's own
    forward, which gives the hidden states with the logits)."""
    if hidden and token_logprobs is not full_logits_logprobs:
        raise ValueError("hidden sums come from the model's own forward: no other naive step gives them")
    owner, completions = flatten_completions(items)
    sums = SequenceLogprobs(len(completions), per_token, lm.device, "naive", lm.hidden_size if hidden else None)
    sequences = [items[i].prompt_ids + c for i, c in zip(owner, completions)]
    for batch in length_batches([len(s) for s in sequences], budget):
        ids, mask = pad([sequences[s] for s in batch], PAD_ID, device=lm.device)
        sums.counts.add([sequences[s] for s in batch], ids)
        # Position t predicts token t + 1, a completion token when prompt_len <= t + 1 < seq_len;
        # shifting each row left by its prompt length lines the completion up at column 0.
        prompt_len = torch.tensor([len(items[owner[s]].prompt_ids) for s in batch], device=lm.device)[:, None]
        t = torch.arange(1, ids.shape[1], device=lm.device)
        targets = torch.where((t >= prompt_len) & (mask[:, 1:] == 1), ids[:, 1:], IGNORE_INDEX)
        if hidden:
            logits, last_hidden = lm.logits(ids, mask, with_hidden=True)
            token_lp = _next_token_logprobs(logits, ids)
        else:
            token_lp = token_logprobs(lm, ids, mask, targets)
        lengths = [len(completions[s]) for s in batch]
        width = max(lengths)
        cols = (prompt_len - 1 + torch.arange(width, device=lm.device)).clamp(max=token_lp.shape[1] - 1)
        valid = torch.arange(width, device=lm.device) < torch.tensor(lengths, device=lm.device)[:, None]
        sums.add(batch, torch.where(valid, token_lp.gather(1, cols), 0.0), lengths)
        if hidden:
            row = torch.arange(len(batch), device=lm.device)[:, None].expand_as(cols)
            sums.add_hidden(torch.tensor(batch, device=lm.device)[row[valid]], last_hidden[row[valid], cols[valid]])
    return sums.finish()


def unsupported(lm, method: str, items: list[Tokenized] | None = None) -> str | None:
    """Why `method` cannot score `items` (None: any items) exactly with this model as it is, or None."""
    if method == "naive":
        return None
    other = lm.layer_kinds - {"full_attention", "sliding_attention"}
    if other:
        return f"it has {', '.join(sorted(other))} layers"
    if method == "kv":
        if lm.compiled:  # a cache update reads the layer's index: one graph per layer, past dynamo's limit
            return "its blocks are compiled (torch.compile would specialize on each layer's cache index)"
        # right-padded prompt caches would shift a sliding window by the padding
        return "sliding-window attention" if lm.sliding_window else None
    if lm.attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {lm.attn_implementation!r} takes no custom 4D mask (sdpa and eager do)"
    if lm.alibi:  # transformers builds the ALiBi biases from a 2-D padding mask: a block mask breaks them
        return "its ALiBi position biases take no custom 4D mask"
    if lm.sliding_window and items:
        # the block mask is full attention: exact while every sequence fits the window
        longest = max(len(it.prompt_ids) + max(map(len, it.completion_ids)) for it in items)
        if longest > lm.sliding_window:
            return f"a sequence of {longest} tokens exceeds its sliding window of {lm.sliding_window}"
    return None


def packed_attention_overhead(lm, items: list[Tokenized]) -> float:
    """The attention FLOPs packed spends beyond kv's, as a share of the model's matmul FLOPs, on
    `items`. Under its block mask a packed row computes every (query, key) pair, where kv skips
    the prompt's upper triangle and never pairs two completions: per layer and item, 2·P² + 4·P·ΣC
    + 8·Σ_{i<j} C_i·C_j multiply-adds per attention width, against 2·(P + ΣC) per matmul parameter."""
    extra = tokens = 0
    for it in items:
        p, lengths = len(it.prompt_ids), [len(c) for c in it.completion_ids]
        total = sum(lengths)
        extra += 2 * p * p + 4 * p * total + 4 * (total * total - sum(n * n for n in lengths))
        tokens += p + total
    return extra * lm.attention_width / (2 * tokens * lm.matmul_params_per_layer)


def resolve_method(lm, method: str, items: list[Tokenized] | None = None) -> str:
    """The method that `method` means for this model and these items: "auto" → the first of
    packed, kv, naive that scores them exactly, except that kv goes first where packed's extra
    attention would exceed PACKED_ATTENTION_LIMIT of the matmul work (small hidden sizes, long
    rows). Refuses an explicit method that cannot score them."""
    if method not in METHODS:
        raise InputError(f"<method> {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        exact = [m for m in ("packed", "kv", "naive") if unsupported(lm, m, items) is None]
        if exact[:2] == ["packed", "kv"] and items and packed_attention_overhead(lm, items) > PACKED_ATTENTION_LIMIT:
            return "kv"
        return exact[0]
    problem = unsupported(lm, method, items)
    if problem:
        raise InputError(f"<method> {method} cannot score with {type(lm.model).__name__}: {problem} "
                         f"(<method> auto picks a method that can)")
    return method


def score(lm, items: list[Tokenized], *, method: str = "auto", budget: int = 8192, per_token: bool = False,
          hidden: bool = False, deterministic: bool = False) -> SequenceLogprobs:
    """Σ log π(completion | prompt) for every completion of `items`, by `method` (see METHODS);
    `hidden`: also the sums of the final hidden states that predict each completion's tokens (the
    positions from the prompt's last token to the completion's second-to-last), in the same
    forward passes: `hidden_sums` and hidden_grams() (CHES). `deterministic`: every value a
    function of its item alone (score_alone: `method` and `budget` unused). An item longer than the
    model's positions is refused (tokenize_examples(max_length=...) makes such rows errors instead)."""
    longest = max((len(it.prompt_ids) + max(map(len, it.completion_ids)) for it in items), default=0)
    if lm.max_positions and longest > lm.max_positions:
        raise InputError(f"an item has {longest} tokens, more than the model's {lm.max_positions} positions: "
                         f"tokenize with <max_length> {lm.max_positions} (or truncate) first")
    if deterministic:
        return score_alone(lm, items, per_token, hidden)
    method = resolve_method(lm, method, items)
    return {"kv": score_kv, "packed": score_packed, "naive": score_naive}[method](lm, items, budget, per_token,
                                                                                  hidden)


@options
class ScoringMode:
    """How log-probs are computed: the option `score` and `train` (its evaluations and reference) share."""
    deterministic: bool = option(
        False, "bit-identical log-probs whatever the batching: each row scored alone by one method (kv where the "
        "model allows it, else naive; score's --method and --max-tokens-per-batch are then not used), each op on one "
        "thread, rows in parallel on the CPU's threads; the same bits whatever the token budget, chunk size, row "
        "order, method, thread count or number of processes (not with --tp or --compile), at some cost on a "
        "CPU (bench/RESULTS.md) and much more on a GPU, where rows run one at a time", group="execution")


def deterministic_method(lm) -> str:
    """The one computation deterministic scoring uses for this model: kv where it is exact, else naive."""
    return "kv" if unsupported(lm, "kv") is None else "naive"


def score_alone(lm, items: list[Tokenized], per_token: bool = False, hidden: bool = False) -> SequenceLogprobs:
    """score() with every value a function of its item alone, bit for bit: whatever the batch, the
    token budget, the row order, the method asked for, the thread count or the number of processes.
    A value moves in its last bits with all of these (measured: bench/deterministic.py) because a
    row's matmuls, attention and elementwise kernels (vectorized body or scalar tail) follow the
    shape and the thread split of the whole batch. So each item is scored alone (its own batch, no
    padding from other rows), by one method (deterministic_method), each op on one thread; on a CPU
    as many items run at once as torch has threads (on a GPU or for an FSDP2 model, one at a time)."""
    from concurrent.futures import ThreadPoolExecutor
    method = deterministic_method(lm)
    scorer = {"kv": score_kv, "naive": score_naive}[method]
    # one at a time on a GPU, and for a sharded (FSDP2) model, whose forwards gather in step across processes
    workers = torch.get_num_threads() if lm.device.type == "cpu" and not lm.fsdp else 1
    unbounded = 1 << 62  # a token budget no item reaches: one batch per item

    # autocast is per thread: each worker runs under the caller's (the TRL drop-in's mixed precision)
    device_type = lm.device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def alone(item):
        with torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
            return scorer(lm, [item], unbounded, per_token, hidden)

    # set_num_threads in a worker thread sets that thread's own count: the caller's stays as it was
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        parts = list(pool.map(alone, items))
    if not parts:
        return SequenceLogprobs(0, per_token, lm.device, method)
    return SequenceLogprobs.concat(parts)
