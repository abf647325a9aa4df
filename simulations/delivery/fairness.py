"""Fairness of ad delivery: how impressions spread over ads and advertiser groups (Gini
coefficient, Lorenz curve, exposure against catalog share), and whether each merchant gains
from a policy as much as the others.

A group is any integer coding of the catalog's ads: advertiser, brand or category.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from simulations.delivery.ab_test import UpliftResult, ratio_uplift, uplift


def _non_negative(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"need a non-empty one-dimensional array, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("values must be finite and non-negative")
    return array


def gini(values: npt.ArrayLike) -> float:
    """The Gini coefficient of non-negative values: 0 when all are equal, (n - 1) / n when one
    holds everything (so [0, 0, 0, 1] gives 0.75); 0 for all zeros (nothing is unequally held).

    G = 2 sum_i i x_(i) / (n sum x) - (n + 1) / n, x_(1) <= ... <= x_(n): the mean absolute
    difference over all ordered pairs, halved and divided by the mean.
    """
    x = np.sort(_non_negative(values))
    total = float(x.sum())
    if total == 0.0:
        return 0.0
    n = x.size
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * np.dot(ranks, x) / (n * total) - (n + 1) / n)


def lorenz_curve(values: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The Lorenz curve of non-negative values: x = share of the items, poorest first, y = their
    share of the total; both run from 0 to 1 in n + 1 points. Its area to the diagonal is half
    the Gini coefficient. All zeros give the diagonal (equality), as gini() gives 0."""
    sorted_values = np.sort(_non_negative(values))
    n = sorted_values.size
    x = np.arange(n + 1, dtype=np.float64) / n
    total = float(sorted_values.sum())
    if total == 0.0:
        return x, x.copy()
    y = np.concatenate([[0.0], np.cumsum(sorted_values) / total])
    y[-1] = 1.0  # the cumulative sum's rounding must not leave the endpoint at 0.9999...
    return x, y


@dataclass(frozen=True, eq=False)
class ExposureReport:
    """Where the impressions went, per ad and per group (arrays indexed by ad or group code).

    impression_share  the group's share of all impressions (0 everywhere without impressions)
    catalog_share     the group's share of the catalog's ads
    exposure_ratio    impression_share / catalog_share: 1 = exposed in proportion to its size,
                      nan for a group without ads
    shown_share       share of the group's ads shown at least once (nan for a group without ads)
    coverage          share of the catalog's ads shown at least once
    gini_ads          Gini of impressions over every catalog ad, never-shown ads counting 0
    gini_groups       Gini of impressions over the groups that have ads; it ignores group size
                      (a large group drawing more is not unfair): exposure_ratio adjusts for it
    """

    impressions: int
    ad_impressions: npt.NDArray[np.int64]
    group_impressions: npt.NDArray[np.int64]
    impression_share: npt.NDArray[np.float64]
    catalog_share: npt.NDArray[np.float64]
    exposure_ratio: npt.NDArray[np.float64]
    shown_share: npt.NDArray[np.float64]
    coverage: float
    gini_ads: float
    gini_groups: float

    def group_records(self) -> list[dict[str, float | int]]:
        """One flat record per group, for a table."""
        return [
            {
                "group": g,
                "impressions": int(self.group_impressions[g]),
                "impression_share": float(self.impression_share[g]),
                "catalog_share": float(self.catalog_share[g]),
                "exposure_ratio": float(self.exposure_ratio[g]),
                "shown_share": float(self.shown_share[g]),
            }
            for g in range(self.group_impressions.size)
        ]


def _codes(values: npt.ArrayLike, bound: int, name: str) -> npt.NDArray[np.int64]:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer codes, got {array.dtype}")
    codes = array.astype(np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= bound):
        raise ValueError(f"{name} must lie in [0, {bound})")
    return codes


