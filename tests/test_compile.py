"""prefrank's registered ops (torch.ops.prefrank.*) under torch.library.opcheck on every CPU
backend; torch.compile(fullgraph=True) of training steps with the fused DPO loss and
logprobs_from_hidden against eager; bf16 accuracy against plain torch in bf16 (both measured
against float64); the API's options and its refusals of bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from prefrank import ops
from prefrank.dpo import LOSS_TYPES, FusedLinearDPOLoss, fused_linear_dpo_loss
from test_dpo_loss import IGNORE, make_case, naive_loss

BACKENDS = ["torch", "cpp", "triton"]  # triton on CPU tensors through TRITON_INTERPRET=1 (conftest)
P = torch.ops.prefrank


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend):
    """Schema, autograd registration, fake kernels (shapes from shapes only) and AOT dispatch with
    dynamic shapes, for each op and its backward op; tiny odd shapes."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 7, 5, 11
    logits = torch.randn(n, v, generator=g, requires_grad=True)
    targets = torch.tensor([3, IGNORE, 10, 0, 7, IGNORE, 1])
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 7])
    values = torch.randn(n, generator=g, requires_grad=True)
    logp, lse = (x.detach() for x in P.logprobs_from_logits(logits, targets, IGNORE, backend, 0))
    hl, hlse = (x.detach() for x in P.logprobs_from_hidden(hidden, weight, bias, targets, 3.0, 0.9, IGNORE, 64, backend))
    seq = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    ref = torch.randn(4, generator=g, dtype=torch.float64) - 5
    dpo = (hidden, weight, bias, targets, seq, ref, 0.5, "sigmoid", 0.1, 1.0, None, 1.0, IGNORE, 64, backend, True)
    calls = {
        P.logprobs_from_logits: (logits, targets, IGNORE, backend, 0),
        P.logprobs_from_logits_backward: (torch.randn(n, generator=g), logits.detach(), targets, lse, IGNORE, backend),
        P.logprobs_from_hidden: (hidden, weight, bias, targets, 3.0, 0.9, IGNORE, 64, backend),
        P.logprobs_from_hidden_backward: (torch.randn(n, generator=g), hidden.detach(), weight.detach(), bias.detach(),
                                          targets, hlse, 3.0, 0.9, IGNORE, 64, backend, True, True, True),
        P.segment_sums: (values, cu, backend),
        P.segment_sums_backward: (torch.randn(3, generator=g, dtype=torch.float64), cu, values.detach()),
        P.sequence_logprobs: (logits.detach(), targets, cu, IGNORE, backend, 0),
        P.fused_linear_dpo: (*dpo, "mean", True, True, True),
        P.fused_linear_dpo_backward: (torch.randn(2, generator=g, dtype=torch.float64),
                                      *(x.detach() for x in dpo[:3]), *dpo[3:], True, True, True),
    }
    for op, args in calls.items():
        print(f"opcheck {op} on {backend}")
        torch.library.opcheck(op, args)
    # reduction "none": the backward is the backward op with each pair's upstream gradient
    torch.library.opcheck(P.fused_linear_dpo, (*dpo, "none", True, True, True))
    assert torch.isfinite(logp).all() and torch.isfinite(hl).all()


# ---------------------------------------------------------------- torch.compile

def tiny_model(seed=0, d=8, v=37):
    """An input projection (so gradients flow through the graph into the loss) and a head."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, d, generator=g) * 0.5
    w = torch.randn(v, d, generator=g) * 0.3
    b = torch.randn(v, generator=g) * 0.1
    return proj, w, b


def compare(name, compiled, eager):
    for i, (a, e) in enumerate(zip(compiled, eager)):
        err = rel_err(a, e)
        print(f"{name}[{i}]: max relative error compiled vs eager {err:.3g}")
        assert err <= 1e-5


def run_step(step, x, params, *args, **kwargs):
    """The loss, what else the step returns, and the gradients of every parameter."""
    leaves = [p.clone().requires_grad_() for p in params]
    loss, *rest = step(x, *leaves, *args, **kwargs)
    loss.backward()
    return loss.detach(), rest, [p.grad for p in leaves]


def packed_step(x, proj, w, b, targets, seq, rw, rl, loss_type):
    hidden = torch.tanh(x @ proj)
    loss, metrics = fused_linear_dpo_loss(hidden, w, targets, seq, bias=b, ref_chosen_logps=rw, ref_rejected_logps=rl,
                                          beta=0.3, loss_type=loss_type,
                                          label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0,
                                          gamma=0.5, chunk_bytes=37 * 4 * 6)
    return loss, metrics["reward_margin"], metrics["ranking_accuracy"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compiled_step_equals_eager_for_every_loss_type(loss_type):
    """Packed prompt + chosen + rejected rows, precomputed reference log-probs, several chunks:
    one graph (fullgraph=True, no break counted), loss, metrics (tensors) and gradients equal eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    proj, w, b = tiny_model()
    h, _, _, t, seq, rw, rl = make_case(n_pairs=3, d=8, v=37, seed=LOSS_TYPES.index(loss_type))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(packed_step, fullgraph=True, backend=counter)
    c_loss, c_rest, c_grads = run_step(compiled, h, (proj, w, b), t, seq, rw, rl, loss_type)
    e_loss, e_rest, e_grads = run_step(packed_step, h, (proj, w, b), t, seq, rw, rl, loss_type)
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert all(isinstance(m, torch.Tensor) and m.dim() == 0 for m in c_rest)
    compare(loss_type, [c_loss, *c_rest, *c_grads], [e_loss, *e_rest, *e_grads])


