"""The Flower ClientApp: one merchant's side of a round (client/handlers.py does the work).

This module is what Flower loads, also in the simulation driver that only checks the app can
be loaded: the handlers import torch (and, under DP, Opacus) on a node's first message, and
only for the runs that use them, so nothing pays those imports (about 5 s) without training.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp


def secure_aggregation(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's SecAgg+ around training messages of the secure protocol (client/secure_aggregation.py)."""
    from client.secure_aggregation import secure_aggregation_mod

    return secure_aggregation_mod(msg, context, call_next)


def envelope(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A sealed message opened for the handlers, and its reply sealed (shared/envelope.py); an
    unsealed one (the secure-aggregation protocol's) answered unsealed."""
    from shared.envelope import is_sealed, opened, sealed

    if not is_sealed(msg):
        return call_next(msg, context)
    try:
        request = opened(msg)
    except ValueError as exc:
        from shared.app_log import log
        from shared.node_config import NodeConfig
        from shared.wire import failure

        name = NodeConfig.from_flower(context.node_config).name
        log.warning("%s cannot open a message: %.300s", name, exc)
        return failure(msg, name)
    return sealed(call_next(request, context))


app = ClientApp(mods=[envelope, secure_aggregation])


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.train(msg, context)


@app.query()
def probe(msg: Message, context: Context) -> Message:
    """A probe of the message floor (server/probes.py): an empty reply, no data, no privacy spent."""
    return Message(RecordDict(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.evaluate(msg, context)
