"""The output head split by vocabulary over a tensor-parallel group (logprobs_from_hidden with
vocab_parallel=True): each rank holds the rows offset .. offset + V_r - 1 of the weight [V, d] (a
DTensor sharded Shard(0) on a 1-D mesh, as transformers' tensor-parallel plans shard lm_head) and
the same hidden states [N, d] and targets [N] (replicated, as tensor parallelism leaves the
decoder's output). No rank holds V × d or [N, V]:

  forward   chunk by chunk (ops/head.py's Head, sized by the shard's V_r): the shard's logits,
            their log-sum-exp lse_r and the target's logit where the shard holds the target
            (0 elsewhere); then 3 all-reduces of [N] per call, none per chunk:
            m = MAX lse_r, s = SUM exp(lse_r - m), z_t = SUM of the target logits;
            lse = m + log s, logp = z_t - lse.
  backward  chunk by chunk, recomputed: d logits_r = g · (onehot_r - exp(logits_r - lse)) with
            the global lse (the shard's columns of the full softmax); d weight_r and d bias_r stay
            local; d hidden = SUM over ranks of d raw_r @ weight_r (one all-reduce of [N, d]), so
            every rank holds the whole gradient of its replicated hidden states.

Both steps are torch.library custom ops on the local tensors (prefrank::vocab_parallel_logprobs
and its _backward), the process group passed by name and resolved inside; `logprobs_from_shard` wraps them
for DTensors: weight.to_local() hands autograd's gradient of the shard back to the parameter as
a DTensor with the weight's placements.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from prefrank.ops import head
from prefrank.ops.registered import check_targets, grad_fakes, grad_outputs
from prefrank.ops.sharded import _dtensor_type
from prefrank.ops.torch_backend import upcast


def shard(name: str, t):
    """(local tensor, first global row, process group name) of `t`, a DTensor sharded Shard(0) on a
    1-D mesh; anything else raises ValueError naming the argument and the layout. torch's Shard(0)
    splits like torch.chunk: ceil(V / n) rows per rank, the last ranks fewer or none."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        raise ValueError(f"{name}: vocab_parallel=True needs a DTensor sharded Shard(0) on a 1-D mesh (the "
                         f"tensor-parallel lm_head's layout); got a plain {type(t).__name__} of shape {tuple(t.shape)}")
    from torch.distributed.tensor import Shard
    placements, mesh = tuple(t.placements), t.device_mesh
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(f"{name}: a DTensor with placements {placements} on a {mesh.ndim}-D mesh is not supported; "
                         f"vocab_parallel=True needs Shard(0) on a 1-D mesh (the tensor-parallel lm_head's layout)")
    vocab, ranks, rank = t.shape[0], mesh.size(), mesh.get_coordinate()[0]
    per_rank = -(-vocab // ranks)
    first = min(rank * per_rank, vocab)
    local = t.to_local()
    if local.shape[0] != min(vocab, first + per_rank) - first or local.shape[1:] != t.shape[1:]:
        raise ValueError(f"{name}: rank {rank} of {ranks} holds a shard of shape {tuple(local.shape)}; Shard(0) of "
                         f"{tuple(t.shape)} gives it rows {first} .. {min(vocab, first + per_rank) - 1}")
    return local, first, mesh.get_group().group_name


def logprobs_from_shard(hidden, weight, targets, bias, softcap, temperature, ignore_index: int, chunk_bytes, backend: str):
    """[N] log-probs of targets [N] under the vocabulary-parallel head (the module docstring);
    weight [V, d] and bias [V] (or None) DTensors sharded alike, hidden [N, d] and targets the
    same on every rank of their mesh. Differentiable w.r.t. hidden, weight and bias."""
    w, first, group = shard("weight", weight)
    b = None
    if bias is not None:
        b, bias_first, bias_group = shard("bias", bias)
        if (bias_first, b.shape[0], bias_group) != (first, w.shape[0], group):
            raise ValueError(f"bias: sharded over another group or rows than weight (rows {bias_first} .. "
                             f"{bias_first + b.shape[0] - 1}, weight's {first} .. {first + w.shape[0] - 1})")
    return torch.ops.prefrank.vocab_parallel_logprobs(hidden, w, b, targets, first, weight.shape[0], softcap,
                                                      float(temperature), ignore_index, chunk_bytes, backend,
                                                      group)[0]


def _whole_lse(lse, pg):
    """The log-sum-exp over the whole vocabulary [N] from each rank's over its shard (-inf for an
    empty shard): m = MAX lse_r, then m + log SUM exp(lse_r - m), two all-reduces."""
    top = lse.clone()
    dist.all_reduce(top, dist.ReduceOp.MAX, group=pg)
    mass = torch.exp(lse - top)
    dist.all_reduce(mass, dist.ReduceOp.SUM, group=pg)
    return top + torch.log(mass)


def shard_log_softmax(logits, group: str):
    """log softmax over the whole vocabulary of a shard's logits [N, V_r] (the same N rows on every
    rank of the group named `group`): the logits less the log-sum-exp all-reduced."""
    return logits - _whole_lse(torch.logsumexp(logits, -1), dist.distributed_c10d._resolve_process_group(group))[:, None]


@torch.library.custom_op("prefrank::vocab_parallel_logprobs", mutates_args=())
def vocab_parallel_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, first: int,
                            vocab: int, softcap: float | None, temperature: float, ignore_index: int,
                            chunk_bytes: int | None, backend: str, group: str) -> tuple[Tensor, Tensor]:
    """(logp [N], lse [N]) of targets [N] (global ids in [0, vocab)) under the whole head, from this
    rank's shard: weight [V_r, d] and bias [V_r] hold rows first .. first + V_r - 1; fp32 (float64
    for float64 hidden), 0 in both at ignored rows."""
    check_targets(targets, vocab, ignore_index)
    pg = dist.distributed_c10d._resolve_process_group(group)
    h = head.Head(weight, bias, softcap, temperature, backend, chunk_bytes)
    acc = upcast(hidden[:0]).dtype
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    lse = torch.zeros(targets.shape[0], dtype=acc, device=hidden.device)
    picked = torch.zeros_like(lse)
    local, held = head.local_targets(targets, first, weight.shape[0])
    if weight.shape[0] == 0:  # an empty shard (V < ranks · ceil(V / ranks)): no mass, no target
        lse[rows] = float("-inf")
    for start in range(0, rows.numel() if weight.shape[0] else 0, h.rows):
        idx = rows[start:start + h.rows]
        logits = h.logits(hidden[idx])
        _, chunk_lse = h.logprobs(logits, local[idx])
        lse[idx] = chunk_lse.to(acc)
        picked[idx] = torch.where(held[idx], upcast(logits.gather(1, local[idx, None]).squeeze(1)).to(acc), 0.0)
    dist.all_reduce(picked, dist.ReduceOp.SUM, group=pg)
    keep = targets != ignore_index
    lse = torch.where(keep, _whole_lse(lse, pg), 0.0)
    return torch.where(keep, picked - lse, 0.0), lse


