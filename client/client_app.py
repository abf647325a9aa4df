"""The Flower ClientApp: one merchant's side of a round.

train:    user step (local, exact, persisted) -> ad step -> reply with the ad parameters only.
evaluate: refit the user factors against the received global model -> ranking metrics of
          this merchant's held-out interactions (aggregates only) and the TopPop floor.
Replies carry the global parameters' keys, counts and metric means: no user id, no user factor.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.shard import NodeRuntime, node_runtime
from shared.config import RunConfig
from shared.model import check_global_arrays
from shared.records import from_array_record, to_array_record

# Several simulated clients share the machine's cores: one torch thread each unless told otherwise.
torch.set_num_threads(int(os.environ.get("FEDADS_TORCH_THREADS", "1")))

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, NodeRuntime, dict[str, np.ndarray], int]:
    cfg = RunConfig.from_flower(context.run_config)
    node = node_runtime(cfg, context.node_config)
    arrays = from_array_record(msg.content["arrays"])
    check_global_arrays(arrays, node.trainer.split.num_ads, cfg.factors)
    server_round = int(msg.content["config"]["server-round"])
    return cfg, node, arrays, server_round


def _rng(cfg: RunConfig, node: NodeRuntime, server_round: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, server_round, purpose, zlib.crc32(node.name.encode())])


def _fit_and_store_users(cfg: RunConfig, node: NodeRuntime, arrays: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    init = node.state.load_user_factors(node.user_ids, cfg.factors)
    factors = node.trainer.fit_users(arrays, rng, init)
    node.state.save_user_factors(node.user_ids, factors)
    return factors


def _reply(msg: Message, node: NodeRuntime, metrics: dict[str, float], arrays: dict[str, np.ndarray] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "client": ConfigRecord({"name": node.name})})
    if arrays is not None:
        content["arrays"] = to_array_record(arrays)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node, arrays, server_round = _setup(msg, context)
    rng = _rng(cfg, node, server_round, purpose=0)
    node.state.save_global_model(arrays, server_round - 1)
    user_factors = _fit_and_store_users(cfg, node, arrays, rng)
    updated, stats = node.trainer.train_ads(arrays, user_factors, rng)
    return _reply(msg, node, {"num-examples": float(node.trainer.split.num_users), **stats}, updated)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, node, arrays, server_round = _setup(msg, context)
    node.state.save_global_model(arrays, server_round)
    user_factors = _fit_and_store_users(cfg, node, arrays, _rng(cfg, node, server_round, purpose=1))
    metrics = node.trainer.evaluate(arrays, user_factors)
    metrics.update({f"toppop-{k}": v for k, v in node.trainer.evaluate_toppop().items() if k != "num-test-users"})
    metrics["num-examples"] = metrics.pop("num-test-users")
    return _reply(msg, node, metrics)
