"""Command line: `prefrank score | analyze | report ...` (see `prefrank COMMAND --help`)."""
import argparse
import sys

from prefrank.data import COLUMN_FLAGS, Columns, InputError
from prefrank.scoring import METHODS
from prefrank.tokenization import TOKENIZATION_MODES, TRUNCATION_POLICIES

SCORE_HELP = """\
Score a preference dataset: for every row, Σ log π(y|x) and the token count of the chosen and the
rejected completion given the prompt, under --model (and --ref-model). One output row per input
row (per pair with --group-by), in input order; rows that cannot be scored are kept with
status=error and a reason.

With neither --data nor --model, scores the embedded default: a built-in addition task with known
preference shares, and a tiny model trained on it on first use (CPU, ~15 s, cached). --model
alone scores that model on the built-in task.

Input formats: JSON, JSONL, CSV, TSV (each optionally .gz), Parquet, or a Hugging Face dataset
(hub name or local folder). Rows: prompt/chosen/rejected strings; chosen/rejected full
transcripts (prompt = shared prefix up to the last "\\n\\nAssistant:"); chat message lists
(rendered with the tokenizer's chat template, or --chat-template); or any schema through
--prompt-cols/--chosen-col/--rejected-col. With votes (--vote-cols, an alpha or votes column) the
chosen completion is always the raters' choice: a pair whose raters preferred the rejected column
is swapped and marked reoriented (--keep-column-order keeps the columns as given).
"""


