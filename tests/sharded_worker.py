"""Ranks for tests/test_sharded_head.py (output heads held as DTensors).

  python -m torch.distributed.run --nproc-per-node 2 tests/sharded_worker.py OUT
      each rank (gloo, CPU, float64) runs every case on its own half of the batch with the model
      under FSDP2, the lm_head its own `fully_shard` unit, and saves OUT/rank{R}.pt: per case the
      loss and every parameter's gradient as its local shard; and the messages of the refused layouts

The model, its data and the one-process reference are defined here once, for the ranks and the test.
"""
import sys

import torch
import torch.nn.functional as F

V, D, T, PROMPT, PAIRS = 11, 6, 5, 2, 4  # odd vocabulary: the head's shards are uneven (6 and 5 rows)
BETA = 0.1
IGNORE = -100


class Tiny(torch.nn.Module):
    """Embedding → tanh(linear) → an lm_head with a bias; forward returns the final hidden states
    (the trainer applies the head through the loss)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(V, D)
        self.body = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V)
        self.double()

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def batch(pairs: slice):
    """(ids [2B, T], targets [2B, T]) for the given pairs of a fixed batch of PAIRS pairs, chosen
    rows first (the fused loss's [2B, T, d] layout); prompt targets are ignored."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (PAIRS, 2, T + 1), generator=g)[pairs]
    ids = torch.cat([ids[:, 0], ids[:, 1]])
    targets = ids[:, 1:].clone()
    targets[:, :PROMPT] = IGNORE
    return ids[:, :-1], targets


def ref_logps(pairs: slice):
    """Fixed precomputed reference log-probs (chosen [B], rejected [B]) of the given pairs."""
    g = torch.Generator().manual_seed(8)
    values = -5 - 3 * torch.rand(2, PAIRS, generator=g, dtype=torch.float64)
    return values[0, pairs], values[1, pairs]


def reference(case: str):
    """One process, plain torch in float64, the whole batch: (loss, {parameter: full gradient})."""
    model, ref_model = Tiny(0), Tiny(1)
    ids, targets = batch(slice(None))
    hidden = model(ids)
    logits = hidden @ model.lm_head.weight.T + model.lm_head.bias
    keep = targets != IGNORE
    token = torch.where(keep, logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0)
    if case == "logprobs":
        loss = -token[keep].mean()
    else:
        seq = token.sum(-1)
        if case == "dpo":
            ref = torch.stack(ref_logps(slice(None)))
        else:  # "dpo_ref_hidden": the reference model's head applied to its hidden states
            with torch.no_grad():
                r = ref_model(ids) @ ref_model.lm_head.weight.T + ref_model.lm_head.bias
                rt = torch.where(keep, r.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0)
                ref = rt.sum(-1).view(2, PAIRS)
        z = (seq[:PAIRS] - seq[PAIRS:]) - (ref[0] - ref[1])
        loss = -F.logsigmoid(BETA * z).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def run_case(case: str, model, ref_model, rank: int, world: int):
    """This rank's half of the batch through prefrank with the sharded head: (loss, local grads)."""
    from prefrank.dpo.loss import fused_linear_dpo_loss
    from prefrank.ops import logprobs_from_hidden
    half = PAIRS // world
    mine = slice(rank * half, (rank + 1) * half)
    ids, targets = batch(mine)
    hidden = model(ids)
    head = model.lm_head
    if case == "logprobs":
        keep = targets.reshape(-1) != IGNORE
        token = logprobs_from_hidden(hidden.reshape(-1, D), head.weight, targets.reshape(-1), head.bias)
        loss = -token[keep].mean()
    elif case == "dpo":
        chosen, rejected = ref_logps(mine)
        loss = fused_linear_dpo_loss(hidden, head.weight, targets, bias=head.bias, ref_chosen_logps=chosen,
                                     ref_rejected_logps=rejected, beta=BETA, return_metrics=False)
    else:
        with torch.no_grad():
            ref_hidden = ref_model(ids)
        loss = fused_linear_dpo_loss(hidden, head.weight, targets, bias=head.bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_model.lm_head.weight, ref_bias=ref_model.lm_head.bias,
                                     beta=BETA, return_metrics=False)
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: (p.grad.to_local(), str(p.grad.placements)) for n, p in model.named_parameters()}


def refusals(weight, hidden, targets):
    """The message of every layout the head refuses (Shard(1), Partial, Replicate, a 2-D mesh),
    from both public entry points."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from prefrank.dpo.loss import fused_linear_dpo_loss
    from prefrank.ops import logprobs_from_hidden
    mesh = init_device_mesh("cpu", (2,))
    mesh2 = init_device_mesh("cpu", (1, 2))
    layouts = {"Shard(1)": distribute_tensor(weight, mesh, [Shard(1)]),
               "Partial": DTensor.from_local(weight, mesh, [Partial()]),
               "Replicate": distribute_tensor(weight, mesh, [Replicate()]),
               "2-D mesh": distribute_tensor(weight, mesh2, [Replicate(), Shard(0)])}
    messages = {}
    for name, w in layouts.items():
        for entry, call in (("fused_linear_dpo_loss", lambda: fused_linear_dpo_loss(
                                 hidden, w, targets, ref_chosen_logps=torch.zeros(PAIRS // 2, dtype=torch.float64),
                                 ref_rejected_logps=torch.zeros(PAIRS // 2, dtype=torch.float64))),
                            ("logprobs_from_hidden", lambda: logprobs_from_hidden(hidden.reshape(-1, D), w,
                                                                                  targets.reshape(-1)))):
            try:
                call()
                messages[name, entry] = None
            except ValueError as e:
                messages[name, entry] = str(e)
    return messages


def main(out: str):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in ("dpo", "logprobs", "dpo_ref_hidden"):
        model, ref_model = Tiny(0), Tiny(1)
        for m in (model, ref_model):  # as FSDP2 recipes wrap a causal LM: the head its own unit, then the root
            fully_shard(m.lm_head)
            fully_shard(m)
        results[case] = run_case(case, model, ref_model, rank, world)
    ids, targets = batch(slice(0, PAIRS // 2))
    results["refusals"] = refusals(Tiny(0).lm_head.weight.detach(), Tiny(0)(ids).detach(), targets)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
