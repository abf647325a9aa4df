"""A/B tests of the delivery loop: stable user splits, and the uplift of a treatment over a control
with a significance test and confidence intervals.

The user is the unit of randomisation, so every test here is at user level: the inputs are
per-user arrays, one entry per user of the arm. One user's impressions are not independent (a
user who clicks once tends to click again), so a per-impression test (a two-proportion z-test on
pooled clicks and impressions) would treat correlated impressions as independent draws,
understate the variance and overstate significance.

uplift        a per-user metric (mean over users of e.g. each user's CTR): Welch's t-test
ratio_uplift  a ratio of sums over users (pooled CTR = clicks / impressions, conversions per
              impression, revenue per mille): the delta method at user level (Deng, Knoblich and
              Lu, "Applying the Delta Method in Metric Analytics", KDD 2018) and a z-test

Both report the absolute difference (treatment - control) with its confidence interval, and the
relative uplift (treatment / control - 1) with Fieller's interval for a ratio of two independent
estimates (see _fieller_interval).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

CONTROL = "A"
TREATMENT = "B"
_MIN_USERS = 2  # a variance needs two users per arm


@dataclass(frozen=True)
class UpliftResult:
    """The effect of the treatment arm over the control arm on one metric.

    difference  treatment - control, with its confidence interval
    uplift      relative uplift, treatment / control - 1, with Fieller's interval. When the
                control is 0 the uplift is +inf, -inf or nan (by the sign of the difference) and
                its interval (nan, nan); when the control is not distinguishable from 0 at the
                confidence level, Fieller's set is unbounded and the interval is (-inf, inf).
    p_value     two-sided, of the null hypothesis "no difference"
    """

    control_mean: float
    treatment_mean: float
    difference: float
    difference_ci_low: float
    difference_ci_high: float
    uplift: float
    uplift_ci_low: float
    uplift_ci_high: float
    p_value: float
    n_control: int
    n_treatment: int
    confidence: float
    method: str  # "welch" (per-user metric) | "delta" (ratio of sums)

    def significant(self) -> bool:
        """Whether the difference is significant at the result's own confidence level."""
        return self.p_value < 1.0 - self.confidence

    def to_record(self) -> dict[str, float | int | str]:
        """A flat record for a metrics table (the report's keys: control, treatment, uplift, ci_low, ci_high, ...)."""
        record = asdict(self)
        return {
            "control": record.pop("control_mean"),
            "treatment": record.pop("treatment_mean"),
            "uplift": record.pop("uplift"),
            "ci_low": record.pop("uplift_ci_low"),
            "ci_high": record.pop("uplift_ci_high"),
            **record,
        }


# ------------------------------------------------------------------------------ user split


