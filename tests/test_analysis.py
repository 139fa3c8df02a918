"""The analysis against oracles that do not use it: an explicitly built optimal policy,
hand-computed cases, float64 formulas written out here, simulated coverage."""
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PANDALM, STORIES, needs_shared
from prefrank.analysis import (
    AnalysisOptions,
    bootstrap_ci,
    flip_groups,
    idealized_correct,
    idealized_sweep,
    load_pairs,
    ranking_correct,
    sigmoid_dpo_loss,
    spearman,
    summarize,
    theorem41,
)
from prefrank.cli import main

# ---------------------------------------------------------------- idealized ranking accuracy

@pytest.mark.parametrize("seed", range(20))
def test_idealized_accuracy_equals_the_explicit_optimal_policy(seed):
    """Build π* ∝ πref · exp(r / β) over a small enumerated completion space, rank each pair by it,
    and compare with the closed form of Corollary 3.3 (α = σ(r_w - r_l), the Bradley-Terry share)."""
    rng = np.random.default_rng(seed)
    beta = float(rng.choice([0.01, 0.1, 1.0, 5.0]))
    ref_w, ref_l, alpha, brute = [], [], [], []
    for _ in range(30):  # prompts
        k = rng.integers(2, 6)
        logits = rng.normal(0, 3, size=k)
        pi_ref = np.exp(logits) / np.exp(logits).sum()
        reward = rng.normal(0, 2, size=k)
        pi_star = pi_ref * np.exp(reward / beta)
        pi_star /= pi_star.sum()
        w, l = rng.choice(k, size=2, replace=False)
        ref_w.append(math.log(pi_ref[w]))
        ref_l.append(math.log(pi_ref[l]))
        alpha.append(1 / (1 + math.exp(-(reward[w] - reward[l]))))
        brute.append(pi_star[w] > pi_star[l])
    got = idealized_correct(ref_w, ref_l, alpha, beta, epsilon=0.0)
    assert got.tolist() == brute


def test_idealized_edge_cases_by_hand():
    # alpha = 0.5: the idealized policy keeps the reference's order (strictly)
    assert idealized_correct([-1.0, -2.0, -1.0], [-2.0, -1.0, -1.0], [0.5] * 3, beta=0.1).tolist() == [True, False, False]
    # alpha = 1 and 0, clipped to 1 - ε and ε: log-odds ±log(999) ≈ ±6.9; divided by β = 1
    assert idealized_correct([-10.0], [-4.0], [1.0], beta=1.0).tolist() == [True]  # -6 + 6.9 > 0
    assert idealized_correct([-10.0], [-2.0], [1.0], beta=1.0).tolist() == [False]  # -8 + 6.9 < 0
    assert idealized_correct([-2.0], [-10.0], [0.0], beta=1.0).tolist() == [True]  # 8 - 6.9 > 0
    assert idealized_correct([-4.0], [-10.0], [0.0], beta=1.0).tolist() == [False]  # 6 - 6.9 < 0
    sweep = idealized_sweep([-10.0, -1.0], [-4.0, -2.0], [1.0, 0.6], betas=[0.1, 1.0, 10.0])
    # β = 10: log(1.5)/10 + 1 > 0 and -6 + 0.69 < 0 → 1/2; β = 0.1, 1: both correct
    assert sweep["per_beta"] == {0.1: 1.0, 1.0: 1.0, 10.0: 0.5}
    assert (sweep["min"], sweep["median"], sweep["max"]) == (0.5, 1.0, 1.0)


