"""The closed-form per-user clipping ("fused" mode) computes what Opacus computes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.privacy.dp_sgd_epochs import DPSGDSettings, PerUserLoss, fused_clipped_gradients, private_ad_epochs
from client.solvers.sgd_rows import build_user_rows
from shared.data.split import leave_last_out
from shared.data.synthetic import SyntheticSpec, generate
from shared.model import AdModel
from shared.params import init_global_arrays


@pytest.fixture(scope="module")
def problem():
    dataset = generate(SyntheticSpec(users=60, ads=50, merchants=1, seed=3))[0]
    split = leave_last_out(dataset.log, len(dataset.catalog))
    rows = build_user_rows(split, np.random.default_rng(0), negatives=4, max_positives=10)
    arrays = init_global_arrays(len(dataset.catalog), 8, seed=1)
    users = torch.as_tensor(np.random.default_rng(2).normal(size=(split.num_users, 8)).astype(np.float32))
    target = torch.where(rows.mask, rows.labels, torch.tensor(-1.0))
    return arrays, users, rows.ads, target


def opacus_clipped_sum(arrays, users, ads, target, clip):
    """Opacus' own per-sample clipping (hooks mode, DPOptimizer.clip_and_accumulate), no noise."""
    model = AdModel.from_arrays(arrays)
    private = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=len(users), loss_reduction="sum")
    criterion = PerUserLoss()
    criterion.reduction = "sum"
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        criterion(private(users, ads), target).backward()
    norms = torch.stack([p.grad_sample.reshape(len(users), -1).norm(dim=1) for p in model.parameters()]).norm(dim=0)
    optimizer.clip_and_accumulate()
    return model.ad_factors.weight.summed_grad, model.ad_bias.weight.summed_grad[:, 0], norms


@pytest.mark.parametrize("clip", [1e-3, 0.05, 10.0])
def test_fused_equals_opacus_clipping(problem, clip):
    arrays, users, ads, target = problem
    batch = torch.arange(0, len(users), 2)
    expected_factors, expected_bias, expected_norms = opacus_clipped_sum(arrays, users[batch], ads[batch], target[batch], clip)
    factors, bias, norms = fused_clipped_gradients(AdModel.from_arrays(arrays), users[batch], ads[batch], target[batch], clip)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(factors, expected_factors, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-4, atol=1e-7)


def test_removing_one_user_moves_the_clipped_sum_by_at_most_the_clip_norm(problem):
    arrays, users, ads, target = problem
    clip = 0.05
    model = AdModel.from_arrays(arrays)
    full_f, full_b, _ = fused_clipped_gradients(model, users, ads, target, clip)
    for removed in range(0, len(users), 7):
        keep = torch.tensor([u for u in range(len(users)) if u != removed])
        f, b, _ = fused_clipped_gradients(model, users[keep], ads[keep], target[keep], clip)
        change = torch.sqrt((full_f - f).pow(2).sum() + (full_b - b).pow(2).sum())
        assert change <= clip * (1 + 1e-5)


def test_fused_epochs_account_like_opacus(problem):
    arrays, users, ads, target = problem
    from client.solvers.sgd_rows import UserRows

    rows = UserRows(ads, target.clamp(min=0), target >= 0)
    settings = DPSGDSettings(noise_multiplier=1.3, max_grad_norm=0.1, sample_rate=0.25, epochs=2,
                             learning_rate=0.01, grad_sample_mode="fused", seed=0)
    out, history, stats = private_ad_epochs(arrays, users.numpy(), lambda: rows, settings, [(2.0, 1.0, 1)])
    assert history == [(2.0, 1.0, 1), (1.3, 0.25, 8)]
    assert stats["dp-steps"] == 8
    # noise reaches every coordinate: no row is left exactly as it was
    assert np.all(out["ad_bias"] != arrays["ad_bias"])
    assert np.all((out["ad_factors"] != arrays["ad_factors"]).all(axis=1))
