"""The main job, top-down: data → tokens → batches → forward → log-probs → table.

`score_dataset` streams the input in chunks of rows; each chunk is tokenized, scored under the
policy (and reference) model with length-bucketed batches, and written as one Parquet part;
the parts become the table, in input order. Memory stays flat whatever the input's size; a
killed run continues with `resume`; under torchrun the chunks are shared among the ranks. Bad
rows are kept as `status=error` rows; `strict` stops at the first one.
"""
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from itertools import islice

import torch

from prefrank import __version__
from prefrank.data import Columns, count_rows, open_examples
from prefrank.errors import InputError, WriteError
from prefrank.io import OutputLock, Parts, check_output, input_hash
from prefrank.models import DTYPES, CausalLM, HeadError, LoadOptions, fingerprint, resolve_dtype
from prefrank.options import option, options, positive_int, row_options
from prefrank.runtime import (
    Layout,
    barrier,
    layout,
    load_lm,
    load_run_tokenizer,
    on_rank_0,
    process_device,
    stop_together,
)
from prefrank.runtime import max_length as run_max_length
from prefrank.scoring import METHODS, ScoringMode, deterministic_method, first_completion, resolve_method, score
from prefrank.table import RunStats, Sidecar, TableLayout
from prefrank.tokenization import TokenizeOptions, effective_join, tokenize_examples
from prefrank.votes import alpha_source


@options
class ScoreOptions(LoadOptions, TokenizeOptions, ScoringMode):
    """Everything a scoring run is told (the options of `prefrank score`)."""
    data: str = option(help="input file or Hugging Face dataset", group="data and models", path=True)
    model: str = option(help="policy model: local folder or hub id", group="data and models", path=True)
    ref_model: str | None = option(None, "reference model, scored on the same token ids", group="data and models",
                                   path=True)
    out: str = option("scores.parquet", "output Parquet file, not an input or inside one; a sidecar OUT.meta.json "
                      "records models, options, versions and the input's hash; OUT.lock keeps a second run off it "
                      "while one writes it", group="data and models", decides_rows=False, path=True)
    split: str = option("train", "dataset split for Hugging Face datasets", group="data and models")
    subset: str | None = option(None, "dataset configuration name for Hugging Face datasets", group="data and models")
    limit: int | None = option(None, "score only the first N rows (pairs with --group-by)", type=positive_int,
                               group="data and models")
    columns: Columns = field(default_factory=Columns)
    method: str = option(
        "auto", "packed: each prompt and its completions in one row under a block mask (the prompt computed once, "
        "one forward per batch); kv: the prompt's forward once, its KV cache reused by every completion (any "
        "model with a cache); both take log-probs from hidden states without full logits; naive: the plain "
        "full-logits oracle; auto: the first of packed, kv, naive that is exact for the model (packed needs sdpa "
        "or eager attention, no ALiBi and, under a sliding window, sequences that fit it; kv needs no sliding "
        "window), and kv over packed where packed's block mask would add over 20% of the matmul work in "
        "attention (tiny hidden sizes, very long rows)", choices=METHODS, group="execution")
    dtype: str = option("auto", "model dtype; log-probs accumulate in fp32 regardless",
                        choices=("auto", *DTYPES), group="execution", default_text="auto = bf16 on CUDA, else fp32")
    compile: bool = option(
        False, "torch.compile the models' transformer blocks (one graph shared by all layers, dynamic shapes): "
        "fuses the norms, rotary embeddings and activations that eager runs as separate kernels (packed scoring "
        "on an H100: 14% faster at 8B, 17-28% at 1B); the first batches wait for the compile (seconds to a "
        "minute), so it pays on long runs, mostly on GPUs; the packed and naive methods only", group="execution",
        decides_rows=False)
    max_tokens_per_batch: int = option(8192, "padded tokens per forward call", type=positive_int,
                                       group="execution", decides_rows=False)
    chunk_rows: int = option(2048, "rows read, length-sorted and written together (one part each)",
                             type=positive_int, group="execution")
    tp: int = option(1, "tensor parallelism under torchrun: shard each model over groups of TP consecutive "
                     "processes (transformers' tensor-parallel plan), the groups sharing the chunks as single "
                     "processes do; the head stays split by vocabulary (each process its shard's logits, the "
                     "log-sum-exp all-reduced: no process holds the whole head), so the numbers are those of one "
                     "process within float rounding", type=positive_int, group="execution",
                     decides_rows=False)
    per_token: bool = option(False, "also write per-token log-prob lists", group="execution")
    ches: bool = option(
        False, "also write each pair's CHES score and its length-normalized form under each model (ches, "
        "ches_normalized, ref_ches, ...): ⟨Σh(y_w), Σh(y_l)⟩ − ‖Σh(y_w)‖², h the final hidden states that "
        "predict the completion's tokens (Razin et al., ICLR 2025), from the same forward passes; K-wise tables "
        "hold the completions' hidden Gram matrix (hidden_gram)", group="execution")
    hidden_sums: bool = option(False, "also write each completion's sum of those hidden states (float32 lists)",
                               group="execution")
    strict: bool = option(False, "stop at the first bad row instead of recording it", group="execution")
    resume: bool = option(False, "continue an interrupted run: the parts in OUT.parts/ whose checksums verify are "
                          "kept, the others scored (the run's input, options and model and tokenizer files must "
                          "match)", group="execution", decides_rows=False)

    def __post_init__(self):
        super().__post_init__()
        if self.deterministic and self.tp > 1:
            raise InputError("<deterministic> with <tp>: a sharded model adds its partial matmuls in another order "
                             "than one process; score deterministically without tensor parallelism")
        if self.deterministic and self.compile:
            raise InputError("<deterministic> with <compile>: deterministic scoring uses the kv method, which does "
                             "not run compiled")


