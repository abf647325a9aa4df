"""Experiment descriptions: a typed TOML file, validated once, expanded into sweep cells.

A bad file gets an error naming the file, the line of the offending key (where it can be
found) and the field. Relative data paths are resolved against the experiment file's folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.config import RunConfig, format_validation_error

_STRICT = ConfigDict(extra="forbid")


class DataSpec(BaseModel):
    model_config = _STRICT
    dataset: Literal["synthetic", "movielens-100k", "amazon-seq", "logs"] = "synthetic"
    path: str = ""
    catalog: str = ""
    synthetic_users: int = Field(2000, ge=10)
    synthetic_ads: int = Field(600, ge=20)


class PartitionSpec(BaseModel):
    model_config = _STRICT
    scheme: Literal["merchant", "region", "iid", "dirichlet"] = "merchant"
    clients: int = Field(5, ge=1)
    dirichlet_alpha: float = Field(0.5, gt=0)


class TrainingSpec(BaseModel):
    model_config = _STRICT
    model: Literal["mf"] = "mf"
    solver: Literal["als", "sgd"] = "als"
    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    factors: int = Field(16, ge=1)


class PrivacySpec(BaseModel):
    model_config = _STRICT
    mode: Literal["none", "user", "client"] = "none"
    epsilon: float = Field(8.0, gt=0)
    delta: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(0.1, gt=0)
    metrics: Literal["noised", "none", "exact"] = "exact"
    als_rounds: int = Field(2, ge=1, description="rounds (= releases) of private-ALS cells; DP-SGD cells run training.rounds")


class SweepSpec(BaseModel):
    model_config = _STRICT
    epsilons: list[float] = Field(default_factory=list, description="each adds a privacy=user cell per solver")
    solvers: list[Literal["als", "sgd"]] = Field(default_factory=list, description="MF solvers of the DP cells (default: training.solver)")
    clients: list[int] = Field(default_factory=list)
    alphas: list[float] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [42])

    @model_validator(mode="after")
    def _positive(self) -> SweepSpec:
        if any(e <= 0 for e in self.epsilons) or any(c < 1 for c in self.clients) or any(a <= 0 for a in self.alphas):
            raise ValueError("epsilons and alphas must be > 0, clients >= 1")
        if not self.seeds:
            raise ValueError("at least one seed")
        return self


class BaselineSpec(BaseModel):
    model_config = _STRICT
    centralized: bool = True
    local_only: bool = True
    toppop: bool = True
    dp_popularity: bool = True  # noisy per-merchant counts at each swept epsilon: the floor of any private model


class Experiment(BaseModel):
    model_config = _STRICT
    name: str
    data: DataSpec = DataSpec()
    partition: PartitionSpec = PartitionSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec()
    sweep: SweepSpec = SweepSpec()
    baselines: BaselineSpec = BaselineSpec()
    overrides: dict[str, Any] = Field(default_factory=dict, description="further run-config keys (dashed)")
    source: str = "<memory>"


class ExperimentError(ValueError):
    pass


def _line_of(text: str, dotted: tuple[Any, ...]) -> int | None:
    """Line of the key `dotted[-1]` inside table `dotted[:-1]` (best effort for messages)."""
    keys = [str(k) for k in dotted if not isinstance(k, int)]
    if not keys:
        return None
    table, key = keys[:-1], keys[-1]
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
        if header:
            current = [part.strip() for part in header.group(1).split(".")]
            continue
        if current == table and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    if not table:
        return None
    for number, line in enumerate(text.splitlines(), start=1):  # a missing key: point at its table
        if re.match(rf"^\s*\[{re.escape('.'.join(table))}\]\s*$", line):
            return number
    return None


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read the experiment file: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not valid TOML: {exc}") from exc
    try:
        experiment = Experiment.model_validate({**raw, "source": str(path)})
    except ValidationError as exc:
        lines = [f"{path}: invalid experiment:"]
        for err in exc.errors():
            where = _line_of(text, tuple(err["loc"]))
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {path}:{where or '?'}: field '{key}': {err['msg']} (got {err.get('input')!r})")
        raise ExperimentError("\n".join(lines)) from None
    base = path.resolve().parent
    for name in ("path", "catalog"):
        value = getattr(experiment.data, name)
        if value and not Path(value).is_absolute():
            setattr(experiment.data, name, str((base / value).resolve()))
    # every cell's run config must validate too: check the base one now, at the edge
    for cell in expand_cells(experiment):
        try:
            RunConfig.from_flower(cell.run_config)
        except ValueError as exc:
            raise ExperimentError(f"{path}: cell {cell.name}: {exc}") from None
    return experiment


class Cell(BaseModel):
    """One federated run of a sweep."""

    name: str
    clients: int
    seed: int
    run_config: dict[str, Any]

    @property
    def key(self) -> str:
        blob = json.dumps({"clients": self.clients, "config": self.run_config}, sort_keys=True)
        return f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', self.name)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    @property
    def epsilon(self) -> float | None:
        return self.run_config["target-epsilon"] if self.run_config["privacy"] != "none" else None


def base_run_config(experiment: Experiment, clients: int, seed: int, alpha: float) -> dict[str, Any]:
    d, p, t, q = experiment.data, experiment.partition, experiment.training, experiment.privacy
    return {
        "dataset": d.dataset, "data-path": d.path, "catalog-path": d.catalog,
        "synthetic-users": d.synthetic_users, "synthetic-ads": d.synthetic_ads, "synthetic-merchants": clients,
        "partitioning": p.scheme, "dirichlet-alpha": alpha,
        "num-rounds": t.rounds, "local-epochs": t.local_epochs, "factors": t.factors, "seed": seed, "mf-solver": t.solver,
        "min-nodes": min(clients, 2),
        "privacy": q.mode, "target-epsilon": q.epsilon, "target-delta": q.delta, "max-grad-norm": q.max_grad_norm,
        "dp-metrics": q.metrics,
        **experiment.overrides,
    }


def expand_cells(experiment: Experiment) -> list[Cell]:
    """The base setting for every (clients, alpha, seed), plus one privacy=user cell per epsilon and solver."""
    sweep = experiment.sweep
    cells = []
    for clients, alpha, seed in itertools.product(
        sweep.clients or [experiment.partition.clients], sweep.alphas or [experiment.partition.dirichlet_alpha], sweep.seeds
    ):
        base = base_run_config(experiment, clients, seed, alpha)
        tag = f"c{clients}" + (f"-a{alpha:g}" if experiment.partition.scheme == "dirichlet" else "") + f"-s{seed}"
        label = "federated" if base["privacy"] == "none" else f"{base['privacy']}-eps{base['target-epsilon']:g}"
        cells.append(Cell(name=f"{label}-{tag}", clients=clients, seed=seed, run_config=base))
        for epsilon, solver in itertools.product(sweep.epsilons, sweep.solvers or [experiment.training.solver]):
            rounds = experiment.privacy.als_rounds if solver == "als" else experiment.training.rounds
            cells.append(Cell(name=f"user-{solver}-eps{epsilon:g}-{tag}", clients=clients, seed=seed,
                              run_config={**base, "privacy": "user", "target-epsilon": float(epsilon), "mf-solver": solver,
                                          "num-rounds": rounds}))
    return cells
