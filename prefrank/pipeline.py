"""The main job, top-down: data → tokens → batches → forward → log-probs → table.

`score_dataset` streams the input in chunks of rows; each chunk is tokenized, scored under the
policy (and reference) model with length-bucketed batches, and written as one Parquet part;
the parts become the table, in input order. Memory stays flat whatever the input's size; a
killed run continues with `resume`; under torchrun the chunks are shared among the ranks. Bad
rows are kept as `status=error` rows; `strict` stops at the first one.
"""
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from itertools import islice

import torch

from prefrank import __version__
from prefrank.data import Columns, InputError, count_rows, open_examples
from prefrank.io import Parts, completion_fields, input_hash, table_schema
from prefrank.models import CausalLM, load_model, load_tokenizer, resolve_device, resolve_dtype
from prefrank.scoring import resolve_method, score
from prefrank.tokenization import tokenize_examples


@dataclass
class ScoreOptions:
    data: str
    model: str
    out: str = "scores.parquet"
    ref_model: str | None = None
    tokenizer: str | None = None  # default: the policy model's
    chat_template: str | None = None  # a Jinja file for the tokenizer (conversational rows)
    method: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_tokens_per_batch: int = 8192
    chunk_rows: int = 2048
    limit: int | None = None
    split: str = "train"
    subset: str | None = None
    columns: Columns = field(default_factory=Columns)
    tokenization: str = "joint"  # TOKENIZATION_MODES
    max_length: int | None = None  # default: the model's maximum positions
    truncate: str = "none"
    append_eos: bool = False
    per_token: bool = False
    strict: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    compile: bool = False  # torch.compile the models' blocks (CausalLM.compile_blocks)


@dataclass
class Summary:
    rows: int = 0
    ok: int = 0
    errors: int = 0
    truncated: int = 0
    boundary_moved: int = 0  # rows whose prompt's last ids were joined to the completions (tokenization.py)
    reoriented: int = 0  # pairs whose raters preferred the rejected column (swapped)
    ties: int = 0  # pairs whose raters tied (alpha = 0.5)
    multi_turn: int = 0  # rows whose completions hold more than one message
    real_tokens: int = 0
    padded_tokens: int = 0
    methods: dict = field(default_factory=dict)  # method → chunk scorings it did (policy and reference)
    seconds: float = 0.0
    first_error: str | None = None

    def line(self, out: str) -> str:
        waste = 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        text = (f"scored {self.rows} rows in {self.seconds:.1f}s ({self.rows / max(self.seconds, 1e-9):.1f} rows/s, "
                f"{self.real_tokens / max(self.seconds, 1e-9):.0f} tokens/s, {waste:.0%} padding): "
                f"{self.ok} ok, {self.errors} errors, {self.truncated} truncated -> {out}")
        if self.boundary_moved:
            text += (f"\n{self.boundary_moved} rows had their prompt's last tokens merged with a completion's first: "
                     f"those ids are scored as the completions'")
        verdict = [f"{n} {what}" for n, what in ((self.reoriented, "reoriented to the raters' choice"),
                                                  (self.ties, "tied (alpha = 0.5)"),
                                                  (self.multi_turn, "multi-turn")) if n]
        if verdict:
            text += f"\nof the ok rows: {', '.join(verdict)}"
        if self.first_error:
            text += f"\nfirst error: {self.first_error}"
        return text