@dataclass
class Summary(RunStats):
    """The run's totals (the sidecar's summary), as `score` reports them."""
    resumed_from: int = 0  # parts an interrupted run had left, each reused if it verified
    read_as: str = ""  # the column mapping and join the input was read with (the sidecar's read_as)
    notes: str = ""  # lines on how the run went: the deterministic mode's method, a --resume with nothing to resume

    def line(self, out: str) -> str:
        waste = 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        text = (f"scored {self.rows} rows in {self.seconds:.1f}s ({self.rows / max(self.seconds, 1e-9):.1f} rows/s, "
                f"{self.real_tokens / max(self.seconds, 1e-9):.0f} tokens/s, {waste:.0%} padding): "
                f"{self.ok} ok, {self.errors} errors, {self.truncated} truncated -> {out}")
        if self.read_as:
            text += f"\nread as {self.read_as}"
        if self.notes:
            text += f"\n{self.notes}"
        if self.boundary_moved:
            text += (f"\n{self.boundary_moved} rows had their prompt's last tokens merged with a completion's first: "
                     f"those ids are scored as the completions'")
        if self.glued:
            text += (f"\n{self.glued} rows have a completion that follows its prompt's last character with no space "
                     f"between (as given, TRL's concatenation: 'weatherman.He'); --join TEXT puts text between them, "
                     f"--join chat renders them with the chat template")
        if self.no_bos:
            text += (f"\n{self.no_bos} rows were rendered by a chat template that puts no BOS token first, though the "
                     f"tokenizer puts one before plain text: they are scored without it (as TRL would); "
                     f"{{{{ bos_token }}}} at the template's start adds it")
        verdict = [f"{n} {what}" for n, what in ((self.reoriented, "reoriented to the raters' choice"),
                                                  (self.ties, "tied (alpha = 0.5)"),
                                                  (self.multi_turn, "multi-turn")) if n]
        if verdict:
            text += f"\nof the ok rows: {', '.join(verdict)}"
        if self.first_error:
            text += f"\nfirst error: {self.first_error}"
        if self.resumed_from:
            text += f"\nresumed: {self.resumed_from} parts were on disk, each reused where it verified"
        return text


