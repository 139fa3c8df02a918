"""The GPU benchmark script runs (tiny shapes, any device), so a GPU session can trust it."""
import pytest

from conftest import needs_shared


class FakeClock:
    """time.perf_counter for code whose timed calls each take a scripted number of seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def takes(self, durations):
        """A function whose successive calls take the given seconds."""
        durations = iter(durations)

        def fn():
            self.now += next(durations)
        return fn


def test_bench_timers_report_the_median_call(monkeypatch):
    """`timed` (after one warm-up call) and `alternate` report the median of the calls' durations, on a
    scripted clock: a timer that reported the mean, the minimum, the warm-up or the total would differ."""
    import time

    import torch

    from bench.common import alternate, alternate_times
    from bench.ops_gpu import timed
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert timed(clock.takes([100.0, 5.0, 1.0, 3.0, 50.0, 2.0]), 5, torch.device("cpu")) == 3.0  # odd reps: one median
    assert alternate({"a": clock.takes([4.0, 1.0, 2.0]), "b": clock.takes([7.0, 9.0, 8.0])}, 3) == {"a": 2.0, "b": 8.0}
    runs = alternate_times({"a": clock.takes([4.0, 1.0, 2.0]), "b": clock.takes([7.0, 9.0, 8.0])}, 3)
    assert runs == {"a": [4.0, 1.0, 2.0], "b": [7.0, 9.0, 8.0]}  # every run, in order


@needs_shared
def test_scoring_smoke(tmp_path):
    """bench.scoring on 8 HH pairs, K = 4: every method's runs recorded, its fastest and median from them."""
    import statistics

    from bench.scoring import main
    result = main(["--pairs", "8", "--k", "4", "--reps", "3", "--out-dir", str(tmp_path)])
    for method, runs in result["runs"].items():
        assert len(runs) == 3
        assert result["fastest"][method] == min(runs) and result["seconds"][method] == statistics.median(runs)
    assert result["speedup_kv_over_naive_fastest"] == result["fastest"]["naive"] / result["fastest"]["kv"]


def test_ops_gpu_smoke():
    """The ops benchmark's script on tiny shapes: every op and method it promises, each agreeing with
    torch (torch with itself exactly), its shapes as run (a quarter of op 2's rows ignored)."""
    from bench.ops_gpu import main
    result = main(["--smoke"])
    op1, op2 = result["op1_logprobs_from_logits"], result["op2_logprobs_from_hidden"]
    print("max |Δ| vs torch:", op1["max_abs_diff_vs_torch"],
          {name: op2[name]["max_abs_diff_vs_torch"] for name in ("prefrank", "torch")})
    assert (op1["N"], op1["V"]) == (64, 1000) and op1["max_abs_diff_vs_torch"] < 1e-4
    for name in ("prefrank_fwd", "torch_fwd", "prefrank_fwd_bwd", "torch_fwd_bwd"):
        assert isinstance(op1[name]["seconds"], float) and 0 < op1[name]["seconds"] < 60, name
    assert (op2["N"], op2["N_kept"], op2["d"], op2["V"]) == (64, 48, 32, 1000)
    assert op2["torch"]["max_abs_diff_vs_torch"] == 0.0 and op2["prefrank"]["max_abs_diff_vs_torch"] < 1e-4
    for name in ("prefrank", "torch"):
        assert all(0 < op2[name][key] < 60 for key in ("fwd_seconds", "fwd_bwd_seconds")), name


def test_ops_gpu_rates_follow_from_the_measured_times():
    """With ceilings (measured on a GPU; given here), op 1's share of the copy bandwidth and op 2's
    share of the matmul rate are the bytes and FLOPs of the shapes over the reported times, by hand."""
    import torch

    from bench.ops_gpu import op1, op2
    N, d, V, kept = 64, 32, 1000, 48
    one = op1(N, V, torch.device("cpu"), 2, {"copy_GBps": 10.0})
    bytes_read = N * V * 2  # the bf16 logits, read once
    assert one["prefrank_fwd"]["pct_of_copy_bandwidth"] == pytest.approx(
        100 * bytes_read / one["prefrank_fwd"]["seconds"] / 1e9 / 10.0, rel=1e-12)
    two = op2(N, d, V, torch.device("cpu"), 2, {"bf16_matmul_TFLOPs": 0.5})
    for name in ("prefrank", "torch"):
        r = two[name]
        flops = 2 * kept * d * V  # the forward's matmul over the kept rows; the backward's two are twice that
        assert r["fwd_pct_of_matmul"] == pytest.approx(100 * flops / r["fwd_seconds"] / 0.5e12, rel=1e-12)
        assert r["fwd_bwd_pct_of_matmul"] == pytest.approx(100 * 3 * flops / r["fwd_bwd_seconds"] / 0.5e12, rel=1e-12)


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


def test_vocab_parallel_smoke(tmp_path):
    """The vocabulary-parallel head's benchmark on 2 gloo processes: both heads give the same log-probs."""
    from bench.vocab_parallel import main
    result = main(["--vocab", "101", "--dim", "8", "--tokens", "16", "--out-dir", str(tmp_path)])
    assert set(result["methods"]) == {"gathered", "vocab_parallel"} and result["max_abs_diff_logp"] < 1e-5


def test_head_smoke(tmp_path):
    """bench.head on a tiny shape: prefrank's forward and forward + backward (and CCE's where installed)."""
    from bench.head import main
    result = main(["--shapes", "smoke", "--reps", "1", "--out-dir", str(tmp_path)])
    row = result["shapes"]["smoke"]
    assert set(row["forward_s"]) >= {"prefrank", "gemm"} and "prefrank" in row["forward_backward_s"]
    assert all(diff < 1e-3 for d in row["max_abs_diff_vs_prefrank"].values() for diff in d.values())


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
    big = {"fingerprint_big", "sha256_big", "blake2b_big", "read_big"}
    assert set(result["ms"]) >= big and result["file_mb"] == 4.0
    for name in big:  # the rates are the file's size over the reported times
        ms = result["ms"][name]
        assert 0 < ms < 60_000
        assert result["gb_per_s"][name] == pytest.approx(4e6 / (ms / 1e3) / 1e9, rel=1e-9), name
        assert result["seconds_8b_bf16"][name] == pytest.approx(8.03e9 * 2 / 1e9 / result["gb_per_s"][name], rel=1e-9)


def test_analysis_smoke(tmp_path):
    """The analysis benchmark on 3,000 synthetic pairs: analyze and report both run in a child that
    reports its peak RSS."""
    from bench.analysis import main
    result = main(["--sizes", "3000", "--out-dir", str(tmp_path)])
    assert [(r["command"], r["pairs"], r["exit"]) for r in result["runs"]] == [("analyze", 3000, 0), ("report", 3000, 0)]
    assert all(r["peak_rss_mb"] > 0 for r in result["runs"])


@needs_shared
def test_deterministic_smoke(tmp_path):
    """The deterministic benchmark on 12 HH pairs: the deterministic mode's tables agree to the bit under
    every variant it runs, and both modes are timed. (Its JSON goes to tmp_path: written to
    bench/results, every test run rewrote the committed one.)"""
    from bench.deterministic import main
    result = main(["--smoke", "--out-dir", str(tmp_path)])
    assert result["drift"]["deterministic"] and all(
        d["rows_differing"] == 0 and d["max_abs_diff"] == 0.0 for d in result["drift"]["deterministic"].values())
    assert set(result["drift"]["default"]) == set(result["drift"]["deterministic"])
    assert set(result["seconds"]) == {"default", "deterministic"}
