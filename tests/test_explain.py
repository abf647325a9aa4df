"""Explanations of recommendations (client/explain.py) and `fedads-merchant recommend --explain`.

A hand-built market whose answers are worked out on paper checks the nearest-ad choice, the
counts and the popularity ranks; a small synthetic market checks the invariants on every
recommendation against an independent brute force (own positives only, cosine order, MF's
score = bias + match); the CLI runs on a node state written with NodeState, as training writes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.explain import Explanation, explain, popularity
from client.node_state import NodeState
from client.serving import Recommendation, recommend, seen_ads
from shared.data.loaders import write_catalog_csv, write_log_csv
from shared.data.schema import AdCatalog, Dataset, Event, InteractionLog
from shared.data.synthetic import SyntheticSpec, generate
from shared.neumf_arrays import ad_embeddings, init_neumf_arrays
from shared.params import score_all
from shared.wire import AD_BIAS, AD_FACTORS, Arrays
from tests.test_merchant_cli import read_rows, run

# ---------------------------------------------------------------------- a market worked out by hand
# ad: (factor, category, brand); biases below. Alice clicked a0, a2, purchased a1 and only saw a3;
# Bob clicked a5, which is nearly a4's twin; Carol only saw a1 and a6.
HAND_ADS = {
    "a0": ((1.0, 0.0), "beauty", "acme"),
    "a1": ((0.0, 1.0), "books", "bolt"),
    "a2": ((1.0, 1.0), "beauty", "bolt"),
    "a3": ((-1.0, 0.0), "beauty", "acme"),
    "a4": ((0.9, 0.1), "beauty", "acme"),
    "a5": ((1.0, 0.05), "beauty", None),
    "a6": ((0.0, -1.0), "books", "bolt"),
}
HAND_BIAS = (0.1, 0.0, 0.2, 0.5, 0.3, -0.1, 0.0)
HAND_ROWS = [
    ("alice", "a0", Event.CLICK), ("alice", "a1", Event.PURCHASE), ("alice", "a2", Event.CLICK), ("alice", "a3", Event.IMPRESSION),
    ("alice", "a0", Event.IMPRESSION),  # a weaker event on a clicked ad: the click is what counts
    ("bob", "a5", Event.CLICK),
    ("carol", "a1", Event.IMPRESSION), ("carol", "a6", Event.IMPRESSION),
]
HAND_FACTORS = {"alice": np.array([1.0, 0.2], dtype=np.float32), "bob": np.array([0.0, 1.0], dtype=np.float32),
                "carol": np.array([0.0, 1.0], dtype=np.float32)}


def make_log(catalog: AdCatalog, rows: list[tuple[str, str, Event]]) -> InteractionLog:
    return InteractionLog(
        user=np.array([u for u, _, _ in rows], dtype=object),
        ad=np.array([catalog.index[a] for _, a, _ in rows], dtype=np.int64),
        timestamp=np.arange(len(rows), dtype=np.int64),
        event=np.array([int(e) for _, _, e in rows], dtype=np.int8),
    )


@pytest.fixture(scope="module")
def hand() -> tuple[AdCatalog, InteractionLog, Arrays]:
    catalog = AdCatalog(
        ad_ids=tuple(HAND_ADS), categories=tuple(c for _, c, _ in HAND_ADS.values()),
        brands=tuple(b for _, _, b in HAND_ADS.values()), titles=tuple(f"title of {a}" for a in HAND_ADS),
    )
    arrays = {AD_FACTORS: np.array([f for f, _, _ in HAND_ADS.values()], dtype=np.float32),
              AD_BIAS: np.array(HAND_BIAS, dtype=np.float32)}
    return catalog, make_log(catalog, HAND_ROWS), arrays


def hand_explanations(hand: tuple[AdCatalog, InteractionLog, Arrays], k: int = 2) -> dict[tuple[str, str], Explanation]:
    catalog, log, arrays = hand
    recs = recommend(sorted(HAND_FACTORS), HAND_FACTORS, arrays, catalog, seen_ads(log), k)
    return {(e.user_id, e.ad_id): e for e in explain(recs, HAND_FACTORS, arrays, catalog, log)}


def test_because_ads_are_the_users_own_nearest_positives(hand):
    got = hand_explanations(hand)
    # alice's recommendations are a4 (0.92 + 0.3) and a5 (1.01 - 0.1), her unseen ads' best
    assert {ad for user, ad in got if user == "alice"} == {"a4", "a5"}
    alice = got["alice", "a4"]
    # cosines with a4 = (0.9, 0.1): a0 0.994, a2 0.781, a1 0.110; a3 (only seen) and Bob's a5 (0.998) are not hers
    assert [(b.ad_id, b.event) for b in alice.because] == [("a0", "clicked"), ("a2", "clicked")]
    np.testing.assert_allclose([b.similarity for b in alice.because], [0.9 / np.hypot(0.9, 0.1), 1.0 / (np.hypot(0.9, 0.1) * np.sqrt(2))],
                               rtol=1e-6)
    assert alice.because[0].title == "title of a0"
    assert alice.text.startswith("because you clicked 'title of a0' (a0) and 'title of a2' (a2);")
    # bob's only positive is a5; his best unseen ad is a2 (1 + 0.2), at cosine 0.74 with a5
    assert [(b.ad_id, b.event) for b in got["bob", "a2"].because] == [("a5", "clicked")]


def test_a_user_without_positives_is_explained_by_what_they_saw_and_never_by_an_opposed_ad(hand):
    carol = hand_explanations(hand, k=1)["carol", "a2"]
    # a1 is at cosine 0.71 with a2; a6 = (0, -1) at -0.71 is no reason
    assert [(b.ad_id, b.event) for b in carol.because] == [("a1", "viewed")]
    assert carol.history == 2 and carol.history_kind == "viewed"


def test_category_and_brand_counts_are_over_the_users_own_positives(hand):
    alice = hand_explanations(hand)["alice", "a4"]
    # her positives a0 (beauty, acme), a1 (books, bolt), a2 (beauty, bolt); a3 (beauty, acme) was only seen
    assert (alice.category, alice.category_matches, alice.brand, alice.brand_matches, alice.history) == ("beauty", 2, "acme", 1, 3)
    assert "2 of your 3 clicked or purchased ads are in category 'beauty', 1 is by 'acme'" in alice.text
    no_brand = hand_explanations(hand)["alice", "a5"]
    assert no_brand.brand is None and no_brand.brand_matches == 0 and "by '" not in no_brand.text


def test_mf_score_is_bias_plus_match_and_says_which_dominates(hand):
    alice = hand_explanations(hand)["alice", "a4"]
    assert alice.additive
    assert alice.bias == pytest.approx(0.3, abs=1e-6) and alice.match == pytest.approx(0.92, abs=1e-6)
    assert alice.bias + alice.match == pytest.approx(alice.score, abs=1e-5)
    assert "= match 0.920 + bias 0.300, mostly personal match" in alice.text


def test_popularity_is_the_ad_bias_rank_in_the_catalog(hand):
    got = hand_explanations(hand)
    alice = got["alice", "a4"]  # bias 0.3: only a3's 0.5 is larger, 5 of the 6 others are smaller
    assert alice.popularity_rank == 2 and alice.popularity_percentile == pytest.approx(100 * 5 / 6)
    rank, percentile = popularity(np.array(HAND_BIAS))
    # a1 and a6 tie at 0.0: one ad (a5) below them, the tie counted half
    assert rank.tolist() == [4, 5, 3, 1, 2, 7, 5]
    np.testing.assert_allclose(percentile[[1, 6]], 100 * 1.5 / 6)
    assert popularity(np.zeros(4))[1].tolist() == [50.0] * 4


# ---------------------------------------------------------------------- invariants on a synthetic market
@pytest.fixture(scope="module")
def market() -> tuple[Dataset, dict[str, np.ndarray], Arrays]:
    dataset, _ = generate(SyntheticSpec(merchants=2, users=40, ads=30, categories=4, brands=5, mean_clicks_per_user=6, seed=5))
    rng = np.random.default_rng(11)
    users = sorted({str(u) for u in dataset.log.user.tolist()})
    factors = {u: rng.normal(size=4).astype(np.float32) for u in users}
    arrays = {AD_FACTORS: rng.normal(size=(30, 4)).astype(np.float32), AD_BIAS: rng.normal(scale=0.5, size=30).astype(np.float32)}
    return dataset, factors, arrays


def own_ads(log: InteractionLog, user: str) -> dict[int, int]:
    """The user's strongest event per ad, straight from the log."""
    out: dict[int, int] = {}
    for u, ad, event in zip(log.user.tolist(), log.ad.tolist(), log.event.tolist()):
        if u == user:
            out[ad] = max(out.get(ad, 0), event)
    return out


