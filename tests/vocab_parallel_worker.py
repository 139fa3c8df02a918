"""Ranks for tests/test_vocab_parallel.py (the output head split by vocabulary over a tensor-parallel group).

  python -m torch.distributed.run --nproc-per-node 2 tests/vocab_parallel_worker.py OUT MODEL_DIR
      each rank (gloo, CPU, float64) holds its Shard(0) rows of the head and the whole batch (as
      tensor parallelism has it), runs every case through prefrank with vocab_parallel=True, and
      saves OUT/rank{R}.pt: per case the result and the gradients of hidden, of its weight shard
      and of its bias shard; the messages of the refused layouts; and what `prefrank score --tp`'s
      CausalLM holds as the head of the tiny Llama at MODEL_DIR

The cases' data and the one-process reference (plain float64 torch: the full logits, log_softmax,
autograd) are defined here once, for the ranks and the test.
"""
import sys

import torch
import torch.nn.functional as F

V, D, N = 101, 6, 13  # a vocabulary 2 does not divide: shards of 51 and 50 rows
IGNORE = -100
PAIRS, T = 3, 4
# per case: softcap, temperature, chunk_bytes (4 or 3 rows' logits: several chunks), bias, vocabulary
# (one token: rank 1's shard is empty)
OP_CASES = {"plain": (None, 1.0, None, True, V), "softcap_temperature": (3.0, 0.7, None, True, V),
            "chunks": (None, 1.0, 8 * 51 * 4, True, V), "no_bias": (2.0, 1.3, 8 * 51 * 3, False, V),
            "empty_shard": (1.5, 1.0, None, True, 1)}
# per case: loss type, the reference as precomputed log-probs ("logps") or hidden states ("hidden")
DPO_CASES = {"sigmoid": ("sigmoid", "logps"), "ipo": ("ipo", "logps"), "sigmoid_ref_hidden": ("sigmoid", "hidden"),
             "robust_softcap": ("robust", "logps")}


def op_data(case: str):
    """(hidden [N, d], weight [V, d], bias [V] or None, targets [N] with ignored rows, coefficients [N])."""
    g = torch.Generator().manual_seed(3)
    vocab = OP_CASES[case][4]
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, D, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) if OP_CASES[case][3] else None
    targets = torch.randint(0, vocab, (N,), generator=g)
    targets[[1, 5, 6]] = IGNORE
    if vocab == V:
        targets[[0, 2]] = torch.tensor([50, 51])  # the last row of shard 0, the first of shard 1
    return hidden, weight, bias, targets, torch.randn(N, generator=g, dtype=torch.float64)


def head(hidden, weight, bias, softcap, temperature):
    logits = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def token_logps(logits, targets):
    keep = targets != IGNORE
    return torch.where(keep, logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)


def op_reference(case: str):
    """One process, plain float64 torch: (log-probs [N], {hidden, weight, bias: gradient of Σ c·logp})."""
    hidden, weight, bias, targets, coef = op_data(case)
    softcap, temperature, *_ = OP_CASES[case]
    params = {"hidden": hidden, "weight": weight, "bias": bias}
    for t in params.values():
        if t is not None:
            t.requires_grad_(True)
    logp = token_logps(head(hidden, weight, bias, softcap, temperature), targets)
    (logp * coef).sum().backward()
    return logp.detach(), {k: t.grad for k, t in params.items() if t is not None}


