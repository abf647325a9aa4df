"""User-level DP-SGD (privacy = "user", mf-solver = "sgd"): one Opacus sample is one user.

Plan: with Poisson user sampling at the public rate q = dp-sample-rate, a round runs
local-epochs x int(1/q) DP-SGD steps; the whole training runs num-rounds of them, plus the
planned metric releases (client/privacy/plan.py). The noise multiplier is calibrated so that
all of it composes (RDP) to target-epsilon at delta. Nothing the plan releases depends on the
shard's size: the sampling rate is public, the noisy gradient sum is divided by the public
batch-users (not by the expected batch, q x users), and the reply's FedAvg weight is 1. Each round's epochs run in
client/privacy/dp_sgd_epochs.py (Opacus' sampler and accountant; clipping by the fused closed
form or Opacus' hooks or ghost clipping).
"""

from __future__ import annotations

import secrets
from functools import cached_property

import numpy as np

from client.privacy.dp_sgd_epochs import DPSGDSettings, private_ad_epochs
from client.privacy.plan import UserLevelPlan, wire_dtype
from client.solvers.sgd import SGDSolver
from shared.accounting import calibrate_noise_multiplier, sgd_steps_per_epoch
from shared.wire import Arrays, TrainReply


class DPSGD(UserLevelPlan[SGDSolver]):
    name = "dp-sgd"
    label = "DP-SGD"

    @property
    def sample_rate(self) -> float:
        return self.cfg.dp_sample_rate

    @cached_property
    def steps_per_round(self) -> int:
        return self.cfg.local_epochs * sgd_steps_per_epoch(self.sample_rate)

    def calibrate(self, target_epsilon: float, delta: float) -> float:
        return calibrate_noise_multiplier(
            target_epsilon, delta, self.sample_rate, steps=self.cfg.num_rounds * self.steps_per_round, fixed=self.planned_metric_releases()
        )

    def release_update(
        self, client: str, solver: SGDSolver, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator, server_round: int
    ) -> TrainReply:
        self.ledger.require([(self.noise_multiplier, self.sample_rate, self.steps_per_round)], f"training round {server_round}")
        settings = DPSGDSettings(
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm, sample_rate=self.sample_rate,
            epochs=self.cfg.local_epochs, learning_rate=self.cfg.learning_rate, normalizer=self.cfg.batch_users,
            grad_sample_mode=self.cfg.dp_grad_sample_mode, seed=secrets.randbits(62),
        )
        updated, history, stats = private_ad_epochs(
            arrays, user_factors, solver.epoch_rows(rng), settings, self.ledger.state.history, solver.build_model)
        # written before the reply leaves: a crash after this point over-counts, never under-counts
        self.ledger.state.history = history
        self.ledger.state.rounds_trained += 1
        self.ledger.save()
        return TrainReply(client, wire_dtype(updated), 1.0, stats, self.report())  # every merchant weighs the same
