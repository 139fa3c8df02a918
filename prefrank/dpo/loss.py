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
Losses are averaged over pairs (reduction="mean"), summed ("sum") or returned per pair ("none").

The fused loss works like Liger's fused linear losses, with what they lack: precomputed reference
log-probs (or reference hidden states), IPO, and any layout (prompt rows can share the tensor: they
carry ignore_index and cost nothing, so a packed prompt + chosen + rejected layout works). Pairs are
processed in chunks that hold whole pairs, so each chunk's loss gradient is known as soon as its
log-probs are: the forward pass computes d(hidden), d(weight) and d(bias) at once (three matmuls per
chunk, no recompute), and backward only scales them (reduction "none": the backward recomputes
the chunks with each pair's upstream gradient). Both run as registered ops (prefrank::fused_linear_dpo
and prefrank::fused_linear_dpo_backward): torch.compile traces the loss without graph breaks, and
the checks on data (targets in range, sequences with tokens, finite values) run inside them.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from prefrank import ops
from prefrank.dpo.vocab_parallel import vocab_parallel_dpo_loss
from prefrank.ops import IGNORE_INDEX, backends, sum_by_sequence
from prefrank.ops.head import Head
from prefrank.ops.registered import check_targets, grad_fakes, grad_outputs
from prefrank.ops.sharded import gather_head
from prefrank.ops.torch_backend import upcast

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "gamma")
REDUCTIONS = ("mean", "sum", "none")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO-family losses [B] from sequence log-probs [B] (sums over completion tokens).
    IPO needs the completion lengths, since it works on mean token log-probs."""
    _check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma)
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("ipo works on mean token log-probs: pass chosen_lengths and rejected_lengths")
    z, _ = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type, gamma,
                   chosen_lengths, rejected_lengths)
    return _loss_of_margin(z, beta, loss_type, label_smoothing)


def _margin(pw, pl, rw, rl, loss_type: str, gamma: float, chosen_lengths, rejected_lengths):
    """z = (policy log-ratio) - γ (reference log-ratio), on mean token log-probs for ipo, and
    (dz/dpw, dz/dpl)."""
    if loss_type == "ipo":
        z = (pw / chosen_lengths - pl / rejected_lengths) - (rw / chosen_lengths - rl / rejected_lengths)
        return z, (1 / chosen_lengths, -1 / rejected_lengths)
    return (pw - pl) - (gamma if loss_type == "gamma" else 1.0) * (rw - rl), (1.0, -1.0)


def _loss_of_margin(z, beta: float, loss_type: str, eps: float):
    """Each loss type as a function of the margin z (see the module)."""
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * z)
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * z)  # gamma


def _loss_slope(z, beta: float, loss_type: str, eps: float):
    """d loss / d z of _loss_of_margin, written out: the fused loss's registered op runs below
    autograd, so it differentiates the per-pair losses by hand (gradcheck tests both)."""
    if loss_type == "sigmoid":
        return beta * (-(1 - eps) * torch.sigmoid(-beta * z) + eps * torch.sigmoid(beta * z))
    if loss_type == "robust":
        return beta * (-(1 - eps) * torch.sigmoid(-beta * z) - eps * torch.sigmoid(beta * z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        # -β times the mask in z's dtype: torch.where(mask, -β, 0.0) would round β to float32
        return -beta * (1 - beta * z > 0).to(z.dtype)
    if loss_type == "ipo":
        return 2 * (z - 1 / (2 * beta))
    return -beta * torch.sigmoid(-beta * z)  # gamma


def dpo_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
                as_floats: bool = False) -> dict:
    """Rewards β(log πθ - log πref), margins, reward accuracy and ranking accuracy (πθ alone), as
    0-dim tensors on the inputs' device (no device sync), or Python floats with `as_floats`."""
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected = beta * (policy_rejected_logps - ref_rejected_logps)
        metrics = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                   "reward_margin": (chosen - rejected).mean(),
                   "reward_accuracy": (chosen > rejected).float().mean(),
                   "ranking_accuracy": (policy_chosen_logps >= policy_rejected_logps).float().mean(),
                   "logps_chosen": policy_chosen_logps.mean(), "logps_rejected": policy_rejected_logps.mean()}
    return {k: v.item() for k, v in metrics.items()} if as_floats else metrics


