"""One merchant's side of a round (the ClientApp's handlers, client/client_app.py).

train:    user step (local, exact, persisted) -> ad step (plain, or user-level DP-SGD) ->
          reply with the ad parameters only.
evaluate: refit the user factors against the received global model -> ranking metrics of
          this merchant's held-out interactions, released as the privacy config allows.
Replies carry the global parameters' keys, counts and metric means: no user id, no user
factor. Under privacy = "user", a client whose budget (or ledger) does not allow a release
answers with an error reply that says why; the server logs it and goes on with the others.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.client_app import PRIVACY_REFUSED
from client.privacy_ledger import PrivacyLedger, PrivacyRefusal
from client.shard import NodeRuntime, node_runtime
from shared.als import ALSSettings
from shared.config import RunConfig
from shared.params import check_global_arrays
from shared.records import from_array_record, to_array_record

if TYPE_CHECKING:
    from client.private_round import UserLevelDP

log = logging.getLogger(__name__)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, NodeRuntime, dict[str, np.ndarray], int]:
    cfg = RunConfig.from_flower(context.run_config)
    node = node_runtime(cfg, context.node_config)
    arrays = from_array_record(msg.content["arrays"])
    check_global_arrays(arrays, node.trainer.split.num_ads, cfg.factors)
    server_round = int(msg.content["config"]["server-round"])
    return cfg, node, arrays, server_round


def _rng(cfg: RunConfig, node: NodeRuntime, server_round: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, server_round, purpose, zlib.crc32(node.name.encode())])


def user_step(cfg: RunConfig) -> dict[str, Any]:
    """The user step's solver and settings, stored with the global model for serving (fold-in)."""
    if cfg.mf_solver == "als":
        return {"solver": "als", "alpha0": cfg.als_alpha0, "user_l2": cfg.als_user_l2}
    return {"solver": "sgd", "user_l2": cfg.user_l2, "negatives": cfg.negatives, "iters": cfg.user_solver_iters}


def _fit_and_store_users(cfg: RunConfig, node: NodeRuntime, arrays: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    if cfg.mf_solver == "als":
        factors = node.trainer.fit_users_als(arrays, ALSSettings.from_config(cfg))
    else:
        init = node.state.load_user_factors(node.user_ids, cfg.factors)
        factors = node.trainer.fit_users(arrays, rng, init)
    node.state.save_user_factors(node.user_ids, factors)
    return factors


def _reply(msg: Message, node: NodeRuntime, metrics: dict[str, float], arrays: dict[str, np.ndarray] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "client": ConfigRecord({"name": node.name})})
    if arrays is not None:
        content["arrays"] = to_array_record(arrays)
    return Message(content=content, reply_to=msg)


def _refuse(msg: Message, node: NodeRuntime, refusal: PrivacyRefusal) -> Message:
    log.warning("%s refuses: %s", node.name, refusal)
    return Message(Error(code=PRIVACY_REFUSED, reason=f"{node.name} refused: {refusal}"), reply_to=msg)


def _privacy(cfg: RunConfig, node: NodeRuntime) -> tuple[PrivacyLedger, "UserLevelDP | None"]:
    """The node's ledger (read before anything is written to its state directory) and, under
    privacy = "user", its DP plan. Raises PrivacyRefusal."""
    ledger = PrivacyLedger.open(node.state.directory, fail_closed=cfg.privacy == "user")
    if cfg.privacy != "user":
        return ledger, None
    # Opacus (its accountant) is loaded by private runs only
    if cfg.mf_solver == "als":
        from client.private_als import PrivateALS

        return ledger, PrivateALS(cfg, node.trainer, ledger)
    from client.private_round import UserLevelDP

    return ledger, UserLevelDP(cfg, node.trainer, ledger)


