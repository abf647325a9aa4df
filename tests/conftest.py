"""Shared fixtures: a small synthetic run configuration and the real-data location."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import RunConfig

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def small_run_config(tmp_path: Path, **overrides: Any) -> RunConfig:
    """A synthetic market small enough for a Flower round in about a second."""
    values: dict[str, Any] = {
        "output-dir": str(tmp_path / "out"),
        "state-dir": str(tmp_path / "out" / "state"),
        "num-rounds": 2,
        "min-nodes": 2,
        "synthetic-merchants": 3,
        "synthetic-users": 600,
        "synthetic-ads": 200,
        "synthetic-categories": 8,
        "local-epochs": 2,
        "seed": 7,
    }
    values.update(overrides)
    return RunConfig.from_flower(values)


def processes_mentioning(*needles: str, environ: bool = True) -> list[str]:
    """Live processes whose command line (or, with `environ`, environment) holds any needle:
    what a test's Flower, Ray or SuperNode processes would leave behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (entry / "environ").read_bytes().decode(errors="replace") if environ else ""
            except OSError:
                continue
            if any(needle in cmdline or needle in env for needle in needles):
                found.append(f"{entry.name}: {cmdline[:120]}")
    return found


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "movielens" / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA
