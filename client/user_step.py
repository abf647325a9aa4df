"""The user step: how a merchant solves its users' factors from the global model, as a record.

Each solver's user step is exact, local and never released (joint DP). Its settings are saved
with every global model the merchant receives (client/node_state.py), so serving folds a new
user in exactly as training would, without the run config (client/serving.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.als import PRIVATE_ALPHA0, PRIVATE_L2, Rows, als_l2, density_alpha0, fixed_alpha0, solve_users
from shared.config import RunConfig
from shared.data.split import UserSplit
from shared.wire import AD_BIAS, AD_FACTORS, Arrays

if TYPE_CHECKING:
    import torch  # only SGD-trained models need it: imported where used

_DEFAULTS = RunConfig.model_fields
_RECORD = ConfigDict(extra="forbid", frozen=True)


class ALSUserStep(BaseModel):
    """ALS's closed form: p_u = (sum q q^T + alpha0 Q^T Q + l2 I)^-1 (...) (shared/als.solve_users)."""

    model_config = _RECORD
    solver: Literal["als"] = "als"
    alpha0: float = Field(PRIVATE_ALPHA0, gt=0)
    user_l2: float = Field(PRIVATE_L2, gt=0)

    @classmethod
    def from_config(cls, cfg: RunConfig, rows: Rows, num_ads: int) -> ALSUserStep:
        """The run's settings; alpha0 "auto" without DP from the density of the merchant's own
        `rows` (the server reads the summed statistics' for the ad step: shared/als.py)."""
        alpha0 = fixed_alpha0(cfg)
        if alpha0 is None:
            alpha0 = density_alpha0(float(len(rows.ad)), float(rows.num_users), num_ads)
        return cls(alpha0=alpha0, user_l2=als_l2(cfg.als_user_l2, cfg))

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
        ad_factors, ad_bias = torch.as_tensor(arrays[AD_FACTORS]), torch.as_tensor(arrays[AD_BIAS])
        start = None if init is None else torch.as_tensor(init)
        factors = torch.zeros(split.num_users, ad_factors.shape[1], dtype=ad_factors.dtype)
        # solve_user_factors pads a chunk of users to its longest user's rows, and a user's result depends (in
        # float32, and through the line search's accept/halve decisions by up to ~1e-3) on that width: solved
        # alongside others, a user's factors would move when another user comes or goes. So every user is solved
        # at a width that its own row count alone sets, its rows right-aligned in it (the solver reads the last
        # real column as the user's length), one call per width.
        lengths = rows.mask.sum(dim=1).numpy()
        widths = _solve_widths(lengths)
        for width in np.unique(widths):
            users = torch.from_numpy(np.flatnonzero(widths == width))
            ads, labels, mask = _right_aligned(rows.ads[users], rows.labels[users], torch.from_numpy(lengths[users.numpy()]), int(width))
            factors[users] = solve_user_factors(
                ad_factors, ad_bias, ads, labels, mask, l2=self.user_l2, iters=self.iters,
                init=None if start is None else start[users],
            )
        return factors.numpy()


class NeuMFUserStep(BaseModel):
    """NeuMF's user step: each user's two embeddings by Adam on their own rows (shared/neumf.py)."""

    model_config = _RECORD
    solver: Literal["neumf"] = "neumf"
    user_l2: float = Field(_DEFAULTS["user_l2"].default, gt=0)
    negatives: int = Field(_DEFAULTS["negatives"].default, ge=1)
    steps: int = Field(_DEFAULTS["neumf_user_steps"].default, ge=1)
    learning_rate: float = Field(_DEFAULTS["neumf_user_lr"].default, gt=0)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> NeuMFUserStep:
        return cls(user_l2=cfg.user_l2, negatives=cfg.negatives, steps=cfg.neumf_user_steps, learning_rate=cfg.neumf_user_lr)

    def fit(self, split: UserSplit, arrays: Arrays, rng: np.random.Generator, init: np.ndarray | None = None) -> np.ndarray:
        import torch  # only NeuMF and SGD-trained models need it

        from client.solvers.sgd_rows import build_user_rows
        from shared.neumf import NeuMF, solve_neumf_users

        rows = build_user_rows(split, rng, self.negatives, max_positives=None)
        user, column = torch.nonzero(rows.mask, as_tuple=True)
        model = NeuMF.from_arrays(arrays)
        vectors = solve_neumf_users(
            model, user, rows.ads[user, column], rows.labels[user, column], split.num_users, self.user_l2, self.steps,
            self.learning_rate, None if init is None else torch.as_tensor(init),
        )
        return vectors.numpy().astype(np.float32)


def _solve_widths(lengths: np.ndarray) -> np.ndarray:
    """Each user's solve width from its own row count: rounded up to a quarter of its power of two
    (at most a quarter of padding, a few widths per octave); exact below 8."""
    exponent = np.frexp(np.maximum(lengths, 1).astype(np.float64))[1] - 1  # floor(log2), exact for integers
    step = np.left_shift(1, np.maximum(exponent - 2, 0)).astype(np.int64)
    return np.maximum(-(-lengths // step) * step, 1)


def _right_aligned(
    ads: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[U, width] rows and mask with each user's real rows (left-aligned in `ads`, `lengths` of them) ending at the last column."""
    import torch

    source = torch.arange(width)[None, :] - (width - lengths)[:, None]
    mask = source >= 0
    source = source.clamp(0, max(ads.shape[1] - 1, 0))
    return (
        torch.where(mask, ads.gather(1, source), 0),
        torch.where(mask, labels.gather(1, source), 0.0),
        mask,
    )


AnyUserStep = ALSUserStep | SGDUserStep | NeuMFUserStep
UserStep = Annotated[AnyUserStep, Field(discriminator="solver")]
USER_STEP = TypeAdapter(UserStep)


def parse_user_step(text: str) -> AnyUserStep:
    """A user step record from its JSON (ValueError when it is not one)."""
    return USER_STEP.validate_json(text)
