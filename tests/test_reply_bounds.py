"""One merchant cannot wreck the model: statistics no merchant could send under the protocol are
dropped with a reason, and the robust sum bounds what a plausible-looking poisoned reply moves."""

from __future__ import annotations

import numpy as np
import pytest

from server.als_aggregation import ALSAggregation
from server.reply_bounds import als_violations, median_clip
from shared.als import ALSSettings, over_union, packed_norm_weights
from shared.params import init_global_arrays
from shared.wire import ALS_ADS, ALS_COUNT, ALS_GRAM_UPPER, ALS_TARGET, ALS_USER_GRAM, DP_NOISE_MULTIPLIER, from_array_record, plain_metrics
from tests.conftest import client_call, simulated_node, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")
MAX_USERS = 1000  # a public bound above the synthetic merchants' 600 / 3 users


def _replies(tmp_path, privacy: str) -> tuple[ALSSettings, list[dict[str, np.ndarray]], list[float]]:
    cfg = small_run_config(tmp_path, privacy=privacy, **{"mf-solver": "als", "max-users-per-merchant": MAX_USERS})
    arrays = init_global_arrays(simulated_node(cfg, 0).data.split.num_ads, cfg.factors, cfg.seed)
    stats, sigmas = [], []
    for partition in range(3):
        reply = client_call("train", cfg, arrays, partition=partition)
        stats.append(from_array_record(reply.content["arrays"]))
        sigmas.append(plain_metrics(reply.content.metric_records["metrics"]).get(DP_NOISE_MULTIPLIER, 0.0))
    return ALSSettings.from_config(cfg), stats, sigmas


@pytest.mark.parametrize("privacy", ["user", "none"])
def test_honest_replies_are_within_the_bounds_and_poisoned_ones_are_not(tmp_path, privacy):
    settings, stats, sigmas = _replies(tmp_path, privacy)
    for honest, sigma in zip(stats, sigmas, strict=True):
        assert als_violations(honest, settings, MAX_USERS, sigma) == []
    honest, sigma = stats[0], sigmas[0]
    negated = _scaled(honest, -50)  # the probe's "all statistics x -50"
    assert any("negative value" in p for p in als_violations(negated, settings, MAX_USERS, sigma))
    assert any("positive semi-definite" in p for p in als_violations(negated, settings, MAX_USERS, sigma))
    if privacy == "none":  # no clip, no norm bound: an inflated target alone is inconsistent with its Gramian
        inflated = {**honest, ALS_TARGET: honest[ALS_TARGET] * np.float32(1e6)}
        assert any("Cauchy-Schwarz" in p for p in als_violations(inflated, settings, MAX_USERS, sigma))
        scaled = _scaled(honest, 100)  # consistent: for the robust option
        assert als_violations(scaled, settings, MAX_USERS, sigma) == []
    if privacy == "user":  # clipped users: norms are bounded by max-users x the sensitivity
        for factor in (1e6, 3e38 / max(float(np.abs(honest[ALS_TARGET]).max()), 1e-30)):
            inflated = {**honest, ALS_TARGET: (honest[ALS_TARGET].astype(np.float64) * factor).astype(np.float32)}
            assert any(p.startswith(f"{ALS_TARGET} has norm") for p in als_violations(inflated, settings, MAX_USERS, sigma))


def _scaled(stats: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """Every statistic times `factor` (a sparse release's ads kept)."""
    return {key: value if key == ALS_ADS else value * np.float32(factor) for key, value in stats.items()}


def test_the_aggregation_drops_an_out_of_bounds_reply_with_its_reason(tmp_path):
    settings, stats, sigmas = _replies(tmp_path, "user")
    strategy = ALSAggregation(settings, len(stats[0][ALS_COUNT]), 16, max_users=MAX_USERS)
    strategy.check_reply(stats[1], {DP_NOISE_MULTIPLIER: sigmas[1]})
    with pytest.raises(ValueError, match="als_count has a negative value"):
        strategy.check_reply({**stats[1], ALS_COUNT: stats[1][ALS_COUNT] - 1e4}, {DP_NOISE_MULTIPLIER: sigmas[1]})


def test_the_median_clip_bounds_what_one_merchant_adds_to_any_block(tmp_path):
    """Whatever one merchant of five sends, it adds at most factor x (the largest honest norm of
    a block) to that block of the sum; honest merchants of similar size are left untouched."""
    settings, stats, _ = _replies(tmp_path, "none")
    assert settings.sparse  # exact statistics of the ads each merchant touched: compared over their union
    rng = np.random.default_rng(0)
    honest = over_union(stats + [_scaled(s, rng.uniform(0.8, 1.2)) for s in stats[:1]])  # four honest merchants
    factor = 3.0
    for before, after in zip(honest, median_clip(honest, factor), strict=True):  # honest merchants: (nearly) untouched
        for key in before:
            assert np.linalg.norm(after[key] - before[key]) <= 0.02 * np.linalg.norm(before[key])
    noise = {k: v if k == ALS_ADS else rng.normal(0, 1e30, v.shape) for k, v in honest[0].items()}
    for attack in (_scaled(honest[0], 1e6), noise):
        clipped = median_clip([*honest, attack], factor)
        for key in set(honest[0]) - {ALS_ADS}:  # per-ad Gramians, targets and positives, and the user Gramian
            per_ad = key != ALS_USER_GRAM

            def norms(value: np.ndarray, per_ad: bool = per_ad, key: str = key) -> np.ndarray:
                if key == ALS_GRAM_UPPER:  # packed: the full symmetric matrix's norm
                    value = value * packed_norm_weights(value.shape[-1])
                return np.linalg.norm(value.reshape(len(value), -1) if per_ad else value.reshape(1, -1), axis=1)
            honest_norms = np.array([norms(h[key]) for h in honest])
            active = (honest_norms > 0).any(axis=0)  # the typical ad: over the ads some merchant has a value on
            largest = np.maximum(honest_norms.max(axis=0), honest_norms[:, active].mean(axis=1).max() if per_ad else 0.0)
            moved = norms(clipped[-1][key])  # what the attacker adds to each block of the sum
            assert np.all(moved <= factor * largest * (1 + 1e-9))
