"""DPO losses for other trainers: a fused one from the policy's final hidden states and lm_head
weight that never holds the full logits, and (from dpo/objective.py, re-exported here) the light
one on sequence log-probs.

  fused_linear_dpo_loss(hidden, weight, targets, sequence_ids, ref_chosen_logps=..., ...)
  FusedLinearDPOLoss(...)(hidden, weight, targets, ...)   the same as an nn.Module
  dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, ...)

The loss types (LOSS_TYPES) and reductions are dpo/objective.py's; the fused loss's inputs are read
and checked by dpo/inputs.py, shared with its vocabulary-parallel form (dpo/vocab_parallel.py).

The fused loss works like Liger's fused linear losses, with what they lack: precomputed reference
log-probs (or reference hidden states), IPO, and any layout (prompt rows can share the tensor: they
carry ignore_index and cost nothing, so a packed prompt + chosen + rejected layout works). Pairs are
processed in chunks that hold whole pairs, so each chunk's loss gradient is known as soon as its
log-probs are: the forward pass computes d(hidden), d(weight) and d(bias) at once (three matmuls per
chunk, no recompute), and backward only scales them (reduction "none": the backward recomputes
the chunks with each pair's upstream gradient). Both run as registered ops (prefrank::fused_linear_dpo
and prefrank::fused_linear_dpo_backward): torch.compile traces the loss without graph breaks, and
the checks on data (targets in range, sequences with tokens, finite values) run inside them.
"""
import torch
from torch import Tensor

from prefrank import ops
from prefrank.dpo.inputs import check_data, check_every_sequence_scored, prepare, refuse_non_finite
from prefrank.dpo.objective import LOSS_TYPES, check_options, dpo_loss, dpo_metrics, loss_of_margin, loss_slope, margin
from prefrank.dpo.vocab_parallel import vocab_parallel_dpo_loss
from prefrank.ops import IGNORE_INDEX, sum_by_sequence
from prefrank.ops.head import Head
from prefrank.ops.registered import grad_fakes, grad_outputs
from prefrank.ops.sharded import gather_head
from prefrank.ops.torch_backend import upcast

__all__ = ["LOSS_TYPES", "FusedLinearDPOLoss", "dpo_loss", "dpo_metrics", "fused_linear_dpo_loss"]


def _pair_chunks(pair_of_row: torch.Tensor, budget: int) -> list[slice]:
    """Slices of the (pair-sorted) rows, each holding whole pairs and about `budget` rows."""
    starts = torch.nonzero(torch.diff(pair_of_row, prepend=pair_of_row[:1] - 1)).squeeze(1).tolist() + [len(pair_of_row)]
    chunks, begin = [], 0
    for s, e in zip(starts[:-1], starts[1:]):
        if e - begin > budget and s > begin:
            chunks.append(slice(begin, s))
            begin = s
    if begin < len(pair_of_row):
        chunks.append(slice(begin, len(pair_of_row)))
    return chunks


