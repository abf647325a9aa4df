"""The audit's federated runs, through the same harness path as a sweep's cells, and what each
run's released model says about the canaries.

For each solver, one run without DP and one per claimed epsilon, with the experiment's own
settings (its first client count, Dirichlet alpha and seed; DP runs of private ALS take the
sweep's `private-als-rounds`, as in simulations/experiment.expand_cells), on the augmented
"logs" dataset. Every run has its own output and state folders (fresh privacy ledgers) and is
cached: a finished run is not redone for the same run config and the same data.

Score of canary i: the bias of its canary ad in the run's exported global model
(model/global_model.npz). That model is post-processing of what the merchants sent, so the
score uses only what the server received. Without DP an included canary's click pulls its
ad's bias up (ALS: the ad's only positive in the ridge solve; SGD: the only positive gradient),
while an excluded canary's ad is only ever a zero (ALS) or a sampled negative (SGD).

Delta of a DP run: the largest delta bound in the merchants' privacy ledgers after the run
(each canary lives in one merchant's shard; that merchant's releases are (epsilon, delta_j)-DP
for it and no other merchant's release depends on it); 0 without DP.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from shared.config import RunConfig
from shared.storage import atomic_write_json, load_npz
from shared.wire import AD_BIAS
from simulations.audit.canaries import Canaries
from simulations.audit.statistics import CONFIDENCE, audit_bound, largest_bound
from simulations.experiment import Experiment, simulated_merchants
from simulations.runtime import SimulationRuntime, run_simulation

DONE = "audit-run.json"
MODEL = Path("model") / "global_model.npz"


class AuditError(RuntimeError):
    pass


@dataclass(frozen=True)
class AuditRun:
    name: str
    solver: str
    epsilon: float | None  # the claim; None without DP
    clients: int
    config: RunConfig  # the experiment's setting of this run, on the experiment's own dataset


def plan_runs(experiment: Experiment, solvers: list[str] | None = None, epsilons: list[float] | None = None,
              non_private: bool = True) -> list[AuditRun]:
    """Per solver: the run without DP (if `non_private`), then one per claimed epsilon."""
    sweep, base = experiment.sweep, experiment.base
    clients = sweep.clients[0]
    values = {**simulated_merchants(clients), **experiment.overrides,
              "dirichlet-alpha": (sweep.dirichlet_alphas or [base.dirichlet_alpha])[0], "seed": (sweep.seeds or [base.seed])[0]}
    config = RunConfig.from_flower(values, source=experiment.source)
    runs = []
    for solver in solvers or sweep.solvers or [config.mf_solver]:
        if non_private:
            runs.append(AuditRun(f"{solver}-nodp", solver, None, clients,
                                 config.with_values(experiment.source, privacy="none", mf_solver=solver)))
        for epsilon in sweep.epsilons if epsilons is None else epsilons:
            rounds = sweep.private_als_rounds if solver == "als" else config.num_rounds
            private = config.with_values(experiment.source, privacy="user", target_epsilon=float(epsilon), mf_solver=solver, num_rounds=rounds)
            runs.append(AuditRun(f"{solver}-eps{epsilon:g}", solver, float(epsilon), clients, private))
    return runs


def on_canary_data(run: AuditRun, log_path: Path, catalog_path: Path, run_dir: Path) -> RunConfig:
    """The run's config on the augmented dataset, writing into `run_dir`."""
    return run.config.with_values(dataset="logs", data_path=str(log_path), catalog_path=str(catalog_path), partitioning="merchant",
                                  output_dir=str(run_dir), state_dir=str(run_dir / "state"), resume=False)


def canary_scores(run_dir: Path, canaries: Canaries) -> np.ndarray:
    """Each canary ad's bias in the run's exported global model."""
    model = load_npz(run_dir / MODEL)
    rows = {str(ad): i for i, ad in enumerate(model["ad_ids"])}
    missing = [ad for ad in canaries.ad_ids if ad not in rows]
    if missing:
        raise AuditError(f"{run_dir / MODEL} lacks canary ads ({missing[:3]}...)")
    return np.asarray(model[AD_BIAS], dtype=np.float64)[[rows[ad] for ad in canaries.ad_ids]]


