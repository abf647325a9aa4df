"""Public ad content as sparse features: the cheap offline default of the content tower (issue 17).

An ad's content is what its public catalog says: category, brand, tags (attributes, genres) and
title. Each becomes one block of a sparse [ads, features] matrix:
- category, brand, tags: one column per distinct value in the catalog (the catalog is public);
- title words and title character n-grams (3 to 5 characters of each word padded with "<" and
  ">", as fastText builds subwords, Bojanowski et al. 2017): hashed into a fixed number of
  columns with a signed hash (the feature-hashing trick, Weinberger et al. 2009, as
  scikit-learn's HashingVectorizer does), so unseen words and misspellings still land on
  shared columns and the width is fixed whatever the vocabulary.
The hash is BLAKE2b of the namespaced token, not Python's salted `hash`: the same title gives the
same columns in every process, on every machine, offline. Each block's rows are L2-normalized,
so a long title weighs no more than a category. The catalog is public: the server embeds it once
and caches it by the catalog's fingerprint (`cached_content_features`); no user data is read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from shared.data.schema import UNKNOWN_CATEGORY, AdCatalog

WORD = re.compile(r"[a-z0-9]+")
BLOCKS = ("category", "brand", "tags", "title_words", "title_chars")


@dataclass(frozen=True)
class ContentSpec:
    """Widths of the hashed title blocks and the character n-gram lengths."""

    word_buckets: int = 2**12
    char_buckets: int = 2**13
    char_ngrams: tuple[int, int] = (3, 5)  # shortest and longest, inclusive


@dataclass(frozen=True)
class ContentFeatures:
    """[ads, features] float32 CSR matrix, and which columns each block holds."""

    matrix: sp.csr_array
    blocks: dict[str, slice]

    def block(self, name: str) -> sp.csr_array:
        return sp.csr_array(self.matrix[:, self.blocks[name]])


def title_words(title: str | None) -> list[str]:
    """Lower-case alphanumeric words of a title (none for a missing title)."""
    return WORD.findall(title.lower()) if title else []


def char_ngrams(word: str, shortest: int, longest: int) -> list[str]:
    """The word's character n-grams, padded as fastText pads them ("<" before, ">" after)."""
    padded = f"<{word}>"
    return [padded[i:i + n] for n in range(shortest, longest + 1) for i in range(len(padded) - n + 1)]


def hashed_column(token: str, namespace: str, buckets: int) -> tuple[int, float]:
    """The token's column in [0, buckets) and its sign (+1 or -1): colliding tokens cancel
    on average instead of adding up (the signed hashing trick)."""
    digest = hashlib.blake2b(f"{namespace}\x00{token}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % buckets, 1.0 if (value >> 63) & 1 == 0 else -1.0


def _hashed_block(tokens_per_ad: list[list[str]], namespace: str, buckets: int) -> sp.csr_array:
    rows, cols, vals = [], [], []
    for row, tokens in enumerate(tokens_per_ad):
        for token in tokens:
            column, sign = hashed_column(token, namespace, buckets)
            rows.append(row)
            cols.append(column)
            vals.append(sign)
    # COO to CSR sums repeated (row, column) pairs: a word twice in a title counts twice
    return sp.csr_array((np.array(vals, dtype=np.float64), (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64))),
                        shape=(len(tokens_per_ad), buckets))


def _vocabulary_block(values_per_ad: list[list[str]]) -> sp.csr_array:
    names = sorted({value for values in values_per_ad for value in values})
    lookup = {name: column for column, name in enumerate(names)}
    rows = [row for row, values in enumerate(values_per_ad) for _ in values]
    cols = [lookup[value] for values in values_per_ad for value in values]
    return sp.csr_array((np.ones(len(rows)), (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64))),
                        shape=(len(values_per_ad), len(names)))


