"""privacy = "client": the epsilon Flower's wrapper reports is that of the mechanism it runs.

The wrapper averages exactly m clipped updates and adds N(0, (sigma C / m)^2): with m fixed,
neighbouring runs replace one merchant, and one release moves the average by up to 2C / m. Its
Renyi DP is k * 2 alpha / sigma^2 after k releases (sensitivity 2 at noise sigma), computed
here in closed form and converted to (epsilon, delta) independently of both accountants.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import GaussianPrivacyEvent

from server.strategies import ReplaceOneAccountant, build_strategy
from shared.config import RunConfig
from shared.data.synthetic import SyntheticSpec, synthetic_catalog
from shared.params import init_global_arrays
from shared.wire import TrainReply, from_array_record, to_array_record


def replace_one_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` replace-one Gaussian releases (sensitivity 2, noise sigma): the RDP
    curve 2 k alpha / sigma^2, converted with the bound of Canonne, Kamath and Steinke (2020),
    minimized over a fine grid of orders."""
    alphas = np.linspace(1.01, 200.0, 200_000)
    rdp = 2.0 * releases * alphas / sigma**2
    eps = rdp + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
    return float(eps.min())


@pytest.mark.parametrize(("sigma", "releases", "delta", "issue_figure"), [(1.0, 3, 0.02, 14.1), (1.0, 10, 0.02, 35.7), (2.0, 2, 0.1 / 3, None)])
def test_the_accounted_epsilon_is_the_replace_one_mechanisms(sigma, releases, delta, issue_figure):
    cfg = RunConfig.from_flower({"privacy": "client", "mf-solver": "sgd", "client-noise-multiplier": sigma, "target-epsilon": 100.0,
                                 "target-delta": delta, "min-nodes": 3})
    strategy, epsilon = build_strategy(cfg, 3, synthetic_catalog(SyntheticSpec(users=30, ads=20, merchants=3)))
    accountant = strategy.accountant  # type: ignore[attr-defined]
    assert isinstance(accountant, ReplaceOneAccountant)
    accountant.compose(GaussianPrivacyEvent(sigma, 3, 3), count=releases)  # what the wrapper composes per round
    expected = replace_one_epsilon(sigma, releases, delta)
    assert epsilon() == pytest.approx(expected, rel=2e-3)
    if issue_figure is not None:  # the issue's figures: 5.2 and 12.3 were accounted, these hold
        assert epsilon() == pytest.approx(issue_figure, abs=0.05)
    # the budget check sees the same mechanism: one more release of the same kind
    assert accountant.would_exceed(GaussianPrivacyEvent(sigma, 3, 3), max_epsilon=expected) is True


@pytest.mark.usefixtures("as_server")
def test_the_wrapper_runs_the_mechanism_accounted_for():
    """What the accounting assumes of Flower's wrapper: it waits for exactly m replies, weighs
    them equally, clips each update to C and adds noise of std sigma C / m to their mean. With m
    equal updates (inside the clip) the aggregate is the model plus that update plus the noise."""
    sigma, clip, m = 2.0, 0.5, 3
    cfg = RunConfig.from_flower({"privacy": "client", "mf-solver": "sgd", "client-noise-multiplier": sigma, "client-clip-norm": clip,
                                 "target-epsilon": 100.0, "min-nodes": m, "factors": 8})
    strategy, _ = build_strategy(cfg, m, synthetic_catalog(SyntheticSpec(users=30, ads=20000, merchants=3)))
    current = init_global_arrays(20000, 8, 0)
    step = {key: np.full_like(value, 1e-4) for key, value in current.items()}  # norm 0.04, inside the clip
    request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    replies = [TrainReply(f"m{i}", {k: current[k] + step[k] for k in current}, 1.0).to_message(request) for i in range(m)]
    strategy.configure_train(1, to_array_record(current), ConfigRecord(), _Grid(m))  # the m sampled replies it will wait for
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    result = from_array_record(aggregated)
    noise = np.concatenate([(result[k] - current[k] - step[k]).ravel() for k in current])
    assert noise.std() == pytest.approx(sigma * clip / m, rel=0.02) and abs(noise.mean()) < 0.01
    strategy.configure_train(2, to_array_record(current), ConfigRecord(), _Grid(m))
    aggregated, _ = strategy.aggregate_train(2, replies[:-1])  # one reply fewer: the mechanism is not run
    assert aggregated is None


class _Grid:
    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))