def dpo_data(case: str):
    """(hidden [2B, T, d] chosen rows first, targets [2B, T] (prompt rows ignored), weight, bias,
    reference chosen and rejected log-probs [B], reference hidden states, weight and bias)."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2 * PAIRS, T, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    targets[:, 0] = IGNORE
    targets[1, 1] = IGNORE
    weight, bias = torch.randn(V, D, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    ref = -4 - 3 * torch.rand(2, PAIRS, generator=g, dtype=torch.float64)
    ref_hidden = torch.randn(2 * PAIRS, T, D, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    ref_bias = torch.randn(V, generator=g, dtype=torch.float64)
    return hidden, targets, weight, bias, ref[0], ref[1], ref_hidden, ref_weight, ref_bias


DPO_OPTIONS = dict(beta=0.3)


def dpo_softcap(case: str):
    return 4.0 if case.endswith("softcap") else None


def dpo_reference(case: str):
    """One process, plain float64 torch: (loss, {hidden, weight, bias: gradient})."""
    loss_type, ref_kind = DPO_CASES[case]
    hidden, targets, weight, bias, ref_c, ref_r, ref_hidden, ref_weight, ref_bias = dpo_data(case)
    beta, softcap = DPO_OPTIONS["beta"], dpo_softcap(case)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    seq = token_logps(head(hidden, weight, bias, softcap, 1.0), targets).sum(-1)
    if ref_kind == "hidden":
        ref = token_logps(head(ref_hidden, ref_weight, ref_bias, softcap, 1.0), targets).sum(-1)
        ref_c, ref_r = ref[:PAIRS], ref[PAIRS:]
    n = (targets != IGNORE).sum(-1).double()
    pw, pl, nw, nl = seq[:PAIRS], seq[PAIRS:], n[:PAIRS], n[PAIRS:]
    if loss_type == "ipo":
        z = (pw / nw - pl / nl) - (ref_c / nw - ref_r / nl)
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        z = (pw - pl) - (ref_c - ref_r)
        losses = -F.logsigmoid(beta * z)  # robust with label_smoothing 0 is this too
    loss = losses.mean()
    loss.backward()
    return loss.detach(), {"hidden": hidden.grad, "weight": weight.grad, "bias": bias.grad}


def _local(t):
    """(local shard, placements) of a DTensor gradient; (the tensor, None) for a plain one."""
    return (t.to_local(), str(t.placements)) if hasattr(t, "to_local") else (t, None)


def run_op(case, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from prefrank.ops import logprobs_from_hidden
    hidden, weight, bias, targets, coef = op_data(case)
    softcap, temperature, chunk_bytes, *_ = OP_CASES[case]
    hidden.requires_grad_(True)
    w = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    b = None if bias is None else torch.nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
    logp = logprobs_from_hidden(hidden, w, targets, b, softcap=softcap, temperature=temperature,
                                chunk_bytes=chunk_bytes, vocab_parallel=True)
    (logp * coef).sum().backward()
    grads = {"hidden": _local(hidden.grad), "weight": _local(w.grad)}
    if b is not None:
        grads["bias"] = _local(b.grad)
    return logp.detach(), grads


def run_dpo(case, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from prefrank.dpo.loss import FusedLinearDPOLoss
    loss_type, ref_kind = DPO_CASES[case]
    hidden, targets, weight, bias, ref_c, ref_r, ref_hidden, ref_weight, ref_bias = dpo_data(case)
    hidden.requires_grad_(True)
    w, b = (torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in (weight, bias))
    module = FusedLinearDPOLoss(loss_type=loss_type, softcap=dpo_softcap(case), vocab_parallel=True,
                                return_metrics=False, chunk_bytes=8 * 51 * 5, **DPO_OPTIONS)
    if ref_kind == "hidden":
        loss = module(hidden, w, targets, bias=b, ref_hidden=ref_hidden,
                      ref_weight=distribute_tensor(ref_weight, mesh, [Shard(0)]),
                      ref_bias=distribute_tensor(ref_bias, mesh, [Shard(0)]))
    else:
        loss = module(hidden, w, targets, bias=b, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss.backward()
    return loss.detach(), {"hidden": _local(hidden.grad), "weight": _local(w.grad), "bias": _local(b.grad)}


def refusals(mesh):
    """The message of every layout vocab_parallel=True refuses, from both entry points, and of
    sequence_stats with it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from prefrank.dpo.loss import fused_linear_dpo_loss
    from prefrank.ops import logprobs_from_hidden
    hidden, targets, weight, bias, ref_c, ref_r, *_ = dpo_data("sigmoid")
    mesh2 = init_device_mesh("cpu", (1, 2))
    layouts = {"plain": weight, "Shard(1)": distribute_tensor(weight, mesh, [Shard(1)]),
               "Partial": DTensor.from_local(weight, mesh, [Partial()]),
               "Replicate": distribute_tensor(weight, mesh, [Replicate()]),
               "2-D mesh": distribute_tensor(weight, mesh2, [Replicate(), Shard(0)])}
    messages = {}
    for name, w in layouts.items():
        calls = {"fused_linear_dpo_loss": lambda: fused_linear_dpo_loss(
                     hidden, w, targets, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, vocab_parallel=True),
                 "logprobs_from_hidden": lambda: logprobs_from_hidden(hidden.reshape(-1, D), w, targets.reshape(-1),
                                                                      vocab_parallel=True)}
        for entry, call in calls.items():
            messages[name, entry] = _message(call)
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    messages["sequence_stats"] = _message(lambda: fused_linear_dpo_loss(
        hidden, sharded, targets, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, vocab_parallel=True,
        sequence_stats=True))
    messages["ref_weight"] = _message(lambda: fused_linear_dpo_loss(
        hidden, sharded, targets, ref_hidden=hidden, ref_weight=weight, vocab_parallel=True))
    return messages


