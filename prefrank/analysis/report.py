"""A Markdown report with PNG plots (matplotlib, Agg) from score tables:

  accuracy.png      observed ranking accuracy (raw, length-normalized) with 95% CIs, beside the
                    idealized range over the β sweep (Fig. 1 / Table 1 style)
  loss_vs_c.png     per-pair DPO loss vs difficulty c, coloured by correctness, with the
                    Theorem 4.1 boundary -log σ(βc) (Fig. 3 style)
  groups.png        the four reference × policy correctness groups over checkpoints: share, mean
                    loss, mean margin (Fig. 2 style; with --checkpoints)
  displacement.png  Δ log π of the rejected vs the chosen completion, policy against reference:
                    likelihood displacement (Razin et al. 2025), four quadrants
  difficulty.png    histogram of c
"""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefrank.analysis import kwise, metrics
from prefrank.analysis.summary import (
    NO_DISAGREEMENT,
    AnalysisOptions,
    load_pairs,
    pair_measures,
    ranked_pairs,
    summarize,
)
from prefrank.errors import InputError
from prefrank.table import TableLayout


def checkpoint_series(paths: list[str], ref_scores: str | None, beta: float,
                      tie_band: float | None = None) -> list[dict]:
    """Per checkpoint score table: ranking accuracy, DPO loss, likelihood displacement and the four
    groups (over the pairs summarize() measures)."""
    series = []
    for path in paths:
        p = ranked_pairs(load_pairs(path, ref_scores), tie_band)
        if not p.has_ref:
            raise InputError(f"{path}: the groups need reference log-probs (a reference score table, or ref_ columns)")
        series.append(_checkpoint(path, pair_measures(p, beta, tie_band)))
    return series


