"""The backends of the log-prob ops and the choice among them: the only module that reaches the
Triton kernels (`kernels/`, installed as prefrank.kernels) and the C++ extension (csrc/, built
as prefrank._cpu_ops).

  triton  CUDA tensors, differentiable (on CPU tensors only through TRITON_INTERPRET=1, for tests)
  cpp     CPU tensors, forward only (OpenMP over rows, as many threads as torch's intra-op
          pool: torch.set_num_threads reaches it, per calling thread)
  torch   any device, differentiable (torch_backend.py, the definition)

A call's `backend=` argument forces one, and `PREFRANK_BACKEND=triton|cpp|torch` is its default;
forcing one that cannot run is an error, and a C++ extension that fails to import is reported once
before the torch backend takes its place. Every launcher here takes targets already checked to be
in range (the registered ops check them, registered.py).
"""
import functools
import os
import types
import warnings

import torch

from prefrank.ops.torch_backend import IGNORE_INDEX, sum_by_sequence, upcast
from prefrank.ops.torch_backend import logprobs_backward_ as torch_logprobs_backward_
from prefrank.ops.torch_backend import logprobs_from_logits as torch_logprobs_from_logits

BACKENDS = ("triton", "cpp", "torch")

try:
    from prefrank import _cpu_ops
    _CPP_IMPORT_ERROR = None
    # the extension's own dtype codes (csrc/cpu_ops.cpp), by torch dtype
    _CPP_DTYPES = {getattr(torch, name): code for name, code in _cpu_ops.DTYPES.items()}
except ImportError as e:  # a source checkout that was never built, or a broken build
    _cpu_ops, _CPP_IMPORT_ERROR, _CPP_DTYPES = None, e, {}


@functools.cache
def _triton_kernels():
    """The Triton kernel modules as one namespace, or None where Triton is missing."""
    try:
        from prefrank.kernels import logprobs_from_logits, segment_sums
    except ImportError:
        return None
    return types.SimpleNamespace(**vars(logprobs_from_logits), **{"segment_sums": segment_sums.segment_sums})


@functools.cache
def _warn_no_cpp():
    warnings.warn(f"prefrank's C++ extension (prefrank._cpu_ops) did not import ({_CPP_IMPORT_ERROR}): the CPU ops "
                  f"run on the slower torch backend. Rebuild it with `pip install -e .`, or set PREFRANK_BACKEND=torch "
                  f"to silence this.", RuntimeWarning, stacklevel=3)


