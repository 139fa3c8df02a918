"""prefrank's ops as torch.library custom ops in the `prefrank` namespace (torch.ops.prefrank.*):
what torch.compile traces as one opaque node each (no graph break), torch.library.opcheck tests,
and autograd differentiates through a registered backward that is an op too.

  logprobs_from_logits(logits, targets, ignore_index, backend, num_threads) -> (logp, lse)
  logprobs_from_hidden(hidden, weight, bias, targets, softcap, temperature, ignore_index,
                       chunk_bytes, backend) -> (logp, lse)
  segment_sums(values, cu_seqlens, backend) -> sums
  sequence_logprobs(logits, targets, cu_seqlens, ignore_index, backend, num_threads) -> (sums, counts)
  (+ *_backward ops; the fused DPO loss's pair lives with the loss, prefrank/dpo/loss.py)

Each op's eager implementation checks its data (targets in range) and runs the backend named by
its `backend` argument (backends.py, resolved by the public API in __init__.py); its fake
implementation gives output shapes from input shapes and arguments only, so the compiled graph has
no data-dependent branch. lse is returned so that the backward needs no second forward pass.
"""
import torch
from torch import Tensor

from prefrank.ops import backends, head
from prefrank.ops.torch_backend import upcast


def _acc(t: Tensor) -> torch.dtype:
    """The ops' result dtype: fp32 for half and fp32 inputs, float64 for float64."""
    return upcast(t[:0]).dtype


def check_targets(targets: Tensor, vocab: int, ignore_index: int):
    """The targets' contract: ids in [0, vocab) or ignore_index, else IndexError (one device sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        raise IndexError(f"targets: {int(bad.sum())} target ids outside [0, {vocab}) that are not "
                         f"ignore_index={ignore_index}")


def grad_outputs(grads, hidden, weight) -> tuple:
    """[d hidden, d weight, d bias] as op outputs: an empty tensor for each one not computed (ops
    return no None)."""
    return tuple(g if g is not None else x.new_empty(0) for g, x in zip(grads, (hidden, weight, hidden)))


def grad_fakes(needs, hidden, weight, bias) -> tuple:
    """grad_outputs' fakes: each gradient shaped like its input where needed, else empty."""
    like = (hidden, weight, bias if bias is not None else hidden)
    return tuple(torch.empty_like(x) if need else hidden.new_empty(0) for need, x in zip(needs, like))


# ---------------------------------------------------------------- logprobs_from_logits

@torch.library.custom_op("prefrank::logprobs_from_logits", mutates_args=())
def logprobs_from_logits(logits: Tensor, targets: Tensor, ignore_index: int, backend: str,
                         num_threads: int) -> tuple[Tensor, Tensor]:
    """(logp [N], lse [N]) of logits [N, V] at targets [N] int64; fp32 (float64 for float64)."""
    check_targets(targets, logits.shape[1], ignore_index)
    logp, lse = backends.logprobs_and_lse(backend, logits, targets, ignore_index, num_threads)
    return logp.to(_acc(logits)), lse.to(_acc(logits))


@logprobs_from_logits.register_fake
def _(logits, targets, ignore_index, backend, num_threads):
    out = logits.new_empty(logits.shape[0], dtype=_acc(logits))
    return out, torch.empty_like(out)


@torch.library.custom_op("prefrank::logprobs_from_logits_backward", mutates_args=())
def logprobs_from_logits_backward(grad_logp: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, ignore_index: int,
                                  backend: str) -> Tensor:
    """d logits [N, V] (logits' dtype) for upstream gradients grad_logp [N]."""
    d = backends.logprobs_backward_(backend, logits.clone(), targets, lse, grad_logp.to(lse.dtype), ignore_index)
    return d.to(logits.dtype)