def _load_lm(path, opts, device, dtype, where: Layout, vocab_size=None) -> CausalLM:
    """A model to score with, checked for the method (and the policy's vocabulary), compiled if asked."""
    lm = load_lm(path, opts, device, dtype, where)
    if vocab_size is not None and lm.vocab_size != vocab_size:
        raise InputError(f"reference model {path!r} has vocabulary {lm.vocab_size}, the policy {vocab_size}: "
                         f"both are scored on the same token ids and must share a vocabulary")
    if resolve_method(lm, opts.method) != "naive":
        try:
            lm.check_head()
        except HeadError as e:  # the naive method reads the model's own logits
            raise InputError(f"{e}; use <method> naive") from None
    if opts.compile:
        resolve_method(lm.compile_blocks(), opts.method)  # kv cannot run compiled: say so now
    return lm


def _tokenize_chunk(examples, tokenizer, opts, max_length) -> tuple[dict, dict[int, str]]:
    """Token ids of the chunk's valid examples, and every row's error (its data's, or why it
    cannot be tokenized), by input index."""
    tokenized, errors = tokenize_examples(examples, tokenizer, max_length=max_length, **opts.tokenize_kwargs)
    errors = {ex.index: ex.error for ex in examples if ex.error is not None} | errors
    if opts.strict and errors:
        bad = next(ex for ex in examples if ex.index in errors)
        raise InputError(f"row {bad.index} (id {bad.id}): {errors[bad.index]} (<strict>)")
    return tokenized, errors


def _non_finite(tokenized, sums: dict, table: TableLayout) -> dict[int, str]:
    """The errors of the rows with a NaN or infinite log-prob sum under any model (float16
    overflow, say), naming the model and completion: such a number is never written as a score.
    The sums cover every token: float64 sums of finite fp32 log-probs are finite."""
    first = first_completion(list(tokenized.values()))
    finite = {model: torch.isfinite(s.logps) for model, s in sums.items()}
    errors = {}
    for i, index in enumerate(tokenized):
        seqs = range(first[i], first[i + 1])
        bad = [f"{model} {table.completion_name(k)} {float(s.logps[seq])}"
               for model, s in sums.items() for k, seq in enumerate(seqs) if not finite[model][seq]]
        if bad:
            errors[index] = (f"non-finite log-prob ({', '.join(bad)}): the model overflows in its dtype? "
                             f"try the bfloat16 or float32 dtype")
    return errors


def _chunk_columns(examples, tokenized, errors, models: dict, opts: "ScoreOptions",
                   table: TableLayout) -> dict[str, list]:
    """One table row per example, in input order. `models`: column prefix ("" the policy, "ref_")
    → its SequenceLogprobs, flat over the tokenized examples."""
    first = first_completion(list(tokenized.values()))
    item_of = {index: k for k, index in enumerate(tokenized)}
    grams = {prefix: sums.hidden_grams(list(tokenized.values())) for prefix, sums in models.items()} if opts.ches \
        else None
    rows = []
    for ex in examples:
        item = None if ex.index in errors else tokenized[ex.index]
        row = {"id": ex.id, "multi_turn": ex.multi_turn, "truncated": item is not None and item.truncated,
               "status": "ok" if item is not None else "error", "error": errors.get(ex.index)}
        row.update({"human_scores": ex.human_scores} if table.kwise else
                   {"alpha": ex.alpha, "n_votes": ex.n_votes, "tie": ex.tie, "reoriented": ex.reoriented})
        seqs = None if item is None else range(first[item_of[ex.index]], first[item_of[ex.index] + 1])
        row.update(table.completion_fields("n", None if item is None else [len(c) for c in item.completion_ids]))
        for prefix, sums in models.items():
            row.update(table.completion_fields(prefix + "logp",
                                                None if seqs is None else [float(sums.logps[s]) for s in seqs]))
            if opts.per_token:
                row.update(table.completion_fields(prefix + "token_logps",
                                                    None if seqs is None else [sums.token_logps[s] for s in seqs]))
            if opts.hidden_sums:
                row.update(table.completion_fields(prefix + "hidden_sum", None if seqs is None else
                                                    [sums.hidden_sums[s].float().tolist() for s in seqs]))
            if opts.ches:
                row.update(table.ches_columns(prefix, None if item is None else grams[prefix][item_of[ex.index]],
                                               None if item is None else [len(c) for c in item.completion_ids]))
        rows.append(row)
    return {name: [r[name] for r in rows] for name in rows[0]}


