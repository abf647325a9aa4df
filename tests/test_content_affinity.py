"""Content affinity: the user's own recent positives' public tags against each ad's, blended into
a merchant's ranking (shared/content_affinity.py), the same in evaluation, serving and delivery."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from client.explain import explain
from client.node_data import NodeData
from client.node_state import NodeState
from client.serving import recommend, seen_ads, serving_split
from client.user_step import ALSUserStep
from shared.catalog_features import normalized_tag_features
from shared.config import RunConfig
from shared.content_affinity import ContentBlend, standardized, user_profiles
from shared.data.schema import AdCatalog
from shared.data.synthetic import SyntheticSpec, generate
from shared.params import score_all
from shared.wire import AD_BIAS, AD_FACTORS
from tests.conftest import client_call, simulated_node, small_run_config

# three ads: a0 and a1 share tag "x", a2 carries "y" alone, a3 carries both
FEATURES = sp.csr_array(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]]))


def test_profile_weighs_recent_positives_more_and_concentration_says_how_alike_they_are():
    # user 0 chose a2 then a0 then a1 (latest last); user 1 nothing; user 2 a0 and a1 (one tag)
    offsets, history = np.array([0, 3, 3, 5]), np.array([2, 0, 1, 0, 1])
    profiles, concentration = user_profiles(offsets, history, np.array([0, 1, 2]), FEATURES, halflife=1.0)
    weighted = 0.25 * FEATURES.toarray()[2] + 0.5 * FEATURES.toarray()[0] + 1.0 * FEATURES.toarray()[1]
    np.testing.assert_allclose(profiles[0], weighted / np.linalg.norm(weighted))
    assert concentration[0] == pytest.approx(np.linalg.norm(weighted) / 1.75)
    np.testing.assert_array_equal(profiles[1], [0.0, 0.0])
    assert concentration[1] == 0.0
    np.testing.assert_allclose(profiles[2], [1.0, 0.0])
    assert concentration[2] == pytest.approx(1.0)  # every choice carries the same tag
    # a long half-life weighs them alike: the older "y" then counts as much as each "x"
    flat, _ = user_profiles(offsets, history, np.array([0]), FEATURES, halflife=1e9)
    np.testing.assert_allclose(flat[0], np.array([2.0, 1.0]) / np.sqrt(5.0))


def test_ads_without_an_informative_tag_lower_the_concentration():
    features = sp.csr_array(np.array([[1.0, 0.0], [0.0, 0.0]]))  # ad 1: no informative tag
    _, concentration = user_profiles(np.array([0, 2]), np.array([0, 1]), np.array([0]), features, halflife=1e9)
    assert concentration[0] == pytest.approx(0.5)


def test_standardized_rows_and_constant_rows():
    scores = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    out = standardized(scores)
    np.testing.assert_allclose(out[0].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out[0].std(), 1.0)
    np.testing.assert_array_equal(out[1], [0.0, 0.0, 0.0])


def test_a_flat_model_ranks_by_the_users_own_tags_and_weight_zero_is_the_model():
    offsets, history = np.array([0, 2]), np.array([0, 1])  # the user chose the two "x" ads
    flat = np.zeros((1, 4))
    blended = ContentBlend(weight=1.0, halflife=5.0).scores(flat, offsets, history, np.array([0]), FEATURES)
    assert blended[0, 0] > blended[0, 3] > blended[0, 2]  # "x" ads, then the ad with both tags, then "y"
    model = np.array([[0.3, -1.0, 2.0, 0.5]])
    alone = ContentBlend(weight=0.0, halflife=5.0).scores(model, offsets, history, np.array([0]), FEATURES)
    assert np.argsort(-alone[0]).tolist() == np.argsort(-model[0]).tolist()


def test_a_users_blended_scores_do_not_depend_on_who_else_is_scored():
    dataset, _ = generate(SyntheticSpec(users=120, ads=60, categories=5, seed=3))
    data = NodeData.prepare(dataset.log, dataset.catalog, seed=3)
    rng = np.random.default_rng(0)
    # float64: float32 products of a batch and of one row may round apart, blend or not
    arrays = {AD_FACTORS: rng.normal(size=(60, 4)), AD_BIAS: rng.normal(size=60)}
    factors = rng.normal(size=(data.num_users, 4))
    score = data.score_fn(arrays, factors, ContentBlend(weight=1.2, halflife=5.0))
    together = score(np.arange(data.num_users))
    for user in (0, 17, data.num_users - 1):
        np.testing.assert_allclose(score(np.array([user]))[0], together[user], rtol=1e-9, atol=1e-9)


def test_blend_lifts_ranking_where_users_keep_to_their_categories():
    """The synthetic market's users click mostly in one or two favourite categories: with a model
    that knows nothing personal (popularity), the blend ranks held-out clicks better."""
    dataset, _ = generate(SyntheticSpec(users=400, ads=200, categories=8, seed=5))
    data = NodeData.prepare(dataset.log, dataset.catalog, seed=5)
    popularity = data.split.ad_popularity()
    arrays = {AD_FACTORS: np.zeros((200, 4), dtype=np.float32), AD_BIAS: (popularity / popularity.max()).astype(np.float32)}
    factors = np.zeros((data.num_users, 4), dtype=np.float32)
    alone = data.evaluate(arrays, factors, None)
    blended = data.evaluate(arrays, factors, ContentBlend(weight=1.2, halflife=5.0))
    assert alone == data.evaluate(arrays, factors, ContentBlend(weight=0.0, halflife=5.0))
    assert blended["ndcg10_sampled"] > 1.15 * alone["ndcg10_sampled"]  # 0.220 against 0.180
    assert blended["ndcg10_full"] > alone["ndcg10_full"]


def test_config_weight_zero_is_no_blend_and_bad_values_are_refused():
    assert ContentBlend.from_config(RunConfig.from_flower({"content-affinity": 0.0})) is None
    assert ContentBlend.from_config(RunConfig.from_flower({})) == ContentBlend(weight=1.6, halflife=3.0)
    with pytest.raises(ValueError, match="content-affinity"):
        RunConfig.from_flower({"content-affinity": -1.0})
    with pytest.raises(ValueError, match="content-affinity-halflife"):
        RunConfig.from_flower({"content-affinity-halflife": 0.0})
    with pytest.raises(ValidationError):
        ContentBlend(weight=1.0, halflife=5.0, extra=1)  # type: ignore[call-arg]


def test_tag_features_are_unit_rows_of_informative_tags_only():
    catalog = AdCatalog(ad_ids=("a", "b", "c", "d"), categories=("c1", "c1", "c2", "c2"), brands=("x", None, None, "y"),
                        titles=(None,) * 4, tags=(("t", "u"), ("t",), ("u", "all"), ("all", "solo")))
    features = normalized_tag_features(catalog)
    # t, u and "all" are on two ads of four each (informative), "solo" on one only (dropped)
    assert features.shape == (4, 3)
    np.testing.assert_allclose(np.linalg.norm(features.toarray(), axis=1), 1.0)
    dense = features.toarray()
    assert np.count_nonzero(dense[3]) == 1  # "solo" dropped, "all" kept


def test_the_evaluate_handler_ranks_with_the_runs_blend(tmp_path, as_server):
    for weight in (0.0, 1.2):
        cfg = small_run_config(tmp_path / str(weight), **{"mf-solver": "als", "content-affinity": weight})
        node = simulated_node(cfg, 0)
        rng = np.random.default_rng(2)
        arrays = {AD_FACTORS: rng.normal(size=(node.data.num_ads, cfg.factors)).astype(np.float32),
                  AD_BIAS: rng.normal(size=node.data.num_ads).astype(np.float32)}
        metrics = dict(client_call("evaluate", cfg, arrays).content["metrics"])
        factors = NodeState(node.state.directory).load_user_factors(node.data.user_ids, cfg.factors)
        assert factors is not None
        expected = node.data.evaluate(arrays, factors, ContentBlend.from_config(cfg))
        assert metrics["ndcg10_sampled"] == pytest.approx(expected["ndcg10_sampled"])
        assert metrics["ndcg10_full"] == pytest.approx(expected["ndcg10_full"])
        assert NodeState(node.state.directory).load_content_blend() == ContentBlend.from_config(cfg)


def test_the_blend_is_recorded_with_the_model(tmp_path):
    state = NodeState(tmp_path)
    arrays = {AD_FACTORS: np.zeros((3, 2), dtype=np.float32), AD_BIAS: np.zeros(3, dtype=np.float32)}
    state.save_global_model(arrays, 1, ALSUserStep(), ContentBlend(weight=0.7, halflife=2.0))
    assert state.load_content_blend() == ContentBlend(weight=0.7, halflife=2.0)
    loaded, _ = state.load_global_model()  # type: ignore[misc]
    assert set(loaded) == {AD_FACTORS, AD_BIAS}
    state.save_global_model(arrays, 2, ALSUserStep(), None)
    assert state.load_content_blend() is None
    state.save_global_model(arrays, 3)  # a model saved without its user step (older states): the model alone
    assert state.load_content_blend() is None
    state.save_global_model(arrays, 4, None, ContentBlend(weight=0.5, halflife=1.0))  # the blend is never dropped
    assert state.load_content_blend() == ContentBlend(weight=0.5, halflife=1.0)


def test_serving_ranks_as_evaluation_does_and_explains_the_blend():
    dataset, _ = generate(SyntheticSpec(merchants=1, users=80, ads=50, categories=5, seed=9))
    catalog, log = dataset.catalog, dataset.log
    rng = np.random.default_rng(4)
    arrays = {AD_FACTORS: rng.normal(size=(50, 4)).astype(np.float32), AD_BIAS: rng.normal(size=50).astype(np.float32)}
    split = serving_split(log, len(catalog))
    users = [str(u) for u in split.user_ids.tolist()]
    vectors = rng.normal(size=(len(users), 4)).astype(np.float32)
    factors = dict(zip(users, vectors))
    blend = ContentBlend(weight=1.2, halflife=5.0)
    recs = recommend(users, factors, arrays, catalog, seen_ads(log), 5, blend, log)
    data = NodeData(split, np.zeros((len(users), 0), dtype=np.int64), normalized_tag_features(catalog))
    expected = data.score_fn(arrays, vectors, blend)(np.arange(len(users)))
    for rec in recs:
        row, ad = users.index(rec.user_id), catalog.index[rec.ad_id]
        assert rec.score == pytest.approx(expected[row, ad])
        model = score_all(vectors[row : row + 1].astype(np.float64), {k: v.astype(np.float64) for k, v in arrays.items()})
        assert rec.model_score == pytest.approx(model[0, ad], abs=1e-5)
        assert rec.score == pytest.approx(standardized(model)[0, ad] + rec.affinity, abs=1e-5)
    assert any(abs(rec.affinity) > 0.1 for rec in recs)
    for e in explain(recs, factors, arrays, catalog, log):
        assert e.bias + e.match == pytest.approx(e.model_score, abs=1e-5)
        assert "content affinity" in e.text and "model score" in e.text
    with pytest.raises(ValueError, match="log"):
        recommend(users, factors, arrays, catalog, seen_ads(log), 5, blend, None)
    # a user without rows in the log: ranked by the model alone, and told so
    newcomer = recommend(["nobody"], {"nobody": vectors[0]}, arrays, catalog, {}, 3, blend, log)
    assert all(r.affinity == 0.0 for r in newcomer)
    (e, *_) = explain(newcomer, {"nobody": vectors[0]}, arrays, catalog, log)
    assert "no clicks or purchases of yours for content affinity" in e.text
    plain = recommend(users, factors, arrays, catalog, seen_ads(log), 5)
    assert all(r.model_score is None and r.affinity == 0.0 for r in plain)