def _formats_help() -> str:
    import textwrap

    from prefrank.formats import PRESETS
    lines = textwrap.wrap("formats (--format NAME; by default the one the first row's columns match, when no column "
                          "option is given; README.md lists the columns each reads):", 100)
    for name, p in PRESETS.items():
        how = "" if p.detect else " (the default mapping)" if not p.columns else " (only with --format)"
        lines += textwrap.wrap(f"{name}: {p.source}{how}: {p.note}", 100, initial_indent="  ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _column_list(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    if not cols:
        raise argparse.ArgumentTypeError("expected one or more comma-separated column names")
    return cols


# Column options that map the input's fields (Columns field per option); any of them given turns
# off the detection of a preset (--format auto), and they override a named preset's fields.
def add_column_args(cols):
    from prefrank.data import SCORES_ORDERS, VOTE_CODING_HELP, VOTE_CODINGS
    from prefrank.formats import PRESETS
    cols.add_argument("--format", choices=["auto", *PRESETS], default="auto", metavar="NAME",
                      help="a published dataset's column mapping (listed in `prefrank score --help`); auto: the one "
                      "the first row's columns match, else the default mapping, when no other column option is "
                      "given (column options override a named format's) (default: %(default)s)")
    cols.add_argument("--prompt-cols", type=_column_list, help="prompt column(s), joined by blank lines when several "
                      "(default: 'prompt' if present, else the implicit HH format)")
    cols.add_argument("--chosen-col", help="the chosen completion, or with votes the first candidate (default: chosen)")
    cols.add_argument("--rejected-col", help="the rejected completion, or with votes the second candidate "
                      "(default: rejected)")
    cols.add_argument("--id-col", help="row id column, which must exist (default: 'id' when present, else the row's "
                      "index)")
    cols.add_argument("--vote-cols", type=_column_list, help="vote columns, one vote each in --vote-coding (a label "
                      "column naming the better candidate is one vote column; PandaLM: "
                      "annotator1,annotator2,annotator3); alpha = the share of votes for the chosen column, ties "
                      "half. Without it, an 'alpha' column, or a 'votes' list of 1/0/0.5, is used when present")
    cols.add_argument("--vote-coding", choices=list(VOTE_CODINGS), help="what a vote says: " + "; ".join(
                      f"{name}: {text}" for name, text in VOTE_CODING_HELP.items()) + " (default: 1/2)")
    cols.add_argument("--group-by", type=_column_list, help="rows that agree on these columns are votes on one pair "
                      "(one output row per pair, in the order of each pair's first row; 'a+b' is the unordered pair "
                      "of columns a and b, so a pair shown in either order is one pair); their prompt and "
                      "candidates must agree (swapped candidates flip a row's votes), else the pair is an error")
    cols.add_argument("--turn-col", help="conversational rows: each conversation is cut after the answer to the "
                      "user message this column numbers (MT-Bench, Chatbot Arena: turn)")
    cols.add_argument("--keep-column-order", action="store_true",
                      help="keep --chosen-col as chosen even where the votes prefer --rejected-col (the analysis "
                      "then warns with the count); by default such pairs are swapped and marked reoriented")
    cols.add_argument("--completions-include-prompt", action="store_true", default=None,
                      help="chosen/rejected start with the prompt: strip it (rows where they don't are errors)")
    cols.add_argument("--completions-col", help="K completions per prompt: the column with the list of completions "
                      "(a dotted name reads a field of each listed object, e.g. completions.response for "
                      "UltraFeedback); the table then holds lists (logps, n_tokens, human_scores)")
    cols.add_argument("--scores-col", help="with --completions-col: human scores, one per completion "
                      "(UltraFeedback: completions.overall_score; default: scores)")
    cols.add_argument("--scores-order", choices=SCORES_ORDERS, help="higher-better, or lower-better for ranks "
                      "(Nectar: answers.rank; stored negated in human_scores) (default: higher-better)")


def _given_columns(args) -> dict:
    """The column mapping options given on the command line (COLUMN_FLAGS), by Columns field."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in COLUMN_FLAGS.items()
              if name not in ("keep_column_order", "format")}
    return {name: value for name, value in values.items() if value is not None}


def add_tokenization_args(tok):
    tok.add_argument("--tokenization", choices=TOKENIZATION_MODES, default="joint",
                     help="joint: the ids of each prompt + completion as one text, the prompt being the ids the "
                          "prompt alone shares with every one of them (the scored ids are the data's own text); "
                          "trl: TRL 1.16's DPOTrainer ids (joint, with the EOS text appended to text completions "
                          "and TRL's prompt extraction for full transcripts); separate: prompt and completions "
                          "tokenized apart (earlier prefrank tables; SentencePiece tokenizers then start every "
                          "completion with a spurious '▁') (default: %(default)s)")
    tok.add_argument("--append-eos", action="store_true", help="score an EOS token after each completion "
                     "(joint, separate; trl appends the EOS text itself)")
    tok.add_argument("--max-length", type=_positive_int,
                     help="longest prompt + completion in tokens, at least 2 (default: the model's maximum positions)")
    tok.add_argument("--truncate", choices=TRUNCATION_POLICIES, default="none",
                     help="over-length rows: 'none' makes them errors; 'keep-end' cuts the prompt from the left "
                          "(keeping BOS), then the completions from the right, and marks them truncated "
                          "(default: %(default)s)")


def tokenization_from_args(args) -> dict:
    """The tokenization options (add_tokenization_args) as ScoreOptions / TrainOptions fields."""
    if args.append_eos and args.tokenization == "trl":
        raise InputError("--append-eos with --tokenization trl: that mode appends the EOS text itself")
    if args.max_length is not None and args.max_length < 2:
        raise InputError(f"--max-length {args.max_length}: a scored sequence needs at least a prompt token and a "
                         f"completion token (2)")
    return dict(tokenization=args.tokenization, append_eos=args.append_eos, max_length=args.max_length,
                truncate=args.truncate)


def columns_from_args(args) -> Columns:
    from prefrank.data import preset_columns
    given = _given_columns(args)
    if args.format != "auto":
        return preset_columns(args.format, **given, keep_column_order=args.keep_column_order)
    return Columns(**given, keep_column_order=args.keep_column_order, format=None if given else "auto")


def add_score_parser(sub):
    p = sub.add_parser("score", help="score chosen/rejected log-probs of a preference dataset",
                       description=SCORE_HELP, epilog=_formats_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and models")
    io.add_argument("--data", help="input file or Hugging Face dataset (default: the built-in task)")
    io.add_argument("--model", help="policy model: local folder or hub id (default: the built-in tiny model)")
    io.add_argument("--ref-model", help="reference model, scored on the same token ids (optional)")
    io.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the policy model's)")
    io.add_argument("--chat-template", help="a Jinja chat template file for conversational rows, replacing the "
                    "tokenizer's own (needed when it has none)")
    io.add_argument("--out", default="scores.parquet", help="output Parquet file, not an input or inside one; a "
                    "sidecar OUT.meta.json records models, options, versions and the input's hash; OUT.lock keeps a "
                    "second run off it while one writes it (default: %(default)s)")
    io.add_argument("--split", default="train", help="dataset split for Hugging Face datasets (default: %(default)s)")
    io.add_argument("--subset", help="dataset configuration name for Hugging Face datasets")
    io.add_argument("--limit", type=_positive_int, help="score only the first N rows")

    add_column_args(p.add_argument_group("columns"))

    add_tokenization_args(p.add_argument_group("tokenization"))

    run = p.add_argument_group("execution")
    run.add_argument("--method", choices=METHODS, default="auto",
                     help="packed: each prompt and its completions in one row under a block mask (the prompt "
                          "computed once, one forward per batch); kv: the prompt's forward once, its KV cache "
                          "reused by every completion (any model with a cache); both take log-probs from hidden "
                          "states without full logits; naive: the plain full-logits oracle; auto: the first of "
                          "packed, kv, naive that is exact for the model (packed needs sdpa or eager attention "
                          "and, under a sliding window, sequences that fit it; kv needs no sliding window), "
                          "and kv over packed where packed's block mask would add over 20%% of the matmul work "
                          "in attention (tiny hidden sizes, very long rows) (default: %(default)s)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="model dtype; log-probs accumulate in fp32 regardless (default: auto = bf16 on CUDA, "
                          "else fp32)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the models' transformer blocks (one graph shared by all layers, dynamic "
                          "shapes): fuses the norms, rotary embeddings and activations that eager runs as separate "
                          "kernels (packed scoring on an H100: 14%% faster at 8B, 17-28%% at 1B); the first batches "
                          "wait for the compile (seconds to a minute), so it pays on long runs, mostly on GPUs; the "
                          "packed and naive methods only")
    run.add_argument("--max-tokens-per-batch", type=_positive_int, default=8192,
                     help="padded tokens per forward call (default: %(default)s)")
    run.add_argument("--chunk-rows", type=_positive_int, default=2048,
                     help="rows read, length-sorted and written together (default: %(default)s)")
    run.add_argument("--per-token", action="store_true", help="also write per-token log-prob lists")
    run.add_argument("--strict", action="store_true", help="stop at the first bad row instead of recording it")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run: the parts in OUT.parts/ "
                     "whose checksums verify are kept, the others scored (the run's input, options and model and "
                     "tokenizer files must match)")
    run.add_argument("--seed", type=int, default=0, help="seed of the built-in task and model (default: %(default)s)")
    safety = p.add_argument_group("safety")
    safety.add_argument("--trust-remote-code", action="store_true",
                        help="allow models/tokenizers that run their own Python code (off by default)")
    safety.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled (non-safetensors) weights, which can execute code when loaded")
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from prefrank.pipeline import ScoreOptions, score_dataset
    data, model = args.data, args.model
    if data and not model:
        raise InputError("--data needs --model (the built-in model only knows the built-in task)")
    if not data:
        from prefrank.demo.default import ensure_default
        default_data, default_model = ensure_default(seed=args.seed, log=lambda m: print(m, file=sys.stderr))
        data, model = default_data, model or default_model
    columns = columns_from_args(args)
    opts = ScoreOptions(
        data=data, model=model, out=args.out, ref_model=args.ref_model, tokenizer=args.tokenizer,
        chat_template=args.chat_template, method=args.method,
        dtype=args.dtype, device=args.device, max_tokens_per_batch=args.max_tokens_per_batch,
        chunk_rows=args.chunk_rows, limit=args.limit, split=args.split, subset=args.subset, columns=columns,
        **tokenization_from_args(args), per_token=args.per_token, strict=args.strict, resume=args.resume,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, compile=args.compile)
    summary = score_dataset(opts)
    if summary is not None:  # rank 0 (or a single process)
        print(summary.line(args.out), file=sys.stderr)
        if summary.rows and not summary.ok:
            raise InputError(f"none of the {summary.rows} rows could be scored (the table is written); the first: "
                             f"{summary.first_error}")
    return 0


def run_merge(args) -> int:
    from prefrank.pipeline import merge_parts
    print(merge_parts(args.out).line(args.out), file=sys.stderr)
    return 0


ANALYZE_HELP = """\
The measurements of Chen et al. 2024 on a score table (from `prefrank score`):
  ranking accuracy R (log π(chosen) >= log π(rejected); ties correct) and its length-normalized
  form, with bootstrap 95% CIs; with reference log-probs (ref_ columns, or --ref-scores): the
  reference's R, per-pair DPO loss and reward margin, the Theorem 4.1 check on every pair (a pair is
  ranked right iff its loss <= -log σ(βc), c = log πref(rejected) - log πref(chosen)), difficulty
  correlates and the four reference × policy groups; with alpha too: idealized accuracy R* over the
  β sweep (min / median / max) and the alignment gap R* - R.