@vocab_parallel_logprobs.register_fake
def _(hidden, weight, bias, targets, first, vocab, softcap, temperature, ignore_index, chunk_bytes, backend, group):
    out = hidden.new_empty(hidden.shape[0], dtype=upcast(hidden[:0]).dtype)
    return out, torch.empty_like(out)


@torch.library.custom_op("prefrank::vocab_parallel_logprobs_backward", mutates_args=())
def vocab_parallel_logprobs_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                     targets: Tensor, lse: Tensor, first: int, softcap: float | None,
                                     temperature: float, ignore_index: int, chunk_bytes: int | None, backend: str,
                                     group: str, need_hidden: bool, need_weight: bool,
                                     need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden [N, d], the whole gradient on every rank; d weight [V_r, d] and d bias [V_r] of
    this rank's shard) in the inputs' dtypes; an empty tensor for each one not needed. lse: the
    forward's global log-sum-exp."""
    h = head.Head(weight, bias, softcap, temperature, backend, chunk_bytes)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    local, held = head.local_targets(targets, first, weight.shape[0])
    grads = h.new_grads(hidden, need_hidden, need_weight, need_bias)
    for start in range(0, rows.numel() if weight.shape[0] else 0, h.rows):
        idx = rows[start:start + h.rows]
        x, g = hidden[idx], grad_logp[idx].to(lse.dtype)
        h.backward_(h.logits(x), local[idx], lse[idx], g, x, grads, idx, torch.where(held[idx], g, 0.0))
    grads = h.finish_grads(grads)
    if need_hidden:  # summed in fp32 (float64): a half-precision sum would round once more per rank
        total = upcast(grads[0])
        dist.all_reduce(total, dist.ReduceOp.SUM, group=dist.distributed_c10d._resolve_process_group(group))
        grads[0] = total.to(hidden.dtype)
    return grad_outputs(grads, hidden, weight)


@vocab_parallel_logprobs_backward.register_fake
def _(grad_logp, hidden, weight, bias, targets, lse, first, softcap, temperature, ignore_index, chunk_bytes, backend,
      group, need_hidden, need_weight, need_bias):
    return grad_fakes((need_hidden, need_weight, need_bias), hidden, weight, bias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, first, _, *rest = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.args = (first, *rest)
    ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])


def _backward(ctx, grad_logp, _grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    with torch.no_grad():  # first derivatives only
        grads = torch.ops.prefrank.vocab_parallel_logprobs_backward(grad_logp, hidden, weight, bias, targets, lse,
                                                                    *ctx.args, *ctx.needs)
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), *([None] * 9))


vocab_parallel_logprobs.register_autograd(_backward, setup_context=_setup)
