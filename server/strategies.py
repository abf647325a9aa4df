"""The Flower strategy of a run, chosen by its solver and privacy mode.

- ALS (mf-solver = "als"): `ALSAggregation`, a FedAvg that sums statistics and solves the ads;
- SGD: Flower's `FedAvg` of the merchants' ad parameters, and for privacy = "client" inside
  Flower's client-level DP wrapper (server-side fixed clipping, Gaussian noise, its RDP
  accountant); the unit there is a whole merchant.

Client-level DP's accounting: Flower's wrapper waits for exactly m replies, clips each to C,
averages them and adds noise of std noise_multiplier x C / m. With m fixed, neighbouring runs
replace one merchant's update by another (add or remove would change m, which the wrapper
does not allow), so one release moves the average by up to 2C / m: the replace-one Gaussian
mechanism, whose Renyi DP is that of add-or-remove at half the noise multiplier. Flower's RDP
accountant has no replace-one relation without sampling, so `ReplaceOneAccountant` composes
every event at noise_multiplier / 2 (docs/PRIVACY.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyAccountant,
    PrivacyConfig,
    PrivacySpent,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian, Strategy

from server.als_aggregation import ALSAggregation
from shared.accounting import default_delta
from shared.als import ALSSettings, release_budget_shares
from shared.app_log import log
from shared.catalog_features import informative_tags
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.params import initial_model
from shared.wire import AD_FACTORS, ARRAYS, CONFIG, NUM_EXAMPLES, Arrays

ServerEpsilon = Callable[[], "float | None"]


class ReplaceOneAccountant:
    """Flower's RDP accountant for the replace-one Gaussian mechanism without sampling (a
    `flwr.serverapp.PrivacyAccountant`): every event is composed at half its noise multiplier."""

    def __init__(self, inner: PrivacyAccountant) -> None:
        self.inner = inner

    @staticmethod
    def _add_or_remove_equivalent(event: GaussianPrivacyEvent) -> GaussianPrivacyEvent:
        return replace(event, noise_multiplier=event.noise_multiplier / 2)

    @property
    def config(self) -> PrivacyConfig:
        return self.inner.config

    @property
    def num_releases(self) -> int:
        return self.inner.num_releases

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self.inner.compose(self._add_or_remove_equivalent(event), count)

    def get_epsilon(self, delta: float) -> float:
        return self.inner.get_epsilon(delta)

    def get_delta(self, epsilon: float) -> float:
        return self.inner.get_delta(epsilon)

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        return self.inner.get_privacy_spent(delta)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        return self.inner.would_exceed(self._add_or_remove_equivalent(event), max_epsilon, count)

    def state_dict(self) -> dict[str, object]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.inner.load_state_dict(state)


# the catalog prior's [ads, tags] float64 matrix, held a few times over in the solve: above this
# many entries (200 MB a copy) the prior is not applied, and the run says so
PRIOR_MAX_ENTRIES = 25_000_000


def catalog_prior_tags(cfg: RunConfig, settings: ALSSettings, catalog: AdCatalog) -> np.ndarray | None:
    """The catalog prior's tag features, where it acts: under DP with count shrinkage and a
    weight (without DP no ad's factors are shrunk, so nothing would take from its tags);
    None where it does not act, the catalog has no informative tag, or the matrix is too large."""
    if not (cfg.als_catalog_prior and settings.private and settings.count_shrinkage > 0 and settings.prior_weight > 0):
        return None
    entries = len(catalog) * len({tag for ad_tags in catalog.tags for tag in ad_tags})
    if entries > PRIOR_MAX_ENTRIES:
        log.warning("catalog prior: not applied: %d ads x their distinct tags make %d entries, over %d (rarely seen ads "
                    "rank by their noisy popularity alone); als-catalog-prior = false says so without this warning",
                    len(catalog), entries, PRIOR_MAX_ENTRIES)
        return None
    tags = informative_tags(catalog, "catalog prior")
    return tags if tags.shape[1] else None  # nothing to lean on: shrink toward zero


def build_strategy(
    cfg: RunConfig, num_nodes: int, catalog: AdCatalog, rounds_done: int = 0, initial: Arrays | None = None,
) -> tuple[Strategy, ServerEpsilon]:
    """The strategy, and how to read the server-side epsilon (client-level DP only).

    On resume, the client-level accountant is replayed with the releases of the finished rounds.
    `initial`: the run's initial model where the caller has built it already (shared/params.py
    initial_model; built here otherwise, where private ALS needs its warm start)."""
    sampling = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes,
    )
    wire = dict(weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS, configrecord_key=CONFIG)
    if cfg.mf_solver == "als":
        settings = ALSSettings.from_config(cfg)
        tags = catalog_prior_tags(cfg, settings, catalog)
        robust = cfg.robust_clip_factor if cfg.robust_aggregation == "median" else None
        strategy = ALSAggregation(settings, len(catalog), cfg.factors, tags=tags, max_users=cfg.max_users_per_merchant,
                                  robust_factor=robust, num_rounds=cfg.num_rounds, **sampling, **wire)
        if settings.private:  # a resumed run knows its warm start even when its server state was lost
            strategy.warm_factors = (initial if initial is not None else initial_model(cfg, catalog))[AD_FACTORS]
            # the merchants' plans spread their budgets by the run config's (client/privacy/private_als.py)
            strategy.release_shares = release_budget_shares(cfg.num_rounds, cfg.als_budget_growth)
        return strategy, lambda: None
    averaging = FedMedian if cfg.robust_aggregation == "median" else FedAvg
    fedavg = averaging(**sampling, **wire)  # type: ignore[arg-type]
    if cfg.privacy != "client":
        return fedavg, lambda: None
    sampled = max(int(num_nodes * cfg.fraction_train), cfg.min_nodes)
    accountant = ReplaceOneAccountant(RdpAccountant(PrivacyConfig(
        target_delta=cfg.target_delta or default_delta(num_nodes),
        population_size=num_nodes,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.target_epsilon,
    )))
    if rounds_done:
        accountant.compose(GaussianPrivacyEvent(cfg.client_noise_multiplier, sampled, num_nodes), count=rounds_done)
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        fedavg, cfg.client_noise_multiplier, cfg.client_clip_norm, sampled, accountant=accountant
    )

    def epsilon() -> float | None:
        spent = wrapper.privacy_spent()
        return None if spent is None else spent.epsilon

    return wrapper, epsilon
