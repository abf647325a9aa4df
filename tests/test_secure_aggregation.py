"""Secure aggregation (Flower's SecAgg+) of the private-ALS release, run in this process: the
server's exchange (server/secure_round.py) against simulated merchants' ClientApps, each with its
own persistent context, every message copied as the wire would."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from scipy import stats as scipy_stats

import client.handlers
from server.secure_round import SecureTraining
from shared.als import ALSSettings
from shared.config import RunConfig
from shared.flower_internals import masked_vector
from shared.params import init_global_arrays
from shared.privacy_policy import PolicyViolation, PrivacyPolicy
from shared.secure_sum import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE, SecureScales
from shared.wire import DP_NOISE_MULTIPLIER, METRICS, PRIVACY_REFUSED, plain_metrics
from simulations.in_process import InProcessGrid
from tests.conftest import client_call, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")
MERCHANTS = 3


def _secure_cfg(tmp_path: Path, **overrides: Any) -> RunConfig:
    return small_run_config(tmp_path, privacy="user", **{"secure-aggregation": True, "secure-threshold": 0.6, **overrides})


def _training(cfg: RunConfig) -> SecureTraining:
    settings = ALSSettings.from_config(cfg)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
    return SecureTraining(settings, cfg.max_users_per_merchant, cfg.secure_threshold, 60.0, context)


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, np.ndarray]]:
    """Every merchant's noisy release as it goes into the protocol (before scaling)."""
    seen: list[dict[str, np.ndarray]] = []
    to_vectors = SecureScales.to_vectors

    def recording(self: SecureScales, stats: dict[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        seen.append({key: np.array(value, dtype=np.float64) for key, value in stats.items()})
        return to_vectors(self, stats)

    monkeypatch.setattr(SecureScales, "to_vectors", recording)
    return seen


def _ledger(cfg: RunConfig, partition: int) -> dict[str, Any]:
    return json.loads((Path(cfg.state_dir) / f"partition-{partition}" / "privacy_ledger.json").read_text())["ledger"]


@pytest.mark.parametrize("release", ["statistics", "popularity"])
def test_the_server_gets_the_plain_sum_within_the_quantization_error(tmp_path, released, release):
    cfg = _secure_cfg(tmp_path)
    training = _training(cfg)
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0)
    outcome = training.exchange(InProcessGrid(cfg, MERCHANTS), 1, arrays, list(range(10, 10 + MERCHANTS)), release)
    assert outcome.total is not None and len(outcome.contributions) == MERCHANTS and len(released) == MERCHANTS
    # what the round asked for, and nothing else: the popularity release is the positive counts alone
    assert set(outcome.total) == set(training.settings.release_keys(release))
    assert outcome.threshold == 2  # round(0.6 x 3)
    error = training.scales.quantization_error(MERCHANTS)
    for key, total in outcome.total.items():
        plain = sum(release[key] for release in released)
        largest, std = error[key]
        assert np.max(np.abs(total - plain)) <= largest, key
        assert np.std(total - plain) <= 1.5 * std, key  # stochastic rounding: unbiased, about its stated std
    # the stated error is far below the DP noise the sum carries
    noise = training.sum_noise(outcome)
    assert all(error[key][1] < 0.05 * noise[key] for key in noise)
    # each merchant recorded the release once, at the noise multiplier the sum is guaranteed to carry
    for partition in range(MERCHANTS):
        assert _ledger(cfg, partition)["rounds_trained"] == 1


def test_a_masked_vector_tells_nothing_of_the_statistics(tmp_path, released):
    """The same instruction answered twice: the two releases are nearly the same statistics, the
    two masked vectors the server receives from one merchant are unrelated, uniform integers."""
    cfg = _secure_cfg(tmp_path, **{"num-rounds": 4})
    training = _training(cfg)
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0)
    grid = InProcessGrid(cfg, MERCHANTS)
    masked, scaled = [], []
    for _ in range(2):
        outcome = training.exchange(grid, 1, arrays, list(grid.contexts))
        reply = next(msg for msg in outcome.contributions if msg.metadata.src_node_id == 10)
        masked.append(np.concatenate([v.ravel() for v in masked_vector(reply)[1:]]).astype(np.float64))  # [0] is the weight
    for release in released[::MERCHANTS][:2]:  # merchant 10 answers first in each exchange
        scaled.append(np.concatenate([v.ravel() for v in training.scales.to_vectors(release)[0]]))
    assert np.corrcoef(scaled[0], scaled[1])[0, 1] > 0.3  # the statistics agree (under their fresh noise) ...
    assert abs(np.corrcoef(masked[0], masked[1])[0, 1]) < 0.08  # ... what the server sees of them is not (4.7 sd of ~3,900 coordinates)
    for vector, truth in zip(masked, scaled, strict=True):
        assert abs(np.corrcoef(vector, truth)[0, 1]) < 0.08
        assert scipy_stats.kstest(vector / MODULUS_RANGE, "uniform").pvalue > 1e-4


