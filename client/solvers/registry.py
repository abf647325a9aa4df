"""The client's MF solvers, chosen by name (run config `mf-solver`), as Opacus chooses accountants.

A solver's module is imported only by runs that use it: SGD's pulls in torch, ALS's does not.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.config import RunConfig

if TYPE_CHECKING:
    from client.node_data import NodeData
    from client.solvers.base import Solver


@dataclass(frozen=True)
class SolverEntry:
    module: str
    class_name: str
    private_plan: str  # the privacy plan (client/privacy) that privatizes its update under privacy = "user"


SOLVERS = {
    "als": SolverEntry("client.solvers.als", "ALSSolver", private_plan="private-als"),
    "sgd": SolverEntry("client.solvers.sgd", "SGDSolver", private_plan="dp-sgd"),
    "neumf": SolverEntry("client.solvers.neumf", "NeuMFSolver", private_plan="dp-sgd"),
}


def solver_for(cfg: RunConfig, data: NodeData) -> Solver:
    entry = SOLVERS[cfg.mf_solver]
    solver_class: type[Solver] = getattr(importlib.import_module(entry.module), entry.class_name)
    return solver_class(cfg, data)
