"""Each simulated merchant's own files for the merchant agent (`fedads-merchant`), so that after a
simulation a user can try the agent on a merchant as a deployed merchant would run it.

A simulated node cuts its shard from the run's dataset in memory and writes only its state
(user factors, global model, privacy ledger); `recommend` and `fold-in` also need the merchant's
log and the ad catalog. The harness owns the data, so it writes them beside that state, in the
generic CSV formats the agent reads (shared/data/loaders.py), and says which commands to run.

    state/partition-N/log.csv       the merchant's shard of the run's log
    state/partition-N/catalog.csv   the ad catalog
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from client.node_state import NodeState
from shared.config import RunConfig
from shared.data.loaders import write_catalog_csv, write_log_csv
from shared.data.schema import Dataset
from shared.data.sources import load_dataset, simulated_shards
from shared.node_config import NodeConfig
from shared.storage import load_npz

LOG_FILE = "log.csv"
CATALOG_FILE = "catalog.csv"
SHOWN_USERS = 1  # recommend for one user: a whole shard's table would bury the rest of the output
SHOWN_K = 5


def merchant_state_dir(cfg: RunConfig, clients: int, partition: int) -> Path:
    """The state directory simulated node `partition` of `clients` keeps (as its ClientApp names it)."""
    return NodeConfig(partition_id=partition, num_partitions=clients).state_path(cfg)


def write_merchant_inputs(cfg: RunConfig, clients: int) -> list[Path]:
    """Write every simulated merchant's log and the catalog into its state directory, shards cut
    exactly as the run cut them; returns the state directories, by partition."""
    dataset = load_dataset(cfg)
    directories = []
    for partition, (_, shard) in enumerate(simulated_shards(cfg, dataset, clients)):
        directory = merchant_state_dir(cfg, clients, partition)
        directory.mkdir(parents=True, exist_ok=True)
        _write_replacing(directory / LOG_FILE, partial(write_log_csv, dataset=Dataset(dataset.name, dataset.catalog, shard)))
        _write_replacing(directory / CATALOG_FILE, partial(write_catalog_csv, catalog=dataset.catalog))
        directories.append(directory)
    return directories


def _write_replacing(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file: an interrupted write never leaves a truncated log behind."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _shown(path: Path) -> str:
    """`path` as a user would type it here: relative to the working directory when inside it."""
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def merchant_agent_command() -> str:
    """How to start the merchant agent from this environment: its console script beside this
    Python where installed, else the module."""
    script = Path(sys.executable).parent / "fedads-merchant"
    return _shown(script) if script.is_file() else f"{_shown(Path(sys.executable))} -m client.merchant_cli"


def served_users(state_dir: Path, count: int = SHOWN_USERS) -> list[str]:
    """The first `count` users (by id) of the merchant's log that have stored factors."""
    state = NodeState(state_dir)
    if not state.user_factors_path.is_file():
        return []
    stored = {str(user) for user in load_npz(state.user_factors_path)["user_ids"].tolist()}
    with (state_dir / LOG_FILE).open(newline="", encoding="utf-8") as handle:
        in_log = {row["user_id"] for row in csv.DictReader(handle)}
    return sorted(stored & in_log)[:count]


def try_commands(state_dir: Path) -> list[str]:
    """The merchant agent's commands that work on this simulated merchant's state and files."""
    agent, state = merchant_agent_command(), _shown(state_dir)
    users = served_users(state_dir)
    chosen = f" --users {' '.join(shlex.quote(user) for user in users)}" if users else ""
    return [
        f"{agent} recommend --state-dir {state} --log {_shown(state_dir / LOG_FILE)} --catalog {_shown(state_dir / CATALOG_FILE)}"
        f"{chosen} --k {SHOWN_K}",
        f"{agent} budget --state-dir {state}",
    ]
