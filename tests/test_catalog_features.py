"""The catalog's tags as features: weighted by how informative they are, never a trap.

A tag on every ad (or on one ad only) relates no ad to another: it gets no weight, the catalog
warm start and the catalog prior ignore it, and a catalog without any informative tag is said
out loud and starts from random factors, so the round-0 check (sampled HR@10 near 0.1, chance)
holds instead of every ad starting identical.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from client.node_data import NodeData
from shared.als import Rows, solve_users
from shared.catalog_features import informative_tags, normalized_tag_features, tag_weights
from shared.data.schema import AdCatalog
from shared.data.synthetic import SyntheticSpec, generate
from shared.params import initial_arrays


def _catalog(categories: list[str], brands: list[str | None]) -> AdCatalog:
    n = len(categories)
    return AdCatalog(tuple(f"ad{i}" for i in range(n)), tuple(categories), tuple(brands), (None,) * n)


def test_a_tag_on_every_ad_or_on_one_ad_weighs_nothing_and_rarer_tags_weigh_more():
    membership = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=float)
    weights = tag_weights(membership)
    assert weights[0] == 0.0  # on every ad
    assert weights[2] == 0.0 and weights[3] == 0.0  # on one ad only
    assert weights[1] == pytest.approx(np.log(4 / 2))


def test_the_warm_start_gives_ads_with_the_same_tags_one_direction_and_ads_sharing_tags_close_ones():
    catalog = _catalog(["shoes", "bags", "shoes", "hats", "bags", "shoes"], ["acme", None, "acme", None, "zeta", "zeta"])
    arrays = initial_arrays("catalog", catalog, 8, seed=1)
    factors = arrays["ad_factors"]
    assert factors.shape == (6, 8) and not arrays["ad_bias"].any()
    np.testing.assert_allclose(np.linalg.norm(factors, axis=1), 0.3, rtol=1e-5)
    np.testing.assert_array_equal(factors[0], factors[2])  # shoes + acme, twice
    unit = factors / np.linalg.norm(factors, axis=1, keepdims=True)
    # ad 5 (shoes, zeta) shares a tag with ad 0 (shoes) and with ad 4 (zeta); ad 3's only tag is its own
    assert unit[5] @ unit[0] > 0.3 and unit[5] @ unit[4] > 0.3
    np.testing.assert_array_equal(factors, initial_arrays("catalog", catalog, 8, seed=1)["ad_factors"])


def test_a_catalog_without_informative_tags_warns_and_starts_every_ad_apart(caplog):
    catalog = _catalog(["all"] * 50, [None] * 50)
    with caplog.at_level(logging.WARNING):
        features = informative_tags(catalog, "catalog warm start")
        arrays = initial_arrays("catalog", catalog, 8, seed=3)
    assert features.shape == (50, 0)
    assert "no informative tag" in caplog.text and "catalog warm start" in caplog.text
    factors = arrays["ad_factors"]
    assert len(np.unique(factors.round(6), axis=0)) == 50


def test_ads_without_an_informative_tag_are_counted_in_the_warning(caplog):
    catalog = _catalog(["a", "a", "b", "b", "c"], [None] * 5)  # "c" is on one ad only
    with caplog.at_level(logging.WARNING):
        features = informative_tags(catalog, "catalog prior")
    assert features.shape == (5, 2) and not features[4].any()
    assert "1 of 5 ads" in caplog.text


def test_content_affinity_features_say_which_ads_they_cannot_place(caplog):
    """The sparse features content affinity ranks with warn as the dense ones do: an ad without
    an informative tag has an empty row, and the log counts such ads; a fully tagged catalog,
    and one where some ads share nothing, are told apart."""
    with caplog.at_level(logging.WARNING):
        features = normalized_tag_features(_catalog(["a", "a", "b", "b", "c"], [None] * 5))
    assert features.shape[0] == 5 and features[[4]].nnz == 0
    assert "content affinity: 1 of 5 ads" in caplog.text and "cannot place them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        normalized_tag_features(_catalog(["a", "a", "b", "b"], ["x", "y", "x", "y"]))
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        normalized_tag_features(_catalog(["all"] * 4, [None] * 4))
    assert "has no informative tag" in caplog.text and "content affinity nothing to work with" in caplog.text


def test_round_zero_on_a_one_category_catalog_scores_chance_not_below_it():
    """The leak check: before any training the model knows nothing, so the held-out ad ranks
    like a random one among its 100 sampled candidates (HR@10 about 0.1)."""
    dataset, _ = generate(SyntheticSpec(users=600, ads=300, seed=4))
    degenerate = _catalog(["everything"] * len(dataset.catalog), [None] * len(dataset.catalog))
    data = NodeData.prepare(dataset.log, degenerate, seed=4)
    arrays = initial_arrays("catalog", degenerate, 16, seed=4)
    rows = Rows.from_split(data.split)
    users = solve_users(rows, arrays["ad_factors"], arrays["ad_bias"], alpha0=0.5, user_l2=1.0)
    hit_rate = data.evaluate(arrays, users, None)["hr10_sampled"]  # the model alone
    assert 0.05 < hit_rate < 0.2
