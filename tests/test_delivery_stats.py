"""The statistics of the delivery loop: user splits and uplift tests (simulations/delivery/ab_test.py),
exposure and Gini (simulations/delivery/fairness.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from simulations.delivery.ab_test import assign_arm, assign_arms, ratio_uplift, uplift
from simulations.delivery.fairness import exposure_shares, gini, lorenz_curve, per_merchant_ratio_uplift, per_merchant_uplift

ROOT = Path(__file__).resolve().parents[1]
USERS = [f"user-{i}" for i in range(10_000)]
REPEATS = 400


# ------------------------------------------------------------------------------ split


def test_the_split_is_stable_within_and_across_processes():
    """hashlib, not hash(): a fresh interpreter with another PYTHONHASHSEED puts every user in the same arm."""
    users = USERS[:50]
    here = [assign_arm(u, "slate-size") for u in users]
    assert here == [assign_arm(u, "slate-size") for u in users]
    assert list(assign_arms(users, "slate-size")) == [arm == "B" for arm in here]
    probe = textwrap.dedent(
        f"""
        import json
        from simulations.delivery.ab_test import assign_arm
        print(json.dumps([assign_arm(u, "slate-size") for u in {users!r}]))
        """
    )
    # this process's hash seed is random; the probe's is fixed, so the two differ (but for a 1 in 2^32 chance)
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here


def test_the_split_is_pinned():
    """A change of the hash would silently reshuffle running experiments' users: this pins it."""
    assert "".join(assign_arm(f"user-{i}", "exp") for i in range(16)) == "BABABBAAABAABBAA"


def test_the_split_is_balanced():
    assert assign_arms(USERS, "balance").mean() == pytest.approx(0.5, abs=0.02)
    assert assign_arms(USERS, "balance", treatment_share=0.2).mean() == pytest.approx(0.2, abs=0.02)
    # a share only moves users from A to B
    assert np.all(assign_arms(USERS, "balance", 0.5)[assign_arms(USERS, "balance", 0.2)])
    assert not assign_arms(USERS, "balance", 0.0).any() and assign_arms(USERS, "balance", 1.0).all()
    with pytest.raises(ValueError):
        assign_arm("u", "e", 1.5)


def test_experiments_split_independently():
    agreement = np.mean(assign_arms(USERS, "first") == assign_arms(USERS, "second"))
    assert agreement == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------ uplift


