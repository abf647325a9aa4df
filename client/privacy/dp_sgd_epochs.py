"""The ad step's epochs under user-level DP-SGD, with Opacus (the DP-SGD plan runs them).

One Opacus sample is one user: the dataset is the list of the shard's users, and a sample's
forward pass scores that user's whole row set (their capped positives, sampled negatives and
impressions) with their (frozen, local) user vector. So Opacus' per-sample clipping bounds each
user's total contribution to a step, its Poisson sampling samples users, and its accountant
counts users. Gaussian noise is added by Opacus to the full gradient of every global
parameter: all catalog rows of the ad factors and biases, touched or not.

Per-user clipping is computed in one of three ways, all giving the same clipped sum:
- "fused" (the default, "auto"): the closed form of this model's per-user gradient, one forward
  pass and two scatter-adds, with Opacus' Poisson sampler and RDP accountant;
- Opacus "hooks": per-sample gradients materialized (batch x catalog x dim floats per step);
- Opacus "ghost": ghost clipping, two backward passes, no per-sample gradient tensors.
"opacus" picks hooks or ghost by the size of hooks' per-sample tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import TensorDataset

from client.solvers.sgd_rows import UserRows
from shared.accounting import Release
from shared.app_log import log
from shared.model import AdModel
from shared.wire import DP_STEPS, Arrays

EpochRows = Callable[[], UserRows]  # each epoch's rows of every user
BuildModel = Callable[[Arrays], nn.Module]  # the torch module over the global parameters (MF's AdModel, NeuMF)
EpochsResult = tuple[Arrays, list[Release], dict[str, float]]  # new parameters, accountant history, step counts

# Above this many floats per step (users x parameters), hooks mode's per-sample gradients cost
# more than ghost clipping's second backward pass (measured: docs/BENCHMARKS.md, DP overhead).
HOOKS_MAX_FLOATS = 64 * 4096 * 32


@dataclass(frozen=True)
class DPSGDSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    epochs: int
    learning_rate: float
    grad_sample_mode: str  # "auto" | "hooks" | "ghost" (Opacus) | "fused" (closed form, below)
    seed: int
    # the divisor of each step's noisy sum of clipped gradients: a public constant under
    # user-level DP (the expected batch, sample rate x users, would release the shard's size);
    # None: the expected batch, as Opacus' own DPOptimizer divides
    normalizer: float | None = None

    def divisor(self, num_users: int) -> float:
        return self.normalizer if self.normalizer is not None else self.sample_rate * num_users


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
    batch = activations[0].shape[0]
    if batch == 0 or activations[0].numel() == 0:  # an empty Poisson batch
        return {cast(nn.Parameter, layer.weight): torch.zeros(batch, dtype=backprops.dtype, device=backprops.device)}
    ids = activations[0].reshape(batch, -1)
    grads = backprops.reshape(-1, backprops.shape[-1])
    sample = torch.arange(batch, device=ids.device).repeat_interleave(ids.shape[1])
    keys = sample * layer.num_embeddings + ids.reshape(-1)
    unique_keys, position = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(len(unique_keys), grads.shape[1], dtype=grads.dtype, device=grads.device).index_add_(0, position, grads)
    squared = torch.zeros(batch, dtype=grads.dtype, device=grads.device)
    squared.scatter_add_(0, unique_keys // layer.num_embeddings, summed.pow(2).sum(dim=1))
    return {cast(nn.Parameter, layer.weight): squared.sqrt()}


@register_norm_sampler(nn.Linear)
def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a linear layer applied to each of a sample's T rows, for ghost clipping.

    Same result as Opacus' `compute_linear_norm_sample`, by the cheaper of two exact routes: its
    Gram trick (<g g^T, a a^T>, T x T floats per sample) or the per-sample gradient itself
    (sum over rows of g a^T, out x in floats per sample). NeuMF's MLP reads hundreds of rows per
    user through layers a few dozen wide, where Opacus' route (T^2 per sample, twice with the
    bias) made a ghost step 30x a non-private one (docs/BENCHMARKS.md). Registered for nn.Linear
    in this process, replacing Opacus' own; a 2-D input (one row per sample) is the rank-one case.
    """
    inputs = activations[0].to(backprops.dtype)
    batch = backprops.shape[0]
    grads = backprops.reshape(batch, -1, backprops.shape[-1])  # [B, T, out]
    rows = inputs.reshape(batch, -1, inputs.shape[-1])  # [B, T, in]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if rows.shape[1] ** 2 <= rows.shape[2] * grads.shape[2]:
            gram = torch.bmm(grads, grads.transpose(1, 2)) * torch.bmm(rows, rows.transpose(1, 2))
            squared = gram.sum(dim=(1, 2))
        else:
            squared = torch.bmm(grads.transpose(1, 2), rows).pow(2).sum(dim=(1, 2))
        out[cast(nn.Parameter, layer.weight)] = squared.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grads.sum(dim=1).norm(dim=1)
    return out