def check_explanations(explanations: list[Explanation], recs: list[Recommendation], dataset: Dataset, vectors: np.ndarray) -> None:
    catalog, log = dataset.catalog, dataset.log
    assert [(e.user_id, e.rank, e.ad_id) for e in explanations] == [(r.user_id, r.rank, r.ad_id) for r in recs]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for e in explanations:
        target = catalog.index[e.ad_id]
        positives = {ad for ad, event in own_ads(log, e.user_id).items() if event >= Event.CLICK and ad != target}
        assert positives, "every synthetic user clicks"
        because = [catalog.index[b.ad_id] for b in e.because]
        assert set(because) <= positives  # the user's own clicks and purchases, nobody else's
        assert all(b.event in ("clicked", "purchased") for b in e.because)
        brute = sorted(((float(unit[a] @ unit[target]), -a) for a in positives), reverse=True)
        expected = [-neg for cos, neg in brute[:2] if cos > 0]
        assert because == expected
        np.testing.assert_allclose([b.similarity for b in e.because], [unit[a] @ unit[target] for a in expected], atol=1e-9)
        assert e.category_matches == sum(catalog.categories[a] == e.category for a in positives)
        assert e.brand_matches == sum(catalog.brands[a] == e.brand for a in positives)
        assert e.history == len(positives)
        assert e.text and "\n" not in e.text


