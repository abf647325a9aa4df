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
from shared.wire import (
    ALS_ADS,
    ALS_GRAM,
    ALS_GRAM_UPPER,
    ALS_POSITIVES,
    ALS_TARGET,
    ALS_USER_GRAM,
    PrivacyReport,
    TrainReply,
    from_array_record,
    to_array_record,
)

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


def _messages(releases: list[dict[str, np.ndarray]], report: PrivacyReport | None = None) -> list[Message]:
    return [TrainReply(f"merchant-{k}", {key: v.astype(np.float32) if v.dtype.kind == "f" else v for key, v in release.items()},
                       None, {}, report).to_message(Message(content=RecordDict(), dst_node_id=1, message_type="train"))
            for k, release in enumerate(releases)]


def test_a_claim_of_noise_without_dp_is_ignored() -> None:
    """A merchant of a run without DP that reports a noise multiplier neither crashes the round
    nor changes the solve: exact statistics have no sensitivities to scale a noise level by."""
    releases = [ad_statistics(rows, users, NUM_ADS, _settings("sparse")) for rows, users in _shards()]
    models = []
    for report in (None, PrivacyReport(8.0, 1.5)):
        with server_identity():
            record, _ = ALSAggregation(_settings("sparse"), NUM_ADS, DIM).aggregate_train(1, _messages(releases, report))
        assert record is not None
        models.append(from_array_record(record)["ad_factors"])
    np.testing.assert_array_equal(models[0], models[1])


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
    rows_ = len(release[ALS_ADS])
    wrapping = np.array([0, 5 * 10**18, -5 * 10**18, *range(3, rows_)], dtype=np.int64)  # np.diff would wrap to "ascending"
    small = np.array([0, 100, -100, *range(3, rows_)], dtype=np.int64).astype(np.int8)
    for ads, reason in ((release[ALS_ADS][::-1].copy(), "ascending"), (release[ALS_ADS] + NUM_ADS, "ascending"),
                        (wrapping, "ascending"), (small, "ascending"), (wrapping.astype(np.uint64), "ascending"),
                        (np.concatenate([release[ALS_ADS][:1], release[ALS_ADS][:-1]]), "ascending"),
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
    # one ad inflated 1e9 (consistent: all of its statistics) does not widen another ad's rounding slack
    huge = {key: value.copy() for key, value in release.items()}
    for key in (ALS_GRAM_UPPER, ALS_TARGET, ALS_POSITIVES):
        huge[key][0] *= 1e9
    assert als_violations(huge, settings, 1000, 0.0) == []
    first, second = np.triu_indices(DIM + 1)
    lowest = float(np.linalg.eigvalsh(_unpack(huge[ALS_GRAM_UPPER][1])).min())
    huge[ALS_GRAM_UPPER][1] -= (lowest + 3.0) * (first == second)  # eigenvalue -3: ad 1 indefinite
    assert any("positive semi-definite" in problem for problem in als_violations(huge, settings, 1000, 0.0))


def _unpack(packed: np.ndarray) -> np.ndarray:
    first, second = np.triu_indices(DIM + 1)
    full = np.zeros((DIM + 1, DIM + 1))
    full[first, second] = full[second, first] = packed
    return full


def test_an_indefinite_system_is_floored_not_amplified() -> None:
    """Float rounding can leave a summed Gramian slightly indefinite: its chunk is solved with
    floored eigenvalues as the dense solve does, not by an LU solve that would amplify it."""
    settings = dataclasses.replace(_settings("sparse"), alpha0=0.5)  # fixed: the other ads' systems stay as they are
    rows, users = _shards()[0]
    release = ad_statistics(rows, users, NUM_ADS, settings)
    exact = solve_ads(release, settings, num_ads=NUM_ADS)
    broken = {key: value.copy() for key, value in release.items()}
    first, second = np.triu_indices(DIM + 1)
    system = _unpack(broken[ALS_GRAM_UPPER][0]) + 0.5 * release[ALS_USER_GRAM] + settings.ad_l2 * np.eye(DIM + 1)
    broken[ALS_GRAM_UPPER][0] -= (float(np.linalg.eigvalsh(system).min()) + 1.0) * (first == second)  # ad 0's system: eigenvalue -1
    with pytest.raises(np.linalg.LinAlgError):  # what the LU path would have solved without a word
        np.linalg.cholesky(_unpack(broken[ALS_GRAM_UPPER][0]) + 0.5 * release[ALS_USER_GRAM] + settings.ad_l2 * np.eye(DIM + 1))
    solved = solve_ads(broken, settings, num_ads=NUM_ADS)
    assert np.all(np.isfinite(solved["ad_factors"]))
    assert np.abs(solved["ad_factors"]).max() < 10 * np.abs(exact["ad_factors"]).max()
    others = np.ones(NUM_ADS, dtype=bool)
    others[release[ALS_ADS][0]] = False
    np.testing.assert_allclose(solved["ad_factors"][others], exact["ad_factors"][others], rtol=1e-6, atol=1e-8)


def test_empty_releases_sum_and_clip() -> None:
    """A merchant without rows sends no ads; a round of such replies still sums, clips and solves."""
    settings = _settings("sparse")
    empty = ad_statistics(Rows(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), 5), np.zeros((5, DIM)), NUM_ADS,
                          settings)
    assert len(empty[ALS_ADS]) == 0
    check_statistics(empty, settings, NUM_ADS, DIM)
    summed = TouchedSum(NUM_ADS)
    for release in median_clip([empty] * 3, 3.0):
        summed.add(release)
    solved = solve_ads(summed.total(), settings, num_ads=NUM_ADS)
    assert not solved["ad_factors"].any() and not solved["ad_bias"].any()


def test_the_running_sum_never_holds_more_rows_than_the_catalog() -> None:
    summed = TouchedSum(1500)
    every = {ALS_ADS: np.arange(1500), ALS_TARGET: np.ones((1500, DIM)), ALS_POSITIVES: np.ones(1500),
             ALS_GRAM_UPPER: np.ones((1500, (DIM + 1) * (DIM + 2) // 2)), ALS_USER_GRAM: np.eye(DIM + 1)}
    summed.add({key: value[:1000] if key not in (ALS_USER_GRAM,) else value for key, value in every.items()})
    summed.add(every)
    total = summed.total()
    assert len(total[ALS_ADS]) == 1500 and total[ALS_TARGET].base is not None and total[ALS_TARGET].base.shape[0] == 1500


def test_a_merchant_sends_it_through_flower_as_it_is() -> None:
    """The wire keeps the ads' integer indices exactly (a float32 would lose them past 2^24 ads)."""
    ads = np.array([0, 2**24 + 1, 10**7 - 1], dtype=np.int64)
    received = from_array_record(to_array_record({ALS_ADS: ads}))[ALS_ADS]
    assert received.dtype == np.int64
    np.testing.assert_array_equal(received, ads)
