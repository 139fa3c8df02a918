"""The GPU benchmark script runs (tiny shapes, any device), so a GPU session can trust it."""


def test_ops_gpu_smoke():
    from bench.ops_gpu import main
    result = main(["--smoke"])
    assert result["op1_logprobs_from_logits"]["max_abs_diff_vs_torch"] < 1e-4
    op2 = result["op2_logprobs_from_hidden"]
    assert op2["prefrank"]["max_abs_diff_vs_torch"] < 1e-4 and op2["prefrank"]["fwd_bwd_seconds"] > 0


def test_scoring_gpu_smoke():
    """The end-to-end GPU benchmark on a tiny model: every installed path agrees with naive."""
    from bench.scoring_gpu import main
    result = main(["--smoke", "--compile"])
    assert {"kv", "packed", "naive", "trl_style", "packed_compiled", "naive_compiled"} <= set(result["seconds"])
    assert all(diff < 1e-4 for diff in result["max_rel_diff_vs_naive"].values())


def test_tensor_parallel_smoke():
    """The multi-GPU benchmark's script on 2 gloo processes: both layouts score every pair alike."""
    from bench.tensor_parallel import main
    result = main(["--smoke"])
    assert set(result["layouts"]) == {"tp1", "tp2"} and max(result["max_rel_diff_vs_tp1"].values()) < 1e-5


def test_scaling_smoke(tmp_path):
    from bench.scaling import main
    result = main(["--pairs", "2", "--length", "16", "--reps", "1", "--vocabs", "512,1000", "--lengths", "16,32",
                   "--out-dir", str(tmp_path)])
    assert len(result["prompt_share"]) == 5 and len(result["vocab_sweep"]) == 2 and len(result["length_sweep"]) == 2
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_grouping_smoke():
    """The grouping benchmark on a 1 MB vote file: every pair comes out once with its 4 votes (the
    child checks each against the votes written) and the RSS growth is measured."""
    from bench.grouping import main
    result = main(["--smoke"])
    assert result["pairs"] > 100 and result["votes"] == 4 * result["pairs"] and result["votes_per_s"] > 0
    assert 0 <= result["rss_growth_mb"] < result["peak_rss_mb"]


def test_fingerprint_smoke():
    """The fingerprint benchmark on a 4 MB file: every timing comes back."""
    from bench.fingerprint import main
    result = main(["--smoke"])
    assert set(result["ms"]) >= {"fingerprint_big", "sha256_big"} and all(ms > 0 for ms in result["ms"].values())


def test_analysis_smoke(tmp_path):
    """The analysis benchmark on 3,000 synthetic pairs: analyze and report both run in a child that
    reports its peak RSS."""
    from bench.analysis import main
    result = main(["--sizes", "3000", "--out-dir", str(tmp_path)])
    assert [(r["command"], r["pairs"], r["exit"]) for r in result["runs"]] == [("analyze", 3000, 0), ("report", 3000, 0)]
    assert all(r["peak_rss_mb"] > 0 for r in result["runs"])
