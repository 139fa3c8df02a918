"""The fused DPO loss against a naive float64 autograd implementation written out here: full
logits, log_softmax, gather, per-sequence sums, each loss's formula."""
import math

import pytest
import torch

from prefrank.dpo import FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss

IGNORE = -100
TYPES = ["sigmoid", "robust", "hinge", "ipo", "gamma"]


def naive_loss(h, w, b, targets, seq, ref_w, ref_l, loss_type, beta, eps, gamma, softcap=None, temperature=1.0,
               per_pair=False):
    """(the loss, averaged over pairs or per pair, and the policy's sequence log-probs [2B])."""
    z = (h @ w.T + (b if b is not None else 0)) / temperature
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    keep = targets != IGNORE
    token = torch.where(keep, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    n_pairs = len(ref_w)
    sums = torch.stack([token[(seq == s) & keep].sum() for s in range(2 * n_pairs)])
    lengths = torch.stack([((seq == s) & keep).sum() for s in range(2 * n_pairs)]).to(h.dtype)
    pw, pl, rw, rl = sums[0::2], sums[1::2], ref_w, ref_l
    if loss_type == "ipo":
        pw, pl, rw, rl = pw / lengths[0::2], pl / lengths[1::2], rw / lengths[0::2], rl / lengths[1::2]
    x = (pw - pl) - (gamma if loss_type == "gamma" else 1.0) * (rw - rl)
    logsig = lambda v: -torch.log1p(torch.exp(-v))  # noqa: E731
    losses = {
        "sigmoid": -(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x),
        "robust": (-(1 - eps) * logsig(beta * x) + eps * logsig(-beta * x)) / (1 - 2 * eps),
        "hinge": torch.clamp(1 - beta * x, min=0),
        "ipo": (x - 1 / (2 * beta)) ** 2,
        "gamma": -logsig(beta * x),
    }[loss_type]
    return (losses if per_pair else losses.mean()), sums


def make_case(n_pairs=5, d=24, v=211, dtype=torch.float32, seed=0, bias=True):
    """A flat packed layout: per pair a prompt (ignored), then chosen and rejected rows, shuffled."""
    g = torch.Generator().manual_seed(seed)
    seq, targets = [], []
    for p in range(n_pairs):
        for s in (2 * p, 2 * p + 1):
            n = int(torch.randint(1, 9, (1,), generator=g))
            prompt = int(torch.randint(0, 4, (1,), generator=g))
            seq += [s] * (n + prompt)
            targets += [IGNORE] * prompt + torch.randint(0, v, (n,), generator=g).tolist()
    perm = torch.randperm(len(seq), generator=g)
    seq, targets = torch.tensor(seq)[perm], torch.tensor(targets)[perm]
    h = (torch.randn(len(seq), d, generator=g)).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    ref = torch.randn(2 * n_pairs, generator=g, dtype=torch.float64) * 5 - 20
    return h, w, b, targets, seq, ref[0::2], ref[1::2]


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("loss_type", TYPES)
@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (20.0, 0.8)])
def test_fused_equals_float64_naive(loss_type, softcap, temperature):
    h, w, b, t, seq, rw, rl = make_case(seed=TYPES.index(loss_type))
    beta, eps, gamma = 0.3, (0.1 if loss_type in ("sigmoid", "robust") else 0.0), 0.5
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    loss, metrics = fused_linear_dpo_loss(leaves[0], leaves[1], t, seq, bias=leaves[2], ref_chosen_logps=rw,
                                          ref_rejected_logps=rl, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                          gamma=gamma, softcap=softcap, temperature=temperature, chunk_bytes=4096)
    got = grads(loss, leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref_loss, sums = naive_loss(*ref_leaves, t, seq, rw, rl, loss_type, beta, eps, gamma, softcap, temperature)
    expected = grads(ref_loss, ref_leaves)
    print(f"{loss_type}: loss {loss.item():.6f} vs {ref_loss.item():.6f}")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    for name, a, e in zip(("hidden", "weight", "bias"), got, expected):
        err = (a.double() - e).abs().max().item()
        scale = e.abs().max().item()
        print(f"  d{name}: max abs error {err:.3g} (max {scale:.3g})")
        assert err <= 1e-5 * scale + 1e-7
    assert metrics["ranking_accuracy"] == pytest.approx((sums[0::2] >= sums[1::2]).double().mean().item())
    assert metrics["reward_margin"] == pytest.approx(
        (beta * ((sums[0::2] - rw) - (sums[1::2] - rl))).mean().item(), rel=1e-5)


@pytest.mark.parametrize("loss_type", TYPES)
def test_float64_inputs_keep_float64_precision(loss_type):
    """In float64 the fused loss and its gradients equal the float64 reference to rounding: no
    constant (β, ε, γ) or slope is rounded through float32 on the way (gradcheck's tolerance would
    not see a 1e-8 relative error)."""
    h, w, b, t, seq, rw, rl = make_case(dtype=torch.float64, seed=7 + TYPES.index(loss_type))
    beta, eps, gamma = 0.3, (0.1 if loss_type in ("sigmoid", "robust") else 0.0), 0.7
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    loss = fused_linear_dpo_loss(leaves[0], leaves[1], t, seq, bias=leaves[2], ref_chosen_logps=rw,
                                 ref_rejected_logps=rl, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                 gamma=gamma, chunk_bytes=4096, return_metrics=False)
    got = grads(loss, leaves)
    ref_leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    ref_loss, _ = naive_loss(*ref_leaves, t, seq, rw, rl, loss_type, beta, eps, gamma, None, 1.0)
    expected = grads(ref_loss, ref_leaves)
    print(f"{loss_type}: loss {loss.item()!r} vs {ref_loss.item()!r}")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-14)
    for name, a, e in zip(("hidden", "weight", "bias"), got, expected):
        err, scale = (a - e).abs().max().item(), e.abs().max().item()
        print(f"  d{name}: max abs error {err:.3g} (max {scale:.3g})")
        assert err <= 1e-12 * scale + 1e-15


