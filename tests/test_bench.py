"""The GPU benchmark script runs (tiny shapes, any device), so a GPU session can trust it."""


def test_ops_gpu_smoke():
    from bench.ops_gpu import main
    result = main(["--smoke"])
    assert result["op1_logprobs_from_logits"]["max_abs_diff_vs_torch"] < 1e-4
    op2 = result["op2_logprobs_from_hidden"]
    assert op2["prefrank"]["max_abs_diff_vs_torch"] < 1e-4 and op2["prefrank"]["fwd_bwd_seconds"] > 0