def distributed() -> tuple[int, int]:
    """(rank, world size): torch.distributed under torchrun (gloo on CPU, nccl on CUDA), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        # generous timeout: ranks wait for each other only at the start and at the end
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _load_lm(path, opts, device, dtype, vocab_size=None) -> CausalLM:
    lm = CausalLM(load_model(path, dtype=dtype, device=device, trust_remote_code=opts.trust_remote_code,
                             allow_pickle=opts.allow_pickle))
    if vocab_size is not None and lm.vocab_size != vocab_size:
        raise InputError(f"reference model {path!r} has vocabulary {lm.vocab_size}, the policy {vocab_size}: "
                         f"both are scored on the same token ids and must share a vocabulary")
    if resolve_method(lm, opts.method) != "naive":
        lm.check_head()
    if opts.compile:
        resolve_method(lm.compile_blocks(), opts.method)  # kv cannot run compiled: say so now
    return lm


def _tokenize_chunk(examples, tokenizer, opts, max_length):
    """Token ids for each valid example; errors recorded on the example itself."""
    tokenized = tokenize_examples(examples, tokenizer, mode=opts.tokenization, max_length=max_length,
                                  truncate=opts.truncate, append_eos=opts.append_eos)
    if opts.strict:
        bad = next((ex for ex in examples if ex.error is not None), None)
        if bad is not None:
            raise InputError(f"row {bad.index} (id {bad.id}): {bad.error} (--strict)")
    return tokenized


def _chunk_columns(examples, tokenized, policy, ref, per_token, kwise) -> dict[str, list]:
    """One table row per example, in input order; scores are flat over the valid examples."""
    models = {"": policy} if ref is None else {"": policy, "ref_": ref}
    first_seq, n_seqs = {}, 0  # where each item's completions start in the flat score order
    for index, item in tokenized.items():
        first_seq[index], n_seqs = n_seqs, n_seqs + len(item.completion_ids)
    rows = []
    for ex in examples:
        item = tokenized.get(ex.index)
        row = {"id": ex.id, "multi_turn": ex.multi_turn, "truncated": item is not None and item.truncated,
               "status": "ok" if item is not None else "error", "error": ex.error}
        row.update({"human_scores": ex.scores} if kwise else
                   {"alpha": ex.alpha, "n_votes": ex.n_votes, "tie": ex.tie, "reoriented": ex.reoriented})
        seqs = None if item is None else range(first_seq[ex.index], first_seq[ex.index] + len(item.completion_ids))
        row.update(completion_fields("n", None if item is None else [len(c) for c in item.completion_ids], kwise))
        for prefix, scores in models.items():
            row.update(completion_fields(prefix + "logp", None if seqs is None else [float(scores.logps[s]) for s in seqs],
                                         kwise))
            if per_token:
                row.update(completion_fields(prefix + "token_logps",
                                             None if seqs is None else [scores.token_logps[s] for s in seqs], kwise))
        rows.append(row)
    return {name: [r[name] for r in rows] for name in rows[0]}


def _progress(total):
    from tqdm import tqdm
    return tqdm(total=total, unit="pair", dynamic_ncols=True, disable=None)


def score_dataset(opts: ScoreOptions, *, progress: bool = True) -> Summary | None:
    """Score every row of `opts.data` into `opts.out` (+ sidecar); returns the run's summary
    (None on ranks other than 0 under torchrun).

    The input is read in chunks of `chunk_rows` rows; chunk c is scored by rank c mod world size
    and written as its own part, so any number of processes, and any resumed run, produce the
    same table. Rank 0 assembles it when every rank has finished."""
    rank, world = distributed()
    columns, examples = open_examples(opts.data, opts.columns, split=opts.split, subset=opts.subset,
                                      limit=opts.limit)
    opts = replace(opts, columns=columns)  # the sidecar records the mapping used ("auto" resolved)
    device = resolve_device(opts.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(opts.dtype, device)
    policy_lm = _load_lm(opts.model, opts, device, dtype)
    tokenizer = load_tokenizer(opts.tokenizer or opts.model, trust_remote_code=opts.trust_remote_code,
                               chat_template=opts.chat_template)
    ref_lm = _load_lm(opts.ref_model, opts, device, dtype, policy_lm.vocab_size) if opts.ref_model else None
    limits = [m for m in (opts.max_length, policy_lm.max_positions, ref_lm and ref_lm.max_positions) if m]
    max_length = min(limits) if limits else None
    kwise = opts.columns.completions is not None
    schema = table_schema(ref_lm is not None, opts.per_token, kwise)

    parts = Parts(opts.out)
    created = False
    if rank == 0:
        sidecar = _sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, world)
        created = parts.prepare(_manifest(sidecar), sidecar, opts.resume)
    _barrier(world)

    total = [n for n in (opts.limit, None if columns.group_by else count_rows(opts.data)) if n is not None]
    bar = _progress(min(total) if total else None) if progress and rank == 0 else None
    start = time.perf_counter()
    n_chunks = tokens = 0
    try:
        while chunk := list(islice(examples, opts.chunk_rows)):
            c, n_chunks = n_chunks, n_chunks + 1
            if c % world != rank or (opts.resume and parts.is_complete(c, [ex.id for ex in chunk])):
                continue
            tokenized = _tokenize_chunk(chunk, tokenizer, opts, max_length)
            items = list(tokenized.values())
            policy = score(policy_lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                           per_token=opts.per_token)
            ref = ref_lm and score(ref_lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                                   per_token=opts.per_token)
            stats = _chunk_stats(chunk, items, [policy, ref] if ref else [policy])
            parts.write(c, _chunk_columns(chunk, tokenized, policy, ref, opts.per_token, kwise), schema, stats)
            if bar is not None:
                tokens += stats["real_tokens"]
                bar.update(len(chunk) * world)
                bar.set_postfix(tok_s=f"{tokens * world / (time.perf_counter() - start):.0f}")
    except InputError:  # a bad invocation or --strict: nothing worth resuming from a new run
        if created:
            parts.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    parts.mark_done(rank, n_chunks)
    _barrier(world)
    if rank != 0:
        return None
    return Summary(**parts.merge(schema, seconds=time.perf_counter() - start))


def merge_parts(out: str) -> Summary:
    """Assemble OUT from OUT.parts/ (after a run whose rank 0 did not get to it)."""
    parts = Parts(out)
    if not parts.dir.exists():
        raise InputError(f"no parts to merge: {parts.dir} does not exist")
    options = parts.read_json("sidecar.json")["table"]
    return Summary(**parts.merge(table_schema(**options), seconds=0.0))


def _chunk_stats(chunk, items, scores) -> dict:
    return {"rows": len(chunk), "ok": len(items), "errors": len(chunk) - len(items),
            "truncated": sum(it.truncated for it in items), "boundary_moved": sum(it.boundary_moved for it in items),
            "reoriented": sum(ex.reoriented for ex in chunk if ex.error is None),
            "ties": sum(bool(ex.tie) for ex in chunk if ex.error is None),
            "multi_turn": sum(ex.multi_turn for ex in chunk if ex.error is None),
            "real_tokens": sum(s.counts.real for s in scores), "padded_tokens": sum(s.counts.padded for s in scores),
            "methods": dict(Counter(s.method for s in scores)),
            "first_error": next((f"row {ex.index} (id {ex.id}): {ex.error}" for ex in chunk if ex.error), None)}


def _manifest(sidecar: dict) -> dict:
    """What must match for --resume to continue a run: everything that decides the rows."""
    options = {k: v for k, v in sidecar["options"].items()
               if k not in ("out", "resume", "device", "max_tokens_per_batch", "compile")}
    return {"input": sidecar["input"], "options": options, "dtype": sidecar["dtype"],
            "max_length": sidecar["max_length"], "table": sidecar["table"]}


def _model_info(lm: CausalLM | None, path: str | None):
    if lm is None:
        return None
    return {"path": path, "class": type(lm.model).__name__, "vocab_size": lm.vocab_size,
            "parameters": sum(p.numel() for p in lm.model.parameters()), "max_positions": lm.max_positions}


def _sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, world) -> dict:
    """Everything about the run but its summary, which merge() adds from the parts."""
    import numpy
    import pyarrow
    import transformers
    return {
        "prefrank_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "model": _model_info(policy_lm, opts.model),
        "ref_model": _model_info(ref_lm, opts.ref_model),
        "tokenizer": {"path": opts.tokenizer or opts.model, "class": type(tokenizer).__name__,
                      "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "method": opts.method,
        "tokenization": opts.tokenization,
        "max_length": max_length,
        "options": asdict(opts),
        "input": {"source": opts.data, "split": opts.split, "subset": opts.subset, "hash": input_hash(opts.data)},
        "table": {"with_ref": ref_lm is not None, "per_token": opts.per_token, "kwise": opts.columns.completions is not None},
        "world_size": world,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__,
                     "pyarrow": pyarrow.__version__},
    }
