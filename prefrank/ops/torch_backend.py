"""Plain-torch versions of prefrank's ops: the fallback backend and the readable definition.

Every fused kernel (Triton in `kernels/`, C++ in `csrc/`) computes what these functions compute;
tests compare all of them against float64 torch written out in the tests themselves.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target that is not scored: log-prob 0, no gradient


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half and fp32 inputs; float64 stays float64 (gradcheck, references)."""
    return x if x.dtype == torch.float64 else x.float()


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log softmax(logits)[i, targets[i]] for each row; 0 where targets[i] == ignore_index.

    logits: [N, V] float32/bfloat16/float16 (or float64); targets: [N] int64 in [0, V) or ignore_index.
    Returns [N] float32 (float64 for float64 logits).
    """
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logits = upcast(logits)
    picked = logits.gather(1, safe_targets[:, None]).squeeze(1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(keep, logp, 0.0)


def logprobs_backward_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                       target_g: torch.Tensor | None = None) -> torch.Tensor:
    """d logits = target_g · onehot(target) − g · softmax(logits) for per-row gradients g [n],
    written over `logits` [n, V] (targets all in range) and returned. target_g: g unless given; 0
    for a row whose target lies outside these columns (a vocabulary tile, ops/head.py, or another
    rank's shard, ops/vocab_parallel.py)."""
    d = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    d[torch.arange(len(targets), device=targets.device), targets] += g if target_g is None else target_g
    return d


def head_logits(hidden, weight, bias=None, softcap=None, temperature=1.0):
    """The output head as causal LMs apply it: (hidden @ weight.T + bias) / temperature,
    then softcap * tanh(z / softcap) when the architecture soft-caps its logits. fp32 out
    (float64 for float64 inputs)."""
    if hidden.dtype != weight.dtype:  # e.g. bf16 hidden states from an autocast forward, fp32 master weights
        hidden = hidden.to(weight.dtype)
    logits = upcast(F.linear(hidden, weight, bias))
    if temperature != 1.0:
        logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def sum_by_sequence(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[num_sequences] sums of `values` [N] by `sequence_ids` [N] (int64 in [0, num_sequences)), in
    values' dtype. The rows of a sequence need not be contiguous."""
    return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add_(0, sequence_ids, values)