@logprobs_from_logits_backward.register_fake
def _(grad_logp, logits, targets, lse, ignore_index, backend):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, targets, ignore_index, backend, _ = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _logits_backward(ctx, grad_logp, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    with torch.no_grad():  # first derivatives only: the backward ops have no backward
        grad = torch.ops.prefrank.logprobs_from_logits_backward(grad_logp, logits, targets, lse, ctx.ignore_index,
                                                                ctx.backend)
    return grad, None, None, None, None


logprobs_from_logits.register_autograd(_logits_backward, setup_context=_logits_setup)


# ---------------------------------------------------------------- logprobs_from_hidden

@torch.library.custom_op("prefrank::logprobs_from_hidden", mutates_args=())
def logprobs_from_hidden(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                         temperature: float, ignore_index: int, chunk_bytes: int | None,
                         backend: str) -> tuple[Tensor, Tensor]:
    """(logp [N], lse [N]) of targets [N] under the chunked head on hidden [N, d], weight [V, d]."""
    check_targets(targets, weight.shape[0], ignore_index)
    return head.forward(hidden, weight, bias, targets, head.Head(weight, bias, softcap, temperature, backend,
                                                                 chunk_bytes), ignore_index)


@logprobs_from_hidden.register_fake
def _(hidden, weight, bias, targets, softcap, temperature, ignore_index, chunk_bytes, backend):
    out = hidden.new_empty(hidden.shape[0], dtype=_acc(hidden))
    return out, torch.empty_like(out)


@torch.library.custom_op("prefrank::logprobs_from_hidden_backward", mutates_args=())
def logprobs_from_hidden_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                  targets: Tensor, lse: Tensor, softcap: float | None, temperature: float,
                                  ignore_index: int, chunk_bytes: int | None, backend: str, need_hidden: bool,
                                  need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) in the inputs' dtypes; an empty tensor for each one not needed."""
    h = head.Head(weight, bias, softcap, temperature, backend, chunk_bytes)
    grads = head.backward(grad_logp, hidden, targets, lse, h, ignore_index, need_hidden, need_weight, need_bias)
    return grad_outputs(grads, hidden, weight)


@logprobs_from_hidden_backward.register_fake
def _(grad_logp, hidden, weight, bias, targets, lse, softcap, temperature, ignore_index, chunk_bytes, backend,
      need_hidden, need_weight, need_bias):
    return grad_fakes((need_hidden, need_weight, need_bias), hidden, weight, bias)


def _hidden_setup(ctx, inputs, output):
    hidden, weight, bias, targets, *ctx.args = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])


def _hidden_backward(ctx, grad_logp, _grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    with torch.no_grad():  # first derivatives only
        grads = torch.ops.prefrank.logprobs_from_hidden_backward(grad_logp, hidden, weight, bias, targets, lse,
                                                                 *ctx.args, *ctx.needs)
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), None, None, None, None, None, None)


logprobs_from_hidden.register_autograd(_hidden_backward, setup_context=_hidden_setup)


# ---------------------------------------------------------------- segment_sums

@torch.library.custom_op("prefrank::segment_sums", mutates_args=())
def segment_sums(values: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
    """[S] float64 sums of values [N] over the sequences cu_seqlens [S + 1] int64 delimits."""
    return backends.segment_sums(backend, values, cu_seqlens)


@segment_sums.register_fake
def _(values, cu_seqlens, backend):
    return values.new_empty(cu_seqlens.shape[0] - 1, dtype=torch.float64)


@torch.library.custom_op("prefrank::segment_sums_backward", mutates_args=())
def segment_sums_backward(grad_sums: Tensor, cu_seqlens: Tensor, values: Tensor) -> Tensor:
    """d values [N] (values' dtype): each row gets its sequence's upstream gradient (0 past the last)."""
    rows = torch.arange(values.shape[0], device=values.device)
    seq = torch.searchsorted(cu_seqlens[1:], rows, right=True)
    return torch.cat([grad_sums, grad_sums.new_zeros(1)])[seq].to(values.dtype)


@segment_sums_backward.register_fake
def _(grad_sums, cu_seqlens, values):
    return torch.empty_like(values)


def _sums_setup(ctx, inputs, output):
    values, cu_seqlens, _ = inputs
    ctx.save_for_backward(cu_seqlens, values)


def _sums_backward(ctx, grad_sums):
    cu_seqlens, values = ctx.saved_tensors
    with torch.no_grad():  # first derivatives only
        return torch.ops.prefrank.segment_sums_backward(grad_sums, cu_seqlens, values), None, None


segment_sums.register_autograd(_sums_backward, setup_context=_sums_setup)


# ---------------------------------------------------------------- sequence_logprobs

@torch.library.custom_op("prefrank::sequence_logprobs", mutates_args=())
def sequence_logprobs(logits: Tensor, targets: Tensor, cu_seqlens: Tensor, ignore_index: int, backend: str,
                      num_threads: int) -> tuple[Tensor, Tensor]:
    """(sums [S] float64, counts [S] int64) of the log-probs per sequence; not differentiable (scoring)."""
    check_targets(targets, logits.shape[1], ignore_index)
    if backend == "cpp":
        return backends.cpp_sequence_logprobs(logits, targets, cu_seqlens, ignore_index, num_threads)
    counts = backends.segment_sums(backend, (targets != ignore_index).double(), cu_seqlens).round().long()
    logp, _ = backends.logprobs_and_lse(backend, logits, targets, ignore_index, num_threads)
    return backends.segment_sums(backend, logp, cu_seqlens), counts


@sequence_logprobs.register_fake
def _(logits, targets, cu_seqlens, ignore_index, backend, num_threads):
    sums = logits.new_empty(cu_seqlens.shape[0] - 1, dtype=torch.float64)
    return sums, torch.empty_like(sums, dtype=torch.int64)
