"""`prefrank demo`: the paper's findings on a laptop, with prefrank's own scorer, trainer and
analysis doing the work, on the built-in addition task whose true preference shares are known.

  1. the reference model: the tiny built-in model, SFT on chosen answers (trained on first use)
  2. DPO from it with `prefrank train` on fresh pairs; at every evaluation the log records
     ranking accuracy, DPO loss, the four flip groups, ‖θ − θref‖², and the win rate against the
     reference, judged exactly: both models answer held-out problems greedily and the answer
     closer to the true sum wins (ties count half)
  3. the validation pairs scored under the final policy and the reference (`prefrank score`)
  4. the report: observed vs idealized ranking accuracy (the alignment gap), loss vs difficulty
     with the Theorem 4.1 curve, the flip groups over training, and ranking accuracy vs win rate
     as the policy moves away from the reference, with a plain-language summary
"""
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from prefrank.demo.task import COLUMNS, make_pairs, quality
from prefrank.options import option, options, positive_int


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def greedy_answers(model, tokenizer, problems) -> list[int | None]:
    """Each problem's answer by greedy decoding (None when the output is not a number)."""
    from prefrank.demo.task import prompt_text
    prompts = [prompt_text(a, b) for a, b in problems]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    if len({len(i) for i in ids}) != 1:
        raise ValueError("the task's prompts all have the same length")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids, device=model.device), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long,
                                                                        device=model.device))
    return [answer_value(tokenizer.decode(row, skip_special_tokens=True)) for row in out[:, len(ids[0]):].tolist()]


def answer_value(text: str) -> int | None:
    """The number a greedy answer starts with, whatever whitespace comes before it (the task's
    answers are " 12", but a policy that drops the space, whose DPO gradient cancels between chosen
    and rejected, still answers 12); None when it is no number."""
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


def ground_truth_judge(reference_model, tokenizer, problems):
    """judge(model, tokenizer) -> the model's win rate against the reference on `problems`."""
    reference = greedy_answers(reference_model, tokenizer, problems)

    def score(answer, a, b):
        return -np.inf if answer is None else quality(answer, a, b)

    def judge(model, _tokenizer):
        policy = greedy_answers(model, tokenizer, problems)
        wins = [1.0 if score(p, a, b) > score(r, a, b) else 0.5 if score(p, a, b) == score(r, a, b) else 0.0
                for p, r, (a, b) in zip(policy, reference, problems)]
        return float(np.mean(wins))

    return judge


def plot_trajectory(lines: list[dict], path: Path):
    """Ranking accuracy and win rate over training, against the distance from the reference."""
    from prefrank.analysis.report import pyplot
    plt = pyplot()
    steps = [line["step"] for line in lines]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(steps, [line["val"]["ranking_accuracy"] for line in lines], marker="o", label="ranking accuracy (val)")
    left.plot(steps, [line["train"]["ranking_accuracy"] for line in lines], marker=".", label="ranking accuracy (train)")
    left.plot(steps, [line["judge"] for line in lines], marker="s", label="win rate vs reference")
    left.set_xlabel("DPO step")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    distance = [line["param_sq_distance"] for line in lines]
    right.plot(distance, [line["val"]["ranking_accuracy"] for line in lines], marker="o", label="ranking accuracy (val)")
    right.plot(distance, [line["judge"] for line in lines], marker="s", label="win rate vs reference")
    right.set_xlabel(r"$\|\theta - \theta_{ref}\|^2$")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_text(s: dict, lines: list[dict], beta: float) -> str:
    first, last = lines[0], lines[-1]
    gap = s["alignment_gap"]["raw"]
    ideal = s["idealized"]["raw"]
    groups = {g["group"]: g for g in s["groups"]}
    wrong = groups["ref incorrect, now correct"]["count"] + groups["ref incorrect, now incorrect"]["count"]
    flipped = groups["ref incorrect, now correct"]["count"]
    return (
        f"After DPO (β = {beta:g}), the policy ranks {100 * s['ranking_accuracy']['value']:.1f}% of the "
        f"{s['n_ranked']} validation pairs' chosen answers above the rejected ones ({s['n_ties']} pairs whose "
        f"raters are indifferent, α = 0.5, are left out); the reference ranked "
        f"{100 * s['reference_ranking_accuracy']['value']:.1f}%. A policy that optimized the DPO objective perfectly "
        f"would rank {100 * ideal['median']:.1f}% (idealized accuracy, median over β; {100 * ideal['min']:.1f}–"
        f"{100 * ideal['max']:.1f}%): an alignment gap of {100 * gap['median']:.1f} points. Of the {wrong} pairs the "
        f"reference ranked wrongly, DPO flipped {flipped} ({100 * flipped / max(wrong, 1):.0f}%): Theorem 4.1 says a "
        f"pair is ranked right only once its loss falls below -log σ(βc), which for hard pairs (large c) is a very "
        f"small loss ({s['theorem41_violations']} violations of the theorem among {s['n_ranked']} pairs). Meanwhile "
        f"the win rate against the reference went from {first['judge']:.2f} to {last['judge']:.2f} (between "
        f"{min(line['judge'] for line in lines):.2f} and {max(line['judge'] for line in lines):.2f} along the way) "
        f"as the policy moved ‖θ − θref‖² = {last['param_sq_distance']:.3g} away from the reference.")


