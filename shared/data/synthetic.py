"""The embedded default data: a synthetic e-commerce market with known ground truth.

Several merchants with their own users share one public ad catalog. Ads belong to categories
and brands; their popularity follows a power law; every user has a latent taste vector that
is drawn around the categories their merchant's audience favours. A user's clicks are drawn
without replacement from softmax(taste . ad + popularity), so popularity alone explains part of
the clicks and the latent preferences the rest: a learned model can beat TopPop clearly.
An ad's title names its category and brand and a few descriptive words; each descriptive word
has a hidden direction in taste space and an ad's words are drawn towards its own vector, so
the title text carries part of the preferences (what a content model can learn, issue 17).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.data.schema import AdCatalog, Dataset, Event, InteractionLog

CATEGORY_NAMES = (
    "beauty", "books", "electronics", "fashion", "garden", "grocery", "health", "home",
    "jewelry", "kids", "music", "office", "outdoor", "pets", "shoes", "sports", "toys", "travel",
    "video-games", "watches",
)
ADJECTIVES = ("classic", "eco", "premium", "smart", "compact", "vintage", "deluxe", "everyday", "pro", "mini")
# descriptive title words: each gets a hidden direction in taste space (_title_words)
DESCRIPTIVE_WORDS = (
    "bold", "calm", "cosy", "crisp", "daring", "elegant", "fresh", "gentle", "glossy", "handmade", "hardy", "light",
    "lush", "matte", "minimal", "modern", "natural", "organic", "playful", "plush", "polished", "quiet", "rugged",
    "rustic", "silky", "sleek", "soft", "sporty", "sturdy", "sunny", "tough", "travel", "urban", "velvet", "vivid",
    "warm", "wild", "woven", "zesty", "retro",
)
TITLE_WORDS_PER_AD = 3
TITLE_WORD_SHARPNESS = 8.0  # how strongly an ad's words follow its vector (softmax temperature^-1)
REGIONS = ("eu-west", "eu-north", "us-east", "us-west", "apac")
DAY = 86_400


class SyntheticSpec(BaseModel):
    """Knobs of the generator; defaults give a market that trains in seconds."""

    model_config = ConfigDict(extra="forbid")

    merchants: int = Field(5, ge=1, le=100)
    users: int = Field(2000, ge=10)
    ads: int = Field(600, ge=20)
    categories: int = Field(12, ge=2, le=len(CATEGORY_NAMES))
    brands: int = Field(40, ge=1)
    latent_dim: int = Field(8, ge=2)
    taste_strength: float = Field(5.0, gt=0, description="weight of taste vs popularity in the click logits")
    popularity_exponent: float = Field(0.9, ge=0, description="Zipf exponent of ad popularity")
    mean_clicks_per_user: float = Field(25.0, ge=3)
    min_clicks_per_user: int = Field(5, ge=3)
    purchase_rate: float = Field(0.15, ge=0, le=1)
    impressions_per_click: float = Field(1.0, ge=0)
    seed: int = 42


@dataclass(frozen=True)
class GroundTruth:
    """What generated the data: for oracle checks in tests, never given to a model."""

    user_taste: dict[str, np.ndarray]
    ad_vectors: np.ndarray
    ad_popularity_logit: np.ndarray
    taste_strength: float


def _catalog(spec: SyntheticSpec) -> tuple[AdCatalog, np.ndarray, np.ndarray, np.ndarray]:
    """The public catalog, plus the hidden ad vectors, category centroids and popularity."""
    rng = np.random.default_rng([spec.seed, 0])
    d = spec.latent_dim
    centroids = rng.normal(size=(spec.categories, d))
    category_share = 1.0 / np.arange(1, spec.categories + 1) ** 0.5
    ad_category = rng.choice(spec.categories, size=spec.ads, p=category_share / category_share.sum())
    ad_vectors = centroids[ad_category] + 0.6 * rng.normal(size=(spec.ads, d))
    ad_vectors /= np.linalg.norm(ad_vectors, axis=1, keepdims=True)
    popularity_rank = rng.permutation(spec.ads)
    popularity_logit = -spec.popularity_exponent * np.log1p(popularity_rank)
    ad_brand = rng.integers(spec.brands, size=spec.ads)
    brand_names = [f"brand-{b:03d}" for b in range(spec.brands)]
    adjectives = rng.integers(len(ADJECTIVES), size=spec.ads)
    words = _title_words(ad_vectors, spec.seed)
    titles = tuple(
        f"{ADJECTIVES[a]} {' '.join(w)} {CATEGORY_NAMES[c]} item {j} by {brand_names[b]}"
        for j, (a, w, c, b) in enumerate(zip(adjectives, words, ad_category, ad_brand))
    )
    catalog = AdCatalog(
        ad_ids=tuple(f"ad-{j:05d}" for j in range(spec.ads)),
        categories=tuple(CATEGORY_NAMES[c] for c in ad_category),
        brands=tuple(brand_names[b] for b in ad_brand),
        titles=titles,
        source=f"synthetic(seed={spec.seed})",
    )
    return catalog, ad_vectors, centroids, popularity_logit


def _title_words(ad_vectors: np.ndarray, seed: int) -> list[tuple[str, ...]]:
    """TITLE_WORDS_PER_AD distinct descriptive words per ad, drawn without replacement with
    probability softmax(sharpness x word direction . ad vector): ads close in taste space share
    words. Its own random stream, so the rest of the market is the same with or without it."""
    rng = np.random.default_rng([seed, 2])
    directions = rng.normal(size=(len(DESCRIPTIVE_WORDS), ad_vectors.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    gumbel = TITLE_WORD_SHARPNESS * ad_vectors @ directions.T + rng.gumbel(size=(len(ad_vectors), len(DESCRIPTIVE_WORDS)))
    chosen = np.argsort(-gumbel, axis=1)[:, :TITLE_WORDS_PER_AD]
    return [tuple(DESCRIPTIVE_WORDS[w] for w in row) for row in chosen]


def synthetic_catalog(spec: SyntheticSpec | None = None) -> AdCatalog:
    """The catalog alone, as the server (which never sees logs) builds it."""
    return _catalog(spec or SyntheticSpec())[0]


def generate(spec: SyntheticSpec | None = None) -> tuple[Dataset, GroundTruth]:
    spec = spec or SyntheticSpec()
    catalog, ad_vectors, centroids, popularity_logit = _catalog(spec)
    rng = np.random.default_rng([spec.seed, 1])
    d = spec.latent_dim

    # --- merchants of unequal size, each with its own audience's category mix
    merchant_share = 1.0 / np.arange(1, spec.merchants + 1) ** 0.8
    user_merchant = np.sort(rng.choice(spec.merchants, size=spec.users, p=merchant_share / merchant_share.sum()))
    merchant_category_mix = rng.dirichlet(np.full(spec.categories, 0.7), size=spec.merchants)
    merchant_region_mix = rng.dirichlet(np.full(len(REGIONS), 0.5), size=spec.merchants)

    users, ads, timestamps, events, merchants, regions = [], [], [], [], [], []
    truth: dict[str, np.ndarray] = {}
    start = 1_700_000_000
    for u in range(spec.users):
        m = int(user_merchant[u])
        user_id = f"m{m}-u{u:06d}"
        favourites = rng.choice(spec.categories, size=rng.integers(1, 3), replace=False, p=merchant_category_mix[m])
        taste = centroids[favourites].mean(axis=0) + 0.5 * rng.normal(size=d)
        taste /= np.linalg.norm(taste)
        truth[user_id] = taste
        logits = spec.taste_strength * ad_vectors @ taste + popularity_logit
        n_clicks = int(np.clip(rng.poisson(spec.mean_clicks_per_user - spec.min_clicks_per_user) + spec.min_clicks_per_user,
                               spec.min_clicks_per_user, spec.ads // 2))
        gumbel = logits + rng.gumbel(size=spec.ads)
        clicked = np.argsort(-gumbel)[:n_clicks]
        # impressions: ads served by popularity that the user did not click
        n_impressions = int(round(spec.impressions_per_click * n_clicks))
        not_clicked = np.setdiff1d(np.arange(spec.ads), clicked)
        serve = np.exp(popularity_logit[not_clicked])
        shown = rng.choice(not_clicked, size=min(n_impressions, len(not_clicked)), replace=False, p=serve / serve.sum())
        rows = np.concatenate([clicked, shown])
        kinds = np.concatenate([
            np.where(rng.random(n_clicks) < spec.purchase_rate, Event.PURCHASE, Event.CLICK),
            np.full(len(shown), Event.IMPRESSION),
        ])
        times = start + np.sort(rng.integers(0, 60 * DAY, size=len(rows)))
        order = rng.permutation(len(rows))  # clicks and impressions interleave in time
        region = REGIONS[rng.choice(len(REGIONS), p=merchant_region_mix[m])]
        users += [user_id] * len(rows)
        ads.append(rows[order])
        timestamps.append(times)
        events.append(kinds[order])
        merchants += [f"merchant-{m}"] * len(rows)
        regions += [region] * len(rows)

    log = InteractionLog(
        user=np.array(users, dtype=object),
        ad=np.concatenate(ads).astype(np.int64),
        timestamp=np.concatenate(timestamps).astype(np.int64),
        event=np.concatenate(events).astype(np.int8),
        merchant=np.array(merchants, dtype=object),
        region=np.array(regions, dtype=object),
        source=catalog.source,
    )
    return Dataset("synthetic", catalog, log), GroundTruth(truth, ad_vectors, popularity_logit, spec.taste_strength)
