"""DPO losses for other trainers: a light one on sequence log-probs, and a fused one from the
policy's final hidden states and lm_head weight that never holds the full logits.

  dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, ...)
  fused_linear_dpo_loss(hidden, weight, targets, sequence_ids, ref_chosen_logps=..., ...)
  FusedLinearDPOLoss(...)(hidden, weight, targets, ...)   the same as an nn.Module

With z = (log πθ(y_w) - log πθ(y_l)) - γ (log πref(y_w) - log πref(y_l)) (γ = 1 unless "gamma"):
  sigmoid  -(1 - ε) log σ(βz) - ε log σ(-βz)           DPO, ε = label_smoothing (cDPO)
  robust   (-(1 - ε) log σ(βz) + ε log σ(-βz)) / (1 - 2ε)
  hinge    max(0, 1 - βz)                                SLiC
  ipo      (z - 1/(2β))², on mean token log-probs        IPO
  gamma    -log σ(βz) with γ scaling the reference log-ratio (DPO^γ, Chen et al. Section 5)
Losses are averaged over pairs.

The fused loss works like Liger's fused linear losses, with what they lack: precomputed reference
log-probs (or reference hidden states), IPO, and any layout (prompt rows can share the tensor: they
carry ignore_index and cost nothing, so a packed prompt + chosen + rejected layout works). Pairs are
processed in chunks that hold whole pairs, so each chunk's loss gradient is known as soon as its
log-probs are: the forward pass computes d(hidden), d(weight) and d(bias) at once (three matmuls per
chunk, no recompute), and backward only scales them.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefrank import ops
from prefrank.ops import IGNORE_INDEX, sum_by_sequence
from prefrank.ops.sharded import gather_head
from prefrank.ops.torch_backend import upcast

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "gamma")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO-family losses [B] from sequence log-probs [B] (sums over completion tokens).
    IPO needs the completion lengths, since it works on mean token log-probs."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    pw, pl, rw, rl = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo works on mean token log-probs: pass chosen_lengths and rejected_lengths")
        pw, rw = pw / chosen_lengths, rw / chosen_lengths
        pl, rl = pl / rejected_lengths, rl / rejected_lengths
    z = (pw - pl) - (gamma if loss_type == "gamma" else 1.0) * (rw - rl)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * z) + label_smoothing * F.logsigmoid(-beta * z)) / (
            1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * z)
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * z)  # gamma


def dpo_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> dict:
    """Rewards β(log πθ - log πref), margins, reward accuracy and ranking accuracy (πθ alone)."""
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected = beta * (policy_rejected_logps - ref_rejected_logps)
        return {"rewards_chosen": chosen.mean().item(), "rewards_rejected": rejected.mean().item(),
                "reward_margin": (chosen - rejected).mean().item(),
                "reward_accuracy": (chosen > rejected).float().mean().item(),
                "ranking_accuracy": (policy_chosen_logps >= policy_rejected_logps).float().mean().item(),
                "logps_chosen": policy_chosen_logps.mean().item(), "logps_rejected": policy_rejected_logps.mean().item()}


@dataclass
class _Config:
    beta: float
    loss_type: str
    label_smoothing: float
    gamma: float
    softcap: float | None
    temperature: float
    ignore_index: int
    chunk_bytes: int | None
    token_stats: bool  # also the per-sequence token statistics (fused_linear_dpo_loss's sequence_stats)


def _pair_chunks(pair_of_row: torch.Tensor, budget: int) -> list[slice]:
    """Slices of the (pair-sorted) rows, each holding whole pairs and about `budget` rows."""
    starts = torch.nonzero(torch.diff(pair_of_row, prepend=pair_of_row[:1] - 1)).squeeze(1).tolist() + [len(pair_of_row)]
    chunks, begin = [], 0
    for s, e in zip(starts[:-1], starts[1:]):
        if e - begin > budget and s > begin:
            chunks.append(slice(begin, s))
            begin = s
    if begin < len(pair_of_row):
        chunks.append(slice(begin, len(pair_of_row)))
    return chunks


def _token_stats(logits, targets, lse, seq, n_seq: int, acc) -> torch.Tensor:
    """[3, n_seq] sums by sequence of each token's entropy of its next-token distribution, its mean
    logit over the vocabulary, and whether its target is the (first) argmax; in row slices, so the
    temporaries stay a quarter of the chunk."""
    out = torch.zeros(3, n_seq, dtype=acc, device=logits.device)
    step = max(1, logits.shape[0] // 4)
    for start in range(0, logits.shape[0], step):
        z = upcast(logits[start:start + step])
        p = torch.exp(z - lse[start:start + step, None].to(z.dtype))
        values = (lse[start:start + step].to(z.dtype) - (p * z).sum(-1), z.mean(-1),
                  z.argmax(-1) == targets[start:start + step])
        for k, v in enumerate(values):
            out[k] += sum_by_sequence(v.to(acc), seq[start:start + step], n_seq)
    return out


def _forward_and_grads(hidden, weight, bias, targets, seq_ids, ref_logps, cfg: _Config, need_grads: bool):
    """Loss (mean over pairs), policy sequence log-probs [2B], the token statistics [4, 2B] (token
    counts, then _token_stats; None unless cfg.token_stats), and the gradients of the loss."""
    n_seq = ref_logps.shape[0]
    n_pairs = n_seq // 2
    rows = torch.nonzero(targets != cfg.ignore_index).squeeze(1)
    rows = rows[torch.argsort(seq_ids[rows] // 2, stable=True)]  # whole pairs together
    seq = seq_ids[rows]
    counts = torch.bincount(seq, minlength=n_seq).to(ref_logps.dtype)
    if (counts == 0).any():
        raise ValueError("every chosen and rejected sequence needs at least one target token")
    acc = upcast(hidden[:0]).dtype  # fp32 math for half inputs, float64 stays float64
    policy = torch.zeros(n_seq, dtype=acc, device=hidden.device)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    stats = torch.zeros(3, n_seq, dtype=acc, device=hidden.device) if cfg.token_stats else None
    head = ops.head_for(hidden, weight, bias, softcap=cfg.softcap, temperature=cfg.temperature,
                        chunk_bytes=cfg.chunk_bytes)
    grad_h, grad_w, grad_b = head.new_grads(hidden, need_grads, need_grads, need_grads and bias is not None)
    for chunk in _pair_chunks(seq // 2, head.rows):
        r, s, t = rows[chunk], seq[chunk], targets[rows[chunk]]
        h = hidden[r]
        logits = head.logits(h)
        token_logp, lse = head.logprobs(logits, t)
        if stats is not None:
            stats += _token_stats(logits, t, lse, s, n_seq, acc)
        # the loss of this chunk's pairs, and its gradient w.r.t. their sequence log-probs
        pairs = torch.unique(s // 2)
        seq_logp = sum_by_sequence(token_logp.to(acc), s, n_seq)[torch.stack([2 * pairs, 2 * pairs + 1])].detach()
        seq_logp.requires_grad_(need_grads)
        with torch.enable_grad():
            chunk_loss = dpo_loss(seq_logp[0], seq_logp[1], ref_logps[2 * pairs].to(acc), ref_logps[2 * pairs + 1].to(acc),
                                  beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                  gamma=cfg.gamma, chosen_lengths=counts[2 * pairs].to(acc),
                                  rejected_lengths=counts[2 * pairs + 1].to(acc)).sum() / n_pairs
        loss += chunk_loss.detach()
        policy[2 * pairs], policy[2 * pairs + 1] = seq_logp[0].detach(), seq_logp[1].detach()
        if need_grads:
            (d_seq,) = torch.autograd.grad(chunk_loss, seq_logp)
            d_token = torch.zeros(n_seq, dtype=acc, device=hidden.device)
            d_token[2 * pairs], d_token[2 * pairs + 1] = d_seq[0], d_seq[1]
            head.backward_(logits, t, lse, d_token[s], h, [grad_h, grad_w, grad_b], r)
    if stats is not None:
        stats = torch.cat([counts.to(acc)[None], stats])
    return loss, policy, stats, grad_h, grad_w, grad_b


class _FusedLinearDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, ref_logps, cfg):
        loss, policy, stats, *grads = _forward_and_grads(hidden, weight, bias, targets, seq_ids, ref_logps, cfg,
                                                         need_grads=any(ctx.needs_input_grad[:3]))
        ctx.grads = _cast_grads(grads, weight, bias)
        ctx.save_for_backward(hidden, weight, bias, targets, seq_ids, ref_logps)  # only for a second backward
        ctx.cfg = cfg
        stats = policy.new_zeros(0) if stats is None else stats
        ctx.mark_non_differentiable(policy, stats)
        return loss, policy, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_policy, _grad_stats):
        # Hand the gradients over and drop our reference: autograd then keeps them as .grad
        # instead of copying them (a [V, d] fp32 copy is 0.5 GB at a 128k vocabulary). A second
        # backward through the same graph (retain_graph) recomputes them.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            hidden, weight, bias, targets, seq_ids, ref_logps = ctx.saved_tensors
            grads = _cast_grads(_forward_and_grads(hidden, weight, bias, targets, seq_ids, ref_logps, ctx.cfg,
                                                   need_grads=True)[3:], weight, bias)
        if grad_loss.item() != 1.0:  # e.g. a loss scaled before backward
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return *grads, None, None, None, None


def _cast_grads(grads, weight, bias):
    grad_h, grad_w, grad_b = grads
    return [grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype)]


def _flatten_layout(hidden, targets, sequence_ids):
    """[2B, T, d] hidden with chosen rows first (the TRL / Liger layout) → flat rows and sequence
    ids (2i: chosen of pair i, 2i + 1: its rejected); flat inputs pass through."""
    if hidden.dim() == 2:
        if sequence_ids is None:
            raise ValueError("flat [N, d] hidden states need sequence_ids (2i: chosen of pair i, 2i + 1: rejected)")
        return hidden, targets, sequence_ids
    if hidden.dim() != 3 or hidden.shape[0] % 2 or targets.shape != hidden.shape[:2]:
        raise ValueError("hidden must be [2B, T, d] (chosen rows, then rejected rows) with targets [2B, T], "
                         f"or [N, d] with sequence_ids; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    b2, t = targets.shape
    row = torch.arange(b2, device=hidden.device)
    seq = (2 * (row % (b2 // 2)) + row // (b2 // 2))[:, None].expand(b2, t)
    return hidden.reshape(b2 * t, -1), targets.reshape(-1), seq.reshape(-1)


def fused_linear_dpo_loss(hidden, weight, targets, sequence_ids=None, *, bias=None, ref_chosen_logps=None,
                          ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta: float = 0.1,
                          loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0,
                          softcap: float | None = None, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                          chunk_bytes: int | None = None, return_metrics: bool = True, sequence_stats: bool = False):
    """DPO-family loss from the policy's final hidden states, differentiable w.r.t. hidden, weight and bias.

    hidden: [N, d] with sequence_ids [N] (2i: chosen of pair i, 2i + 1: rejected; prompt and padding
    rows carry ignore_index in targets), or [2B, T, d] with chosen rows first; weight [V, d]; bias [V];
    targets: next-token ids aligned with hidden (int64). The reference: precomputed sums
    ref_chosen_logps / ref_rejected_logps [B], or ref_hidden (+ ref_weight, ref_bias; same layout).
    Head: z = (hidden @ weight.T + bias) / temperature, softcap·tanh(z / softcap) if softcap.
    Returns (loss, metrics) (metrics: see dpo_metrics), or the loss alone. With sequence_stats the
    metrics also hold, per pair and sequence ([B, 2] float tensors, column 0 chosen, detached): the
    policy's "sequence_logps"; its "sequence_tokens" (target tokens); and sums over its tokens of
    the entropy of the next-token distribution ("sequence_entropy"), of the mean logit over the
    vocabulary ("sequence_logits") and of whether the target is the (first) argmax
    ("sequence_top1"), computed from the logits the loss computes anyway (what trainers log).
    A DTensor weight, bias, ref_weight or ref_bias sharded Shard(0) on a 1-D mesh (FSDP2's, the
    lm_head as its own unit) is gathered for the op, its gradient returned sharded and averaged
    over the ranks as FSDP2's would be (ops/sharded.py); other layouts are refused.
    """
    weight, bias, ref_weight, ref_bias = gather_head(weight=weight, bias=bias, ref_weight=ref_weight,
                                                     ref_bias=ref_bias)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    flat_h, flat_t, seq = _flatten_layout(hidden, targets, sequence_ids)
    ops.check_targets(flat_t, weight.shape[0], ignore_index)
    n_pairs = int(seq[flat_t != ignore_index].max()) // 2 + 1 if (flat_t != ignore_index).any() else 0
    if ref_hidden is not None:
        ref_h, _, _ = _flatten_layout(ref_hidden, targets, sequence_ids)
        with torch.no_grad():
            token = ops.logprobs_from_hidden(ref_h, ref_weight if ref_weight is not None else weight, flat_t,
                                             ref_bias, softcap=softcap, temperature=temperature,
                                             ignore_index=ignore_index)
            keep = flat_t != ignore_index
            ref_logps = sum_by_sequence(token[keep].double(), seq[keep], 2 * n_pairs)
    elif ref_chosen_logps is not None and ref_rejected_logps is not None:
        ref_logps = torch.stack([ref_chosen_logps, ref_rejected_logps], 1).reshape(-1).detach()
        if ref_logps.shape[0] != 2 * n_pairs:
            raise ValueError(f"{ref_logps.shape[0] // 2} reference pairs for {n_pairs} policy pairs")
    else:
        raise ValueError("pass the reference as ref_chosen_logps and ref_rejected_logps, or as ref_hidden")
    cfg = _Config(beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes,
                  sequence_stats)
    loss, policy, stats = _FusedLinearDPO.apply(flat_h, weight, bias, flat_t, seq, ref_logps, cfg)
    if not return_metrics:
        return loss
    metrics = dpo_metrics(policy[0::2], policy[1::2], ref_logps[0::2].to(policy.dtype),
                          ref_logps[1::2].to(policy.dtype), beta)
    if sequence_stats:
        metrics["sequence_logps"] = policy.view(-1, 2)
        for name, values in zip(("tokens", "entropy", "logits", "top1"), stats):
            metrics[f"sequence_{name}"] = values.view(-1, 2)
    return loss, metrics


class FusedLinearDPOLoss(torch.nn.Module):
    """nn.Module form of fused_linear_dpo_loss: configure once, call with
    (hidden, weight, targets, sequence_ids=None, bias=None, ref_chosen_logps=..., ...)."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 gamma: float = 1.0, softcap: float | None = None, temperature: float = 1.0,
                 ignore_index: int = IGNORE_INDEX, chunk_bytes: int | None = None):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
                            softcap=softcap, temperature=temperature, ignore_index=ignore_index,
                            chunk_bytes=chunk_bytes)

    def forward(self, hidden, weight, targets, sequence_ids=None, bias=None, **reference):
        return fused_linear_dpo_loss(hidden, weight, targets, sequence_ids, bias=bias, **reference, **self.options)
