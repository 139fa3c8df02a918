"""The DPO-family losses on sequence log-probs, written once for the light loss (dpo_loss), the
fused loss's registered op (dpo/loss.py, which differentiates them by hand with loss_slope) and its
vocabulary-parallel form (dpo/vocab_parallel.py, which calls dpo_loss). A module of its own because
dpo/loss.py imports dpo/vocab_parallel.py: both import this one, and it imports neither.

With z = (log πθ(y_w) - log πθ(y_l)) - γ (log πref(y_w) - log πref(y_l)) (γ = 1 unless "gamma"):
  sigmoid  -(1 - ε) log σ(βz) - ε log σ(-βz)           DPO, ε = label_smoothing (cDPO)
  robust   (-(1 - ε) log σ(βz) + ε log σ(-βz)) / (1 - 2ε)
  hinge    max(0, 1 - βz)                                SLiC
  ipo      (z - 1/(2β))², on mean token log-probs        IPO
  gamma    -log σ(βz) with γ scaling the reference log-ratio (DPO^γ, Chen et al. Section 5)
Losses are averaged over pairs (reduction="mean"), summed ("sum") or returned per pair ("none").
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "gamma")
REDUCTIONS = ("mean", "sum", "none")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO-family losses [B] from sequence log-probs [B] (sums over completion tokens).
    IPO needs the completion lengths, since it works on mean token log-probs."""
    check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma)
    named = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
             "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, t in named.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == policy_chosen_logps.shape):
            raise ValueError(f"{name} must be a floating-point tensor of policy_chosen_logps' shape "
                             f"{tuple(policy_chosen_logps.shape)}; got "
                             f"{(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("ipo works on mean token log-probs: pass chosen_lengths and rejected_lengths")
    z, _ = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type, gamma,
                  chosen_lengths, rejected_lengths)
    return loss_of_margin(z, beta, loss_type, label_smoothing)


def margin(pw, pl, rw, rl, loss_type: str, gamma: float, chosen_lengths, rejected_lengths):
    """z = (policy log-ratio) - γ (reference log-ratio), on mean token log-probs for ipo, and
    (dz/dpw, dz/dpl)."""
    if loss_type == "ipo":
        z = (pw / chosen_lengths - pl / rejected_lengths) - (rw / chosen_lengths - rl / rejected_lengths)
        return z, (1 / chosen_lengths, -1 / rejected_lengths)
    return (pw - pl) - (gamma if loss_type == "gamma" else 1.0) * (rw - rl), (1.0, -1.0)


def loss_of_margin(z, beta: float, loss_type: str, eps: float):
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


def loss_slope(z, beta: float, loss_type: str, eps: float):
    """d loss / d z of loss_of_margin, written out: the fused loss's registered op runs below
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


def check_options(*, beta, loss_type, label_smoothing, gamma, softcap=None, temperature=1.0, reduction="mean",
                  chunk_bytes=None):
    """Refuse option values the losses cannot use, naming the option (no data is read); softcap,
    temperature and chunk_bytes are the fused losses' head options."""
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ValueError(f"{name} must be a finite Python number (int or float), got {value!r}")
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
