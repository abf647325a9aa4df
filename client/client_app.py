"""The Flower ClientApp: one merchant's side of a round (client/rounds.py does the work).

This module is what Flower loads, also in the simulation driver that only checks the app can
be loaded: the handlers import torch (and, under DP, Opacus) on a node's first message, so
nothing pays those imports (about 5 s) without training.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

PRIVACY_REFUSED = 4001  # error code of a reply refused by the privacy budget or ledger

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import rounds

    return rounds.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import rounds

    return rounds.evaluate(msg, context)
