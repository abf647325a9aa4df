"""SGD (mf-solver = "sgd"): logistic MF on the merchant's rows, with torch.

User step: damped Newton per user (client/user_step.SGDUserStep). Local update: local epochs
of Adam on the ad factors and biases over mini-batches of users, user factors frozen; the
server averages the merchants' parameters (FedAvg). Under DP the ad step is DP-SGD with one
Opacus sample = one user instead (client/privacy/dp_sgd.py reads `epoch_rows`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from client.solvers.base import LocalUpdate, Solver
from client.solvers.sgd_rows import UserRows, build_user_rows
from client.user_step import SGDUserStep
from shared.model import AdModel
from shared.wire import TRAIN_LOSS, TRAIN_ROWS, Arrays


class SGDSolver(Solver):
    name = "sgd"
    warm_starts_users = True

    def build_model(self, arrays: Arrays) -> torch.nn.Module:
        """The torch module over the global parameters (user vectors are its input)."""
        return AdModel.from_arrays(arrays)

    def touched_penalty(self, model: torch.nn.Module, ads: torch.Tensor) -> torch.Tensor:
        """[B, L] squared norms of the ad parameters each row reads (the ad step's L2)."""
        assert isinstance(model, AdModel)
        return model.ad_factors(ads).pow(2).sum(-1) + model.ad_bias(ads).squeeze(-1).pow(2)

    def user_step(self) -> SGDUserStep:
        return SGDUserStep.from_config(self.cfg)

    def fit_users(self, arrays: Arrays, rng: np.random.Generator, previous: np.ndarray | None) -> np.ndarray:
        return self.user_step().fit(self.data.split, arrays, rng, previous)

    def epoch_rows(self, rng: np.random.Generator) -> Callable[[], UserRows]:
        """Each epoch's rows: capped positives sampled anew, fresh negatives.

        Epoch e's rows draw from a key taken from `rng` once, here, and e, not from `rng` as it stands at
        that epoch: the ad step draws its batch order (as many numbers as users) from `rng` between epochs,
        and a user's rows must not depend on how many other users there are."""
        cfg = self.cfg
        key = int(rng.integers(1 << 63))
        epochs = itertools.count()
        return lambda: build_user_rows(self.data.split, np.random.default_rng([key, next(epochs)]), cfg.negatives, cfg.max_positives_per_user)

    def local_update(self, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator) -> LocalUpdate:
        """The ad step without DP: local epochs of Adam over mini-batches of users."""
        cfg = self.cfg
        model = self.build_model(arrays)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        users_tensor = torch.as_tensor(user_factors, dtype=torch.float32)
        next_rows = self.epoch_rows(rng)
        total_loss, total_rows = 0.0, 0
        for _ in range(cfg.local_epochs):
            rows = next_rows()
            for batch in torch.from_numpy(rng.permutation(self.data.num_users)).split(cfg.batch_users):
                part = rows.take(batch)
                logits = model(users_tensor[batch], part.ads)
                mask = part.mask.to(logits.dtype)
                count = mask.sum().clamp_min(1.0)
                data_loss = (F.binary_cross_entropy_with_logits(logits, part.labels, reduction="none") * mask).sum() / count
                touched = self.touched_penalty(model, part.ads)
                loss = data_loss + cfg.ad_l2 * (touched * mask).sum() / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(data_loss.detach()) * float(count)
                total_rows += int(count)
        metrics = {TRAIN_LOSS: total_loss / max(total_rows, 1), TRAIN_ROWS: float(total_rows)}
        return LocalUpdate(model.get_arrays(), metrics)  # type: ignore[operator]

    def solve_alone(self, update: LocalUpdate) -> Arrays:
        return update.arrays
