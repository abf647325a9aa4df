"""One merchant's private ALS release: user-level DP on the ad step's sufficient statistics.

Each training round releases the shard's statistics (shared/als.py) once, through one Gaussian
mechanism whose blocks are scaled by their per-user sensitivities (user rows weighted so their
squares sum to at most k, user factors clipped to C), so the whole release has sensitivity 1
at noise multiplier sigma_r. Noise covers every coordinate of every statistic.

Plan (once, on the first private round of a state directory): round r of num-rounds gets a
share w_r ~ growth^r of the budget, sigma_r = sigma / sqrt(w_r). For Gaussian releases RDP
adds up in 1 / sigma^2, so the planned rounds together cost exactly one release at sigma;
sigma is calibrated (with the planned metric releases) to target-epsilon at delta with the
same Opacus RDP accountant, ledger and refusals as DP-SGD (client/private_round.py).
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from client.private_round import UserLevelDP
from client.privacy_ledger import PrivacyRefusal
from shared.als import ALSSettings, add_noise, round_budget_shares
from shared.privacy import CalibrationError, Release, calibrate_noise_multiplier


class PrivateALS(UserLevelDP):
    """User-level DP for ALS rounds; metrics are released as in DP-SGD runs."""

    mechanism = "private-als"

    def _calibrate(self, delta: float) -> float:
        try:
            return calibrate_noise_multiplier(
                self.ledger.state.target_epsilon, delta, 1.0, steps=1, fixed=self.planned_metric_releases()
            )
        except CalibrationError as exc:
            raise PrivacyRefusal(f"no ALS noise fits the budget: {exc}") from exc

    def round_noise_multiplier(self) -> float:
        """sigma_r of this client's next release (r = releases made so far)."""
        shares = round_budget_shares(self.cfg.num_rounds, self.cfg.als_budget_growth)
        release = self.ledger.state.rounds_trained
        if release >= len(shares):
            raise PrivacyRefusal(
                f"privacy budget exhausted: all {len(shares)} planned ALS releases are spent (epsilon {self.ledger.epsilon():.3f})"
            )
        return self.noise_multiplier / math.sqrt(shares[release])

    def release_statistics(
        self, stats: dict[str, np.ndarray], settings: ALSSettings, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        sigma = self.round_noise_multiplier()
        release: Release = (sigma, 1.0, 1)
        self.ledger.require([release], f"the ALS statistics of round {server_round}")
        noisy = add_noise(stats, settings.noise_stds(sigma), np.random.default_rng(secrets.randbits(128)))
        # written before the reply leaves: a crash after this point over-counts, never under-counts
        self.ledger.record([release], trained_round=True)
        return noisy, {"dp-epsilon": self.ledger.epsilon(), "dp-noise-multiplier": sigma}
