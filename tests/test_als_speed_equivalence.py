"""The fast ALS statistics (sparse products, issue 16) equal the per-row sums they replace.

References are written the slow, obvious way: one row at a time for the statistics, one
linear system per user for the user step, np.setdiff1d for the evaluation negatives. The data
has duplicate (user, ad) rows (with different labels), users without rows, and more users
than one chunk holds, so every path of the fast code is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

import shared.als
from shared.als import ALSSettings, Rows, ad_statistics, augmented, solve_users
from shared.data.split import NO_TEST, UserSplit, sample_eval_negatives, user_seed
from shared.wire import ALS_COUNT, ALS_GRAM, ALS_POSITIVES, ALS_TARGET, ALS_USER_GRAM

NUM_USERS, NUM_ADS, DIM = 37, 23, 4
TOLERANCE = 1e-10  # relative to the statistic's largest entry: only the summation order differs


def _rows_with_duplicates(seed: int = 0) -> Rows:
    rng = np.random.default_rng(seed)
    user = rng.integers(NUM_USERS - 3, size=300)  # the last three users have no rows
    ad = rng.integers(NUM_ADS, size=300)
    repeated = rng.choice(300, size=60, replace=False)  # the same (user, ad) again, with either label
    user, ad = np.concatenate([user, user[repeated]]), np.concatenate([ad, ad[repeated]])
    label = (rng.random(len(user)) < 0.4).astype(np.float64)
    order = np.argsort(user, kind="stable")
    rows = Rows(user[order], ad[order], label[order], NUM_USERS)
    pairs = rows.user * NUM_ADS + rows.ad
    assert len(np.unique(pairs)) < len(pairs), "the data must hold duplicate (user, ad) rows"
    return rows


def _settings(mode: str, private: bool) -> ALSSettings:
    return ALSSettings(alpha0=0.3, user_l2=0.7, ad_l2=1.0, max_rows=6 if private else None, user_clip=0.8,
                       gram_mode=mode, clip=private)


def _reference_statistics(rows: Rows, user_factors: np.ndarray, settings: ALSSettings) -> dict[str, np.ndarray]:
    """The module docstring's sums, one row at a time."""
    p_aug = augmented(user_factors, settings.user_clip, settings.clip)
    weight = rows.user_weights(settings.max_rows)
    aug = DIM + 1
    gram, target = np.zeros((NUM_ADS, aug, aug)), np.zeros((NUM_ADS, DIM))
    positives, count = np.zeros(NUM_ADS), np.zeros(NUM_ADS)
    for u, a, r in zip(rows.user, rows.ad, rows.label):
        gram[a] += weight[u] * np.outer(p_aug[u], p_aug[u])
        target[a] += weight[u] * r * p_aug[u, :-1]
        positives[a] += weight[u] * r
        count[a] += weight[u]
    user_gram = sum(weight[u] * np.outer(p_aug[u], p_aug[u]) for u in range(rows.num_users))
    stats = {ALS_USER_GRAM: user_gram, ALS_TARGET: target, ALS_POSITIVES: positives}
    stats.update({ALS_GRAM: gram} if settings.gram_mode == "per-ad" else {ALS_COUNT: count})
    return stats


def _reference_user_factors(rows: Rows, ad_factors: np.ndarray, ad_bias: np.ndarray, alpha0: float, user_l2: float) -> np.ndarray:
    """One ridge system per user, from the user's own rows."""
    factors = np.zeros((rows.num_users, DIM))
    for u in range(rows.num_users):
        mine = rows.user == u
        q_rows = ad_factors[rows.ad[mine]]
        lhs = q_rows.T @ q_rows + alpha0 * ad_factors.T @ ad_factors + user_l2 * np.eye(DIM)
        rhs = q_rows.T @ (rows.label[mine] - ad_bias[rows.ad[mine]]) - alpha0 * ad_factors.T @ ad_bias
        factors[u] = np.linalg.solve(lhs, rhs)
    return factors


