"""The closed loop: train a federated round, serve slates, log the answers, train on them.

Each round:
1. every merchant reads its own log from disk (client/delivery_log.py: its history and every
   delivery batch committed so far), fits its users and releases its update through its privacy
   plan (the very code of a Flower round: private ALS with its persistent ledger under DP); the
   run's strategy aggregates the global ad parameters;
2. every merchant refits its users on the new global model, and its local-only model takes its
   own ALS steps on its own log alone;
3. a share of each merchant's users is active (a per-user, per-round hash draw); each active
   user is served a slate by the policy of their arm (a stable hash of the user: simulations/
   delivery/ab_test-style bucketing over the arms), answers it (simulations/delivery/world.py),
   and the answers are appended to the merchant's log as batch "round-r": impressions without a
   click are the next round's negatives, clicks and purchases its positives.
Restarting the loop on the same directory replays nothing twice: a batch already committed is
skipped (client/delivery_log.py), and the ledgers carry the budget already spent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp.strategy import Strategy

from client.delivery_log import DeliveryLog, LogRow
from client.node_data import NodeData
from client.privacy.registry import open_plan
from client.serving import serving_split
from client.solvers.registry import solver_for
from server.als_aggregation import ALSAggregation
from server.strategies import build_strategy
from shared.catalog_features import normalized_tag_features
from shared.config import RunConfig
from shared.content_affinity import ContentBlend
from shared.data.loaders import load_log_file, write_log_csv
from shared.data.schema import AdCatalog, Dataset, Event, InteractionLog
from shared.data.synthetic import GroundTruth
from shared.flower_internals import server_identity
from shared.params import initial_model, with_public_constants
from shared.privacy_policy import PrivacyPolicy
from shared.wire import POPULARITY, STATISTICS, Arrays, from_array_record
from simulations.delivery.ab_test import assign_policy, unit_interval
from simulations.delivery.policies import ScoreFn, choose_slate, popularity_scores, random_scores
from simulations.delivery.settings import DeliverySettings
from simulations.delivery.world import Responses, SimulatedUsers

log = logging.getLogger("fedads.delivery")
TREATMENT = "federated"
ROUND_SECONDS = 86_400  # a delivery round is a day of the merchant's clock


def active(user_id: str, server_round: int, seed: int, share: float) -> bool:
    """Whether the user visits in this round: their own draw, whoever else visits."""
    return unit_interval(user_id, f"active:{seed}:{server_round}") < share


@dataclass
class Served:
    """Per-user totals of one merchant's delivery, and every impression's ad (exposure)."""

    impressions: dict[str, int] = field(default_factory=dict)
    clicks: dict[str, int] = field(default_factory=dict)
    purchases: dict[str, int] = field(default_factory=dict)
    revenue: dict[str, float] = field(default_factory=dict)
    shown_ads: list[np.ndarray] = field(default_factory=list)

    def add(self, user: str, answer: Responses) -> None:
        self.impressions[user] = self.impressions.get(user, 0) + len(answer.ads)
        self.clicks[user] = self.clicks.get(user, 0) + int(answer.clicked.sum())
        self.purchases[user] = self.purchases.get(user, 0) + int(answer.purchased.sum())
        self.revenue[user] = self.revenue.get(user, 0.0) + float(answer.revenue.sum())
        self.shown_ads.append(answer.ads)

    def impression_ads(self) -> np.ndarray:
        """Every impression's catalog row, in the order served."""
        return np.concatenate(self.shown_ads) if self.shown_ads else np.zeros(0, dtype=np.int64)


@dataclass
class RoundRecord:
    server_round: int
    merchant: str
    arm: str
    users: int
    impressions: int
    clicks: int
    purchases: int
    revenue: float

    def add(self, answer: Responses) -> None:
        """One more user served in this round, merchant and arm."""
        self.users += 1
        self.impressions += len(answer.ads)
        self.clicks += int(answer.clicked.sum())
        self.purchases += int(answer.purchased.sum())
        self.revenue += float(answer.revenue.sum())


@dataclass
class DeliveryResult:
    arms_of: dict[str, str]  # user -> arm
    merchant_of: dict[str, str]  # user -> merchant
    served: dict[str, Served]  # arm -> per-user totals over the rounds this run delivered
    rounds: list[RoundRecord]
    epsilon: dict[str, float]  # merchant -> epsilon spent by its ledger