def test_a_merchant_dropping_after_the_key_sharing_leaves_the_sum_of_the_others(tmp_path, monkeypatch, released):
    """Merchant 2 fails at the collect stage (after it shared its keys): the protocol unmasks the
    sum of the two others (the threshold is 2), the round's record says so and its noise is
    theirs; the ledgers of the two record one release each, the dropped one's none."""
    cfg = _secure_cfg(tmp_path)
    train = client.handlers._train
    calls = {"n": 0}

    def failing(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # nodes 10, 11, 12 answer in turn: node 12 fails
            raise RuntimeError("lost its disk")
        return train(*args)

    monkeypatch.setattr(client.handlers, "_train", failing)
    training = _training(cfg)
    outcome = training.exchange(InProcessGrid(cfg, MERCHANTS), 1, init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0), [10, 11, 12])
    assert outcome.total is not None and sorted(m.metadata.src_node_id for m in outcome.contributions) == [10, 11]
    assert [(stage, msg.metadata.src_node_id) for stage, msg in outcome.errors] == [("collect", 12)]
    for key, total in outcome.total.items():
        np.testing.assert_allclose(total, released[0][key] + released[1][key], atol=training.scales.quantization_error(2)[key][0])
    guarantee = training.guarantee(outcome)
    shares = [plain_metrics(m.content.metric_records[METRICS])[DP_NOISE_MULTIPLIER] for m in outcome.contributions]
    assert guarantee["contributors"] == 2 and guarantee["threshold"] == 2
    # each survivor added half the variance of a full release: together, one full release
    assert guarantee["sum_noise_multiplier"] == pytest.approx(math.sqrt(2) * shares[0])
    assert [_ledger(cfg, p)["rounds_trained"] for p in (0, 1)] == [1, 1]
    assert not (Path(cfg.state_dir) / "partition-2" / "privacy_ledger.json").exists() or _ledger(cfg, 2)["rounds_trained"] == 0


def test_one_merchant_moves_the_sum_by_at_most_the_clipping_range(tmp_path, monkeypatch, released):
    """A poisoning merchant sends the largest values it can (every coordinate far past the
    range): the protocol clips them, and the sum moves by at most the stated bound."""
    cfg = _secure_cfg(tmp_path)
    to_vectors = SecureScales.to_vectors
    calls = {"n": 0}

    def poisoned(self: SecureScales, stats: dict[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        vectors, clipped = to_vectors(self, stats)
        calls["n"] += 1
        if calls["n"] == 1:  # the first merchant to answer is the attacker
            return [np.full_like(v, 1e9) for v in vectors], clipped
        return vectors, clipped

    monkeypatch.setattr(SecureScales, "to_vectors", poisoned)
    training = _training(cfg)
    outcome = training.exchange(InProcessGrid(cfg, MERCHANTS), 1, init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0), [10, 11, 12])
    assert outcome.total is not None
    bound = training.scales.poisoning_bound()
    honest = released[1:]  # the recording wrapper sits under the poisoning one: it saw all three releases
    for key, total in outcome.total.items():
        moved = total - sum(release[key] for release in honest)
        # the attacker's part of the sum, give or take the honest releases' rounding
        assert np.max(np.abs(moved)) <= bound[key] + training.scales.quantization_error(len(honest))[key][0], key
        assert np.min(moved) >= 0.99 * CLIPPING_RANGE * training.scales.scales[key]  # the bound is what it can do
    assert bound["als_count"] == pytest.approx((CLIPPING_RANGE + 2 * CLIPPING_RANGE / QUANTIZATION_RANGE) * cfg.max_users_per_merchant
                                               * ALSSettings.from_config(cfg).sensitivities()["als_count"])


def test_the_merchants_policy_decides(tmp_path):
    cfg = _secure_cfg(tmp_path)
    with pytest.raises(PolicyViolation, match="refuses secure aggregation"):
        PrivacyPolicy().admit(cfg)  # a deployed merchant's default: refuse (docs/PRIVACY.md: sybils)
    PrivacyPolicy(secure_aggregation="allow").admit(cfg)
    with pytest.raises(PolicyViolation, match="requires secure aggregation"):
        PrivacyPolicy(secure_aggregation="require").admit(cfg.with_values(secure_aggregation=False))
    assert PrivacyPolicy(secure_colluders=1).secure_noise_share(4) == pytest.approx(1 / 3)
    with pytest.raises(PolicyViolation, match="not above the 2 merchants"):
        PrivacyPolicy(secure_colluders=2).secure_noise_share(2)


def test_a_plain_message_never_gets_the_smaller_noise(tmp_path):
    """A server that sends a plain training message in a secure run gets a full-noise release:
    the share is set only by the merchant's own SecAgg+ mod."""
    cfg = _secure_cfg(tmp_path)
    reply = client_call("train", cfg, init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0))
    assert not reply.has_error() or reply.error.code == PRIVACY_REFUSED
    full = plain_metrics(reply.content.metric_records[METRICS])[DP_NOISE_MULTIPLIER]
    settings = ALSSettings.from_config(cfg)
    assert settings.max_rows is not None
    ledger = _ledger(cfg, 0)
    assert full == pytest.approx(ledger["noise_multiplier"] / math.sqrt(_first_share(cfg)))


def _first_share(cfg: RunConfig) -> float:
    from shared.als import release_budget_shares

    return float(release_budget_shares(cfg.num_rounds, cfg.als_budget_growth)[0])


def test_secure_aggregation_needs_private_als():
    with pytest.raises(Exception, match="secure-aggregation carries the private-ALS release"):
        RunConfig.from_flower({"secure-aggregation": True, "mf-solver": "sgd"})
