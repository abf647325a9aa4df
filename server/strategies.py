"""The Flower strategy of a run, chosen by its solver and privacy mode.

- ALS (mf-solver = "als"): `ALSAggregation`, a FedAvg that sums statistics and solves the ads;
- SGD: Flower's `FedAvg` of the merchants' ad parameters, weighted by users, and for
  privacy = "client" inside Flower's client-level DP wrapper (server-side fixed clipping,
  Gaussian noise, its RDP accountant); the unit there is a whole merchant.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from server.als_aggregation import ALSAggregation
from shared.accounting import default_delta
from shared.als import ALSSettings
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.wire import ARRAYS, CONFIG, NUM_EXAMPLES

ServerEpsilon = Callable[[], "float | None"]


def build_strategy(cfg: RunConfig, num_nodes: int, catalog: AdCatalog, rounds_done: int = 0) -> tuple[Strategy, ServerEpsilon]:
    """The strategy, and how to read the server-side epsilon (client-level DP only).

    On resume, the client-level accountant is replayed with the releases of the finished rounds."""
    sampling = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes,
    )
    wire = dict(weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS, configrecord_key=CONFIG)
    if cfg.mf_solver == "als":
        tags = catalog.tag_membership() if cfg.als_catalog_prior else None
        return ALSAggregation(ALSSettings.from_config(cfg), len(catalog), cfg.factors, tags=tags, **sampling, **wire), lambda: None
    fedavg = FedAvg(**sampling, **wire)  # type: ignore[arg-type]
    if cfg.privacy != "client":
        return fedavg, lambda: None
    sampled = max(int(num_nodes * cfg.fraction_train), cfg.min_nodes)
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=cfg.target_delta or default_delta(num_nodes),
        population_size=num_nodes,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.target_epsilon,
    ))
    if rounds_done:
        accountant.compose(GaussianPrivacyEvent(cfg.client_noise_multiplier, sampled, num_nodes), count=rounds_done)
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        fedavg, cfg.client_noise_multiplier, cfg.client_clip_norm, sampled, accountant=accountant
    )

    def epsilon() -> float | None:
        spent = wrapper.privacy_spent()
        return None if spent is None else spent.epsilon

    return wrapper, epsilon
