"""Global parameters <-> Flower ArrayRecord."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in record.items()}
