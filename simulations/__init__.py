"""The offline harness: federated simulations through Flower's simulation runtime."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# An offline harness: no usage reports from Flower (read once, when Flower is first imported)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