def test_ranking_ties_and_tie_band():
    assert ranking_correct([-1.0, -2.0, -3.0], [-1.0, -1.0, -4.0]).tolist() == [True, False, True]
    got = ranking_correct([-1.0, -1.0, -1.0], [-1.05, -1.5, -0.5], alpha=[0.5, 0.5, 1.0], tie_band=0.1)
    assert got.tolist() == [True, False, False]  # tied raters: within the band; alpha 1: the usual rule


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_rejected(bad):
    with pytest.raises(ValueError, match="non-finite"):
        ranking_correct([0.0, bad], [0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        idealized_correct([0.0], [0.0], [bad], beta=1.0)
    with pytest.raises(ValueError, match="alpha must lie"):
        idealized_correct([0.0], [0.0], [1.5], beta=1.0)


# ---------------------------------------------------------------- DPO loss and Theorem 4.1

def test_dpo_loss_by_hand():
    # margin = β((pw - pl) - γ(rw - rl)) = 0.5 * ((-1 + 3) - 2 * (-2 + 2.5)) = 0.5
    assert sigmoid_dpo_loss([-1.0], [-3.0], [-2.0], [-2.5], beta=0.5, gamma=2.0)[0] == pytest.approx(math.log1p(math.exp(-0.5)))
    assert sigmoid_dpo_loss([-1e4], [0.0], [0.0], [0.0], beta=1.0)[0] == pytest.approx(1e4)  # stable for huge margins


@pytest.mark.parametrize("seed", range(10))
def test_theorem41_holds_on_random_log_probs(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    beta = float(10 ** rng.uniform(-2, 1))
    ref_w, ref_l = rng.normal(-50, 20, n), rng.normal(-50, 20, n)
    pol_w, pol_l = ref_w + rng.normal(0, 5, n), ref_l + rng.normal(0, 5, n)
    t = theorem41(pol_w, pol_l, ref_w, ref_l, beta)
    assert len(t["violations"]) == 0
    # the same statement written out independently
    loss = np.log1p(np.exp(-beta * ((pol_w - ref_w) - (pol_l - ref_l))))
    bound = np.log1p(np.exp(-beta * (ref_l - ref_w)))
    clear = np.abs(loss - bound) > 1e-9 * (1 + bound)
    assert ((loss <= bound) == (pol_w >= pol_l))[clear].all()
    assert np.allclose(t["loss"], loss, rtol=1e-12) and np.allclose(t["c"], ref_l - ref_w)


def test_theorem41_reports_a_broken_loss(monkeypatch):
    """The check exists to catch arithmetic bugs: a loss that disagrees with the ranking is flagged."""
    from prefrank.analysis import metrics
    args = ([-1.0, -5.0, -2.0], [-2.0, -4.0, -2.5], [-3.0, -3.0, -3.0], [-3.0, -3.0, -3.0])
    assert len(theorem41(*args, beta=1.0)["violations"]) == 0
    honest = metrics.sigmoid_dpo_loss
    monkeypatch.setattr(metrics, "sigmoid_dpo_loss", lambda *a, **k: honest(*a, **k) + np.array([0.0, 0.0, 5.0]))
    t = theorem41(*args, beta=1.0)
    assert t["violations"].tolist() == [2] and t["correct"].tolist() == [True, False, True]


def test_flip_groups_by_hand():
    rows = flip_groups([True, True, False, False, False], [True, False, True, False, False],
                       [0.1, 0.2, 0.3, 0.4, 0.6], [1.0, -1.0, 2.0, -2.0, -4.0])
    assert [r["count"] for r in rows] == [1, 1, 1, 2]
    assert rows[3]["share"] == 0.4 and rows[3]["mean_loss"] == pytest.approx(0.5) and rows[3]["mean_margin"] == -3.0
    assert flip_groups([True], [True], [0.1], [1.0])[1]["mean_loss"] is None


# ---------------------------------------------------------------- statistics

def test_bootstrap_ci_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    p, n, trials = 0.6, 400, 400
    covered = 0
    for t in range(trials):
        lo, hi = bootstrap_ci(rng.random(n) < p, n_boot=2000, seed=t)
        covered += lo <= p <= hi
    # 95% nominal; with 400 trials a correct interval lands in [0.92, 0.98] with probability > 0.99
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_spearman_against_brute_force():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)

    def avg_ranks(v):  # rank = number below + half the number of others equal
        return np.array([(v < a).sum() + ((v == a).sum() - 1) / 2 for a in v])

    expected = np.corrcoef(avg_ranks(x), avg_ranks(y))[0, 1]
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


# ---------------------------------------------------------------- tables, CLI, report

def write_scores(path, pol, ref=None, alpha=None, status=None, n=None):
    pol = np.asarray(pol, dtype=float)
    rows = len(pol)
    status = status or ["ok"] * rows
    n = n or [[3, 4]] * rows
    table = {"id": [str(i) for i in range(rows)], "logp_chosen": pol[:, 0].tolist(), "logp_rejected": pol[:, 1].tolist(),
             "n_chosen": [r[0] for r in n], "n_rejected": [r[1] for r in n],
             "alpha": alpha if alpha is not None else [None] * rows, "truncated": [False] * rows,
             "status": status, "error": [None if s == "ok" else "bad" for s in status]}
    if ref is not None:
        ref = np.asarray(ref, dtype=float)
        table["ref_logp_chosen"], table["ref_logp_rejected"] = ref[:, 0].tolist(), ref[:, 1].tolist()
    pq.write_table(pa.table(table), path)
    return str(path)


def test_summary_on_a_table(tmp_path):
    pol = [[-1, -2], [-3, -2], [-1, -1], [-5, -9], [-2, -1]]
    ref = [[-2, -2], [-2, -3], [-1, -3], [-5, -6], [-1, -2]]
    path = write_scores(tmp_path / "s.parquet", pol, ref, alpha=[0.9, 0.8, 0.5, 1.0, 0.7],
                        status=["ok", "ok", "ok", "ok", "error"])
    s = summarize(load_pairs(path), AnalysisOptions(beta=1.0, betas=[1.0], n_boot=200))
    assert (s["n_pairs"], s["n_errors"], s["n_ties"], s["n_ranked"]) == (4, 1, 1, 3)  # pair 2: the raters tied
    assert s["ranking_accuracy"]["value"] == 2 / 3  # pairs 0 and 3 of 0, 1, 3
    assert s["reference_ranking_accuracy"]["value"] == 1.0
    # idealized at β = 1: (rw - rl) + log(α/(1-α)): 0 + 2.2 > 0, 1 + 1.39 > 0, 1 + 6.9 > 0
    assert s["idealized"]["raw"]["median"] == 1.0 and s["alignment_gap"]["raw"]["median"] == pytest.approx(1 / 3)
    assert [g["count"] for g in s["groups"]] == [2, 1, 0, 0]
    assert s["theorem41_violations"] == 0


@pytest.mark.parametrize("alpha, degenerate", [([1.0, 1.0, 0.5, 1.0], True), ([1.0, 0.0, 1.0, 1.0], True),
                                                ([1.0, 2 / 3, 1.0, 1.0], False)])
def test_alpha_without_rater_disagreement_is_said_wherever_the_gap_is_shown(alpha, degenerate, tmp_path, capsys):
    """One label per pair (alpha 0 or 1 on every ranked pair; ties left out): the JSON, analyze and the
    report say that R* and the gap are trivial; one pair with a split vote makes them a measurement."""
    pol, ref = [[-1, -2], [-3, -2], [-1, -1], [-5, -9]], [[-2, -2], [-2, -3], [-1, -3], [-5, -6]]
    path = write_scores(tmp_path / "s.parquet", pol, ref, alpha=alpha)
    assert main(["analyze", path, "--out", str(tmp_path / "a.json"), "--bootstrap", "50"]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    assert s["alpha_without_disagreement"] is degenerate
    assert ("alpha carries no rater disagreement" in capsys.readouterr().err) is degenerate
    assert main(["report", path, "--out", str(tmp_path / "r"), "--bootstrap", "50"]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert ("| alignment gap (raw) (trivial: see below) |" in report) is degenerate
    assert ("idealized R* and the alignment gap are not measured here" in report) is degenerate
    assert ("alpha carries no rater disagreement" in capsys.readouterr().err) is degenerate


def check_idealized_against_brute_force(idealized, ref, alpha, n_boot=1000, seed=0, epsilon=1e-3):
    """`analyze`'s idealized accuracy per β (its defaults: 1000 resamples, seed 0, α clipped to
    [1e-3, 1 - 1e-3]) against Cor. 3.3 written out per pair, and its 95% CI against (a) the Binomial(n, R*)
    draws the bootstrap takes with that seed and (b) a brute-force percentile bootstrap that resamples
    the pairs themselves, 20,000 times with another generator (agreeing within Monte Carlo error)."""
    a = np.clip(alpha, epsilon, 1 - epsilon)
    resampled = np.random.default_rng(12345).integers(0, len(ref), (20_000, len(ref)))
    assert [float(b) for b in idealized["per_beta"]] == [0.01, 0.1, 1.0, 5.0, 10.0]
    for beta, value in idealized["per_beta"].items():
        beta = float(beta)
        correct = [(w - l) + math.log(x / (1 - x)) / beta > 0 for (w, l), x in zip(ref.tolist(), a.tolist())]
        r_star = sum(correct) / len(correct)
        binomial = np.random.default_rng(seed).binomial(len(correct), r_star, size=n_boot) / len(correct)
        brute = np.asarray(correct)[resampled].mean(axis=1)
        ci = idealized["per_beta_ci95"][str(beta)]
        print(f"β = {beta}: R* {value} (by hand {r_star}), CI {ci}, brute-force bootstrap "
              f"{np.quantile(brute, [0.025, 0.975]).tolist()}")
        assert value == r_star
        assert ci == pytest.approx(np.quantile(binomial, [0.025, 0.975]).tolist(), abs=1e-12)
        assert ci == pytest.approx(np.quantile(brute, [0.025, 0.975]).tolist(), abs=0.021)  # one pair in 50, +MC
        assert ci[0] < ci[1] or r_star in (0.0, 1.0)


def test_analyze_and_report_cli(tmp_path, capsys):
    rng = np.random.default_rng(3)
    ref = rng.normal(-20, 5, (50, 2))
    pol = ref + rng.normal(0, 2, (50, 2))
    alpha = rng.uniform(0, 1, 50)
    scores = write_scores(tmp_path / "s.parquet", pol, ref, alpha=alpha.tolist())
    later = write_scores(tmp_path / "s2.parquet", pol + [[1, -1]], ref, alpha=rng.uniform(0, 1, 50).tolist())
    assert main(["analyze", scores, "--out", str(tmp_path / "a.json"), "--checkpoints", scores, later,
                 "--pairs-out", str(tmp_path / "pairs.parquet"), "--beta", "0.5"]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    per_pair = pq.read_table(tmp_path / "pairs.parquet").to_pydict()
    assert per_pair["c"] == pytest.approx((ref[:, 1] - ref[:, 0]).tolist())
    margin = 0.5 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    assert per_pair["dpo_loss"] == pytest.approx(np.log1p(np.exp(-margin)).tolist())
    assert per_pair["policy_correct"] == (pol[:, 0] >= pol[:, 1]).tolist()
    check_idealized_against_brute_force(s["idealized"]["raw"], ref, alpha)
    for key in ("n_pairs", "n_errors", "ranking_accuracy", "ranking_accuracy_length_normalized", "idealized",
                "alignment_gap", "dpo_loss_mean", "theorem41_violations", "groups", "series"):
        assert key in s
    assert s["ranking_accuracy"]["value"] == pytest.approx(np.mean(pol[:, 0] >= pol[:, 1]))
    assert s["series"][1]["ranking_accuracy"] == pytest.approx(np.mean(pol[:, 0] + 1 >= pol[:, 1] - 1))
    assert main(["report", scores, "--out", str(tmp_path / "rep"), "--checkpoints", scores, later]) == 0
    for name in ("report.md", "summary.json", "accuracy.png", "loss_vs_c.png", "groups.png", "difficulty.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert "alignment gap" in (tmp_path / "rep" / "report.md").read_text()
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "missing.parquet")]) == 2
    assert "cannot read score table" in capsys.readouterr().err


def test_bootstrap_seed_option(tmp_path, capsys):
    """--bootstrap-seed seeds the bootstrap of `analyze` and `report` (a Binomial(n, R) draw per
    resample, written out here); --seed, the built-in task's seed of `score`, is no analysis option."""
    rng = np.random.default_rng(4)
    ref = rng.normal(-20, 5, (60, 2))
    pol = ref + rng.normal(0, 3, (60, 2))
    scores = write_scores(tmp_path / "s.parquet", pol, ref)
    accuracy = np.mean(pol[:, 0] >= pol[:, 1])
    cis = {}
    for seed in (0, 7):
        out = tmp_path / f"a{seed}.json"
        assert main(["analyze", scores, "--out", str(out), "--bootstrap", "300", "--bootstrap-seed", str(seed)]) == 0
        s = json.loads(out.read_text())
        means = np.random.default_rng(seed).binomial(60, accuracy, size=300) / 60
        assert s["ranking_accuracy"]["ci95"] == pytest.approx(np.quantile(means, [0.025, 0.975]).tolist())
        assert (s["options"]["bootstrap_seed"], s["options"]["bootstrap"]) == (seed, 300) and "seed" not in s["options"]
        cis[seed] = s["ranking_accuracy"]["ci95"]
    assert cis[0] != cis[7]
    assert main(["report", scores, "--out", str(tmp_path / "rep"), "--bootstrap", "300", "--bootstrap-seed", "7"]) == 0
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["ranking_accuracy"]["ci95"] == cis[7]
    capsys.readouterr()
    for command in (["analyze", scores], ["report", scores, "--out", str(tmp_path / "rep")]):
        with pytest.raises(SystemExit) as refused:
            main(command + ["--seed", "7"])
        assert refused.value.code == 2 and "unrecognized arguments: --seed 7" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main([command[0], "--help"])
        assert "--bootstrap-seed BOOTSTRAP_SEED seed of the bootstrap resamples (default: 0)" in " ".join(
            capsys.readouterr().out.split())


@pytest.mark.parametrize("seed", range(5))
def test_displacement_against_brute_force(seed, tmp_path):
    """Δ_w, Δ_l and the displacement shares, overall, per group and over checkpoints, against a
    loop over the pairs written here."""
    rng = np.random.default_rng(seed)
    n = 80
    ref = rng.normal(-30, 6, (n, 2))
    pol = ref + rng.normal(-1, 3, (n, 2))  # mostly lower likelihoods, as after DPO
    pol[:5] = ref[:5]  # no change: Δ = 0 is not a loss of likelihood
    path = write_scores(tmp_path / "s.parquet", pol, ref)
    s = summarize(load_pairs(path), AnalysisOptions(beta=0.1, n_boot=10))
    d = s["displacement"]
    count = {"displaced": 0, "both": 0, "by_rejected": 0}
    groups = {}
    for (pw, pl), (rw, rl) in zip(pol, ref):
        dw, dl = pw - rw, pl - rl
        now, before = pw >= pl, rw >= rl
        count["displaced"] += dw < 0
        count["both"] += dw < 0 and dl < 0
        count["by_rejected"] += now and dl < dw < 0
        groups.setdefault((before, now), []).append((dw, dl))
    assert d["share_chosen_displaced"] == pytest.approx(count["displaced"] / n)
    assert d["share_both_decreased"] == pytest.approx(count["both"] / n)
    assert d["share_ranked_right_by_rejected_falling"] == pytest.approx(count["by_rejected"] / n)
    assert d["mean_delta_chosen"] == pytest.approx(float(np.mean(pol[:, 0] - ref[:, 0])))
    assert d["median_delta_rejected"] == pytest.approx(float(np.median(pol[:, 1] - ref[:, 1])))
    for g, key in zip(s["groups"], [(True, True), (True, False), (False, True), (False, False)]):
        members = groups.get(key, [])
        assert g["count"] == len(members)
        if members:
            assert g["share_chosen_displaced"] == pytest.approx(np.mean([dw < 0 for dw, _ in members]))
            assert g["mean_delta_rejected"] == pytest.approx(np.mean([dl for _, dl in members]))
        else:
            assert g["share_chosen_displaced"] is None
    later = write_scores(tmp_path / "s2.parquet", pol - 1.0, ref)
    from prefrank.analysis import checkpoint_series
    series = checkpoint_series([path, later], None, 0.1)
    assert series[0]["displacement"] == pytest.approx(d)
    assert series[1]["displacement"]["share_chosen_displaced"] == pytest.approx(np.mean(pol[:, 0] - 1 < ref[:, 0]))


def test_report_shows_displacement(tmp_path):
    rng = np.random.default_rng(5)
    ref = rng.normal(-20, 5, (40, 2))
    scores = write_scores(tmp_path / "s.parquet", ref + rng.normal(-1, 2, (40, 2)), ref)
    assert main(["report", scores, "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Likelihood displacement" in text and "![likelihood displacement](displacement.png)" in text
    assert (tmp_path / "rep" / "displacement.png").stat().st_size > 0
    assert not (tmp_path / "rep" / "groups.png").exists()  # one table: no one-dot panels over "checkpoints"


def test_separate_reference_table(tmp_path):
    pol = write_scores(tmp_path / "p.parquet", [[-1, -2], [-3, -1]])
    ref = write_scores(tmp_path / "r.parquet", [[-2, -1], [-1, -2]], status=["ok", "error"])
    p = load_pairs(pol, ref)
    assert p.ref_w.tolist() == [-2.0] and len(p.ids) == 1 and p.n_errors == 1


@needs_shared
def test_pandalm_scored_and_analyzed_end_to_end(tmp_path, capsys):
    """Real data and model: PandaLM's 3 human votes give alpha; stories260K is the policy, a random
    model with its vocabulary the reference."""
    import torch
    from transformers import AutoTokenizer
    ref_dir = tmp_path / "ref"
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512)).save_pretrained(ref_dir)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(ref_dir)
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(PANDALM), "--model", str(STORIES), "--ref-model", str(ref_dir),
                 "--prompt-cols", "instruction,input", "--chosen-col", "response1", "--rejected-col", "response2",
                 "--vote-cols", "annotator1,annotator2,annotator3", "--id-col", "idx", "--limit", "100",
                 "--join", "\\n\\n",  # the pandalm format's join for a tokenizer without a chat template
                 "--truncate", "keep-end", "--out", str(out)]) == 0
    assert main(["analyze", str(out), "--out", str(tmp_path / "a.json")]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    table = pq.read_table(out).to_pylist()
    rows = json.load(open(PANDALM))[:100]
    ok = [r for r in table if r["status"] == "ok"]
    assert s["n_pairs"] == len(ok) and s["n_pairs"] + s["n_errors"] == 100
    votes = {str(r["idx"]): [r[f"annotator{j}"] for j in (1, 2, 3)] for r in rows}
    share1 = {i: (v.count(1) + 0.5 * v.count(0)) / 3 for i, v in votes.items()}  # the raters' share for response1
    for r in ok:  # chosen is the raters' majority
        assert r["alpha"] == pytest.approx(max(share1[r["id"]], 1 - share1[r["id"]]))
        assert r["reoriented"] == (share1[r["id"]] < 0.5) and r["n_votes"] == 3 and r["tie"] == (r["alpha"] == 0.5)
    untied = [r for r in ok if share1[r["id"]] != 0.5]
    majority_first = [(r["logp_chosen"] >= r["logp_rejected"]) for r in untied]
    assert s["n_ties"] == len(ok) - len(untied) > 0 and s["n_reoriented"] == sum(share1[r["id"]] < 0.5 for r in ok) > 0
    assert s["ranking_accuracy"]["value"] == pytest.approx(np.mean(majority_first))
    # the same run detected from the columns (the README's recipe) gives the same table
    auto = tmp_path / "auto.parquet"
    assert main(["score", "--data", str(PANDALM), "--model", str(STORIES), "--ref-model", str(ref_dir),
                 "--limit", "100", "--truncate", "keep-end", "--out", str(auto)]) == 0
    assert pq.read_table(auto).to_pylist() == table
    assert "idealized" in s and s["theorem41_violations"] == 0
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--data", str(PANDALM)]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Hardest pairs" in text and "| pairs reoriented to the raters' choice when scored" in text
    hardest = s["difficulty"]["hardest"][0]
    row = next(r for r in rows if str(r["idx"]) == hardest["id"])
    majority = row["response1"] if share1[hardest["id"]] > 0.5 else row["response2"]
    assert f"  - chosen: {majority.replace(chr(10), ' ')[:200]}" in text  # quoted as scored: the raters' choice


def test_tables_read_in_batches_across_row_groups(tmp_path, monkeypatch):
    """load_pairs reads a table a record batch at a time and walks a separate reference table in step
    with it whatever either file's row groups: with batches of 7 rows over policy row groups of 5 and
    reference row groups of 3, every scored row's values and position equal a whole-table reading
    done here with plain Python; a reference table one row short is refused."""
    from prefrank.analysis import summary
    from prefrank.errors import InputError
    rng = np.random.default_rng(3)
    n = 40
    status = rng.choice(["ok", "error"], n, p=[0.8, 0.2]).tolist()
    ref_status = rng.choice(["ok", "error"], n, p=[0.9, 0.1]).tolist()
    pol, ref = rng.normal(-10, 3, (n, 2)), rng.normal(-10, 3, (n, 2))
    alpha = rng.choice([0.6, 0.75, 1.0, 0.5], n).tolist()

    def write(path, values, status, row_group):
        table = {"id": [f"q{i}" for i in range(n)], "logp_chosen": values[:, 0], "logp_rejected": values[:, 1],
                 "n_chosen": rng.integers(1, 50, n), "n_rejected": rng.integers(1, 50, n), "alpha": alpha,
                 "reoriented": rng.random(n) < 0.5, "status": status}
        pq.write_table(pa.table(table), path, row_group_size=row_group)
        return str(path), table

    pol_path, pol_table = write(tmp_path / "p.parquet", pol, status, 5)
    ref_path, ref_table = write(tmp_path / "r.parquet", ref, ref_status, 3)
    monkeypatch.setattr(summary._Rows.__init__, "__defaults__", (7,))
    p = load_pairs(pol_path, ref_path)
    keep = [i for i in range(n) if status[i] == "ok" and ref_status[i] == "ok"]
    assert p.rows.tolist() == keep and p.ids.to_pylist() == [f"q{i}" for i in keep] and p.n_rows == n
    assert p.pol_w.tolist() == [pol[i, 0] for i in keep] and p.pol_l.tolist() == [pol[i, 1] for i in keep]
    assert p.ref_w.tolist() == [ref[i, 0] for i in keep] and p.ref_l.tolist() == [ref[i, 1] for i in keep]
    assert p.n_w.tolist() == [int(pol_table["n_chosen"][i]) for i in keep]
    assert p.alpha.tolist() == [alpha[i] for i in keep]
    assert p.reoriented.tolist() == [bool(pol_table["reoriented"][i]) for i in keep]
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({k: v[:-1] for k, v in ref_table.items()}), short, row_group_size=3)
    with pytest.raises(InputError, match="ids differ"):
        load_pairs(pol_path, str(short))


def test_analysis_commands_do_not_load_torch(tmp_path):
    """analyze, report and pairs on a score table build only their own parser: neither torch nor
    transformers is imported (a few hundred MB of memory the analysis of a big table needs)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(-20, 5, (50, 2))
    path = write_scores(tmp_path / "s.parquet", ref + rng.normal(0, 1, (50, 2)), ref)
    code = (f"import sys; from prefrank.cli import main\n"
            f"assert main(['analyze', {str(path)!r}, '--out', {str(tmp_path / 'a.json')!r}]) == 0\n"
            f"assert main(['report', {str(path)!r}, '--out', {str(tmp_path / 'rep')!r}, '--bootstrap', '10']) == 0\n"
            f"print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "[]", result.stdout


def test_scatter_plots_draw_a_fixed_sample_of_a_big_table():
    """Up to SCATTER_POINTS every pair is drawn; beyond, the same sample of distinct pairs on every run, in
    order, and the title says so."""
    from prefrank.analysis.report import SCATTER_POINTS, _drawn
    everything, note = _drawn(SCATTER_POINTS)
    assert np.arange(SCATTER_POINTS)[everything].tolist() == list(range(SCATTER_POINTS)) and note == ""
    sample, note = _drawn(SCATTER_POINTS * 3 + 1)
    again, _ = _drawn(SCATTER_POINTS * 3 + 1)
    assert len(np.unique(sample)) == SCATTER_POINTS and (np.diff(sample) > 0).all() and sample.max() <= SCATTER_POINTS * 3
    assert np.array_equal(sample, again) and f"of {SCATTER_POINTS * 3 + 1:,} pairs drawn" in note