def first_message_imports(cfg: RunConfig) -> tuple[str, ...]:
    """What a node of a run with this config imports by the end of its first messages (torch
    and Opacus are loaded lazily, by the runs that use them): a simulation's actors can
    import it as they start instead."""
    modules = ["client.rounds"]
    if cfg.mf_solver == "sgd":
        modules.append("client.sgd_step")  # torch
    if cfg.privacy == "user":
        modules += ["client.private_als"] if cfg.mf_solver == "als" else ["client.private_round", "client.private_step"]
        modules.append("opacus.accountants")  # the ledger's epsilon (shared/privacy.epsilon_of)
    return tuple(modules)


def train(msg: Message, context: Context) -> Message:
    cfg, node, arrays, server_round = _setup(msg, context)
    try:
        ledger, private = _privacy(cfg, node)
    except PrivacyRefusal as refusal:
        return _refuse(msg, node, refusal)
    rng = _rng(cfg, node, server_round, purpose=0)
    node.state.save_global_model(arrays, server_round - 1, user_step(cfg))
    user_factors = _fit_and_store_users(cfg, node, arrays, rng)
    if cfg.mf_solver == "als":
        return _train_als(msg, cfg, node, ledger, private, user_factors, server_round)
    if private is None:
        ledger.record_non_private(trained_round=True)
        updated, stats = node.trainer.train_ads(arrays, user_factors, rng)
    else:
        try:
            updated, stats = private.train(arrays, user_factors, rng, server_round)
        except PrivacyRefusal as refusal:
            return _refuse(msg, node, refusal)
    # Flower's client-level DP accounting needs equal weights: every merchant counts once
    weight = 1.0 if cfg.privacy == "client" else float(node.trainer.split.num_users)
    return _reply(msg, node, {"num-examples": weight, **stats}, updated)


def _train_als(
    msg: Message, cfg: RunConfig, node: NodeRuntime, ledger: PrivacyLedger, private: UserLevelDP | None,
    user_factors: np.ndarray, server_round: int,
) -> Message:
    """The ALS ad step's client half: the shard's sufficient statistics (noised under DP)."""
    settings = ALSSettings.from_config(cfg)
    stats = {key: value.astype(np.float32) for key, value in node.trainer.als_statistics(user_factors, settings).items()}
    if private is None:
        ledger.record_non_private(trained_round=True)
        return _reply(msg, node, {"num-examples": float(node.trainer.split.num_users)}, stats)
    from client.private_als import PrivateALS

    assert isinstance(private, PrivateALS), "privacy = user with mf-solver = als plans a PrivateALS"
    try:
        noisy, privacy = private.release_statistics(stats, settings, server_round)
    except PrivacyRefusal as refusal:
        return _refuse(msg, node, refusal)
    # the user count is not released under DP: the server sums statistics, it does not weigh them
    return _reply(msg, node, {"num-examples": 1.0, **privacy}, noisy)


def evaluate(msg: Message, context: Context) -> Message:
    cfg, node, arrays, server_round = _setup(msg, context)
    try:
        ledger, private = _privacy(cfg, node)
    except PrivacyRefusal as refusal:
        return _refuse(msg, node, refusal)
    if private is None:
        ledger.record_non_private(trained_round=False)  # exact metrics leave: no DP claim after this
    node.state.save_global_model(arrays, server_round, user_step(cfg))
    user_factors = _fit_and_store_users(cfg, node, arrays, _rng(cfg, node, server_round, purpose=1))
    metrics = node.trainer.evaluate(arrays, user_factors)
    if private is None:
        metrics.update({f"toppop-{k}": v for k, v in node.trainer.evaluate_toppop().items() if k != "num-test-users"})
    else:
        # TopPop of the shard depends on every user's data at once: not released under DP
        try:
            metrics = private.release_metrics(metrics, server_round)
        except PrivacyRefusal as refusal:
            return _refuse(msg, node, refusal)
    metrics["num-examples"] = metrics.pop("num-test-users", metrics.get("num-examples", 1.0))
    return _reply(msg, node, metrics)
