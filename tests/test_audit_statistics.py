"""The statistics of the one-run privacy audit (simulations/audit/statistics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.audit.statistics import (
    GUESS_FRACTIONS,
    audit_bound,
    correct_guesses,
    epsilon_lower_bound,
    guess_counts,
    largest_bound,
    p_value,
)


@pytest.mark.parametrize("delta", [0.0, 1e-6, 5e-4])
@pytest.mark.parametrize(("canaries", "guesses", "correct"), [(100, 50, 50), (500, 250, 230), (500, 50, 40), (1000, 100, 60)])
def test_the_p_value_grows_with_epsilon(canaries, guesses, correct, delta):
    """A larger epsilon allows more correct guesses: the p-value never falls as epsilon grows
    (so bisection finds the one boundary), and it reaches 1."""
    epsilons = np.linspace(0, 15, 600)
    values = np.array([p_value(e, delta, canaries, guesses, correct) for e in epsilons])
    assert np.all(np.diff(values) >= -1e-12)
    assert values[-1] > 0.99 and 0 <= values[0] < 1


def test_the_delta_term_only_adds():
    assert p_value(2.0, 1e-4, 500, 100, 90) > p_value(2.0, 0.0, 500, 100, 90)
    assert p_value(2.0, 0.5, 500, 100, 90) == 1.0


@pytest.mark.parametrize("guesses", [10, 20, 50, 250])
def test_perfect_guesses_give_the_closed_form(guesses):
    """Every guess right, delta 0: the p-value is q^r, so the bound solves q^r = 0.05,
    epsilon = log(q / (1 - q))."""
    q = 0.05 ** (1 / guesses)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(1000, guesses, guesses, 0.0, 0.05) == pytest.approx(expected, abs=1e-6)
    assert p_value(expected * 0.999, 0.0, 1000, guesses, guesses) < 0.05 < p_value(expected * 1.001, 0.0, 1000, guesses, guesses)


def test_the_largest_bound_is_the_best_grid_point_under_bonferroni():
    significance = 0.05 / len(GUESS_FRACTIONS)
    assert guess_counts(500) == [50, 100, 250] and guess_counts(100) == [10, 20, 50]
    q = significance ** (1 / 250)
    assert largest_bound(500, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert largest_bound(500, 0.0) == pytest.approx(4.104, abs=0.01)
    assert largest_bound(500, 1e-4) < largest_bound(500, 0.0)  # delta costs power


def test_guesses_count_the_extremes():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.4])
    included = np.array([True, False, False, True, True, False])
    # "in" for 0.9 and 0.8 (right, wrong), "out" for 0.1 and 0.2 (right, wrong)
    assert correct_guesses(scores, included, 4) == 2
    assert correct_guesses(scores, included, 2) == 2


def test_random_guesses_bound_nothing():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        included = rng.random(1000) < 0.5
        bounds.append(audit_bound(rng.standard_normal(1000), included, 0.0).epsilon_lower_bound)
    assert np.median(bounds) == 0.0 and max(bounds) < 0.3


def test_perfect_separation_reaches_the_largest_bound():
    rng = np.random.default_rng(1)
    included = rng.random(200) < 0.5
    bound = audit_bound(included.astype(float) + 0.01 * rng.standard_normal(200), included, 1e-6)
    assert bound.correct == bound.guesses == 100
    assert bound.epsilon_lower_bound == pytest.approx(largest_bound(200, 1e-6))
    assert [r for r, _, _ in bound.tried] == [20, 40, 100]


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_randomized_response_is_never_caught_above_its_epsilon(epsilon):
    """A mechanism that is exactly epsilon-DP for each canary (randomized response on its
    inclusion bit), audited with many canaries: the bound comes close to epsilon but stays
    below it (at 95% confidence; the seeds are fixed)."""
    canaries = 20_000
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    bounds = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        included = rng.random(canaries) < 0.5
        told = np.where(rng.random(canaries) < keep, included, ~included)
        scores = told + 0.001 * rng.random(canaries)  # the tie-break carries no information
        bounds.append(audit_bound(scores, included, 0.0).epsilon_lower_bound)
    assert max(bounds) < epsilon
    assert min(bounds) > 0.6 * epsilon  # and the audit is not vacuous


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        p_value(1.0, 0.0, 10, 12, 3)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 4, 4, 0.0, significance=1.5)
    with pytest.raises(ValueError):
        audit_bound(np.zeros(3), np.zeros(2, dtype=bool), 0.0)
