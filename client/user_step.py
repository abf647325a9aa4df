"""The user step: how a merchant solves its users' factors from the global model, as a record.

Each solver's user step is exact, local and never released (joint DP). Its settings are saved
with every global model the merchant receives (client/node_state.py), so serving folds a new
user in exactly as training would, without the run config (client/serving.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.als import Rows, solve_users
from shared.config import RunConfig
from shared.data.split import UserSplit
from shared.wire import AD_BIAS, AD_FACTORS, Arrays

_DEFAULTS = RunConfig.model_fields
_RECORD = ConfigDict(extra="forbid", frozen=True)


class ALSUserStep(BaseModel):
    """ALS's closed form: p_u = (sum q q^T + alpha0 Q^T Q + l2 I)^-1 (...) (shared/als.solve_users)."""

    model_config = _RECORD
    solver: Literal["als"] = "als"
    alpha0: float = Field(_DEFAULTS["als_alpha0"].default, gt=0)
    user_l2: float = Field(_DEFAULTS["als_user_l2"].default, gt=0)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ALSUserStep:
        return cls(alpha0=cfg.als_alpha0, user_l2=cfg.als_user_l2)

    def fit(self, split: UserSplit, arrays: Arrays, rng: np.random.Generator, init: np.ndarray | None = None) -> np.ndarray:
        return self.fit_rows(Rows.from_split(split), arrays)

    def fit_rows(self, rows: Rows, arrays: Arrays) -> np.ndarray:
        return solve_users(rows, arrays[AD_FACTORS], arrays[AD_BIAS], self.alpha0, self.user_l2).astype(np.float32)


class SGDUserStep(BaseModel):
    """The logistic user step: damped Newton on the user's rows, sampled negatives included."""

    model_config = _RECORD
    solver: Literal["sgd"] = "sgd"
    user_l2: float = Field(_DEFAULTS["user_l2"].default, gt=0)
    negatives: int = Field(_DEFAULTS["negatives"].default, ge=1)
    iters: int = Field(_DEFAULTS["user_solver_iters"].default, ge=1)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SGDUserStep:
        return cls(user_l2=cfg.user_l2, negatives=cfg.negatives, iters=cfg.user_solver_iters)

    def fit(self, split: UserSplit, arrays: Arrays, rng: np.random.Generator, init: np.ndarray | None = None) -> np.ndarray:
        import torch  # only SGD-trained models need it

        from client.solvers.sgd_rows import build_user_rows
        from shared.model import solve_user_factors

        rows = build_user_rows(split, rng, self.negatives, max_positives=None)
        factors = solve_user_factors(
            torch.as_tensor(arrays[AD_FACTORS]), torch.as_tensor(arrays[AD_BIAS]),
            rows.ads, rows.labels, rows.mask, l2=self.user_l2, iters=self.iters,
            init=None if init is None else torch.as_tensor(init),
        )
        return factors.numpy()


UserStep = Annotated[ALSUserStep | SGDUserStep, Field(discriminator="solver")]
USER_STEP = TypeAdapter(UserStep)


def parse_user_step(text: str) -> ALSUserStep | SGDUserStep:
    """A user step record from its JSON (ValueError when it is not one)."""
    return USER_STEP.validate_json(text)
