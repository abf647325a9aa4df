"""A merchant's privacy plan: what it releases in a run, how, and its record of it (its ledger).

Every reply that leaves a merchant goes through its plan: the ad step's update each training
round (`release_update`), the evaluation metrics (`release_metrics`). The plan records each
release in the merchant's persistent ledger before the reply leaves, and refuses (raising
`PrivacyRefusal`) what its budget or ledger does not allow.

- `NoPrivacy` (privacy = "none") and `ClientLevel` (privacy = "client": Flower clips and
  noises whole merchant updates on the server) release exact values; the ledger counts them,
  so no later DP claim is made for the state directory. A state directory whose ledger holds a
  DP budget never makes such a release.
- `UserLevelPlan` (privacy = "user") is the base of the user-level DP plans: it binds the
  budget (the merchant policy's delta), plans the run's releases once per state directory (the
  subclass calibrates its noise), and releases metrics noised or not at all.
  `client/privacy/dp_sgd.py` and `client/privacy/private_als.py` are its two mechanisms.
Nothing a DP plan releases is derived from the exact number of the merchant's users or rows:
the shard's size is private (add or remove one user changes it).
DP noise and user sampling draw from OS entropy, never from the public run seed: a server
that knows the config cannot replay them.
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import numpy as np

from client.privacy.ledger import PrivacyLedger, PrivacyRefusal
from shared.accounting import METRIC_SENSITIVITY, CalibrationError, Release
from shared.app_log import log
from shared.config import RunConfig
from shared.metrics import METRIC_NAMES, NUM_TEST_USERS
from shared.privacy_policy import PrivacyPolicy
from shared.wire import ALS_ADS, Arrays, EvaluateReply, PrivacyReport, TrainReply

if TYPE_CHECKING:
    from client.node_data import NodeData
    from client.solvers.base import Solver


SolverT = TypeVar("SolverT", bound="Solver")


def wire_dtype(arrays: Arrays) -> Arrays:
    """The solver's update as float32, the dtype of a release before any noise (noise drawn in
    float64 makes a noised release float64); a sparse release's ad indices (ALS_ADS) as they are."""
    return {key: value if key == ALS_ADS else value.astype(np.float32) for key, value in arrays.items()}


FLOAT16_LIMIT = 0.5 * float(np.finfo(np.float16).max)  # headroom: rounding near the top must not overflow


def compact_wire(arrays: Arrays) -> Arrays:
    """A noisy release as float16 where its values fit (rounding is post-processing; its error
    is about 4e-4 of the DP noise, docs/BENCHMARKS.md "Scale"), else float32."""
    return {key: value.astype(np.float16) if float(np.max(np.abs(value), initial=0.0)) < FLOAT16_LIMIT else value.astype(np.float32)
            for key, value in arrays.items()}


def noisy_release_wire(cfg: RunConfig, noisy: Arrays) -> Arrays:
    """A noisy release as it travels (wire-dtype): float16 where it fits on the plain path ("auto")
    or when asked, else float32 (secure aggregation quantizes float32 itself)."""
    compact = cfg.wire_dtype == "float16" or (cfg.wire_dtype == "auto" and not cfg.secure_aggregation)
    return compact_wire(noisy) if compact else wire_dtype(noisy)


Metrics = Callable[[], dict[str, float]]  # NodeData.evaluate of this round: computed only if released


class PrivacyPlan(ABC, Generic[SolverT]):
    name: ClassVar[str]

    def __init__(self, cfg: RunConfig, policy: PrivacyPolicy, num_users: int, ledger: PrivacyLedger) -> None:
        self.cfg, self.policy, self.num_users, self.ledger = cfg, policy, num_users, ledger

    @abstractmethod
    def release_update(
        self, client: str, solver: SolverT, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator, server_round: int
    ) -> TrainReply:
        """The training reply of this round: the solver's update as this plan lets it leave."""

    def release_popularity(self, client: str, solver: SolverT, server_round: int) -> TrainReply:
        """The ads' noisy positive counts alone (private ALS's first release, shared/als.py)."""
        raise PrivacyRefusal(f"the {self.name} plan makes no popularity release: only private ALS does")

    @abstractmethod
    def release_metrics(self, client: str, data: NodeData, metrics: Metrics, server_round: int) -> EvaluateReply:
        """The evaluation reply: the round's metrics as this plan lets them leave."""

    def share_noise(self, share: float) -> None:
        """Under secure aggregation: add `share` of the release's noise variance (the rest comes
        from the other releases of the sum; client/secure_aggregation.py). Only a plan whose
        release is one Gaussian sum can split its noise."""
        raise PrivacyRefusal(f"the {self.name} plan cannot split its noise for secure aggregation")


# what an exact release reports: no finite epsilon covers it
WITHOUT_DP = PrivacyReport(math.inf, 0.0)