def exposure_shares(impression_ads: npt.ArrayLike, ad_groups: npt.ArrayLike, num_groups: int) -> ExposureReport:
    """The exposure of ads and groups from the ad index of every impression.

    impression_ads  one entry per impression: the index of the ad shown, in [0, len(ad_groups))
    ad_groups       one entry per catalog ad: its group code, in [0, num_groups)
    """
    groups = _codes(ad_groups, num_groups, "ad_groups")
    num_ads = groups.size
    if num_ads == 0:
        raise ValueError("the catalog has no ads")
    shown = _codes(impression_ads, num_ads, "impression_ads")
    ad_impressions = np.bincount(shown, minlength=num_ads).astype(np.int64)
    group_impressions = np.bincount(groups, weights=ad_impressions, minlength=num_groups).round().astype(np.int64)
    group_ads = np.bincount(groups, minlength=num_groups)
    group_shown = np.bincount(groups, weights=(ad_impressions > 0).astype(np.float64), minlength=num_groups)
    total = int(ad_impressions.sum())
    impression_share = group_impressions / total if total else np.zeros(num_groups)
    catalog_share = group_ads / num_ads
    has_ads = group_ads > 0
    # nan, not 0 or inf, for a group without ads: it has no exposure to be fair or unfair about
    exposure_ratio = np.divide(impression_share, catalog_share, out=np.full(num_groups, np.nan), where=has_ads)
    shown_share = np.divide(group_shown, group_ads, out=np.full(num_groups, np.nan), where=has_ads)
    return ExposureReport(
        impressions=total,
        ad_impressions=ad_impressions,
        group_impressions=group_impressions,
        impression_share=impression_share.astype(np.float64),
        catalog_share=catalog_share.astype(np.float64),
        exposure_ratio=exposure_ratio,
        shown_share=shown_share,
        coverage=float(np.mean(ad_impressions > 0)),
        gini_ads=gini(ad_impressions),
        gini_groups=gini(group_impressions[has_ads]),
    )


# ------------------------------------------------------------------------------ per merchant


@dataclass(frozen=True)
class MerchantUplift:
    """One merchant's uplift; result is None when an arm has fewer than 2 of its users (no variance)."""

    merchant: str
    users: int  # the merchant's users in both arms
    result: UpliftResult | None


T = TypeVar("T")
RatioOutcomes = tuple[npt.ArrayLike, npt.ArrayLike]  # per-user numerators and denominators of a ratio metric


def _per_merchant(
    control: Mapping[str, T], treatment: Mapping[str, T], users: Callable[[T], int], compare: Callable[[T, T], UpliftResult]
) -> list[MerchantUplift]:
    if set(control) != set(treatment):
        raise ValueError(f"merchants differ between the arms: {sorted(set(control) ^ set(treatment))}")
    found = []
    for merchant in control:
        n_control, n_treatment = users(control[merchant]), users(treatment[merchant])
        # a small merchant is still listed (the point is to see them), without a test it cannot support
        result = compare(control[merchant], treatment[merchant]) if min(n_control, n_treatment) >= 2 else None
        found.append(MerchantUplift(merchant=merchant, users=n_control + n_treatment, result=result))
    # largest first: a report reads down from the merchants that dominate a pooled effect
    return sorted(found, key=lambda m: (-m.users, m.merchant))


def per_merchant_uplift(
    control: Mapping[str, npt.ArrayLike], treatment: Mapping[str, npt.ArrayLike], confidence: float = 0.95
) -> list[MerchantUplift]:
    """uplift() per merchant: control[m] and treatment[m] are the per-user outcomes of merchant
    m's users under the control and the treatment policy. Largest merchant first."""
    return _per_merchant(control, treatment, lambda v: int(np.size(v)), lambda c, t: uplift(c, t, confidence))


def per_merchant_ratio_uplift(
    control: Mapping[str, RatioOutcomes], treatment: Mapping[str, RatioOutcomes], confidence: float = 0.95
) -> list[MerchantUplift]:
    """ratio_uplift() per merchant: each value is (per-user numerators, per-user denominators),
    e.g. (clicks, impressions) for CTR. Largest merchant first."""
    return _per_merchant(control, treatment, lambda v: int(np.size(v[0])), lambda c, t: ratio_uplift(c[0], c[1], t[0], t[1], confidence))
