"""prefrank's log-prob ops, dispatched to the fastest backend for the tensors at hand.

One room, read top-down: this module is the public API (argument checks, the backend choice);
head.py is the chunked output head (hidden states → log-probs without the full logits, and its
backward); backends.py chooses a backend and launches the Triton kernels (`kernels/`) and the C++
extension (`csrc/`); torch_backend.py is the plain-torch fallback and the definition every backend
computes. `PREFRANK_BACKEND=triton|cpp|torch` forces one backend.

Targets are token ids in [0, V) or `ignore_index` (scored as 0); any other id raises IndexError on
every backend, before anything is computed (on a GPU that check costs one device sync per call).
"""
import torch

from prefrank.ops import backends
from prefrank.ops.backends import BACKENDS
from prefrank.ops.head import Head, LogprobsFromHidden
from prefrank.ops.sharded import gather_head
from prefrank.ops.torch_backend import IGNORE_INDEX, sum_by_sequence

__all__ = ["BACKENDS", "IGNORE_INDEX", "Head", "check_targets", "head_for", "logprobs_from_hidden",
           "logprobs_from_logits", "segment_sums", "sequence_logprobs", "sum_by_sequence"]


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int = IGNORE_INDEX):
    """The targets' contract: ids in [0, vocab) or ignore_index, else IndexError."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        raise IndexError(f"{int(bad.sum())} target ids outside [0, {vocab}) that are not ignore_index={ignore_index}")


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         *, num_threads: int = 0) -> torch.Tensor:
    """log softmax(logits)[i, targets[i]] per row, 0 for ignored rows.

    logits: [N, V] float32/bfloat16/float16; targets: [N] int64. Returns [N] float32.
    Differentiable w.r.t. logits on the Triton and torch backends. num_threads: C++ backend only
    (0 = OpenMP's default).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    check_targets(targets, logits.shape[1], ignore_index)
    return backends.logprobs_from_logits(backends.choose(logits), logits, targets, ignore_index, num_threads)


def head_for(hidden, weight, bias=None, *, softcap=None, temperature=1.0, chunk_bytes: int | None = None) -> Head:
    """The chunked output head for `hidden` [N, d] and `weight` [V, d], on the backend for them
    (the fused DPO loss drives it directly)."""
    return Head(weight, bias, softcap, temperature, backends.choose(hidden, chunked=True), chunk_bytes)


def logprobs_from_hidden(hidden, weight, targets, bias=None, *, softcap=None, temperature=1.0,
                         ignore_index=IGNORE_INDEX, chunk_bytes: int | None = None):
    """Log-probs of `targets` under the output head applied to `hidden`, without the full logits;
    differentiable w.r.t. hidden, weight and bias (the backward recomputes chunk by chunk).

    hidden: [N, d]; weight: [V, d]; bias: [V] or None; targets: [N] int64 (ignore_index rows give 0
    and cost nothing). Head: z = (hidden @ weight.T + bias) / temperature, then
    softcap * tanh(z / softcap) if softcap. Returns [N] float32 (float64 for float64 inputs).
    chunk_bytes: memory for one chunk of scores (None: 256 MiB on GPU, 64 MiB on CPU). A DTensor
    weight or bias sharded Shard(0) on a 1-D mesh (FSDP2's) is gathered first (ops/sharded.py).
    """
    weight, bias = gather_head(weight=weight, bias=bias)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and targets [N]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    check_targets(targets, weight.shape[0], ignore_index)
    head = head_for(hidden, weight, bias, softcap=softcap, temperature=temperature, chunk_bytes=chunk_bytes)
    return LogprobsFromHidden.apply(hidden, weight, bias, targets, head, ignore_index)


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[S] float64 sums of per-token `values` [N] over the contiguous sequences delimited by
    `cu_seqlens` [S + 1] (int64 offsets). Pairs: sequence 2i is pair i's chosen, 2i + 1 its
    rejected. (sum_by_sequence sums rows by sequence id, contiguous or not.)"""
    return backends.segment_sums(backends.choose(values), values, cu_seqlens)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, *, num_threads: int = 0):
    """(sums [S] float64, counts [S] int64): the log-probs of `targets` under `logits` [N, V]
    summed per sequence (rows cu_seqlens[s] .. cu_seqlens[s+1] - 1), ignored rows left out. On CPU
    one fused pass (the per-token log-probs are never written); elsewhere the per-token op, then
    segment_sums. Not differentiable (scoring)."""
    check_targets(targets, logits.shape[1], ignore_index)
    cu_seqlens = cu_seqlens.to(torch.int64)
    if backends.choose(logits) == "cpp":
        return backends.cpp_sequence_logprobs(logits, targets, cu_seqlens, ignore_index, num_threads)
    counts = segment_sums((targets != ignore_index).double(), cu_seqlens).round().long()
    return segment_sums(logprobs_from_logits(logits, targets, ignore_index), cu_seqlens), counts
