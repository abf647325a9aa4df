"""The DP-SGD ad step (client/privacy/dp_sgd_epochs.py): what one user can change, and where the noise goes.

- Sensitivity: with Opacus on the fedads AdModel and PerUserLoss, in both per-sample-gradient
  modes ("hooks" and "ghost"), and with the closed-form "fused" clipping (the default mode),
  removing one user from a batch changes the summed clipped gradient by exactly that user's
  own gradient (plain autograd) clipped to max_grad_norm, never by more.
- The ghost-mode embedding norm sampler registered by fedads agrees with Opacus' own and with
  per-sample norms computed by brute force.
- Noise covers every coordinate, in every mode: rows of ads no user touched change under
  noise, and stay exactly unchanged without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from torch import nn

from client.privacy.dp_sgd_epochs import (
    DPSGDSettings,
    embedding_norm_sample,
    fused_clipped_gradients,
    private_ad_epochs,
)
from client.solvers.sgd_rows import UserRows, build_user_rows
from shared.accounting import user_sample_rate
from shared.data.split import UserSplit, leave_last_out
from shared.data.synthetic import SyntheticSpec, generate
from shared.model import AdModel
from shared.params import init_global_arrays
from tests.clipping_probe import clipped_sums, user_gradient

pytestmark = pytest.mark.filterwarnings("ignore:.*Secure RNG.*", "ignore:.*Full backward hook.*")

DIM = 4
MODES = ["hooks", "ghost"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split() -> UserSplit:
    dataset = generate(SyntheticSpec(users=40, ads=30, merchants=1, seed=3))[0]
    return leave_last_out(dataset.log, len(dataset.catalog))


@pytest.fixture(scope="module")
def rows(split) -> UserRows:
    return build_user_rows(split, np.random.default_rng(0), negatives=2, max_positives=5)


@pytest.fixture(scope="module")
def user_vectors(split) -> torch.Tensor:
    return torch.randn(split.num_users, DIM, generator=torch.Generator().manual_seed(1))


# ====================================================================== sensitivity
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("max_grad_norm", [0.05, 10.0])
@pytest.mark.parametrize("mode", MODES)
def test_one_user_changes_the_clipped_sum_by_at_most_max_grad_norm(split, rows, user_vectors, mode, max_grad_norm, reduction):
    arrays = init_global_arrays(split.num_ads, DIM, seed=0)
    batch = torch.arange(12)
    removed = [0, 3, 7, 11]
    batches = [batch] + [batch[batch != u] for u in removed]
    sums, expected_batch = clipped_sums(AdModel.from_arrays, mode, reduction, arrays, user_vectors, rows, batches, max_grad_norm)
    scale = 1.0 if reduction == "sum" else 1.0 / expected_batch  # "mean": Opacus divides by the expected batch size

    clipped_any = False
    for u, without in zip(removed, sums[1:]):
        difference = sums[0] - without
        own = user_gradient(AdModel.from_arrays, arrays, user_vectors, rows, u)
        assert float(own.norm()) > 0
        clipped_any |= float(own.norm()) > max_grad_norm
        clipped = own * min(1.0, max_grad_norm / (float(own.norm()) + 1e-6))
        # the user's whole contribution is their own gradient, clipped ...
        torch.testing.assert_close(difference, scale * clipped, rtol=1e-4, atol=1e-7)
        # ... so never more than max_grad_norm (the sensitivity the accountant assumes)
        assert float(difference.norm()) <= scale * max_grad_norm * (1 + 1e-5)
    assert clipped_any == (max_grad_norm < 1.0)  # the small bound does clip: the test is not vacuous


@pytest.mark.parametrize("max_grad_norm", [0.05, 10.0])
def test_one_user_changes_the_fused_clipped_sum_by_at_most_max_grad_norm(split, rows, user_vectors, max_grad_norm):
    arrays = init_global_arrays(split.num_ads, DIM, seed=0)
    model = AdModel.from_arrays(arrays)
    target = torch.where(rows.mask, rows.labels, torch.tensor(-1.0))
    batch = torch.arange(12)

    def clipped_sum(users):
        factors, bias, _ = fused_clipped_gradients(model, user_vectors[users], rows.ads[users], target[users], max_grad_norm)
        return torch.cat([factors.reshape(-1), bias])

    full = clipped_sum(batch)
    for u in (0, 3, 7, 11):
        difference = full - clipped_sum(batch[batch != u])
        own = user_gradient(AdModel.from_arrays, arrays, user_vectors, rows, u)
        clipped = own * min(1.0, max_grad_norm / (float(own.norm()) + 1e-6))
        torch.testing.assert_close(difference, clipped, rtol=1e-4, atol=1e-7)
        assert float(difference.norm()) <= max_grad_norm * (1 + 1e-5)


def test_hooks_and_ghost_clipping_give_the_same_step(split, rows, user_vectors):
    arrays = init_global_arrays(split.num_ads, DIM, seed=0)
    batch = [torch.arange(3, 20)]
    hooks, _ = clipped_sums(AdModel.from_arrays, "hooks", "mean", arrays, user_vectors, rows, batch, 0.05)
    ghost, _ = clipped_sums(AdModel.from_arrays, "ghost", "mean", arrays, user_vectors, rows, batch, 0.05)
    torch.testing.assert_close(hooks[0], ghost[0], rtol=1e-4, atol=1e-8)


# ====================================================================== ghost-mode norm sampler
def _brute_force_norms(layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    norms = []
    for b in range(ids.shape[0]):
        grad = torch.zeros_like(layer.weight, dtype=backprops.dtype)
        grad.index_add_(0, ids[b].reshape(-1), backprops[b].reshape(-1, backprops.shape[-1]))
        norms.append(grad.norm())
    return torch.stack(norms)


@pytest.mark.parametrize("shape", [(6, 9), (5, 3, 4), (1, 1), (7, 40)])
@pytest.mark.parametrize("dim", [1, 3])
def test_embedding_norm_sampler_matches_opacus_and_brute_force(shape, dim):
    generator = torch.Generator().manual_seed(sum(shape) * 10 + dim)
    layer = nn.Embedding(7, dim)  # a small vocabulary: ids repeat within and across samples
    ids = torch.randint(0, 7, shape, generator=generator)
    backprops = torch.randn(*shape, dim, generator=generator, dtype=torch.float64)

    ours = embedding_norm_sample(layer, [ids], backprops)[layer.weight]
    opacus = compute_embedding_norm_sample(layer, [ids], backprops)[layer.weight]
    brute = _brute_force_norms(layer, ids, backprops)
    assert ours.shape == (shape[0],)
    torch.testing.assert_close(ours, brute, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opacus.to(ours.dtype), brute, rtol=1e-12, atol=1e-12)
    # repeats matter: the norm of the sum is not the root of the summed squared row norms
    if ids.shape[-1] > 7:
        naive = backprops.reshape(shape[0], -1, dim).pow(2).sum(dim=(1, 2)).sqrt()
        assert not torch.allclose(ours, naive)


def test_fedads_norm_sampler_is_the_one_opacus_uses_for_embeddings():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Embedding] is embedding_norm_sample


# ====================================================================== noise covers every coordinate
EXTRA_ADS = 10  # catalog rows that no user of the shard ever has as a positive, negative or impression


@pytest.mark.parametrize("mode", ["fused", "hooks", "ghost"])
def test_noise_reaches_ads_no_user_touched(split, mode):
    num_ads = split.num_ads + EXTRA_ADS
    arrays = init_global_arrays(num_ads, DIM, seed=0)
    user_factors = np.random.default_rng(1).standard_normal((split.num_users, DIM)).astype(np.float32)
    q = user_sample_rate(8, split.num_users)
    untouched = np.arange(split.num_ads, num_ads)

    def run(noise_multiplier):
        rng = np.random.default_rng(0)
        epoch_rows = []

        def rows():
            epoch_rows.append(build_user_rows(split, rng, 2, 5))
            return epoch_rows[-1]

        settings = DPSGDSettings(
            noise_multiplier=noise_multiplier, max_grad_norm=1e-4, sample_rate=q, epochs=2,
            learning_rate=0.01, grad_sample_mode=mode, seed=5,
        )
        new, history, stats = private_ad_epochs(arrays, user_factors, rows, settings, [(20.0, 1.0, 1)])
        used = np.unique(np.concatenate([r.ads[r.mask].numpy() for r in epoch_rows]))
        assert not np.isin(untouched, used).any()
        assert history == [(20.0, 1.0, 1), (noise_multiplier, q, 2 * int(1 / q))]
        assert stats == {"dp-steps": 2 * int(1 / q)}
        return new

    noised = run(1.0)
    # every row, touched or not, of both global parameters changed
    assert np.all(np.abs(noised["ad_factors"] - arrays["ad_factors"]) > 0)
    assert np.all(np.abs(noised["ad_bias"] - arrays["ad_bias"]) > 0)

    exact = run(0.0)
    # without noise the untouched rows keep their exact values: the change above is the noise
    np.testing.assert_array_equal(exact["ad_factors"][untouched], arrays["ad_factors"][untouched])
    np.testing.assert_array_equal(exact["ad_bias"][untouched], arrays["ad_bias"][untouched])
    assert np.any(exact["ad_factors"][: split.num_ads] != arrays["ad_factors"][: split.num_ads])


def test_ghost_mode_takes_empty_poisson_batches(split):
    q = user_sample_rate(1, split.num_users)  # expected batch of one user: many steps sample nobody
    arrays = init_global_arrays(split.num_ads, DIM, seed=0)
    user_factors = np.random.default_rng(1).standard_normal((split.num_users, DIM)).astype(np.float32)
    settings = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=q, epochs=1,
                             learning_rate=0.01, grad_sample_mode="ghost", seed=5)
    rng = np.random.default_rng(0)
    new, history, _ = private_ad_epochs(arrays, user_factors, lambda rng=rng: build_user_rows(split, rng, 2, 5), settings, [])
    assert history == [(1.0, q, int(1 / q))]
    assert np.isfinite(new["ad_factors"]).all()


def test_fused_and_hooks_modes_take_empty_poisson_batches(split):
    """At this rate an epoch samples empty batches (the control for the ghost-mode test above); the other
    modes step through them, noise only, and account every step."""
    q = user_sample_rate(1, split.num_users)
    assert (1 - q) ** split.num_users > 0.3  # P(a step samples nobody)
    arrays = init_global_arrays(split.num_ads, DIM, seed=0)
    user_factors = np.random.default_rng(1).standard_normal((split.num_users, DIM)).astype(np.float32)
    for mode in ("fused", "hooks"):
        settings = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=q, epochs=1,
                                 learning_rate=0.01, grad_sample_mode=mode, seed=5)
        rng = np.random.default_rng(0)
        new, history, _ = private_ad_epochs(arrays, user_factors, lambda rng=rng: build_user_rows(split, rng, 2, 5), settings, [])
        assert history == [(1.0, q, int(1 / q))]
        assert np.isfinite(new["ad_factors"]).all()