def test_synthetic_mf_explanations_match_a_brute_force(market):
    dataset, factors, arrays = market
    users = sorted(factors)
    recs = recommend(users, factors, arrays, dataset.catalog, seen_ads(dataset.log), 5)
    explanations = explain(recs, factors, arrays, dataset.catalog, dataset.log)
    check_explanations(explanations, recs, dataset, arrays[AD_FACTORS].astype(np.float64))
    scores = score_all(np.stack([factors[u] for u in users]).astype(np.float64), {k: v.astype(np.float64) for k, v in arrays.items()})
    for e in explanations:
        model_score = scores[users.index(e.user_id), dataset.catalog.index[e.ad_id]]
        assert e.additive and e.bias + e.match == pytest.approx(model_score, abs=1e-5)
        assert e.score == pytest.approx(model_score, abs=1e-5)


def test_synthetic_neumf_explanations_are_honest_about_the_non_linear_part(market):
    dataset, _, _ = market
    arrays = init_neumf_arrays(30, 4, (8, 4), seed=2)
    arrays[AD_BIAS] = np.random.default_rng(3).normal(scale=0.5, size=30).astype(np.float32)
    rng = np.random.default_rng(4)
    factors = {u: rng.normal(size=8).astype(np.float32) for u in sorted({str(u) for u in dataset.log.user.tolist()})}
    recs = recommend(sorted(factors), factors, arrays, dataset.catalog, seen_ads(dataset.log), 3)
    explanations = explain(recs, factors, arrays, dataset.catalog, dataset.log)
    check_explanations(explanations, recs, dataset, np.hstack(ad_embeddings(arrays)).astype(np.float64))
    for e in explanations:
        assert not e.additive and e.bias == pytest.approx(float(arrays[AD_BIAS][dataset.catalog.index[e.ad_id]]))
        assert e.bias + e.match == pytest.approx(e.score, abs=1e-6)
        assert "non-linear" in e.text and "not a sum" in e.text


