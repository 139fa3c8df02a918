"""The built-in preference task: two-digit addition, judged by simulated raters with a known
preference share.

Each prompt is "Q: a+b=?\\nA:". Candidate answers are the sum or a plausible mistake (off by one,
a dropped or doubled carry, swapped digits). A candidate's quality is q(y) = -log(1 + |y - (a+b)|);
a rater prefers y1 to y2 with the Bradley-Terry probability σ((q(y1) - q(y2)) / τ). Each pair is
labelled by majority of `raters` sampled votes, so the chosen answer is sometimes the worse one —
as in real data — and `alpha`, the true share of raters preferring the chosen answer, is known
exactly. That makes idealized ranking accuracy and win rates computable without estimation.
"""
import math
import random

from prefrank.data import Columns

ALPHABET = "0123456789+=?:QA \n"  # every character the task uses

# `chosen` is the majority of the sampled votes, `alpha` the population's share for it: a chosen
# answer the population rejects (alpha < 0.5) is the label noise the demo is about, so its rows
# are read in column order (prefrank would otherwise make the alpha side chosen) and the analysis
# counts those pairs.
COLUMNS = Columns(keep_column_order=True)


def prompt_text(a: int, b: int) -> str:
    return f"Q: {a}+{b}=?\nA:"


def answer_text(value: int) -> str:
    return f" {value}"


def mistakes(a: int, b: int) -> list[int]:
    """Plausible wrong answers to a + b (distinct, non-negative, not the sum)."""
    s = a + b
    candidates = {s - 1, s + 1, s + 10, s - 10, int(str(s)[::-1]), (a % 10 + b % 10) % 10 + 10 * (a // 10 + b // 10)}
    return sorted(c for c in candidates if c >= 0 and c != s)


def quality(value: int, a: int, b: int) -> float:
    return -math.log1p(abs(value - (a + b)))


def preference(y1: int, y2: int, a: int, b: int, tau: float) -> float:
    """P(a rater prefers y1 to y2)."""
    return 1.0 / (1.0 + math.exp(-(quality(y1, a, b) - quality(y2, a, b)) / tau))


def make_pairs(n: int, *, seed: int = 0, raters: int = 3, tau: float = 0.5) -> list[dict]:
    """`n` preference rows {id, prompt, chosen, rejected, alpha, a, b}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = mistakes(a, b)
        y1 = a + b if rng.random() < 0.5 else rng.choice(wrong)
        y2 = rng.choice([w for w in wrong if w != y1])
        p = preference(y1, y2, a, b, tau)
        votes_for_y1 = sum(rng.random() < p for _ in range(raters))
        chosen, rejected = (y1, y2) if 2 * votes_for_y1 > raters else (y2, y1)
        alpha = p if chosen == y1 else 1.0 - p
        rows.append({"id": f"add-{seed}-{i}", "prompt": prompt_text(a, b), "chosen": answer_text(chosen),
                     "rejected": answer_text(rejected), "alpha": alpha, "a": a, "b": b})
    return rows
