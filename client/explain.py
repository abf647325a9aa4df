"""Why an ad is recommended, in terms a merchant can show next to it (issue 18, item 3).

Every part of an explanation comes from what the merchant already holds: the served user's own
rows of its log, that user's stored factors, and the global model and catalog, which are public
to every merchant. No other merchant's data is involved and nothing leaves the machine, so an
explanation spends no privacy budget and needs no round trip to the server.

For each recommended (user, ad):
  because      the user's own clicked/purchased ads nearest to it in the model's ad space
               (cosine of the ad vectors; bare impressions only for a user without positives);
  category     how many of those ads share its category, and its brand;
  popularity   its ad bias b_a ranked in the catalog: the popularity the model learned;
  score        MF: the model's score = b_a + p_u . q_a exactly. NeuMF: b_a and the remainder, which
               is a non-linear function of user and ad and is not a sum of separable parts.
  affinity     with content affinity (shared/content_affinity.py): its term of the ranking score,
               from the ad's public tags against those of the user's own recent positives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from client.serving import Recommendation
from shared.data.schema import UNKNOWN_CATEGORY, AdCatalog, Event, InteractionLog
from shared.neumf_arrays import ad_embeddings
from shared.wire import AD_BIAS, AD_FACTORS, NEUMF_GMF, Arrays

DEFAULT_BECAUSE = 2
EVENT_VERBS = {Event.IMPRESSION: "viewed", Event.CLICK: "clicked", Event.PURCHASE: "purchased"}
# A nearest ad pointing away from the recommended one (cosine <= 0) would be named as a reason
# although the model sees the two as unrelated or opposed: such ads are never given.
MIN_SIMILARITY = 0.0


class BecauseAd(NamedTuple):
    ad_id: str
    title: str | None
    event: str  # the user's strongest event on it: "purchased", "clicked"; "viewed" only for a user without positives
    similarity: float  # cosine of the two ads' vectors in the global model


@dataclass(frozen=True)
class Explanation:
    user_id: str
    rank: int
    ad_id: str
    score: float  # the score the ad was ranked by
    bias: float  # b_a
    match: float  # MF: p_u . q_a; NeuMF: model_score - b_a
    additive: bool  # True: the model's score (model_score, or score without a blend) == bias + match (MF); False: match is a non-linear remainder
    because: tuple[BecauseAd, ...]
    category: str
    category_matches: int  # of the user's `history` ads (the recommended one aside), those in its category
    brand: str | None
    brand_matches: int  # ... and those by its brand (0 without a brand)
    history: int  # how many ads the counts are out of
    history_kind: str  # what those ads are: "clicked or purchased", or "viewed" for a user without positives
    popularity_rank: int  # 1: the largest ad bias in the catalog
    popularity_percentile: float  # share of the other ads with a smaller bias, ties counted half: 100 = the most popular
    text: str  # one line for a merchant to show
    model_score: float | None = None  # with content affinity: the model's own score (= bias + match for MF); None: `score` is it
    affinity: float = 0.0  # with content affinity: its term of `score`


@dataclass(frozen=True)
class _History:
    """A user's own ads in the log: the basis of every "you" in an explanation."""

    ads: np.ndarray  # catalog rows, ascending
    events: np.ndarray  # the user's strongest event on each
    positive: bool  # the ads are clicks/purchases (False: the user has none, they are impressions)


def user_histories(log: InteractionLog, users: Iterable[str]) -> dict[str, _History]:
    """Each given user's distinct ads with the strongest event on each: their clicked/purchased
    ads, or their viewed ones for a user with no positive (so a cold user still gets a "you")."""
    wanted = set(users)
    strongest: dict[str, dict[int, int]] = {u: {} for u in wanted}
    keep = np.isin(log.user.astype(str), np.asarray(sorted(wanted), dtype=str))
    for user, ad, event in zip(log.user[keep].astype(str).tolist(), log.ad[keep].tolist(), log.event[keep].tolist()):
        seen = strongest[user]
        seen[int(ad)] = max(int(event), seen.get(int(ad), int(Event.IMPRESSION)))
    out: dict[str, _History] = {}
    for user, seen in strongest.items():
        ads = np.array(sorted(seen), dtype=np.int64)
        events = np.array([seen[a] for a in ads.tolist()], dtype=np.int8)
        positive = events >= Event.CLICK
        if positive.any():
            ads, events = ads[positive], events[positive]
        out[user] = _History(ads, events, bool(positive.any()))
    return out