@pytest.mark.parametrize("loss_type", TYPES)
def test_gradcheck_float64(loss_type):
    h, w, b, t, seq, rw, rl = make_case(n_pairs=2, d=4, v=7, dtype=torch.float64, seed=3)
    fn = lambda h_, w_, b_: fused_linear_dpo_loss(h_, w_, t, seq, bias=b_, ref_chosen_logps=rw,  # noqa: E731
                                                  ref_rejected_logps=rl, beta=0.7, loss_type=loss_type,
                                                  label_smoothing=0.1 if loss_type == "robust" else 0.0,
                                                  gamma=0.5, return_metrics=False)
    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (h, w, b)))


def test_trl_layout_reference_hidden_and_module():
    """[2B, T, d] with chosen rows first (TRL / Liger) equals the flat layout; reference hidden
    states equal precomputed reference log-probs; the module equals the function."""
    g = torch.Generator().manual_seed(7)
    B, T, d, v = 3, 6, 16, 97
    h, ref_h = torch.randn(2 * B, T, d, generator=g), torch.randn(2 * B, T, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.2
    t = torch.randint(0, v, (2 * B, T), generator=g)
    t[:, :2] = IGNORE  # prompt positions
    t[1, 4:] = IGNORE  # padding
    rows = torch.arange(2 * B)
    seq = (2 * (rows % B) + rows // B)[:, None].expand(2 * B, T).reshape(-1)
    with torch.no_grad():
        ref_token = torch.log_softmax(ref_h.reshape(-1, d).double() @ w.double().T, -1)
        flat_t = t.reshape(-1)
        keep = flat_t != IGNORE
        ref_token = torch.where(keep, ref_token.gather(1, flat_t.clamp(min=0)[:, None]).squeeze(1), 0.0)
        ref_seq = torch.zeros(2 * B, dtype=torch.float64).index_add_(0, seq, ref_token)
    a = fused_linear_dpo_loss(h, w, t, ref_hidden=ref_h, return_metrics=False)
    b = fused_linear_dpo_loss(h.reshape(-1, d), w, flat_t, seq, ref_chosen_logps=ref_seq[0::2],
                              ref_rejected_logps=ref_seq[1::2], return_metrics=False)
    c, _ = FusedLinearDPOLoss(beta=0.1)(h, w, t, ref_hidden=ref_h)
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and c.item() == pytest.approx(a.item(), rel=1e-6)


def test_upstream_gradient_scales_and_bf16_runs():
    h, w, b, t, seq, rw, rl = make_case(seed=9, bias=False)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    (3 * fused_linear_dpo_loss(h1, w, t, seq, ref_chosen_logps=rw, ref_rejected_logps=rl, return_metrics=False)).backward()
    fused_linear_dpo_loss(h2, w, t, seq, ref_chosen_logps=rw, ref_rejected_logps=rl, return_metrics=False).backward()
    assert torch.allclose(h1.grad, 3 * h2.grad, rtol=1e-6, atol=1e-9)
    hb = h.to(torch.bfloat16).requires_grad_()
    loss = fused_linear_dpo_loss(hb, w.to(torch.bfloat16), t, seq, ref_chosen_logps=rw, ref_rejected_logps=rl,
                                 return_metrics=False)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and math.isfinite(loss.item())


def test_a_second_backward_recomputes_the_same_gradients():
    h, w, b, t, seq, rw, rl = make_case(bias=False)
    h.requires_grad_()
    loss = fused_linear_dpo_loss(h, w, t, seq, ref_chosen_logps=rw, ref_rejected_logps=rl, return_metrics=False)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    loss.backward()
    assert torch.equal(h.grad, first)


def test_the_backward_allocates_no_gradient_sized_tensor():
    """The mean loss's gradients come from the forward pass: its backward hands them over and
    allocates nothing of the hidden states' or the weight's size. It used to get zero tensors of
    both sizes from autograd (the op's gradient outputs, which receive no gradient) before every
    backward: 0.15 GB at V 32000, d 1024 and 4096 tokens (bench/RESULTS.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {torch.ops.aten.detach.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}

    class Made(TorchDispatchMode):  # the shapes of the tensors each op makes (views make none)
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func not in views:
                self.made += [(str(func), tuple(o.shape)) for o in (out if isinstance(out, tuple) else (out,))
                              if isinstance(o, torch.Tensor)]
            return out

    h, w, b, t, seq, rw, rl = make_case(bias=False)
    h.requires_grad_(), w.requires_grad_()
    loss = fused_linear_dpo_loss(h, w, t, seq, ref_chosen_logps=rw, ref_rejected_logps=rl, return_metrics=False)
    with Made() as mode:
        loss.backward()
    print(mode.made)
    assert not [m for m in mode.made if m[1] in (tuple(h.shape), tuple(w.shape))], mode.made
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_light_dpo_loss_and_errors():
    pw, pl, rw, rl = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    assert dpo_loss(pw, pl, rw, rl, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-0.5 * 1.5)))
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pw, pl, rw, rl, loss_type="ipo")
    with pytest.raises(ValueError, match=r"^ref_rejected_logps must be a floating-point tensor of policy_chosen_logps"):
        dpo_loss(pw, pl, rw, torch.zeros(3))  # it broadcast, naming nothing
    with pytest.raises(ValueError, match=r"^policy_rejected_logps must be a floating-point"):
        dpo_loss(pw, torch.tensor([-3]), rw, rl)  # integer log-probs were taken
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="nope")
    h, w, b, t, seq, rw, rl = make_case()
    with pytest.raises(ValueError, match="reference"):
        fused_linear_dpo_loss(h, w, t, seq)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sequence_stats_equal_float64(softcap):
    """The per-sequence token statistics (what trainers log beside the loss) against float64 full
    logits: entropy, mean logit, target is the argmax; chunks of one pair each."""
    h, w, b, targets, seq, ref_w, ref_l = make_case(n_pairs=4, dtype=torch.float64)
    hit = (targets != IGNORE) & (torch.arange(len(targets)) % 3 == 0)
    targets[hit] = (h @ w.T + b).argmax(-1)[hit]  # some targets are the argmax
    _, metrics = fused_linear_dpo_loss(h, w, targets, seq, bias=b, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
                                       softcap=softcap, chunk_bytes=1, sequence_stats=True)
    z = h @ w.T + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    per_token = {"tokens": torch.ones(len(z), dtype=torch.float64), "entropy": -(logp.exp() * logp).sum(-1),
                 "logits": z.mean(-1), "top1": (z.argmax(-1) == targets).double(),
                 "logps": logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)}
    keep = targets != IGNORE
    for name, values in per_token.items():
        expected = torch.stack([values[keep & (seq == s)].sum() for s in range(8)]).view(-1, 2)
        torch.testing.assert_close(metrics[f"sequence_{name}"], expected, rtol=1e-12, atol=1e-12, msg=name)
    assert metrics["sequence_top1"].sum() > 0
