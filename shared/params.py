"""The global, released parameters: names, shapes, initialization, fingerprint (numpy only).

The server side needs only this, not the torch model: keeping torch and Opacus out of the
ServerApp's imports saves seconds of start-up in every run (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

from shared.catalog_features import informative_tags
from shared.data.schema import AdCatalog
from shared.wire import AD_BIAS, AD_FACTORS, GLOBAL_KEYS, Arrays


def check_global_arrays(arrays: Arrays, num_ads: int, dim: int) -> None:
    """Exactly the global keys, the catalog's shapes, finite values."""
    if set(arrays) != set(GLOBAL_KEYS):
        raise ValueError(f"global parameters must be exactly {GLOBAL_KEYS}, got {sorted(arrays)}")
    expected = {AD_FACTORS: (num_ads, dim), AD_BIAS: (num_ads,)}
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise ValueError(f"global parameter {key} has shape {tuple(arrays[key].shape)}, expected {shape}")
        if not np.all(np.isfinite(arrays[key])):
            raise ValueError(f"global parameter {key} holds non-finite values")


def init_global_arrays(num_ads: int, dim: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        AD_FACTORS: (0.1 * rng.standard_normal((num_ads, dim))).astype(np.float32),
        AD_BIAS: np.zeros(num_ads, dtype=np.float32),
    }


def catalog_init_arrays(tag_features: np.ndarray, dim: int, seed: int) -> Arrays:
    """Ad factors from the public catalog alone: each informative tag a random direction, every
    ad the normalized weighted sum of its tags' (shared/catalog_features.py), so ads with the
    same tags start alike and ads sharing some tags start close. Users' first factors then
    describe their taste in tags, and the first round's statistics already carry signal (a
    public warm start; no user data involved). An ad without an informative tag, or every ad
    of a catalog without one, starts from its own random direction, as `init = "random"`."""
    rng = np.random.default_rng(seed)
    num_ads = len(tag_features)
    own = rng.standard_normal((num_ads, dim))
    combined = tag_features @ rng.standard_normal((tag_features.shape[1], dim))
    bare = np.linalg.norm(combined, axis=1) == 0
    combined[bare] = own[bare]
    directions = combined / np.linalg.norm(combined, axis=1, keepdims=True)
    return {AD_FACTORS: (0.3 * directions).astype(np.float32), AD_BIAS: np.zeros(num_ads, dtype=np.float32)}


def initial_arrays(kind: str, catalog: AdCatalog, dim: int, seed: int) -> Arrays:
    """The run's starting global parameters (run config `init`: "random" or "catalog")."""
    if kind == "catalog":
        return catalog_init_arrays(informative_tags(catalog, "catalog warm start"), dim, seed)
    return init_global_arrays(len(catalog), dim, seed)


def score_all(user_vectors: np.ndarray, arrays: Arrays) -> np.ndarray:
    """Scores of the given users against every ad: [U, num_ads]."""
    return user_vectors @ arrays[AD_FACTORS].T + arrays[AD_BIAS][None, :]


def digest(arrays: Arrays) -> str:
    """A fingerprint of parameter values (sha256 over sorted keys, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()
