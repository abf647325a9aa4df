"""The global, released parameters: names, shapes, initialization, fingerprint (numpy only).

MF's are the ad factors and biases; NeuMF's (mf-solver = "neumf") its ad embeddings, towers and
output layer (shared/neumf_arrays.py). A user's vector is whatever the model's user side needs:
MF's factors, or NeuMF's two embeddings side by side.

The server side needs only this, not the torch model: keeping torch and Opacus out of the
ServerApp's imports saves seconds of start-up in every run (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

from shared.catalog_features import informative_tags
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.neumf_arrays import Shapes, init_neumf_arrays, neumf_scores, neumf_shapes, shapes_of
from shared.wire import AD_BIAS, AD_FACTORS, GLOBAL_KEYS, NEUMF_CONTENT, NEUMF_GMF, Arrays

# global arrays nobody trains: the server's copy stands after every aggregation (a reply's, even
# a merchant's altered one, never moves it; nor does FedAvg's float32 rounding of equal copies)
PUBLIC_CONSTANT_KEYS = (NEUMF_CONTENT,)


def mf_shapes(num_ads: int, dim: int) -> Shapes:
    return {AD_FACTORS: (num_ads, dim), AD_BIAS: (num_ads,)}


def global_shapes(cfg: RunConfig, num_ads: int) -> Shapes:
    """The shapes of the run's global parameters."""
    if cfg.mf_solver == "neumf":
        return neumf_shapes(num_ads, cfg.factors, cfg.mlp_layers, cfg.content_dim if cfg.neumf_content else 0)
    return mf_shapes(num_ads, cfg.factors)


def stored_shapes(arrays: Arrays) -> Shapes:
    """The shapes of a model of these arrays' kind and dimensions (to check a stored model)."""
    if NEUMF_GMF in arrays:
        return shapes_of(arrays)
    return mf_shapes(*arrays[AD_FACTORS].shape) if AD_FACTORS in arrays else {key: () for key in GLOBAL_KEYS}


def user_dim(arrays: Arrays) -> int:
    """The width of a user's vector against this model."""
    if NEUMF_GMF in arrays:
        return 2 * arrays[NEUMF_GMF].shape[1]
    return int(arrays[AD_FACTORS].shape[1])


def check_global_arrays(arrays: Arrays, expected: Shapes) -> None:
    """Exactly the expected keys (global_shapes), their shapes, finite values."""
    if set(arrays) != set(expected):
        raise ValueError(f"global parameters must be exactly {sorted(expected)}, got {sorted(arrays)}")
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


def with_public_constants(aggregated: Arrays, sent: Arrays) -> Arrays:
    """The aggregate with every public constant array as the server sent it."""
    return {**aggregated, **{key: sent[key] for key in PUBLIC_CONSTANT_KEYS if key in sent}}


def initial_model(cfg: RunConfig, catalog: AdCatalog) -> Arrays:
    """The run's starting global parameters, for its model."""
    if cfg.mf_solver != "neumf":
        return initial_arrays(cfg.init, catalog, cfg.factors, cfg.seed)
    content = None
    if cfg.neumf_content:
        from shared.content import content_embedding, content_features  # scipy: only the content tower needs it

        content = content_embedding(content_features(catalog), cfg.content_dim)
    return init_neumf_arrays(len(catalog), cfg.factors, cfg.mlp_layers, cfg.seed, content)


def score_all(user_vectors: np.ndarray, arrays: Arrays) -> np.ndarray:
    """Scores of the given users against every ad: [U, num_ads]."""
    if NEUMF_GMF in arrays:
        return neumf_scores(user_vectors, arrays)
    return user_vectors @ arrays[AD_FACTORS].T + arrays[AD_BIAS][None, :]


def digest(arrays: Arrays) -> str:
    """A fingerprint of parameter values (sha256 over sorted keys, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()
