"""prefrank's log-prob ops, dispatched to the fastest backend for the tensors at hand.

Backends: `triton` (kernels/, CUDA tensors, differentiable; on CPU tensors only through
TRITON_INTERPRET=1, for tests), `cpp` (the OpenMP extension built from csrc/, CPU tensors, no
autograd) and `torch` (prefrank/reference.py, any device, differentiable).
`PREFRANK_BACKEND=triton|cpp|torch` forces one backend.
"""
import functools
import os
import types

import torch

from prefrank import reference
from prefrank.head import Head, LogprobsFromHidden
from prefrank.reference import IGNORE_INDEX

try:
    from prefrank import _cpu_ops
except ImportError:  # a source checkout that was never built: the torch backend still works
    _cpu_ops = None

_CPP_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
BACKENDS = ("triton", "cpp", "torch")


@functools.cache
def _triton_kernels():
    """The Triton kernel modules as one namespace, or None where Triton is missing."""
    try:
        from prefrank.kernels import logprobs_from_logits, segment_sums
    except ImportError:
        return None
    return types.SimpleNamespace(**vars(logprobs_from_logits), **{"segment_sums": segment_sums.segment_sums})


def _backend(t: torch.Tensor, chunked: bool = False) -> str:
    """The backend for `t`. `chunked`: the op runs on detached chunks of scores inside an autograd
    Function, so the C++ forward serves tensors that need gradients too."""
    forced = os.environ.get("PREFRANK_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"PREFRANK_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "cpp" and _cpu_ops is None:
            raise RuntimeError("PREFRANK_BACKEND=cpp but the C++ extension prefrank._cpu_ops is not built")
        if forced == "triton" and _triton_kernels() is None:
            raise RuntimeError("PREFRANK_BACKEND=triton but triton is not installed")
        return forced
    if t.device.type == "cuda" and t.dtype != torch.float64 and _triton_kernels() is not None:
        return "triton"
    needs_grad = torch.is_grad_enabled() and t.requires_grad and not chunked
    if t.device.type == "cpu" and _cpu_ops is not None and not needs_grad and t.dtype in _CPP_DTYPES:
        return "cpp"
    return "torch"


def _cpp_logprobs_from_logits(logits, targets, ignore_index=IGNORE_INDEX, num_threads=0):
    if logits.dtype not in _CPP_DTYPES or logits.device.type != "cpu":
        raise TypeError(f"the cpp backend takes CPU floating-point logits, not {logits.dtype} on {logits.device}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.to(torch.int64).contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    bad = _cpu_ops.logprobs_from_logits(
        logits.data_ptr(), _CPP_DTYPES[logits.dtype], logits.shape[0], logits.shape[1], logits.stride(0),
        targets.data_ptr(), out.data_ptr(), ignore_index, num_threads)
    if bad:
        raise IndexError(f"{bad} target ids outside [0, {logits.shape[1]}) and not ignore_index={ignore_index}")
    return out


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         *, num_threads: int = 0) -> torch.Tensor:
    """log softmax(logits)[i, targets[i]] per row, 0 for ignored rows.

    logits: [N, V] float32/bfloat16/float16; targets: [N] int64. Returns [N] float32.
    num_threads: C++ backend only (0 = OpenMP's default).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    backend = _backend(logits)
    if backend == "triton":
        return _triton_kernels().logprobs_from_logits(logits, targets, ignore_index)
    if backend == "cpp":
        return _cpp_logprobs_from_logits(logits, targets, ignore_index, num_threads)
    return reference.logprobs_from_logits(logits, targets, ignore_index)


def logprobs_from_hidden(hidden, weight, targets, bias=None, *, softcap=None, temperature=1.0,
                         ignore_index=IGNORE_INDEX, chunk_bytes: int | None = None):
    """Log-probs of `targets` under the output head applied to `hidden`, without the full logits;
    differentiable w.r.t. hidden, weight and bias (the backward recomputes chunk by chunk).

    hidden: [N, d]; weight: [V, d]; bias: [V] or None; targets: [N] int64 (ignore_index rows give 0
    and cost nothing). Head: z = (hidden @ weight.T + bias) / temperature, then
    softcap * tanh(z / softcap) if softcap. Returns [N] float32 (float64 for float64 inputs).
    chunk_bytes: memory for one chunk of scores (None: 256 MiB on GPU, 64 MiB on CPU).
    """
    backend = _backend(hidden, chunked=True)
    head = Head(weight, bias, softcap, temperature, backend, chunk_bytes)
    return LogprobsFromHidden.apply(hidden, weight, bias, targets, head, ignore_index)


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[S] float64 sums of per-token `values` [N] over the sequences delimited by `cu_seqlens`
    [S + 1] (int64 offsets). Pairs: sequence 2i is pair i's chosen, 2i + 1 its rejected."""
    if _backend(values) == "triton":
        return _triton_kernels().segment_sums(values, cu_seqlens)
    lengths = torch.diff(cu_seqlens)
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    return reference.segment_sum(values.double(), ids, lengths.numel())


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, *, num_threads: int = 0):
    """(sums [S] float64, counts [S] int64): the log-probs of `targets` under `logits` [N, V]
    summed per sequence (rows cu_seqlens[s] .. cu_seqlens[s+1] - 1), ignored rows left out. On CPU
    one fused pass (the per-token log-probs are never written); elsewhere the per-token op, then
    segment_sums. Not differentiable (scoring)."""
    cu_seqlens = cu_seqlens.to(torch.int64)
    if _backend(logits) == "cpp":
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        sums = torch.empty(cu_seqlens.numel() - 1, dtype=torch.float64)
        counts = torch.empty_like(sums, dtype=torch.int64)
        targets, cu_seqlens = targets.to(torch.int64).contiguous(), cu_seqlens.contiguous()
        bad = _cpu_ops.sequence_logprobs(logits.data_ptr(), _CPP_DTYPES[logits.dtype], logits.shape[1],
                                         logits.stride(0), targets.data_ptr(), cu_seqlens.data_ptr(), sums.numel(),
                                         sums.data_ptr(), counts.data_ptr(), ignore_index, num_threads)
        if bad:
            raise IndexError(f"{bad} target ids outside [0, {logits.shape[1]}) and not ignore_index={ignore_index}")
        return sums, counts
    counts = segment_sums((targets != ignore_index).double(), cu_seqlens).round().long()
    return segment_sums(logprobs_from_logits(logits, targets, ignore_index), cu_seqlens), counts
