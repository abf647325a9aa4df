"""Content affinity: how close an ad's public tags are to what the user recently chose, blended
into the model's ranking on the merchant's side.

A merchant ranks ads for one of its users by

    score(u, a) = z_u(model score) + weight x c_u x z_u(h_u . f_a)

- f_a: the ad's informative public tags (brand, category, attributes, genres), IDF-weighted and
  of unit norm (shared/catalog_features.normalized_tag_features);
- h_u: the user's profile, the sum of f over the user's own positives (clicks, purchases), each
  weighing 0.5 ** (age / halflife) with age 0 for the latest, scaled to unit norm;
- c_u in [0, 1]: the profile's concentration, the norm of that weighted sum over the weights'
  total: 1 for a user whose every choice carries the same tags (one brand, one category), near
  0 for one whose choices share none, or carry no informative tag. A user's own history says
  how much to trust it: a loyal buyer of one brand is ranked by it, an eclectic one by the model;
- z_u: standardized over the catalog for that user (mean 0, std 1), so the weight is in units of
  each score's spread over the catalog, whatever the model's scale (a noisy private model,
  popularity alone, NeuMF). The affinity's distribution is skewed (most ads share no tag with
  the profile): an ad sharing a rare tag with it can stand many spreads above the rest.

Privacy: h_u and c_u are computed at the merchant from user u's own rows and the public catalog,
and only rank ads for user u: the ranking of u depends on the released (DP) model, public data and
u's own data, which joint differential privacy allows (docs/PRIVACY.md). Nothing here is sent;
the metrics a merchant releases from these rankings are noised as before (one user's metrics are
still in [0, 1]).

Why: a private model's ad factors carry noise that a user's own history does not. On the
e-commerce catalog (Amazon Beauty: brands and categories) the tags of a user's latest purchases
foretell the next one better than any model the budget allows, and on MovieLens the release
years and genres of a user's latest films lift the model, private or not. Where users keep to no
tag (the synthetic market's latent tastes) it costs some accuracy: a smaller `content-affinity`
suits such logs. Measured in docs/BENCHMARKS.md ("Content affinity").
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from shared.config import RunConfig

# users blended at a time: the [ads, 16] affinity block stays in the CPU's cache (on Beauty's
# 12,101 ads five times faster than standardizing one [1,024, ads] product in place)
BLOCK_USERS = 16


class ContentBlend(BaseModel):
    """The blend's settings, as a record: saved with every global model a merchant receives
    (client/node_state.py), so serving ranks exactly as evaluation did, without the run config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(ge=0)
    halflife: float = Field(gt=0)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ContentBlend | None:
        """The run's blend, or None where its weight is 0 (the model's scores alone)."""
        if cfg.content_affinity == 0:
            return None
        return cls(weight=cfg.content_affinity, halflife=cfg.content_affinity_halflife)

    def scores(self, model_scores: np.ndarray, offsets: np.ndarray, history: np.ndarray, users: np.ndarray,
               features: sp.csr_array) -> np.ndarray:
        """[len(users), ads]: the blended scores of `users`, given their model scores (same
        shape) and every user's positives in time order (CSR: user u's are
        history[offsets[u]:offsets[u + 1]], the latest last)."""
        profiles, concentration = user_profiles(offsets, history, users, features, self.halflife)
        blended = np.empty(np.shape(model_scores))
        for start in range(0, len(profiles), BLOCK_USERS):
            block = slice(start, start + BLOCK_USERS)
            blended[block] = standardized(np.asarray(model_scores[block], dtype=np.float64))
            affinity = features @ profiles[block].T  # [ads, block]: a column per user
            affinity -= affinity.mean(axis=0)
            spread = np.sqrt(np.einsum("ij,ij->j", affinity, affinity) / max(affinity.shape[0], 1))
            affinity *= self.weight * concentration[block] / np.where(spread > 0, spread, 1.0)
            blended[block] += affinity.T
        return blended


def user_profiles(offsets: np.ndarray, history: np.ndarray, users: np.ndarray, features: sp.csr_array,
                  halflife: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm tag profiles [len(users), tags] of `users` and their concentrations in [0, 1]
    (module docstring); a user without positives has a zero profile and concentration 0."""
    users = np.asarray(users, dtype=np.int64)
    counts = offsets[users + 1] - offsets[users]
    batch_row = np.repeat(np.arange(len(users)), counts)
    position = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    ads = history[np.repeat(offsets[users], counts) + position]
    weights = 0.5 ** ((np.repeat(counts, counts) - 1 - position) / halflife)
    chosen = sp.csr_array((weights, (batch_row, ads)), shape=(len(users), features.shape[0]))
    summed = np.asarray((chosen @ features).todense()) if features.shape[1] else np.zeros((len(users), 0))
    norms = np.linalg.norm(summed, axis=1)
    total = np.bincount(batch_row, weights=weights, minlength=len(users))
    concentration = np.where(total > 0, norms / np.where(total > 0, total, 1.0), 0.0)
    profiles = summed / np.where(norms > 0, norms, 1.0)[:, None]
    return profiles, np.clip(concentration, 0.0, 1.0)


def standardized(scores: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its std (a constant row: zeros)."""
    centered = scores - scores.mean(axis=1, keepdims=True)
    spread = centered.std(axis=1, keepdims=True)
    return centered / np.where(spread > 0, spread, 1.0)
