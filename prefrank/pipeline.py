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
from prefrank.data import COLUMN_FLAGS, Columns, InputError, count_rows, open_examples
from prefrank.io import (COMPLETION_NAMES, OutputLock, Parts, WriteError, check_output, completion_fields, input_hash,
                         table_schema)
from prefrank.models import CausalLM, fingerprint, load_model, load_tokenizer, resolve_device, resolve_dtype
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


def _on_rank_0(step, rank: int, world: int, device: torch.device):
    """Run `step` on rank 0 only; an InputError it raises then stops every rank (none waits for a
    rank 0 that has stopped). Doubles as a barrier."""
    error = None
    if rank == 0:
        try:
            step()
        except InputError as e:
            error = e
    if world > 1:
        import torch.distributed as dist
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0, device=device if device.type == "cuda" else None)
        if rank != 0 and message[0] is not None:
            raise InputError(f"rank 0 stopped: {message[0]}")
    if error is not None:
        raise error


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


def _first_seqs(tokenized) -> dict[int, int]:
    """Where each item's completions start in the flat score order."""
    first_seq, n_seqs = {}, 0
    for index, item in tokenized.items():
        first_seq[index], n_seqs = n_seqs, n_seqs + len(item.completion_ids)
    return first_seq


def _mark_non_finite(examples, tokenized, scores: dict, kwise: bool):
    """A row with a NaN or infinite log-prob sum under any model (float16 overflow, say) becomes an
    error row naming the model and completion: such a number is never written as a score. The sums
    cover every token: float64 sums of finite fp32 log-probs are finite."""
    first_seq = _first_seqs(tokenized)
    finite = {model: torch.isfinite(s.logps) for model, s in scores.items()}
    for ex in examples:
        item = tokenized.get(ex.index)
        if item is None:
            continue
        seqs = range(first_seq[ex.index], first_seq[ex.index] + len(item.completion_ids))
        bad = [f"{model} {COMPLETION_NAMES[k] if not kwise else f'completion {k}'} {float(s.logps[seq])}"
               for model, s in scores.items() for k, seq in enumerate(seqs) if not finite[model][seq]]
        if bad:
            ex.error = (f"non-finite log-prob ({', '.join(bad)}): the model overflows in its dtype? "
                        f"try --dtype bfloat16 or float32")


def _chunk_columns(examples, tokenized, policy, ref, per_token, kwise) -> dict[str, list]:
    """One table row per example, in input order; scores are flat over the valid examples."""
    models = {"": policy} if ref is None else {"": policy, "ref_": ref}
    first_seq = _first_seqs(tokenized)
    rows = []
    for ex in examples:
        item = tokenized.get(ex.index) if ex.error is None else None
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
    same table. Rank 0 assembles it when every rank has finished, and holds the output's lock from
    the start to the end (the ranks share the parts folder)."""
    rank, world = distributed()
    device = resolve_device(opts.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    lock = OutputLock(opts.out)

    def guard_output():  # before anything is loaded
        check_output(opts.out, {"--data": opts.data, "--model": opts.model, "--ref-model": opts.ref_model,
                                "--tokenizer": opts.tokenizer, "--chat-template": opts.chat_template})
        lock.acquire()

    _on_rank_0(guard_output, rank, world, device)
    try:
        return _score(opts, rank, world, device, progress)
    finally:
        lock.release()


def _score(opts: ScoreOptions, rank: int, world: int, device: torch.device, progress: bool) -> Summary | None:
    mapping, examples = open_examples(opts.data, opts.columns, split=opts.split, subset=opts.subset,
                                      limit=opts.limit)
    opts = replace(opts, columns=mapping)  # the sidecar records the mapping used ("auto" resolved)
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

    def prepare():
        nonlocal created
        sidecar = _sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, world)
        created = parts.prepare(_manifest(sidecar), sidecar, opts.resume)

    _on_rank_0(prepare, rank, world, device)

    total = [n for n in (opts.limit, None if opts.columns.group_by else count_rows(opts.data)) if n is not None]
    bar = _progress(min(total) if total else None) if progress and rank == 0 else None
    start = time.perf_counter()
    n_chunks = tokens = 0
    try:
        while chunk := list(islice(examples, opts.chunk_rows)):
            c, n_chunks = n_chunks, n_chunks + 1
            if c % world != rank or (opts.resume and parts.is_complete(c, [ex.id for ex in chunk])):
                continue
            chunk_start = time.perf_counter()
            tokenized = _tokenize_chunk(chunk, tokenizer, opts, max_length)
            items = list(tokenized.values())
            policy = score(policy_lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                           per_token=opts.per_token)
            ref = ref_lm and score(ref_lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                                   per_token=opts.per_token)
            _mark_non_finite(chunk, tokenized, {"policy": policy} | ({"reference": ref} if ref else {}), kwise)
            columns = _chunk_columns(chunk, tokenized, policy, ref, opts.per_token, kwise)
            stats = _chunk_stats(chunk, tokenized, [policy, ref] if ref else [policy], time.perf_counter() - chunk_start)
            parts.write(c, columns, schema, stats)
            if bar is not None:
                tokens += stats["real_tokens"]
                bar.update(len(chunk) * world)
                bar.set_postfix(tok_s=f"{tokens * world / (time.perf_counter() - start):.0f}")
    except WriteError:  # a full disk, say: the parts written so far stay for --resume
        raise
    except InputError:  # a bad invocation, unreadable input or --strict: nothing worth resuming from a new run
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
    return Summary(**parts.merge(schema))


def merge_parts(out: str) -> Summary:
    """Assemble OUT from OUT.parts/ (after a run whose rank 0 did not get to it), holding OUT's lock."""
    parts = Parts(out)
    if not parts.dir.exists():
        raise InputError(f"no parts to merge: {parts.dir} does not exist")
    lock = OutputLock(out)
    lock.acquire()
    try:
        options = parts.read_json("sidecar.json")["table"]
        return Summary(**parts.merge(table_schema(**options)))
    finally:
        lock.release()


