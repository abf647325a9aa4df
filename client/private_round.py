"""One merchant's user-level DP: its ledger, its calibrated noise, and every release it makes.

Plan (once, on the first DP round of a state directory): with Poisson user sampling at rate
q = 1 / ceil(users / batch-users), a round runs local-epochs x int(1/q) DP-SGD steps; the
whole training runs num-rounds of them, plus one noised metrics release per evaluation
(num-rounds + 1) when dp-metrics = "noised". The DP-SGD noise multiplier is calibrated so that
all of it composes (RDP) to target-epsilon at delta; it is stored in the ledger and kept.

Every release is checked against the ledger before any work (`PrivacyLedger.require`) and
recorded (atomically) before the reply leaves. DP noise and user sampling draw from OS
entropy, never from the public run seed: a server that knows the config cannot replay them.
"""

from __future__ import annotations

import secrets

import numpy as np

from client.private_step import DPSGDSettings, user_sample_rate
from client.privacy_ledger import PrivacyLedger, PrivacyRefusal
from client.trainer import LocalTrainer
from shared.config import RunConfig
from shared.metrics import METRIC_NAMES
from shared.privacy import (
    METRIC_SENSITIVITY,
    CalibrationError,
    Release,
    calibrate_noise_multiplier,
    default_delta,
    sgd_steps_per_epoch,
)


class UserLevelDP:
    mechanism = "dp-sgd"

    def __init__(self, cfg: RunConfig, trainer: LocalTrainer, ledger: PrivacyLedger) -> None:
        self.cfg, self.trainer, self.ledger = cfg, trainer, ledger
        users = trainer.split.num_users
        self.sample_rate = user_sample_rate(cfg.batch_users, users)
        self.steps_per_round = cfg.local_epochs * sgd_steps_per_epoch(self.sample_rate)
        delta = cfg.target_delta or default_delta(users)
        if delta >= 1.0 / users:
            raise PrivacyRefusal(f"target-delta {delta} is not below 1/users = {1.0 / users:.3g} of this shard")
        ledger.bind(cfg.target_epsilon, delta)
        if ledger.state.noise_multiplier is None:
            ledger.state.noise_multiplier = self._calibrate(delta)
            ledger.state.mechanism = self.mechanism
            ledger.save()
        elif (ledger.state.mechanism or "dp-sgd") != self.mechanism:
            raise PrivacyRefusal(
                f"{ledger.path}: this budget was planned for {ledger.state.mechanism or 'dp-sgd'}, "
                f"this run asks for {self.mechanism}: start the merchant with a new state directory"
            )

    def _calibrate(self, delta: float) -> float:
        """The DP-SGD noise multiplier of the whole planned training (see the module docstring)."""
        try:
            return calibrate_noise_multiplier(
                self.ledger.state.target_epsilon, delta, self.sample_rate,
                steps=self.cfg.num_rounds * self.steps_per_round, fixed=self.planned_metric_releases(),
            )
        except CalibrationError as exc:
            raise PrivacyRefusal(f"no DP-SGD noise fits the budget: {exc}") from exc

    @property
    def noise_multiplier(self) -> float:
        assert self.ledger.state.noise_multiplier is not None
        return self.ledger.state.noise_multiplier

    def planned_metric_releases(self) -> list[Release]:
        if self.cfg.dp_metrics != "noised":
            return []
        return [(self.cfg.metrics_noise_multiplier, 1.0, self.cfg.num_rounds + 1)]

    def privacy_metrics(self) -> dict[str, float]:
        return {"dp-epsilon": self.ledger.epsilon(), "dp-noise-multiplier": self.noise_multiplier}

    def train(
        self, arrays: dict[str, np.ndarray], user_factors: np.ndarray, rng: np.random.Generator, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        self.ledger.require([(self.noise_multiplier, self.sample_rate, self.steps_per_round)], f"training round {server_round}")
        settings = DPSGDSettings(
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm, sample_rate=self.sample_rate,
            epochs=self.cfg.local_epochs, learning_rate=self.cfg.learning_rate,
            grad_sample_mode=self.cfg.dp_grad_sample_mode, seed=secrets.randbits(62),
        )
        updated, history, stats = self.trainer.train_ads_private(arrays, user_factors, rng, settings, self.ledger.state.history)
        # written before the reply leaves: a crash after this point over-counts, never under-counts
        self.ledger.state.history = history
        self.ledger.state.rounds_trained += 1
        self.ledger.save()
        return updated, {**stats, **self.privacy_metrics()}

    def release_metrics(self, metrics: dict[str, float], server_round: int) -> dict[str, float]:
        """Evaluation metrics as this config allows them to leave (see docs/PRIVACY.md)."""
        if self.cfg.dp_metrics == "none":
            return {"num-examples": 1.0, **self.privacy_metrics()}
        if self.cfg.dp_metrics == "exact":
            self.ledger.record_exact_metrics()
            return {**metrics, **self.privacy_metrics()}
        release: Release = (self.cfg.metrics_noise_multiplier, 1.0, 1)
        self.ledger.require([release], f"the metrics of round {server_round}")
        count = metrics["num-test-users"]
        sums = np.array([metrics[name] * count for name in METRIC_NAMES] + [count])
        noise_rng = np.random.default_rng(secrets.randbits(128))
        noisy = sums + noise_rng.normal(0.0, self.cfg.metrics_noise_multiplier * METRIC_SENSITIVITY, size=sums.shape)
        self.ledger.record([release])
        noisy_count = max(float(noisy[-1]), 1.0)
        released = {name: float(np.clip(value / noisy_count, 0.0, 1.0)) for name, value in zip(METRIC_NAMES, noisy[:-1])}
        return {**released, "num-test-users": noisy_count, **self.privacy_metrics()}
