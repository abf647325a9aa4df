"""Local training on one shard: what a client does with its data, given the global parameters.

- ALS (mf-solver = "als", shared/als.py): the user step in closed form, and the sufficient
  statistics from which the server solves the ad step. numpy only.
- SGD (mf-solver = "sgd", client/sgd_step.py, torch): the user step by Newton's method and the
  ad step by (DP-)SGD on the client.
- Evaluation of this shard's held-out interactions, and its TopPop floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from shared.als import ALSSettings, Rows, ad_statistics, solve_users
from shared.config import RunConfig
from shared.data.schema import InteractionLog
from shared.data.split import UserSplit, leave_last_out, sample_eval_negatives
from shared.metrics import evaluate as evaluate_ranking
from shared.metrics import toppop_score_fn
from shared.params import score_all
from shared.privacy import Release

if TYPE_CHECKING:
    from client.private_step import DPSGDSettings


@dataclass(frozen=True)
class TrainSettings:
    factors: int
    local_epochs: int
    user_solver_iters: int
    user_l2: float
    ad_l2: float
    learning_rate: float
    negatives: int
    batch_users: int
    max_positives_per_user: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TrainSettings:
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


EVAL_NEGATIVES = 99  # the NCF protocol


class LocalTrainer:
    """Everything one client does with its shard, given the global parameters."""

    @staticmethod
    def prepare(log: InteractionLog, num_ads: int, seed: int) -> tuple[UserSplit, np.ndarray]:
        """Leave-last-out split and its fixed evaluation negatives."""
        split = leave_last_out(log, num_ads)
        return split, sample_eval_negatives(split, EVAL_NEGATIVES, seed)

    @classmethod
    def for_log(cls, cfg: RunConfig, log: InteractionLog, num_ads: int) -> LocalTrainer:
        """Split, evaluation negatives, and the run's training settings."""
        return cls(*cls.prepare(log, num_ads, cfg.seed), TrainSettings.from_config(cfg))

    def __init__(self, split: UserSplit, eval_negatives: np.ndarray, settings: TrainSettings) -> None:
        self.split = split
        self.eval_negatives = eval_negatives
        self.settings = settings
        self._toppop: dict[str, float] | None = None

    @cached_property
    def als_rows(self) -> Rows:
        return Rows.from_split(self.split)

    # -- ALS (shared/als.py): exact user step, and the statistics the server solves the ads from
    def fit_users_als(self, arrays: dict[str, np.ndarray], settings: ALSSettings) -> np.ndarray:
        return solve_users(self.als_rows, arrays["ad_factors"], arrays["ad_bias"], settings).astype(np.float32)

    def als_statistics(self, user_factors: np.ndarray, settings: ALSSettings) -> dict[str, np.ndarray]:
        return ad_statistics(self.als_rows, user_factors, self.split.num_ads, settings)

    # -- SGD (client/sgd_step.py): torch is loaded here, by runs that use it
    def fit_users(self, arrays: dict[str, np.ndarray], rng: np.random.Generator, init: np.ndarray | None = None) -> np.ndarray:
        from client import sgd_step

        return sgd_step.fit_users(self.split, self.settings, arrays, rng, init)

    def train_ads(
        self, arrays: dict[str, np.ndarray], user_factors: np.ndarray, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        from client import sgd_step

        return sgd_step.train_ads(self.split, self.settings, arrays, user_factors, rng)

    def train_ads_private(
        self,
        arrays: dict[str, np.ndarray],
        user_factors: np.ndarray,
        rng: np.random.Generator,
        dp: DPSGDSettings,
        history: list[Release],
    ) -> tuple[dict[str, np.ndarray], list[Release], dict[str, float]]:
        """The ad step under user-level DP-SGD (client/private_step.py); returns the accountant history after it."""
        from client.private_step import private_ad_epochs  # Opacus: loaded by private runs only
        from client.sgd_step import build_user_rows

        s = self.settings
        return private_ad_epochs(
            arrays, user_factors, lambda: build_user_rows(self.split, rng, s.negatives, s.max_positives_per_user), dp, history
        )

    # -- evaluation with this client's users
    def evaluate(self, arrays: dict[str, np.ndarray], user_factors: np.ndarray) -> dict[str, float]:
        return evaluate_ranking(lambda users: score_all(user_factors[users], arrays), self.split, self.eval_negatives)

    def evaluate_toppop(self) -> dict[str, float]:
        if self._toppop is None:
            self._toppop = evaluate_ranking(toppop_score_fn(self.split.ad_popularity()), self.split, self.eval_negatives)
        return dict(self._toppop)
