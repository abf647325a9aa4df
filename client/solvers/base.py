"""What every solver does on a merchant's side (ALS, SGD and NeuMF).

A solver owns the two local steps of a round:
- the user step: each user's factors, solved exactly from the user's own rows with the global
  parameters frozen; kept on the merchant's disk, never released (client/user_step.py);
- the local update of the ad step: what the merchant's privacy plan releases (client/privacy/):
  ALS statistics the server solves the ads from, or SGD-trained ad parameters it averages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from client.node_data import NodeData
from client.user_step import AnyUserStep
from shared.config import RunConfig
from shared.wire import Arrays


@dataclass(frozen=True)
class LocalUpdate:
    """The ad step's exact local result, before any privacy mechanism."""

    arrays: Arrays
    metrics: dict[str, float] = field(default_factory=dict)


class Solver(ABC):
    name: ClassVar[str]
    # the user step starts from the factors stored last round (else from its closed form)
    warm_starts_users: ClassVar[bool] = False
    # fit_users is a function of the shard and the model alone (no rng, no stored factors): fit
    # twice against the same model, the same factors
    users_are_a_function_of_the_model: ClassVar[bool] = False
    # the server averages its updates weighted by users (FedAvg), or sums them (ALS: no weight is sent)
    sends_weight: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, data: NodeData) -> None:
        self.cfg, self.data = cfg, data

    @abstractmethod
    def user_step(self) -> AnyUserStep:
        """The user step's record, saved with every global model for serving."""

    @abstractmethod
    def fit_users(self, arrays: Arrays, rng: np.random.Generator, previous: np.ndarray | None) -> np.ndarray:
        """Every user's factors against the global parameters: [users, factors]."""

    @abstractmethod
    def local_update(self, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator) -> LocalUpdate:
        """The ad step's exact local update (never released as is under DP)."""

    @abstractmethod
    def solve_alone(self, update: LocalUpdate) -> Arrays:
        """The new global parameters from this one update alone: what the server's aggregation
        makes of a single merchant (the centralized and local-only baselines)."""
