"""Cutting a dataset into client shards: every user in exactly one, never-empty shard."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from shared.data.partition import PartitionError, partition_users, shard_log
from shared.data.schema import InteractionLog
from shared.data.synthetic import SyntheticSpec, generate

SCHEMES = [
    pytest.param("merchant", 4, {}, id="merchant"),
    pytest.param("region", None, {}, id="region"),  # None: as many shards as regions
    pytest.param("iid", 5, {}, id="iid"),
    pytest.param("dirichlet", 4, {"alpha": 0.1}, id="dirichlet-0.1"),
    pytest.param("dirichlet", 4, {"alpha": 100.0}, id="dirichlet-100"),
]


@pytest.fixture(scope="module")
def dataset():
    return generate(SyntheticSpec(users=300, ads=100, merchants=4, seed=1))[0]


def shard_count(dataset, scheme, num_shards):
    return len(set(dataset.log.region)) if num_shards is None else num_shards


@pytest.mark.parametrize("scheme, num_shards, kwargs", SCHEMES)
def test_shards_are_disjoint_cover_every_user_once_and_are_never_empty(dataset, scheme, num_shards, kwargs):
    num_shards = shard_count(dataset, scheme, num_shards)
    shards = partition_users(dataset.log, dataset.catalog, scheme, num_shards, seed=3, **kwargs)
    assert len(shards) == num_shards
    assert all(len(shard) > 0 for shard in shards)
    everyone = [user for shard in shards for user in shard]
    assert len(everyone) == len(set(everyone))  # disjoint, no user twice within a shard either
    assert set(everyone) == set(dataset.log.user)  # cover


@pytest.mark.parametrize("scheme, num_shards, kwargs", SCHEMES)
def test_partitioning_is_deterministic_for_a_seed(dataset, scheme, num_shards, kwargs):
    num_shards = shard_count(dataset, scheme, num_shards)
    first = partition_users(dataset.log, dataset.catalog, scheme, num_shards, seed=11, **kwargs)
    second = partition_users(dataset.log, dataset.catalog, scheme, num_shards, seed=11, **kwargs)
    assert [list(s) for s in first] == [list(s) for s in second]


@pytest.mark.parametrize("scheme, kwargs", [("iid", {}), ("dirichlet", {"alpha": 0.5})])
def test_random_schemes_depend_on_the_seed(dataset, scheme, kwargs):
    first = partition_users(dataset.log, dataset.catalog, scheme, 4, seed=0, **kwargs)
    second = partition_users(dataset.log, dataset.catalog, scheme, 4, seed=1, **kwargs)
    assert [list(s) for s in first] != [list(s) for s in second]


def test_iid_shards_are_balanced(dataset):
    shards = partition_users(dataset.log, dataset.catalog, "iid", 7, seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_merchant_shards_hold_one_merchant_each(dataset):
    shards = partition_users(dataset.log, dataset.catalog, "merchant", 4)
    merchants_seen = []
    for shard in shards:
        rows = np.isin(dataset.log.user, shard)
        merchants = set(dataset.log.merchant[rows])
        assert len(merchants) == 1
        merchants_seen.append(merchants.pop())
        # and the shard is all of that merchant's users
        assert set(shard) == set(dataset.log.user[dataset.log.merchant == merchants_seen[-1]])
    assert sorted(merchants_seen) == [f"merchant-{m}" for m in range(4)]


def test_region_shards_hold_one_region_each(dataset):
    regions = sorted(set(dataset.log.region))
    shards = partition_users(dataset.log, dataset.catalog, "region", len(regions))
    assert [set(dataset.log.region[np.isin(dataset.log.user, s)]) for s in shards] == [{r} for r in regions]


def test_user_under_several_merchants_is_kept_whole_in_the_majority_one():
    log = InteractionLog(
        user=np.array(["a", "a", "a", "b", "c"], dtype=object),
        ad=np.zeros(5, dtype=np.int64),
        timestamp=np.arange(5, dtype=np.int64),
        event=np.ones(5, dtype=np.int8),
        merchant=np.array(["m1", "m2", "m2", "m1", "m2"], dtype=object),
    )
    shards = partition_users(log, None, "merchant", 2)
    assert [list(s) for s in shards] == [["b"], ["a", "c"]]


@pytest.mark.parametrize("wrong", [3, 5])
def test_wrong_shard_count_for_merchant_partitioning(dataset, wrong):
    with pytest.raises(PartitionError) as info:
        partition_users(dataset.log, dataset.catalog, "merchant", wrong)
    message = str(info.value)
    assert "4 merchants" in message
    assert f"{wrong} shards" in message
    assert "merchant-0" in message
    assert "set the number of clients to 4" in message


def test_merchant_partitioning_needs_a_merchant_column(dataset):
    log = dataset.log.subset(np.arange(len(dataset.log)))
    log.merchant = None
    with pytest.raises(PartitionError, match="needs a 'merchant' column"):
        partition_users(log, dataset.catalog, "merchant", 4)


@pytest.mark.parametrize(
    "scheme, num_shards, kwargs, match",
    [
        ("iid", 0, {}, "num_shards must be >= 1"),
        ("iid", 301, {}, "cannot cut 300 users into 301"),
        ("dirichlet", 4, {"alpha": 0.0}, "alpha must be > 0"),
        ("by-colour", 4, {}, "unknown partitioning scheme"),
    ],
)
def test_bad_requests_raise_partition_error(dataset, scheme, num_shards, kwargs, match):
    with pytest.raises(PartitionError, match=match):
        partition_users(dataset.log, dataset.catalog, scheme, num_shards, **kwargs)


def dominant_categories(dataset) -> dict[str, int]:
    """Each user's most frequent category code over all their rows (ties: smallest code)."""
    codes, _ = dataset.catalog.category_codes()
    per_user: dict[str, Counter] = {}
    for user, ad in zip(dataset.log.user, dataset.log.ad):
        per_user.setdefault(user, Counter())[int(codes[ad])] += 1
    return {user: max(sorted(c), key=lambda k: c[k]) for user, c in per_user.items()}