@pytest.fixture(params=[1_000_000, 5], ids=["one-chunk", "chunks-of-5-users"])
def chunk_users(request, monkeypatch) -> int:
    monkeypatch.setattr(shared.als, "CHUNK_USERS", request.param)
    return request.param


@pytest.mark.parametrize("private", [False, True], ids=["exact", "bounded"])
@pytest.mark.parametrize("mode", ["per-ad", "shared"])
def test_statistics_equal_the_per_row_sums(chunk_users: int, mode: str, private: bool) -> None:
    rows = _rows_with_duplicates()
    factors = np.random.default_rng(1).normal(0.0, 1.0, size=(NUM_USERS, DIM))  # norms near 2: the clip binds
    fast = ad_statistics(rows, factors, NUM_ADS, _settings(mode, private))
    reference = _reference_statistics(rows, factors, _settings(mode, private))
    assert set(fast) == set(reference)
    for key, expected in reference.items():
        assert fast[key].shape == expected.shape, key
        np.testing.assert_allclose(fast[key], expected, rtol=0, atol=TOLERANCE * np.abs(expected).max(), err_msg=key)
    if mode == "per-ad":
        np.testing.assert_array_equal(fast[ALS_GRAM], np.swapaxes(fast[ALS_GRAM], 1, 2))  # exactly symmetric


def test_user_step_equals_one_solve_per_user(chunk_users: int) -> None:
    rows = _rows_with_duplicates(seed=2)
    rng = np.random.default_rng(3)
    ad_factors, ad_bias = rng.normal(0.0, 0.5, size=(NUM_ADS, DIM)), rng.normal(0.0, 0.5, size=NUM_ADS)
    fast = solve_users(rows, ad_factors, ad_bias, alpha0=0.3, user_l2=0.7)
    reference = _reference_user_factors(rows, ad_factors, ad_bias, alpha0=0.3, user_l2=0.7)
    np.testing.assert_allclose(fast, reference, rtol=0, atol=TOLERANCE * np.abs(reference).max())
    # a user without rows gets the prior's solution, which is the same for all of them
    np.testing.assert_allclose(fast[-1], fast[-2], rtol=0, atol=1e-15)


def test_eval_negatives_equal_the_setdiff_reference() -> None:
    rng = np.random.default_rng(4)
    num_users, num_ads = 30, 150
    positives = [np.sort(rng.choice(num_ads, size=int(rng.integers(1, 40)), replace=False)) for _ in range(num_users)]
    test_ad = np.array([NO_TEST if u % 7 == 0 else int(np.setdiff1d(np.arange(num_ads), p)[u]) for u, p in enumerate(positives)])
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in positives])])
    split = UserSplit(user_ids=np.array([f"user-{u:03d}" for u in range(num_users)], dtype=object), num_ads=num_ads,
                      pos_offsets=offsets, pos_ads=np.concatenate(positives), imp_offsets=np.zeros(num_users + 1, dtype=np.int64),
                      imp_ads=np.zeros(0, dtype=np.int64), test_ad=test_ad)
    negatives = sample_eval_negatives(split, num_negatives=99, seed=5)
    for u in range(num_users):
        if test_ad[u] == NO_TEST:
            assert np.all(negatives[u] == -1)
            continue
        allowed = np.setdiff1d(np.arange(num_ads), np.append(positives[u], test_ad[u]))
        expected = np.random.default_rng(user_seed(5, split.user_ids[u])).choice(allowed, size=min(99, len(allowed)), replace=False)
        np.testing.assert_array_equal(negatives[u, : len(expected)], expected)
        assert np.all(negatives[u, len(expected) :] == -1)


