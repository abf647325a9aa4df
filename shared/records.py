"""Global parameters <-> Flower ArrayRecord."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in record.items()}


def digest(arrays: dict[str, np.ndarray]) -> str:
    """A fingerprint of parameter values (sha256 over sorted keys, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()
