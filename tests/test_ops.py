"""prefrank.ops on every CPU backend against float64 torch written out here."""
import pytest
import torch

from prefrank import ops
from prefrank.ops import IGNORE_INDEX

BACKENDS = ["triton", "cpp", "torch"]  # triton on CPU tensors runs in TRITON_INTERPRET mode (conftest)


def float64_logprobs(logits, targets, ignore_index=IGNORE_INDEX):
    logits = logits.double()
    keep = targets != ignore_index
    out = torch.zeros(len(targets), dtype=torch.float64)
    lp = torch.log_softmax(logits[keep], -1)
    out[keep] = lp[torch.arange(int(keep.sum())), targets[keep]]
    return out


def case(n, v, dtype, *, scale=3.0, ignored=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = IGNORE_INDEX
    return logits, targets


def check(name, got, ref, dtype_tol):
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs()
    finite = torch.isfinite(ref)
    rel = (err[finite] / ref[finite].abs().clamp(min=1.0)).max().item() if finite.any() else 0.0
    print(f"{name}: max abs error {err[finite].max().item() if finite.any() else 0:.3g}, max rel {rel:.3g}")
    assert torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite].double(), ref[~finite])
    assert rel <= dtype_tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, v", [(1, 1), (1, 7), (5, 1000), (33, 4099), (64, 32000)])
