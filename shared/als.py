"""Implicit alternating least squares for biased MF, split along the privacy boundary (numpy and scipy.sparse).

Objective (implicit ALS, Hu, Koren and Volinsky 2008, with user weights):
    sum_u c_u [ sum_{a in O_u} (r_ua - s_ua)^2 + alpha0 * sum_{all a} s_ua^2 ] + l2 terms,
    s_ua = p_u . q_a + b_a = p~_u . q~_a  with  p~_u = [p_u, C],  q~_a = [q_a, b_a / C].
O_u are the user's observed rows (positives r = 1, impressions without a positive r = 0);
every other pair counts as a weak zero through one Gramian.

- User step (client, exact, never released): p_u solves a d x d ridge system built from the
  user's own rows and the released ad parameters (joint DP, as in private ALS).
- Ad step: q~_a solves (A_a + alpha0 G + l2 I) q~_a = t_a with the sufficient statistics
      A_a = sum_{u: a in O_u} c_u p~ p~^T,  t_a = sum_{u: a in O_u} c_u r_ua p~,
      G = sum_u c_u p~ p~^T,  n_a = sum_{u: a in O_u} c_u,
  t_a's last coordinate is C m_a with m_a = sum_{u: a in O_u} c_u r_ua (weighted positives),
  which are sums over users: clients release them (noised under DP) and the server adds and
  solves. `A_a` per ad ("per-ad" Gramians), or approximated by n_a G / N ("shared": the
  per-ad Gramian replaced by the ad's count times the average user's, far less noise). Without
  DP, "sparse" is "per-ad" sent for the ads the shard's rows touch only (ALS_ADS, each Gramian's
  packed upper triangle): exact, and it grows with the shard, not the catalog; an untouched ad
  has A_a = 0 and t_a = 0, so its solve is 0. Under DP the release stays dense: which ads a
  merchant's users touched is itself private.
  Sums over a shard's rows are products with its sparse [users, ads] matrix of row counts (or
  labels): a user seen twice on an ad counts twice, as a sum over rows does.

Per-user bounds that make the statistics' sensitivity finite (Chien et al., ICML 2021, cap a
user's items; here every row is kept and a heavy user is down-weighted instead):
    ||p_u|| <= C (clipped before the statistics; the bias feature is C too, so ||p~||^2 <= 2 C^2:
    the clip sets the scale of the whole release, bias included),
    c_u = min(1, sqrt(k / |O_u|)), so sum over the user's rows of c_u^2 <= k.
Adding or removing one user moves A by at most sqrt(k) 2 C^2 (Frobenius, over all ads),
t's factor part by sqrt(k) C, m and n by sqrt(k), G by 2 C^2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from shared.config import RunConfig
from shared.data.split import UserSplit
from shared.wire import (
    AD_BIAS,
    AD_FACTORS,
    ALS_ADS,
    ALS_COUNT,
    ALS_GRAM,
    ALS_GRAM_UPPER,
    ALS_POSITIVES,
    ALS_TARGET,
    ALS_USER_GRAM,
    POPULARITY,
    RELEASES,
    STATISTICS,
    Arrays,
)

# What a private release holds. A private run's first release is the ads' positive counts alone
# (their popularity, POPULARITY_SHARE of the merchant's budget): they do not depend on the model,
# so releasing them once costs what releasing them every round does, and they come before any
# model is trained: the server reads from them whether the data carry enough signal above the
# noise for a personal model, and when they do not, every later release is popularity too, so the
# run ends exactly at the DP-popularity floor (its budget all spent on counts) instead of below it.
POPULARITY_SHARE = 0.17  # of a private run's budget (in 1 / sigma^2): its first release
# share of a release's squared noise budget each statistic gets (sums to 1 per release)
BUDGET_SHARES = {
    "per-ad": {ALS_GRAM: 0.45 / 0.88, ALS_TARGET: 0.40 / 0.88, ALS_USER_GRAM: 0.03 / 0.88},
    "shared": {ALS_COUNT: 0.05 / 0.83, ALS_TARGET: 0.75 / 0.83, ALS_USER_GRAM: 0.03 / 0.83},
}
POPULARITY_SHARES = {ALS_POSITIVES: 1.0}
# the statistics an exact (non-private) round holds: everything, the positive counts included
STAT_KEYS = {mode: (*shares, ALS_POSITIVES) for mode, shares in BUDGET_SHARES.items()}
STAT_KEYS["sparse"] = (ALS_ADS, ALS_GRAM_UPPER, ALS_TARGET, ALS_USER_GRAM, ALS_POSITIVES)
SPARSE_PER_AD = (ALS_GRAM_UPPER, ALS_TARGET, ALS_POSITIVES)  # a sparse release's rows, one per touched ad
# The popularity rule (docs/PRIVACY.md "Settings"): the signal is the interaction-weighted mean
# of the ads' counts, sum n_a^2 / sum n_a (the count of the ad a typical interaction is on), in
# noise stds of a popularity release made with the whole budget. Below POPULARITY_MIN_SIGNAL the
# personal model ranks worse than popularity at the same noise (break-even measured at 6.5 on
# MovieLens-100K, 7.6 on Amazon Beauty, docs/BENCHMARKS.md): the run ranks by popularity.
POPULARITY_MIN_SIGNAL = 7.0
# Above it, each ad's score leans on its noisy popularity by POPULARITY_LEAN / signal spreads of
# the personal scores: the noisier the statistics, the more the ranking rests on counts.
POPULARITY_LEAN = 10.0
CHUNK_USERS = 8192  # bounds the per-user temporaries: [8192, 33 * 34 / 2] float64 is 37 MB
CHUNK_ADS = 8192  # bounds a sparse solve's per-ad [8192, 33, 33] float64 temporaries (71 MB)
# als-alpha0 = "auto": the unobserved pairs of a user weigh together ALPHA0_PER_DENSITY times
# their observed rows (alpha0 x ads = 8 x rows per user), whatever the catalog's size and the
# users' activity: MovieLens-100K's density 0.062 gives 0.5, the earlier fixed default; Beauty's
# 0.00065 gives 0.0052, where implicit's validated optimum lies (confidence alpha ~ 1 / 0.003)
ALPHA0_PER_DENSITY = 8.0
PRIVATE_ALPHA0 = 0.5  # "auto" under DP: the density is private, this constant is not
# als-user-l2 and als-ad-l2 "auto": without DP 3 (Beauty's validated optimum; MovieLens-100K is
# flat from 1 to 3: federated / implicit 1.006 -> 1.016 sampled, 1.025 -> 1.014 full), under DP 1
# (the noise-aware ridge regularizes the ad step; 3 costs 0.01-0.02 NDCG@10 sampled on
# MovieLens at epsilon 4-16): docs/BENCHMARKS.md "Federated ALS against implicit's ALS"
EXACT_L2, PRIVATE_L2 = 3.0, 1.0


@dataclass(frozen=True)
class ALSSettings:
    alpha0: float | None  # weight of every unobserved (user, ad) pair; None: from the statistics' density
    user_l2: float
    ad_l2: float
    max_rows: int | None  # k: a user's rows weigh c_u = min(1, sqrt(k / rows)); None: unbounded (no DP)
    user_clip: float  # C: user factors are clipped to this norm in the statistics (and the bias feature)
    gram_mode: str  # "per-ad" | "shared" | "sparse" (per-ad, for the touched ads only: without DP)
    clip: bool = True  # False without DP: the statistics then use the exact user factors
    count_shrinkage: float = 0.0  # ad factors scaled by n_a / (n_a + this x the noise std of n_a)
    noise_ridge: float = 0.0  # ridge added per unit of noise std of the summed target
    prior_weight: float = 0.01  # with catalog tags: the share of its tags' mean factors a rarely seen ad takes (als-catalog-prior-weight)

    def __post_init__(self) -> None:
        if self.gram_mode == "sparse" and self.private:
            raise ValueError("als-gram 'sparse' names the ads a merchant's users touched, which is private: under DP "
                             "the release is dense ('shared' or 'per-ad')")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ALSSettings:
        """The run's settings; als-gram "auto" is "shared" under DP, else "sparse" (exact)."""
        private = cfg.privacy == "user"
        return cls(
            alpha0=fixed_alpha0(cfg), user_l2=als_l2(cfg.als_user_l2, cfg), ad_l2=als_l2(cfg.als_ad_l2, cfg),
            max_rows=cfg.als_max_rows if private else None, user_clip=cfg.als_user_clip,
            gram_mode=cfg.als_gram if cfg.als_gram != "auto" else ("shared" if private else "sparse"),
            count_shrinkage=cfg.als_count_shrinkage if private else 0.0, noise_ridge=cfg.als_noise_ridge, clip=private,
            prior_weight=cfg.als_catalog_prior_weight,
        )

    @property
    def sparse(self) -> bool:
        return self.gram_mode == "sparse"

    @property
    def private(self) -> bool:
        return self.max_rows is not None

    def release_keys(self, release: str = STATISTICS) -> tuple[str, ...]:
        """The statistics a release holds: every one without DP; under DP the positive counts
        alone (popularity) or everything else (statistics: the positives come from the
        popularity releases, POPULARITY_SHARE of the budget)."""
        if release not in RELEASES:
            raise ValueError(f"an ALS release is one of {RELEASES}, not {release!r}")
        if not self.private:
            return STAT_KEYS[self.gram_mode]
        return tuple(self.budget_shares(release))

    def budget_shares(self, release: str = STATISTICS) -> dict[str, float]:
        return POPULARITY_SHARES if release == POPULARITY else BUDGET_SHARES[self.gram_mode]

    def stat_shapes(self, num_ads: int, dim: int, release: str = STATISTICS, touched: int | None = None) -> dict[str, tuple[int, ...]]:
        """The released statistics' shapes for a model of `dim` factors (D = dim + 1); a sparse
        release's for `touched` ads (None: all of them, its largest)."""
        aug = dim + 1
        rows = touched if self.sparse and touched is not None else num_ads
        shapes = {ALS_GRAM: (num_ads, aug, aug), ALS_COUNT: (num_ads,), ALS_TARGET: (rows, dim), ALS_POSITIVES: (rows,),
                  ALS_USER_GRAM: (aug, aug), ALS_ADS: (rows,), ALS_GRAM_UPPER: (rows, aug * (aug + 1) // 2)}
        return {key: shapes[key] for key in self.release_keys(release)}

    def sensitivities(self) -> dict[str, float]:
        """L2 sensitivity of each statistic to adding or removing one user."""
        if self.max_rows is None:
            raise ValueError("sensitivities are defined for bounded statistics only (max_rows, under DP)")
        aug = 2.0 * self.user_clip**2
        root_k = math.sqrt(self.max_rows)
        return {ALS_GRAM: root_k * aug, ALS_TARGET: root_k * self.user_clip, ALS_POSITIVES: root_k, ALS_COUNT: root_k,
                ALS_USER_GRAM: aug}

    def noise_stds(self, noise_multiplier: float, release: str = STATISTICS) -> dict[str, float]:
        """Gaussian noise std per coordinate of each statistic: together one Gaussian release of
        sensitivity 1 at `noise_multiplier` (each block scaled by its sensitivity / sqrt(share))."""
        sens = self.sensitivities()
        return {key: noise_multiplier * sens[key] / math.sqrt(share) for key, share in self.budget_shares(release).items()}

    def summed_noise_stds(self, noise_multipliers: list[float], release: str = STATISTICS) -> dict[str, float]:
        """The noise std per coordinate of each statistic in a sum of releases, each made at one
        of `noise_multipliers`: Gaussian variances add, and noise_stds is linear in the multiplier."""
        total = math.sqrt(sum(sigma**2 for sigma in noise_multipliers))
        return self.noise_stds(total, release) if total > 0 else dict.fromkeys(self.release_keys(release), 0.0)


def als_l2(value: float | str, cfg: RunConfig) -> float:
    """An ALS L2 setting's value: a number asked for, or "auto" (EXACT_L2, PRIVATE_L2 under DP)."""
    if value != "auto":
        return float(value)
    return PRIVATE_L2 if cfg.privacy == "user" else EXACT_L2


def fixed_alpha0(cfg: RunConfig) -> float | None:
    """The run's alpha0 when the data does not set it: a number asked for, or "auto" under DP;
    None: "auto" without DP, each party reads it from its data (density_alpha0)."""
    if cfg.als_alpha0 != "auto":
        return cfg.als_alpha0
    return PRIVATE_ALPHA0 if cfg.privacy == "user" else None


def density_alpha0(rows: float, users: float, num_ads: int) -> float:
    """ALPHA0_PER_DENSITY x rows / (users x ads): the unobserved pairs weigh a fixed multiple of the observed."""
    return ALPHA0_PER_DENSITY * rows / max(users * num_ads, 1.0)


@dataclass
class Rows:
    """A shard's observed (user, ad, label) rows, grouped by user."""

    user: np.ndarray  # int64 [n], sorted
    ad: np.ndarray  # int64 [n]
    label: np.ndarray  # float64 [n]
    num_users: int

    @classmethod
    def from_split(cls, split: UserSplit) -> Rows:
        """Training positives (label 1) and impressions that never became one (label 0)."""
        user = np.concatenate([split.positive_user_index(), split.impression_user_index()])
        ad = np.concatenate([split.pos_ads, split.imp_ads])
        label = np.concatenate([np.ones(len(split.pos_ads)), np.zeros(len(split.imp_ads))])
        order = np.argsort(user, kind="stable")
        return cls(user[order], ad[order], label[order], split.num_users)

    def counts(self) -> np.ndarray:
        return np.bincount(self.user, minlength=self.num_users)

    def user_weights(self, max_rows: int | None) -> np.ndarray:
        if max_rows is None:
            return np.ones(self.num_users)
        counts = self.counts().astype(np.float64)
        return np.minimum(1.0, np.sqrt(max_rows / np.maximum(counts, 1.0)))


def _user_chunks(num_users: int) -> Iterator[slice]:
    """User ranges that bound the [users, D(D+1)/2] and [users, d, d] temporaries."""
    for start in range(0, num_users, CHUNK_USERS):
        yield slice(start, min(start + CHUNK_USERS, num_users))


def _row_sums(rows: Rows, values: np.ndarray, num_ads: int) -> sp.csr_array:
    """[users, ads] sums of `values` over the rows: duplicate (user, ad) rows add up (COO to CSR
    sums duplicates), so a product with it is the per-row scatter-add done as one sparse product."""
    return sp.csr_array((values, (rows.user, rows.ad)), shape=(rows.num_users, num_ads))


def _upper_outer(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """[n, D(D+1)/2]: the upper triangle of each row's left right^T (half the work of the full square)."""
    first, second = np.triu_indices(left.shape[1])
    return left[:, first] * right[:, second]


def _from_upper(packed: np.ndarray, dim: int) -> np.ndarray:
    """[n, D, D] symmetric matrices from their packed upper triangles (_upper_outer's layout)."""
    first, second = np.triu_indices(dim)
    position = np.empty((dim, dim), dtype=np.intp)
    position[first, second] = position[second, first] = np.arange(len(first))
    # one gather of whole rows: a scatter into the [n, D, D] array's two triangles is ten times slower
    return np.take(packed, position.ravel(), axis=1).reshape(len(packed), dim, dim)


def solve_users(rows: Rows, ad_factors: np.ndarray, ad_bias: np.ndarray, alpha0: float, user_l2: float) -> np.ndarray:
    """Exact user step: p_u = (sum_{O_u} q q^T + alpha0 Q^T Q + l2 I)^-1 (sum_{O_u} (r - b) q - alpha0 Q^T b)."""
    q = ad_factors.astype(np.float64)
    b = ad_bias.astype(np.float64)
    num_ads, dim = q.shape
    base = alpha0 * q.T @ q + user_l2 * np.eye(dim)
    # sum_{O_u} q q^T = sum_a (rows of u on a) q_a q_a^T: row counts times the ads' outer products,
    # of the ads the shard has rows on only (a million-ad catalog's [ads, D(D+1)/2] would be 4 GB)
    touched, column = np.unique(rows.ad, return_inverse=True)
    local = Rows(rows.user, column.reshape(-1), rows.label, rows.num_users)
    q_touched = q[touched]
    row_counts = _row_sums(local, np.ones(len(rows.ad)), len(touched))
    ad_outer = _upper_outer(q_touched, q_touched)
    rhs = _row_sums(local, rows.label - b[rows.ad], len(touched)) @ q_touched - alpha0 * (q.T @ b)
    factors = np.empty((rows.num_users, dim))
    for users in _user_chunks(rows.num_users):
        lhs = _from_upper(row_counts[users] @ ad_outer, dim) + base
        factors[users] = np.linalg.solve(lhs, rhs[users, :, None])[:, :, 0]
    return factors


def clip_rows(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors * np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))


def augmented(user_factors: np.ndarray, max_norm: float, clip: bool = True) -> np.ndarray:
    """[clip(p_u), C] per user: the bias rides along as a constant feature."""
    factors = user_factors.astype(np.float64)
    clipped = clip_rows(factors, max_norm) if clip else factors
    return np.hstack([clipped, np.full((len(clipped), 1), max_norm)])


def ad_statistics(rows: Rows, user_factors: np.ndarray, num_ads: int, settings: ALSSettings) -> dict[str, np.ndarray]:
    """The shard's sufficient statistics for the ad step (before any noise), as in the module
    docstring; "sparse": those of the ads the rows touch (ALS_ADS, ascending), Gramians packed."""
    touched = None
    if settings.sparse:
        touched, column = np.unique(rows.ad, return_inverse=True)
        rows, num_ads = Rows(rows.user, column.reshape(-1), rows.label, rows.num_users), len(touched)
    p_aug = augmented(user_factors, settings.user_clip, settings.clip)
    weight = rows.user_weights(settings.max_rows)
    dim = p_aug.shape[1]
    weighted = p_aug * weight[:, None]
    # the target's bias coordinate (C x positives) is released on its own, as a count: the factor
    # coordinates then carry noise of scale C instead of sqrt(2) C
    stats: Arrays = {ALS_USER_GRAM: weighted.T @ p_aug, ALS_TARGET: _row_sums(rows, rows.label, num_ads).T @ weighted[:, :-1]}
    row_weight = weight[rows.user]
    stats[ALS_POSITIVES] = np.bincount(rows.ad, weights=row_weight * rows.label, minlength=num_ads)
    if settings.gram_mode in ("per-ad", "sparse"):
        # A_a = sum_u (rows of u on a) c_u p~ p~^T: one sparse product per chunk of users
        row_counts = _row_sums(rows, np.ones(len(rows.ad)), num_ads)
        packed = np.zeros((num_ads, dim * (dim + 1) // 2))
        for users in _user_chunks(rows.num_users):
            packed += row_counts[users].T @ _upper_outer(weighted[users], p_aug[users])
        if touched is not None:
            stats[ALS_ADS], stats[ALS_GRAM_UPPER] = touched, packed
        else:
            stats[ALS_GRAM] = _from_upper(packed, dim)
    else:
        stats[ALS_COUNT] = np.bincount(rows.ad, weights=row_weight, minlength=num_ads)
    return stats


def popularity_statistics(rows: Rows, num_ads: int, max_rows: int | None) -> dict[str, np.ndarray]:
    """A popularity release before noise: each ad's positives, a user's rows weighing
    min(1, sqrt(max_rows / rows)) as in ad_statistics (the DP-popularity floor counts the same)."""
    weight = rows.user_weights(max_rows)[rows.user]
    return {ALS_POSITIVES: np.bincount(rows.ad, weights=weight * rows.label, minlength=num_ads)}


def symmetric_noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian noise on the upper triangle (diagonal included) of the last two axes, mirrored:
    releasing a symmetric statistic's upper triangle is enough, and its sensitivity is no larger."""
    noise = rng.normal(0.0, std, size=shape)
    upper = np.triu(noise)
    return upper + np.swapaxes(np.triu(noise, 1), -1, -2)


def add_noise(stats: dict[str, np.ndarray], stds: dict[str, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    noisy = {}
    for key, value in stats.items():
        if key in (ALS_GRAM, ALS_USER_GRAM):
            noisy[key] = value + symmetric_noise(rng, value.shape, stds[key])
        else:
            noisy[key] = value + rng.normal(0.0, stds[key], size=value.shape)
    return noisy


def solve_ads(
    stats: dict[str, np.ndarray], settings: ALSSettings, noise_stds: dict[str, float] | None = None, tags: np.ndarray | None = None,
    num_ads: int | None = None,
) -> dict[str, np.ndarray]:
    """Ad step from summed (possibly noisy) statistics: ridge per ad, made positive definite.

    `noise_stds`: std per coordinate of the noise in each summed statistic (None without DP).
    The ridge grows with the target's noise (`noise_ridge` per unit of std), and eigenvalues are
    floored at the per-ad Gramians' noise level (a symmetric Gaussian D x D matrix has spectral
    norm about 2 sqrt(D) std): the solve never amplifies noise beyond what the ridge allows.
    `tags`: the catalog's public [ads, tags] features (shared/catalog_features.py: membership
    weighted by how informative each tag is), for the content prior of count shrinkage: an ad
    takes `prior_weight` x the mean factors of its tags where its own count cannot place it.
    Count shrinkage: an ad's factors weigh n_a / (n_a + kappa), kappa = `count_shrinkage` noise
    stds of the summed count n_a (public: the releases' noise multipliers): an ad seen by no more
    users than the noise in its count has factors made mostly of noise, and the rule holds at
    every epsilon and for every catalog without tuning (docs/PRIVACY.md, "Settings").
    `num_ads`: the catalog's size, which a sparse release's statistics do not tell.
    """
    if settings.sparse:
        if num_ads is None:
            raise ValueError("solving a sparse release needs the catalog's size (num_ads)")
        return _solve_touched(stats, settings, num_ads)
    noise_stds = noise_stds or {}
    user_gram = _symmetrize(stats[ALS_USER_GRAM])
    dim = user_gram.shape[0]
    if settings.gram_mode == "per-ad":
        per_ad = _symmetrize(stats[ALS_GRAM])
        bias_entries = per_ad[:, -1, -1]
    else:
        users = weighted_users(user_gram, settings.user_clip)
        counts = np.maximum(stats[ALS_COUNT], 0.0)
        # ad a's Gramian is n_a x the average user Gramian G / users: never built ([ads, D, D]
        # float64 is 8.7 GB at a million ads), every ad's system is a multiple of G (_ridge_scaled)
        bias_entries = counts * (float(user_gram[-1, -1]) / users)
    # without DP (per-ad Gramians, c_u = 1) the bias entries are exact: A_a's is n_a C^2, G's N C^2
    alpha0 = settings.alpha0 if settings.alpha0 is not None else density_alpha0(
        float(np.maximum(bias_entries, 0.0).sum()), float(user_gram[-1, -1]), len(bias_entries))
    floor = (settings.ad_l2 + settings.noise_ridge * noise_stds.get(ALS_TARGET, 0.0)
             + 2.0 * math.sqrt(dim) * noise_stds.get(ALS_GRAM, 0.0))
    target = np.hstack([stats[ALS_TARGET], settings.user_clip * stats[ALS_POSITIVES][:, None]])
    if settings.gram_mode == "per-ad":
        coef = _ridge(per_ad + alpha0 * user_gram[None], target, floor)
    else:
        coef = _ridge_scaled(counts / users + alpha0, user_gram, target, floor)
    weight = own_factor_weights(bias_entries / settings.user_clip**2, settings, noise_stds)
    if weight is not None:
        # noisy counts as a prior: an ad seen by few users has factors mostly made of noise;
        # it leans on prior_weight x the mean of its catalog tags' factors (attributes, genres, category), each
        # solved from the summed statistics of every ad with that tag, so from many users and
        # little noise (public tags: post-processing, no extra privacy cost); without tags, on
        # nothing: its score is then its bias, the ad's (noisy) popularity
        coef[:, :-1] *= weight[:, None]
        if tags is not None:
            if settings.gram_mode == "per-ad":
                tag_lhs = (tags.T @ per_ad.reshape(len(per_ad), -1)).reshape(-1, dim, dim)
                tag_coef = _ridge(tag_lhs + alpha0 * user_gram[None], tags.T @ target, floor)
            else:
                tag_coef = _ridge_scaled(tags.T @ counts / users + alpha0, user_gram, tags.T @ target, floor)
            tag_mass = tags.sum(axis=1, keepdims=True)
            prior = (tags / np.where(tag_mass > 0, tag_mass, 1.0)) @ tag_coef[:, :-1]
            # at full weight a rare ad scores like a popular one with its tags, and crowds the top
            # of a full ranking; a small share orders rare ads among themselves (prior_weight)
            coef[:, :-1] += settings.prior_weight * (1.0 - weight[:, None]) * prior
    return {AD_FACTORS: coef[:, :-1].astype(np.float32), AD_BIAS: (coef[:, -1] * settings.user_clip).astype(np.float32)}


def _solve_touched(stats: dict[str, np.ndarray], settings: ALSSettings, num_ads: int) -> dict[str, np.ndarray]:
    """solve_ads of exact statistics for the touched ads (ALS_ADS, any order), in chunks of
    CHUNK_ADS (an LU solve each: no noise to floor eigenvalues against). Every other ad's system
    has A_a = 0 and t_a = 0, so its factors and bias are 0, as the dense per-ad solve gives them."""
    user_gram = _symmetrize(stats[ALS_USER_GRAM])
    dim = user_gram.shape[0]
    ads, upper = stats[ALS_ADS].astype(np.intp), stats[ALS_GRAM_UPPER]
    alpha0 = settings.alpha0 if settings.alpha0 is not None else density_alpha0(
        float(np.maximum(upper[:, -1], 0.0).sum()), float(user_gram[-1, -1]), num_ads)  # packed's last: the bias entry
    coef = np.zeros((num_ads, dim))
    for start, grams in zip(range(0, len(ads), CHUNK_ADS), unpacked_chunks(upper, dim), strict=True):
        part = slice(start, start + CHUNK_ADS)
        target = np.hstack([stats[ALS_TARGET][part], settings.user_clip * stats[ALS_POSITIVES][part, None]]).astype(np.float64)
        # exact statistics: A_a + alpha0 G is positive semi-definite, so with the ridge an LU solve
        # gives _ridge's answer (to 1e-14) at a fifth of an eigendecomposition's time; a chunk whose
        # systems are not all positive definite (the replies were checked PSD, so float rounding at
        # worst) is solved as _ridge solves it, its eigenvalues floored
        lhs = grams + alpha0 * user_gram[None]
        system = lhs + settings.ad_l2 * np.eye(dim)
        try:
            np.linalg.cholesky(system)
            coef[ads[part]] = np.linalg.solve(system, target[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            coef[ads[part]] = _ridge(lhs, target, settings.ad_l2)
    return {AD_FACTORS: coef[:, :-1].astype(np.float32), AD_BIAS: (coef[:, -1] * settings.user_clip).astype(np.float32)}


class TouchedSum:
    """The running float64 sum of sparse releases: each ad's row is kept once, in the order the ads
    first arrive, in buffers that double as the union of touched ads grows, up to the catalog
    (one reply's ads are distinct, so a fancy-indexed add is exact); memory: the union's rows,
    not the catalog's (and a copy while a buffer grows)."""

    def __init__(self, num_ads: int) -> None:
        self.num_ads = num_ads
        self._slot = np.full(num_ads, -1, dtype=np.int64)  # each ad's row in the buffers, -1: none yet
        self._ads = np.zeros(0, dtype=np.int64)
        self._size = 0
        self._rows: dict[str, np.ndarray] = {}
        self._whole: dict[str, np.ndarray] = {}

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        ads = arrays[ALS_ADS].astype(np.int64)
        new = ads[self._slot[ads] < 0]
        self._grow(self._size + len(new))
        self._slot[new] = np.arange(self._size, self._size + len(new))
        self._ads[self._size:self._size + len(new)] = new
        self._size += len(new)
        where = self._slot[ads]
        for key, value in arrays.items():
            if key in SPARSE_PER_AD:
                if key not in self._rows:
                    self._rows[key] = np.zeros((len(self._ads), *value.shape[1:]))
                self._rows[key][where] += value
            elif key != ALS_ADS:
                if key in self._whole:
                    self._whole[key] += value
                else:
                    self._whole[key] = value.astype(np.float64)

    def _grow(self, needed: int) -> None:
        if needed <= len(self._ads):
            return
        capacity = min(max(needed, 2 * len(self._ads), 1024), self.num_ads)
        self._ads = np.concatenate([self._ads, np.zeros(capacity - len(self._ads), dtype=np.int64)])
        for key, rows in self._rows.items():
            grown = np.zeros((capacity, *rows.shape[1:]))
            grown[:len(rows)] = rows
            self._rows[key] = grown

    def total(self) -> dict[str, np.ndarray]:
        """The summed sparse statistics (views of the buffers: the ads in arrival order)."""
        rows = {key: value[:self._size] for key, value in self._rows.items()}
        return {ALS_ADS: self._ads[:self._size], **rows, **self._whole}


def over_union(releases: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Sparse releases with their rows over the union of the ads any of them touched (zero where
    one did not): what the median clip compares merchant by merchant, ad by ad."""
    union = np.unique(np.concatenate([release[ALS_ADS] for release in releases])).astype(np.int64)
    spread = []
    for release in releases:
        where = np.searchsorted(union, release[ALS_ADS])
        out = {ALS_ADS: union}
        for key, value in release.items():
            if key in SPARSE_PER_AD:
                out[key] = np.zeros((len(union), *value.shape[1:]), dtype=value.dtype)
                out[key][where] = value
            elif key != ALS_ADS:
                out[key] = value
        spread.append(out)
    return spread


def packed_gram_traces(upper: np.ndarray, dim: int) -> np.ndarray:
    """Each packed Gramian's trace of its factor block (the first `dim` diagonal entries)."""
    first, second = np.triu_indices(dim + 1)
    return upper[:, np.flatnonzero((first == second) & (first < dim))].sum(axis=1)


def packed_norm_weights(packed: int) -> np.ndarray:
    """Per packed entry, sqrt(how often it appears in the full symmetric matrix): 1 on the
    diagonal, sqrt(2) off it, so a packed Gramian's norm is the dense one's (Frobenius)."""
    dim = int(round((math.sqrt(8 * packed + 1) - 1) / 2))
    first, second = np.triu_indices(dim)
    return np.where(first == second, 1.0, math.sqrt(2.0))


def unpacked_chunks(upper: np.ndarray, dim: int) -> Iterator[np.ndarray]:
    """[<= CHUNK_ADS, D, D] symmetric matrices from packed upper triangles, a chunk at a time."""
    for start in range(0, len(upper), CHUNK_ADS):
        yield _from_upper(upper[start:start + CHUNK_ADS].astype(np.float64), dim)


def weighted_users(user_gram: np.ndarray, user_clip: float) -> float:
    """The summed user Gramian's sum of user weights c_u (its bias entry over C^2: the bias
    feature is C), at least 1 (a noisy entry can be tiny or negative)."""
    return max(float(user_gram[-1, -1]) / user_clip**2, 1.0)


def own_factor_weights(counts: np.ndarray, settings: ALSSettings, noise_stds: dict[str, float]) -> np.ndarray | None:
    """Each ad's weight on its own solved factors, n / (n + kappa) with kappa = count_shrinkage
    noise stds of the summed counts n (None: no shrinkage, exact statistics or none asked)."""
    count_std = count_noise_std(settings, noise_stds)
    if settings.count_shrinkage <= 0 or count_std <= 0:
        return None
    counts = np.maximum(counts, 0.0)
    return counts / (counts + settings.count_shrinkage * count_std)


def ads_statistics_counts(stats: dict[str, np.ndarray], settings: ALSSettings) -> np.ndarray:
    """Each ad's summed (noisy) count of weighted users, from either gram mode's statistics."""
    if settings.gram_mode == "shared":
        return stats[ALS_COUNT]
    return stats[ALS_GRAM][:, -1, -1] / settings.user_clip**2


def count_noise_std(settings: ALSSettings, noise_stds: dict[str, float]) -> float:
    """The noise std of each ad's summed count as solve_ads reads it: the count statistic
    ("shared"), or the bias-bias entry of the per-ad Gramian over C^2 ("per-ad")."""
    if settings.gram_mode == "shared":
        return noise_stds.get(ALS_COUNT, 0.0)
    return noise_stds.get(ALS_GRAM, 0.0) / settings.user_clip**2


def _symmetrize(matrix: np.ndarray) -> np.ndarray:
    return 0.5 * (matrix + np.swapaxes(matrix, -1, -2))


def check_statistics(stats: dict[str, np.ndarray], settings: ALSSettings, num_ads: int, dim: int, release: str = STATISTICS) -> None:
    """Exactly this release's statistics, the catalog's shapes, finite values (a client's reply);
    a sparse release's ads distinct, ascending catalog indices."""
    touched = None
    if settings.sparse and ALS_ADS in stats:
        ads = stats[ALS_ADS]
        if ads.ndim != 1 or ads.dtype.kind not in "iu":
            raise ValueError(f"ALS statistic {ALS_ADS} must be a vector of ad indices, got {ads.dtype} of shape {ads.shape}")
        # comparisons, not np.diff: a difference of two indices can wrap around in their dtype
        if len(ads) and (int(ads.min()) < 0 or int(ads.max()) >= num_ads or not np.all(ads[1:] > ads[:-1])):
            raise ValueError(f"ALS statistic {ALS_ADS} must hold distinct ascending ad indices in [0, {num_ads})")
        touched = len(ads)
    expected = settings.stat_shapes(num_ads, dim, release, touched)
    if set(stats) != set(expected):
        raise ValueError(f"ALS statistics must be exactly {sorted(expected)}, got {sorted(stats)}")
    for key, shape in expected.items():
        if tuple(stats[key].shape) != shape:
            raise ValueError(f"ALS statistic {key} has shape {tuple(stats[key].shape)}, expected {shape}")
        if not np.all(np.isfinite(stats[key])):
            raise ValueError(f"ALS statistic {key} holds non-finite values")


def round_budget_shares(rounds: int, growth: float) -> np.ndarray:
    """Share of a client's DP budget (in 1 / sigma^2, which adds up exactly for Gaussian RDP)
    spent in each of `rounds` rounds: later rounds, which start from better ad factors, get more."""
    weights = growth ** np.arange(rounds, dtype=np.float64)
    return weights / weights.sum()


def release_budget_shares(rounds: int, growth: float) -> np.ndarray:
    """A private ALS run's plan: the popularity release first (POPULARITY_SHARE; all of the
    budget in a run of one round), then rounds - 1 releases of statistics (round_budget_shares)."""
    if rounds == 1:
        return np.ones(1)
    return np.concatenate([[POPULARITY_SHARE], (1.0 - POPULARITY_SHARE) * round_budget_shares(rounds - 1, growth)])


def popularity_signal(positives: np.ndarray, std: float, whole_budget_std: float) -> float:
    """The popularity rule's signal (POPULARITY_MIN_SIGNAL) from noisy summed positive counts
    with noise `std` per ad: sum n^2 / sum n, each sum corrected for the noise (E[x^2] = n^2 +
    std^2), in units of `whole_budget_std` (the noise of counts released with the whole budget)."""
    total = float(positives.sum())
    energy = float(np.square(positives).sum()) - len(positives) * std**2
    if total <= 0 or energy <= 0 or whole_budget_std <= 0:
        return 0.0 if whole_budget_std > 0 else math.inf
    return energy / total / whole_budget_std


def popularity_model(positives: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """Ranking by popularity: no factors, each ad's bias its (noisy) count over the largest."""
    scale = max(float(np.max(np.abs(positives), initial=0.0)), 1e-12)
    return {AD_FACTORS: np.zeros((len(positives), dim), dtype=np.float32), AD_BIAS: (positives / scale).astype(np.float32)}


def lean_on_popularity(
    arrays: dict[str, np.ndarray], positives: np.ndarray, user_gram: np.ndarray, user_clip: float, lean: float
) -> dict[str, np.ndarray]:
    """Each ad's bias plus `lean` spreads of the scores times its standardized noisy popularity.
    The spread: the scores' std over users and ads, sqrt(mean over ads of q_a' P q_a + the
    biases' variance), P the users' average (weighted) second moment of their clipped factors,
    read from the summed user Gramian."""
    if lean <= 0 or float(np.std(positives)) == 0.0:
        return arrays
    gram = _symmetrize(user_gram)
    dim = gram.shape[0] - 1
    moment = gram[:dim, :dim] / weighted_users(gram, user_clip)
    factors = arrays[AD_FACTORS].astype(np.float64)
    personal = max(float(np.mean(np.einsum("ai,ij,aj->a", factors, moment, factors))), 0.0)
    spread = math.sqrt(personal + float(np.var(arrays[AD_BIAS].astype(np.float64))))
    standardized = (positives - positives.mean()) / positives.std()
    bias = arrays[AD_BIAS].astype(np.float64) + lean * spread * standardized
    return {**arrays, AD_BIAS: bias.astype(np.float32)}


def _ridge(lhs: np.ndarray, target: np.ndarray, floor: float) -> np.ndarray:
    """Solve lhs_a x_a = target_a per row after flooring lhs_a's eigenvalues: (max(0, eig) + floor)."""
    values, vectors = np.linalg.eigh(lhs)
    values = np.maximum(values, 0.0) + floor
    return (vectors @ (np.einsum("aji,aj->ai", vectors, target) / values)[:, :, None])[:, :, 0]


def _ridge_scaled(scale: np.ndarray, gram: np.ndarray, target: np.ndarray, floor: float) -> np.ndarray:
    """_ridge for lhs_a = scale_a x gram (scale_a >= 0): every lhs_a has gram's eigenvectors and
    scale_a x its eigenvalues, so one eigendecomposition serves every row, in O(rows x D^2) time
    and memory instead of O(rows x D^3) and O(rows x D^2) per-row matrices. Rows go CHUNK_ADS at
    a time: the temporaries then stay in the CPU's cache (a million ads: 0.25 s instead of 1-2 s,
    docs/BENCHMARKS.md "Scale")."""
    values, vectors = np.linalg.eigh(gram)
    solved = np.empty(target.shape)
    for start in range(0, len(target), CHUNK_ADS):
        part = slice(start, start + CHUNK_ADS)
        floored = np.maximum(scale[part, None] * values[None, :], 0.0) + floor
        solved[part] = ((target[part] @ vectors) / floored) @ vectors.T
    return solved