def _normalize_rows(block: sp.csr_array) -> sp.csr_array:
    norms = np.sqrt(np.asarray(block.multiply(block).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_array(sp.diags_array(scale) @ block)


def content_features(catalog: AdCatalog, spec: ContentSpec | None = None) -> ContentFeatures:
    """Every ad's content features (module docstring); an ad without a value in a block has an
    all-zero row there (the unknown category carries nothing)."""
    spec = spec or ContentSpec()
    words = [title_words(title) for title in catalog.titles]
    shortest, longest = spec.char_ngrams
    parts = {
        "category": _vocabulary_block([[c] if c != UNKNOWN_CATEGORY else [] for c in catalog.categories]),
        "brand": _vocabulary_block([[b] if b else [] for b in catalog.brands]),
        "tags": _vocabulary_block([[t for t in tags if t != UNKNOWN_CATEGORY] for tags in catalog.tags]),
        "title_words": _hashed_block(words, "word", spec.word_buckets),
        "title_chars": _hashed_block([[g for w in ws for g in char_ngrams(w, shortest, longest)] for ws in words], "char", spec.char_buckets),
    }
    blocks, start = {}, 0
    for name in BLOCKS:
        blocks[name] = slice(start, start + parts[name].shape[1])
        start += parts[name].shape[1]
    matrix = sp.hstack([_normalize_rows(parts[name]) for name in BLOCKS], format="csr").astype(np.float32)
    return ContentFeatures(sp.csr_array(matrix), blocks)


def catalog_fingerprint(catalog: AdCatalog, spec: ContentSpec | None = None) -> str:
    """SHA-256 of everything the features read (ids, content, the spec): the cache key."""
    digest = hashlib.sha256(repr(spec or ContentSpec()).encode())
    for fields in zip(catalog.ad_ids, catalog.categories, catalog.brands, catalog.titles, catalog.tags):
        digest.update(repr(fields).encode())
    return digest.hexdigest()


def cached_content_features(catalog: AdCatalog, cache_dir: Path, spec: ContentSpec | None = None) -> ContentFeatures:
    """The catalog's features, computed once per catalog and spec and kept in `cache_dir`."""
    spec = spec or ContentSpec()
    path = Path(cache_dir) / f"content-{catalog_fingerprint(catalog, spec)[:24]}.npz"
    if path.exists():
        with np.load(path) as saved:
            matrix = sp.csr_array((saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"]))
            bounds = saved["bounds"]
        return ContentFeatures(matrix, {name: slice(int(a), int(b)) for name, (a, b) in zip(BLOCKS, bounds)})
    features = content_features(catalog, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    bounds = np.array([[features.blocks[name].start, features.blocks[name].stop] for name in BLOCKS])
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, data=features.matrix.data, indices=features.matrix.indices, indptr=features.matrix.indptr,
             shape=np.array(features.matrix.shape), bounds=bounds)
    partial.replace(path)  # a crash mid-write never leaves a cache entry that loads wrong
    return features


def fit_content_projection(features: sp.csr_array, fitted: np.ndarray, targets: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """[features, outputs] ridge map from content to the rows of `targets` (e.g. a trained model's
    ad factors and bias), fitted on the ads where `fitted` is True:
        W = argmin ||X_fit W - Y_fit||^2 + l2 ||W||^2, solved per output column by LSQR (damped).
    The global ad parameters are already public to every merchant, and so is the catalog: the map
    is post-processing, with no extra privacy cost. An ad with no interactions is then placed by
    its content alone (`features @ W`)."""
    from scipy.sparse.linalg import lsqr  # only the content tower needs it

    rows = sp.csr_array(features[np.flatnonzero(fitted)]).astype(np.float64)
    goal = np.asarray(targets, dtype=np.float64)[fitted]
    weights = np.zeros((features.shape[1], goal.shape[1]))
    for column in range(goal.shape[1]):
        weights[:, column] = lsqr(rows, goal[:, column], damp=float(np.sqrt(l2)), atol=1e-8, btol=1e-8, iter_lim=2000)[0]
    return weights


def content_embedding(features: ContentFeatures, dim: int) -> np.ndarray:
    """[ads, dim] dense content vectors: the top `dim` left singular directions of the sparse
    features, scaled by their singular values (a truncated SVD, LSA's embedding of documents),
    then by one constant so the mean row norm is 1. NeuMF's content tower learns its projection
    from these (client model: shared/neumf.py): a dense input keeps Opacus' per-user clipping on
    plain Linear layers. Deterministic: scipy's ARPACK started from a fixed vector. Columns past
    the features' rank stay zero."""
    from scipy.sparse.linalg import svds  # only the content tower needs it

    matrix = sp.csr_array(features.matrix).astype(np.float64)
    out = np.zeros((matrix.shape[0], dim), dtype=np.float64)
    rank = min(dim, min(matrix.shape) - 1)
    if rank >= 1 and matrix.nnz:
        start = np.full(min(matrix.shape), 1.0 / np.sqrt(min(matrix.shape)))
        left, values, _ = svds(matrix, k=rank, v0=start, random_state=0)
        order = np.argsort(values)[::-1]
        left, values = left[:, order], values[order]
        left *= np.where(left.sum(axis=0) < 0, -1.0, 1.0)  # a fixed sign per direction
        out[:, :rank] = left * values
    norms = np.linalg.norm(out, axis=1)
    mean_norm = norms[norms > 0].mean() if np.any(norms > 0) else 1.0
    return (out / mean_norm).astype(np.float32)
