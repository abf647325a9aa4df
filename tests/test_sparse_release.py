"""Exact ALS statistics without DP sent for the ads a merchant's rows touch (als-gram "sparse",
issue 19): equal to the dense per-ad release, summed and solved without a catalog-sized copy,
checked and clipped like it, and never allowed under DP (which ads were touched is private)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from server.als_aggregation import ALSAggregation
from server.reply_bounds import als_violations, median_clip
from shared.als import STAT_KEYS, ALSSettings, Rows, TouchedSum, ad_statistics, check_statistics, over_union, solve_ads
from shared.config import ConfigError, RunConfig
from shared.flower_internals import server_identity
from shared.wire import ALS_ADS, ALS_GRAM, ALS_GRAM_UPPER, ALS_POSITIVES, ALS_TARGET, ALS_USER_GRAM, TrainReply, to_array_record

NUM_ADS, DIM, MERCHANTS = 400, 6, 4


def _shards(num_ads: int = NUM_ADS, seed: int = 0) -> list[tuple[Rows, np.ndarray]]:
    """Merchants whose users touch overlapping slices of the catalog (none touches the last 100 ads)."""
    rng = np.random.default_rng(seed)
    shards = []
    for merchant in range(MERCHANTS):
        users = 60 + 10 * merchant
        user = np.sort(rng.integers(users, size=900))
        ad = rng.integers(50 * merchant, 50 * merchant + 150, size=900)
        shards.append((Rows(user, ad, (rng.random(900) < 0.4).astype(np.float64), users), rng.normal(scale=0.3, size=(users, DIM))))
    return shards


def _settings(mode: str) -> ALSSettings:
    return ALSSettings(alpha0=None, user_l2=3.0, ad_l2=3.0, max_rows=None, user_clip=0.2, gram_mode=mode, clip=False)


def test_auto_is_sparse_without_dp_and_dense_under_dp() -> None:
    assert ALSSettings.from_config(RunConfig.from_flower({"privacy": "none"})).gram_mode == "sparse"
    assert ALSSettings.from_config(RunConfig.from_flower({"privacy": "user"})).gram_mode == "shared"
    assert ALSSettings.from_config(RunConfig.from_flower({"privacy": "none", "als-gram": "per-ad"})).gram_mode == "per-ad"
    with pytest.raises(ConfigError, match="als-gram 'sparse'"):
        RunConfig.from_flower({"privacy": "user", "als-gram": "sparse"})
    with pytest.raises(ValueError, match="private"):
        dataclasses.replace(_settings("sparse"), max_rows=5)


def test_a_sparse_release_is_the_dense_one_on_the_touched_ads() -> None:
    rows, users = _shards()[1]
    dense = ad_statistics(rows, users, NUM_ADS, _settings("per-ad"))
    sparse = ad_statistics(rows, users, NUM_ADS, _settings("sparse"))
    assert set(sparse) == set(STAT_KEYS["sparse"])
    touched = sparse[ALS_ADS]
    np.testing.assert_array_equal(touched, np.unique(rows.ad))
    assert np.issubdtype(touched.dtype, np.integer)
    first, second = np.triu_indices(DIM + 1)
    np.testing.assert_allclose(sparse[ALS_GRAM_UPPER], dense[ALS_GRAM][touched][:, first, second], rtol=1e-12, atol=1e-14)
    for key in (ALS_TARGET, ALS_POSITIVES):
        np.testing.assert_allclose(sparse[key], dense[key][touched], rtol=1e-12, atol=1e-14)
    untouched = np.setdiff1d(np.arange(NUM_ADS), touched)
    assert not dense[ALS_GRAM][untouched].any() and not dense[ALS_TARGET][untouched].any()
    np.testing.assert_allclose(sparse[ALS_USER_GRAM], dense[ALS_USER_GRAM], rtol=1e-12)
    check_statistics(sparse, _settings("sparse"), NUM_ADS, DIM)


def test_the_release_grows_with_the_shard_not_the_catalog() -> None:
    rows, users = _shards()[0]
    small = ad_statistics(rows, users, NUM_ADS, _settings("sparse"))
    large = ad_statistics(rows, users, 100 * NUM_ADS, _settings("sparse"))
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in large.items()}
    dense = ad_statistics(rows, users, NUM_ADS, _settings("per-ad"))
    sizes = [sum(value.nbytes for value in stats.values()) for stats in (small, dense)]
    assert sizes[0] < 0.25 * sizes[1]  # 150 of 400 ads, each Gramian's upper triangle: 28 of 49 entries


def _messages(releases: list[dict[str, np.ndarray]]) -> list[Message]:
    return [TrainReply(f"merchant-{k}", {key: v.astype(np.float32) if v.dtype.kind == "f" else v for key, v in release.items()},
                       None, {}, None).to_message(Message(content=RecordDict(), dst_node_id=1, message_type="train"))
            for k, release in enumerate(releases)]


@pytest.mark.parametrize("robust", [None, 3.0])
def test_the_server_sums_and_solves_sparse_releases_as_the_dense_ones(robust: float | None) -> None:
    """Through ALSAggregation as Flower hands it the replies: the same model, to float32 rounding
    on the wire; ads nobody touched get zero factors and bias, as the dense solve gives them."""
    models = {}
    for mode in ("per-ad", "sparse"):
        releases = [ad_statistics(rows, users, NUM_ADS, _settings(mode)) for rows, users in _shards()]
        strategy = ALSAggregation(_settings(mode), NUM_ADS, DIM, robust_factor=robust)
        with server_identity():
            record, _ = strategy.aggregate_train(1, _messages(releases))
        assert record is not None
        models[mode] = {key: array.numpy() for key, array in record.items()}
    for key, dense in models["per-ad"].items():
        np.testing.assert_allclose(models["sparse"][key], dense, rtol=1e-4, atol=1e-6 * float(np.abs(dense).max()))
        assert not models["sparse"][key][-100:].any()
        assert np.abs(models["sparse"][key][:-100]).max() > 0


def test_the_running_sum_holds_the_union_and_equals_the_dense_sum() -> None:
    releases = [ad_statistics(rows, users, NUM_ADS, _settings("sparse")) for rows, users in _shards()]
    summed = TouchedSum(NUM_ADS)
    for release in releases:
        summed.add(release)
    total = summed.total()
    union = np.unique(np.concatenate([release[ALS_ADS] for release in releases]))
    assert sorted(total[ALS_ADS]) == list(union) and len(total[ALS_GRAM_UPPER]) == len(union)
    for key in (ALS_GRAM_UPPER, ALS_TARGET, ALS_POSITIVES):
        dense = np.zeros((NUM_ADS, *releases[0][key].shape[1:]))
        for release in releases:
            dense[release[ALS_ADS]] += release[key]
        np.testing.assert_allclose(total[key], dense[total[ALS_ADS]], rtol=1e-12)
    np.testing.assert_allclose(total[ALS_USER_GRAM], sum(release[ALS_USER_GRAM] for release in releases), rtol=1e-12)
    one = solve_ads(total, _settings("sparse"), num_ads=NUM_ADS)
    assert one["ad_factors"].shape == (NUM_ADS, DIM)
    with pytest.raises(ValueError, match="catalog's size"):
        solve_ads(total, _settings("sparse"))


def test_the_median_clip_compares_sparse_releases_ad_by_ad() -> None:
    """Clipping sparse releases is clipping the dense ones: the same blocks, over the union of ads."""
    sparse = [ad_statistics(rows, users, NUM_ADS, _settings("sparse")) for rows, users in _shards()]
    dense = [ad_statistics(rows, users, NUM_ADS, _settings("per-ad")) for rows, users in _shards()]
    attack = {key: value if key == ALS_ADS else value * 1e4 for key, value in sparse[0].items()}
    attack_dense = {key: value * 1e4 for key, value in dense[0].items()}
    clipped, clipped_dense = median_clip([*sparse, attack], 3.0), median_clip([*dense, attack_dense], 3.0)
    union = clipped[0][ALS_ADS]
    first, second = np.triu_indices(DIM + 1)
    for merchant, (mine, theirs) in enumerate(zip(clipped, clipped_dense, strict=True)):
        np.testing.assert_array_equal(mine[ALS_ADS], union)
        for key in (ALS_TARGET, ALS_POSITIVES):
            np.testing.assert_allclose(mine[key], theirs[key][union], rtol=1e-9, atol=1e-12, err_msg=f"merchant {merchant} {key}")
        # a packed Gramian is clipped by the dense one's (Frobenius) norm
        np.testing.assert_allclose(mine[ALS_GRAM_UPPER], theirs[ALS_GRAM][union][:, first, second], rtol=1e-9, atol=1e-12)
    assert np.abs(clipped[-1][ALS_TARGET]).max() < 1e-2 * np.abs(attack[ALS_TARGET]).max()  # the attack was cut down
    assert over_union(sparse)[0][ALS_TARGET].shape == (len(union), DIM)


def test_malformed_sparse_releases_are_refused() -> None:
    settings = _settings("sparse")
    rows, users = _shards()[2]
    release = ad_statistics(rows, users, NUM_ADS, settings)
    for ads, reason in ((release[ALS_ADS][::-1].copy(), "ascending"), (release[ALS_ADS] + NUM_ADS, "ascending"),
                        (release[ALS_ADS].astype(np.float32), "vector of ad indices")):
        with pytest.raises(ValueError, match=reason):
            check_statistics({**release, ALS_ADS: ads}, settings, NUM_ADS, DIM)
    with pytest.raises(ValueError, match="shape"):
        check_statistics({**release, ALS_TARGET: release[ALS_TARGET][:-1]}, settings, NUM_ADS, DIM)
    assert als_violations(release, settings, 1000, 0.0) == []
    negated = {key: value if key == ALS_ADS else -value for key, value in release.items()}
    assert any("positive semi-definite" in problem for problem in als_violations(negated, settings, 1000, 0.0))
    inflated = {**release, ALS_TARGET: release[ALS_TARGET] * 1e3}
    assert any("Cauchy-Schwarz" in problem for problem in als_violations(inflated, settings, 1000, 0.0))


def test_a_merchant_sends_it_through_flower_as_it_is() -> None:
    """The wire keeps the ads' integer indices exactly (a float32 would lose them past 2^24 ads)."""
    ads = np.array([0, 2**24 + 1, 10**7 - 1], dtype=np.int64)
    record = to_array_record({ALS_ADS: ads})
    assert record[ALS_ADS].numpy().dtype == np.int64
    np.testing.assert_array_equal(record[ALS_ADS].numpy(), ads)