class NoPrivacy(PrivacyPlan["Solver"]):
    """Exact releases, each counted in the ledger: no DP claim is made after them, and every
    reply says so (epsilon infinite)."""

    name = "none"

    def __init__(self, cfg: RunConfig, policy: PrivacyPolicy, num_users: int, ledger: PrivacyLedger) -> None:
        super().__init__(cfg, policy, num_users, ledger)
        if ledger.state.target_epsilon is not None:
            raise PrivacyRefusal(f"{ledger.path} holds a differential-privacy budget: this state directory makes no release "
                                 "without DP (start a non-private run with a new state directory)")

    def weight(self) -> float:
        return float(self.num_users)

    def release_update(
        self, client: str, solver: Solver, arrays: Arrays, user_factors: np.ndarray, rng: np.random.Generator, server_round: int
    ) -> TrainReply:
        self.ledger.record_non_private(trained_round=True)  # before the work: no DP claim is made after this
        update = solver.local_update(arrays, user_factors, rng)
        return TrainReply(client, wire_dtype(update.arrays), self.weight() if solver.sends_weight else None, update.metrics, WITHOUT_DP)

    def release_metrics(self, client: str, data: NodeData, metrics: Metrics, server_round: int) -> EvaluateReply:
        self.ledger.record_non_private(trained_round=False)
        exact = metrics()
        popularity = {k: v for k, v in data.evaluate_popularity().items() if k != NUM_TEST_USERS}
        return EvaluateReply(client, exact[NUM_TEST_USERS], _means(exact), popularity, WITHOUT_DP)


class ClientLevel(NoPrivacy):
    """Flower's client-level DP (server-side clipping and noise): every merchant weighs the same,
    as its accounting requires; from the merchant's side, its releases are exact."""

    name = "client"

    def weight(self) -> float:
        return 1.0


class UserLevelPlan(PrivacyPlan[SolverT]):
    """User-level DP over the merchant's persistent ledger (docs/PRIVACY.md).

    Plan (once, on the first DP round of a state directory): the subclass calibrates its noise
    multiplier so that all its planned releases, with one noised metrics release per evaluation
    (num-rounds + 1) when dp-metrics = "noised", compose (RDP) to target-epsilon at delta; it is
    stored in the ledger and kept. Every release is checked against the ledger before any work
    (`PrivacyLedger.require`) and recorded (atomically) before the reply leaves."""

    label: ClassVar[str]  # the mechanism, in messages

    def __init__(self, cfg: RunConfig, policy: PrivacyPolicy, num_users: int, ledger: PrivacyLedger) -> None:
        super().__init__(cfg, policy, num_users, ledger)
        delta = policy.delta_for(cfg)  # below 1 / the policy's public max-users; never checked against the actual count
        if num_users > policy.max_users:  # a refusal would leak the count: the merchant's own log says it
            log.warning("this shard has more users than its policy's max-users (%d): its delta %g is weaker than meant",
                        policy.max_users, delta)
        target_epsilon = ledger.bind(cfg.target_epsilon, delta)
        if ledger.state.noise_multiplier is None:
            try:
                ledger.state.noise_multiplier = self.calibrate(target_epsilon, delta)
            except CalibrationError as exc:
                raise PrivacyRefusal(f"no {self.label} noise fits the budget: {exc}") from exc
            ledger.state.mechanism = self.name
            ledger.save()
        elif (ledger.state.mechanism or "dp-sgd") != self.name:
            raise PrivacyRefusal(
                f"{ledger.path}: this budget was planned for {ledger.state.mechanism or 'dp-sgd'}, "
                f"this run asks for {self.name}: start the merchant with a new state directory"
            )

    @abstractmethod
    def calibrate(self, target_epsilon: float, delta: float) -> float:
        """The noise multiplier of the whole planned training (raises CalibrationError)."""

    @property
    def noise_multiplier(self) -> float:
        assert self.ledger.state.noise_multiplier is not None
        return self.ledger.state.noise_multiplier

    def planned_metric_releases(self) -> list[Release]:
        if self.cfg.dp_metrics != "noised":
            return []
        return [(self.cfg.metrics_noise_multiplier, 1.0, self.cfg.num_rounds + 1)]

    def report(self, noise_multiplier: float | None = None) -> PrivacyReport:
        return PrivacyReport(self.ledger.epsilon(), self.noise_multiplier if noise_multiplier is None else noise_multiplier)

    def release_metrics(self, client: str, data: NodeData, metrics: Metrics, server_round: int) -> EvaluateReply:
        """Evaluation metrics as dp-metrics allows them to leave (docs/PRIVACY.md): noised, or
        not at all. The shard's popularity ranking depends on every user's data at once: never released."""
        if self.cfg.dp_metrics == "none":
            return EvaluateReply(client, 1.0, privacy=self.report())
        release: Release = (self.cfg.metrics_noise_multiplier, 1.0, 1)
        self.ledger.require([release], f"the metrics of round {server_round}")
        exact = metrics()
        count = exact[NUM_TEST_USERS]
        sums = np.array([exact[name] * count for name in METRIC_NAMES] + [count])
        noise_rng = np.random.default_rng(secrets.randbits(128))
        noisy = sums + noise_rng.normal(0.0, self.cfg.metrics_noise_multiplier * METRIC_SENSITIVITY, size=sums.shape)
        self.ledger.record([release])
        noisy_count = max(float(noisy[-1]), 1.0)
        released = {name: float(np.clip(value / noisy_count, 0.0, 1.0)) for name, value in zip(METRIC_NAMES, noisy[:-1])}
        return EvaluateReply(client, noisy_count, released, privacy=self.report())


def _means(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != NUM_TEST_USERS}
