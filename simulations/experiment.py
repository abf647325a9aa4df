"""Experiment files: run-config overrides plus what to sweep, validated once, expanded into cells.

An experiment file is TOML, as Flower baselines' conf/*.toml: plain run-config overrides, with
the dashed keys of pyproject's [tool.flwr.app.config] (shared/config.py, RunConfig), plus two
tables:
    [sweep]      clients, seeds, dirichlet-alphas, epsilons, solvers, private-als-rounds
    [baselines]  toppop, centralized, local-only, dp-popularity
    [delivery]   the closed loop of ad delivery (simulations/delivery/, run by `python -m simulations.delivery`)
The experiment is named after the file. Relative data-path and catalog-path are resolved
against the file's folder. A bad file gets an error naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.config import DASHED_KEYS, RunConfig, format_validation_error, line_of, read_toml
from simulations.delivery.settings import DeliverySettings

# run-config keys that say where a run writes: not part of what a cell computes
_WHERE = ("output-dir", "state-dir", "resume")


class ExperimentError(ValueError):
    pass


class SweepSpec(BaseModel):
    """What varies across the experiment's federated runs (cells)."""

    model_config = DASHED_KEYS
    clients: list[int] = Field(default_factory=lambda: [5], description=(
        "simulated merchants (SuperNodes): a cell per count, which sets synthetic-merchants and min-nodes (at most 2) "
        "unless the file sets them"))
    seeds: list[int] = Field(default_factory=list, description="a cell per seed (default: the run config's seed)")
    dirichlet_alphas: list[float] = Field(default_factory=list, description=(
        "a cell per alpha of partitioning = dirichlet (default: the run config's dirichlet-alpha)"))
    epsilons: list[float] = Field(default_factory=list, description="each adds a privacy = user cell per solver")
    solvers: list[Literal["als", "sgd", "neumf"]] = Field(default_factory=list, description="solvers of the DP cells (default: mf-solver)")
    private_als_rounds: int = Field(3, ge=1, description=(
        "rounds (= releases: the popularity release, then statistics) of private-ALS cells; DP-SGD cells run num-rounds"))

    @field_validator("clients", "epsilons", "dirichlet_alphas")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(v <= 0 for v in values):
            raise ValueError("every value must be > 0")
        return values

    @field_validator("clients")
    @classmethod
    def _some_clients(cls, values: list[int]) -> list[int]:
        if not values:
            raise ValueError("at least one client count")
        return values


class BaselineSpec(BaseModel):
    """The in-process baselines run beside the cells (simulations/baselines.py)."""

    model_config = DASHED_KEYS
    centralized: bool = Field(True, description="all users pooled in one place, trained by the run's own solver for num-rounds")
    local_only: bool = Field(True, description="each merchant trains alone on its own shard, same solver and rounds")
    toppop: bool = Field(True, description="every ad ranked by its training popularity over all users (no privacy)")
    dp_popularity: bool = Field(True, description=(
        "noisy per-merchant counts at each swept epsilon (needs [sweep] epsilons): the floor of any private model"))


class _Tables(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sweep: SweepSpec = SweepSpec()
    baselines: BaselineSpec = BaselineSpec()
    delivery: DeliverySettings | None = None


class Experiment(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    overrides: dict[str, Any]  # the file's run-config keys, as written (paths resolved)
    base: RunConfig  # the defaults with those overrides
    sweep: SweepSpec = SweepSpec()
    baselines: BaselineSpec = BaselineSpec()
    delivery: DeliverySettings | None = None  # a [delivery] table: the file also describes a delivery loop
    source: str = "<memory>"


def simulated_merchants(clients: int) -> dict[str, Any]:
    """The run-config keys a simulation with `clients` virtual merchants sets: the synthetic
    market's merchant count, and rounds that wait for at most two of them."""
    return {"synthetic-merchants": clients, "min-nodes": min(clients, 2)}


class Cell(BaseModel):
    """One federated run of a sweep."""

    model_config = ConfigDict(frozen=True)
    name: str
    clients: int
    config: RunConfig

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def run_config(self) -> dict[str, Any]:
        return self.config.to_flower()

    @property
    def key(self) -> str:
        what = {k: v for k, v in self.run_config.items() if k not in _WHERE}
        blob = json.dumps({"clients": self.clients, "config": what}, sort_keys=True)
        return f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', self.name)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    @property
    def epsilon(self) -> float | None:
        return self.config.target_epsilon if self.config.privacy != "none" else None


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    text, raw = read_toml(path, ExperimentError)
    tables = {key: raw.pop(key) for key in ("sweep", "baselines", "delivery") if key in raw}
    _resolve_paths(path, text, raw)
    errors: list[str] = []
    base = None
    try:
        base = RunConfig.model_validate(raw, by_name=False)
    except ValidationError as exc:
        errors += format_validation_error(exc, str(path), text).splitlines()[1:]
    try:
        parsed = _Tables.model_validate(tables, by_name=False)
    except ValidationError as exc:
        errors += format_validation_error(exc, str(path), text).splitlines()[1:]
    if errors or base is None:
        raise ExperimentError("\n".join([f"{path}: invalid experiment:", *errors]))
    experiment = Experiment(name=path.stem, overrides=raw, base=base, sweep=parsed.sweep, baselines=parsed.baselines,
                            delivery=parsed.delivery, source=str(path))
    # every cell's run config must validate too: check them now, at the edge
    try:
        expand_cells(experiment)
    except ValueError as exc:
        raise ExperimentError(f"{path}: {exc}") from None
    return experiment


def _resolve_paths(path: Path, text: str, raw: dict[str, Any]) -> None:
    """Make relative data-path and catalog-path relative to the experiment file's folder."""
    for key in ("data-path", "catalog-path"):
        value = raw.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            try:
                raw[key] = str((path.resolve().parent / value).resolve())
            except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte; a loop of symbolic links
                raise ExperimentError(f"{path}:{line_of(text, (key,)) or '?'}: field '{key}': not a usable path ({exc})") from None


def expand_cells(experiment: Experiment) -> list[Cell]:
    """The base setting for every (clients, alpha, seed), plus one privacy = user cell per
    epsilon and solver."""
    base, sweep = experiment.base, experiment.sweep
    cells = []
    for clients, alpha, seed in itertools.product(
        sweep.clients, sweep.dirichlet_alphas or [base.dirichlet_alpha], sweep.seeds or [base.seed]
    ):
        # the file's own synthetic-merchants or min-nodes win, as any run-config key it sets; the sweep's axes win over the file's
        source = f"{experiment.source} (clients {clients}, alpha {alpha:g}, seed {seed})"
        values = {**simulated_merchants(clients), **experiment.overrides, "dirichlet-alpha": alpha, "seed": seed}
        config = RunConfig.from_flower(values, source=source)
        tag = f"c{clients}" + (f"-a{alpha:g}" if config.partitioning == "dirichlet" else "") + f"-s{seed}"
        label = "federated" if config.privacy == "none" else f"{config.privacy}-eps{config.target_epsilon:g}"
        cells.append(Cell(name=f"{label}-{tag}", clients=clients, config=config))
        for epsilon, solver in itertools.product(sweep.epsilons, sweep.solvers or [config.mf_solver]):
            rounds = sweep.private_als_rounds if solver == "als" else config.num_rounds
            private = config.with_values(source, privacy="user", target_epsilon=float(epsilon), mf_solver=solver, num_rounds=rounds)
            cells.append(Cell(name=f"user-{solver}-eps{epsilon:g}-{tag}", clients=clients, config=private))
    return cells
