"""The CUDA paths against float64 CPU references: the head op (Triton log-softmax steps, forward
and backward), per-sequence sums, the fused DPO loss and both scoring methods. Skipped without a
GPU; run on one with `python -m pytest -q tests/test_gpu.py tests/test_kernels.py`.
PREFRANK_TEST_DEVICE=cpu runs them on the CPU (Triton interpreted), to check the tests themselves."""
import os

import pytest
import torch

from prefrank import ops
from prefrank.models import CausalLM
from prefrank.ops import IGNORE_INDEX
from prefrank.scoring import score
from test_dpo_loss import make_case, naive_loss
from test_scoring import float64_reference, random_items
from tiny_models import ARCHS, tiny_model

CUDA = torch.device(os.environ.get("PREFRANK_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def float64_head_logprobs(hidden, weight, bias, targets, softcap, temperature):
    z = (hidden.double() @ weight.double().T + bias.double()) / temperature
    z = softcap * torch.tanh(z / softcap)
    keep = targets != IGNORE_INDEX
    lp = torch.log_softmax(z, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(keep, lp, 0.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_logprobs_from_hidden_forward_backward(dtype, tol):
    """Several chunks, odd sizes, ignored rows, an arbitrary per-token upstream gradient."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 300, 72, 5003
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.2
    bias = torch.randn(v, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    upstream = torch.randn(n, generator=g)
    leaves = [x.to(CUDA, dtype).requires_grad_() for x in (hidden, weight, bias)]
    out = ops.logprobs_from_hidden(leaves[0], leaves[1], targets.to(CUDA), leaves[2], softcap=20.0,
                                   temperature=0.9, chunk_bytes=4 * v * 64)
    (out * upstream.to(CUDA)).sum().backward()
    # the reference sees the same rounded inputs
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = float64_head_logprobs(*ref_leaves[:2], ref_leaves[2], targets, 20.0, 0.9)
    (ref * upstream.double()).sum().backward()
    err = (out.detach().cpu().double() - ref.detach()).abs().max().item()
    print(f"{dtype} forward: max abs error {err:.3g}")
    assert err <= tol * ref.detach().abs().max().item()
    for name, a, e in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        gerr = (a.grad.cpu().double() - e.grad).abs().max().item()
        print(f"{dtype} d{name}: max abs error {gerr:.3g} (max {e.grad.abs().max().item():.3g})")
        assert gerr <= tol * e.grad.abs().max().item() + 1e-6


def test_sequence_logprobs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 3001, generator=g) * 4
    targets = torch.randint(0, 3001, (500,), generator=g)
    targets[::7] = IGNORE_INDEX
    cu = torch.tensor([0, 1, 1, 130, 499, 500])
    sums, counts = ops.sequence_logprobs(logits.to(CUDA), targets.to(CUDA), cu.to(CUDA))
    lp = torch.where(targets != IGNORE_INDEX,
                     torch.log_softmax(logits.double(), -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref = torch.stack([lp[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    ref_counts = torch.stack([(targets[a:b] != IGNORE_INDEX).sum() for a, b in zip(cu[:-1], cu[1:])])
    print(f"sequence sums: max abs error {(sums.cpu() - ref).abs().max().item():.3g}")
    assert torch.allclose(sums.cpu(), ref, rtol=1e-6, atol=1e-5) and torch.equal(counts.cpu(), ref_counts)


def test_fused_dpo_loss():
    from prefrank.dpo import fused_linear_dpo_loss
    h, w, b, targets, seq, ref_w, ref_l = make_case(n_pairs=6, d=40, v=1031)
    leaves = [x.detach().to(CUDA).requires_grad_() for x in (h, w, b)]
    loss = fused_linear_dpo_loss(leaves[0], leaves[1], targets.to(CUDA), seq.to(CUDA), bias=leaves[2],
                                 ref_chosen_logps=ref_w.to(CUDA), ref_rejected_logps=ref_l.to(CUDA), beta=0.1,
                                 return_metrics=False)
    loss.backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (h, w, b)]
    expected, _ = naive_loss(*ref_leaves, targets, seq, ref_w, ref_l, "sigmoid", 0.1, 0.0, 1.0)
    expected.backward()
    print(f"DPO loss: {loss.item():.6f} vs float64 {expected.item():.6f}")
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item()) + 1e-6
    for a, e in zip(leaves, ref_leaves):
        assert (a.grad.cpu().double() - e.grad).abs().max().item() <= 1e-4 * e.grad.abs().max().item() + 1e-7


@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_fp32_equals_float64(arch):
    model = tiny_model(arch)
    items = random_items(9)
    ref, _ = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    lm = CausalLM(model.to(CUDA))
    for method in ("kv", "packed", "naive"):
        err = (score(lm, items, method=method, budget=96).logps - ref).abs()
        print(f"{arch} {method} on CUDA: max abs error {err.max().item():.3g}")
        assert (err <= 2e-5 * (ref.abs() + n) + 1e-5).all()


def test_scoring_bf16_within_naive_error():
    model = tiny_model("llama").to(torch.bfloat16)
    items = random_items(8, seed=3)
    ref, _ = float64_reference(model, items)
    lm = CausalLM(model.to(CUDA))
    naive_err = (score(lm, items, method="naive", budget=128).logps - ref).abs()
    for method in ("kv", "packed"):
        err = (score(lm, items, method=method, budget=128).logps - ref).abs()
        print(f"bf16 on CUDA: naive max error {naive_err.max():.3g}, {method} max error {err.max():.3g}")
        assert (err <= 2 * naive_err.max() + 1e-3).all()
