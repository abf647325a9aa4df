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