def unit_interval(user_id: str, experiment: str) -> float:
    # hashlib, not hash(): str hashes are salted per process (PYTHONHASHSEED), and a user must
    # land in the same arm in every process and every round. The experiment name is part of the
    # key so that two experiments split users independently of each other.
    digest = hashlib.blake2b(f"{experiment}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_policy(user_id: str, experiment: str, arms: Sequence[str]) -> str:
    """The arm of one user in an A/B/n test of equal shares: the same uniform draw as assign_arm, cut into len(arms) equal parts."""
    return arms[min(int(unit_interval(user_id, experiment) * len(arms)), len(arms) - 1)]


def _check_share(treatment_share: float) -> None:
    if not 0.0 <= treatment_share <= 1.0:
        raise ValueError(f"treatment_share must lie in [0, 1], got {treatment_share}")


def assign_arm(user_id: str, experiment: str, treatment_share: float = 0.5) -> str:
    """The arm of one user in one experiment: "A" (control) or "B" (treatment); the same in every
    process. A user's draw is uniform in [0, 1), so raising treatment_share only moves users from
    A to B."""
    _check_share(treatment_share)
    return TREATMENT if unit_interval(user_id, experiment) < treatment_share else CONTROL


def assign_arms(user_ids: Sequence[str], experiment: str, treatment_share: float = 0.5) -> npt.NDArray[np.bool_]:
    """assign_arm for many users: True where the user is in the treatment arm ("B")."""
    _check_share(treatment_share)
    draws = np.fromiter((unit_interval(u, experiment) for u in user_ids), dtype=np.float64, count=len(user_ids))
    return draws < treatment_share


# ------------------------------------------------------------------------------ uplift


def _per_user(values: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per user), got shape {array.shape}")
    if array.size < _MIN_USERS:
        raise ValueError(f"{name} has {array.size} users; an arm needs at least {_MIN_USERS} for a variance")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite entries")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _fieller_interval(control: float, control_var: float, treatment: float, treatment_var: float, quantile: float) -> tuple[float, float]:
    """Fieller's interval for treatment / control - 1, from two independent estimates and the
    variances of those estimates: the set of rho with (treatment - rho control)^2 <= quantile^2
    (treatment_var + rho^2 control_var).

    Chosen over dividing the difference's interval by the control (which treats the control as
    known and undercovers) and over the delta method (symmetric, although a ratio's error is
    not): at rho = 1 the inequality is the test of the difference itself, so the interval
    excludes 0 exactly when the p-value is below 1 - confidence.
    """
    if control == 0.0:
        return math.nan, math.nan
    q2 = quantile**2
    a = control**2 - q2 * control_var
    if a <= 0.0:
        # the control is not distinguishable from 0: the set is unbounded (the whole line or two
        # rays); report the whole line, a superset, rather than two rays no table can show
        return -math.inf, math.inf
    b = treatment * control
    # b^2 - a c = q2 (a treatment_var + treatment^2 control_var) >= 0 when a > 0: written so, it
    # cannot go negative by rounding
    root = math.sqrt(q2 * (a * treatment_var + treatment**2 * control_var))
    return (b - root) / a - 1.0, (b + root) / a - 1.0


def _relative(difference: float, control: float) -> float:
    if control != 0.0:
        return difference / control
    # no finite relative change from a zero control: its sign survives as +-inf, "no change" is nan
    return math.copysign(math.inf, difference) if difference != 0.0 else math.nan


def _constant(values: npt.NDArray[np.float64]) -> bool:
    # exact equality, not var == 0: identical non-representable floats (0.1, 0.1, ...) give a
    # variance of rounding noise, and scipy's t-test then divides by it
    return bool(np.all(values == values[0]))


def uplift(control: npt.ArrayLike, treatment: npt.ArrayLike, confidence: float = 0.95) -> UpliftResult:
    """The uplift of the mean of a per-user metric (e.g. each user's CTR, or purchases per user),
    by Welch's t-test (scipy.stats.ttest_ind, equal_var=False): unequal variances and arm sizes
    are both normal in a delivery test.

    Raises ValueError when an arm has fewer than 2 users or a non-finite entry. When both arms
    are constant the difference is known without error: the interval is the point, and the
    p-value 1 if the arms agree, 0 if not (scipy's answer would be nan).
    """
    _check_confidence(confidence)
    c = _per_user(control, "control")
    t = _per_user(treatment, "treatment")
    if _constant(c) and _constant(t):
        # the first entries, not the means: a mean of n copies of 0.1 need not be 0.1 again
        control_mean, treatment_mean = float(c[0]), float(t[0])
        difference = treatment_mean - control_mean
        control_var = treatment_var = quantile = 0.0
        p_value, low, high = float(difference == 0.0), difference, difference
    else:
        control_mean, treatment_mean = float(c.mean()), float(t.mean())
        difference = treatment_mean - control_mean
        control_var, treatment_var = float(c.var(ddof=1)) / c.size, float(t.var(ddof=1)) / t.size
        test = stats.ttest_ind(t, c, equal_var=False)
        interval = test.confidence_interval(confidence_level=confidence)
        p_value, low, high = float(test.pvalue), float(interval.low), float(interval.high)
        # Welch-Satterthwaite degrees of freedom, so the relative interval agrees with the test
        quantile = float(stats.t.ppf(0.5 + confidence / 2.0, float(test.df)))
    return _result(control_mean, control_var, int(c.size), treatment_mean, treatment_var, int(t.size),
                   (low, high), p_value, quantile, confidence, "welch")


def _ratio_and_variance(numerators: npt.ArrayLike, denominators: npt.ArrayLike, arm: str) -> tuple[float, float, int]:
    """sum(x) / sum(y) over one arm's users and the delta method's variance of it (Deng et al.
    2018, section 3): with the user as the i.i.d. unit, sum(x) / sum(y) = mean(x) / mean(y) and

        Var ~= Var(x - R y) / (n mean(y)^2),   R = mean(x) / mean(y),

    the same as (s_xx - 2 R s_xy + R^2 s_yy) / (n mean(y)^2), written as the variance of the
    residual so that rounding cannot make it negative."""
    x = _per_user(numerators, f"{arm} numerators")
    y = _per_user(denominators, f"{arm} denominators")
    if x.shape != y.shape:
        raise ValueError(f"{arm}: numerators and denominators differ in length ({x.size} vs {y.size})")
    if np.any(y < 0) or y.sum() <= 0:
        raise ValueError(f"{arm}: denominators must be non-negative with a positive sum")
    mean_y = float(y.mean())
    ratio = float(x.sum() / y.sum())
    residual = x - ratio * y
    variance = 0.0 if _constant(residual) else float(residual.var(ddof=1)) / (x.size * mean_y**2)
    return ratio, variance, int(x.size)


def ratio_uplift(
    numerators_control: npt.ArrayLike,
    denominators_control: npt.ArrayLike,
    numerators_treatment: npt.ArrayLike,
    denominators_treatment: npt.ArrayLike,
    confidence: float = 0.95,
) -> UpliftResult:
    """The uplift of a ratio-of-sums metric, per arm sum(numerators) / sum(denominators) over the
    arm's users: CTR (clicks, impressions), conversion rate (purchases, impressions or clicks),
    revenue per mille (1000 x revenue, impressions). One entry per user; users without
    impressions count (they were randomised), with 0 in both arrays.

    Each arm's variance is the delta method's at user level (_ratio_and_variance); the arms are
    independent, so the difference's variance is their sum, with a two-sided z-test and normal
    interval (the delta method is asymptotic, so there are no degrees of freedom to correct).

    Raises ValueError when an arm has fewer than 2 users, arrays of unequal length, negative
    denominators or no denominator at all. When both variances are 0 the result is defined as
    in uplift().
    """
    _check_confidence(confidence)
    control, control_var, n_control = _ratio_and_variance(numerators_control, denominators_control, "control")
    treatment, treatment_var, n_treatment = _ratio_and_variance(numerators_treatment, denominators_treatment, "treatment")
    difference = treatment - control
    standard_error = math.sqrt(control_var + treatment_var)
    if standard_error == 0.0:
        p_value, low, high, quantile = float(difference == 0.0), difference, difference, 0.0
    else:
        quantile = float(stats.norm.ppf(0.5 + confidence / 2.0))
        p_value = float(2.0 * stats.norm.sf(abs(difference) / standard_error))
        low, high = difference - quantile * standard_error, difference + quantile * standard_error
    return _result(control, control_var, n_control, treatment, treatment_var, n_treatment, (low, high), p_value, quantile, confidence, "delta")


def _result(
    control: float, control_var: float, n_control: int, treatment: float, treatment_var: float, n_treatment: int,
    difference_ci: tuple[float, float], p_value: float, quantile: float, confidence: float, method: str,
) -> UpliftResult:
    """Both tests' result: the difference's interval as the test gives it, the relative one by Fieller at the test's quantile."""
    uplift_low, uplift_high = _fieller_interval(control, control_var, treatment, treatment_var, quantile)
    difference = treatment - control
    return UpliftResult(
        control_mean=control, treatment_mean=treatment, difference=difference,
        difference_ci_low=difference_ci[0], difference_ci_high=difference_ci[1],
        uplift=_relative(difference, control), uplift_ci_low=uplift_low, uplift_ci_high=uplift_high,
        p_value=p_value, n_control=n_control, n_treatment=n_treatment, confidence=confidence, method=method,
    )
