"""ALS (mf-solver = "als", the default; shared/als.py): numpy and scipy.sparse, no torch.

User step: ALS's closed form. Local update: the shard's sufficient statistics of the ad step
(per-ad sums over users); the server sums every merchant's and solves the ads. Under DP the
statistics are bounded per user (ALSSettings) and released once through a Gaussian mechanism
whose per-statistic noise follows their sensitivities (`noise_stds`, client/privacy/private_als.py).
"""

from __future__ import annotations

import numpy as np

from client.node_data import NodeData
from client.solvers.base import LocalUpdate, Solver
from client.user_step import ALSUserStep
from shared.als import STATISTICS, ALSSettings, ad_statistics, solve_ads
from shared.config import RunConfig
from shared.wire import Arrays


class ALSSolver(Solver):
    name = "als"
    sends_weight = False
    users_are_a_function_of_the_model = True  # the exact ridge solve of each user's rows

    def __init__(self, cfg: RunConfig, data: NodeData) -> None:
        super().__init__(cfg, data)
        self.settings = ALSSettings.from_config(cfg)

    def user_step(self) -> ALSUserStep:
        return ALSUserStep.from_config(self.cfg, self.data.rows, self.data.num_ads)

    def fit_users(self, arrays: Arrays, rng: np.random.Generator, previous: np.ndarray | None) -> np.ndarray:
        return self.user_step().fit_rows(self.data.rows, arrays)

    def local_update(self, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator) -> LocalUpdate:
        return LocalUpdate(ad_statistics(self.data.rows, user_factors, self.data.num_ads, self.settings))

    def noise_stds(self, noise_multiplier: float, release: str = STATISTICS) -> dict[str, float]:
        """Per-coordinate noise of each statistic for one Gaussian release of sensitivity 1."""
        return self.settings.noise_stds(noise_multiplier, release)

    def solve_alone(self, update: LocalUpdate) -> Arrays:
        return solve_ads(update.arrays, self.settings, num_ads=self.data.num_ads)
