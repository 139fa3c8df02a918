"""Per-token log-probs from logits, forward and backward, in Triton.

    logp[i] = logits[i, targets[i]] - logsumexp(logits[i, :])      (0 where targets[i] == ignore_index)

One program per row streams the row once with an online log-sum-exp (running max and rescaled
sum), in fp32 whatever the input dtype, and keeps the row's logsumexp for the backward pass:

    d logits[i, j] = g[i] * (1[j == targets[i]] - exp(logits[i, j] - lse[i]))

Shapes and dtypes: logits [N, V] float32 / bfloat16 / float16 with unit stride along V; targets [N]
int64 in [0, V) or ignore_index (prefrank.ops checks them before launching: an out-of-range
target would give NaN here); logp [N] float32; d logits [N, V] in the logits' dtype. Kernel
arguments are grouped as pointers, shapes, strides, constants. The plain torch definition is
prefrank.ops.torch_backend.logprobs_from_logits; prefrank.ops.backends is the only caller (behind the
registered ops prefrank::logprobs_from_logits and its backward, which give autograd the backward).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, lse_ptr,  # pointers
    V,  # shapes
    stride_row,  # strides
    ignore_index, BLOCK_V: tl.constexpr,  # constants
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_row
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # all -inf so far: nothing to rescale, and exp(-inf - -inf) must not become NaN
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    in_range = (target >= 0) & (target < V)
    picked = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
    tl.store(logp_ptr + row, tl.where(in_range, picked - lse, float("nan")))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, grad_logp_ptr, grad_logits_ptr,  # pointers
    V,  # shapes
    stride_logits_row, stride_grad_row,  # strides
    ignore_index, BLOCK_V: tl.constexpr,  # constants
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    g = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row).to(tl.float32))
    lse = tl.load(lse_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(logits_ptr + row * stride_logits_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        grad = tl.where(cols == target, g, 0.0) - g * tl.exp(x - lse)
        grad = tl.where(ignored, 0.0, grad)
        tl.store(grad_logits_ptr + row * stride_grad_row + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def logprobs_from_logits_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """(logp [N] fp32, lse [N] fp32)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _logprobs_fwd_kernel[(N,)](logits, targets.contiguous(), logp, lse, V, logits.stride(0), ignore_index,
                                   BLOCK_V=_block(V), num_warps=8 if V >= 8192 else 4)
    return logp, lse


def logprobs_from_logits_backward(logits, targets, lse, grad_logp, ignore_index: int, inplace: bool = False):
    """d logits [N, V] for per-row gradients grad_logp [N]; with `inplace`, written over `logits`
    (each element is read before it is overwritten, by the same program)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    grad_logits = logits if inplace else torch.empty_like(logits)
    if N:
        _logprobs_bwd_kernel[(N,)](logits, targets.contiguous(), lse, grad_logp.contiguous(), grad_logits, V,
                                   logits.stride(0), grad_logits.stride(0), ignore_index,
                                   BLOCK_V=_block(V), num_warps=8 if V >= 8192 else 4)
    return grad_logits