def choose(t: torch.Tensor, backend: str | None = None) -> str:
    """The backend for `t`: `backend` if given, else $PREFRANK_BACKEND if set, else the fastest
    for t's device and dtype. Every backend is differentiable (the backward of the C++ forward is
    the torch formula)."""
    forced, name = (backend, "backend") if backend is not None else (os.environ.get("PREFRANK_BACKEND"),
                                                                     "PREFRANK_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{name}={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "cpp" and _cpu_ops is None:
            raise RuntimeError(f"{name}=cpp, but the C++ extension prefrank._cpu_ops did not import: "
                               f"{_CPP_IMPORT_ERROR}")
        if forced == "triton" and _triton_kernels() is None:
            raise RuntimeError(f"{name}=triton but triton is not installed")
        if forced == "triton" and t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{name}=triton runs on CUDA tensors (on CPU tensors only under TRITON_INTERPRET=1, "
                             f"Triton's interpreter); these are on {t.device}: use cpp or torch")
        return forced
    if t.device.type == "cuda" and t.dtype != torch.float64 and _triton_kernels() is not None:
        return "triton"
    if t.device.type == "cpu":
        if _cpu_ops is None:
            _warn_no_cpp()
        elif t.dtype in _CPP_DTYPES:
            return "cpp"
    return "torch"


# ---------------------------------------------------------------- launchers

def _cpp_logprobs(logits, targets, ignore_index, num_threads):
    """(logp [N], lse [N]) from the C++ kernel: fp32, float64 for float64 logits."""
    if logits.dtype not in _CPP_DTYPES or logits.device.type != "cpu":
        raise TypeError(f"the cpp backend takes CPU floating-point logits, not {logits.dtype} on {logits.device}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.to(torch.int64).contiguous()
    logp = torch.empty(logits.shape[0], dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    lse = torch.empty_like(logp)
    bad = _cpu_ops.logprobs_from_logits(
        logits.data_ptr(), _CPP_DTYPES[logits.dtype], logits.shape[0], logits.shape[1], logits.stride(0),
        targets.data_ptr(), logp.data_ptr(), lse.data_ptr(), ignore_index, num_threads or torch.get_num_threads())
    if bad:  # the extension skips such rows (no stray reads); the public API refuses them before
        raise RuntimeError(f"internal error: {bad} out-of-range targets reached the C++ backend unchecked")
    return logp, lse


def logprobs_and_lse(backend: str, logits, targets, ignore_index: int, num_threads: int = 0):
    """(logp [N], lse [N]) of `logits` [N, V] at `targets` on `backend`: fp32 (float64 for float64
    logits on cpp and torch); 0 in both for ignored rows. `logits` is left intact."""
    if backend == "triton":
        logp, lse = _triton_kernels().logprobs_from_logits_forward(logits, targets, ignore_index)
        return logp.to(upcast(logits[:0]).dtype), lse.to(upcast(logits[:0]).dtype)
    if backend == "cpp":
        return _cpp_logprobs(logits, targets, ignore_index, num_threads)
    logp = torch_logprobs_from_logits(logits, targets, ignore_index)
    return logp, torch.where(targets != ignore_index, torch.logsumexp(upcast(logits), -1), 0.0)


def logprobs_backward_(backend: str, logits, targets, lse, g, ignore_index: int | None, target_g=None):
    """d logits for per-row gradients g [N], written over `logits` [N, V] where they are fp32 (or
    half on Triton) and returned; ignored rows get 0. ignore_index None: no row is ignored (the
    head's chunks), which spares the torch formula a masking pass. target_g (with ignore_index
    None only): the one-hot term's own per-row weight (torch_backend.logprobs_backward_), which the
    torch formula serves on every backend. The C++ extension has no backward: the torch formula
    serves it."""
    if backend == "triton" and target_g is None:
        return _triton_kernels().logprobs_from_logits_backward(
            logits, targets, lse, g, IGNORE_INDEX if ignore_index is None else ignore_index, inplace=True)
    if ignore_index is None:
        return torch_logprobs_backward_(upcast(logits), targets, lse, g, target_g)
    keep = targets != ignore_index
    d = torch_logprobs_backward_(upcast(logits), torch.where(keep, targets, 0), lse, torch.where(keep, g, 0.0))
    return d.masked_fill_(~keep[:, None], 0.0)


def segment_sums(backend: str, values, cu_seqlens):
    """[S] float64 sums of `values` over the sequences `cu_seqlens` delimits."""
    if backend == "triton":
        return _triton_kernels().segment_sums(values, cu_seqlens)
    lengths = torch.diff(cu_seqlens)
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    return sum_by_sequence(values.double(), ids, lengths.numel())


def cpp_sequence_logprobs(logits, targets, cu_seqlens, ignore_index: int, num_threads: int):
    """(sums [S] float64, counts [S] int64) in one fused C++ pass: no per-token array."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    sums = torch.empty(cu_seqlens.numel() - 1, dtype=torch.float64)
    counts = torch.empty_like(sums, dtype=torch.int64)
    targets, cu_seqlens = targets.to(torch.int64).contiguous(), cu_seqlens.contiguous()
    bad = _cpu_ops.sequence_logprobs(logits.data_ptr(), _CPP_DTYPES[logits.dtype], logits.shape[1], logits.stride(0),
                                     targets.data_ptr(), cu_seqlens.data_ptr(), sums.numel(), sums.data_ptr(),
                                     counts.data_ptr(), ignore_index, num_threads or torch.get_num_threads())
    if bad:
        raise RuntimeError(f"internal error: {bad} out-of-range targets reached the C++ backend unchecked")
    return sums, counts
