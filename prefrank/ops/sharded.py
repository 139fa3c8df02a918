"""Output-head weights held as DTensors (torch.distributed.tensor), as FSDP2 leaves them.

With the lm_head as its own `fully_shard` unit, its weight stays sharded (Shard(0) over a 1-D mesh)
when the loss receives it: FSDP2 gathers a unit's parameters only when that module's forward runs,
and a fused loss reads `lm_head.weight` without calling `lm_head`. `gather_head` gathers such a
weight (and bias) for the op, differentiably: the gradient of the gathered tensor is declared
Partial("avg") (each rank's full-size gradient from its own data), so autograd hands the sharded
parameter a reduce-scattered, rank-averaged Shard(0) gradient — what FSDP2's own reduce-scatter
would have produced (FSDP2 averages over its data-parallel ranks by default). When every rank holds
the same data the average is that gradient, so a head sharded the same way for other reasons
gives the right gradient too. Other layouts are refused naming the argument and the layout.
"""
import sys


def _dtensor_type():
    """torch's DTensor class, or None when torch.distributed.tensor was never imported (then no
    DTensor exists, and importing it here would cost about a second on every import of prefrank)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def gather_head(**tensors):
    """The tensors (keyword: argument name → tensor or None) as plain tensors, in the given order:
    a DTensor sharded Shard(0) on a 1-D mesh is gathered differentiably (see the module docstring);
    any other DTensor layout raises ValueError naming the argument; plain tensors and None pass
    through untouched."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors.values()):
        return tuple(tensors.values())
    from torch.distributed.tensor import Partial, Shard
    out = []
    for name, t in tensors.items():
        if isinstance(t, dtensor):
            placements, ndim = tuple(t.placements), t.device_mesh.ndim
            if ndim != 1 or placements != (Shard(0),):
                raise ValueError(f"{name}: a DTensor with placements {placements} on a {ndim}-D mesh is not "
                                 f"supported; an output head is gathered only from Shard(0) on a 1-D mesh "
                                 f"(FSDP2's layout)")
            t = t.full_tensor(grad_placements=[Partial("avg")])
        out.append(t)
    return tuple(out)