def _reference_shared_solve(stats: dict[str, np.ndarray], settings: ALSSettings, noise_stds: dict[str, float],
                            tags: np.ndarray) -> np.ndarray:
    """The shared-Gramian ad step with every ad's Gramian built (n_a x G / users) and solved on its own."""
    gram = 0.5 * (stats[ALS_USER_GRAM] + stats[ALS_USER_GRAM].T)
    users = max(gram[-1, -1] / settings.user_clip**2, 1.0)
    per_ad = np.maximum(stats[ALS_COUNT], 0.0)[:, None, None] * (gram / users)[None]
    floor = settings.ad_l2 + settings.noise_ridge * noise_stds[ALS_TARGET]
    target = np.hstack([stats[ALS_TARGET], settings.user_clip * stats[ALS_POSITIVES][:, None]])
    assert settings.alpha0 is not None

    def ridge(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(lhs)
        return np.stack([v @ ((v.T @ r) / (np.maximum(w, 0.0) + floor)) for w, v, r in zip(values, vectors, rhs)])

    coef = ridge(per_ad + settings.alpha0 * gram[None], target)
    counts = per_ad[:, -1, -1] / settings.user_clip**2
    weight = counts.clip(0) / (counts.clip(0) + settings.count_shrinkage * noise_stds[ALS_COUNT])
    tag_lhs = np.einsum("at,aij->tij", tags, per_ad) + settings.alpha0 * gram[None]
    tag_coef = ridge(tag_lhs, tags.T @ target)
    prior = (tags / tags.sum(axis=1, keepdims=True).clip(min=1e-300)) @ tag_coef
    coef[:, :-1] = weight[:, None] * coef[:, :-1] + settings.prior_weight * (1 - weight[:, None]) * prior[:, :-1]
    return np.hstack([coef[:, :-1], (coef[:, -1] * settings.user_clip)[:, None]])


def test_the_shared_solve_never_builds_per_ad_gramians_and_equals_building_them() -> None:
    rows = _rows_with_duplicates(3)
    settings = ALSSettings(alpha0=0.3, user_l2=0.7, ad_l2=1.0, max_rows=6, user_clip=0.8, gram_mode="shared", clip=True,
                           noise_ridge=20.0, count_shrinkage=1.0, prior_weight=0.5)
    user_factors = np.random.default_rng(4).normal(size=(NUM_USERS, DIM))
    stats = ad_statistics(rows, user_factors, NUM_ADS, settings)
    rng = np.random.default_rng(5)
    stats = {k: v + rng.normal(0, 0.05, size=np.shape(v)) for k, v in stats.items()}  # noisy, the user Gramian indefinite-ish
    noise_stds = {ALS_TARGET: 0.01, ALS_COUNT: 0.5}
    tags = (rng.random((NUM_ADS, 5)) < 0.4).astype(np.float64)
    solved = shared.als.solve_ads(stats, settings, noise_stds, tags)
    expected = _reference_shared_solve(stats, settings, noise_stds, tags)
    np.testing.assert_allclose(np.hstack([solved["ad_factors"], solved["ad_bias"][:, None]]), expected, rtol=1e-5, atol=1e-6)


def test_the_user_step_reads_only_the_ads_a_shard_has_rows_on() -> None:
    """A shard touching a few ads of a large catalog: the same factors as one solve per user, the
    untouched ads entering only through alpha0 Q^T Q."""
    rng = np.random.default_rng(8)
    num_ads = 400
    user = np.sort(rng.integers(6, size=40))
    rows = Rows(user, rng.choice([3, 77, 150, 151, 399], size=40), (rng.random(40) < 0.5).astype(np.float64), 7)
    ad_factors, ad_bias = rng.normal(size=(num_ads, DIM)), rng.normal(size=num_ads)
    reference = np.zeros((rows.num_users, DIM))
    for u in range(rows.num_users):
        mine = rows.user == u
        q_rows = ad_factors[rows.ad[mine]]
        lhs = q_rows.T @ q_rows + 0.3 * ad_factors.T @ ad_factors + 0.7 * np.eye(DIM)
        reference[u] = np.linalg.solve(lhs, q_rows.T @ (rows.label[mine] - ad_bias[rows.ad[mine]]) - 0.3 * ad_factors.T @ ad_bias)
    np.testing.assert_allclose(solve_users(rows, ad_factors, ad_bias, alpha0=0.3, user_l2=0.7), reference, rtol=1e-9, atol=1e-12)
