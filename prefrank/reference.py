"""Plain-torch versions of prefrank's ops: the fallback backend and the readable definition.

Every fused kernel (Triton in `kernels/`, C++ in `csrc/`) computes what these functions compute;
tests compare all of them against float64 torch written out in the tests themselves.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half and fp32 inputs; float64 stays float64 (gradcheck, references)."""
    return x if x.dtype == torch.float64 else x.float()


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log softmax(logits)[i, targets[i]] for each row; 0 where targets[i] == ignore_index.

    logits: [N, V] float32/bfloat16/float16 (or float64); targets: [N] int64.
    Returns [N] float32 (float64 for float64 logits).
    """
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logits = upcast(logits)
    picked = logits.gather(1, safe_targets[:, None]).squeeze(1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(keep, logp, 0.0)


def head_logits(hidden, weight, bias=None, softcap=None, temperature=1.0):
    """The output head as causal LMs apply it: (hidden @ weight.T + bias) / temperature,
    then softcap * tanh(z / softcap) when the architecture soft-caps its logits. fp32 out
    (float64 for float64 inputs)."""
    logits = upcast(F.linear(hidden, weight, bias))
    if temperature != 1.0:
        logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def rows_per_chunk(vocab_size: int, budget_bytes: int = 256 << 20) -> int:
    """How many rows of fp32 logits fit in `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // (4 * max(vocab_size, 1)))


def logprobs_from_hidden(hidden, weight, targets, bias=None, *, softcap=None, temperature=1.0,
                         ignore_index=IGNORE_INDEX, gather=logprobs_from_logits):
    """Log-probs of `targets` under the head applied to `hidden`, never holding more than a
    chunk of rows' logits. Ignored rows are dropped before the matmul and give 0.

    hidden: [N, d]; weight: [V, d] (same dtype); bias: [V] or None; targets: [N] int64.
    `gather(logits[n, V] fp32, targets[n])` turns one chunk of logits into log-probs (the torch
    version here, or a fused CPU one). Returns [N] float32 (float64 for float64 inputs);
    differentiable with the torch gather.
    """
    out = torch.zeros(targets.shape[0], dtype=upcast(hidden[:0]).dtype, device=hidden.device)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    step = rows_per_chunk(weight.shape[0])
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        logits = head_logits(hidden[idx], weight, bias, softcap, temperature)
        out = out.index_put((idx,), gather(logits, targets[idx]))
    return out


def sequence_sums(token_logps: torch.Tensor, segment_ids: torch.Tensor, num_segments: int):
    """Per-sequence sums (float64) and token counts (int64) of per-token log-probs.

    token_logps: [N] float; segment_ids: [N] int64 in [0, num_segments).
    """
    sums = torch.zeros(num_segments, dtype=torch.float64, device=token_logps.device)
    sums.index_add_(0, segment_ids, token_logps.double())
    counts = torch.bincount(segment_ids, minlength=num_segments)
    return sums, counts
