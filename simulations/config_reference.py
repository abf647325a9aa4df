"""docs/CONFIG.md, generated from the pydantic models: every key a user can set, in one place.

It lists the run config (`RunConfig`, grouped as pyproject's `[tool.flwr.app.config]`), an
experiment file's `[sweep]` and `[baselines]` tables (simulations/experiment.py) and a
merchant's node config (`NodeConfig`, its privacy policy included), each key with its type,
bounds, default and description, read from the models when it runs: it is never edited by hand.
It lives in simulations/ because it reads the experiment models, which the Flower app (shared/,
server/, client/) does not ship.

    python -m simulations.config_reference --write    # rewrite docs/CONFIG.md and pyproject's table
    python -m simulations.config_reference --check    # exit 1 if either differs from the models
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import tomli_w
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import shared.config_table as config_table
from shared.config import SECTIONS, RunConfig
from shared.node_config import PATH_KEYS, NodeConfig
from simulations import PROJECT_ROOT
from simulations.delivery.settings import DeliverySettings, ResponseSettings
from simulations.experiment import BaselineSpec, SweepSpec

REFERENCE = PROJECT_ROOT / "docs" / "CONFIG.md"
COMMAND = "python -m simulations.config_reference --write"

# node-config sections, by the first field of each (as SECTIONS for RunConfig)
NODE_SECTIONS = {
    "data_path": "A deployed merchant's files",
    "privacy_mode": "The merchant's privacy policy (shared/privacy_policy.py)",
    "partition_id": "A simulated node: Flower sets these for every virtual node, a merchant never does",
}
# Flower's own keys carry no description in NodeConfig; any other field without one stops the
# generator, so a new key cannot reach the reference undocumented
FLOWER_SET_DESCRIPTIONS = {
    "partition_id": "this node's shard of the run's dataset (0-based)",
    "num_partitions": "how many shards the run's dataset is cut into",
}
_BOUNDS: tuple[tuple[type[Any], str, str], ...] = (
    (annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="),
)


def _cell(text: str) -> str:
    # a `|` would end the table cell, `<word ...>` would read as an HTML tag, `*` as emphasis
    escaped = text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
    return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", escaped)


def _annotation_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        # as they are written in TOML: true / false, not Python's True / False
        return " | ".join(f"`{str(value).lower() if isinstance(value, bool) else value}`" for value in args)
    if origin is Annotated:  # a constrained member of a union, e.g. Annotated[float, Field(gt=0)] | Literal["auto"]
        constraints = [c for extra in args[1:] for c in (extra.metadata if isinstance(extra, FieldInfo) else [extra])]
        return ", ".join([_annotation_text(args[0]), *map(_bound_text, constraints)])
    if origin is list:
        return f"list of {_annotation_text(args[0])}"
    if origin in (Union, types.UnionType):
        present = [arg for arg in args if arg is not type(None)]
        return " or ".join(_annotation_text(arg) for arg in present) + (" (optional)" if len(present) < len(args) else "")
    if isinstance(annotation, type):
        return annotation.__name__
    raise TypeError(f"config_reference cannot describe the type {annotation!r}: teach _annotation_text it")


def type_text(field: FieldInfo) -> str:
    """The field's type and bounds, e.g. `float, > 0, <= 1` or `` `als` | `sgd` ``."""
    return ", ".join([_annotation_text(field.annotation), *map(_bound_text, field.metadata)])


def _bound_text(constraint: Any) -> str:
    for kind, attribute, symbol in _BOUNDS:
        if isinstance(constraint, kind):
            return f"{symbol} {getattr(constraint, attribute):g}"
    raise TypeError(f"config_reference cannot describe the constraint {constraint!r}: teach _bound_text it")


def _toml_value(value: Any) -> str:
    if isinstance(value, list):  # on one line: tomli_w spreads a non-empty array over several
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