def opchecks(mesh) -> list:
    """torch.library.opcheck of prefrank::vocab_parallel_logprobs and its backward on this rank's shard
    (schema, autograd registration, fake kernels, AOT dispatch; every rank runs the same calls, so
    their all-reduces pair up): the ops checked."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from prefrank.ops.vocab_parallel import shard
    P = torch.ops.prefrank
    hidden, weight, bias, targets, _ = op_data("plain")
    w, first, group = shard("weight", distribute_tensor(weight, mesh, [Shard(0)]))
    b = shard("bias", distribute_tensor(bias, mesh, [Shard(0)]))[0]
    head = (2.0, 0.8, IGNORE, 8 * 51 * 4, "torch", group)
    _, lse = P.vocab_parallel_logprobs(hidden, w, b, targets, first, V, *head)
    calls = {P.vocab_parallel_logprobs: (hidden.clone().requires_grad_(True), w.clone().requires_grad_(True),
                                         b.clone().requires_grad_(True), targets, first, V, *head),
             P.vocab_parallel_logprobs_backward: (torch.randn(N, dtype=torch.float64), hidden, w, b, targets, lse,
                                                  first, *head, True, True, True)}
    for op, args in calls.items():
        torch.library.opcheck(op, args)
    return [str(op) for op in calls]


def _message(call):
    try:
        call()
    except ValueError as e:
        return str(e)
    return None


def score_head(model_dir: str):
    """What `prefrank score --tp 2` loads (runtime.load_lm): the CausalLM's head weight and arguments."""
    from prefrank.models import LoadOptions
    from prefrank.runtime import layout, load_lm
    lm = load_lm(model_dir, LoadOptions(), torch.device("cpu"), torch.float32, layout(2))
    lm.check_head()
    w = lm.weight
    return {"type": type(w).__name__, "shape": tuple(w.shape), "local_shape": tuple(_local(w)[0].shape),
            "placements": _local(w)[1], "vocab_parallel": lm.head_kwargs.get("vocab_parallel"),
            "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size}


def main(out: str, model_dir: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}

    def gathering(*args, **kwargs):  # nothing may gather the head in the vocabulary-parallel cases
        raise AssertionError("the head was gathered")
    saved = DTensor.full_tensor, DTensor.redistribute
    DTensor.full_tensor = DTensor.redistribute = gathering
    try:
        for case in OP_CASES:
            results["op", case] = run_op(case, mesh)
        for case in DPO_CASES:
            results["dpo", case] = run_dpo(case, mesh)
    finally:
        DTensor.full_tensor, DTensor.redistribute = saved
    results["refusals"] = refusals(mesh)
    results["opcheck"] = opchecks(mesh)
    results["score_head"] = score_head(model_dir)
    torch.save(results, f"{out}/rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
