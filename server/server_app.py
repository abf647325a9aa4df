"""The Flower ServerApp: owns the global ad parameters, the round loop and the run's outputs.

Flow: validate the run config -> load the public catalog (it fixes the parameter shapes) ->
the strategy (ALS: sum the clients' statistics and solve the ads; SGD: FedAvg, inside Flower's
client-level DP wrapper for privacy = "client") ->
initial parameters (fresh, or the last checkpoint with `resume=true`) -> federated evaluation
of the starting model -> rounds, each checkpointed with its metrics -> final export.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Callable

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server import report
from server.als_strategy import ALSAggregation
from server.checkpoint import Checkpointer
from server.strategy import RoundLog, RoundLoop
from shared.als import ALSSettings
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.data.sources import load_catalog
from shared.params import check_global_arrays, initial_arrays
from shared.privacy import default_delta
from shared.records import from_array_record, to_array_record

app = ServerApp()


def build_strategy(
    cfg: RunConfig, num_nodes: int, catalog: AdCatalog, rounds_done: int = 0
) -> tuple[Strategy, Callable[[], float | None]]:
    """The Flower strategy, and how to read the server-side epsilon (client-level DP only).

    On resume, the client-level accountant is replayed with the releases of the finished rounds."""
    sampling = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes,
    )
    if cfg.mf_solver == "als":
        tags = catalog.tag_membership() if cfg.als_catalog_prior else None
        return ALSAggregation(ALSSettings.from_config(cfg), len(catalog), cfg.factors, tags=tags, **sampling), lambda: None
    fedavg = FedAvg(**sampling)
    if cfg.privacy != "client":
        return fedavg, lambda: None
    # client-level DP: the unit is a whole merchant; the server clips each update and adds noise
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
    return wrapper, lambda: wrapper.privacy_spent().epsilon


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    catalog = load_catalog(cfg)
    checkpointer = Checkpointer(cfg.output_path)
    config_dump = cfg.to_flower()
    log(INFO, "fedads: %d ads in the catalog (%s); outputs in %s", len(catalog), catalog.source, checkpointer.root)

    if cfg.resume:
        done, arrays, history, _ = checkpointer.latest()
        check_global_arrays(arrays, len(catalog), cfg.factors)
        log(INFO, "fedads: resuming after round %d of %d (checkpoint in %s)", done, cfg.num_rounds, checkpointer.checkpoints)
    else:
        done, history = 0, []
        arrays = initial_arrays(cfg.init, catalog.category_codes()[0], cfg.factors, cfg.seed)
    num_nodes = max(len(list(grid.get_node_ids())), cfg.min_nodes)
    strategy, privacy_spent = build_strategy(cfg, num_nodes, catalog, rounds_done=done)
    loop = RoundLoop(strategy, grid, num_ads=len(catalog), dim=cfg.factors)
    if not cfg.resume:
        round_log = RoundLog()
        started = time.perf_counter()
        initial = loop.evaluate(0, to_array_record(arrays), ConfigRecord(), round_log)
        seconds = time.perf_counter() - started  # also the nodes' start-up: their first message
        history.append({"round": 0, "train": {}, "evaluate": initial, "clients": round_log.clients,
                        "round_seconds": seconds, "evaluate_seconds": seconds})
        checkpointer.save_round(0, arrays, history, config_dump)

    log(INFO, "fedads per-round metrics (federated, weighted by test users):\n%s", report.table(history))

    def on_round_end(server_round: int, new_arrays: dict, record: dict) -> None:
        history.append(record)
        checkpointer.save_round(server_round, new_arrays, history, config_dump)
        log(INFO, "fedads %s\n%s", report.header(), "fedads " + report.row(record))

    final = loop.run(
        to_array_record(arrays), first_round=done + 1, last_round=cfg.num_rounds,
        train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
        on_round_end=on_round_end, privacy_spent=privacy_spent,
    )
    path = checkpointer.export_model(
        from_array_record(final),
        catalog.ad_ids,
        {"rounds": history[-1]["round"], "config": config_dump, "final_metrics": history[-1].get("evaluate", {})},
    )
    log(INFO, "fedads: final metrics table\n%s", report.table(history))
    log(INFO, "fedads: exported the global model to %s", path)
