"""A benchmark's JSON results file: a list of flat records, rewritten with this run's records in
place of those they replace, the others kept as they were measured (each benchmark can rerun
one data set, one epsilon or one method alone)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def merged(path: Path, records: list[Record], replaced: Callable[[Record], bool]) -> list[Record]:
    """The file's earlier records that `replaced` keeps, then `records`."""
    kept = [r for r in json.loads(path.read_text()) if not replaced(r)] if path.exists() else []
    return kept + records


def write_records(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