def _users(rng: np.random.Generator, n: int, ctr: float, lift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clicks and impressions of n users: heterogeneous click rates (Beta, mean ctr x lift) and
    Poisson impression counts, some users with none."""
    rates = rng.beta(2.0, 2.0 * (1 - ctr) / ctr, size=n) * lift
    impressions = rng.poisson(8.0, size=n)
    return rng.binomial(impressions, np.clip(rates, 0, 1)), impressions


def _user_ctr(clicks: np.ndarray, impressions: np.ndarray) -> np.ndarray:
    return clicks[impressions > 0] / impressions[impressions > 0]


def test_uplift_under_the_null_is_calibrated():
    """Both arms from one distribution: about 5% false positives at 0.05, and the 95% intervals
    cover the true zero (the absolute difference and the relative uplift alike) about 95% of the time."""
    rng = np.random.default_rng(0)
    results = [uplift(_user_ctr(*_users(rng, 200, 0.1)), _user_ctr(*_users(rng, 200, 0.1))) for _ in range(REPEATS)]
    p_values = np.array([r.p_value for r in results])
    assert 0.02 <= np.mean(p_values < 0.05) <= 0.09
    assert np.mean(p_values < 0.5) == pytest.approx(0.5, abs=0.08)  # roughly uniform, not only in the tail
    assert np.mean([r.difference_ci_low <= 0 <= r.difference_ci_high for r in results]) == pytest.approx(0.95, abs=0.035)
    assert np.mean([r.uplift_ci_low <= 0 <= r.uplift_ci_high for r in results]) == pytest.approx(0.95, abs=0.035)
    # Fieller's relative interval excludes 0 exactly when the test rejects
    assert all((r.uplift_ci_low > 0 or r.uplift_ci_high < 0) == (r.p_value < 0.05) for r in results)


def test_uplift_finds_a_real_effect():
    """+20% on every user's click rate, 1000 users per arm: significant, and both intervals cover the truth."""
    rng = np.random.default_rng(1)
    result = uplift(_user_ctr(*_users(rng, 1000, 0.1)), _user_ctr(*_users(rng, 1000, 0.1, lift=1.2)))
    assert result.p_value < 0.01 and result.significant()
    assert result.uplift_ci_low <= 0.2 <= result.uplift_ci_high
    assert result.difference_ci_low <= 0.02 <= result.difference_ci_high  # true per-user CTR 0.1 -> 0.12
    assert result.uplift == pytest.approx(result.difference / result.control_mean)
    record = result.to_record()
    assert (record["control"], record["uplift"], record["ci_low"], record["ci_high"]) == (
        result.control_mean,
        result.uplift,
        result.uplift_ci_low,
        result.uplift_ci_high,
    )
    assert {"control", "treatment", "uplift", "ci_low", "ci_high", "p_value", "n_control", "n_treatment", "difference"} <= set(record)
    assert {"difference_ci_low", "difference_ci_high"} <= set(record) and record["n_treatment"] == result.n_treatment


def test_uplift_agrees_with_welch():
    rng = np.random.default_rng(2)
    control, treatment = rng.normal(1.0, 1.0, 30), rng.normal(1.5, 3.0, 80)
    result = uplift(control, treatment, confidence=0.9)
    reference = stats.ttest_ind(treatment, control, equal_var=False)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert (result.difference_ci_low, result.difference_ci_high) == pytest.approx(tuple(reference.confidence_interval(0.9)))
    assert (result.n_control, result.n_treatment) == (30, 80)


def test_uplift_degenerate_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        uplift([0.1], [0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        uplift([0.1, np.nan], [0.2, 0.3])
    # both arms constant: the difference is exact
    same = uplift([0.1, 0.1, 0.1], [0.1, 0.1])
    assert same.p_value == 1.0 and same.difference == 0.0 and (same.difference_ci_low, same.difference_ci_high) == (0.0, 0.0)
    apart = uplift([0.1, 0.1], [0.3, 0.3])
    assert apart.p_value == 0.0 and apart.uplift == pytest.approx(2.0) and apart.uplift_ci_low == pytest.approx(2.0)
    # a zero control: the relative uplift has no finite value
    zero = uplift([0.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    assert zero.uplift == math.inf and math.isnan(zero.uplift_ci_low) and 0 < zero.p_value < 1
    assert math.isnan(uplift([0.0, 0.0], [0.0, 0.0]).uplift)
    # a control indistinguishable from 0: Fieller's set is unbounded
    wide = uplift([-1.0, 1.2, -0.9, 1.0], [1.0, 2.0, 3.0, 1.5])
    assert (wide.uplift_ci_low, wide.uplift_ci_high) == (-math.inf, math.inf)


# ------------------------------------------------------------------------------ ratio uplift


def test_ratio_uplift_point_estimate_is_the_ratio_of_sums():
    rng = np.random.default_rng(3)
    (cc, ci), (tc, ti) = _users(rng, 300, 0.1), _users(rng, 250, 0.1, lift=1.1)
    result = ratio_uplift(cc, ci, tc, ti)
    assert result.control_mean == pytest.approx(cc.sum() / ci.sum())
    assert result.treatment_mean == pytest.approx(tc.sum() / ti.sum())
    assert result.uplift == pytest.approx((tc.sum() / ti.sum()) / (cc.sum() / ci.sum()) - 1)
    assert (result.n_control, result.n_treatment, result.method) == (300, 250, "delta")


def test_ratio_uplift_delta_variance_matches_the_formula():
    """The arm variance is Deng et al.'s (s_xx - 2 R s_xy + R^2 s_yy) / (n mean(y)^2): check the
    difference's interval against it written out."""
    rng = np.random.default_rng(4)
    (cc, ci), (tc, ti) = _users(rng, 400, 0.1), _users(rng, 400, 0.1)

    def variance(x: np.ndarray, y: np.ndarray) -> float:
        r = x.sum() / y.sum()
        cov = np.cov(x, y)
        return float((cov[0, 0] - 2 * r * cov[0, 1] + r**2 * cov[1, 1]) / (x.size * y.mean() ** 2))

    se = math.sqrt(variance(cc, ci) + variance(tc, ti))
    result = ratio_uplift(cc, ci, tc, ti)
    assert result.difference_ci_high - result.difference_ci_low == pytest.approx(2 * 1.959963984540054 * se)


@pytest.mark.parametrize("lift", [1.0, 1.2])
def test_ratio_uplift_is_calibrated(lift):
    """Per-user click rates and Poisson impression counts vary: the intervals cover the true
    relative uplift (lift - 1, as impressions do not depend on the rate) about 95% of the time;
    under the null about 5% false positives."""
    rng = np.random.default_rng(5)
    results = [ratio_uplift(*_users(rng, 300, 0.1), *_users(rng, 300, 0.1, lift=lift)) for _ in range(REPEATS)]
    assert np.mean([r.uplift_ci_low <= lift - 1 <= r.uplift_ci_high for r in results]) == pytest.approx(0.95, abs=0.035)
    assert np.mean([r.difference_ci_low <= 0.1 * (lift - 1) <= r.difference_ci_high for r in results]) == pytest.approx(0.95, abs=0.035)
    if lift == 1.0:
        assert 0.02 <= np.mean([r.p_value < 0.05 for r in results]) <= 0.09
    else:
        assert np.mean([r.p_value < 0.05 for r in results]) > 0.3  # some power, at 300 users an arm


def test_ratio_uplift_finds_a_real_effect():
    rng = np.random.default_rng(6)
    result = ratio_uplift(*_users(rng, 2000, 0.1), *_users(rng, 2000, 0.1, lift=1.2))
    assert result.p_value < 0.01 and result.uplift_ci_low <= 0.2 <= result.uplift_ci_high


def test_ratio_uplift_degenerate_inputs():
    with pytest.raises(ValueError, match="positive sum"):
        ratio_uplift([0, 0], [0, 0], [1, 0], [2, 1])
    with pytest.raises(ValueError, match="differ in length"):
        ratio_uplift([0, 1, 1], [1, 2], [1, 0], [2, 1])
    exact = ratio_uplift([1, 2], [10, 20], [2, 4], [10, 20])  # every user at the arm's rate: no variance
    assert exact.p_value == 0.0 and exact.uplift == pytest.approx(1.0) and exact.uplift_ci_high == pytest.approx(1.0)


# ------------------------------------------------------------------------------ fairness


def test_gini_known_values():
    assert gini([1, 1, 1, 1]) == 0.0
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)  # (n - 1) / n: one of n holds everything
    assert gini([0, 0, 0, 0]) == 0.0
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)  # mean |xi - xj| over all 16 pairs = 1.25, / (2 x mean 2.5)
    with pytest.raises(ValueError):
        gini([1, -1])


def test_gini_is_invariant_to_scale_and_order():
    values = np.random.default_rng(7).exponential(size=50)
    assert gini(values * 1000) == pytest.approx(gini(values))
    assert gini(values[::-1]) == pytest.approx(gini(values))
    # and it is 1 - twice the area under the Lorenz curve
    x, y = lorenz_curve(values)
    area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))
    assert gini(values) == pytest.approx(1 - 2 * area)


def test_lorenz_curve_endpoints():
    x, y = lorenz_curve([5, 0, 1, 4])
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert list(y) == pytest.approx([0, 0, 0.1, 0.5, 1.0])
    assert np.all(np.diff(y) >= 0)
    x, y = lorenz_curve([0, 0])
    assert list(y) == list(x) == [0.0, 0.5, 1.0]


def test_exposure_shares_by_hand():
    # 6 ads: group 0 owns ads 0, 1, 2; group 1 owns 3, 4; group 2 owns 5; group 3 owns none
    groups = np.array([0, 0, 0, 1, 1, 2])
    # 10 impressions: ad 0 x5, ad 1 x1, ad 3 x4; ads 2, 4 and 5 never shown
    shown = np.array([0, 0, 0, 0, 0, 1, 3, 3, 3, 3])
    report = exposure_shares(shown, groups, num_groups=4)
    assert report.impressions == 10
    assert list(report.ad_impressions) == [5, 1, 0, 4, 0, 0]
    assert list(report.group_impressions) == [6, 4, 0, 0]
    assert list(report.impression_share) == pytest.approx([0.6, 0.4, 0.0, 0.0])
    assert list(report.catalog_share) == pytest.approx([0.5, 2 / 6, 1 / 6, 0.0])
    assert list(report.exposure_ratio[:3]) == pytest.approx([1.2, 1.2, 0.0]) and math.isnan(report.exposure_ratio[3])
    assert list(report.shown_share[:3]) == pytest.approx([2 / 3, 0.5, 0.0]) and math.isnan(report.shown_share[3])
    assert report.coverage == pytest.approx(0.5)
    assert report.gini_ads == pytest.approx(gini([5, 1, 0, 4, 0, 0]))
    assert report.gini_groups == pytest.approx(gini([6, 4, 0]))  # the group without ads does not count
    assert report.group_records()[1] == {
        "group": 1,
        "impressions": 4,
        "impression_share": pytest.approx(0.4),
        "catalog_share": pytest.approx(1 / 3),
        "exposure_ratio": pytest.approx(1.2),
        "shown_share": 0.5,
    }
    x, y = lorenz_curve(report.ad_impressions)
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        exposure_shares(np.array([6]), groups, 4)  # no ad 6
    with pytest.raises(ValueError):
        exposure_shares(shown, np.array([0, 4]), 4)  # no group 4


def test_exposure_without_impressions():
    report = exposure_shares(np.array([], dtype=np.int64), np.array([0, 1, 1]), 2)
    assert report.impressions == 0 and list(report.impression_share) == [0.0, 0.0]
    assert report.gini_ads == 0.0 and report.coverage == 0.0


def test_per_merchant_uplift():
    rng = np.random.default_rng(8)
    sizes = {"small": 40, "large": 800, "tiny": 3}
    control = {m: rng.normal(1.0, 1.0, n // 2) for m, n in sizes.items()}
    treatment = {m: rng.normal(1.2, 1.0, n - n // 2) for m, n in sizes.items()}
    rows = per_merchant_uplift(control, treatment)
    assert [(r.merchant, r.users) for r in rows] == [("large", 800), ("small", 40), ("tiny", 3)]
    assert rows[0].result is not None and rows[0].result.n_control == 400
    assert rows[0].result.p_value == pytest.approx(uplift(control["large"], treatment["large"]).p_value)
    assert rows[2].result is None  # one control user: no variance, no test, still listed
    with pytest.raises(ValueError, match="merchants differ"):
        per_merchant_uplift(control, {"large": treatment["large"]})
    ratio_rows = per_merchant_ratio_uplift({"m": _users(rng, 100, 0.1)}, {"m": _users(rng, 50, 0.1)})
    assert ratio_rows[0].users == 150 and ratio_rows[0].result is not None and ratio_rows[0].result.method == "delta"
