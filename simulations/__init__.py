"""The offline harness: federated simulations through Flower's simulation runtime."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Read once, when Flower and Ray are first imported:
# an offline harness: no usage reports from Flower
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# the harness's process is a Ray driver: Ray's C++ failure handler would catch a SIGTERM and
# abort the process with a stack dump, before the harness stops its runs and its Ray cluster
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
# opt into Ray's coming default (a CPU simulation asks for no GPU) instead of its FutureWarning
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