@options
class DemoOptions:
    """The demo's options (`prefrank demo`'s flags are generated from them)."""
    out: str = option("prefrank-demo", "output folder", path=True)
    seed: int = option(0, "the task's pairs, the training order and the reference model's training")
    steps: int = option(300, "DPO steps", type=positive_int)
    eval_every: int = option(30, "DPO steps between evaluations (ranking accuracy, flips, win rate)",
                             type=positive_int)
    train_pairs: int = option(2048, "DPO training pairs", type=positive_int)
    val_pairs: int = option(512, "held-out pairs scored and analyzed", type=positive_int)
    batch_size: int = option(32, "pairs per DPO step", cli=False)
    lr: float = option(3e-4, "DPO learning rate", cli=False)
    beta: float = option(0.1, "DPO β, and the β of the analysis", cli=False)


def run_demo(opts: DemoOptions, *, log=print) -> dict:
    from prefrank.analysis import AnalysisOptions, write_report
    from prefrank.analysis.report import plot_groups
    from prefrank.demo.default import ensure_default
    from prefrank.dpo.trainer import TrainOptions, train
    from prefrank.models import load_model, load_tokenizer
    from prefrank.pipeline import ScoreOptions, score_dataset
    start = time.perf_counter()
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    _, reference_path = ensure_default(seed=opts.seed, log=log)
    train_rows = make_pairs(opts.train_pairs, seed=10_000 + opts.seed)
    val_rows = make_pairs(opts.val_pairs, seed=20_000 + opts.seed)
    _write_jsonl(folder / "train.jsonl", train_rows)
    _write_jsonl(folder / "val.jsonl", val_rows)
    tokenizer = load_tokenizer(reference_path)
    reference = load_model(reference_path, dtype=torch.float32, device=torch.device("cpu"))
    judge = ground_truth_judge(reference, tokenizer, [(r["a"], r["b"]) for r in val_rows[:256]])

    log("prefrank demo: DPO from the reference (SFT on chosen)")
    run = folder / "dpo"
    scores = folder / "val_scores.parquet"
    for stale in (run, scores.with_name(scores.name + ".parts")):  # an earlier, possibly interrupted, demo
        shutil.rmtree(stale, ignore_errors=True)
    train(TrainOptions(model=reference_path, data=str(folder / "train.jsonl"), val_data=str(folder / "val.jsonl"),
                       out=str(run), beta=opts.beta, lr=opts.lr, batch_size=opts.batch_size, max_steps=opts.steps,
                       epochs=100, eval_every=opts.eval_every, eval_pairs=256, seed=opts.seed, device="cpu",
                       columns=COLUMNS), log=log,
          judge=judge)
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]

    log("prefrank demo: scoring the validation pairs under the final policy and the reference")
    score_dataset(ScoreOptions(data=str(folder / "val.jsonl"), model=str(run / "final"), ref_model=reference_path,
                               out=str(scores), columns=COLUMNS, device="cpu", ches=True), progress=False)
    summary = write_report(str(scores), str(folder / "report"), AnalysisOptions(beta=opts.beta))
    series = [{"checkpoint": f"step {line['step']}", "groups": line["val"]["groups"]} for line in lines]
    plot_groups(series, folder / "report" / "groups.png")
    plot_trajectory(lines, folder / "report" / "trajectory.png")
    text = summary_text(summary, lines, opts.beta)
    seconds = time.perf_counter() - start
    report = (folder / "report" / "report.md").read_text()
    (folder / "report" / "report.md").write_text(
        "# prefrank demo: preference learning does not learn preference rankings\n\n" + text
        + f"\n\n(built-in addition task, {opts.train_pairs} training and {opts.val_pairs} validation pairs with "
        f"known preference shares, {opts.steps} DPO steps, seed {opts.seed}; {seconds:.0f} s)\n\n"
        "![win rate and ranking accuracy](trajectory.png)\n\n" + report.split("\n", 2)[2])
    result = {"summary": summary, "trajectory": lines, "text": text, "seconds": seconds}
    (folder / "report" / "demo.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    log(text)
    log(f"prefrank demo: report in {folder / 'report' / 'report.md'} ({seconds:.0f} s)")
    return result
