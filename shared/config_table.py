"""pyproject.toml's `[tool.flwr.app.config]`, generated from `RunConfig`, and the app's table.

Flower reads a run's defaults from that table (and only accepts overrides of keys it holds), so
it must hold every `RunConfig` key with its default: it is written from the model, comments
included, never by hand.

    python -m shared.config_table --write    # rewrite the table in pyproject.toml
    python -m shared.config_table --check    # exit 1 if it differs from RunConfig

`python -m simulations.config_reference --write` rewrites this table and docs/CONFIG.md (every
key a user can set, from the same models) together.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomli_w

from shared.config import SECTIONS, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TABLE_HEADER = "[tool.flwr.app.config]"
_RULE_WIDTH = 92


def render_table() -> str:
    """The table as it must stand in pyproject.toml: one commented line per RunConfig key."""
    lines = [
        TABLE_HEADER,
        "# Generated from shared/config.py (RunConfig): change the model there, then run",
        "# `python -m shared.config_table --write`. tests/test_config.py fails on any drift.",
    ]
    defaults = RunConfig()
    for name, field in RunConfig.model_fields.items():
        if name in SECTIONS:
            title = f"# {SECTIONS[name]} "
            lines += ["", title + "-" * (_RULE_WIDTH - len(title))]
        lines.append(f"# {field.description}")
        lines.append(tomli_w.dumps({field.alias or name: getattr(defaults, name)}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _split(text: str) -> tuple[str, str, str]:
    """(before the table, the table, after it): the table runs to the next table header."""
    start = text.index(TABLE_HEADER)
    body = start + len(TABLE_HEADER)
    next_table = text.find("\n[", body)
    end = len(text) if next_table < 0 else next_table + 1
    return text[:start], text[start:end], text[end:]


def current_table(path: Path = PYPROJECT) -> str:
    return _split(path.read_text())[1]


def write_table(path: Path = PYPROJECT) -> bool:
    """Rewrite the table; True when it changed."""
    before, table, after = _split(path.read_text())
    rendered = render_table()
    if table == rendered:
        return False
    path.write_text(before + rendered + after)
    return True


@lru_cache(maxsize=1)
def app_components(path: Path = PYPROJECT) -> dict[str, str]:
    """`[tool.flwr.app.components]`: where Flower finds the ServerApp and the ClientApp."""
    pyproject: dict[str, Any] = tomllib.loads(path.read_text())
    return dict(pyproject["tool"]["flwr"]["app"]["components"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the table in pyproject.toml")
    action.add_argument("--check", action="store_true", help="exit 1 when the table differs from RunConfig")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{PYPROJECT}: {'rewritten' if write_table() else 'already up to date'}")
        return 0
    if current_table() != render_table():
        print(f"{PYPROJECT}: {TABLE_HEADER} differs from RunConfig: run `python -m shared.config_table --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
