"""Triton kernels against float64 torch (on CPU tensors through TRITON_INTERPRET=1, or on CUDA)."""
import pytest
import torch

triton = pytest.importorskip("triton")
from prefrank.kernels.logprobs_from_logits import (  # noqa: E402
    logprobs_from_logits_backward,
    logprobs_from_logits_forward,
)

IGNORE = -100  # the kernels take ignore_index explicitly; -100 is the convention prefrank.ops uses
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def float64_logprobs(logits, targets):
    keep = targets != IGNORE
    lp = torch.log_softmax(logits.double(), -1).gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return torch.where(keep, lp, 0.0)


def case(n, v, dtype, scale=3.0, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = IGNORE
    return logits.to(DEVICE), targets.to(DEVICE)


def logprobs_from_logits(logits, targets, ignore_index):
    return logprobs_from_logits_forward(logits, targets, ignore_index)[0]


def report(name, got, ref):
    finite = torch.isfinite(ref)
    err = (got.double() - ref).abs()[finite]
    rel = (err / ref[finite].abs().clamp(min=1)).max().item() if finite.any() else 0.0
    print(f"{name}: max abs error {err.max().item() if finite.any() else 0:.3g}, max rel {rel:.3g}")
    assert torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite].double(), ref[~finite])
    return rel


@pytest.mark.parametrize("n, v", [(1, 1), (1, 5), (7, 4099), (3, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward(n, v, dtype):
    logits, targets = case(n, v, dtype)
    got = logprobs_from_logits(logits, targets, IGNORE)
    assert got.dtype == torch.float32
    assert report(f"fwd {dtype} N={n} V={v}", got.cpu(), float64_logprobs(logits.cpu(), targets.cpu())) <= 1e-5
    assert (got[targets == IGNORE] == 0).all()


def test_online_logsumexp_across_blocks():
    """Rows longer than one block (4096) whose maximum lies in a later block: the running sum must
    be rescaled when the running maximum grows."""
    logits, targets = case(4, 9000, torch.float32, ignored=0.0)
    logits[0, 8999] = 40.0  # maximum in the last, partial block
    logits[1, 5000] = 40.0  # in the second block
    logits[2, 10] = 40.0  # in the first
    targets[0], targets[1] = 8999, 17
    got = logprobs_from_logits(logits, targets, IGNORE)
    assert report("fwd multi-block", got.cpu(), float64_logprobs(logits.cpu(), targets.cpu())) <= 1e-5


def test_extreme_values_and_ignored_rows():
    logits, targets = case(6, 257, torch.float32, scale=1e4, ignored=0.0)
    logits[0] = float("-inf")
    logits[0, 3], targets[0] = 1.0, 3  # a single finite entry
    logits[1, 9], targets[1] = float("-inf"), 9  # the target itself is -inf
    logits[2, 200:] = float("-inf")
    targets[5] = IGNORE
    got = logprobs_from_logits(logits, targets, IGNORE)
    assert report("fwd ±1e4/-inf", got.cpu(), float64_logprobs(logits.cpu(), targets.cpu())) <= 1e-5
    all_ignored = torch.full_like(targets, IGNORE)
    assert (logprobs_from_logits(logits, all_ignored, IGNORE) == 0).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_backward_for_any_upstream_gradient(dtype, tol):
    logits, targets = case(9, 1031, dtype)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(9, generator=g).to(DEVICE)  # a per-token gradient, not just a sum
    _, lse = logprobs_from_logits_forward(logits, targets, IGNORE)
    grad = logprobs_from_logits_backward(logits, targets, lse, upstream, IGNORE)
    x64 = logits.double().cpu().requires_grad_()
    (float64_logprobs(x64, targets.cpu()) * upstream.double().cpu()).sum().backward()
    err = (grad.double().cpu() - x64.grad).abs().max().item()
    print(f"bwd {dtype}: max abs error {err:.3g}")
    assert grad.dtype == dtype and err <= tol
    assert (grad[targets == IGNORE] == 0).all()


def test_out_of_range_target_is_nan():
    logits, targets = case(3, 50, torch.float32, ignored=0.0)
    targets[1] = 50
    got = logprobs_from_logits(logits, targets, IGNORE)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()
