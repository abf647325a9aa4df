"""The exact user step (solve_user_factors) and the per-user training rows (build_user_rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.solvers.sgd_rows import build_user_rows
from shared.data.split import NO_TEST, UserSplit, leave_last_out
from shared.data.synthetic import SyntheticSpec, generate
from shared.model import solve_user_factors

NUM_ADS, DIM = 30, 4


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny solves: intra-op threads only add synchronisation overhead (30x slower on a busy 2-CPU box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def objective(p, ad_factors, ad_bias, ads, labels, mask, l2):
    """Per-user sum_l mask * BCE(p . q_l + b_l, y_l) + l2/2 ||p||^2, written independently."""
    logits = (ad_factors[ads] * p[:, None, :]).sum(-1) + ad_bias[ads]
    data = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask).sum(dim=1)
    return data + 0.5 * l2 * (p * p).sum(dim=1)


def assert_near(actual, expected, atol):
    difference = float((actual - expected).abs().max())
    assert difference <= atol, f"max abs difference {difference:.3g} > {atol:g}"


def gradient(p, ad_factors, ad_bias, ads, labels, mask, l2):
    p = p.detach().clone().requires_grad_(True)
    objective(p, ad_factors, ad_bias, ads, labels, mask, l2).sum().backward()
    return p.grad


def random_problem(seed: int, num_users: int = 12, width: int = 15, dtype=torch.float64):
    """Left-aligned rows of varying length per user (one user has none), random garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    ad_factors = torch.randn(NUM_ADS, DIM, generator=g, dtype=dtype)
    ad_bias = 0.5 * torch.randn(NUM_ADS, generator=g, dtype=dtype)
    ads = torch.randint(NUM_ADS, (num_users, width), generator=g)
    labels = (torch.rand(num_users, width, generator=g) < 0.4).to(dtype)
    lengths = torch.randint(1, width + 1, (num_users,), generator=g)
    if num_users > 5:
        lengths[3] = 0  # a user without rows
        lengths[5] = width  # a user filling the width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ad_factors, ad_bias, ads, labels, mask


@pytest.mark.parametrize("l2", [0.5, 1.0, 5.0])
def test_solution_is_a_stationary_point_of_the_regularized_objective(l2):
    ad_factors, ad_bias, ads, labels, mask = random_problem(seed=0)
    p = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=l2, iters=30)
    assert p.shape == (ads.shape[0], DIM)
    grad = gradient(p, ad_factors, ad_bias, ads, labels, mask, l2)
    assert grad.abs().max() < 1e-9
    # strictly convex: a stationary point is the minimum; nearby points are worse
    base = objective(p, ad_factors, ad_bias, ads, labels, mask, l2)
    for _ in range(5):
        nudged = p + 0.05 * torch.randn(p.shape, dtype=p.dtype)
        assert (objective(nudged, ad_factors, ad_bias, ads, labels, mask, l2) > base).all()


def test_user_without_rows_gets_the_zero_vector():
    ad_factors, ad_bias, ads, labels, mask = random_problem(seed=1)
    p = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=10, init=torch.ones(ads.shape[0], DIM, dtype=torch.float64))
    assert not mask[3].any()
    assert torch.equal(p[3], torch.zeros(DIM, dtype=torch.float64))


def test_padding_does_not_influence_the_result():
    ad_factors, ad_bias, ads, labels, mask = random_problem(seed=2)
    p = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=30)
    other_ads = torch.where(mask, ads, (ads + 7) % NUM_ADS)
    other_labels = torch.where(mask, labels, 1.0 - labels)
    q = solve_user_factors(ad_factors, ad_bias, other_ads, other_labels, mask, l2=1.0, iters=30)
    assert_near(p, q, 1e-12)


@pytest.mark.parametrize("chunk_rows", [1, 7, 15, 40])
def test_result_does_not_depend_on_the_chunk_size(chunk_rows):
    ad_factors, ad_bias, ads, labels, mask = random_problem(seed=3, num_users=20)
    reference = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=30)
    chunked = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=30, chunk_rows=chunk_rows)
    assert_near(chunked, reference, 1e-10)


def test_warm_start_reaches_the_same_optimum():
    ad_factors, ad_bias, ads, labels, mask = random_problem(seed=4)
    cold = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=30)
    init = cold + 0.3 * torch.randn(cold.shape, generator=torch.Generator().manual_seed(0), dtype=cold.dtype)
    saved = init.clone()
    warm = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=30, init=init)
    assert_near(warm, cold, 1e-9)
    assert torch.equal(init, saved)  # init is an input only: not modified in place


def test_float32_as_used_by_the_trainer():
    ad_factors, ad_bias, ads, labels, mask = random_problem(seed=5, dtype=torch.float32)
    p = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=5.0, iters=8)
    assert p.dtype == torch.float32
    grad = gradient(p.double(), ad_factors.double(), ad_bias.double(), ads, labels.double(), mask, 5.0)
    assert grad.abs().max() < 1e-3


