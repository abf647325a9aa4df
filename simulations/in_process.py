"""Flower's exchange with simulated merchants in this process, for tests and benchmarks that
drive the ServerApp's pieces without a runtime: each message is handled by its node's
ClientApp with the node's own context (kept across messages, as a SuperNode keeps it), and
messages and replies are copied, as the wire copies them. Build messages under
`shared.flower_internals.server_identity()`, as Flower's runtime stamps them."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from flwr.app import Context, Message, RecordDict

from client.client_app import app as client_app
from client.solvers.als import ALSSolver
from server.als_aggregation import ALSAggregation
from shared.als import add_noise, popularity_statistics
from shared.config import RunConfig
from shared.flower_internals import wire_bytes
from shared.wire import POPULARITY, Arrays, PrivacyReport, TrainReply, from_array_record


class InProcessGrid:
    def __init__(self, cfg: RunConfig, merchants: int, first_node_id: int = 10) -> None:
        self.contexts = {
            first_node_id + i: Context(run_id=1, node_id=first_node_id + i, node_config={"partition-id": i, "num-partitions": merchants},
                                       state=RecordDict(), run_config=cfg.to_flower())
            for i in range(merchants)
        }
        self.bytes_sent: dict[int, int] = dict.fromkeys(self.contexts, 0)  # by each node, on the wire
        self.bytes_received: dict[int, int] = dict.fromkeys(self.contexts, 0)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            # serializing caches views inside a message (a later deepcopy fails): measured on copies
            # nobody uses after, and before the handler (a mod adds records to what it is given)
            self.bytes_received[node] += len(wire_bytes(copy.deepcopy(msg)))
            answered = client_app(copy.deepcopy(msg), self.contexts[node])
            replies.append(copy.deepcopy(answered))
            self.bytes_sent[node] += len(wire_bytes(answered))
        return replies


def private_als_round(strategy: ALSAggregation, solvers: list[ALSSolver], arrays: Arrays, server_round: int,
                      noise_multiplier: float, rng: np.random.Generator, noise_share: float = 1.0) -> Arrays:
    """One private ALS round in this process, without Flower's runtime, for benchmarks that run
    many: what the round asks for (the strategy's), each merchant's release as its plan makes it
    (client/privacy/private_als.py: its statistics or popularity, noised at `noise_multiplier`, a
    `noise_share` of the variance under secure aggregation) and the strategy's aggregation.
    Returns the round's global model. Noise draws from `rng`, seeded by the caller."""
    release, arrays = strategy.begin_round(server_round, arrays)
    share_std = float(np.sqrt(noise_share))
    replies = []
    for solver in solvers:
        if release == POPULARITY:
            stats = popularity_statistics(solver.data.rows, solver.data.num_ads, solver.settings.max_rows)
        else:
            full = solver.local_update(arrays, solver.fit_users(arrays, rng, None), rng).arrays
            stats = {key: full[key] for key in solver.settings.release_keys(release)}
        stds = {key: std * share_std for key, std in solver.noise_stds(noise_multiplier, release).items()}
        request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
        reply = TrainReply("in-process", add_noise(stats, stds, rng), None, privacy=PrivacyReport(0.0, noise_multiplier * share_std))
        strategy.check_reply(reply.arrays, reply.metric_record())  # what the round loop checks first
        replies.append(reply.to_message(request))
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None, "every in-process reply is valid"
    return from_array_record(aggregated)
