"""K completions per prompt: metrics by hand, K = 2 equals pairs exactly, an UltraFeedback-shaped
file end to end against float64, and the expansion into pairs."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from prefrank.analysis import bootstrap_ratio_ci
from prefrank.analysis.kwise import exact_order_correct, implied_pairs, kendall_tau_b, pairwise_counts
from prefrank.cli import main
from prefrank.demo.default import build_tokenizer
from tiny_models import float64_logp, tiny_model

UF_ARGS = ["--prompt-cols", "instruction", "--completions-col", "completions.response",
           "--scores-col", "completions.overall_score"]


def test_metrics_by_hand():
    assert exact_order_correct([-1, -2, -3], [3, 2, 1]) is True
    assert exact_order_correct([-1, -3, -2], [3, 2, 1]) is False
    assert exact_order_correct([-1, -3, -2], [3, 1, 1]) is True  # human tie: either order
    assert exact_order_correct([-1, -1], [2, 1]) is True  # model tie counts as correct, as for pairs
    assert exact_order_correct([-1, -2], [1, 1]) is None
    assert pairwise_counts([-1, -3, -2], [3, 2, 1]) == (2, 3)
    assert kendall_tau_b([3, 2, 1], [3, 2, 1]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # model tie on (0, 1); (0, 2) and (1, 2) concordant: (2 - 0) / sqrt((3 - 1) * (3 - 0))
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))
    assert kendall_tau_b([1, 2], [5, 5]) is None


def test_implied_pairs():
    scores = [2.0, 5.0, 1.0, 5.0]
    assert sorted(implied_pairs(scores, "all")) == [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]
    assert implied_pairs(scores, "best-worst") == [(1, 2)]
    rng = np.random.default_rng(0)
    draws = {implied_pairs(scores, "best-random", rng)[0] for _ in range(50)}
    assert draws == {(1, 0), (1, 2)}  # never the tied best (3)
    assert implied_pairs([1, 1], "all") == [] and implied_pairs([1, 1], "best-worst") == []


def test_bootstrap_ratio_ci_covers_a_known_mean():
    rng = np.random.default_rng(0)
    covered = sum(lo <= 0.0 <= hi for lo, hi in (
        bootstrap_ratio_ci(x, np.ones_like(x), n_boot=500, seed=t) for t, x in
        enumerate(rng.normal(0, 1, (200, 100)))))
    assert 0.89 <= covered / 200 <= 0.99, covered / 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


PAIRS = [{"id": f"p{i}", "prompt": f"Q: {i}+{i + 3}=?\nA:", "chosen": f" {2 * i + 3}", "rejected": f" {2 * i + 4}"}
         for i in range(8)]


def test_k2_gives_exactly_the_pair_results(model_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    kwise = write_jsonl(tmp_path / "kwise.jsonl", [{"id": r["id"], "prompt": r["prompt"],
                                                   "completions": [r["chosen"], r["rejected"]], "scores": [1, 0]}
                                                  for r in PAIRS])
    assert main(["score", "--data", pairs, "--model", model_dir, "--out", str(tmp_path / "p.parquet")]) == 0
    assert main(["score", "--data", kwise, "--model", model_dir, "--out", str(tmp_path / "k.parquet"),
                 "--completions-col", "completions"]) == 0
    p = pq.read_table(tmp_path / "p.parquet").to_pylist()
    k = pq.read_table(tmp_path / "k.parquet").to_pylist()
    assert [r["logps"] for r in k] == [[r["logp_chosen"], r["logp_rejected"]] for r in p]
    assert [r["n_tokens"] for r in k] == [[r["n_chosen"], r["n_rejected"]] for r in p]
    assert main(["analyze", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "p.json")]) == 0
    assert main(["analyze", str(tmp_path / "k.parquet"), "--out", str(tmp_path / "k.json")]) == 0
    ps, ks = (json.loads((tmp_path / f).read_text()) for f in ("p.json", "k.json"))
    for kind in ("", "_length_normalized"):
        assert ks["exact_order_accuracy" + kind]["value"] == ps["ranking_accuracy" + kind]["value"]
        assert ks["pairwise_accuracy" + kind]["value"] == ps["ranking_accuracy" + kind]["value"]
    assert ks["implied_pairs"]["ranking_accuracy"] == ps["ranking_accuracy"]


def ultrafeedback_rows():
    rows = []
    for i in range(6):
        answers = [f" {2 * i + d}" for d in (0, 1, 10, 2)]
        ratings = [9, 6.5, 2, 6.5]  # a tie in the middle
        rows.append({"source": "test", "instruction": f"Q: {i}+{i}=?\nA:",
                     "completions": [{"model": f"m{j}", "response": a, "overall_score": s, "annotations": {}}
                                     for j, (a, s) in enumerate(zip(answers, ratings))]})
    rows.append({"instruction": "Q: bad", "completions": [{"response": " 1", "overall_score": 1}]})  # K = 1
    return rows


def test_ultrafeedback_shaped_file_end_to_end(model_dir, tmp_path, capsys):
    rows = ultrafeedback_rows()
    data = write_jsonl(tmp_path / "uf.jsonl", rows)
    out = tmp_path / "k.parquet"
    assert main(["score", "--data", data, "--model", model_dir, "--out", str(out), "--per-token", *UF_ARGS]) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == len(rows) and table[-1]["status"] == "error" and "at least 2" in table[-1]["error"]
    for row, r in zip(rows[:-1], table):
        expected = [float64_logp(model_dir, row["instruction"], c["response"]) for c in row["completions"]]
        assert r["logps"] == pytest.approx(expected, abs=1e-4)
        assert r["human_scores"] == [c["overall_score"] for c in row["completions"]]
        assert [sum(t) for t in r["token_logps"]] == pytest.approx(r["logps"], abs=1e-4)
    assert main(["analyze", str(out), "--out", str(tmp_path / "a.json")]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    assert (s["n_prompts"], s["n_errors"], s["completions_per_prompt"]) == (6, 1, {"4": 6})
    # independent recomputation of the headline from the table
    exact = [all(r["logps"][i] >= r["logps"][j] for i in range(4) for j in range(4)
                 if r["human_scores"][i] > r["human_scores"][j]) for r in table[:-1]]
    assert s["exact_order_accuracy"]["value"] == pytest.approx(np.mean(exact))
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "exact-order accuracy" in (tmp_path / "rep" / "report.md").read_text()


def test_expanding_kwise_into_pairs(model_dir, tmp_path, capsys):
    rows = ultrafeedback_rows()
    data = write_jsonl(tmp_path / "uf.jsonl", rows)
    kout = tmp_path / "k.parquet"
    assert main(["score", "--data", data, "--model", model_dir, "--out", str(kout), *UF_ARGS]) == 0
    # a K-wise score table → a pair score table
    assert main(["pairs", str(kout), "--out", str(tmp_path / "pt.parquet"), "--pairing", "best-worst"]) == 0
    pt = pq.read_table(tmp_path / "pt.parquet").to_pylist()
    k = pq.read_table(kout).to_pylist()
    assert [r["id"] for r in pt] == [f"{i}:0>2" for i in range(6)] + ["6"]
    assert all(p["logp_chosen"] == r["logps"][0] and p["logp_rejected"] == r["logps"][2] for p, r in zip(pt[:-1], k))
    assert pt[-1]["status"] == "error"
    # a K-wise dataset → a pair dataset, which scores to the same numbers
    assert main(["pairs", data, "--out", str(tmp_path / "pairs.jsonl"), *UF_ARGS]) == 0
    err = capsys.readouterr().err
    assert "30 pairs" in err and "1 bad rows skipped" in err  # 5 strict pairs of 4 with one tie, × 6
    assert main(["score", "--data", str(tmp_path / "pairs.jsonl"), "--model", model_dir,
                 "--out", str(tmp_path / "p.parquet")]) == 0
    by_id = {r["id"]: r for r in k}
    for p in pq.read_table(tmp_path / "p.parquet").to_pylist():
        source, pair = p["id"].split(":")
        i, j = map(int, pair.split(">"))
        assert p["logp_chosen"] == pytest.approx(by_id[source]["logps"][i], abs=1e-5)
        assert p["logp_rejected"] == pytest.approx(by_id[source]["logps"][j], abs=1e-5)