def _chunk_stats(chunk, tokenized, scores, seconds: float) -> dict:
    """A part's statistics; `seconds` is its own scoring time."""
    ok_rows = [ex for ex in chunk if ex.error is None]  # not rows whose scores were not finite
    ok = [tokenized[ex.index] for ex in ok_rows]
    return {"rows": len(chunk), "ok": len(ok), "errors": len(chunk) - len(ok),
            "truncated": sum(it.truncated for it in ok), "boundary_moved": sum(it.boundary_moved for it in ok),
            "reoriented": sum(ex.reoriented for ex in ok_rows), "ties": sum(bool(ex.tie) for ex in ok_rows),
            "multi_turn": sum(ex.multi_turn for ex in ok_rows),
            "real_tokens": sum(s.counts.real for s in scores), "padded_tokens": sum(s.counts.padded for s in scores),
            "methods": dict(Counter(s.method for s in scores)), "seconds": seconds,
            "first_error": next((f"row {ex.index} (id {ex.id}): {ex.error}" for ex in chunk if ex.error), None)}


_PATHS = ("data", "model", "ref_model", "tokenizer")  # options naming local files or hub ids


def _manifest(sidecar: dict) -> dict:
    """What must match for --resume to continue a run: everything that decides the rows, keyed by
    what a refusal names (the option, or the file and its option). Local paths are compared
    resolved (a relative path to the same file is the same input), models and tokenizers by their
    files' fingerprints."""
    manifest = {"--data contents": sidecar["input"]["hash"], "model dtype": sidecar["dtype"],
                "maximum length": sidecar["max_length"]}
    for name, value in sidecar["options"].items():
        if name in ("out", "resume", "device", "max_tokens_per_batch", "compile"):
            continue
        if name == "columns":
            manifest.update({COLUMN_FLAGS.get(k, f"column option {k}"): v for k, v in value.items()})
        else:
            resolved = value is not None and name in _PATHS and os.path.exists(value)
            manifest["--" + name.replace("_", "-")] = os.path.realpath(value) if resolved else value
    for name, files in sidecar["files"].items():
        manifest.update({f"{file} of --{name.replace('_', '-')}": fp for file, fp in files.items()})
    return manifest


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
        # the tokenizer's files are the policy's unless --tokenizer names others
        "files": {name: fingerprint(getattr(opts, name)) for name in ("model", "ref_model", "tokenizer")
                  if getattr(opts, name)},
        "table": {"with_ref": ref_lm is not None, "per_token": opts.per_token, "kwise": opts.columns.completions is not None},
        "world_size": world,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__,
                     "pyarrow": pyarrow.__version__},
    }