"""


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("expected one or more positive numbers")
    return values


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_analysis_args(p):
    from prefrank.analysis.metrics import DEFAULT_BETAS, DEFAULT_EPSILON
    p.add_argument("scores", help="score table (Parquet) of the policy")
    p.add_argument("--ref-scores", help="score table of the reference model, row for row (default: the ref_ columns)")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="β of the DPO loss and Theorem 4.1 "
                   "(default: %(default)s)")
    p.add_argument("--betas", type=_float_list, default=list(DEFAULT_BETAS),
                   help="β sweep of the idealized accuracy (default: %s)" % ",".join(f"{b:g}" for b in DEFAULT_BETAS))
    p.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="alpha is clipped to [ε, 1-ε] "
                   "(default: %(default)s)")
    p.add_argument("--gamma", type=float, default=1.0, help="DPO^γ: γ scales the reference log-ratio; reported "
                   "as dpo_gamma_loss_mean when not 1 (default: %(default)s)")
    p.add_argument("--tie-band", type=float, help="pairs with alpha = 0.5 count as correct when |Δ log π| <= band")
    p.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--checkpoints", nargs="+", help="score tables of successive checkpoints (same reference) for "
                   "the groups over time")


def _analysis_options(args) -> dict:
    return dict(beta=args.beta, betas=args.betas, epsilon=args.epsilon, gamma=args.gamma, tie_band=args.tie_band,
                n_boot=args.bootstrap, seed=args.seed)


def _warn_orientation(summary: dict):
    if summary.get("n_chosen_rejected_by_raters"):
        print(f"prefrank: WARNING: on {summary['n_chosen_rejected_by_raters']} pairs the raters preferred the "
              f"rejected completion (alpha < 0.5: scored with --keep-column-order, or by a prefrank that did not "
              f"orient pairs); every measure counts them in column order", file=sys.stderr)


def _warn_theorem(summary: dict):
    if summary.get("theorem41_violations"):
        print(f"prefrank: WARNING: Theorem 4.1 fails on {summary['theorem41_violations']} pairs "
              f"(ids {summary['theorem41_violating_ids']}): the log-probs are inconsistent or there is a bug",
              file=sys.stderr)


def _analyze_kwise(args) -> dict:
    from prefrank.analysis import kwise, load_pairs, summarize
    if args.ref_scores or args.checkpoints or args.pairs_out:
        raise InputError("--ref-scores, --checkpoints and --pairs-out take pair tables; convert K-wise tables with "
                         "`prefrank pairs`")
    summary = kwise.summarize_kwise(args.scores, n_boot=args.bootstrap, seed=args.seed)
    summary["implied_pairs"] = summarize(load_pairs(kwise.kwise_to_pair_table(args.scores)), **_analysis_options(args))
    return summary


def run_analyze(args) -> int:
    from prefrank.analysis import checkpoint_series, kwise, load_pairs, per_pair_table, summarize
    if kwise.is_kwise_table(args.scores):
        return _print_summary(_analyze_kwise(args), args, "exact_order_accuracy", "prompts")
    pairs = load_pairs(args.scores, args.ref_scores)
    summary = summarize(pairs, **_analysis_options(args))
    if args.checkpoints:
        summary["series"] = checkpoint_series(args.checkpoints, args.ref_scores, args.beta, args.tie_band)
    if args.pairs_out:
        if not pairs.has_ref:
            raise InputError("--pairs-out needs reference log-probs (--ref-scores, or a table scored with --ref-model)")
        import pyarrow as pa
        import pyarrow.parquet as pq
        columns = {k: v for k, v in per_pair_table(pairs, args.beta).items() if v is not None}
        pq.write_table(pa.table(columns), args.pairs_out)
    return _print_summary(summary, args, "ranking_accuracy", "pairs")


def _print_summary(summary: dict, args, headline: str, unit: str) -> int:
    import json
    text = json.dumps(summary, indent=2, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    _warn_theorem(summary.get("implied_pairs", summary))
    _warn_orientation(summary)
    acc = summary[headline]["value"]
    counts = [f"{summary['n_errors']} errors"] + [f"{summary[key]} {what}" for key, what in (
        ("n_ties", "tied, left out of the rankings"), ("n_reoriented", "reoriented to the raters' choice"))
        if summary.get(key)]
    print(f"{summary['n_' + unit]} {unit} ({'; '.join(counts)}): {headline.replace('_', ' ')} "
          f"{'–' if acc is None else f'{100 * acc:.1f}%'}" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _report_examples(args) -> list | None:
    """The scored input's Examples for quoting pairs, read as the table's sidecar says it was scored
    (mapping, format, grouping, split, limit), unless column options are given here."""
    if not args.data:
        return None
    from dataclasses import fields

    from prefrank.data import read_examples
    from prefrank.io import read_sidecar
    read = dict(split="train", subset=None, limit=None)
    columns = columns_from_args(args)
    try:
        options = read_sidecar(args.scores)["options"]
    except (OSError, ValueError, KeyError):
        options = None  # a table from elsewhere: the column options (or their defaults) apply
    if options is not None:
        read = {k: options.get(k, v) for k, v in read.items()}
        if not _given_columns(args) and args.format == "auto" and not args.keep_column_order:
            known = {f.name for f in fields(Columns)}
            columns = Columns(**{k: v for k, v in options["columns"].items() if k in known})
    return list(read_examples(args.data, columns, **read))


def run_report(args) -> int:
    from prefrank.analysis import write_report
    examples = _report_examples(args)
    summary = write_report(args.scores, args.out, ref_scores=args.ref_scores, checkpoints=args.checkpoints,
                           examples=examples, **_analysis_options(args))
    _warn_theorem(summary)
    _warn_orientation(summary)
    print(f"report -> {args.out}/report.md", file=sys.stderr)
    return 0


def add_analysis_parsers(sub):
    p = sub.add_parser("analyze", help="ranking accuracy, idealized accuracy, alignment gap, Theorem 4.1 -> JSON",
                       description=ANALYZE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analysis_args(p)
    p.add_argument("--out", help="summary JSON file (default: stdout)")
    p.add_argument("--pairs-out", help="Parquet file with one row per pair: id, difficulty c, DPO loss, its "
                   "Theorem 4.1 bound, reward margin, policy/reference correctness, alpha")
    p.set_defaults(func=run_analyze)
    p = sub.add_parser("report", help="the analysis as Markdown with plots",
                       description=ANALYZE_HELP + "\nWrites report.md, summary.json and PNG plots into --out.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analysis_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", help="the scored input, to quote the hardest and easiest pairs; read as the score "
                   "table's sidecar records it was scored (column mapping, format, grouping, limit) unless column "
                   "options are given")
    add_column_args(p.add_argument_group("columns of --data"))
    p.set_defaults(func=run_report)


PAIRS_HELP = """\
Expand K completions per prompt into the pairs they imply, as common recipes do: all strictly
ranked pairs, the best vs the worst, or the best vs a random strictly worse one (ties in human
scores imply nothing). INPUT is either a K-wise score table (Parquet with a logps column): the
output is a pair score table for `prefrank analyze`; or a K-wise dataset (with --completions-col):
the output is a JSONL pair dataset (id, prompt, chosen, rejected) for scoring or DPO training.
"""


def run_pairs(args) -> int:
    import json

    import numpy as np
    from prefrank.analysis import kwise
    if args.input.endswith(".parquet") and kwise.is_kwise_table(args.input):
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = kwise.kwise_to_pair_table(args.input, args.pairing, args.seed)
        pq.write_table(pa.table(table), args.out)
        print(f"{len(table['id'])} pair rows -> {args.out}", file=sys.stderr)
        return 0
    from prefrank.data import open_examples
    columns, examples = open_examples(args.input, columns_from_args(args))
    if columns.completions is None:
        raise InputError("a dataset needs --completions-col (and --scores-col), or a K-wise --format, to be read as "
                         "K-wise")
    rng = np.random.default_rng(args.seed)
    written = skipped = no_pairs = 0
    first_error = None
    with open(args.out, "w") as f:
        for ex in examples:
            if ex.error:
                skipped += 1
                first_error = first_error or f"row {ex.index} (id {ex.id}): {ex.error}"
                continue
            pairs = kwise.implied_pairs(ex.scores, args.pairing, rng)
            no_pairs += not pairs
            for i, j in pairs:
                f.write(json.dumps({"id": f"{ex.id}:{i}>{j}", "prompt": ex.prompt, "chosen": ex.completions[i],
                                    "rejected": ex.completions[j]}) + "\n")
                written += 1
    print(f"{written} pairs -> {args.out}; {skipped} bad rows skipped, {no_pairs} rows with all scores tied"
          + (f"\nfirst error: {first_error}" if first_error else ""), file=sys.stderr)
    return 0


def add_pairs_parser(sub):
    from prefrank.analysis.kwise import PAIRINGS
    p = sub.add_parser("pairs", help="expand K-wise score tables or datasets into their implied pairs",
                       description=PAIRS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="K-wise score table (.parquet) or K-wise dataset")
    p.add_argument("--out", required=True, help="pair score table (.parquet) or pair dataset (.jsonl)")
    p.add_argument("--pairing", choices=PAIRINGS, default="all", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="for best-random (default: %(default)s)")
    add_column_args(p.add_argument_group("columns of a K-wise dataset"))
    p.set_defaults(func=run_pairs)


TRAIN_HELP = """\
DPO training that watches rankings: each pair's prompt runs once per step and both completions
continue from its KV cache (gradients flow through the shared prompt); the fused DPO loss never
builds the full logits; the reference log-probs are computed once with the scorer and cached.
At step 0 and every --eval-every steps, OUT/metrics.jsonl gets one line: ranking accuracy, DPO
loss, reward accuracy and the four reference x policy groups on a fixed training subsample and
on the validation pairs, and ||theta - theta_ref||^2. OUT/checkpoint (safetensors) is replaced
at each evaluation; --resume continues from it exactly. The final model goes to OUT/final.
"""

SFT_HELP = """\
Supervised fine-tuning on the chosen completions (loss on their tokens only), which is how the
paper makes a reference model. Same data options, loop, metrics and checkpoints as `train`.
"""


def add_train_parsers(sub):
    from prefrank.dpo.loss import LOSS_TYPES
    from prefrank.dpo.trainer import OPTIMIZERS
    for name, help_text, description in (("train", "DPO training that tracks ranking accuracy", TRAIN_HELP),
                                         ("sft", "fine-tune on chosen completions (a reference model)", SFT_HELP)):
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--model", required=True, help="initial policy: local folder or hub id")
        p.add_argument("--data", required=True, help="training pairs (any format `score` reads)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--val-data", help="validation pairs (default: --val-fraction of --data)")
        p.add_argument("--val-fraction", type=float, default=0.1, help="(default: %(default)s)")
        if name == "train":
            p.add_argument("--ref-model", help="reference model (default: the initial policy, frozen)")
            p.add_argument("--beta", type=_positive_float, default=0.1, help="(default: %(default)s)")
            p.add_argument("--loss-type", choices=LOSS_TYPES, default="sigmoid", help="(default: %(default)s)")
            p.add_argument("--label-smoothing", type=float, default=0.0, help="(default: %(default)s)")
            p.add_argument("--gamma", type=float, default=1.0, help="DPO^gamma's reference scale (default: %(default)s)")
        p.add_argument("--lr", type=_positive_float, default=5e-6 if name == "train" else 1e-5,
                       help="(default: %(default)s)")
        p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default: %(default)s)")
        p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="(default: %(default)s)")
        p.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
        p.add_argument("--epochs", type=_positive_int, default=1, help="(default: %(default)s)")
        p.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
        p.add_argument("--batch-size", type=_positive_int, default=8, help="pairs per micro-batch (default: %(default)s)")
        p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step (default: %(default)s)")
        p.add_argument("--eval-every", type=_positive_int, default=50, help="(default: %(default)s)")
        p.add_argument("--eval-pairs", type=_positive_int, default=256,
                       help="size of the fixed training subsample evaluated (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
        p.add_argument("--judge-model", help="reward model (sequence classification, one output): at each evaluation "
                       "the policy and the reference sample a completion per prompt and the win rate is logged")
        p.add_argument("--judge-prompts", type=_positive_int, default=64, help="(default: %(default)s)")
        p.add_argument("--judge-max-new-tokens", type=_positive_int, default=64, help="(default: %(default)s)")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--allow-pickle", action="store_true")
        add_column_args(p.add_argument_group("columns"))
        add_tokenization_args(p.add_argument_group("tokenization"))
        p.set_defaults(func=run_train, mode="dpo" if name == "train" else "sft")


def run_train(args) -> int:
    from prefrank.dpo.trainer import TrainOptions, train
    dpo = dict(ref_model=args.ref_model, beta=args.beta, loss_type=args.loss_type,
               label_smoothing=args.label_smoothing, gamma=args.gamma) if args.mode == "dpo" else {}
    opts = TrainOptions(model=args.model, data=args.data, out=args.out, mode=args.mode, val_data=args.val_data,
                        val_fraction=args.val_fraction, lr=args.lr, warmup_steps=args.warmup_steps,
                        optimizer=args.optimizer,
                        weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, eval_every=args.eval_every,
                        eval_pairs=args.eval_pairs, seed=args.seed, **tokenization_from_args(args),
                        columns=columns_from_args(args), device=args.device, resume=args.resume,
                        judge_model=args.judge_model, judge_prompts=args.judge_prompts,
                        judge_max_new_tokens=args.judge_max_new_tokens,
                        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, **dpo)
    train(opts, log=lambda m: print(m, file=sys.stderr))
    print(f"{args.mode} -> {args.out}/final (metrics: {args.out}/metrics.jsonl)", file=sys.stderr)
    return 0


def add_demo_parser(sub):
    from prefrank.demo import run
    p = sub.add_parser("demo", help="the paper's findings in a minute on a CPU, on the built-in task",
                       description=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="prefrank-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=300, help="DPO steps (default: %(default)s)")
    p.add_argument("--eval-every", type=_positive_int, default=30, help="(default: %(default)s)")
    p.add_argument("--train-pairs", type=_positive_int, default=2048, help="(default: %(default)s)")
    p.add_argument("--val-pairs", type=_positive_int, default=512, help="(default: %(default)s)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from prefrank.demo.run import run_demo as demo
    demo(args.out, seed=args.seed, steps=args.steps, eval_every=args.eval_every, train_pairs=args.train_pairs,
         val_pairs=args.val_pairs, log=lambda m: print(m, file=sys.stderr))
    return 0


def add_merge_parser(sub):
    p = sub.add_parser("merge", help="assemble a score table from the parts an interrupted or distributed run left",
                       description="Write OUT from OUT.parts/ (in input order, with its sidecar), e.g. after a "
                       "torchrun job whose rank 0 stopped before assembling it. Every part must be present: "
                       "otherwise rerun `prefrank score ... --resume`.")
    p.add_argument("out", help="the --out of the scoring run")
    p.set_defaults(func=run_merge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefrank", description="Exact, fast scoring of preference data and "
                                     "ranking analysis for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_score_parser(sub)
    add_analysis_parsers(sub)
    add_pairs_parser(sub)
    add_merge_parser(sub)
    add_train_parsers(sub)
    add_demo_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()  # prefrank reports its own progress and problems
    transformers.logging.disable_progress_bar()
    try:
        return args.func(args)
    except (InputError, ValueError) as e:
        print(f"prefrank {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefrank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
