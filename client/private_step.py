"""The ad step under user-level DP-SGD, with Opacus.

One Opacus sample is one user: the dataset is the list of the shard's users, and a sample's
forward pass scores that user's whole row set (their capped positives, sampled negatives and
impressions) with their (frozen, local) user vector. So Opacus' per-sample clipping bounds each
user's total contribution to a step, its Poisson sampling samples users, and its accountant
counts users. Gaussian noise is added by Opacus to the full gradient of every global
parameter: all catalog rows of the ad factors and biases, touched or not.

Per-sample gradients are computed in Opacus' "hooks" mode (materializes batch x catalog x dim
per step: fast for small catalogs) or "ghost" mode (ghost clipping: two backward passes, no
per-sample gradient tensors: for large catalogs). "auto" picks by the size of that tensor.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.model import AdModel
from shared.privacy import Release

if TYPE_CHECKING:
    from client.trainer import UserRows

log = logging.getLogger(__name__)

# Above this many floats per step, hooks mode's per-sample gradients cost more than ghost
# clipping's second backward pass (measured: docs/BENCHMARKS.md, DP overhead).
HOOKS_MAX_FLOATS = 64 * 4096 * 32


@dataclass(frozen=True)
class DPSGDSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    epochs: int
    learning_rate: float
    grad_sample_mode: str  # "hooks" | "ghost" | "auto"
    seed: int


class PerUserLoss(nn.Module):
    """Mean logistic loss over one user's real rows; padding is marked by target -1.

    With `reduction = "none"` (what Opacus' ghost clipping asks for) it returns one loss per
    user, so the privacy unit of the clipping is the user.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = (target >= 0).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        per_user = (bce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        if self.reduction == "none":
            return per_user
        if self.reduction == "sum":
            return per_user.sum()
        return per_user.sum() / max(per_user.shape[0], 1)  # an empty Poisson batch still takes its (noise) step


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of an embedding, for ghost clipping.

    Same result as Opacus' `compute_embedding_norm_sample` (sum the output gradients of equal
    (sample, id) pairs, then square and add per sample), but groups the pairs by one integer
    key instead of `torch.unique(dim=0)` on index pairs, which took 85% of a ghost-mode step
    (docs/BENCHMARKS.md). Registered for nn.Embedding in this process, replacing Opacus' own.
    """
    ids = activations[0].reshape(activations[0].shape[0], -1)
    grads = backprops.reshape(-1, backprops.shape[-1])
    batch = ids.shape[0]
    sample = torch.arange(batch, device=ids.device).repeat_interleave(ids.shape[1])
    keys = sample * layer.num_embeddings + ids.reshape(-1)
    unique_keys, position = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(len(unique_keys), grads.shape[1], dtype=grads.dtype, device=grads.device).index_add_(0, position, grads)
    squared = torch.zeros(batch, dtype=grads.dtype, device=grads.device)
    squared.scatter_add_(0, unique_keys // layer.num_embeddings, summed.pow(2).sum(dim=1))
    return {layer.weight: squared.sqrt()}


def user_sample_rate(batch_users: int, num_users: int) -> float:
    """The Poisson rate Opacus derives from a loader of `batch_users`: 1 / number of batches."""
    return 1.0 / math.ceil(num_users / batch_users)


def batch_size_for(sample_rate: float, num_users: int) -> int:
    return math.ceil(num_users / round(1.0 / sample_rate))


def resolve_grad_sample_mode(mode: str, num_ads: int, dim: int, expected_batch: float) -> str:
    if mode != "auto":
        return mode
    return "hooks" if expected_batch * num_ads * dim <= HOOKS_MAX_FLOATS else "ghost"


def private_ad_epochs(
    arrays: dict[str, np.ndarray],
    user_factors: np.ndarray,
    epoch_rows: Callable[[], UserRows],
    settings: DPSGDSettings,
    history: list[Release],
) -> tuple[dict[str, np.ndarray], list[Release], dict[str, float]]:
    """Run `settings.epochs` DP-SGD epochs over users; returns new arrays and the accountant's
    full history after them (the given `history` continued)."""
    with warnings.catch_warnings():
        # Opacus' notice about its non-cryptographic RNG (seeded from OS entropy, see
        # client/private_round.py) and torch's about hooks on inputs that need no gradient
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        return _private_ad_epochs(arrays, user_factors, epoch_rows, settings, history)


def _private_ad_epochs(
    arrays: dict[str, np.ndarray],
    user_factors: np.ndarray,
    epoch_rows: Callable[[], UserRows],
    settings: DPSGDSettings,
    history: list[Release],
) -> tuple[dict[str, np.ndarray], list[Release], dict[str, float]]:
    model = AdModel.from_arrays(arrays)
    num_users = user_factors.shape[0]
    users = torch.as_tensor(user_factors, dtype=torch.float32)
    expected_batch = settings.sample_rate * num_users
    mode = resolve_grad_sample_mode(settings.grad_sample_mode, model.num_ads, model.dim, expected_batch)

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.load_state_dict({"history": list(history), "mechanism": engine.accountant.mechanism()})
    loader = DataLoader(TensorDataset(torch.arange(num_users)), batch_size=batch_size_for(settings.sample_rate, num_users))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    made = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=PerUserLoss(),
        noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True, grad_sample_mode=mode, noise_generator=generator,
    )
    if mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = made
    else:
        (private_model, private_optimizer, private_loader), criterion = made, PerUserLoss()
    if not np.isclose(private_loader.sample_rate, settings.sample_rate):
        raise ValueError(f"Opacus samples users at rate {private_loader.sample_rate}, the budget was planned for {settings.sample_rate}")

    steps, sampled = 0, 0
    for _ in range(settings.epochs):
        rows = epoch_rows()
        target = torch.where(rows.mask, rows.labels, torch.tensor(-1.0))
        for (batch,) in private_loader:
            width = max(int(rows.mask[batch].sum(dim=1).max()), 1) if len(batch) else 1
            private_optimizer.zero_grad(set_to_none=True)
            logits = private_model(users[batch], rows.ads[batch, :width])
            loss = criterion(logits, target[batch, :width])
            loss.backward()
            private_optimizer.step()
            steps += 1
            sampled += len(batch)
    new_history = [tuple(h) for h in engine.accountant.history]
    return model.get_arrays(), new_history, {"dp-steps": float(steps), "dp-mean-batch": sampled / max(steps, 1), "dp-mode-ghost": float(mode == "ghost")}