def test_newton_converges_from_a_distant_warm_start():
    ad_factors = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    ad_bias = torch.zeros(2)
    rows = 200
    ads = torch.tensor([[0, 1] * (rows // 2)])
    labels = torch.tensor([[1.0] * (rows // 2) + [0.0] * (rows // 2)])
    mask = torch.ones(1, rows, dtype=torch.bool)
    p = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=5.0, iters=50, init=torch.tensor([[3.0, 0.0]]))
    grad = gradient(p.double(), ad_factors.double(), ad_bias.double(), ads, labels.double(), mask, 5.0)
    assert grad.abs().max() < 1e-3


def test_rows_after_a_padding_hole_still_count():
    ad_factors, ad_bias, ads, labels, _ = random_problem(seed=6, num_users=4, width=10)
    mask = torch.arange(10)[None, :] < torch.tensor([3, 7, 5, 2])[:, None]  # nobody fills the width
    packed = solve_user_factors(ad_factors, ad_bias, ads, labels, mask, l2=1.0, iters=30)
    # the same rows with the padding first: each user's real rows at the right end
    flipped = [torch.flip(t, dims=[1]) for t in (ads, labels, mask)]
    moved = solve_user_factors(ad_factors, ad_bias, *flipped, l2=1.0, iters=30)
    assert_near(moved, packed, 1e-9)


# ------------------------------------------------------------------ build_user_rows
@pytest.fixture(scope="module")
def split() -> UserSplit:
    dataset = generate(SyntheticSpec(users=120, ads=80, merchants=2, seed=9))[0]
    return leave_last_out(dataset.log, len(dataset.catalog))


def rows_of(rows, u):
    n = int(rows.mask[u].sum())
    return rows.ads[u, :n].numpy(), rows.labels[u, :n].numpy()


@pytest.mark.parametrize("max_positives, negatives", [(5, 4), (None, 2), (1, 0)])
def test_build_user_rows(split, max_positives, negatives):
    rows = build_user_rows(split, np.random.default_rng(0), negatives=negatives, max_positives=max_positives)
    assert rows.ads.shape == rows.labels.shape == rows.mask.shape
    assert rows.ads.shape[0] == split.num_users
    assert rows.mask.dtype == torch.bool
    capped_somewhere = False
    for u in range(split.num_users):
        positives = set(split.positives(u).tolist())
        impressions = split.imp_ads[split.imp_offsets[u] : split.imp_offsets[u + 1]]
        n_pos = len(positives) if max_positives is None else min(len(positives), max_positives)
        capped_somewhere |= n_pos < len(positives)
        expected_rows = n_pos + negatives * n_pos + len(impressions)

        # the mask marks exactly the real rows, left-aligned
        mask = rows.mask[u].numpy()
        assert mask.sum() == expected_rows
        assert mask[:expected_rows].all() and not mask[expected_rows:].any()

        ads, labels = rows_of(rows, u)
        assert set(np.unique(labels)) <= {0.0, 1.0}
        pos_rows, neg_rows = ads[labels == 1], ads[labels == 0]
        # positives: a capped sample of the user's training positives, no repeats
        assert len(pos_rows) == n_pos
        assert len(set(pos_rows.tolist())) == n_pos
        assert set(pos_rows.tolist()) <= positives
        # negatives (sampled and impressions) never are training positives of this user
        assert not set(neg_rows.tolist()) & positives
        # every impression is there, as a label-0 row
        remaining = list(neg_rows.tolist())
        for ad in impressions:
            remaining.remove(int(ad))
        assert len(remaining) == negatives * n_pos
        assert all(0 <= ad < split.num_ads for ad in remaining)
    if max_positives is not None:
        assert capped_somewhere


def test_build_user_rows_is_deterministic_for_a_seed(split):
    first = build_user_rows(split, np.random.default_rng(42), negatives=4, max_positives=5)
    second = build_user_rows(split, np.random.default_rng(42), negatives=4, max_positives=5)
    other = build_user_rows(split, np.random.default_rng(43), negatives=4, max_positives=5)
    assert torch.equal(first.ads, second.ads) and torch.equal(first.labels, second.labels) and torch.equal(first.mask, second.mask)
    assert not torch.equal(first.ads, other.ads)


def test_user_who_likes_nearly_every_ad_gets_only_true_negatives():
    # user 0 trains on 5 of 6 ads: the only possible negative is ad 5; user 1 has nothing at all
    split = UserSplit(
        user_ids=np.array(["greedy", "idle"], dtype=object),
        num_ads=6,
        pos_offsets=np.array([0, 5, 5]),
        pos_ads=np.array([0, 1, 2, 3, 4]),
        imp_offsets=np.zeros(3, dtype=np.int64),
        imp_ads=np.zeros(0, dtype=np.int64),
        test_ad=np.array([NO_TEST, NO_TEST]),
    )
    rows = build_user_rows(split, np.random.default_rng(0), negatives=4, max_positives=None)
    ads, labels = rows_of(rows, 0)
    assert sorted(ads[labels == 1].tolist()) == [0, 1, 2, 3, 4]
    assert set(ads[labels == 0].tolist()) <= {5}
    assert not rows.mask[1].any()


def test_rows_feed_the_solver(split):
    """The solver on build_user_rows output: one stationary point per user."""
    rows = build_user_rows(split, np.random.default_rng(1), negatives=4, max_positives=None)
    g = torch.Generator().manual_seed(0)
    ad_factors = 0.3 * torch.randn(split.num_ads, 8, generator=g, dtype=torch.float64)
    ad_bias = torch.zeros(split.num_ads, dtype=torch.float64)
    labels = rows.labels.double()
    p = solve_user_factors(ad_factors, ad_bias, rows.ads, labels, rows.mask, l2=5.0, iters=10)
    # float64 Newton with an Armijo search stalls where the objective's decrease (|g|^2 / h) falls under its
    # rounding: a gradient floor of a few 1e-8 for some rows draws (4.7e-8 for this one, 10, 12 or 15 iterations)
    assert gradient(p, ad_factors, ad_bias, rows.ads, labels, rows.mask, 5.0).abs().max() < 1e-7
