"""One merchant's side of a round: the ClientApp's message handlers (client/client_app.py).

train:    user step (local, exact, persisted) -> the ad step's local update, released through
          the merchant's privacy plan -> a training reply (shared/wire.TrainReply); a training
          message that says EVALUATE_FIRST (carry-evaluation) is first evaluated as below, as the
          previous round's, and its reply carries both releases.
evaluate: refit the user factors against the received global model -> ranking metrics of
          this merchant's held-out interactions, released through the plan.
Replies carry the global parameters' keys (or ALS statistics), counts and metric means: no
user id, no user factor. A plan that does not allow a release refuses; the refusal is
answered here, in one place, with an error reply that says why.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType

from client.node_data import Node, load_node
from client.privacy.ledger import PrivacyLedger, PrivacyRefusal
from client.privacy.plan import PrivacyPlan
from client.privacy.registry import PLANS, open_plan, plan_name
from client.release_record import ReleaseRecord, release_key
from client.secure_aggregation import secure_threshold
from client.solvers.base import Solver
from client.solvers.registry import SOLVERS, solver_for
from shared.app_log import log
from shared.config import RunConfig
from shared.content_affinity import ContentBlend
from shared.node_config import NodeConfig
from shared.params import check_global_arrays, global_shapes, user_dim
from shared.privacy_policy import PolicyViolation
from shared.wire import (
    POPULARITY,
    RELEASES,
    STATISTICS,
    Arrays,
    EvaluateReply,
    TrainReply,
    evaluates_first,
    failure,
    read_instruction,
    recorded_reply,
    refusal,
    requested_release,
)

Step = Callable[[RunConfig, Node, Solver, "PrivacyPlan[Any]", Arrays, int, str], "TrainReply | EvaluateReply"]


def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate)


def _handle(msg: Message, context: Context, step: Step) -> Message:
    cfg = RunConfig.from_flower(context.run_config)
    node_config = NodeConfig.from_flower(context.node_config)
    try:
        policy = node_config.policy(cfg)
        policy.admit(cfg)  # before any data is read: the run config is only the operator's request
    except PolicyViolation as violation:
        log.warning("%s refuses the run: %s", node_config.name, violation)
        return refusal(msg, node_config.name, str(violation))
    try:
        node = load_node(cfg, node_config)
        arrays, server_round = read_instruction(msg)
        release = requested_release(msg)
        check_global_arrays(arrays, global_shapes(cfg, node.data.num_ads))
        threshold = secure_threshold(context)  # set by the node's own SecAgg+ mod, never by a message
        carries = msg.metadata.message_type == MessageType.TRAIN and evaluates_first(msg)
        # read, check, release and record as one: the SuperNode may run this node's messages at once
        with PrivacyLedger.lock(node.state.directory):
            record = ReleaseRecord(node.state.directory, msg.metadata.message_type)
            kind = _release_kind(msg.metadata.message_type, release) + ("+evaluation" if carries else "")
            key = release_key(kind, context.run_config, arrays, server_round)
            # a secure release carries a share of the noise: sent again into another sum, the
            # difference of the two sums would show it. Each secure collect is a new release
            if threshold is None and (recorded := record.load(key)) is not None:
                log.info("%s answers round %d again with its recorded release (no new budget spent)", node_config.name, server_round)
                return recorded_reply(msg, node_config.name, recorded.metrics, recorded.arrays)
            plan = open_plan(cfg, policy, node.data.num_users, node.state.directory)
            if threshold is not None:
                plan.share_noise(policy.secure_noise_share(threshold))
            solver = solver_for(cfg, node.data)
            reply: TrainReply | EvaluateReply
            if carries:  # the previous round's model's evaluation first (carry-evaluation), then training from it
                evaluation, fitted = _carried_evaluation(cfg, node, solver, plan, arrays, server_round - 1, context.run_config)
                reply = dataclasses.replace(_train(cfg, node, solver, plan, arrays, server_round, release, fitted), evaluation=evaluation)
            else:
                reply = step(cfg, node, solver, plan, arrays, server_round, release)
            if threshold is None:
                if isinstance(reply, TrainReply):
                    record.save(key, reply.recorded_metrics(), reply.arrays)
                else:
                    record.save(key, reply.metric_record(), None)
    except PrivacyRefusal as refused:  # its reason is written from public values only
        log.warning("%s refuses: %s", node_config.name, refused)
        return refusal(msg, node_config.name, str(refused))
    except Exception:  # whatever failed, its text stays here: it may quote the merchant's data
        log.exception("%s could not answer this message", node_config.name)
        return failure(msg, node_config.name)
    return reply.to_message(msg)


def _release_kind(message_type: str, release: str) -> str:
    """What a message asks for, as its release record keys it (an evaluate message: "statistics")."""
    return f"{message_type}/{release}"


def _rng(cfg: RunConfig, node: Node, server_round: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, server_round, purpose, zlib.crc32(node.name.encode())])


def _fit_and_store_users(cfg: RunConfig, node: Node, solver: Solver, arrays: Arrays, rng: np.random.Generator) -> np.ndarray:
    previous = node.state.load_user_factors(node.data.user_ids, user_dim(arrays)) if solver.warm_starts_users else None
    factors = solver.fit_users(arrays, rng, previous)
    node.state.save_user_factors(node.data.user_ids, factors)
    return factors


def _train(cfg: RunConfig, node: Node, solver: Solver, plan: PrivacyPlan[Any], arrays: Arrays, server_round: int,
           release: str, fitted: np.ndarray | None = None) -> TrainReply:
    """`fitted`: the users' factors against `arrays` that an evaluation of this very model just
    fit and stored, with the model (_carried_evaluation): not fit or stored again."""
    rng = _rng(cfg, node, server_round, purpose=0)
    if fitted is None:
        node.state.save_global_model(arrays, server_round - 1, solver.user_step(), ContentBlend.from_config(cfg))
    if release == POPULARITY:  # counts only: no user step, no model needed
        return plan.release_popularity(node.name, solver, server_round)
    if release != STATISTICS:
        raise ValueError(f"unknown release {release!r}: a training message asks for one of {RELEASES}")
    user_factors = fitted if fitted is not None else _fit_and_store_users(cfg, node, solver, arrays, rng)
    return plan.release_update(node.name, solver, arrays, user_factors, rng, server_round)


def _carried_evaluation(cfg: RunConfig, node: Node, solver: Solver, plan: PrivacyPlan[Any], arrays: Arrays, model_round: int,
                        run_config: dict[str, Any]) -> tuple[EvaluateReply | None, np.ndarray | None]:
    """The reply an evaluate message of round `model_round` with `arrays` would get, recorded as
    that message's release as soon as it is made: a training step that then refuses or fails, the
    same message again, or an evaluate message of that round (a resume with carry-evaluation now
    off) gets it again, no new budget spent. Also the users' factors it fit, where the training
    step may take them (an exact user step: the same ones again). None where the plan refuses it:
    the training goes on, as a refused evaluate message left it."""
    record = ReleaseRecord(node.state.directory, MessageType.EVALUATE)
    key = release_key(_release_kind(MessageType.EVALUATE, STATISTICS), run_config, arrays, model_round)
    if (recorded := record.load(key)) is not None:
        return EvaluateReply.from_metrics(node.name, recorded.metrics), None
    try:
        evaluation, factors = _evaluate_fitting(cfg, node, solver, arrays, model_round, plan)
    except PrivacyRefusal as refused:
        log.warning("%s refuses the evaluation of round %d: %s", node.name, model_round, refused)
        return None, None
    record.save(key, evaluation.metric_record(), None)
    return evaluation, factors if solver.users_are_a_function_of_the_model else None


def _evaluate(cfg: RunConfig, node: Node, solver: Solver, plan: PrivacyPlan[Any], arrays: Arrays, server_round: int,
              release: str) -> EvaluateReply:
    return _evaluate_fitting(cfg, node, solver, arrays, server_round, plan)[0]


def _evaluate_fitting(cfg: RunConfig, node: Node, solver: Solver, arrays: Arrays, server_round: int,
                      plan: PrivacyPlan[Any]) -> tuple[EvaluateReply, np.ndarray]:
    """The evaluation reply, and the users' factors it fit against `arrays` (stored with it)."""
    blend = ContentBlend.from_config(cfg)
    node.state.save_global_model(arrays, server_round, solver.user_step(), blend)
    user_factors = _fit_and_store_users(cfg, node, solver, arrays, _rng(cfg, node, server_round, purpose=1))
    return plan.release_metrics(node.name, node.data, lambda: node.data.evaluate(arrays, user_factors, blend), server_round), user_factors


def first_message_imports(cfg: RunConfig) -> tuple[str, ...]:
    """What a node of a run with this config imports by the end of its first messages (torch
    and Opacus are loaded lazily, by the runs that use them): a simulation's actors can
    import it as they start instead."""
    plan = PLANS[plan_name(cfg)]
    return (__name__, SOLVERS[cfg.mf_solver].module, plan.module, *plan.warm_imports)
