"""The privacy plans of a merchant, chosen by name as Opacus chooses accountants: the run
config's `privacy`, and under privacy = "user" the mechanism its solver's update needs
(client/solvers/registry.py: private ALS or DP-SGD).

A DP plan's module is imported only by runs that use it (DP-SGD's pulls in torch and Opacus).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.privacy.ledger import PrivacyLedger
from client.solvers.registry import SOLVERS
from shared.config import RunConfig
from shared.privacy_policy import PrivacyPolicy

if TYPE_CHECKING:
    from client.privacy.plan import PrivacyPlan


@dataclass(frozen=True)
class PlanEntry:
    module: str
    class_name: str
    warm_imports: tuple[str, ...] = ()  # what its first release imports lazily (the accountant)


PLANS = {
    "none": PlanEntry("client.privacy.plan", "NoPrivacy"),
    "client": PlanEntry("client.privacy.plan", "ClientLevel"),
    "private-als": PlanEntry("client.privacy.private_als", "PrivateALS", ("scipy.optimize", "scipy.special")),
    "dp-sgd": PlanEntry("client.privacy.dp_sgd", "DPSGD", ("opacus.accountants",)),
}


def plan_name(cfg: RunConfig) -> str:
    return SOLVERS[cfg.mf_solver].private_plan if cfg.privacy == "user" else cfg.privacy


def open_plan(cfg: RunConfig, policy: PrivacyPolicy, num_users: int, state_dir: str | Path) -> PrivacyPlan[Any]:
    """The node's plan over its ledger (read before anything is written to its state
    directory; a missing or damaged one refuses, fail closed). Raises PrivacyRefusal when the
    ledger or the budget does not allow the run (the policy was checked before any data was read)."""
    entry = PLANS[plan_name(cfg)]
    plan_class: type[PrivacyPlan[Any]] = getattr(importlib.import_module(entry.module), entry.class_name)
    return plan_class(cfg, policy, num_users, PrivacyLedger.open(state_dir))

