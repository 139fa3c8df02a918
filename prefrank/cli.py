"""Command line: `prefrank score | analyze | report ...` (see `prefrank COMMAND --help`)."""
import argparse
import os
import signal
import sys
import threading

from prefrank import options
from prefrank.data import DETECTION_KEEPS, Columns
from prefrank.errors import InputError, Stopped

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


def columns_from_args(args) -> Columns:
    """The column mapping the command line gives: a named --format with the column options on top;
    else the column options; else, with none given, the format the first row's columns match."""
    from prefrank.data import preset_columns
    given = options.given(Columns, args)
    name = given.pop("format", "auto")
    if name != "auto":
        return preset_columns(name, **given)
    mapping = {k: v for k, v in given.items() if k not in DETECTION_KEEPS}
    return Columns(**given, format=None if mapping else "auto")


def add_score_parser(sub):
    from prefrank.pipeline import ScoreOptions
    p = sub.add_parser("score", help="score chosen/rejected log-probs of a preference dataset",
                       description=SCORE_HELP, epilog=_formats_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {"data and models": p.add_argument_group("data and models")}
    options.add_options(p, ScoreOptions, groups=groups, required=False)  # no --data: the built-in task
    groups["data and models"].add_argument("--seed", type=int, default=0,
                                           help="seed of the built-in task and model (default: %(default)s)")
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from prefrank.pipeline import ScoreOptions, score_dataset
    data, model = getattr(args, "data", None), getattr(args, "model", None)
    if data and not model:
        raise InputError("<data> needs <model> (the built-in model only knows the built-in task)")
    if not data:
        from prefrank.demo.default import ensure_default
        default_data, default_model = ensure_default(seed=args.seed, log=lambda m: print(m, file=sys.stderr))
        data, model = default_data, model or default_model
    opts = options.from_args(ScoreOptions, args, data=data, model=model, columns=columns_from_args(args))
    existed = os.path.exists(opts.out)
    try:
        summary = score_dataset(opts)
    except KeyboardInterrupt:
        from prefrank.io import Parts
        args.parts_left = Parts(opts.out).dir.exists()  # what the interruption's message says
        raise
    if summary is not None:  # rank 0 (or a single process)
        print(summary.line(opts.out) + (f"\n({opts.out} existed: it was replaced)" if existed else ""), file=sys.stderr)
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


def add_analysis_args(p):
    from prefrank.analysis import AnalysisOptions
    p.add_argument("table", metavar="scores", help="score table (Parquet) of the policy")
    p.add_argument("--ref-scores", help="score table of the reference model, row for row (default: the ref_ columns)")
    options.add_options(p, AnalysisOptions)
    p.add_argument("--checkpoints", nargs="+", help="score tables of successive checkpoints (same reference) for "
                   "the groups over time")


def _analysis_options(args):
    from prefrank.analysis import AnalysisOptions
    return options.from_args(AnalysisOptions, args)


def _warn_orientation(summary: dict):
    if summary.get("n_chosen_rejected_by_raters"):
        print(f"prefrank: WARNING: on {summary['n_chosen_rejected_by_raters']} pairs the raters preferred the "
              f"rejected completion (alpha < 0.5: scored with --keep-column-order, or by a prefrank that did not "
              f"orient pairs); every measure counts them in column order", file=sys.stderr)


def _warn_alpha(summary: dict):
    from prefrank.analysis.summary import NO_DISAGREEMENT
    if summary.get("alpha_without_disagreement"):
        print(f"prefrank: WARNING: {NO_DISAGREEMENT}", file=sys.stderr)


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
    opts = _analysis_options(args)
    summary = kwise.summarize_kwise(args.table, opts)
    summary["implied_pairs"] = summarize(load_pairs(kwise.kwise_to_pair_table(args.table)), opts)
    return summary


def run_analyze(args) -> int:
    from prefrank.analysis import checkpoint_series, load_pairs, per_pair_table, summarize
    from prefrank.io import check_apart, check_writable
    from prefrank.table import TableLayout
    inputs = {"scores": args.table, "--ref-scores": args.ref_scores,
              **{f"--checkpoints {p}": p for p in args.checkpoints or []}}
    for path, flag in ((args.out, "--out"), (args.pairs_out, "--pairs-out")):
        if path is not None:  # before the analysis runs: the summary must not overwrite a table it reads
            check_apart(path, inputs, f"{flag} {path}")
            check_writable(path, flag)
    if args.out and args.pairs_out and os.path.realpath(args.out) == os.path.realpath(args.pairs_out):
        raise InputError(f"--out and --pairs-out both name {args.out}: the summary would replace the pair table")
    if TableLayout.of_table(args.table).kwise:
        return _print_summary(_analyze_kwise(args), args, "exact_order_accuracy", "prompts")
    opts = _analysis_options(args)
    # the table's pairs are kept only for --pairs-out: else summarize() holds the sole reference and frees
    # the whole table's arrays once it has their ranked subset
    pairs = load_pairs(args.table, args.ref_scores) if args.pairs_out else None
    summary = summarize(pairs if pairs is not None else load_pairs(args.table, args.ref_scores), opts)
    if args.checkpoints:
        summary["series"] = checkpoint_series(args.checkpoints, args.ref_scores, opts.beta, opts.tie_band)
    if args.pairs_out:
        if not pairs.has_ref:
            raise InputError("--pairs-out needs reference log-probs (--ref-scores, or a table scored with --ref-model)")
        import pyarrow as pa
        import pyarrow.parquet as pq
        columns = {k: v for k, v in per_pair_table(pairs, opts.beta).items() if v is not None}
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
    _warn_alpha(summary)
    if summary.get("alpha_source"):
        print(f"prefrank: alpha: {summary['alpha_source']}", file=sys.stderr)
    acc = summary[headline]["value"]
    counts = [f"{summary['n_errors']} errors"] + [f"{summary[key]} {what}" for key, what in (
        ("n_ties", "tied, left out of the rankings"), ("n_reoriented", "reoriented to the raters' choice"))
        if summary.get(key)]
    print(f"{summary['n_' + unit]} {unit} ({'; '.join(counts)}): {headline.replace('_', ' ')} "
          f"{'–' if acc is None else f'{100 * acc:.1f}%'}" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _quotable(args) -> bool:
    """Whether the report can quote pairs from --data: it quotes the hardest and easiest by the
    reference's difficulty, so a pair table with reference log-probs."""
    from prefrank.table import TableLayout
    layout = TableLayout.of_table(args.table)
    return not layout.kwise and (bool(args.ref_scores) or layout.with_ref)


def run_report(args) -> int:
    from prefrank.analysis import write_report
    quotable = bool(args.data) and _quotable(args)
    if args.data and not quotable:
        print("prefrank: WARNING: --data is read to quote the hardest and easiest pairs by the reference's "
              "difficulty; this table has no reference log-probs (or is K-wise), so --data is not used",
              file=sys.stderr)
    from prefrank.analysis.report import scored_examples
    given = columns_from_args(args) if options.given(Columns, args) else None
    examples = scored_examples(args.table, args.data, given) if quotable else None
    summary = write_report(args.table, args.out, _analysis_options(args), ref_scores=args.ref_scores,
                           checkpoints=args.checkpoints, examples=examples)
    _warn_theorem(summary)
    _warn_orientation(summary)
    _warn_alpha(summary)
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
                   "table's sidecar records it was scored (column mapping, format, grouping, limit), or with the "
                   "column options given here (needed when the sidecar is gone)")
    options.add_options(p, Columns)
    p.set_defaults(func=run_report)


PAIRS_HELP = """\
Expand K completions per prompt into the pairs they imply, as common recipes do: all strictly
ranked pairs, the best vs the worst, or the best vs a random strictly worse one (ties in human
scores imply nothing). INPUT is either a K-wise score table (Parquet with a logps column): the
output is a pair score table for `prefrank analyze`; or a K-wise dataset (with --completions-col):
the output is a JSONL pair dataset (id, prompt, chosen, rejected) for scoring or DPO training.
"""


def run_pairs(args) -> int:
    from prefrank.analysis import kwise
    from prefrank.table import TableLayout
    if args.input.endswith(".parquet") and TableLayout.of_table(args.input).kwise:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = kwise.kwise_to_pair_table(args.input, args.pairing, args.seed)
        pq.write_table(pa.table(table), args.out)
        print(f"{len(table['id'])} pair rows -> {args.out}", file=sys.stderr)
        return 0
    n = kwise.kwise_dataset_to_pairs(args.input, columns_from_args(args), args.out, args.pairing, args.seed)
    print(f"{n['written']} pairs -> {args.out}; {n['skipped']} bad rows skipped, {n['all_tied']} rows with all scores "
          f"tied" + (f"\nfirst error: {n['first_error']}" if n["first_error"] else ""), file=sys.stderr)
    return 0


def add_pairs_parser(sub):
    from prefrank.analysis.kwise import PAIRINGS
    p = sub.add_parser("pairs", help="expand K-wise score tables or datasets into their implied pairs",
                       description=PAIRS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="K-wise score table (.parquet) or K-wise dataset")
    p.add_argument("--out", required=True, help="pair score table (.parquet) or pair dataset (.jsonl)")
    p.add_argument("--pairing", choices=PAIRINGS, default="all", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="for best-random (default: %(default)s)")
    options.add_options(p, Columns)
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
    from dataclasses import fields

    from prefrank.dpo.trainer import TrainOptions
    dpo_only = [f.name for f in fields(TrainOptions) if f.metadata.get("group") == "DPO"]
    for name, help_text, description in (("train", "DPO training that tracks ranking accuracy", TRAIN_HELP),
                                         ("sft", "fine-tune on chosen completions (a reference model)", SFT_HELP)):
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        options.add_options(p, TrainOptions, skip=dpo_only if name == "sft" else ())
        p.set_defaults(func=run_train, mode="dpo" if name == "train" else "sft")


def run_train(args) -> int:
    from prefrank.dpo.trainer import TrainOptions, train
    opts = options.from_args(TrainOptions, args, mode=args.mode, columns=columns_from_args(args))
    train(opts, log=lambda m: print(m, file=sys.stderr))
    print(f"{opts.mode} -> {opts.out}/final (metrics: {opts.out}/metrics.jsonl)", file=sys.stderr)
    return 0


def add_demo_parser(sub):
    from prefrank.demo import run
    p = sub.add_parser("demo", help="the paper's findings in a minute on a CPU, on the built-in task",
                       description=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_options(p, run.DemoOptions)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from prefrank.demo.run import DemoOptions
    from prefrank.demo.run import run_demo as demo
    demo(options.from_args(DemoOptions, args), log=lambda m: print(m, file=sys.stderr))
    return 0


def add_merge_parser(sub):
    p = sub.add_parser("merge", help="assemble a score table from the parts an interrupted or distributed run left",
                       description="Write OUT from OUT.parts/ (in input order, with its sidecar), e.g. after a "
                       "torchrun job whose rank 0 stopped before assembling it. Every part must be present: "
                       "otherwise rerun `prefrank score ... --resume`.")
    p.add_argument("out", help="the --out of the scoring run")
    p.set_defaults(func=run_merge)


def option_flags() -> dict[str, str]:
    """{option name: flag} of every command's options (for error messages)."""
    from prefrank.analysis import AnalysisOptions
    from prefrank.dpo.trainer import TrainOptions
    from prefrank.pipeline import ScoreOptions
    return options.flags(ScoreOptions, TrainOptions, AnalysisOptions)


# each command's parser, by the commands it adds: a command line naming one builds only its parser, so
# analyze, report and pairs never import torch and models (a few hundred MB) for options they do not take
PARSERS = ((("score",), add_score_parser), (("analyze", "report"), add_analysis_parsers),
           (("pairs",), add_pairs_parser), (("merge",), add_merge_parser), (("train", "sft"), add_train_parsers),
           (("demo",), add_demo_parser))
MODEL_COMMANDS = ("score", "train", "sft", "demo")  # the commands that load models through transformers


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The command line's parser: every command's, or only the one `argv` names (its first word)."""
    parser = argparse.ArgumentParser(prog="prefrank", description="Exact, fast scoring of preference data and "
                                     "ranking analysis for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    named = [add for names, add in PARSERS if argv and argv[0] in names]
    for add in named or [add for _, add in PARSERS]:
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, batch schedulers, some shells' Ctrl-C): the run stops as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def _catch_sigterm() -> bool:
    """Make SIGTERM stop a single process as Ctrl-C does (its output's lock released, its parts kept
    for --resume). Not under torchrun: its agent stops the other ranks with SIGTERM when one fails,
    and a rank waiting in a collective would only see the exception once that wait ends (the next
    run takes over the lock such a rank leaves)."""
    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def main(argv=None) -> int:
    args = build_parser(argv).parse_args(argv)
    if args.command in MODEL_COMMANDS:
        import transformers
        transformers.logging.set_verbosity_error()  # prefrank reports its own progress and problems
        transformers.logging.disable_progress_bar()
    previous = signal.getsignal(signal.SIGTERM)
    caught = _catch_sigterm()
    try:
        return args.func(args)
    except Stopped:  # another rank's error, which rank 0 reports for the torchrun job
        return 2
    except InputError as e:  # the user's mistake: one line, the options named by their flags
        print(f"prefrank {args.command}: error: {e.text(option_flags())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        resume = ""
        if args.command == "score":
            resume = (" (the parts written so far are kept: rerun the same command with --resume to continue)"
                      if getattr(args, "parts_left", False) else " before any part was written: nothing to resume")
        terminated = isinstance(e, Terminated)
        print(f"prefrank: {'terminated (SIGTERM)' if terminated else 'interrupted'}{resume}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if caught:
            signal.signal(signal.SIGTERM, previous)
        if "prefrank.runtime" in sys.modules:  # a torchrun job's process group, if this command made one
            sys.modules["prefrank.runtime"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
