"""NeuMF's global parameters as arrays (numpy only): names, shapes, initialization, scoring.

NeuMF (He et al., WWW 2017) fuses two towers over a user's and an ad's embeddings:
    GMF:  p_g * q_g (element-wise)
    MLP:  ReLU layers over [p_m, q_m]
    score(u, a) = w . [GMF, MLP] + b + b_a
The user embeddings p = [p_g, p_m] are the merchant's (its user step, never released); every
array here is global: the ad embeddings q_g, q_m and biases b_a, the MLP tower, the output layer.
With the content tower an ad's embeddings add a learned projection of its public content
embedding (`ad_content`, shared/content.content_embedding), which the server computes once from
the catalog and sends with the model; nobody trains it.

The torch module (shared/neumf.py) trains these; the server, the evaluation and serving only
score with them, here, without torch. Scoring folds the first MLP layer into per-user and
per-ad terms (W [p_m, q_m] = W_u p_m + W_a q_m), so every (user, ad) pair costs only the later
layers.
"""

from __future__ import annotations

import numpy as np

from shared.wire import (
    AD_BIAS,
    NEUMF_CONTENT,
    NEUMF_CONTENT_GMF,
    NEUMF_CONTENT_MLP,
    NEUMF_GMF,
    NEUMF_MLP,
    NEUMF_OUTPUT_BIAS,
    NEUMF_OUTPUT_WEIGHT,
    Arrays,
)

Shapes = dict[str, tuple[int, ...]]
EMBEDDING_STD = 0.1  # as MF's ad factors start (shared/params.init_global_arrays)
SCORE_CHUNK_FLOATS = 1 << 24  # a scoring chunk's hidden activations: users x ads x width floats


def layer_weight(index: int) -> str:
    return f"mlp_{index}_weight"


def layer_bias(index: int) -> str:
    return f"mlp_{index}_bias"


def neumf_shapes(num_ads: int, dim: int, layers: tuple[int, ...], content_dim: int = 0) -> Shapes:
    """Every global array's shape; `content_dim` 0: no content tower."""
    shapes: Shapes = {NEUMF_GMF: (num_ads, dim), NEUMF_MLP: (num_ads, dim), AD_BIAS: (num_ads,)}
    width = 2 * dim
    for index, out in enumerate(layers):
        shapes[layer_weight(index)] = (out, width)
        shapes[layer_bias(index)] = (out,)
        width = out
    shapes[NEUMF_OUTPUT_WEIGHT] = (1, dim + width)
    shapes[NEUMF_OUTPUT_BIAS] = (1,)
    if content_dim:
        shapes[NEUMF_CONTENT] = (num_ads, content_dim)
        shapes[NEUMF_CONTENT_GMF] = (dim, content_dim)
        shapes[NEUMF_CONTENT_MLP] = (dim, content_dim)
    return shapes


def layer_widths(arrays: Arrays) -> tuple[int, ...]:
    """The MLP tower's hidden widths, read off the arrays' layers."""
    widths: list[int] = []
    while layer_weight(len(widths)) in arrays:
        widths.append(int(arrays[layer_weight(len(widths))].shape[0]))
    return tuple(widths)


def content_width(arrays: Arrays) -> int:
    """The content embedding's width; 0 without the content tower."""
    return int(arrays[NEUMF_CONTENT].shape[1]) if NEUMF_CONTENT in arrays else 0


def shapes_of(arrays: Arrays) -> Shapes:
    """The shapes a NeuMF model with these arrays' dimensions has (to check a stored model)."""
    num_ads, dim = arrays[NEUMF_GMF].shape
    return neumf_shapes(num_ads, dim, layer_widths(arrays), content_width(arrays))


def init_neumf_arrays(num_ads: int, dim: int, layers: tuple[int, ...], seed: int, content: np.ndarray | None = None) -> Arrays:
    """Embeddings N(0, 0.1^2); each layer as torch's nn.Linear starts one (weight and bias uniform
    in +-1/sqrt(its input width)); the content projections at zero (the model starts as plain
    NeuMF and learns what content adds)."""
    rng = np.random.default_rng(seed)
    content_dim = 0 if content is None else content.shape[1]
    shapes = neumf_shapes(num_ads, dim, layers, content_dim)
    arrays: Arrays = {
        NEUMF_GMF: EMBEDDING_STD * rng.standard_normal(shapes[NEUMF_GMF]),
        NEUMF_MLP: EMBEDDING_STD * rng.standard_normal(shapes[NEUMF_MLP]),
        AD_BIAS: np.zeros(num_ads),
    }
    linear = [(layer_weight(i), layer_bias(i)) for i in range(len(layers))] + [(NEUMF_OUTPUT_WEIGHT, NEUMF_OUTPUT_BIAS)]
    for weight, bias in linear:
        bound = 1.0 / np.sqrt(shapes[weight][1])
        arrays[weight] = rng.uniform(-bound, bound, size=shapes[weight])
        arrays[bias] = rng.uniform(-bound, bound, size=shapes[bias])
    if content is not None:
        arrays[NEUMF_CONTENT] = content
        arrays[NEUMF_CONTENT_GMF] = np.zeros(shapes[NEUMF_CONTENT_GMF])
        arrays[NEUMF_CONTENT_MLP] = np.zeros(shapes[NEUMF_CONTENT_MLP])
    return {key: value.astype(np.float32) for key, value in arrays.items()}


def ad_embeddings(arrays: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """Each ad's GMF and MLP embeddings: its own, plus its content's projection."""
    gmf, mlp = arrays[NEUMF_GMF], arrays[NEUMF_MLP]
    if NEUMF_CONTENT in arrays:
        content = arrays[NEUMF_CONTENT]
        gmf = gmf + content @ arrays[NEUMF_CONTENT_GMF].T
        mlp = mlp + content @ arrays[NEUMF_CONTENT_MLP].T
    return gmf, mlp


def neumf_scores(user_vectors: np.ndarray, arrays: Arrays) -> np.ndarray:
    """Scores [U, ads] of users whose vectors are [p_g, p_m] ([U, 2 x dim])."""
    dim = arrays[NEUMF_GMF].shape[1]
    gmf_users, mlp_users = user_vectors[:, :dim].astype(np.float32), user_vectors[:, dim:].astype(np.float32)
    gmf_ads, mlp_ads = ad_embeddings(arrays)
    output = arrays[NEUMF_OUTPUT_WEIGHT][0]
    scores = (gmf_users * output[:dim]) @ gmf_ads.T + arrays[AD_BIAS][None, :] + arrays[NEUMF_OUTPUT_BIAS][0]
    layers = len(layer_widths(arrays))
    first = arrays[layer_weight(0)]
    user_part = mlp_users @ first[:, :dim].T + arrays[layer_bias(0)]  # [U, h1]
    ad_part = mlp_ads @ first[:, dim:].T  # [A, h1]
    chunk = max(1, SCORE_CHUNK_FLOATS // max(ad_part.shape[0] * ad_part.shape[1], 1))
    for start in range(0, len(user_part), chunk):
        hidden = np.maximum(user_part[start : start + chunk, None, :] + ad_part[None, :, :], 0.0)
        for index in range(1, layers):
            hidden = np.maximum(hidden @ arrays[layer_weight(index)].T + arrays[layer_bias(index)], 0.0)
        scores[start : start + chunk] += hidden @ output[dim:]
    return scores
