"""Deployment of the fedads Flower app: a TLS SuperLink with SuperNode authentication, and
one SuperNode per merchant. See docs/DEPLOYMENT.md."""

import os

# Read once, when Flower is first imported, here and in every process these start: no usage
# reports to Flower's servers (the platform, the Python version, a persistent source id, every
# run's start and end) from a merchant's or the operator's machines unless they ask for them
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