def _progress(total):
    from tqdm import tqdm
    return tqdm(total=total, unit="pair", dynamic_ncols=True, disable=None)


def score_dataset(opts: ScoreOptions, *, progress: bool = True) -> Summary | None:
    """Score every row of `opts.data` into `opts.out` (+ sidecar); returns the run's summary
    (None on ranks other than 0 under torchrun).

    The input is read in chunks of `chunk_rows` rows; chunk c is scored by data-parallel group
    c mod groups (a group: one process, or `tp` processes sharing sharded models, whose first
    writes) and written as its own part, so any number of processes, and any resumed run, produce
    the same table. Rank 0 assembles it when every rank has finished, and holds the output's lock
    from the start to the end (the ranks share the parts folder)."""
    if opts.tp > 1 and opts.device != "auto":
        raise InputError("<device> cannot be given with <tp>: each process uses its LOCAL_RANK's GPU (or the CPU)")
    where = layout(opts.tp)
    rank, world = where.rank, where.world
    device = process_device(opts.device, world)
    lock = OutputLock(opts.out)

    def guard_output():  # before anything is loaded
        check_output(opts.out, {"<data>": opts.data, "<model>": opts.model, "<ref_model>": opts.ref_model,
                                "<tokenizer>": opts.tokenizer, "<chat_template>": opts.chat_template})
        lock.acquire()

    on_rank_0(guard_output, rank, world, device)
    try:
        return _score(opts, where, device, progress, lock)
    finally:
        lock.release()


def _score(opts: ScoreOptions, where: Layout, device: torch.device, progress: bool,
           lock: OutputLock) -> Summary | None:
    rank, world = where.rank, where.world
    mapping, examples = open_examples(opts.data, opts.columns, split=opts.split, subset=opts.subset,
                                      limit=opts.limit)
    detected = opts.columns.format == "auto"
    opts = replace(opts, columns=mapping)  # the sidecar records the mapping used ("auto" resolved)
    dtype = resolve_dtype(opts.dtype, device)
    policy_lm = _load_lm(opts.model, opts, device, dtype, where)
    tokenizer = load_run_tokenizer(opts, opts.model)
    ref_lm = _load_lm(opts.ref_model, opts, device, dtype, where, policy_lm.vocab_size) if opts.ref_model else None
    max_length = run_max_length(opts.max_length, policy_lm, ref_lm)
    table = _layout(opts, ref_lm is not None)

    parts = Parts(opts.out)
    created = False

    found = 0  # the parts an earlier run left (--resume)

    def prepare():
        nonlocal created, found
        sidecar = _sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, world, detected)
        created = parts.prepare(_manifest(opts, sidecar), sidecar, opts.resume)
        found = 0 if created else len(list(parts.dir.glob("part-*.json")))

    on_rank_0(prepare, rank, world, device)

    total = [n for n in (opts.limit, None if opts.columns.group_by else count_rows(opts.data)) if n is not None]
    bar = _progress(min(total) if total else None) if progress and rank == 0 else None
    start = time.perf_counter()
    n_chunks = tokens = 0
    # --strict under torchrun: the ranks meet after each round of `groups` chunks, so a bad row on one
    # stops them all there, and in one line, rather than the others failing in their next collective
    lockstep = opts.strict and world > 1

    def stopped():  # what a stopped job leaves: nothing, so the same command reruns
        if created:
            parts.discard()
        lock.release()
    try:
        while chunk := list(islice(examples, opts.chunk_rows)):
            c, n_chunks = n_chunks, n_chunks + 1
            mine = c % where.groups == where.group and not (
                opts.resume and parts.is_complete(c, [ex.id for ex in chunk]))
            chunk_start = time.perf_counter()
            bad = None
            if mine:
                try:
                    tokenized, errors = _tokenize_chunk(chunk, tokenizer, opts, max_length)
                except InputError as e:  # a bad row under --strict
                    bad = e
            if lockstep and (bad is not None or c % where.groups == where.groups - 1):
                stop_together(bad, c, world, device, stopped)
            elif bad is not None:
                raise bad
            if not mine:
                continue
            items = list(tokenized.values())
            policy, ref = (lm and score(lm, items, method=opts.method, budget=opts.max_tokens_per_batch,
                                        per_token=opts.per_token, hidden=opts.ches or opts.hidden_sums,
                                        deterministic=opts.deterministic)
                           for lm in (policy_lm, ref_lm))
            if not where.leader:  # a tensor-parallel rank that lent its shards: its leader writes the part
                continue
            errors |= _non_finite(tokenized, {"policy": policy} | ({"reference": ref} if ref else {}), table)
            models = {"": policy} | ({"ref_": ref} if ref else {})
            columns = _chunk_columns(chunk, tokenized, errors, models, opts, table)
            stats = _chunk_stats(chunk, tokenized, errors, [policy, ref] if ref else [policy],
                                 time.perf_counter() - chunk_start)
            parts.write(c, columns, table, stats)
            if bar is not None:
                tokens += stats.real_tokens
                bar.update(len(chunk) * where.groups)
                bar.set_postfix(tok_s=f"{tokens * where.groups / (time.perf_counter() - start):.0f}")
    except WriteError:  # a full disk, say: the parts written so far stay for --resume
        raise
    except InputError:  # a bad invocation, unreadable input or --strict: nothing worth resuming from a new run
        if created:
            parts.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    if where.leader:
        parts.mark_done(rank, n_chunks)
    if lockstep:  # the last round's end
        stop_together(None, n_chunks, world, device, stopped)
    else:
        barrier(world)
    if rank != 0:
        return None
    totals, sidecar = parts.merge()
    notes = []
    if opts.deterministic:
        used = sorted({deterministic_method(lm) for lm in (policy_lm, ref_lm) if lm is not None})
        unused = [f"--method {opts.method}"] if opts.method != "auto" and [opts.method] != used else []
        if opts.max_tokens_per_batch != ScoreOptions.max_tokens_per_batch:  # not the default
            unused.append(f"--max-tokens-per-batch {opts.max_tokens_per_batch}")
        notes.append(f"deterministic: each row scored alone by the {' and '.join(used)} method, one thread per op"
                     + (f" ({' and '.join(unused)} not used)" if unused else ""))
    if opts.resume and not found:
        notes.append("--resume: no parts of an earlier run were on disk: scored from the start")
    return Summary(**asdict(totals), resumed_from=found, read_as=sidecar.read_as, notes="\n".join(notes))


def merge_parts(out: str) -> Summary:
    """Assemble OUT from OUT.parts/ (after a run whose rank 0 did not get to it), holding OUT's lock."""
    parts = Parts(out)
    if not parts.dir.exists():
        raise InputError(f"no parts to merge: {parts.dir} does not exist")
    lock = OutputLock(out)
    lock.acquire()
    try:
        totals, sidecar = parts.merge()
        return Summary(**asdict(totals), read_as=sidecar.read_as)
    finally:
        lock.release()


def _chunk_stats(chunk, tokenized, errors, sums, seconds: float) -> RunStats:
    """A part's statistics; `seconds` is its own scoring time."""
    ok_rows = [ex for ex in chunk if ex.index not in errors]
    ok = [tokenized[ex.index] for ex in ok_rows]
    return RunStats(
        rows=len(chunk), ok=len(ok), errors=len(chunk) - len(ok), truncated=sum(it.truncated for it in ok),
        boundary_moved=sum(it.boundary_moved for it in ok), glued=sum(ex.glued for ex in ok_rows),
        no_bos=sum(it.no_bos for it in ok), reoriented=sum(ex.reoriented for ex in ok_rows),
        ties=sum(bool(ex.tie) for ex in ok_rows), multi_turn=sum(ex.multi_turn for ex in ok_rows),
        real_tokens=sum(s.counts.real for s in sums), padded_tokens=sum(s.counts.padded for s in sums),
        methods=dict(Counter(s.method for s in sums)), seconds=seconds,
        first_error=next((f"row {ex.index} (id {ex.id}): {errors[ex.index]}" for ex in chunk if ex.index in errors),
                         None))


