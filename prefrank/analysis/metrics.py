"""The paper's measurements on arrays of log-probabilities (Chen et al. 2024, "Preference Learning
Algorithms Do Not Learn Preference Rankings"). Everything is float64 numpy; w = chosen, l = rejected.

  ranking accuracy      R  = mean 1[log π(y_w|x) >= log π(y_l|x)]  (ties count as correct)
  length-normalized     R~ : the same on mean token log-probs (log π / |y|)
  idealized (Cor. 3.3)  R* = mean 1[log πref(y_w) - log πref(y_l) + (1/β) log(α / (1 - α)) > 0],
                        α clipped to [ε, 1 - ε]: the accuracy of the policy that optimizes the
                        DPO/RLHF objective perfectly, π* ∝ πref · exp(r / β)
  DPO loss              ℓ = -log σ(β[(log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l))]);
                        DPO^γ scales the reference log-ratio by γ
  Theorem 4.1           with c = log πref(y_l) - log πref(y_w): πθ ranks the pair correctly iff
                        ℓ <= -log σ(β c). c is the pair's difficulty.
"""
import numpy as np

from prefrank.errors import InputError

DEFAULT_BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)
DEFAULT_EPSILON = 1e-3


def _finite(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(f"{name}: {int(bad.sum())} non-finite values (first at position {int(np.argmax(bad))})")
    return x


def _alpha(alpha) -> np.ndarray:
    a = _finite("alpha", alpha)
    if ((a < 0) | (a > 1)).any():
        raise InputError("alpha must lie in [0, 1]")
    return a


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def ranking_correct(logp_w, logp_l, alpha=None, tie_band: float | None = None) -> np.ndarray:
    """1[log π(y_w) >= log π(y_l)] per pair. With `tie_band`, pairs whose raters tied (α = 0.5)
    count as correct when the model's log-likelihoods are within the band instead."""
    w, l = _finite("logp_w", logp_w), _finite("logp_l", logp_l)
    correct = w >= l
    if tie_band is not None:
        if alpha is None:
            raise InputError("a tie band needs alpha (votes)")
        tied = _alpha(alpha) == 0.5
        correct = np.where(tied, np.abs(w - l) <= tie_band, correct)
    return correct


def length_normalized(logp, n_tokens) -> np.ndarray:
    n = np.asarray(n_tokens, dtype=np.float64)
    if (n <= 0).any():
        raise InputError("token counts must be positive")
    return _finite("logp", logp) / n


def idealized_correct(ref_w, ref_l, alpha, beta: float, epsilon: float = DEFAULT_EPSILON,
                      tie_band: float | None = None) -> np.ndarray:
    """Per pair: does the idealized policy π* ∝ πref·exp(r/β) rank y_w above y_l (Cor. 3.3)?
    With `tie_band`, a pair whose raters tied (α = 0.5, log-odds 0, so π*'s log-likelihood
    difference is the reference's) counts as correct when that difference is within the band."""
    if beta <= 0:
        raise InputError("beta must be positive")
    if not 0 <= epsilon < 0.5:
        raise InputError("epsilon must lie in [0, 0.5)")
    a = np.clip(_alpha(alpha), epsilon, 1 - epsilon)
    with np.errstate(divide="ignore"):  # epsilon = 0 and alpha in {0, 1}: ±inf, ranked as such
        log_odds = np.log(a) - np.log1p(-a)
    difference = _finite("ref_w", ref_w) - _finite("ref_l", ref_l)
    correct = difference + log_odds / beta > 0
    if tie_band is not None:
        correct = np.where(_alpha(alpha) == 0.5, np.abs(difference) <= tie_band, correct)
    return correct


def idealized_sweep(ref_w, ref_l, alpha, betas=DEFAULT_BETAS, epsilon: float = DEFAULT_EPSILON,
                    n_boot: int = 1000, seed: int = 0, tie_band: float | None = None) -> dict:
    """R* for each β with its bootstrap 95% CI, and min / median / max over the sweep."""
    correct = {float(b): idealized_correct(ref_w, ref_l, alpha, b, epsilon, tie_band) for b in betas}
    per_beta = {b: float(c.mean()) for b, c in correct.items()}
    values = list(per_beta.values())
    return {"per_beta": per_beta, "per_beta_ci95": {b: list(bootstrap_ci(c, n_boot, seed=seed)) for b, c in correct.items()},
            "min": min(values), "median": float(np.median(values)), "max": max(values)}


def dpo_margin(pol_w, pol_l, ref_w, ref_l, beta: float, gamma: float = 1.0) -> np.ndarray:
    """β[(log πθ(y_w) - log πθ(y_l)) - γ (log πref(y_w) - log πref(y_l))]: the reward margin."""
    policy = _finite("pol_w", pol_w) - _finite("pol_l", pol_l)
    reference = _finite("ref_w", ref_w) - _finite("ref_l", ref_l)
    return beta * (policy - gamma * reference)


def sigmoid_dpo_loss(pol_w, pol_l, ref_w, ref_l, beta: float, gamma: float = 1.0) -> np.ndarray:
    """Per-pair DPO (γ = 1) or DPO^γ loss, -log σ(margin), computed stably."""
    return -log_sigmoid(dpo_margin(pol_w, pol_l, ref_w, ref_l, beta, gamma))


def theorem41(pol_w, pol_l, ref_w, ref_l, beta: float, rtol: float = 1e-9) -> dict:
    """Theorem 4.1 per pair: difficulty c, loss, the bound -log σ(βc), whether πθ ranks the pair
    correctly, whether the loss says so, and the pairs where the two disagree beyond float
    rounding (a violation is a bug in the inputs or the arithmetic, never expected)."""
    c = _finite("ref_l", ref_l) - _finite("ref_w", ref_w)
    loss = sigmoid_dpo_loss(pol_w, pol_l, ref_w, ref_l, beta)
    bound = -log_sigmoid(beta * c)
    correct = ranking_correct(pol_w, pol_l)
    predicted = loss <= bound
    near = np.abs(loss - bound) <= rtol * (1.0 + np.abs(bound))  # where rounding may decide either way
    violations = np.flatnonzero((correct != predicted) & ~near)
    return {"c": c, "loss": loss, "bound": bound, "correct": correct, "predicted": predicted,
            "violations": violations}


GROUPS = ("ref correct, now correct", "ref correct, now incorrect", "ref incorrect, now correct",
          "ref incorrect, now incorrect")


def flip_groups(ref_correct, now_correct, loss, margin, delta_w=None, delta_l=None) -> list[dict]:
    """The four groups of pairs by (reference correct?, policy correct?): count, share, mean DPO
    loss and mean reward margin, and with the likelihood changes (displacement()) the share whose
    chosen completion lost likelihood and the mean changes (None for an empty group)."""
    ref_correct, now_correct = np.asarray(ref_correct, bool), np.asarray(now_correct, bool)
    loss, margin = np.asarray(loss, np.float64), np.asarray(margin, np.float64)
    rows = []
    for name, (r, n) in zip(GROUPS, [(True, True), (True, False), (False, True), (False, False)]):
        member = (ref_correct == r) & (now_correct == n)
        count = int(member.sum())
        mean = lambda x: float(np.asarray(x, np.float64)[member].mean()) if count else None  # noqa: E731
        row = {"group": name, "count": count, "share": count / max(len(member), 1), "mean_loss": mean(loss),
               "mean_margin": mean(margin)}
        if delta_w is not None:
            row.update(share_chosen_displaced=mean(np.asarray(delta_w) < 0), mean_delta_chosen=mean(delta_w),
                       mean_delta_rejected=mean(delta_l))
        rows.append(row)
    return rows


def displacement(pol_w, pol_l, ref_w, ref_l, now_correct) -> dict:
    """Likelihood displacement (Razin et al., ICLR 2025, "Unintentional Unalignment: Likelihood
    Displacement in Direct Preference Optimization"): per pair Δ_w = log πθ(y_w) − log πref(y_w)
    and Δ_l = log πθ(y_l) − log πref(y_l) (arrays "delta_w", "delta_l"), and the shares of pairs
    whose chosen completion lost likelihood (Δ_w < 0), whose two completions both lost it, and
    that the policy ranks right only because the rejected fell further (ranked right, Δ_l < Δ_w < 0)."""
    delta_w = _finite("pol_w", pol_w) - _finite("ref_w", ref_w)
    delta_l = _finite("pol_l", pol_l) - _finite("ref_l", ref_l)
    now_correct = np.asarray(now_correct, bool)
    share = lambda mask: float(mask.mean()) if len(mask) else None  # noqa: E731
    stat = lambda f, x: float(f(x)) if len(x) else None  # noqa: E731
    return {"delta_w": delta_w, "delta_l": delta_l,
            "share_chosen_displaced": share(delta_w < 0),
            "share_both_decreased": share((delta_w < 0) & (delta_l < 0)),
            "share_ranked_right_by_rejected_falling": share(now_correct & (delta_l < delta_w) & (delta_w < 0)),
            "mean_delta_chosen": stat(np.mean, delta_w), "median_delta_chosen": stat(np.median, delta_w),
            "mean_delta_rejected": stat(np.mean, delta_l), "median_delta_rejected": stat(np.median, delta_l)}


def bootstrap_ci(correct, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes. Resampling n outcomes with
    replacement and counting successes is exactly a Binomial(n, mean) draw, so none is materialized."""
    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    if n == 0:
        return (float("nan"), float("nan"))
    means = np.random.default_rng(seed).binomial(n, correct.mean(), size=n_boot) / n
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def bootstrap_ratio_ci(numerators, denominators, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                       block: int = 64) -> tuple[float, float]:
    """Percentile bootstrap interval of Σ numerators / Σ denominators, resampling the units (e.g.
    prompts, each with its correct and total pair counts) with replacement; a mean when every
    denominator is 1."""
    num, den = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    n = len(num)
    if n == 0 or den.sum() == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, n_boot, block):  # multinomial counts: how often each unit is drawn
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(block, n_boot - start))
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append((counts @ num) / (counts @ den))
    ratios = np.concatenate(ratios)
    ratios = ratios[np.isfinite(ratios)]
    tail = (1 - level) / 2
    return float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail))


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = _average_ranks(np.asarray(x, np.float64)), _average_ranks(np.asarray(y, np.float64))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    first = np.r_[True, sorted_v[1:] != sorted_v[:-1]]  # where each run of equal values starts
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(v)]
    ranks = np.empty(len(v))
    ranks[order] = ((starts + ends - 1) / 2)[np.cumsum(first) - 1]
    return ranks