def _token_stats(logits, targets, lse, seq, n_seq: int, acc) -> torch.Tensor:
    """[3, n_seq] sums by sequence of each token's entropy of its next-token distribution, its mean
    logit over the vocabulary, and whether its target is the (first) argmax; in row slices, so the
    temporaries stay a quarter of the chunk."""
    out = torch.zeros(3, n_seq, dtype=acc, device=logits.device)
    step = max(1, logits.shape[0] // 4)
    for start in range(0, logits.shape[0], step):
        z = upcast(logits[start:start + step])
        p = torch.exp(z - lse[start:start + step, None].to(z.dtype))
        values = (lse[start:start + step].to(z.dtype) - (p * z).sum(-1), z.mean(-1),
                  z.argmax(-1) == targets[start:start + step])
        for k, v in enumerate(values):
            out[k] += sum_by_sequence(v.to(acc), seq[start:start + step], n_seq)
    return out


def _dpo_pass(hidden, weight, bias, targets, seq_ids, ref_logps, o: "_Opts", pair_grads, needs):
    """Per-pair losses [B], policy sequence log-probs [2B], the token statistics [4, 2B] (token
    counts, then _token_stats; None unless o.token_stats), and [d hidden, d weight, d bias] of
    Σ_i pair_grads[i] · loss_i (None where not needed, all None without pair_grads)."""
    n_seq = ref_logps.shape[0]
    n_pairs = n_seq // 2
    rows = torch.nonzero(targets != o.ignore_index).squeeze(1)
    rows = rows[torch.argsort(seq_ids[rows] // 2, stable=True)]  # whole pairs together
    seq = seq_ids[rows]
    counts = torch.bincount(seq, minlength=n_seq).to(ref_logps.dtype)
    check_every_sequence_scored(counts)
    acc = upcast(hidden[:0]).dtype  # fp32 math for half inputs, float64 stays float64
    losses = torch.zeros(n_pairs, dtype=acc, device=hidden.device)
    policy = torch.zeros(n_seq, dtype=acc, device=hidden.device)
    stats = torch.zeros(3, n_seq, dtype=acc, device=hidden.device) if o.token_stats else None
    head = Head(weight, bias, o.softcap, o.temperature, o.backend, o.chunk_bytes)
    grads = head.new_grads(hidden, *needs) if pair_grads is not None else [None, None, None]
    for chunk in _pair_chunks(seq // 2, head.rows):
        r, s, t = rows[chunk], seq[chunk], targets[rows[chunk]]
        h = hidden[r]
        logits = head.logits(h)
        token_logp, lse = head.logprobs(logits, t)
        if stats is not None:
            stats += _token_stats(logits, t, lse, s, n_seq, acc)
        # the loss of this chunk's pairs, and its gradient w.r.t. their sequence log-probs
        pairs = torch.unique(s // 2)
        seq_logp = sum_by_sequence(token_logp.to(acc), s, n_seq)
        pw, pl = seq_logp[2 * pairs], seq_logp[2 * pairs + 1]
        z, (dz_w, dz_l) = margin(pw, pl, ref_logps[2 * pairs].to(acc), ref_logps[2 * pairs + 1].to(acc), o.loss_type,
                                 o.gamma, counts[2 * pairs].to(acc), counts[2 * pairs + 1].to(acc))
        losses[pairs] = loss_of_margin(z, o.beta, o.loss_type, o.label_smoothing)
        policy[2 * pairs], policy[2 * pairs + 1] = pw, pl
        if pair_grads is not None:
            slope = loss_slope(z, o.beta, o.loss_type, o.label_smoothing) * pair_grads[pairs].to(acc)
            d_seq = torch.zeros(n_seq, dtype=acc, device=hidden.device)
            d_seq[2 * pairs], d_seq[2 * pairs + 1] = slope * dz_w, slope * dz_l
            head.backward_(logits, t, lse, d_seq[s], h, grads, r)
    if not (torch.isfinite(losses).all() and torch.isfinite(policy).all()):
        refuse_non_finite(hidden, weight, bias, ref_logps)
    if stats is not None:
        stats = torch.cat([counts.to(acc)[None], stats])
    return losses, policy, stats, (head.finish_grads(grads) if pair_grads is not None else grads)


class _Opts:
    """The fused loss's scalar arguments, in the registered ops' order (after the tensors)."""
    names = ("beta", "loss_type", "label_smoothing", "gamma", "softcap", "temperature", "ignore_index", "chunk_bytes",
             "backend", "token_stats")

    def __init__(self, *values):
        self.__dict__.update(zip(self.names, values))


@torch.library.custom_op("prefrank::fused_linear_dpo", mutates_args=())
def _fused_linear_dpo(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, seq_ids: Tensor,
                      ref_logps: Tensor, beta: float, loss_type: str, label_smoothing: float, gamma: float,
                      softcap: float | None, temperature: float, ignore_index: int, chunk_bytes: int | None,
                      backend: str, token_stats: bool, reduction: str, need_hidden: bool, need_weight: bool,
                      need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [] or [B] under reduction "none", policy log-probs [2B], token statistics [4, 2B] or
    [0], and for "mean" / "sum" the gradients of the loss w.r.t. hidden, weight and bias, computed
    in the same pass; empty where not needed). B = ref_logps.shape[0] // 2."""
    check_data(hidden, weight, bias, targets, seq_ids, ref_logps, ignore_index)
    o = _Opts(beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes, backend,
              token_stats)
    needs = (need_hidden, need_weight, need_bias)
    n_pairs = ref_logps.shape[0] // 2
    pair_grads = None
    if reduction != "none" and any(needs):
        pair_grads = torch.full((n_pairs,), 1.0 / n_pairs if reduction == "mean" else 1.0, dtype=torch.float64,
                                device=hidden.device)
    losses, policy, stats, grads = _dpo_pass(hidden, weight, bias, targets, seq_ids, ref_logps, o, pair_grads, needs)
    loss = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses
    return (loss, policy, policy.new_empty(0) if stats is None else stats,
            *grad_outputs(grads, hidden, weight))


@_fused_linear_dpo.register_fake
def _(hidden, weight, bias, targets, seq_ids, ref_logps, beta, loss_type, label_smoothing, gamma, softcap,
      temperature, ignore_index, chunk_bytes, backend, token_stats, reduction, need_hidden, need_weight, need_bias):
    n_seq = ref_logps.shape[0]
    acc = upcast(hidden[:0]).dtype
    loss = hidden.new_empty((n_seq // 2,) if reduction == "none" else (), dtype=acc)
    stats = hidden.new_empty((4, n_seq) if token_stats else (0,), dtype=acc)
    needs = (need_hidden, need_weight, need_bias) if reduction != "none" else (False, False, False)
    return loss, hidden.new_empty(n_seq, dtype=acc), stats, *grad_fakes(needs, hidden, weight, bias)


@torch.library.custom_op("prefrank::fused_linear_dpo_backward", mutates_args=())
def _fused_linear_dpo_backward(grad_losses: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                               targets: Tensor, seq_ids: Tensor, ref_logps: Tensor, beta: float, loss_type: str,
                               label_smoothing: float, gamma: float, softcap: float | None, temperature: float,
                               ignore_index: int, chunk_bytes: int | None, backend: str, token_stats: bool,
                               need_hidden: bool, need_weight: bool,
                               need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of Σ_i grad_losses[i] · loss_i (grad_losses [B]) w.r.t. hidden, weight and bias
    (empty where not needed): the chunks recomputed with each pair's upstream gradient."""
    o = _Opts(beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes, backend, False)
    needs = (need_hidden, need_weight, need_bias)
    grads = _dpo_pass(hidden, weight, bias, targets, seq_ids, ref_logps, o, grad_losses, needs)[3]
    return grad_outputs(grads, hidden, weight)


@_fused_linear_dpo_backward.register_fake
def _(grad_losses, hidden, weight, bias, targets, seq_ids, ref_logps, beta, loss_type, label_smoothing, gamma,
      softcap, temperature, ignore_index, chunk_bytes, backend, token_stats, need_hidden, need_weight, need_bias):
    return grad_fakes((need_hidden, need_weight, need_bias), hidden, weight, bias)


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, targets, seq_ids, ref_logps, *scalars = inputs
    *ctx.scalars, ctx.reduction, need_h, need_w, need_b = scalars
    ctx.needs = (need_h, need_w, need_b)
    ctx.mark_non_differentiable(*output[1:])
    # no zeros for the outputs that get no gradient: d hidden and d weight among them (0.15 GB at
    # V 32000, d 1024, 4096 tokens, allocated by autograd before every backward)
    ctx.set_materialize_grads(False)
    # "mean" / "sum": the gradients the forward computed; "none": what the backward op recomputes from
    ctx.save_for_backward(*(output[3:] if ctx.reduction != "none" else (hidden, weight, bias, targets, seq_ids,
                                                                        ref_logps)))


def _tracing() -> bool:
    """Whether torch.compile, AOTAutograd or make_fx is tracing (values are symbolic: no .item())."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def _fused_backward(ctx, grad_loss, *_):
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized: _fused_setup)
        return (None,) * 20
    if ctx.reduction == "none":
        with torch.no_grad():  # first derivatives only: the backward op has no backward
            grads = torch.ops.prefrank.fused_linear_dpo_backward(grad_loss, *ctx.saved_tensors, *ctx.scalars,
                                                                 *ctx.needs)
    elif not _tracing() and grad_loss.item() == 1.0:
        # eager, loss not scaled: hand the forward's gradients over as they are; without retain_graph
        # autograd then keeps them as .grad instead of copying them (d weight in fp32 is 0.5 GB at a
        # 128k vocabulary)
        grads = ctx.saved_tensors
    else:  # scale by the upstream gradient (traced: always, a graph has no data-dependent branch)
        grads = [g * grad_loss.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), *([None] * 17))  # 20 inputs


_fused_linear_dpo.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_linear_dpo_loss(hidden, weight, targets, sequence_ids=None, *, bias=None, ref_chosen_logps=None,
                          ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                          num_pairs: int | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
                          label_smoothing: float = 0.0, gamma: float = 1.0, softcap: float | None = None,
                          temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, chunk_bytes: int | None = None,
                          reduction: str = "mean", backend: str | None = None, return_metrics: bool = True,
                          sequence_stats: bool = False, vocab_parallel: bool = False):
    """DPO-family loss from the policy's final hidden states, differentiable w.r.t. hidden, weight and bias.

    Layout: hidden [N, d] with sequence_ids [N] (int; 2i: chosen of pair i, 2i + 1: rejected;
    prompt and padding rows carry ignore_index in targets, so a packed prompt + chosen + rejected
    layout works), or [2B, T, d] with chosen rows first (sequence_ids None). targets: next-token
    ids aligned with hidden ([N] or [2B, T], int64). hidden: float32 / bfloat16 / float16 /
    float64; weight [V, d] and bias [V] (or None) of the output head, any floating dtype (hidden
    is cast to the weight's). Head: z = (hidden @ weight.T + bias) / temperature, then
    softcap·tanh(z / softcap) if softcap (both as the model applies them).

    The reference: precomputed sequence sums ref_chosen_logps / ref_rejected_logps [B] (float),
    or ref_hidden (the reference model's hidden states, hidden's layout) with ref_weight (default:
    weight) and ref_bias (default: none). num_pairs: B, needed only for ref_hidden in the
    flat layout, where it is otherwise read from sequence_ids (a device sync and, under
    torch.compile, a graph break).

    Loss (z = policy log-ratio minus gamma·reference log-ratio, dpo/objective.py): loss_type one of
    "sigmoid" (DPO; label_smoothing ε in [0, 1] gives cDPO), "robust" (ε < 0.5), "hinge" (SLiC),
    "ipo" (on mean token log-probs), "gamma" (DPO^γ: gamma scales the reference log-ratio; other
    types use 1); beta > 0. reduction: "mean" over pairs (default), "sum", or "none" (per-pair
    losses [B]; the backward then recomputes the chunks).

    chunk_bytes: memory for one chunk of logits (None: 256 MiB on GPU, 64 MiB on CPU). backend:
    "triton", "cpp" or "torch" for the per-chunk log-softmax (None: $PREFRANK_BACKEND, else the
    fastest for hidden). Works under torch.compile(fullgraph=True) (flat ref_hidden: pass num_pairs).

    Returns the loss (fp32; float64 for float64 hidden) if not return_metrics, else (loss, metrics):
    metrics are 0-dim tensors (dpo_metrics; no device sync: call .item() to read one). With
    sequence_stats (what trainers log; refused with vocab_parallel) the metrics also hold, per pair
    and sequence ([B, 2] float tensors, column 0 chosen, detached): the policy's "sequence_logps";
    its "sequence_tokens" (target tokens); and sums over its tokens of the entropy of the next-token
    distribution ("sequence_entropy"), of the mean logit over the vocabulary ("sequence_logits") and
    of whether the target is the (first) argmax ("sequence_top1"), computed from the logits the loss
    computes anyway. Bad input (shapes, dtypes, options, target ids, NaN / inf) raises, naming the
    argument.

    Sharded heads: a DTensor weight, bias, ref_weight or ref_bias sharded Shard(0) on a 1-D mesh
    (FSDP2's, the lm_head as its own unit) is gathered for the op, its gradient returned sharded and
    rank-averaged as FSDP2's (ops/sharded.py); other layouts are refused. vocab_parallel=True
    instead splits the head by vocabulary over tensor-parallel ranks (dpo/vocab_parallel.py).
    """
    if vocab_parallel:  # each rank scores its vocabulary shard (dpo/vocab_parallel.py)
        return vocab_parallel_dpo_loss(**{k: v for k, v in locals().items() if k != "vocab_parallel"})
    weight, bias, ref_weight, ref_bias = gather_head(weight=weight, bias=bias, ref_weight=ref_weight,
                                                     ref_bias=ref_bias)
    check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, softcap=softcap,
                  temperature=temperature, reduction=reduction, chunk_bytes=chunk_bytes)
    flat_h, flat_t, seq, backend, ref_logps = prepare(hidden, weight, bias, targets, sequence_ids, ref_chosen_logps,
                                                      ref_rejected_logps, ref_hidden, ref_weight, ref_bias, num_pairs,
                                                      softcap, temperature, ignore_index, backend, False)
    grad = torch.is_grad_enabled()
    needs = (grad and flat_h.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    loss, policy, stats, *_ = torch.ops.prefrank.fused_linear_dpo(
        flat_h, weight, bias, flat_t.long(), seq.long(), ref_logps, float(beta), loss_type, float(label_smoothing),
        float(gamma), None if softcap is None else float(softcap), float(temperature), ignore_index, chunk_bytes,
        backend, sequence_stats, reduction, *needs)
    if not return_metrics:
        return loss
    metrics = dpo_metrics(policy[0::2], policy[1::2], ref_logps[0::2].to(policy.dtype),
                          ref_logps[1::2].to(policy.dtype), beta)
    if sequence_stats:
        metrics["sequence_logps"] = policy.view(-1, 2)
        for name, values in zip(("tokens", "entropy", "logits", "top1"), stats):
            metrics[f"sequence_{name}"] = values.view(-1, 2)
    return loss, metrics


class FusedLinearDPOLoss(torch.nn.Module):
    """nn.Module form of fused_linear_dpo_loss: configure once (the keyword options of fused_linear_dpo_loss:
    beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes, reduction, backend,
    return_metrics, sequence_stats, vocab_parallel), call with (hidden, weight, targets, sequence_ids=None,
    bias=None, ref_chosen_logps=..., ...); any option passed to a call overrides the configured one for that call."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0,
                 softcap: float | None = None, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 chunk_bytes: int | None = None, reduction: str = "mean", backend: str | None = None,
                 return_metrics: bool = True, sequence_stats: bool = False, vocab_parallel: bool = False):
        super().__init__()
        check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, softcap=softcap,
                      temperature=temperature, reduction=reduction, chunk_bytes=chunk_bytes)
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(ops.BACKENDS)}")
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
                            softcap=softcap, temperature=temperature, ignore_index=ignore_index,
                            chunk_bytes=chunk_bytes, reduction=reduction, backend=backend,
                            return_metrics=return_metrics, sequence_stats=sequence_stats, vocab_parallel=vocab_parallel)

    def forward(self, hidden, weight, targets, sequence_ids=None, bias=None, **kwargs):
        return fused_linear_dpo_loss(hidden, weight, targets, sequence_ids, bias=bias, **{**self.options, **kwargs})