def test_compiled_module_with_reference_hidden_states_inductor():
    """[2B, T, d] layout with the reference's hidden states, FusedLinearDPOLoss with a per-call
    override, compiled by inductor (the default backend) with fullgraph=True."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    proj, w, b = tiny_model(1)
    g = torch.Generator().manual_seed(1)
    B, T, d = 2, 5, 8
    x, ref_h = torch.randn(2 * B, T, d, generator=g), torch.randn(2 * B, T, d, generator=g)
    t = torch.randint(0, 37, (2 * B, T), generator=g)
    t[:, :2] = IGNORE
    module = FusedLinearDPOLoss(beta=0.1, loss_type="ipo")

    def step(x, proj, w, b):
        return module(torch.tanh(x @ proj), w, t, bias=b, ref_hidden=ref_h, ref_bias=b.detach(), beta=0.4,
                      return_metrics=False),

    compiled = torch.compile(step, fullgraph=True)
    c_loss, _, c_grads = run_step(compiled, x, (proj, w, b))
    e_loss, _, e_grads = run_step(step, x, (proj, w, b))
    assert not torch._dynamo.utils.counters["graph_break"]
    compare("module", [c_loss, *c_grads], [e_loss, *e_grads])


def test_dynamic_shapes_do_not_recompile():
    """dynamic=True: a new token count and a new pair count reuse the graph (fused loss), a new
    token count reuses logprobs_from_hidden's; both equal eager."""
    torch._dynamo.reset()
    proj, w, b = tiny_model(2, v=101)  # a vocabulary no row count equals (dynamo would tie equal sizes)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(packed_step, fullgraph=True, dynamic=True, backend=counter)
    compiles = []  # backend calls after each step: the first step's (dynamo may restart its analysis once), then none
    for n_pairs, seed in ((3, 0), (3, 1), (5, 2)):
        h, _, _, t, seq, rw, rl = make_case(n_pairs=n_pairs, d=8, v=101, seed=seed)
        got, expected = (run_step(f, h, (proj, w, b), t, seq, rw, rl, "sigmoid") for f in (compiled, packed_step))
        compare(f"dynamic {n_pairs} pairs, {len(t)} rows", [got[0], *got[2]], [expected[0], *expected[2]])
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles == [compiles[0]] * 3, compiles

    def head_step(x, proj, w, b, targets):
        return (ops.logprobs_from_hidden(torch.tanh(x @ proj), w, targets, b, softcap=5.0) * 0.7).sum(),

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(head_step, fullgraph=True, dynamic=True, backend=counter)
    g = torch.Generator().manual_seed(3)
    compiles = []
    for n in (9, 14, 23):
        x, t = torch.randn(n, 8, generator=g), torch.randint(0, 101, (n,), generator=g)
        t[::3] = IGNORE
        got, expected = (run_step(f, x, (proj, w, b), t) for f in (compiled, head_step))
        compare(f"logprobs_from_hidden {n} rows", [got[0], *got[2]], [expected[0], *expected[2]])
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles == [compiles[0]] * 3, compiles


# ---------------------------------------------------------------- bf16 against plain torch

