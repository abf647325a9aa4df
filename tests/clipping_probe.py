"""What Opacus' per-user clipping sums, read off its optimizer (tests of MF's and NeuMF's DP-SGD)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy.dp_sgd_epochs import PerUserLoss
from client.solvers.sgd_rows import UserRows
from shared.wire import Arrays

BuildModel = Callable[[Arrays], nn.Module]


def flat_grads(params: Any) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).detach().clone() for p in params])


def clipped_sums(
    build_model: BuildModel, mode: str, reduction: str, arrays: Arrays, users: torch.Tensor, rows: UserRows,
    batches: list[torch.Tensor], max_grad_norm: float,
) -> tuple[list[torch.Tensor], int]:
    """Opacus' gradient over every parameter (before the optimizer's update, noise multiplier 0) of
    each batch of users, and the optimizer's expected batch size."""
    model = build_model(arrays)
    criterion = PerUserLoss()
    criterion.reduction = reduction
    loader = DataLoader(TensorDataset(torch.arange(len(users))), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False,
            grad_sample_mode=mode, loss_reduction=reduction,
        )
    if mode == "ghost":
        private_model, private_optimizer, private_criterion, _ = made
    else:
        (private_model, private_optimizer, _), private_criterion = made, criterion
    assert len(private_optimizer.params) == len(list(model.parameters()))  # all of them: the whole model is clipped
    target = rows.target()
    sums = []
    for batch in batches:
        private_optimizer.zero_grad(set_to_none=True)
        width = int(rows.mask[batch].sum(dim=1).max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = private_criterion(private_model(users[batch], rows.ads[batch, :width]), target[batch, :width])
            loss.backward()
        private_optimizer.pre_step()  # clip, accumulate, add (zero) noise, scale: p.grad is what the step uses
        sums.append(flat_grads(private_optimizer.params))
    return sums, private_optimizer.expected_batch_size


def user_gradient(build_model: BuildModel, arrays: Arrays, users: torch.Tensor, rows: UserRows, u: int) -> torch.Tensor:
    """One user's gradient of their own loss, over every parameter, by plain autograd: no Opacus."""
    model = build_model(arrays)
    n = int(rows.mask[u].sum())
    PerUserLoss()(model(users[[u]], rows.ads[[u], :n]), rows.target()[[u], :n]).backward()
    return flat_grads(model.parameters())
