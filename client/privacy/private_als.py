"""Private ALS (privacy = "user", mf-solver = "als"): user-level DP on the ad step's statistics.

Each training round releases the shard's statistics (shared/als.py) once, through one Gaussian
mechanism whose blocks are scaled by their per-user sensitivities (user rows weighted so their
squares sum to at most k, user factors clipped to C), so the whole release has sensitivity 1
at noise multiplier sigma_r. Noise covers every coordinate of every statistic.

Plan (once, on the first private round of a state directory, shared/als.py
release_budget_shares): the first release takes POPULARITY_SHARE of the budget, each later round
r a share w_r ~ growth^r of the rest, sigma_r = sigma / sqrt(w_r). For Gaussian releases RDP
adds up in 1 / sigma^2, so the planned rounds together cost exactly one release at sigma;
sigma is calibrated (with the planned metric releases) to target-epsilon at delta with the
same Opacus RDP accountant, ledger and refusals as DP-SGD.

Under secure aggregation (client/secure_aggregation.py) a release carries only its share of
the noise (variance sigma_r^2 / (threshold - colluders)): the server sees only sums of at least
threshold releases, whose honest shares together carry sigma_r's noise; the ledger records the
release at sigma_r, as the sum's guarantee.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from client.privacy.ledger import PrivacyRefusal
from client.privacy.plan import UserLevelPlan, noisy_release_wire, wire_dtype
from client.solvers.als import ALSSolver
from shared.accounting import Release, calibrate_noise_multiplier
from shared.als import POPULARITY, STATISTICS, add_noise, popularity_statistics, release_budget_shares
from shared.wire import DP_RELEASE_SHARE, Arrays, TrainReply


class PrivateALS(UserLevelPlan[ALSSolver]):
    name = "private-als"
    label = "ALS"

    noise_share = 1.0  # of the release's noise variance this merchant adds (secure aggregation: less)

    def share_noise(self, share: float) -> None:
        if not 0.0 < share <= 1.0:
            raise PrivacyRefusal(f"a noise share of {share} is no share")
        self.noise_share = share

    def calibrate(self, target_epsilon: float, delta: float) -> float:
        return calibrate_noise_multiplier(target_epsilon, delta, 1.0, steps=1, fixed=self.planned_metric_releases())

    def round_share(self) -> float:
        """The budget share of this client's next release (r = releases made so far)."""
        shares = release_budget_shares(self.cfg.num_rounds, self.cfg.als_budget_growth)
        release = self.ledger.state.rounds_trained
        if release >= len(shares):
            raise PrivacyRefusal(
                f"privacy budget exhausted: all {len(shares)} planned ALS releases are spent (epsilon {self.ledger.epsilon():.3f})"
            )
        return float(shares[release])

    def release_update(
        self, client: str, solver: ALSSolver, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator, server_round: int
    ) -> TrainReply:
        """The ad step's statistics (without the positive counts: those are the popularity releases')."""
        stats = solver.local_update(arrays, user_factors, rng).arrays
        keys = solver.settings.release_keys(STATISTICS)
        return self._release(client, solver, {key: stats[key] for key in keys}, STATISTICS, server_round)

    def release_popularity(self, client: str, solver: ALSSolver, server_round: int) -> TrainReply:
        """The ads' positive counts alone, with this release's whole budget (no user step needed)."""
        return self._release(client, solver, popularity_statistics(solver.data.rows, solver.data.num_ads, solver.settings.max_rows),
                             POPULARITY, server_round)

    def _release(self, client: str, solver: ALSSolver, stats: Arrays, release: str, server_round: int) -> TrainReply:
        stats = wire_dtype(stats)
        share = self.round_share()
        sigma = self.noise_multiplier / math.sqrt(share)
        planned: Release = (sigma, 1.0, 1)
        self.ledger.require([planned], f"the ALS {release} release of round {server_round}")
        # under secure aggregation only a share of the noise: the sum the server can unmask holds
        # enough honest shares to carry sigma's (the ledger records the release at sigma)
        share_std = math.sqrt(self.noise_share)
        stds = {key: std * share_std for key, std in solver.noise_stds(sigma, release).items()}
        # float32 or float16 on the wire: rounding the noisy release is post-processing, and its
        # error is 4e-4 of the noise in float16 (float32: a millionth); float64 would double the bytes
        noisy = noisy_release_wire(self.cfg, add_noise(stats, stds, np.random.default_rng(secrets.randbits(128))))
        # written before the reply leaves: a crash after this point over-counts, never under-counts
        self.ledger.record([planned], trained_round=True)
        # no count of users leaves: the server sums statistics, it does not weigh them; the noise
        # multiplier reported is that of the noise this reply carries, which the server adds up
        # the release's budget share (public, the plan's) lets the server read what a release of
        # the whole budget would carry, whichever release this is (a retry, a resumed run)
        return TrainReply(client, noisy, None, {DP_RELEASE_SHARE: share}, privacy=self.report(sigma * share_std))