def test_logprobs_from_logits_fp32(backend, n, v, monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(n, v, torch.float32)
    got = ops.logprobs_from_logits(logits, targets)
    ref = float64_logprobs(logits, targets)
    check(f"{backend} fp32 N={n} V={v}", got, ref, 1e-5)
    assert (got[targets == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_logprobs_from_logits_float64(backend, monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(9, 3001, torch.float64)
    got = ops.logprobs_from_logits(logits, targets)
    assert got.dtype == torch.float64
    err = (got - float64_logprobs(logits, targets)).abs().max().item()
    print(f"{backend} float64: max abs error {err:.3g}")
    assert err <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_from_logits_half(backend, dtype, monkeypatch):
    """Half inputs are read exactly and accumulated in fp32: the error is that of fp32 math on
    the half values, so compare with float64 on the same (rounded) inputs."""
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(17, 5003, dtype)
    check(f"{backend} {dtype}", ops.logprobs_from_logits(logits, targets), float64_logprobs(logits, targets), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_infinite_logits(backend, monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(8, 301, torch.float32, scale=1e4, ignored=0.0)
    logits[0, :] = float("-inf")
    logits[0, 5] = 2.0  # one finite entry: log-prob 0 there, -inf elsewhere
    targets[0] = 5
    logits[1, 7] = float("-inf")
    targets[1] = 7  # the target itself is -inf
    logits[2, 100:] = float("-inf")
    check(f"{backend} ±1e4/-inf", ops.logprobs_from_logits(logits, targets), float64_logprobs(logits, targets), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_strided_rows(backend, monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(6, 50, torch.float32, ignored=1.1)
    assert (ops.logprobs_from_logits(logits, targets) == 0).all()
    wide, targets = case(6, 80, torch.float32, ignored=0.0)
    view = wide[:, 10:60]  # rows with a stride larger than their length
    targets = targets % 50
    check(f"{backend} strided", ops.logprobs_from_logits(view, targets), float64_logprobs(view, targets), 1e-5)


def test_cpp_threads_agree(monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", "cpp")
    logits, targets = case(97, 3001, torch.float32)
    one = ops.logprobs_from_logits(logits, targets, num_threads=1)
    two = ops.logprobs_from_logits(logits, targets, num_threads=2)
    assert torch.equal(one, two)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [1031, -1, -101])
def test_out_of_range_targets_raise_on_every_backend(backend, bad, monkeypatch):
    """One contract: a target outside [0, V) that is not ignore_index is an IndexError, on every op
    and backend (no NaN, no dropped row)."""
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(9, 1031, torch.float32)
    targets[4] = bad
    hidden, weight = torch.randn(9, 8), torch.randn(1031, 8)
    calls = {"logprobs_from_logits": lambda: ops.logprobs_from_logits(logits, targets),
             "logprobs_from_hidden": lambda: ops.logprobs_from_hidden(hidden, weight, targets),
             "sequence_logprobs": lambda: ops.sequence_logprobs(logits, targets, torch.tensor([0, 4, 9]))}
    for name, call in calls.items():
        with pytest.raises(IndexError, match=r"1 target ids outside \[0, 1031\)"):
            call()
    from prefrank.dpo import fused_linear_dpo_loss
    with pytest.raises(IndexError, match=r"1 target ids outside \[0, 1031\)"):
        fused_linear_dpo_loss(hidden, weight, targets, torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1]),
                              ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))


def test_a_cpp_extension_that_does_not_import_is_reported(monkeypatch):
    """The C++ extension missing or broken: one warning, then the torch backend; forcing cpp fails
    loudly with the import error."""
    import warnings

    from prefrank.ops import backends
    monkeypatch.setattr(backends, "_cpu_ops", None)
    monkeypatch.setattr(backends, "_CPP_IMPORT_ERROR", ImportError("undefined symbol: _ZN3foo"))
    monkeypatch.delenv("PREFRANK_BACKEND", raising=False)
    backends._warn_no_cpp.cache_clear()
    logits, targets = case(5, 100, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.logprobs_from_logits(logits, targets)
        ops.logprobs_from_logits(logits, targets)
    messages = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
    assert len(messages) == 1 and "undefined symbol" in messages[0]
    check("torch fallback", first, float64_logprobs(logits, targets), 1e-5)
    monkeypatch.setenv("PREFRANK_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="undefined symbol"):
        ops.logprobs_from_logits(logits, targets)
    backends._warn_no_cpp.cache_clear()


def test_cpp_dtype_codes_come_from_the_extension():
    from prefrank import _cpu_ops
    from prefrank.ops import backends
    assert {str(dtype).removeprefix("torch."): code for dtype, code in backends._CPP_DTYPES.items()} == _cpu_ops.DTYPES
    assert len(set(_cpu_ops.DTYPES.values())) == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias, softcap, temperature", [(False, None, 1.0), (True, 30.0, 0.7)])
def test_logprobs_from_hidden(backend, bias, softcap, temperature, monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    g = torch.Generator().manual_seed(1)
    n, d, v = 37, 19, 1031
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::3] = IGNORE_INDEX
    z = hidden.double() @ weight.double().T + (b.double() if bias else 0)
    z = z / temperature
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = float64_logprobs(z, targets)
    got = ops.logprobs_from_hidden(hidden, weight, targets, b, softcap=softcap, temperature=temperature)
    check(f"{backend} hidden bias={bias} softcap={softcap}", got, ref, 1e-5)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_logprobs_from_hidden_gradcheck_float64(backend, monkeypatch):
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([1, IGNORE_INDEX, 10, 0, 3, IGNORE_INDEX])
    assert torch.autograd.gradcheck(
        lambda h, w, b: ops.logprobs_from_hidden(h, w, targets, b, softcap=4.0, temperature=0.9, chunk_bytes=100),
        (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_hidden_backward_for_any_upstream_gradient(backend, monkeypatch):
    """Gradients for an arbitrary per-token upstream gradient, not just a sum, against float64
    autograd through the full logits; several chunks."""
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    g = torch.Generator().manual_seed(3)
    n, d, v = 29, 12, 517
    hidden, weight, bias = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = IGNORE_INDEX
    upstream = torch.randn(n, generator=g)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = ops.logprobs_from_hidden(*leaves[:2], targets, leaves[2], softcap=15.0, temperature=1.3, chunk_bytes=4 * v * 5)
    (out * upstream).sum().backward()
    ref = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    z = (ref[0] @ ref[1].T + ref[2]) / 1.3
    (float64_logprobs(15.0 * torch.tanh(z / 15.0), targets) * upstream.double()).sum().backward()
    for name, a, e in zip(("hidden", "weight", "bias"), leaves, ref):
        err = (a.grad.double() - e.grad).abs().max().item()
        print(f"{backend} d{name}: max abs error {err:.3g} (max {e.grad.abs().max().item():.3g})")
        assert err <= 1e-5 * e.grad.abs().max().item() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend, tile_cols, v", [(b, None, 4099) for b in BACKENDS] +  # triton: interpreted, slow
                         [(b, 100, 1031) for b in ("cpp", "torch")])
def test_logprobs_from_hidden_in_vocabulary_tiles(backend, dtype, tile_cols, v, monkeypatch):
    """The CPU head's vocabulary tiles (ops/head.py): the default width on a vocabulary of two full
    tiles and a ragged one, and narrow tiles (11, the last of 31 columns) with several blocks of
    rows; targets in every tile, ignored rows, bias, softcap and temperature; log-probs and the
    gradients for an arbitrary upstream gradient against float64 autograd through the full logits."""
    from prefrank.ops import head
    if tile_cols is not None:
        monkeypatch.setattr(head, "TILE_COLS", tile_cols)
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    g = torch.Generator().manual_seed(4)
    n, d = 300, 24
    hidden, weight, bias = (torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / 2,
                            torch.randn(v, generator=g))
    targets = torch.randint(0, v, (n,), generator=g)
    every = torch.arange(0, v, 97)
    targets[:len(every)] = every  # a target in every tile
    targets[5::7] = IGNORE_INDEX
    upstream = torch.randn(n, generator=g)
    leaves = [x.to(dtype).requires_grad_() for x in (hidden, weight, bias)]
    chunk_bytes = 4 * 128 * (100 + 2 * d) if tile_cols else None  # 128 rows a block: 3 blocks
    assert head.Head(weight, bias, chunk_bytes=chunk_bytes).cols == min(v, head.TILE_COLS)
    out = ops.logprobs_from_hidden(*leaves[:2], targets, leaves[2], softcap=20.0, temperature=1.3,
                                   chunk_bytes=chunk_bytes)
    (out * upstream).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in leaves]
    z = (ref[0] @ ref[1].T + ref[2]) / 1.3
    expected = float64_logprobs(20.0 * torch.tanh(z / 20.0), targets)
    (expected * upstream.double()).sum().backward()
    # bf16: the logits are rounded to bf16 (as the model's own are) before the fp32 math
    check(f"{backend} {dtype} tiles of {tile_cols}", out, expected.detach(), 1e-5 if dtype == torch.float32 else 2**-7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, e in zip(("hidden", "weight", "bias"), leaves, ref):
        err = (a.grad.double() - e.grad).abs().max().item()
        print(f"{backend} {dtype} d{name}: max abs error {err:.3g} (max {e.grad.abs().max().item():.3g})")
        assert a.grad.dtype == dtype and err <= tol * e.grad.abs().max().item()


def test_logprobs_from_hidden_gradcheck_float64_in_tiles(monkeypatch):
    """float64 gradcheck through tiles of 4 columns (the last of 3) and blocks of 1 row."""
    from prefrank.ops import head
    monkeypatch.setattr(head, "TILE_COLS", 4)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([1, IGNORE_INDEX, 10, 7])
    assert torch.autograd.gradcheck(
        lambda h, w, b: ops.logprobs_from_hidden(h, w, targets, b, softcap=4.0, temperature=0.9, chunk_bytes=100),
        (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logprobs_and_segment_sums(backend, dtype, monkeypatch):
    """Per-sequence sums and counts (paired: 2i chosen, 2i + 1 rejected), with an empty sequence,
    a sequence of ignored rows only, and a one-row sequence, against float64 brute force."""
    monkeypatch.setenv("PREFRANK_BACKEND", backend)
    logits, targets = case(23, 1037, dtype)
    lengths = [5, 0, 3, 1, 6, 8]
    cu = torch.tensor([0] + lengths).cumsum(0)
    targets[8:9] = IGNORE_INDEX  # the one-row sequence 3 is all ignored
    ref = float64_logprobs(logits, targets)
    expected_sums = torch.stack([ref[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    expected_counts = torch.tensor([(targets[a:b] != IGNORE_INDEX).sum().item() for a, b in zip(cu[:-1], cu[1:])])
    sums, counts = ops.sequence_logprobs(logits, targets, cu)
    err = (sums - expected_sums).abs().max().item()
    print(f"{backend} {dtype} sequence sums: max abs error {err:.3g}")
    assert sums.dtype == torch.float64 and err <= 1e-5 * expected_sums.abs().max().item()
    assert torch.equal(counts, expected_counts) and sums[1] == 0 and sums[3] == 0
    values = torch.randn(23, dtype=torch.float64)
    got = ops.segment_sums(values, cu)
    assert torch.allclose(got, torch.stack([values[a:b].sum() for a, b in zip(cu[:-1], cu[1:])]), atol=1e-12)


def test_sum_by_sequence_with_rows_in_any_order():
    """Sums by sequence id, the rows of a sequence scattered (the fused DPO loss's packed layouts), with
    a sequence that has no row, against a float64 loop."""
    from prefrank.ops.torch_backend import sum_by_sequence
    g = torch.Generator().manual_seed(3)
    values = torch.randn(41, generator=g, dtype=torch.float64) * 4
    ids = torch.randint(0, 7, (41,), generator=g)
    ids[ids == 5] = 6  # sequence 5 has no row
    expected = torch.tensor([sum(float(v) for v, i in zip(values, ids) if i == s) for s in range(7)],
                            dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = sum_by_sequence(values.to(dtype), ids, 7)
        err = (got.double() - expected).abs().max().item()
        print(f"sum_by_sequence {dtype}: max abs error {err:.3g}")
        assert got.dtype == dtype and got[5] == 0 and err <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_cpp_sequence_logprobs_threads_agree():
    logits, targets = case(200, 3001, torch.float32)
    cu = torch.arange(0, 201, 8)
    one = ops.sequence_logprobs(logits, targets, cu, num_threads=1)
    two = ops.sequence_logprobs(logits, targets, cu, num_threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels():
    """Python run from the repository root (`python -m pytest`) has the folder kernels/ on sys.path
    as a top-level package, where it shadowed Hugging Face's `kernels`, which transformers (>= 5.25)
    imports: every model import failed ("cannot import name 'CUDAProperties' from 'kernels'")."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = ("import transformers.models.llama.modeling_llama, prefrank.kernels.segment_sums as s; print(s.__file__)\n"
            "try:\n    import kernels; print(kernels.__file__)\nexcept ModuleNotFoundError:\n    print('none')")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.split()
    print(ours, theirs)
    assert Path(ours).parent == root / "kernels"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert theirs == "none"
    else:
        assert Path(theirs).parent != root / "kernels" and Path(theirs).name == "__init__.py"