def mean_total_variation(shards, dominant, num_categories) -> float:
    everyone = np.bincount(list(dominant.values()), minlength=num_categories) / len(dominant)
    distances = []
    for shard in shards:
        histogram = np.bincount([dominant[u] for u in shard], minlength=num_categories) / len(shard)
        distances.append(0.5 * np.abs(histogram - everyone).sum())
    return float(np.mean(distances))


def test_small_dirichlet_alpha_skews_categories_more_than_large_alpha(dataset):
    dominant = dominant_categories(dataset)
    num_categories = len(dataset.catalog.category_codes()[1])
    skew = {}
    for alpha in (0.1, 100.0):
        skew[alpha] = [
            mean_total_variation(
                partition_users(dataset.log, dataset.catalog, "dirichlet", 4, alpha=alpha, seed=seed), dominant, num_categories
            )
            for seed in range(4)
        ]
    # every seed: skewed with small alpha, near the global mix with large alpha
    assert min(skew[0.1]) > 0.3, skew
    assert max(skew[100.0]) < 0.15, skew
    assert np.mean(skew[0.1]) > np.mean(skew[100.0]) + 0.25, skew


@pytest.mark.parametrize("scheme, num_shards, kwargs", SCHEMES)
def test_shard_log_returns_exactly_the_rows_of_the_shard_users(dataset, scheme, num_shards, kwargs):
    log = dataset.log
    num_shards = shard_count(dataset, scheme, num_shards)
    shards = partition_users(log, dataset.catalog, scheme, num_shards, seed=5, **kwargs)
    total = 0
    for shard in shards:
        part = shard_log(log, shard)
        members = set(shard)
        expected_rows = [i for i, user in enumerate(log.user) if user in members]
        assert len(part) == len(expected_rows)
        # the same rows, in the original order, every column carried along
        assert list(part.user) == [log.user[i] for i in expected_rows]
        np.testing.assert_array_equal(part.ad, log.ad[expected_rows])
        np.testing.assert_array_equal(part.timestamp, log.timestamp[expected_rows])
        np.testing.assert_array_equal(part.event, log.event[expected_rows])
        assert list(part.merchant) == [log.merchant[i] for i in expected_rows]
        assert list(part.region) == [log.region[i] for i in expected_rows]
        assert set(part.user) == members
        total += len(part)
    assert total == len(log)
