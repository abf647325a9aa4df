"""The statistics of a one-run privacy audit: guesses from the canaries' scores, the p-value of
a count of correct guesses under (epsilon, delta)-DP, and the empirical lower bound on epsilon.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023: m
canaries, each included independently with probability 1/2. The auditor guesses "in" for the
k+ canaries with the highest scores and "out" for the k- lowest, abstaining on the rest. If the
training is (epsilon, delta)-DP with respect to each canary, the number W of correct guesses
among the r = k+ + k- made is stochastically dominated, up to a delta term, by
Binomial(r, q) with q = e^eps / (1 + e^eps), the accuracy of epsilon-randomized response
(their Theorem 3.1; with delta, Theorem 5.2 and the p-value of their Appendix D):

    P[W >= v] <= beta + 2 m delta alpha,
    beta = P[Binomial(r, q) >= v],  alpha = max over i in 1..v of P[v - i <= Binomial(r, q) < v] / i.

The lower bound is the largest epsilon whose p-value is below the significance level: at that
confidence the training is not (epsilon', delta)-DP for any epsilon' up to it.

How many guesses to make is fixed before any run: r is tried at the fractions GUESS_FRACTIONS of
m (k+ = k- = r / 2), each at significance (1 - confidence) / len(GUESS_FRACTIONS) (Bonferroni),
and the largest of those bounds is reported; so the report holds at the stated confidence
although r was chosen after seeing the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.1, 0.2, 0.5)  # r / m, chosen a priori
_BISECTION_STEPS = 60


def p_value(epsilon: float, delta: float, canaries: int, guesses: int, correct: int) -> float:
    """P[at least `correct` of `guesses` right] bounded for an (epsilon, delta)-DP training with
    `canaries` canaries (Steinke, Nasr and Jagielski 2023, Theorem 5.2 / Appendix D)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(correct - 1, guesses, q))
    alpha = 0.0
    if delta > 0 and correct > 0:
        # P[Binomial = v - 1], P[Binomial = v - 2], ..., P[Binomial = 0]: their running sums over i
        below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
        alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(1.0, beta + alpha * delta * 2 * canaries)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, significance: float = 1 - CONFIDENCE) -> float:
    """The largest epsilon whose p-value is below `significance` (0 if even epsilon = 0 is not
    rejected), by bisection as in the paper's Appendix D."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")

    def rejected(epsilon: float) -> bool:
        return p_value(epsilon, delta, canaries, guesses, correct) < significance

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # every guess right still bounds epsilon: the p-value reaches 1 eventually
        low, high = high, 2 * high
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def guess_counts(canaries: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[int]:
    """The guess counts r tried for `canaries` canaries: even (k+ = k- = r / 2), at least 2."""
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    return sorted({min(canaries - canaries % 2, 2 * max(1, round(f * canaries / 2))) for f in fractions})


def correct_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Guess "in" for the guesses / 2 highest scores, "out" for the guesses / 2 lowest; the
    number right. Ties are broken by canary order, which is independent of inclusion."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    half = guesses // 2
    included = np.asarray(included, dtype=bool)
    return int(included[order[len(order) - half:]].sum() + (~included[order[:half]]).sum())


@dataclass(frozen=True)
class AuditBound:
    epsilon_lower_bound: float
    guesses: int  # r of the reported bound
    correct: int  # v of the reported bound
    confidence: float
    tried: tuple[tuple[int, int, float], ...]  # (r, v, bound) for every r of the grid


def audit_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditBound:
    """The empirical lower bound of a run: every r of the grid at the Bonferroni-corrected
    significance, the largest bound reported."""
    canaries = len(scores)
    if canaries != len(included) or canaries < 2:
        raise ValueError(f"need one inclusion flag per score and at least 2 canaries, got {canaries} and {len(included)}")
    counts = guess_counts(canaries, fractions)
    significance = (1 - confidence) / len(counts)
    tried = []
    for r in counts:
        v = correct_guesses(scores, included, r)
        tried.append((r, v, epsilon_lower_bound(canaries, r, v, delta, significance)))
    r, v, bound = max(tried, key=lambda t: (t[2], -t[0]))
    return AuditBound(bound, r, v, confidence, tuple(tried))


def largest_bound(canaries: int, delta: float, confidence: float = CONFIDENCE, fractions: Sequence[float] = GUESS_FRACTIONS) -> float:
    """The bound when every guess is right: the most that `canaries` canaries can show."""
    counts = guess_counts(canaries, fractions)
    significance = (1 - confidence) / len(counts)
    return max(epsilon_lower_bound(canaries, r, r, delta, significance) for r in counts)
