"""The global, released parameters' contract: names, shapes, initialization (numpy only).

The server side needs only this, not the torch model: keeping torch and Opacus out of the
ServerApp's imports saves seconds of start-up in every run (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np

GLOBAL_KEYS = ("ad_factors", "ad_bias")


def check_global_arrays(arrays: dict[str, np.ndarray], num_ads: int, dim: int) -> None:
    """Exactly the global keys, the catalog's shapes, finite values."""
    if set(arrays) != set(GLOBAL_KEYS):
        raise ValueError(f"global parameters must be exactly {GLOBAL_KEYS}, got {sorted(arrays)}")
    expected = {"ad_factors": (num_ads, dim), "ad_bias": (num_ads,)}
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise ValueError(f"global parameter {key} has shape {tuple(arrays[key].shape)}, expected {shape}")
        if not np.all(np.isfinite(arrays[key])):
            raise ValueError(f"global parameter {key} holds non-finite values")


def init_global_arrays(num_ads: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "ad_factors": (0.1 * rng.standard_normal((num_ads, dim))).astype(np.float32),
        "ad_bias": np.zeros(num_ads, dtype=np.float32),
    }


def catalog_init_arrays(category_codes: np.ndarray, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Ad factors from the public catalog alone: each category a random direction, every ad of
    it the same one. Users' first factors then describe their taste in categories, so the first
    round's statistics already carry signal (a public warm start; no user data involved)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((int(category_codes.max()) + 1, dim)) / np.sqrt(dim)
    return {"ad_factors": (0.3 * directions[category_codes]).astype(np.float32),
            "ad_bias": np.zeros(len(category_codes), dtype=np.float32)}


def initial_arrays(kind: str, category_codes: np.ndarray, dim: int, seed: int) -> dict[str, np.ndarray]:
    """The run's starting global parameters (run config `init`: "random" or "catalog")."""
    if kind == "catalog":
        return catalog_init_arrays(category_codes, dim, seed)
    return init_global_arrays(len(category_codes), dim, seed)


def score_all(user_vectors: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Scores of the given users against every ad: [U, num_ads]."""
    return user_vectors @ arrays["ad_factors"].T + arrays["ad_bias"][None, :]
