"""The app's logger: a child of Flower's, so its lines go wherever Flower's go (the console, a
deployed run's `flwr log`, the harness's log of a run) without using Flower's private helpers."""

from __future__ import annotations

import logging

FLOWER_LOGGER = "flwr"  # the logger Flower writes to and configures

log = logging.getLogger(f"{FLOWER_LOGGER}.fedads")
