"""prefrank's log-prob ops, dispatched to the fastest backend for the tensors at hand.

One room, read top-down: this module is the public API (argument checks, the backend choice);
registered.py registers each op with torch.library (torch.ops.prefrank.*: torch.compile traces
them without graph breaks, opcheck tests them); sharded.py and vocab_parallel.py take heads held
as DTensors (gathered; or split by vocabulary over a tensor-parallel group); head.py is the
chunked output head (hidden states → log-probs without the full logits, and its backward);
backends.py chooses a backend and launches the Triton kernels (`kernels/`) and the C++ extension
(`csrc/`); torch_backend.py is the plain-torch fallback and the definition every backend
computes. Every op takes `backend=`
("triton", "cpp" or "torch"; None: $PREFRANK_BACKEND if set, else the fastest for the tensors).

Targets are token ids in [0, V) or `ignore_index` (scored as 0); any other id raises IndexError on
every backend, before anything is computed (on a GPU that check costs one device sync per call).
The checks on data run inside the registered ops, so a compiled graph holds no data-dependent branch.
"""
import torch

from prefrank.ops import backends
from prefrank.ops.backends import BACKENDS
from prefrank.ops.head import Head
from prefrank.ops.registered import check_targets
from prefrank.ops.sharded import gather_head
from prefrank.ops.torch_backend import IGNORE_INDEX, sum_by_sequence
from prefrank.ops.vocab_parallel import logprobs_from_shard

__all__ = ["BACKENDS", "IGNORE_INDEX", "Head", "check_targets", "logprobs_from_hidden", "logprobs_from_logits",
           "segment_sums", "sequence_logprobs", "sum_by_sequence"]


def _check_shapes(name: str, x: torch.Tensor, targets: torch.Tensor):
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, not {x.dtype}")
    if x.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"{name} must be [N, {'V' if name == 'logits' else 'd'}] and targets [N]; "
                         f"got {tuple(x.shape)} and {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 token ids, not {targets.dtype}")


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         *, num_threads: int = 0, backend: str | None = None) -> torch.Tensor:
    """log softmax(logits)[i, targets[i]] per row, 0 for ignored rows.

    logits: [N, V] float32/bfloat16/float16/float64; targets: [N] int64. Returns [N] float32
    (float64 for float64 logits on the cpp and torch backends). Differentiable w.r.t. logits on
    every backend. num_threads: C++ backend only (0 = torch.get_num_threads()). backend: see the module.
    """
    _check_shapes("logits", logits, targets)
    return torch.ops.prefrank.logprobs_from_logits(logits, targets.long(), ignore_index,
                                                   backends.choose(logits, backend), num_threads)[0]


def logprobs_from_hidden(hidden, weight, targets, bias=None, *, softcap=None, temperature=1.0,
                         ignore_index=IGNORE_INDEX, chunk_bytes: int | None = None, backend: str | None = None,
                         vocab_parallel: bool = False):
    """Log-probs of `targets` under the output head applied to `hidden`, without the full logits;
    differentiable w.r.t. hidden, weight and bias (the backward recomputes chunk by chunk).

    hidden: [N, d] floating point; weight: [V, d]; bias: [V] or None; targets: [N] int64
    (ignore_index rows give 0 and cost nothing). Head: z = (hidden @ weight.T + bias) / temperature,
    then softcap * tanh(z / softcap) if softcap. Returns [N] float32 (float64 for float64 inputs).
    chunk_bytes: memory for one chunk of scores (None: 256 MiB on GPU, 64 MiB on CPU).
    backend: see the module. Works under torch.compile(fullgraph=True). A DTensor weight or bias
    sharded Shard(0) on a 1-D mesh (FSDP2's) is gathered first (ops/sharded.py). vocab_parallel:
    the weight and bias are such DTensors sharded over a tensor-parallel group whose ranks all hold
    the same hidden and targets; each rank computes only its vocabulary shard's logits, and the
    log-sum-exp and the target's logit are all-reduced (ops/vocab_parallel.py): no rank gathers
    the weight, and d weight stays sharded.
    """
    if not vocab_parallel:
        weight, bias = gather_head(weight=weight, bias=bias)
    _check_shapes("hidden", hidden, targets)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, d] with d = {hidden.shape[1]} (hidden's last dimension); "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    if vocab_parallel:
        return logprobs_from_shard(hidden, weight, targets.long(), bias, softcap, temperature, ignore_index,
                                   chunk_bytes, backends.choose(hidden, backend))
    return torch.ops.prefrank.logprobs_from_hidden(hidden, weight, bias, targets.long(), softcap, float(temperature),
                                                   ignore_index, chunk_bytes, backends.choose(hidden, backend))[0]


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """[S] float64 sums of per-token `values` [N] over the contiguous sequences delimited by
    `cu_seqlens` [S + 1] (int64 offsets); differentiable w.r.t. values. Pairs: sequence 2i is
    pair i's chosen, 2i + 1 its rejected. (sum_by_sequence sums rows by sequence id, contiguous or not.)"""
    return torch.ops.prefrank.segment_sums(values, cu_seqlens.long(), backends.choose(values, backend))


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, *, num_threads: int = 0, backend: str | None = None):
    """(sums [S] float64, counts [S] int64): the log-probs of `targets` under `logits` [N, V]
    summed per sequence (rows cu_seqlens[s] .. cu_seqlens[s+1] - 1), ignored rows left out. On CPU
    one fused pass (the per-token log-probs are never written); elsewhere the per-token op, then
    segment_sums. Not differentiable (scoring)."""
    _check_shapes("logits", logits, targets)
    return torch.ops.prefrank.sequence_logprobs(logits, targets.long(), cu_seqlens.long(), ignore_index,
                                                backends.choose(logits, backend), num_threads)