def claimed_delta(run_dir: Path, config: RunConfig) -> float:
    """The delta the merchants' ledgers bound the run to (the largest); 0 without DP."""
    if config.privacy == "none":
        return 0.0
    deltas = [PrivacyLedger.open(path.parent).state.delta for path in sorted((run_dir / "state").glob(f"*/{LEDGER_FILE}"))]
    if not deltas or any(d is None for d in deltas):
        raise AuditError(f"no delta in the privacy ledgers under {run_dir / 'state'}: cannot state the DP claim")
    return max(float(d) for d in deltas if d is not None)


def _key(config: RunConfig, clients: int, data_digest: str, canaries: Canaries, confidence: float) -> str:
    blob = json.dumps({"config": config.to_flower(), "clients": clients, "data": data_digest, "included": canaries.included.tolist(),
                       "confidence": confidence}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_record(
    run: AuditRun, canaries: Canaries, data: tuple[Path, Path, str], run_dir: Path, confidence: float = CONFIDENCE,
) -> dict[str, Any] | None:
    """The record of an earlier audit run with the same run config, data and canaries."""
    config = on_canary_data(run, data[0], data[1], run_dir)
    try:
        cached = json.loads((run_dir / DONE).read_text())
    except (OSError, ValueError):
        return None
    return dict(cached["record"]) if cached.get("key") == _key(config, run.clients, data[2], canaries, confidence) else None


def audit_run(
    run: AuditRun, canaries: Canaries, data: tuple[Path, Path, str], dataset_name: str, run_dir: Path,
    runtime: SimulationRuntime | None = None, confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Train (unless cached), score the canaries, bound epsilon: the run's audit record."""
    cached = cached_record(run, canaries, data, run_dir, confidence)
    if cached is not None:
        return cached
    log_path, catalog_path, digest = data
    config = on_canary_data(run, log_path, catalog_path, run_dir)
    key = _key(config, run.clients, digest, canaries, confidence)
    done = run_dir / DONE
    for stale in (run_dir / "state", run_dir / "checkpoints", run_dir / "model"):
        if stale.exists():  # an interrupted or different earlier run: its ledgers would refuse a new budget
            shutil.rmtree(stale)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (run_dir / "flower.log").open("a") as log_file:
        run_simulation(config.to_flower(), run.clients, run_dir / "flower", stream_to=log_file, runtime=runtime)
    wall = time.perf_counter() - started
    scores = canary_scores(run_dir, canaries)
    delta = claimed_delta(run_dir, config)
    bound = audit_bound(scores, canaries.included, delta, confidence)
    history = json.loads((run_dir / "history.json").read_text())
    record: dict[str, Any] = {
        "solver": run.solver, "dataset": dataset_name, "dp": run.epsilon is not None, "epsilon": run.epsilon,
        "canaries": len(canaries), "epsilon_lower_bound": bound.epsilon_lower_bound,
        "guesses": bound.guesses, "correct": bound.correct, "delta": delta, "confidence": confidence,
        "epsilon_lower_bound_max": largest_bound(len(canaries), delta, confidence),
        "included": int(canaries.included.sum()), "rounds": config.num_rounds, "clients": run.clients,
        "epsilon_spent": history[-1].get("privacy", {}).get("epsilon_max"), "refused": sum(len(h.get("refused", {})) for h in history),
        "wall_seconds": wall, "run": run.name,
    }
    atomic_write_json(run_dir / "scores.json", {"ad_ids": list(canaries.ad_ids), "included": canaries.included.tolist(),
                                                "scores": scores.tolist(), "tried": [list(t) for t in bound.tried]})
    atomic_write_json(done, {"key": key, "record": record})
    return record

