"""The app's logger: a child of Flower's, so its lines go wherever Flower's go (the console, a
deployed run's `flwr log`, the harness's log of a run) without using Flower's private helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

FLOWER_LOGGER = "flwr"  # the logger Flower writes to and configures

log = logging.getLogger(f"{FLOWER_LOGGER}.fedads")


@contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Logger `name` at `level` for the block, and as it was after (a caller's logging is its own)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