def _layout(opts: ScoreOptions, with_ref: bool) -> TableLayout:
    """The score table's columns (the sidecar records them)."""
    return TableLayout(with_ref=with_ref, per_token=opts.per_token, kwise=opts.columns.completions is not None,
                       ches=opts.ches, hidden_sums=opts.hidden_sums)


def _manifest(opts: ScoreOptions, sidecar: Sidecar) -> dict:
    """What must match for --resume to continue a run: every option that decides the rows (local
    paths resolved: a relative path to the same file is the same input), the input's contents and
    the model and tokenizer files' fingerprints; keyed as a refusal names them (<name>: an option)."""
    manifest = {f"<{name}>": value for name, value in row_options(opts).items()}
    manifest.update({"contents of <data>": sidecar.input["hash"], "model dtype": sidecar.dtype,
                     "maximum length": sidecar.max_length})
    for name, files in sidecar.files.items():
        manifest.update({f"{file} of <{name}>": fp for file, fp in files.items()})
    return manifest


def _model_info(lm: CausalLM | None, path: str | None):
    if lm is None:
        return None
    return {"path": path, "class": type(lm.model).__name__, "vocab_size": lm.vocab_size,
            "parameters": sum(p.numel() for p in lm.model.parameters()), "max_positions": lm.max_positions}


def _read_as(columns: Columns, detected: bool, join: str | None) -> str:
    """The column mapping and join rule, as the summary and sidecar state them."""
    mapping = (f"format {columns.format}" if columns.format else "the default mapping")
    if detected:
        mapping += " (detected from the first row's columns)" if columns.format else \
            " (the first row's columns match no format)"
    elif not columns.format:
        mapping = "the column options"
    how = ("the prompt as the user's message and each answer as the assistant's, rendered with the chat template"
           if join == "chat" else "text prompts and answers concatenated as given" if join is None else
           f"{join!r} between a text prompt and each answer")
    if columns.join == "chat" and join != "chat":
        how += " (join chat: the tokenizer has no chat template)"
    return f"{mapping}; {how}"


def _sidecar(opts, tokenizer, policy_lm, ref_lm, dtype, device, max_length, world, detected: bool) -> Sidecar:
    """Everything about the run but its summary, which merge() adds from the parts."""
    import numpy
    import pyarrow
    import transformers
    join = effective_join(opts.columns.join, tokenizer)
    return Sidecar(
        prefrank_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=sys.argv,
        model=_model_info(policy_lm, opts.model),
        ref_model=_model_info(ref_lm, opts.ref_model),
        tokenizer={"path": opts.tokenizer or opts.model, "class": type(tokenizer).__name__,
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        method=opts.method,
        tokenization=opts.tokenization,
        join=join,
        read_as=_read_as(opts.columns, detected, join),
        max_length=max_length,
        options=asdict(opts),
        input={"source": opts.data, "split": opts.split, "subset": opts.subset, "hash": input_hash(opts.data)},
        # the tokenizer's files are the policy's unless --tokenizer names others
        files={name: fingerprint(getattr(opts, name)) for name in ("model", "ref_model", "tokenizer")
               if getattr(opts, name)},
        table=_layout(opts, ref_lm is not None),
        # the analysis repeats it
        alpha_source=None if opts.columns.completions is not None else alpha_source(asdict(opts.columns)),
        world_size=world,
        versions={"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "numpy": numpy.__version__,
                  "pyarrow": pyarrow.__version__})