def ad_vectors(arrays: Arrays) -> np.ndarray:
    """What the model knows of each ad, as one vector per ad: MF's factors q_a; NeuMF's GMF and
    MLP embeddings side by side (content projection included), since the score reads both and
    the GMF half alone would leave out what the MLP tower knows of the ad."""
    if NEUMF_GMF in arrays:
        gmf, mlp = ad_embeddings(arrays)
        return np.hstack([gmf, mlp]).astype(np.float64)
    return np.asarray(arrays[AD_FACTORS], dtype=np.float64)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # an all-zero row (an ad nobody trained) has cosine 0 with everything instead of NaN
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def popularity(bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank, percentile) of every ad's bias: rank 1 is the largest; the percentile is the share
    of the other ads with a smaller bias, ties counted half, so equal biases all sit at 50."""
    b = np.asarray(bias, dtype=np.float64)
    ordered = np.sort(b)
    lower = np.searchsorted(ordered, b, side="left")
    higher = len(b) - np.searchsorted(ordered, b, side="right")
    ties = len(b) - lower - higher - 1  # the ad itself aside
    percentile = 100.0 * (lower + 0.5 * ties) / (len(b) - 1) if len(b) > 1 else np.full(len(b), 100.0)
    return higher + 1, percentile


def nearest_own_ads(target: int, history: _History, unit: np.ndarray, count: int) -> list[tuple[int, int, float]]:
    """(catalog row, event, cosine) of the user's ads nearest to `target`, best first (ties to the
    lower row); the target itself and ads at cosine <= MIN_SIMILARITY are never given."""
    mask = history.ads != target
    ads, events = history.ads[mask], history.events[mask]
    if count <= 0 or not len(ads):
        return []
    similarity = unit[ads] @ unit[target]
    order = np.lexsort((ads, -similarity))[:count]
    return [(int(ads[i]), int(events[i]), float(similarity[i])) for i in order if similarity[i] > MIN_SIMILARITY]


def _name(catalog: AdCatalog, row: int) -> str:
    title = catalog.titles[row]
    return f"'{title}' ({catalog.ad_ids[row]})" if title else catalog.ad_ids[row]


def _sentence(e: Explanation, catalog: AdCatalog, num_ads: int, flat_bias: bool) -> str:
    parts: list[str] = []
    if e.because:
        # "clicked X and Y" rather than "clicked X and clicked Y": a verb only where the event changes
        reasons = [(f"{b.event} " if i == 0 or b.event != e.because[i - 1].event else "") + _name(catalog, catalog.index[b.ad_id])
                   for i, b in enumerate(e.because)]
        parts.append("because you " + (" and ".join(reasons) if len(reasons) < 3 else ", ".join(reasons[:-1]) + " and " + reasons[-1]))
    elif e.history:
        parts.append(f"none of your {e.history_kind} ads is close to it in the model")
    else:
        parts.append("no history of yours in this log")
    if e.history:
        shared = []
        if e.category != UNKNOWN_CATEGORY:
            verb = "is" if e.category_matches == 1 else "are"
            shared.append(f"{e.category_matches} of your {e.history} {e.history_kind} ads {verb} in category '{e.category}'")
        if e.brand:
            shared.append(f"{e.brand_matches} {'is' if e.brand_matches == 1 else 'are'} by '{e.brand}'")
        if shared:
            parts.append(", ".join(shared))
    if flat_bias:
        parts.append("popularity: the model gives every ad the same bias")
    else:
        parts.append(f"popularity: rank {e.popularity_rank} of {num_ads} by the model's ad bias (percentile {e.popularity_percentile:.0f})")
    model = e.score if e.model_score is None else e.model_score
    named = "score" if e.model_score is None else "model score"
    if e.additive:
        leader = "personal match" if abs(e.match) >= abs(e.bias) else "popularity (ad bias)"
        parts.append(f"{named} {model:.3f} = match {e.match:.3f} + bias {e.bias:.3f}, mostly {leader}")
    else:
        parts.append(f"{named} {model:.3f}: ad bias {e.bias:.3f}, the other {e.match:.3f} from NeuMF's non-linear "
                     "user-ad interaction (not a sum of separable parts)")
    if e.model_score is not None and e.history_kind != "viewed" and e.history:
        parts.append(f"ranked by {e.score:.3f}: the model score standardized over the catalog, {e.affinity:+.3f} from "
                     "content affinity (its tags against those of your recent clicks and purchases)")
    elif e.model_score is not None:
        parts.append(f"ranked by {e.score:.3f}: the model score standardized over the catalog (no clicks or purchases "
                     "of yours for content affinity)")
    return "; ".join(parts)


def explain(
    recommendations: Sequence[Recommendation], factors: dict[str, np.ndarray], arrays: Arrays,
    catalog: AdCatalog, log: InteractionLog, because: int = DEFAULT_BECAUSE,
) -> list[Explanation]:
    """One explanation per recommendation, in its order. `factors` must hold every recommended
    user's vector (as `recommend` needed); `log` is the merchant's own, and only the rows of the
    user being explained are ever used for that user."""
    if because < 0:
        raise ValueError(f"because must be at least 0, got {because}")
    if not recommendations:
        return []
    neumf = NEUMF_GMF in arrays
    bias = np.asarray(arrays[AD_BIAS], dtype=np.float64)
    unit = _unit_rows(ad_vectors(arrays))
    rank, percentile = popularity(bias)
    flat_bias = bool(np.ptp(bias) == 0) if len(bias) else True
    histories = user_histories(log, {r.user_id for r in recommendations})
    out: list[Explanation] = []
    for rec in recommendations:
        ad = catalog.index[rec.ad_id]
        history = histories[rec.user_id]
        others = history.ads[history.ads != ad]
        if neumf:
            # NeuMF's score has no additive user-ad part: everything that is not b_a is the remainder
            match = (rec.score if rec.model_score is None else rec.model_score) - float(bias[ad])
        else:
            match = float(np.asarray(factors[rec.user_id], dtype=np.float64) @ np.asarray(arrays[AD_FACTORS][ad], dtype=np.float64))
        brand = catalog.brands[ad]
        draft = Explanation(
            user_id=rec.user_id, rank=rec.rank, ad_id=rec.ad_id, score=rec.score, bias=float(bias[ad]), match=match,
            additive=not neumf,
            because=tuple(
                BecauseAd(catalog.ad_ids[row], catalog.titles[row], EVENT_VERBS[Event(event)], similarity)
                for row, event, similarity in nearest_own_ads(ad, history, unit, because)
            ),
            category=catalog.categories[ad],
            category_matches=sum(catalog.categories[a] == catalog.categories[ad] for a in others.tolist()),
            brand=brand,
            brand_matches=sum(catalog.brands[a] == brand for a in others.tolist()) if brand else 0,
            history=len(others),
            history_kind="clicked or purchased" if history.positive else "viewed",
            popularity_rank=int(rank[ad]), popularity_percentile=float(percentile[ad]), text="",
            model_score=rec.model_score, affinity=rec.affinity,
        )
        # the sentence is written from the finished numbers, so text and fields cannot disagree
        out.append(replace(draft, text=_sentence(draft, catalog, len(catalog), flat_bias)))
    return out