def _checkpoint(path: str, m) -> dict:
    return {"checkpoint": path, "ranking_accuracy": float(m.correct.mean()),
            "dpo_loss_mean": float(m.theorem["loss"].mean()), "displacement": m.displacement, "groups": m.groups}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(summary: dict, path: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    kinds = [("raw", "ranking_accuracy"), ("length_normalized", "ranking_accuracy_length_normalized")]
    for x, (kind, key) in enumerate(kinds):
        acc = summary[key]
        lo, hi = acc["ci95"]
        ax.bar(x - 0.2, acc["value"], width=0.4, color="tab:blue", label="observed" if x == 0 else None)
        ax.errorbar(x - 0.2, acc["value"], yerr=[[acc["value"] - lo], [hi - acc["value"]]], color="k", capsize=4)
        if "idealized" in summary:
            ideal = summary["idealized"][kind]
            ax.bar(x + 0.2, ideal["median"], width=0.4, color="tab:orange",
                   label="idealized (median, min-max over β)" if x == 0 else None)
            ax.errorbar(x + 0.2, ideal["median"], yerr=[[ideal["median"] - ideal["min"]], [ideal["max"] - ideal["median"]]],
                        color="k", capsize=4)
    if "reference_ranking_accuracy" in summary:
        ax.axhline(summary["reference_ranking_accuracy"]["value"], color="gray", ls="--", label="reference model (raw)")
    ax.set_xticks(range(len(kinds)), ["raw", "length-normalized"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("ranking accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCATTER_POINTS = 20_000  # a scatter of more points draws no more legibly, and takes memory by the point


def _drawn(n: int):
    """The points of n that a scatter plot draws: all of them, or a fixed sample of SCATTER_POINTS (the
    same on every run), and the note its title then carries."""
    if n <= SCATTER_POINTS:
        return slice(None), ""
    sample = np.sort(np.random.default_rng(0).choice(n, SCATTER_POINTS, replace=False))
    return sample, f"{SCATTER_POINTS:,} of {n:,} pairs drawn, a fixed random sample"


def plot_loss_vs_c(theorem: dict, beta: float, path: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    c, loss, correct = theorem["c"], theorem["loss"], theorem["correct"]
    drawn, note = _drawn(len(c))
    dc, dloss, dcorrect = c[drawn], loss[drawn], correct[drawn]
    ax.scatter(dc[dcorrect], dloss[dcorrect], s=6, alpha=0.5, color="tab:green", label="ranked correctly")
    ax.scatter(dc[~dcorrect], dloss[~dcorrect], s=6, alpha=0.5, color="tab:red", label="ranked incorrectly")
    if note:
        ax.set_title(note, fontsize=8)
    grid = np.linspace(c.min(), c.max(), 400) if len(c) else np.zeros(0)
    ax.plot(grid, -metrics.log_sigmoid(beta * grid), color="k", lw=1, label=r"$-\log\sigma(\beta c)$ (Thm 4.1)")
    ax.set_xlabel(r"difficulty $c = \log\pi_{ref}(y_l|x) - \log\pi_{ref}(y_w|x)$")
    ax.set_ylabel(f"DPO loss (β = {beta:g})")
    ax.set_yscale("log")
    shown = loss[loss > 0]  # the curve spans far more decades than the points: frame the points
    if len(shown):
        ax.set_ylim(shown.min() / 3, shown.max() * 3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_groups(series: list[dict], path: Path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    x = np.arange(len(series))
    for g, name in enumerate(metrics.GROUPS):
        rows = [s["groups"][g] for s in series]
        for ax, key in zip(axes, ("share", "mean_loss", "mean_margin")):
            ax.plot(x, [np.nan if r[key] is None else r[key] for r in rows], marker="o", label=name)
    for ax, title in zip(axes, ("share of pairs", "mean DPO loss", "mean reward margin")):
        ax.set_title(title)
        ax.set_xticks(x, [Path(s["checkpoint"]).stem for s in series], rotation=30, fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_displacement(moved: dict, correct: np.ndarray, path: Path, ches: np.ndarray | None = None):
    """Δ log π of the rejected vs the chosen completion, policy against reference (the four
    quadrants: which of the two gained or lost likelihood), and with CHES, CHES vs Δ_w."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if ches is not None else 1, figsize=(11 if ches is not None else 6, 4.5),
                             squeeze=False)
    ax = axes[0, 0]
    d_w, d_l = moved["delta_w"], moved["delta_l"]
    drawn, note = _drawn(len(d_w))
    dw, dl, dcorrect = d_w[drawn], d_l[drawn], correct[drawn]
    ax.scatter(dw[dcorrect], dl[dcorrect], s=6, alpha=0.5, color="tab:green", label="ranked correctly")
    ax.scatter(dw[~dcorrect], dl[~dcorrect], s=6, alpha=0.5, color="tab:red", label="ranked incorrectly")
    ax.axvline(0, color="k", lw=0.8)
    ax.axhline(0, color="k", lw=0.8)
    if len(d_w):
        lo, hi = min(d_w.min(), d_l.min()), max(d_w.max(), d_l.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="Δ_l = Δ_w")
    # gained: Δ > 0, lost: Δ < 0 (as metrics.displacement counts them); a pair with a Δ of exactly 0
    # is in no quadrant, and counted apart
    quadrants = [((d_w > 0) & (d_l > 0), 0.97, 0.97, "both gained"), ((d_w < 0) & (d_l > 0), 0.03, 0.97,
                 "chosen lost, rejected gained"), ((d_w < 0) & (d_l < 0), 0.03, 0.03, "both lost"),
                 ((d_w > 0) & (d_l < 0), 0.97, 0.03, "chosen gained, rejected lost")]
    unchanged = (d_w == 0) | (d_l == 0)
    titles = ([f"{100 * unchanged.mean():.0f}% of the pairs in no quadrant: a Δ of exactly 0"] if unchanged.any()
              else []) + ([note] if note else [])
    if titles:
        ax.set_title("\n".join(titles), fontsize=9)
    for mask, x, y, text in quadrants:
        ax.text(x, y, f"{text}: {100 * mask.mean():.0f}%" if len(mask) else text, transform=ax.transAxes,
                ha="right" if x > 0.5 else "left", va="top" if y > 0.5 else "bottom", fontsize=7)
    ax.set_xlabel(r"$\Delta_w = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)$")
    ax.set_ylabel(r"$\Delta_l = \log\pi_\theta(y_l|x) - \log\pi_{ref}(y_l|x)$")
    ax.legend(fontsize=7, loc="center right")
    if ches is not None:
        ax = axes[0, 1]
        ax.scatter(ches[drawn], d_w[drawn], s=6, alpha=0.5, color="tab:blue")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("CHES (reference model's hidden states)")
        ax.set_ylabel(r"$\Delta_w$")
        rho = metrics.spearman(ches, d_w)
        ax.set_title(f"Spearman ρ = {'–' if rho is None else f'{rho:+.2f}'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_difficulty(c: np.ndarray, path: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(c, bins=50, color="tab:purple")
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("difficulty c (> 0: the reference prefers the rejected completion)")
    ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _headline(s: dict) -> list[str]:
    lines = ["| measure | value |", "|---|---|", f"| pairs scored (errors) | {s['n_pairs']} ({s['n_errors']}) |"]
    if "alpha_source" in s:
        lines.append(f"| α (the preference strength the idealized accuracy uses) | {s['alpha_source']} |")
    if s["n_ties"]:
        lines.append(f"| pairs the raters tied (α = 0.5) | {s['n_ties']}, " + (
            "counted with the tie band |" if s["options"]["tie_band"] is not None else
            f"left out: every measure below is over the other {s['n_ranked']} |"))
    if s["n_reoriented"]:
        lines.append(f"| pairs reoriented to the raters' choice when scored (their input's rejected column is "
                     f"chosen here) | {s['n_reoriented']} |")
    if s["n_chosen_rejected_by_raters"]:
        lines.append(f"| **pairs whose chosen completion most raters reject (α < 0.5): read in column order "
                     f"(keep_column_order), they count as labelled** | {s['n_chosen_rejected_by_raters']} |")
    for label, key in (("ranking accuracy R", "ranking_accuracy"),
                       ("length-normalized R~", "ranking_accuracy_length_normalized"),
                       ("reference model's R", "reference_ranking_accuracy"), ("reward accuracy", "reward_accuracy")):
        if key in s:
            lo, hi = s[key]["ci95"]
            lines.append(f"| {label} | {_pct(s[key]['value'])} (95% CI {_pct(lo)}–{_pct(hi)}) |")
    for kind in ("raw", "length_normalized"):
        if "idealized" in s:
            i, gap = s["idealized"][kind], s["alignment_gap"][kind]
            lines.append(f"| idealized R* ({kind}; min / median / max over β) | "
                         f"{_pct(i['min'])} / {_pct(i['median'])} / {_pct(i['max'])} |")
            trivial = " (trivial: see below)" if s["alpha_without_disagreement"] else ""
            lines.append(f"| alignment gap ({kind}){trivial} | {_pct(gap['min'])} / {_pct(gap['median'])} / "
                         f"{_pct(gap['max'])} |")
    if s.get("alpha_without_disagreement"):
        lines.append(f"| **idealized R* and the alignment gap are not measured here** | {NO_DISAGREEMENT} |")
    if "dpo_loss_mean" in s:
        lines.append(f"| mean DPO loss (β = {s['options']['beta']:g}) | {s['dpo_loss_mean']:.4f} |")
        lines.append(f"| Theorem 4.1 violations | {s['theorem41_violations']} |")
    return lines


def scored_examples(table: str, data: str, columns=None) -> list:
    """The Examples of the input `data` that `table` was scored from, for quoting pairs: read as the
    table's sidecar says (column mapping, format, grouping, split, limit), or with `columns`
    (a prefrank.data.Columns) in place of the sidecar's mapping. Without `columns`, an unreadable
    sidecar is an error: the rows could be read otherwise than they were scored."""
    from dataclasses import fields

    from prefrank.data import Columns, read_examples
    from prefrank.table import read_sidecar, sidecar_path
    try:
        scored = read_sidecar(table).options
    except (OSError, ValueError, KeyError, TypeError) as e:
        if columns is None:
            raise InputError(f"cannot read {sidecar_path(table)} ({type(e).__name__}), which says how --data was "
                             f"read when {table} was scored: give the column options it was scored with") from None
        scored = {}
    if columns is None:
        known = {f.name for f in fields(Columns)}
        columns = Columns(**{k: v for k, v in scored["columns"].items() if k in known})
    read = {k: scored.get(k, default) for k, default in (("split", "train"), ("subset", None), ("limit", None))}
    return list(read_examples(data, columns, **read))


def write_report(scores: str, out_dir: str, opts: AnalysisOptions | None = None, *, ref_scores: str | None = None,
                 checkpoints: list[str] | None = None, examples: list | None = None) -> dict:
    """Write report.md, summary.json and the plots into `out_dir`; returns the summary.
    `examples`: the input rows (prefrank.data.Example, in input order) to quote the hardest and
    easiest pairs' text. A K-wise table is reported with its K-wise metrics, then as the pair
    analysis of all the pairs it implies (their table is written as implied_pairs.parquet)."""
    opts = opts or AnalysisOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# prefrank report: {scores}", ""]
    kwise_summary = None
    if TableLayout.of_table(scores).kwise:
        if checkpoints or ref_scores:
            raise InputError("checkpoints and reference score tables must be pair tables; convert K-wise tables with "
                             "`prefrank pairs`")
        kwise_summary = kwise.summarize_kwise(scores, opts)
        lines += _kwise_headline(kwise_summary) + ["", "## All implied pairs", ""]
        implied = out / "implied_pairs.parquet"
        pq.write_table(pa.table(kwise.kwise_to_pair_table(scores)), implied)
        scores, examples = str(implied), None
    all_pairs = load_pairs(scores, ref_scores)
    summary = summarize(all_pairs, opts)
    beta, tie_band = opts.beta, opts.tie_band
    pairs = ranked_pairs(all_pairs, tie_band)  # the pairs the summary measured
    del all_pairs  # the plots and sections below read the ranked pairs alone
    plot_accuracy(summary, out / "accuracy.png")
    lines += _headline(summary) + ["", "![accuracy](accuracy.png)", ""]
    if pairs.has_ref and len(pairs.ids):
        m = pair_measures(pairs, beta, tie_band)
        # the scored table itself is its one checkpoint: measured above, not read again
        series = checkpoint_series(checkpoints, ref_scores, beta, tie_band) if checkpoints else [_checkpoint(scores, m)]
        summary["series"] = series
        plot_loss_vs_c(m.theorem, beta, out / "loss_vs_c.png")
        if len(series) > 1:  # one table: the groups table below says it all
            plot_groups(series, out / "groups.png")
        plot_difficulty(m.theorem["c"], out / "difficulty.png")
        lines += ["## Reference vs policy: the four groups", "", "| group | pairs | share | mean loss | mean margin |",
                  "|---|---|---|---|---|"]
        for g in summary["groups"]:
            fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {g['group']} | {g['count']} | {_pct(g['share'])} | {fmt(g['mean_loss'])} | "
                         f"{fmt(g['mean_margin'])} |")
        lines += ["", "![groups over checkpoints](groups.png)" if len(series) > 1 else "", "",
                  "## Theorem 4.1: loss vs difficulty", "",
                  "A pair is ranked correctly exactly when its DPO loss is below the curve -log σ(βc).",
                  "", "![loss vs c](loss_vs_c.png)", "", "![difficulty](difficulty.png)", ""]
        plot_displacement(m.moved, m.correct, out / "displacement.png",
                          None if pairs.ref_ches is None else pairs.ref_ches[:, 0])
        lines += _displacement_section(summary)
        truncated = _truncated_rows(scores) if examples is not None else set()
        lines += _difficulty_section(summary["difficulty"], examples, truncated)
    if kwise_summary is not None:
        summary = {**kwise_summary, "implied_pairs": summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def _kwise_headline(k: dict) -> list[str]:
    lines = ["| K-wise measure | value |", "|---|---|",
             f"| prompts scored (errors; all scores tied) | {k['n_prompts']} ({k['n_errors']}; {k['n_all_tied']}) |",
             f"| completions per prompt | {', '.join(f'K={n}: {c}' for n, c in k['completions_per_prompt'].items())} |"]
    for label, key in (("exact-order accuracy", "exact_order_accuracy"), ("pairwise accuracy", "pairwise_accuracy"),
                       ("Kendall τ-b (mean over prompts)", "kendall_tau_b")):
        for suffix, note in (("", ""), ("_length_normalized", ", length-normalized")):
            m = k[key + suffix]
            lo, hi = m["ci95"]
            fmt = (lambda v: "–" if v is None else f"{v:+.3f}") if key == "kendall_tau_b" else _pct
            lines.append(f"| {label}{note} | {fmt(m['value'])} (95% CI {fmt(lo)}–{fmt(hi)}) |")
    return lines


def _displacement_section(s: dict) -> list[str]:
    d = s["displacement"]
    fmt = lambda v: "–" if v is None else f"{v:+.2f}"  # noqa: E731
    lines = ["## Likelihood displacement", "",
             f"Preference optimization can lower the likelihood of the chosen completion too (Razin et al., ICLR "
             f"2025). Here the policy gives the chosen completion less likelihood than the reference did on "
             f"{_pct(d['share_chosen_displaced'])} of the pairs, both completions lose likelihood on "
             f"{_pct(d['share_both_decreased'])}, and {_pct(d['share_ranked_right_by_rejected_falling'])} are "
             f"ranked right only because the rejected completion fell further than the chosen one (Δ_l < Δ_w < 0).",
             "", "| | chosen (Δ_w) | rejected (Δ_l) |", "|---|---|---|",
             f"| mean Δ log π, policy − reference | {fmt(d['mean_delta_chosen'])} | {fmt(d['mean_delta_rejected'])} |",
             f"| median | {fmt(d['median_delta_chosen'])} | {fmt(d['median_delta_rejected'])} |", "",
             "| group | pairs | chosen displaced (Δ_w < 0) | mean Δ_w | mean Δ_l |", "|---|---|---|---|---|"]
    for g in s["groups"]:
        lines.append(f"| {g['group']} | {g['count']} | {_pct(g['share_chosen_displaced'])} | "
                     f"{fmt(g['mean_delta_chosen'])} | {fmt(g['mean_delta_rejected'])} |")
    if "spearman_ref_ches_vs_delta_chosen" in d:
        rho, rho_normalized = (fmt(d[f"spearman_ref_ches{kind}_vs_delta_chosen"]) for kind in ("", "_normalized"))
        lines += ["", f"CHES under the reference (⟨Σh(y_w), Σh(y_l)⟩ − ‖Σh(y_w)‖²: high when the two completions' "
                  f"hidden states are alike) against the chosen completion's change Δ_w: Spearman ρ = {rho} "
                  f"({rho_normalized} length-normalized); a negative ρ is the paper's finding: the higher the CHES, "
                  f"the more the chosen completion is displaced."]
    return lines + ["", "![likelihood displacement](displacement.png)", ""]


def _truncated_rows(scores: str) -> set[int]:
    """The rows of a score table that were cut to fit (--truncate keep-end): their quotes say so."""
    if "truncated" not in pq.read_schema(scores).names:
        return set()
    flags = pq.read_table(scores, columns=["truncated"]).column(0).to_pylist()
    return {row for row, cut in enumerate(flags) if cut}


def _quote(value) -> str:
    """A prompt or completion as one line: text, or messages as "role: content" joined by " / "."""
    if isinstance(value, list):
        value = " / ".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value).replace("\n", " ")


def _difficulty_section(d: dict, examples, truncated: set[int]) -> list[str]:
    rho = lambda key: "–" if d.get(key) is None else f"{d[key]:+.3f}"  # noqa: E731
    lines = ["## Difficulty", "", f"Pairs the reference ranks wrongly (c > 0): {_pct(d['share_c_positive'])}. "
             f"Spearman correlation of c with the chosen length {rho('spearman_c_vs_n_chosen')}, the rejected "
             f"length {rho('spearman_c_vs_n_rejected')}, their difference {rho('spearman_c_vs_length_difference')}"
             + (f", annotator agreement α {rho('spearman_c_vs_alpha')}." if "spearman_c_vs_alpha" in d else "."), ""]
    for title, key in (("Hardest pairs (largest c)", "hardest"), ("Easiest pairs (smallest c)", "easiest")):
        lines += [f"### {title}", ""]
        for pair in d[key]:
            cut = " (truncated to fit: scored on part of the text quoted)" if pair["row"] in truncated else ""
            lines.append(f"- id `{pair['id']}`, c = {pair['c']:.2f}{cut}")
            if examples is not None:
                ex = examples[pair["row"]]
                for label, value in (("prompt", ex.prompt), ("chosen", ex.completions[0]),
                                     ("rejected", ex.completions[1])):
                    text = _quote(value)
                    lines.append(f"  - {label}: {text[:200]}{'…' if len(text) > 200 else ''}")
        lines.append("")
    return lines
