"""The main job, top-down: data → tokens → batches → forward → log-probs → table.

`score_dataset` streams the input in chunks of rows; each chunk is tokenized, scored under the
policy (and reference) model with length-bucketed batches, and written as one Parquet row group
in input order. Bad rows are kept as `status=error` rows; `strict` stops at the first one.
"""
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch

from prefrank import __version__
from prefrank.data import Columns, InputError, RowError, count_rows, read_examples
from prefrank.io import ScoreTable, completion_fields, input_hash
from prefrank.models import CausalLM, load_model, load_tokenizer, resolve_device, resolve_dtype
from prefrank.scoring import score
from prefrank.tokenization import tokenize_example


@dataclass
class ScoreOptions:
    data: str
    model: str
    out: str = "scores.parquet"
    ref_model: str | None = None
    tokenizer: str | None = None  # default: the policy model's
    method: str = "kv"
    dtype: str = "auto"
    device: str = "auto"
    max_tokens_per_batch: int = 8192
    chunk_rows: int = 2048
    limit: int | None = None
    split: str = "train"
    subset: str | None = None
    columns: Columns = field(default_factory=Columns)
    max_length: int | None = None  # default: the model's maximum positions
    truncate: str = "none"
    append_eos: bool = False
    per_token: bool = False
    strict: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class Summary:
    rows: int = 0
    ok: int = 0
    errors: int = 0
    truncated: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    first_error: str | None = None

    def line(self, out: str) -> str:
        waste = 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        text = (f"scored {self.rows} rows in {self.seconds:.1f}s ({self.rows / max(self.seconds, 1e-9):.1f} rows/s, "
                f"{self.real_tokens / max(self.seconds, 1e-9):.0f} tokens/s, {waste:.0%} padding): "
                f"{self.ok} ok, {self.errors} errors, {self.truncated} truncated -> {out}")
        if self.first_error:
            text += f"\nfirst error: {self.first_error}"
        return text


def _load_lm(path, opts, device, dtype, vocab_size=None) -> CausalLM:
    lm = CausalLM(load_model(path, dtype=dtype, device=device, trust_remote_code=opts.trust_remote_code,
                             allow_pickle=opts.allow_pickle))
    if vocab_size is not None and lm.vocab_size != vocab_size:
        raise InputError(f"reference model {path!r} has vocabulary {lm.vocab_size}, the policy {vocab_size}: "
                         f"both are scored on the same token ids and must share a vocabulary")
    if opts.method == "kv":
        lm.check_head()
    return lm


def _tokenize_chunk(examples, tokenizer, opts, max_length):
    """Token ids for each valid example; errors recorded on the example itself."""
    tokenized = {}
    for ex in examples:
        if ex.error is None:
            try:
                tokenized[ex.index] = tokenize_example(ex, tokenizer, max_length=max_length, truncate=opts.truncate,
                                                       append_eos=opts.append_eos)
            except RowError as e:
                ex.error = str(e)
        if ex.error is not None and opts.strict:
            raise InputError(f"row {ex.index} (id {ex.id}): {ex.error} (--strict)")
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
        row = {"id": ex.id, "truncated": item is not None and item.truncated,
               "status": "ok" if item is not None else "error", "error": ex.error}
        row.update({"human_scores": ex.scores} if kwise else {"alpha": ex.alpha})
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


def score_dataset(opts: ScoreOptions, *, progress: bool = True) -> Summary:
    """Score every row of `opts.data` into `opts.out` (+ sidecar); returns the run's summary."""
    examples = read_examples(opts.data, opts.columns, split=opts.split, subset=opts.subset, limit=opts.limit)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    policy_lm = _load_lm(opts.model, opts, device, dtype)
    tokenizer = load_tokenizer(opts.tokenizer or opts.model, trust_remote_code=opts.trust_remote_code)
    ref_lm = _load_lm(opts.ref_model, opts, device, dtype, policy_lm.vocab_size) if opts.ref_model else None
    limits = [m for m in (opts.max_length, policy_lm.max_positions, ref_lm and ref_lm.max_positions) if m]
    max_length = min(limits) if limits else None

    kwise = opts.columns.completions is not None
    table = ScoreTable(opts.out, with_ref=ref_lm is not None, per_token=opts.per_token, kwise=kwise)
    summary = Summary()
    total = [n for n in (opts.limit, count_rows(opts.data)) if n is not None]
    bar = _progress(min(total) if total else None) if progress else None
    start = time.perf_counter()
    try:
        while chunk := list(islice(examples, opts.chunk_rows)):
            tokenized = _tokenize_chunk(chunk, tokenizer, opts, max_length)
            items = list(tokenized.values())
            policy = score(policy_lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                           per_token=opts.per_token)
            ref = ref_lm and score(ref_lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                                   per_token=opts.per_token)
            table.write(_chunk_columns(chunk, tokenized, policy, ref, opts.per_token, kwise))

            summary.rows += len(chunk)
            summary.ok += len(items)
            summary.errors += len(chunk) - len(items)
            summary.truncated += sum(it.truncated for it in items)
            for s in (policy, ref) if ref else (policy,):
                summary.real_tokens += s.counts.real
                summary.padded_tokens += s.counts.padded
            summary.first_error = summary.first_error or next(
                (f"row {ex.index} (id {ex.id}): {ex.error}" for ex in chunk if ex.error), None)
            summary.seconds = time.perf_counter() - start
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{summary.real_tokens / summary.seconds:.0f}", errors=summary.errors)
    except BaseException:
        table.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    table.close(_sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, summary))
    return summary


def _model_info(lm: CausalLM | None, path: str | None):
    if lm is None:
        return None
    return {"path": path, "class": type(lm.model).__name__, "vocab_size": lm.vocab_size,
            "parameters": sum(p.numel() for p in lm.model.parameters()), "max_positions": lm.max_positions}


def _sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, summary) -> dict:
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
        "max_length": max_length,
        "options": asdict(opts),
        "input": {"source": opts.data, "split": opts.split, "subset": opts.subset, "hash": input_hash(opts.data)},
        "summary": asdict(summary),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__,
                     "pyarrow": pyarrow.__version__},
    }
