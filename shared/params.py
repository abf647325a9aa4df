"""The global, released parameters: names, shapes, initialization, fingerprint (numpy only).

The server side needs only this, not the torch model: keeping torch and Opacus out of the
ServerApp's imports saves seconds of start-up in every run (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

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


def catalog_init_arrays(category_codes: np.ndarray, dim: int, seed: int) -> Arrays:
    """Ad factors from the public catalog alone: each category a random direction, every ad of
    it the same one. Users' first factors then describe their taste in categories, so the first
    round's statistics already carry signal (a public warm start; no user data involved)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((int(category_codes.max()) + 1, dim)) / np.sqrt(dim)
    return {AD_FACTORS: (0.3 * directions[category_codes]).astype(np.float32),
            AD_BIAS: np.zeros(len(category_codes), dtype=np.float32)}


def initial_arrays(kind: str, category_codes: np.ndarray, dim: int, seed: int) -> Arrays:
    """The run's starting global parameters (run config `init`: "random" or "catalog")."""
    if kind == "catalog":
        return catalog_init_arrays(category_codes, dim, seed)
    return init_global_arrays(len(category_codes), dim, seed)


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