def default_text(field: FieldInfo) -> str:
    """The default as it is written in TOML (`unset` where there is none)."""
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{_toml_value(value)}`"


def description_text(name: str, field: FieldInfo) -> str:
    description = field.description or FLOWER_SET_DESCRIPTIONS.get(name)
    if not description:
        raise ValueError(f"field {name!r} has no description: give it Field(description=...)")
    return description


def sections(model: type[BaseModel], titles: Mapping[str, str]) -> list[tuple[str, list[tuple[str, FieldInfo]]]]:
    """The model's fields, in their order, cut where a field starts a titled section."""
    names = list(model.model_fields)
    unknown = set(titles) - set(names)
    if unknown or (titles and names and names[0] not in titles):
        raise ValueError(f"{model.__name__}: sections must start at fields, the first one included (unknown: {sorted(unknown)})")
    grouped: list[tuple[str, list[tuple[str, FieldInfo]]]] = [] if titles else [("", [])]
    for name, field in model.model_fields.items():
        if name in titles:
            grouped.append((titles[name], []))
        grouped[-1][1].append((name, field))
    return grouped


def key_table(fields: list[tuple[str, FieldInfo]]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields:
        cells = (f"`{field.alias or name}`", type_text(field), default_text(field), description_text(name, field))
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines


def _model_sections(model: type[BaseModel], titles: Mapping[str, str], level: str) -> list[str]:
    lines: list[str] = []
    for title, fields in sections(model, titles):
        lines += [f"{level} {title}", "", *key_table(fields), ""]
    return lines


def render_reference() -> str:
    """docs/CONFIG.md as the models make it."""
    run_keys, sweep_keys = len(RunConfig.model_fields), len(SweepSpec.model_fields)
    lines = [
        "# Configuration reference",
        "",
        f"Generated from the pydantic models by `.venv/bin/{COMMAND}` (never edited by hand);",
        "tests/test_config_reference.py fails when this file differs from what the models generate.",
        "",
        "A run is set in three places: the **run config** (the operator's request to every node), an",
        "**experiment file** (run-config overrides plus what the offline harness sweeps), and each",
        "merchant's **node config** (its own files and privacy policy, which no run can override).",
        "Keys are dashed; values are TOML; an unknown key or a value out of bounds is an error naming",
        "the key (and, in a file, its line).",
        "",
        "## Run config",
        "",
        f"`RunConfig` (shared/config.py), {run_keys} keys: pyproject.toml's `[tool.flwr.app.config]` (generated",
        "from the same model), `flwr run -c key=value`, `python -m simulations.simulate -c key=value`",
        "and the top level of an experiment file all take these keys. Keys are also checked together",
        "(e.g. `privacy = \"client\"` needs `mf-solver = \"sgd\"`); the error says which.",
        "",
        *_model_sections(RunConfig, SECTIONS, "###"),
        "## Experiment file",
        "",
        "A TOML file for `python -m simulations.sweep FILE` (simulations/experiment.py), named after",
        "the file: any run-config key above at the top level (the base of every cell; relative",
        "`data-path` and `catalog-path` are relative to the file's folder), plus the tables below",
        "and no other. Your own data: `dataset = \"logs\"` (docs/DATA.md).",
        "",
        f"### `[sweep]`: what varies across the federated runs (cells), {sweep_keys} keys",
        "",
        *key_table(list(SweepSpec.model_fields.items())),
        "",
        "### `[baselines]`: in-process baselines run beside the cells (simulations/baselines.py)",
        "",
        *key_table(list(BaselineSpec.model_fields.items())),
        "",
        "### `[delivery]`: the closed loop of ad delivery (simulations/delivery/)",
        "",
        "Run by `python -m simulations.delivery FILE` on the synthetic market (its base cell and one",
        "private-ALS run per `[sweep]` epsilon; the sweep ignores this table).",
        "",
        *key_table([(k, f) for k, f in DeliverySettings.model_fields.items() if k != "responses"]),
        "",
        "#### `[delivery.responses]`: the simulated users (hidden from every model)",
        "",
        *key_table(list(ResponseSettings.model_fields.items())),
        "",
        "## Node config",
        "",
        "`NodeConfig` (shared/node_config.py): a merchant's own settings, a TOML file given to",
        "`flower-supernode --node-config FILE` and `fedads-merchant ... --node-config FILE`",
        "(docs/DEPLOYMENT.md). It names either `data-path` (a deployed merchant) or `partition-id`",
        f"and `num-partitions` (a simulated node). In the file {', '.join(f'`{key}`' for key in PATH_KEYS)}",
        "must be absolute paths. Its privacy policy is what the merchant gives whatever a run asks: a",
        "run asking for less is refused, and a key left out takes the private default below. A",
        "simulated node's policy is its run's.",
        "",
        *_model_sections(NodeConfig, NODE_SECTIONS, "###"),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def current_reference(path: Path = REFERENCE) -> str:
    return path.read_text() if path.exists() else ""


def write_reference(path: Path = REFERENCE) -> bool:
    """Rewrite the reference; True when it changed."""
    rendered = render_reference()
    if current_reference(path) == rendered:
        return False
    path.write_text(rendered)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite docs/CONFIG.md and pyproject's [tool.flwr.app.config]")
    action.add_argument("--check", action="store_true", help="exit 1 when either differs from the models")
    args = parser.parse_args(argv)
    if args.write:
        for path, changed in ((config_table.PYPROJECT, config_table.write_table()), (REFERENCE, write_reference())):
            print(f"{path}: {'rewritten' if changed else 'already up to date'}")
        return 0
    drifted = config_table.main(["--check"]) != 0
    if current_reference() != render_reference():
        print(f"{REFERENCE}: differs from the models: run `{COMMAND}`", file=sys.stderr)
        drifted = True
    return 1 if drifted else 0


if __name__ == "__main__":
    raise SystemExit(main())