class DeliveryLoop:
    """The closed loop over a synthetic market: merchants' logs and ledgers live under `work`."""

    def __init__(self, cfg: RunConfig, settings: DeliverySettings, dataset: Dataset, truth: GroundTruth, work: Path) -> None:
        # the privacy plan spreads the merchant's budget over the releases the loop will make
        self.cfg = cfg.with_values("delivery", num_rounds=settings.releases)
        self.local_cfg = self.cfg.with_values("delivery, local-only", privacy="none")
        self.settings = settings
        self.catalog: AdCatalog = dataset.catalog
        self.ad_features = normalized_tag_features(self.catalog)
        self.blend = ContentBlend.from_config(self.cfg)  # the model arms rank as a merchant serves (client/serving.py)
        self.users = SimulatedUsers(truth, settings.responses, cfg.seed)
        self.work = work
        self.policy = PrivacyPolicy.for_simulation(self.cfg)
        merchants = dataset.log.merchant if dataset.log.merchant is not None else np.full(len(dataset.log), "merchant-0", dtype=object)
        self.merchants = sorted({str(m) for m in merchants.tolist()})
        self.logs: dict[str, DeliveryLog] = {}
        for name in self.merchants:
            path = work / name / "log.csv"
            if not path.exists():  # the merchant's history before delivery starts
                # the delivery log's own columns: a merchant's log names no merchant and no region
                history = replace(dataset.log.subset(np.flatnonzero(merchants == name)), merchant=None, region=None)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_log_csv(path, Dataset(dataset.name, self.catalog, history))
            self.logs[name] = DeliveryLog(path)
        self.start_time = int(dataset.log.timestamp.max()) + 1 if len(dataset.log) else 0
        self.local_arrays = {name: initial_model(self.local_cfg, self.catalog) for name in self.merchants}

    def arm_of(self, user_id: str) -> str:
        return assign_policy(user_id, self.settings.experiment, self.settings.arms)

    def merchant_log(self, name: str) -> InteractionLog:
        return load_log_file(self.logs[name].path, self.catalog)

    def run(self, first_round: int = 1, arrays: Arrays | None = None) -> DeliveryResult:
        """Rounds first_round..rounds; a restart passes the round to resume at and the global model it had."""
        built = arrays is None
        arrays = initial_model(self.cfg, self.catalog) if arrays is None else arrays
        with server_identity():  # the replies are Flower messages, as a runtime stamps them
            return self._run(first_round, arrays, arrays if built else None)

    def _run(self, first_round: int, arrays: Arrays, initial: Arrays | None) -> DeliveryResult:
        strategy, _ = build_strategy(self.cfg, len(self.merchants), self.catalog, initial=initial)
        served: dict[str, Served] = {arm: Served() for arm in self.settings.arms}
        records: list[RoundRecord] = []
        arms_of: dict[str, str] = {}
        merchant_of: dict[str, str] = {}
        for server_round in range(first_round, self.settings.rounds + 1):
            data = {name: NodeData(serving_split(self.merchant_log(name), len(self.catalog)), np.zeros((0, 0), dtype=np.int64),
                                   self.ad_features) for name in self.merchants}
            release = self.settings.release_of(server_round)
            if release is not None:
                arrays = self._federated_round(release, arrays, data, strategy)
            for name in self.merchants:
                records += self._deliver(server_round, name, data[name], arrays, served, arms_of, merchant_of)
            log.info("delivery round %d: %s", server_round, ", ".join(
                f"{arm} CTR {_ratio(records, server_round, arm):.4f}" for arm in self.settings.arms))
        epsilon = {name: open_plan(self.cfg, self.policy, 1, self.work / name / "state").ledger.epsilon() for name in self.merchants}
        return DeliveryResult(arms_of, merchant_of, served, records, epsilon)

    def _federated_round(self, server_round: int, arrays: Arrays, data: dict[str, NodeData], strategy: Strategy) -> Arrays:
        # what the release asks for (private ALS: its popularity release first, shared/als.py)
        asked = STATISTICS
        if isinstance(strategy, ALSAggregation):
            asked, arrays = strategy.begin_round(server_round, arrays)
        replies = []
        for name in self.merchants:
            solver = solver_for(self.cfg, data[name])
            rng = np.random.default_rng([self.cfg.seed, server_round, self.merchants.index(name)])
            plan = open_plan(self.cfg, self.policy, data[name].num_users, self.work / name / "state")
            if asked == POPULARITY:
                reply = plan.release_popularity(name, solver, server_round)
            else:
                reply = plan.release_update(name, solver, arrays, solver.fit_users(arrays, rng, None), rng, server_round)
            replies.append(reply.to_message(Message(content=RecordDict(), dst_node_id=1, message_type="train")))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            raise RuntimeError(f"delivery round {server_round}: the strategy aggregated nothing")
        return with_public_constants(from_array_record(aggregated), arrays)

    def _local_only(self, name: str, data: NodeData, server_round: int) -> tuple[Arrays, np.ndarray]:
        """The merchant's own model: ALS steps on its own log alone, warm from last round's."""
        solver = solver_for(self.local_cfg, data)
        rng = np.random.default_rng([self.cfg.seed, server_round, 7])
        arrays = self.local_arrays[name]
        for _ in range(self.settings.local_iterations):
            users = solver.fit_users(arrays, rng, None)
            arrays = solver.solve_alone(solver.local_update(arrays, users, rng))
        self.local_arrays[name] = arrays
        return arrays, solver.fit_users(arrays, rng, None)

    def _deliver(
        self, server_round: int, name: str, data: NodeData, arrays: Arrays, served: dict[str, Served],
        arms_of: dict[str, str], merchant_of: dict[str, str],
    ) -> list[RoundRecord]:
        split = data.split
        user_ids = [str(u) for u in split.user_ids.tolist()]
        rng = np.random.default_rng([self.cfg.seed, server_round, 11, self.merchants.index(name)])
        scorers: dict[str, ScoreFn] = {}
        if TREATMENT in self.settings.arms:
            solver = solver_for(self.cfg, data)
            scorers[TREATMENT] = data.score_fn(arrays, solver.fit_users(arrays, rng, None), self.blend)
        if "local-only" in self.settings.arms:
            scorers["local-only"] = data.score_fn(*self._local_only(name, data, server_round), self.blend)
        if "popularity" in self.settings.arms:
            scorers["popularity"] = popularity_scores(split.pos_ads, len(self.catalog))
        if "random" in self.settings.arms:
            scorers["random"] = random_scores(len(self.catalog))
        rows: list[LogRow] = []
        totals: dict[str, RoundRecord] = {arm: RoundRecord(server_round, name, arm, 0, 0, 0, 0, 0.0) for arm in self.settings.arms}
        timestamp = self.start_time + (server_round - 1) * ROUND_SECONDS
        for index, user in enumerate(user_ids):
            if not active(user, server_round, self.cfg.seed, self.settings.active_share):
                continue
            arm = self.arm_of(user)
            arms_of[user], merchant_of[user] = arm, name
            excluded = np.zeros(len(self.catalog), dtype=bool)
            excluded[split.positives(index)] = True
            user_rng = np.random.default_rng([self.cfg.seed, server_round, int(unit_interval(user, "slate") * 2**63)])
            slate = choose_slate(scorers[arm](np.array([index]))[0], excluded, self.settings.slate_size, self.settings.exploration, user_rng)
            answer = self.users.respond(user, slate, server_round)
            served[arm].add(user, answer)
            totals[arm].add(answer)
            for ad, clicked, purchased in zip(slate.tolist(), answer.clicked.tolist(), answer.purchased.tolist()):
                event = Event.PURCHASE if purchased else Event.CLICK if clicked else Event.IMPRESSION
                rows.append(LogRow(user, self.catalog.ad_ids[ad], timestamp, event))
        self.logs[name].append(f"round-{server_round}", rows)
        return list(totals.values())


def _ratio(records: list[RoundRecord], server_round: int, arm: str) -> float:
    mine = [r for r in records if r.server_round == server_round and r.arm == arm]
    impressions = sum(r.impressions for r in mine)
    return sum(r.clicks for r in mine) / impressions if impressions else float("nan")