def test_no_history_and_no_reasons_asked(hand):
    catalog, log, arrays = hand
    rec = [Recommendation("dave", 1, "a4", 0.5)]
    (e,) = explain(rec, {"dave": np.array([0.1, 0.2], dtype=np.float32)}, arrays, catalog, log)
    assert e.because == () and e.history == 0 and "no history of yours" in e.text
    (e,) = explain([Recommendation("alice", 1, "a4", 1.22)], HAND_FACTORS, arrays, catalog, log, because=0)
    assert e.because == () and "none of your clicked or purchased ads is close" in e.text
    with pytest.raises(ValueError):
        explain(rec, {}, arrays, catalog, log, because=-1)


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def node(tmp_path_factory, market) -> dict[str, Path]:
    dataset, factors, arrays = market
    tmp = tmp_path_factory.mktemp("explain")
    write_catalog_csv(tmp / "catalog.csv", dataset.catalog)
    write_log_csv(tmp / "log.csv", dataset)
    state = NodeState(tmp / "state")
    state.save_global_model(arrays, 3)
    ids = np.array(sorted(factors), dtype=str)
    state.save_user_factors(ids, np.stack([factors[u] for u in ids.tolist()]))
    return {"catalog": tmp / "catalog.csv", "log": tmp / "log.csv", "state": tmp / "state"}


def test_cli_explain_prints_a_why_line_under_each_row_and_leaves_the_table_alone(capsys, node, market):
    dataset, factors, arrays = market
    users = sorted(factors)[:3]
    base = ["recommend", "--state-dir", node["state"], "--log", node["log"], "--catalog", node["catalog"], "--users", *users, "--k", 3]
    code, plain, err = run(capsys, *base)
    assert code == 0, err
    code, explained, err = run(capsys, *base, "--explain")
    assert code == 0, err
    assert "why" not in plain
    lines = explained.splitlines()
    why = [line for line in lines if line.lstrip().startswith("why: ")]
    assert len(why) == 9 and [line for line in lines if line not in why] == plain.splitlines()
    recs = recommend(users, factors, arrays, dataset.catalog, seen_ads(dataset.log), 3)
    expected = explain(recs, factors, arrays, dataset.catalog, dataset.log)
    assert [line.split("why: ", 1)[1] for line in why] == [e.text for e in expected]
    assert lines[2::2] == why  # each row's why comes right under it


def test_cli_explain_adds_csv_columns(capsys, node, market, tmp_path):
    dataset, factors, arrays = market
    base = ["recommend", "--state-dir", node["state"], "--log", node["log"], "--catalog", node["catalog"], "--k", 4]
    code, _, err = run(capsys, *base, "--output", tmp_path / "plain.csv")
    assert code == 0, err
    code, out, err = run(capsys, *base, "--output", tmp_path / "why.csv", "--explain", "--because", 1)
    assert code == 0, err and "wrote" in out
    plain, rows = read_rows(tmp_path / "plain.csv"), read_rows(tmp_path / "why.csv")
    assert list(plain[0]) == ["user_id", "rank", "ad_id", "score"]
    assert list(rows[0]) == ["user_id", "rank", "ad_id", "score", "bias", "match", "because_ads", "category_matches",
                             "brand_matches", "popularity_percentile", "content_affinity", "why"]
    assert [{k: r[k] for k in plain[0]} for r in rows] == plain
    for row in rows:
        own = own_ads(dataset.log, row["user_id"])
        because = row["because_ads"].split(";") if row["because_ads"] else []
        assert len(because) <= 1 and all(own.get(dataset.catalog.index[a], -1) >= Event.CLICK for a in because)
        assert float(row["bias"]) + float(row["match"]) == pytest.approx(float(row["score"]), abs=1e-5)
        assert 0 <= float(row["popularity_percentile"]) <= 100 and row["why"].startswith("because you")
        assert int(row["category_matches"]) >= 0 and int(row["brand_matches"]) >= 0

    code, _, err = run(capsys, *base, "--explain", "--because", -1)
    assert code == 2 and "--because" in err