def plain_torch_loss(h, w, b, targets, seq, rw, rl):
    """The unfused loss as a trainer writes it in the inputs' dtype: logits from F.linear, log-softmax
    of those logits upcast to fp32, per-sequence sums, DPO's sigmoid loss."""
    logp = torch.log_softmax(F.linear(h, w, b).float(), -1)
    keep = targets != IGNORE
    token = torch.where(keep, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    sums = torch.zeros(len(rw) * 2, dtype=token.dtype).index_add(0, seq, token)
    z = (sums[0::2] - sums[1::2]) - (rw - rl).to(sums.dtype)
    return -F.logsigmoid(0.1 * z).mean(), sums


@pytest.mark.parametrize("chunks", [1, 8])
def test_bf16_errors_are_no_larger_than_plain_torch(chunks):
    """bf16 hidden, weight and bias: the error against float64 of the loss, the sequence log-probs
    and every gradient is no larger than plain torch's in bf16, at 1 chunk and at 8 (d weight and
    d bias are accumulated in fp32 across chunks, not rounded to bf16 after each)."""
    h, w, b, t, seq, rw, rl = make_case(n_pairs=16, d=64, v=512, seed=5)
    n_rows = int((t != IGNORE).sum())
    chunk_bytes = 2 * 512 * (n_rows if chunks == 1 else n_rows // chunks)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    loss, metrics = fused_linear_dpo_loss(*leaves[:2], t, seq, bias=leaves[2], ref_chosen_logps=rw,
                                          ref_rejected_logps=rl, chunk_bytes=chunk_bytes, sequence_stats=True)
    loss.backward()
    plain = [x.to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    p_loss, p_sums = plain_torch_loss(*plain, t, seq, rw, rl)
    p_loss.backward()
    exact = [x.to(torch.bfloat16).double().requires_grad_() for x in (h, w, b)]  # the same bf16 values
    x_loss, x_sums = naive_loss(*exact, t, seq, rw, rl, "sigmoid", 0.1, 0.0, 1.0)
    x_loss.backward()
    ours = [loss, metrics["sequence_logps"].reshape(-1)] + [x.grad for x in leaves]
    torch_ = [p_loss, p_sums] + [x.grad for x in plain]
    for name, a, p, e in zip(("loss", "log-probs", "d hidden", "d weight", "d bias"), ours, torch_,
                             [x_loss, x_sums] + [x.grad for x in exact]):
        ours_err, torch_err = (a.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        # both round the logits to bf16; beyond that only fp32 summation order may differ: a few fp32 ulps
        fp32_noise = 8 * 2.0 ** -24 * e.abs().max().item()
        print(f"{chunks} chunks {name}: prefrank error {ours_err:.3g}, plain torch bf16 {torch_err:.3g} "
              f"(fp32 noise {fp32_noise:.2g})")
        assert ours_err <= torch_err + fp32_noise


# ---------------------------------------------------------------- API

def test_reduction_backend_and_per_call_overrides():
    """reduction "sum" = B · "mean"; "none" gives per-pair losses whose backward with any upstream
    weights equals float64 autograd; backend= per call equals $PREFRANK_BACKEND; a module's call
    overrides its configured options."""
    h, w, b, t, seq, rw, rl = make_case(n_pairs=4, seed=11)
    kw = dict(bias=b, ref_chosen_logps=rw, ref_rejected_logps=rl, return_metrics=False, beta=0.3)
    mean = fused_linear_dpo_loss(h, w, t, seq, **kw)
    total = fused_linear_dpo_loss(h, w, t, seq, reduction="sum", **kw)
    assert total.item() == pytest.approx(4 * mean.item(), rel=1e-6)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    per_pair = fused_linear_dpo_loss(leaves[0], leaves[1], t, seq, reduction="none", chunk_bytes=211 * 4 * 8,
                                     **{**kw, "bias": leaves[2]})
    upstream = torch.tensor([0.5, -1.0, 2.0, 0.25])
    (per_pair * upstream).sum().backward()
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    ref_pairs, _ = naive_loss(*ref, t, seq, rw, rl, "sigmoid", 0.3, 0.0, 1.0, per_pair=True)
    (ref_pairs * upstream.double()).sum().backward()
    assert per_pair.shape == (4,) and rel_err(per_pair, ref_pairs) <= 1e-5
    for name, a, e in zip(("hidden", "weight", "bias"), leaves, ref):
        err = rel_err(a.grad, e.grad)
        print(f"reduction none d{name}: max relative error {err:.3g}")
        assert err <= 1e-5
    by_arg = {name: fused_linear_dpo_loss(h, w, t, seq, backend=name, **kw) for name in ops.BACKENDS}
    for name, value in by_arg.items():
        assert value.item() == pytest.approx(mean.item(), rel=1e-5), name
    module = FusedLinearDPOLoss(beta=0.1, return_metrics=False)
    overridden = module(h, w, t, seq, b, ref_chosen_logps=rw, ref_rejected_logps=rl, beta=0.3, reduction="sum")
    assert overridden.item() == pytest.approx(total.item(), rel=1e-6)


def test_bad_input_is_refused_naming_the_argument():
    h, w, b, t, seq, rw, rl = make_case(n_pairs=2, d=6, v=23, seed=4)
    ok = dict(ref_chosen_logps=rw, ref_rejected_logps=rl)

    def refused(match, *args, error=(ValueError, TypeError), **kwargs):
        args = args or (h, w, t, seq)
        with pytest.raises(error, match=match) as info:
            fused_linear_dpo_loss(*args, **{**ok, **kwargs})
        print(info.value)

    refused(r"^weight must be \[V, d\]", h, w.T.contiguous(), t, seq)  # a [d, V] weight
    refused(r"^bias must be \[V\]", bias=torch.zeros(5))
    refused(r"^hidden must be floating point", h.long(), w, t, seq)
    refused(r"^targets must be integer", h, w, t.float(), seq)
    refused(r"^beta must be > 0", beta=-0.1)
    refused(r"^beta must be > 0", beta=0.0, loss_type="ipo")
    refused(r"^beta must be a finite Python number", beta=float("nan"))
    refused(r"^label_smoothing must be < 0.5", loss_type="robust", label_smoothing=0.5)
    refused(r"^label_smoothing must be in \[0, 1\]", label_smoothing=1.5)
    refused(r"^loss_type 'dpo'", loss_type="dpo")
    refused(r"^reduction 'avg'", reduction="avg")
    refused(r"^temperature must be > 0", temperature=0.0)
    refused(r"^softcap must be > 0", softcap=-1.0)
    refused(r"^chunk_bytes must be a positive int", chunk_bytes=0)
    refused(r"^backend='cuda'", backend="cuda")
    refused(r"^ref_chosen_logps / ref_rejected_logps: 3 reference pairs for 2", num_pairs=2,
            ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    refused(r"^sequence_ids: flat", h, w, t, None)
    # given but unused, they were dropped without a word
    refused(r"^sequence_ids: only for flat", h[:20].view(4, 5, -1), w, t[:20].view(4, 5), seq[:20].view(4, 5))
    refused(r"^the reference twice", ref_hidden=h)
    t3 = torch.randint(0, 23, (4, 5))
    t3[1] = IGNORE  # pair 1's chosen row has no target token (it said "sequence 2", which reads as row 2)
    refused(r"pair 1's chosen has none \(row 1 of \[2B, T\] targets, or sequence id 2 in the flat layout\)$",
            h[:20].view(4, 5, -1), w, t3)
    refused(r"^beta must be a finite Python number", beta=torch.tensor(0.1))
    if ops.backends._triton_kernels() is not None:
        with pytest.MonkeyPatch.context() as env:  # outside the tests' interpreter: Triton's "0 active drivers"
            env.delenv("TRITON_INTERPRET", raising=False)
            refused(r"^backend=triton runs on CUDA tensors", backend="triton")
    bad_t = t.clone()
    bad_t[bad_t != IGNORE] = bad_t[bad_t != IGNORE].clamp(max=22)
    bad_t[torch.nonzero(bad_t != IGNORE)[0]] = 23
    refused(r"^targets: 1 target ids outside \[0, 23\)", h, w, bad_t, seq, error=IndexError)
    refused(r"^sequence_ids: scored rows' ids must be in \[0, 4\)", h, w, t, seq + 2)
    for name, args in (("hidden", (h.clone().index_fill_(0, torch.tensor([0]), float("nan")), w, t, seq)),
                       ("weight", (h, w.clone().index_fill_(0, torch.tensor([3]), float("inf")), t, seq))):
        refused(rf"^{name} holds NaN or inf", *args)
    refused(r"^the reference log-probs hold NaN or inf", ref_chosen_logps=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"^beta must be > 0"):
        FusedLinearDPOLoss(beta=0)
    with pytest.raises(ValueError, match=r"^backend='gpu'"):
        FusedLinearDPOLoss(backend="gpu")
    with pytest.raises(ValueError, match=r"^backend='gpu'"):
        ops.logprobs_from_hidden(h, w, t, backend="gpu")
    with pytest.raises(ValueError, match=r"^weight must be \[V, d\]"):
        ops.logprobs_from_hidden(h, w.T, t)