def _check_options(*, beta, loss_type, label_smoothing, gamma, softcap=None, temperature=1.0, reduction="mean",
                   chunk_bytes=None):
    """Refuse option values the losses cannot use, naming the option (no data is read)."""
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    number("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the strength of the KL penalty), got {beta!r}")
    number("label_smoothing", label_smoothing)
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if loss_type == "robust" and label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing must be < 0.5 for loss_type='robust' (the loss divides by "
                         f"1 - 2 label_smoothing), got {label_smoothing!r}")
    number("gamma", gamma)
    if softcap is not None:
        number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive int or None, got {chunk_bytes!r}")


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


def _check_data(hidden, weight, bias, targets, seq_ids, ref_logps, ignore_index: int):
    """The checks on data, inside the ops (a compiled graph holds no data-dependent branch):
    targets in range, scored rows' sequence ids within the reference's pairs."""
    check_targets(targets, weight.shape[0], ignore_index)
    scored = seq_ids[targets != ignore_index]
    n_seq = ref_logps.shape[0]
    if ((scored < 0) | (scored >= n_seq)).any():
        raise ValueError(f"sequence_ids: scored rows' ids must be in [0, {n_seq}) for the {n_seq // 2} pairs of the "
                         f"reference log-probs; got ids in [{int(scored.min())}, {int(scored.max())}]")


def _refuse_non_finite(hidden, weight, bias, ref_logps):
    """A NaN or inf result: name the input that holds NaN or inf (an error, not a NaN loss)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("the reference log-probs", ref_logps)):
        if t is not None and not torch.isfinite(t).all():
            verb = "hold" if name.endswith("log-probs") else "holds"
            raise ValueError(f"{name} {verb} NaN or inf: the loss would be NaN")
    raise FloatingPointError("the DPO loss overflowed (finite inputs, non-finite loss): check the inputs' scale")


def _dpo_pass(hidden, weight, bias, targets, seq_ids, ref_logps, o: "_Opts", pair_grads, needs):
    """Per-pair losses [B], policy sequence log-probs [2B], the token statistics [4, 2B] (token
    counts, then _token_stats; None unless o.token_stats), and [d hidden, d weight, d bias] of
    Σ_i pair_grads[i] · loss_i (None where not needed, all None without pair_grads)."""
    n_seq = ref_logps.shape[0]
    n_pairs = n_seq // 2
    rows = torch.nonzero(targets != o.ignore_index).squeeze(1)
    rows = rows[torch.argsort(seq_ids[rows] // 2, stable=True)]  # whole pairs together
    seq = seq_ids[rows]
    counts = torch.bincount(seq, minlength=n_seq).to(ref_logps.dtype)
    if (counts == 0).any():
        raise ValueError(f"targets / sequence_ids: every chosen and rejected sequence needs at least one target token; "
                         f"sequence {int(torch.nonzero(counts == 0)[0])} has none")
    acc = upcast(hidden[:0]).dtype  # fp32 math for half inputs, float64 stays float64
    losses = torch.zeros(n_pairs, dtype=acc, device=hidden.device)
    policy = torch.zeros(n_seq, dtype=acc, device=hidden.device)
    stats = torch.zeros(3, n_seq, dtype=acc, device=hidden.device) if o.token_stats else None
    head = Head(weight, bias, o.softcap, o.temperature, o.backend, o.chunk_bytes)
    grads = head.new_grads(hidden, *needs) if pair_grads is not None else [None, None, None]
    for chunk in _pair_chunks(seq // 2, head.rows):
        r, s, t = rows[chunk], seq[chunk], targets[rows[chunk]]
        h = hidden[r]
        logits = head.logits(h)
        token_logp, lse = head.logprobs(logits, t)
        if stats is not None:
            stats += _token_stats(logits, t, lse, s, n_seq, acc)
        # the loss of this chunk's pairs, and its gradient w.r.t. their sequence log-probs
        pairs = torch.unique(s // 2)
        seq_logp = sum_by_sequence(token_logp.to(acc), s, n_seq)
        pw, pl = seq_logp[2 * pairs], seq_logp[2 * pairs + 1]
        z, (dz_w, dz_l) = _margin(pw, pl, ref_logps[2 * pairs].to(acc), ref_logps[2 * pairs + 1].to(acc), o.loss_type,
                                  o.gamma, counts[2 * pairs].to(acc), counts[2 * pairs + 1].to(acc))
        losses[pairs] = _loss_of_margin(z, o.beta, o.loss_type, o.label_smoothing)
        policy[2 * pairs], policy[2 * pairs + 1] = pw, pl
        if pair_grads is not None:
            slope = _loss_slope(z, o.beta, o.loss_type, o.label_smoothing) * pair_grads[pairs].to(acc)
            d_seq = torch.zeros(n_seq, dtype=acc, device=hidden.device)
            d_seq[2 * pairs], d_seq[2 * pairs + 1] = slope * dz_w, slope * dz_l
            head.backward_(logits, t, lse, d_seq[s], h, grads, r)
    if not (torch.isfinite(losses).all() and torch.isfinite(policy).all()):
        _refuse_non_finite(hidden, weight, bias, ref_logps)
    if stats is not None:
        stats = torch.cat([counts.to(acc)[None], stats])
    return losses, policy, stats, (head.finish_grads(grads) if pair_grads is not None else grads)


class _Opts:
    """The fused loss's scalar arguments, in the registered ops' order (after the tensors)."""
    names = ("beta", "loss_type", "label_smoothing", "gamma", "softcap", "temperature", "ignore_index", "chunk_bytes",
             "backend", "token_stats")

    def __init__(self, *values):
        self.__dict__.update(zip(self.names, values))


@torch.library.custom_op("prefrank::fused_linear_dpo", mutates_args=())
def _fused_linear_dpo(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, seq_ids: Tensor,
                      ref_logps: Tensor, beta: float, loss_type: str, label_smoothing: float, gamma: float,
                      softcap: float | None, temperature: float, ignore_index: int, chunk_bytes: int | None,
                      backend: str, token_stats: bool, reduction: str, need_hidden: bool, need_weight: bool,
                      need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [] or [B] under reduction "none", policy log-probs [2B], token statistics [4, 2B] or
    [0], and for "mean" / "sum" the gradients of the loss w.r.t. hidden, weight and bias, computed
    in the same pass; empty where not needed). B = ref_logps.shape[0] // 2."""
    _check_data(hidden, weight, bias, targets, seq_ids, ref_logps, ignore_index)
    o = _Opts(beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes, backend,
              token_stats)
    needs = (need_hidden, need_weight, need_bias)
    n_pairs = ref_logps.shape[0] // 2
    pair_grads = None
    if reduction != "none" and any(needs):
        pair_grads = torch.full((n_pairs,), 1.0 / n_pairs if reduction == "mean" else 1.0, dtype=torch.float64,
                                device=hidden.device)
    losses, policy, stats, grads = _dpo_pass(hidden, weight, bias, targets, seq_ids, ref_logps, o, pair_grads, needs)
    loss = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses
    return (loss, policy, policy.new_empty(0) if stats is None else stats,
            *grad_outputs(grads, hidden, weight))