@torch.no_grad()
def fused_clipped_gradients(
    model: AdModel, user_vectors: torch.Tensor, ads: torch.Tensor, target: torch.Tensor, max_grad_norm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over users of their clipped gradients (ad factors, ad biases), and the per-user norms.

    For this model the per-user gradient has a closed form: with g_l = d loss_u / d logit_l and
    G_a = sum of g_l over the user's rows on ad a, the user's gradient is p_u * G_a on row a of
    the ad factors and G_a on ad bias a, so its squared norm is (|p_u|^2 + 1) * sum_a G_a^2.
    One forward pass and two scatter-adds give exactly what Opacus computes with per-sample
    gradients (tests/test_private_step.py checks it against Opacus' hooks mode).
    """
    num_ads = model.num_ads
    mask = target >= 0
    logits = model(user_vectors, ads)
    per_row = (torch.sigmoid(logits) - target.clamp(min=0)) * mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    rows = torch.arange(ads.shape[0]).unsqueeze(1).expand_as(ads)[mask]
    keys, position = torch.unique(rows * num_ads + ads[mask], return_inverse=True)
    summed = torch.zeros(len(keys), dtype=per_row.dtype).index_add_(0, position, per_row[mask])
    owner, ad = keys // num_ads, keys % num_ads
    squared = torch.zeros(ads.shape[0], dtype=per_row.dtype).index_add_(0, owner, summed.pow(2))
    norms = torch.sqrt((user_vectors.pow(2).sum(dim=1) + 1.0) * squared)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    weight = summed * factor[owner]
    grad_bias = torch.zeros(num_ads, dtype=per_row.dtype).index_add_(0, ad, weight)
    grad_factors = torch.zeros(num_ads, user_vectors.shape[1], dtype=per_row.dtype).index_add_(
        0, ad, weight.unsqueeze(1) * user_vectors[owner]
    )
    return grad_factors, grad_bias, norms


def _fused_ad_epochs(
    model: AdModel, user_factors: np.ndarray, epoch_rows: EpochRows, settings: DPSGDSettings, history: list[Release]
) -> EpochsResult:
    """DP-SGD with Opacus' Poisson sampler and RDP accountant, and closed-form per-user clipping.

    Same mechanism as Opacus' DPOptimizer with loss_reduction="mean": clipped per-user gradients
    summed, N(0, (noise_multiplier * max_grad_norm)^2) added to every coordinate, divided by
    `settings.divisor` (the expected batch, or a public constant); then the (Adam) step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    users = torch.as_tensor(user_factors, dtype=torch.float32)
    num_users = users.shape[0]
    generator = torch.Generator().manual_seed(settings.seed)
    sampler = UniformWithReplacementSampler(num_samples=num_users, sample_rate=settings.sample_rate, generator=generator)
    accountant = RDPAccountant()
    accountant.load_state_dict({"history": list(history), "mechanism": accountant.mechanism()})
    divisor = settings.divisor(num_users)
    noise_std = settings.noise_multiplier * settings.max_grad_norm
    steps, sampled = 0, 0
    for _ in range(settings.epochs):
        rows = epoch_rows()
        for batch in sampler:
            batch = torch.as_tensor(batch, dtype=torch.long)
            part = rows.take(batch)
            grad_factors, grad_bias, _ = fused_clipped_gradients(model, users[batch], part.ads, part.target(), settings.max_grad_norm)
            grad_factors += noise_std * torch.randn(grad_factors.shape, generator=generator)
            grad_bias += noise_std * torch.randn(grad_bias.shape, generator=generator)
            model.ad_factors.weight.grad = grad_factors / divisor
            model.ad_bias.weight.grad = (grad_bias / divisor).unsqueeze(1)
            optimizer.step()
            accountant.step(noise_multiplier=settings.noise_multiplier, sample_rate=settings.sample_rate)
            steps += 1
            sampled += len(batch)
    new_history = [tuple(h) for h in accountant.history]
    log.debug("fused DP-SGD: %d steps, %.1f users per step", steps, sampled / max(steps, 1))
    return model.get_arrays(), new_history, {DP_STEPS: float(steps)}


def resolve_grad_sample_mode(mode: str, parameters: int, expected_batch: float, closed_form: bool = True) -> str:
    """"auto" is MF's fused closed form (`closed_form`): measured faster than a non-private epoch,
    and than both Opacus modes on every catalog size tried (docs/BENCHMARKS.md); a model without
    one (NeuMF) takes Opacus'. Between Opacus' own modes, hooks wins while its per-sample
    gradients (batch x parameters floats) stay small."""
    if mode == "auto" and closed_form:
        return "fused"
    if mode in ("auto", "opacus"):
        return "hooks" if expected_batch * parameters <= HOOKS_MAX_FLOATS else "ghost"
    if mode == "fused" and not closed_form:
        raise ValueError("the fused closed form is MF's per-user gradient; this model's per-user clipping is Opacus'")
    return mode


def private_ad_epochs(
    arrays: Arrays, user_factors: np.ndarray, epoch_rows: EpochRows, settings: DPSGDSettings, history: list[Release],
    build_model: BuildModel = AdModel.from_arrays,
) -> EpochsResult:
    """Run `settings.epochs` DP-SGD epochs over users of the model `build_model` makes of `arrays`;
    returns new arrays and the accountant's full history after them (the given `history` continued)."""
    with warnings.catch_warnings():
        # Opacus' notice about its non-cryptographic RNG (seeded from OS entropy, see
        # client/privacy/dp_sgd.py) and torch's about hooks on inputs that need no gradient
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        model = build_model(arrays)
        parameters = sum(p.numel() for p in model.parameters())
        expected_batch = settings.sample_rate * user_factors.shape[0]
        mode = resolve_grad_sample_mode(settings.grad_sample_mode, parameters, expected_batch, closed_form=isinstance(model, AdModel))
        if isinstance(model, AdModel) and mode == "fused":
            return _fused_ad_epochs(model, user_factors, epoch_rows, settings, history)
        return _private_ad_epochs(model, mode, user_factors, epoch_rows, settings, history)


def _private_ad_epochs(
    model: nn.Module, mode: str, user_factors: np.ndarray, epoch_rows: EpochRows, settings: DPSGDSettings, history: list[Release]
) -> EpochsResult:
    num_users = user_factors.shape[0]
    users = torch.as_tensor(user_factors, dtype=torch.float32)

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.load_state_dict({"history": list(history), "mechanism": engine.accountant.mechanism()})
    generator = torch.Generator().manual_seed(settings.seed)
    # Poisson sampling at exactly the planned rate: Opacus' own conversion of a batched loader
    # derives the rate from the number of users (1 / number of batches), ours does not
    loader = DPDataLoader(TensorDataset(torch.arange(num_users)), sample_rate=settings.sample_rate, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    made = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=PerUserLoss(),
        noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
        poisson_sampling=False, grad_sample_mode=mode, noise_generator=generator,
    )
    if mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = made
    else:
        (private_model, private_optimizer, private_loader), criterion = made, PerUserLoss()
    if not np.isclose(1.0 / len(private_loader), settings.sample_rate):  # Opacus' accountant reads 1 / len(loader)
        raise ValueError(f"Opacus accounts rate {1.0 / len(private_loader)}, the budget was planned for {settings.sample_rate}: "
                         "1 / dp-sample-rate must be an integer")
    if settings.normalizer is not None:
        private_optimizer.expected_batch_size = int(settings.normalizer)  # Opacus divides each step's noisy sum by it

    steps, sampled = 0, 0
    for _ in range(settings.epochs):
        rows = epoch_rows()
        for (batch,) in private_loader:
            part = rows.take(batch)
            private_optimizer.zero_grad(set_to_none=True)
            loss = criterion(private_model(users[batch], part.ads), part.target())
            loss.backward()
            private_optimizer.step()
            steps += 1
            sampled += len(batch)
    new_history = [tuple(h) for h in engine.accountant.history]
    # the realized batch sizes stay here: they depend on the data set's size, released only as a planned count
    log.debug("Opacus %s DP-SGD: %d steps, %.1f users per step", mode, steps, sampled / max(steps, 1))
    return model.get_arrays(), new_history, {DP_STEPS: float(steps)}  # type: ignore[operator]
