"""The arithmetic of secure aggregation that both sides share (docs/PRIVACY.md, "Secure aggregation").

Flower's SecAgg+ sums integer vectors: each merchant's vector is clipped to [-CLIPPING_RANGE,
CLIPPING_RANGE] per coordinate, mapped to integers in [0, QUANTIZATION_RANGE] by stochastic
(unbiased) rounding, masked, and summed modulo MODULUS_RANGE. A private-ALS release is made of
blocks of very different sizes (counts, Gramians, targets), so each block is first divided by
a public scale: `max-users-per-merchant` times the block's per-user sensitivity, the largest
value any coordinate of an honest merchant's exact statistic can take. Scaled, an honest
release lies in [-1, 1] before noise; the clipping range 2 leaves as much again for the noise.
The server multiplies the unmasked mean back by the number of contributors and the scale.

Quantization: a coordinate of one merchant's scaled vector moves by at most one step
2 CLIPPING_RANGE / QUANTIZATION_RANGE, with variance at most step^2 / 4 (stochastic rounding),
independently across merchants and coordinates; in a block's own units the step is
scale x that. `quantization_error` states both for a sum of n merchants.

What one merchant can move (poisoning): the server no longer sees a merchant's vector, so no
per-reply check applies; a merchant's scaled coordinate is clipped to [-CLIPPING_RANGE,
CLIPPING_RANGE] by the protocol itself, so it moves each coordinate of the sum by at most
`poisoning_bound` = CLIPPING_RANGE x scale from zero (2 CLIPPING_RANGE x scale from any honest
value of it), plus one quantization step. The operator tightens it with max-users-per-merchant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.als import ALSSettings
from shared.wire import Arrays

CLIPPING_RANGE = 2.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32  # the largest Flower 1.42 masks with
# the sum of the contributors' quantized vectors must not wrap around the modulus
MAX_MERCHANTS = MODULUS_RANGE // QUANTIZATION_RANGE - 1
ARRAY_KEYS = "array-keys"  # in the protocol's legacy FitIns config: the global arrays' keys, in the order sent


@dataclass(frozen=True)
class SecureScales:
    """Each statistic's public scale, in the order the blocks travel (sorted by key)."""

    scales: dict[str, float]

    @classmethod
    def for_release(cls, settings: ALSSettings, keys: list[str], max_users: int) -> SecureScales:
        sensitivity = settings.sensitivities()
        return cls({key: float(max_users) * sensitivity[key] for key in sorted(keys)})

    @property
    def keys(self) -> list[str]:
        return list(self.scales)

    def to_vectors(self, stats: Arrays) -> tuple[list[np.ndarray], int]:
        """The release as SecAgg+'s input (float64, each block scaled), and how many of its
        coordinates the protocol will clip (the merchant's own log says so; it is not sent)."""
        if sorted(stats) != self.keys:
            raise ValueError(f"a secure release holds {self.keys}, not {sorted(stats)}")
        vectors = [np.asarray(stats[key], dtype=np.float64) / self.scales[key] for key in self.keys]
        clipped = sum(int(np.count_nonzero(np.abs(v) > CLIPPING_RANGE)) for v in vectors)
        return vectors, clipped

    def from_mean(self, mean: list[np.ndarray], contributors: int) -> Arrays:
        """The statistics' sum from the unmasked mean of `contributors` scaled vectors."""
        if len(mean) != len(self.keys):
            raise ValueError(f"the secure sum holds {len(mean)} blocks, not {len(self.keys)}")
        return {key: np.asarray(block, dtype=np.float64) * contributors * self.scales[key] for key, block in zip(self.keys, mean)}

    def quantization_error(self, contributors: int) -> dict[str, tuple[float, float]]:
        """Per statistic: (largest error of a coordinate of the sum, its standard deviation at most)."""
        step = 2.0 * CLIPPING_RANGE / QUANTIZATION_RANGE
        return {key: (contributors * step * scale, math.sqrt(contributors) * step / 2.0 * scale) for key, scale in self.scales.items()}

    def poisoning_bound(self) -> dict[str, float]:
        """Per statistic: the most one merchant's contribution to a coordinate of the sum can be."""
        step = 2.0 * CLIPPING_RANGE / QUANTIZATION_RANGE
        return {key: (CLIPPING_RANGE + step) * scale for key, scale in self.scales.items()}