@_fused_linear_dpo.register_fake
def _(hidden, weight, bias, targets, seq_ids, ref_logps, beta, loss_type, label_smoothing, gamma, softcap,
      temperature, ignore_index, chunk_bytes, backend, token_stats, reduction, need_hidden, need_weight, need_bias):
    n_seq = ref_logps.shape[0]
    acc = upcast(hidden[:0]).dtype
    loss = hidden.new_empty((n_seq // 2,) if reduction == "none" else (), dtype=acc)
    stats = hidden.new_empty((4, n_seq) if token_stats else (0,), dtype=acc)
    needs = (need_hidden, need_weight, need_bias) if reduction != "none" else (False, False, False)
    return loss, hidden.new_empty(n_seq, dtype=acc), stats, *grad_fakes(needs, hidden, weight, bias)


@torch.library.custom_op("prefrank::fused_linear_dpo_backward", mutates_args=())
def _fused_linear_dpo_backward(grad_losses: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                               targets: Tensor, seq_ids: Tensor, ref_logps: Tensor, beta: float, loss_type: str,
                               label_smoothing: float, gamma: float, softcap: float | None, temperature: float,
                               ignore_index: int, chunk_bytes: int | None, backend: str, token_stats: bool,
                               need_hidden: bool, need_weight: bool,
                               need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of Σ_i grad_losses[i] · loss_i (grad_losses [B]) w.r.t. hidden, weight and bias
    (empty where not needed): the chunks recomputed with each pair's upstream gradient."""
    o = _Opts(beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes, backend, False)
    needs = (need_hidden, need_weight, need_bias)
    grads = _dpo_pass(hidden, weight, bias, targets, seq_ids, ref_logps, o, grad_losses, needs)[3]
    return grad_outputs(grads, hidden, weight)


@_fused_linear_dpo_backward.register_fake
def _(grad_losses, hidden, weight, bias, targets, seq_ids, ref_logps, beta, loss_type, label_smoothing, gamma,
      softcap, temperature, ignore_index, chunk_bytes, backend, token_stats, need_hidden, need_weight, need_bias):
    return grad_fakes((need_hidden, need_weight, need_bias), hidden, weight, bias)


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, targets, seq_ids, ref_logps, *scalars = inputs
    *ctx.scalars, ctx.reduction, need_h, need_w, need_b = scalars
    ctx.needs = (need_h, need_w, need_b)
    ctx.mark_non_differentiable(*output[1:])
    # "mean" / "sum": the gradients the forward computed; "none": what the backward op recomputes from
    ctx.save_for_backward(*(output[3:] if ctx.reduction != "none" else (hidden, weight, bias, targets, seq_ids,
                                                                        ref_logps)))


def _tracing() -> bool:
    """Whether torch.compile, AOTAutograd or make_fx is tracing (values are symbolic: no .item())."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def _fused_backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        with torch.no_grad():  # first derivatives only: the backward op has no backward
            grads = torch.ops.prefrank.fused_linear_dpo_backward(grad_loss, *ctx.saved_tensors, *ctx.scalars,
                                                                 *ctx.needs)
    elif not _tracing() and grad_loss.item() == 1.0:
        # eager, loss not scaled: hand the forward's gradients over as they are; without retain_graph
        # autograd then keeps them as .grad instead of copying them (d weight in fp32 is 0.5 GB at a
        # 128k vocabulary)
        grads = ctx.saved_tensors
    else:  # scale by the upstream gradient (traced: always, a graph has no data-dependent branch)
        grads = [g * grad_loss.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), *([None] * 17))


_fused_linear_dpo.register_autograd(_fused_backward, setup_context=_fused_setup)


def _flatten_layout(hidden, targets, sequence_ids):
    """[2B, T, d] hidden with chosen rows first (the TRL / Liger layout) → flat rows and sequence
    ids (2i: chosen of pair i, 2i + 1: its rejected); flat inputs pass through."""
    if hidden.dim() == 2:
        if sequence_ids is None:
            raise ValueError("sequence_ids: flat [N, d] hidden states need sequence_ids (2i: chosen of pair i, "
                             "2i + 1: rejected)")
        if sequence_ids.shape != hidden.shape[:1] or sequence_ids.is_floating_point():
            raise ValueError(f"sequence_ids must be [N] = [{hidden.shape[0]}] integers; got "
                             f"{tuple(sequence_ids.shape)} {sequence_ids.dtype}")
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"targets must be [N] = [{hidden.shape[0]}] for [N, d] hidden; got {tuple(targets.shape)}")
        return hidden, targets, sequence_ids
    if hidden.dim() != 3 or hidden.shape[0] % 2 or targets.shape != hidden.shape[:2]:
        raise ValueError("hidden must be [2B, T, d] (chosen rows, then rejected rows) with targets [2B, T], "
                         f"or [N, d] with sequence_ids; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    b2, t = targets.shape
    row = torch.arange(b2, device=hidden.device)
    seq = (2 * (row % (b2 // 2)) + row // (b2 // 2))[:, None].expand(b2, t)
    return hidden.reshape(b2 * t, -1), targets.reshape(-1), seq.reshape(-1)


def _check_head(hidden, weight, bias, targets):
    """Dtypes and shapes of the head's inputs (flat hidden [N, d]), naming the argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, not {t.dtype}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, not {targets.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, d] with d = {hidden.shape[-1]} (hidden's last dimension); got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")


def _reference(flat_h, weight, flat_t, seq, hidden, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight,
               ref_bias, num_pairs, targets, sequence_ids, softcap, temperature, ignore_index, backend, vocab_parallel):
    """The reference's sequence log-probs [2B] (2i chosen, 2i + 1 rejected)."""
    if ref_hidden is not None:
        if hidden.dim() == 3:
            n_seq = hidden.shape[0]
        elif num_pairs is not None:
            n_seq = 2 * num_pairs
        else:  # read from the data: one device sync, and a graph break under torch.compile (pass num_pairs)
            keep = flat_t != ignore_index
            n_seq = 2 * (int(seq[keep].max()) // 2 + 1) if keep.any() else 0
        ref_h, _, _ = _flatten_layout(ref_hidden, targets, sequence_ids)
        if ref_h.shape != flat_h.shape:
            raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}; got {tuple(ref_hidden.shape)}")
        ref_w = ref_weight if ref_weight is not None else weight
        _check_head(ref_h, ref_w, ref_bias, flat_t)
        with torch.no_grad():
            token = ops.logprobs_from_hidden(ref_h, ref_w, flat_t, ref_bias, softcap=softcap, temperature=temperature,
                                             ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel)
            keep = flat_t != ignore_index
            # ignored rows add 0 to sequence 0: their ids may be anything (prompt, padding)
            return sum_by_sequence(torch.where(keep, token.double(), 0.0), torch.where(keep, seq, 0), n_seq)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("pass the reference as ref_chosen_logps and ref_rejected_logps, or as ref_hidden")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a [B] floating-point tensor; got {tuple(t.shape)} {t.dtype}")
    if ref_chosen_logps.shape != ref_rejected_logps.shape:
        raise ValueError(f"ref_chosen_logps {tuple(ref_chosen_logps.shape)} and ref_rejected_logps "
                         f"{tuple(ref_rejected_logps.shape)} must have the same shape")
    n_pairs = ref_chosen_logps.shape[0]
    if (hidden.dim() == 3 and hidden.shape[0] != 2 * n_pairs) or (num_pairs is not None and num_pairs != n_pairs):
        got = hidden.shape[0] // 2 if hidden.dim() == 3 else num_pairs
        raise ValueError(f"ref_chosen_logps / ref_rejected_logps: {n_pairs} reference pairs for {got} policy pairs")
    return torch.stack([ref_chosen_logps, ref_rejected_logps], 1).reshape(-1).detach()


def fused_linear_dpo_loss(hidden, weight, targets, sequence_ids=None, *, bias=None, ref_chosen_logps=None,
                          ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                          num_pairs: int | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
                          label_smoothing: float = 0.0, gamma: float = 1.0, softcap: float | None = None,
                          temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, chunk_bytes: int | None = None,
                          reduction: str = "mean", backend: str | None = None, return_metrics: bool = True,
                          sequence_stats: bool = False, vocab_parallel: bool = False):
    """DPO-family loss from the policy's final hidden states, differentiable w.r.t. hidden, weight and bias.

    Layout: hidden [N, d] with sequence_ids [N] (int; 2i: chosen of pair i, 2i + 1: rejected;
    prompt and padding rows carry ignore_index in targets, so a packed prompt + chosen + rejected
    layout works), or [2B, T, d] with chosen rows first (sequence_ids None). targets: next-token
    ids aligned with hidden ([N] or [2B, T], int64). hidden: float32 / bfloat16 / float16 /
    float64; weight [V, d] and bias [V] (or None) of the output head, any floating dtype (hidden
    is cast to the weight's). Head: z = (hidden @ weight.T + bias) / temperature, then
    softcap·tanh(z / softcap) if softcap (both as the model applies them).

    The reference: precomputed sequence sums ref_chosen_logps / ref_rejected_logps [B] (float),
    or ref_hidden (the reference model's hidden states, hidden's layout) with ref_weight (default:
    weight) and ref_bias (default: none). num_pairs: B, needed only for ref_hidden in the
    flat layout, where it is otherwise read from sequence_ids (a device sync and, under
    torch.compile, a graph break).

    Loss (z = policy log-ratio minus gamma·reference log-ratio, see the module): loss_type one of
    "sigmoid" (DPO; label_smoothing ε in [0, 1] gives cDPO), "robust" (ε < 0.5), "hinge" (SLiC),
    "ipo" (on mean token log-probs), "gamma" (DPO^γ: gamma scales the reference log-ratio; other
    types use 1); beta > 0. reduction: "mean" over pairs (default), "sum", or "none" (per-pair
    losses [B]; the backward then recomputes the chunks).

    chunk_bytes: memory for one chunk of logits (None: 256 MiB on GPU, 64 MiB on CPU). backend:
    "triton", "cpp" or "torch" for the per-chunk log-softmax (None: $PREFRANK_BACKEND, else the
    fastest for hidden). Works under torch.compile(fullgraph=True) (flat ref_hidden: pass num_pairs).

    Returns the loss (fp32; float64 for float64 hidden) if not return_metrics, else (loss, metrics):
    metrics are 0-dim tensors (dpo_metrics; no device sync: call .item() to read one). With
    sequence_stats the metrics also hold, per pair and sequence ([B, 2] float tensors, column 0
    chosen, detached): the policy's "sequence_logps"; its "sequence_tokens" (target tokens); and
    sums over its tokens of the entropy of the next-token distribution ("sequence_entropy"), of
    the mean logit over the vocabulary ("sequence_logits") and of whether the target is the
    (first) argmax ("sequence_top1"), computed from the logits the loss computes anyway (not with vocab_parallel; what
    trainers log). Bad input (shapes, dtypes, options, target ids, NaN / inf) raises, naming the
    argument. A DTensor weight, bias, ref_weight or ref_bias sharded Shard(0) on a 1-D mesh (others: refused)
    (FSDP2's, the lm_head as its own unit) is gathered for the op, its gradient returned sharded and rank-averaged
    as FSDP2's (ops/sharded.py); vocab_parallel: split by vocabulary over tensor-parallel ranks (dpo/vocab_parallel.py).
    """
    if vocab_parallel:  # each rank scores its vocabulary shard (dpo/vocab_parallel.py)
        return vocab_parallel_dpo_loss(**{k: v for k, v in locals().items() if k != "vocab_parallel"})
    weight, bias, ref_weight, ref_bias = gather_head(weight=weight, bias=bias, ref_weight=ref_weight,
                                                     ref_bias=ref_bias)
    _check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, softcap=softcap,
                   temperature=temperature, reduction=reduction, chunk_bytes=chunk_bytes)
    flat_h, flat_t, seq = _flatten_layout(hidden, targets, sequence_ids)
    _check_head(flat_h, weight, bias, flat_t)
    backend = backends.choose(flat_h, backend)
    ref_logps = _reference(flat_h, weight, flat_t, seq, hidden, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                           ref_weight, ref_bias, num_pairs, targets, sequence_ids, softcap, temperature, ignore_index,
                           backend, False)
    grad = torch.is_grad_enabled()
    needs = (grad and flat_h.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    loss, policy, stats, *_ = torch.ops.prefrank.fused_linear_dpo(
        flat_h, weight, bias, flat_t.long(), seq.long(), ref_logps, float(beta), loss_type, float(label_smoothing),
        float(gamma), None if softcap is None else float(softcap), float(temperature), ignore_index, chunk_bytes,
        backend, sequence_stats, reduction, *needs)
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
    """nn.Module form of fused_linear_dpo_loss: configure once (the keyword options of fused_linear_dpo_loss:
    beta, loss_type, label_smoothing, gamma, softcap, temperature, ignore_index, chunk_bytes, reduction, backend,
    return_metrics, sequence_stats, vocab_parallel), call with (hidden, weight, targets, sequence_ids=None,
    bias=None, ref_chosen_logps=..., ...); any option passed to a call overrides the configured one for that call."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0,
                 softcap: float | None = None, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 chunk_bytes: int | None = None, reduction: str = "mean", backend: str | None = None,
                 return_metrics: bool = True, sequence_stats: bool = False, vocab_parallel: bool = False):
        super().__init__()
        _check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, softcap=softcap,
                       temperature=temperature, reduction=reduction, chunk_bytes=chunk_bytes)
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(ops.BACKENDS)}")
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
                            softcap=softcap, temperature=temperature, ignore_index=ignore_index,
                            chunk_bytes=chunk_bytes, reduction=reduction, backend=backend,
                            return_metrics=return_metrics, sequence_stats=sequence_stats, vocab_parallel=vocab_parallel)

    def forward(self, hidden, weight, targets, sequence_ids=None, bias=None, **kwargs):
        return fused_linear_dpo_loss(hidden, weight, targets, sequence_ids, bias=bias, **{**self.options, **kwargs})
