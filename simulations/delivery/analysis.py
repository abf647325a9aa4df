"""What a delivery run measured: per policy, per round, per merchant, and the A/B uplifts.

Rates are ratios of sums over impressions: CTR = clicks / impressions, CVR = purchases /
impressions (conversions per ad shown: what an A/B test may compare; purchases per click would
condition on a post-treatment event), RPM = 1000 x revenue / impressions. Uplift of the treatment
(federated) over each other arm: relative, with its 95% interval and p-value by the user-level
delta method on the users' totals over the run (ab_test.ratio_uplift); per merchant against
local-only, to see whether a small merchant gains as much from federation as a large one.
Exposure: Gini of impressions over every catalog ad and over advertisers (the catalog's brands).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.data.schema import AdCatalog
from simulations.delivery.ab_test import ratio_uplift
from simulations.delivery.fairness import exposure_shares
from simulations.delivery.loop import TREATMENT, DeliveryResult, Served

RATES = {"ctr": "clicks", "cvr": "purchases"}  # the uplift metrics and their numerators
UPLIFT_KEYS = ("uplift_vs", "metric", "uplift", "ci_low", "ci_high", "p_value")


def advertisers(catalog: AdCatalog) -> tuple[np.ndarray, int]:
    """Each ad's advertiser (its brand) as an integer code, and the number of advertisers."""
    names = sorted({b or "" for b in catalog.brands})
    code = {name: i for i, name in enumerate(names)}
    return np.array([code[b or ""] for b in catalog.brands], dtype=np.int64), len(names)


def _totals(served: Served, users: list[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    counts: dict[str, float] = getattr(served, key)
    return np.array([counts[u] for u in users], float), np.array([served.impressions[u] for u in users], float)


def _rates(served: Served, users: list[str]) -> dict[str, float]:
    impressions = sum(served.impressions[u] for u in users) or 1
    return {"users": len(users), "ctr": sum(served.clicks[u] for u in users) / impressions,
            "cvr": sum(served.purchases[u] for u in users) / impressions,
            "rpm": 1000 * sum(served.revenue[u] for u in users) / impressions}


def policy_records(result: DeliveryResult, epsilon: float | None, catalog: AdCatalog) -> list[dict[str, Any]]:
    """One record per policy: its rates and its exposure Gini over ads and over advertisers."""
    brands, num_brands = advertisers(catalog)
    records = []
    for policy, served in result.served.items():
        shown = served.impression_ads()
        by_ad = exposure_shares(shown, np.arange(len(catalog)), len(catalog))
        by_brand = exposure_shares(shown, brands, num_brands)
        records.append({"policy": policy, "epsilon": epsilon, "merchant": None, **_rates(served, list(served.impressions)),
                        **dict.fromkeys(UPLIFT_KEYS), "exposure_gini": by_ad.gini_ads, "advertiser_gini": by_brand.gini_groups,
                        "ad_coverage": by_ad.coverage, "small_advertiser_coverage": _small_advertiser_coverage(shown, brands, num_brands)})
    return records


def _small_advertiser_coverage(shown: np.ndarray, brands: np.ndarray, num_brands: int) -> float:
    """Share of the ads of the smallest advertisers (the quarter with the fewest ads in the
    catalog) shown at least once: does a small advertiser's ad ever get shown?"""
    sizes = np.bincount(brands, minlength=num_brands)
    small = np.flatnonzero((sizes > 0) & (sizes <= np.quantile(sizes[sizes > 0], 0.25)))
    their_ads = np.flatnonzero(np.isin(brands, small))
    return float(np.isin(their_ads, shown).mean()) if len(their_ads) else float("nan")


def uplift_records(result: DeliveryResult, epsilon: float | None) -> list[dict[str, Any]]:
    """The treatment's uplift over every other arm (all merchants), and per merchant over local-only."""
    treated = result.served[TREATMENT]
    merchants = sorted(set(result.merchant_of.values()))
    records = []
    for control, served in result.served.items():
        if control == TREATMENT:
            continue
        for merchant in [None, *(merchants if control == "local-only" else [])]:
            t_users = [u for u in treated.impressions if merchant is None or result.merchant_of[u] == merchant]
            c_users = [u for u in served.impressions if merchant is None or result.merchant_of[u] == merchant]
            if len(t_users) < 2 or len(c_users) < 2:
                continue
            for metric, key in RATES.items():
                test = ratio_uplift(*_totals(served, c_users, key), *_totals(treated, t_users, key))
                records.append({"policy": TREATMENT, "epsilon": epsilon, "merchant": merchant, **_rates(treated, t_users),
                                "uplift_vs": control, "metric": metric, "uplift": test.uplift, "ci_low": test.uplift_ci_low,
                                "ci_high": test.uplift_ci_high, "p_value": test.p_value, "exposure_gini": None,
                                "advertiser_gini": None, "ad_coverage": None,
                                "small_advertiser_coverage": None})
    return records


def round_records(result: DeliveryResult, epsilon: float | None) -> list[dict[str, Any]]:
    """Per round and policy, over every merchant (merchant None) and per merchant: users served,
    impressions, CTR, CVR, RPM."""
    out = []
    merchants: list[str | None] = [None, *sorted({r.merchant for r in result.rounds})]
    for server_round in sorted({r.server_round for r in result.rounds}):
        for merchant in merchants:
            for policy in result.served:
                mine = [r for r in result.rounds if r.server_round == server_round and r.arm == policy
                        and (merchant is None or r.merchant == merchant)]
                impressions = sum(r.impressions for r in mine)
                out.append({"round": server_round, "policy": policy, "epsilon": epsilon, "merchant": merchant,
                            "users": sum(r.users for r in mine), "impressions": impressions,
                            "ctr": _per(sum(r.clicks for r in mine), impressions), "cvr": _per(sum(r.purchases for r in mine), impressions),
                            "rpm": _per(1000 * sum(r.revenue for r in mine), impressions)})
    return out


def _per(total: float, impressions: int) -> float | None:
    return total / impressions if impressions else None


def exposure_curves(result: DeliveryResult, catalog: AdCatalog) -> dict[str, np.ndarray]:
    """Per policy, impressions per catalog ad (never-shown ads 0), for the Lorenz curve."""
    return {policy: np.bincount(served.impression_ads(), minlength=len(catalog)) for policy, served in result.served.items()}
