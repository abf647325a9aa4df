"""The tidy results table of an experiment run: one row per (cell, round, client or aggregate).

Columns: method (federated | user-dp-als | user-dp-sgd | client-dp | centralized | local-only |
toppop | dp-popularity), cell,
clients, seed, alpha, epsilon_target, round, client, the metrics, epsilon_spent, train_users,
test_users, round_seconds. Read from the cells' and baselines' own outputs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from server.round_loop import TEST_USERS, TRAIN_USERS
from shared.config import RunConfig
from shared.metrics import METRIC_NAMES, NUM_TEST_USERS
from shared.wire import DP_EPSILON, POPULARITY_SIGNAL, RANKS_BY_POPULARITY
from simulations.evaluator import EXACT_HISTORY, with_exact_metrics
from simulations.experiment import Experiment, expand_cells

COLUMNS = ("method", "cell", "clients", "seed", "alpha", "epsilon_target", "round", "client", *METRIC_NAMES,
           "epsilon_spent", "train_users", "test_users", "round_seconds")


def _method(cfg: RunConfig) -> str:
    if cfg.privacy == "user":
        return f"user-dp-{cfg.mf_solver}"
    return {"none": "federated", "client": "client-dp"}[cfg.privacy]


def collect(experiment: Experiment, output: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"cells": [], "baselines": []}
    for cell in expand_cells(experiment):
        cell_dir = output / "cells" / cell.key
        done = cell_dir / "done.json"
        if not done.is_file():
            continue
        base = {"method": _method(cell.config), "cell": cell.name, "clients": cell.clients, "seed": cell.seed,
                "alpha": cell.config.dirichlet_alpha, "epsilon_target": cell.epsilon}
        history = json.loads((cell_dir / "history.json").read_text())
        if (cell_dir / EXACT_HISTORY).is_file():  # the harness's exact evaluation of a private cell
            history = with_exact_metrics(history, json.loads((cell_dir / EXACT_HISTORY).read_text()))
        for record in history:
            spent = record.get("privacy", {}).get("epsilon_max")
            rows.append({**base, "round": record["round"], "client": "aggregate", **record.get("evaluate", {}),
                         "epsilon_spent": spent, "round_seconds": record.get("round_seconds")})
            for name, metrics in sorted(record.get("clients", {}).items()):
                rows.append({**base, "round": record["round"], "client": name, **metrics,
                             "epsilon_spent": metrics.get(DP_EPSILON), "train_users": metrics.get(TRAIN_USERS),
                             "test_users": metrics.get(TEST_USERS)})
        summary["cells"].append({**json.loads(done.read_text()), "method": base["method"], "epsilon_target": cell.epsilon,
                                 "final": history[-1].get("evaluate", {}), "epsilon_spent": history[-1].get("privacy", {}).get("epsilon_max"),
                                 "refused": sum(len(h.get("refused", {})) for h in history),
                                 # private ALS: what its popularity rule chose (server/als_aggregation.py)
                                 "popularity_signal": history[-1].get("train", {}).get(POPULARITY_SIGNAL),
                                 "ranks_by_popularity": history[-1].get("train", {}).get(RANKS_BY_POPULARITY)})
    for done in sorted((output / "baselines").glob("*/done.json")):
        result = json.loads(done.read_text())
        base = {"cell": result["group"], "clients": result["clients"], "seed": result["seed"], "alpha": None, "epsilon_target": None}
        if "toppop" in result:
            rows.append({**base, "method": "toppop", "round": 0, "client": "aggregate", **result["toppop"]})
        for epsilon, metrics in sorted(result.get("dp_popularity", {}).items(), key=lambda item: float(item[0])):
            rows.append({**base, "method": "dp-popularity", "epsilon_target": float(epsilon), "round": 0, "client": "aggregate",
                         **metrics, "epsilon_spent": float(epsilon)})
        for record in result.get("centralized", []):
            rows.append({**base, "method": "centralized", "round": record["round"], "client": "aggregate",
                         **record["evaluate"], "round_seconds": record["round_seconds"]})
        per_round: dict[int, list[dict[str, float]]] = {}
        for name, history in result.get("local_only", {}).items():
            for record in history:
                rows.append({**base, "method": "local-only", "round": record["round"], "client": name, **record["evaluate"],
                             "test_users": record["evaluate"].get(NUM_TEST_USERS)})
                per_round.setdefault(record["round"], []).append(record["evaluate"])
        for server_round, merchants in sorted(per_round.items()):  # weighted by test users, as FedAvg's metrics
            total = sum(m[NUM_TEST_USERS] for m in merchants) or 1.0
            rows.append({**base, "method": "local-only", "round": server_round, "client": "aggregate",
                         **{k: sum(m[k] * m[NUM_TEST_USERS] for m in merchants) / total for k in METRIC_NAMES},
                         "test_users": total})
        summary["baselines"].append(result)
    return rows, summary


def write_tables(rows: list[dict[str, Any]], output: Path) -> None:
    clean = [{c: row.get(c) for c in COLUMNS} for row in rows]
    (output / "results.json").write_text(json.dumps(clean, indent=1))
    with (output / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(clean)
