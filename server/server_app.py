"""The Flower ServerApp: owns the global ad parameters, the round loop and the run's outputs.

Flow: validate the run config -> load the public catalog (it fixes the parameter shapes) ->
initial parameters (fresh, or the last checkpoint with `resume=true`) -> federated evaluation
of the starting model -> rounds of FedAvg, each checkpointed with its metrics -> final export.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server import report
from server.checkpoint import Checkpointer
from server.strategy import FedAdsAvg
from shared.config import RunConfig
from shared.data.sources import load_catalog
from shared.model import check_global_arrays, init_global_arrays
from shared.records import from_array_record, to_array_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    catalog = load_catalog(cfg)
    checkpointer = Checkpointer(cfg.output_path)
    config_dump = cfg.to_flower()
    log(INFO, "fedads: %d ads in the catalog (%s); outputs in %s", len(catalog), catalog.source, checkpointer.root)

    strategy = FedAdsAvg(
        num_ads=len(catalog),
        dim=cfg.factors,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes,
        min_available_nodes=cfg.min_nodes,
    )

    if cfg.resume:
        done, arrays, history, saved_config = checkpointer.latest()
        check_global_arrays(arrays, len(catalog), cfg.factors)
        log(INFO, "fedads: resuming after round %d of %d (checkpoint in %s)", done, cfg.num_rounds, checkpointer.checkpoints)
        if done >= cfg.num_rounds:
            log(INFO, "fedads: the checkpoint already covers all %d rounds", cfg.num_rounds)
    else:
        done, history = 0, []
        arrays = init_global_arrays(len(catalog), cfg.factors, cfg.seed)
        initial = strategy.evaluate_round(grid, 0, to_array_record(arrays), ConfigRecord(), timeout=3600)
        history.append({"round": 0, "train": {}, "evaluate": initial, "clients": strategy.client_metrics, "round_seconds": 0.0})
        checkpointer.save_round(0, arrays, history, config_dump)

    log(INFO, "fedads per-round metrics (federated, weighted by test users):\n%s", report.table(history))

    def on_round_end(server_round: int, new_arrays: dict, record: dict) -> None:
        history.append(record)
        checkpointer.save_round(server_round, new_arrays, history, config_dump)
        log(INFO, "fedads %s\n%s", report.header(), "fedads " + report.row(record))

    final = strategy.run_rounds(
        grid,
        to_array_record(arrays),
        first_round=done + 1,
        last_round=cfg.num_rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        on_round_end=on_round_end,
    )
    final_arrays = from_array_record(final)
    path = checkpointer.export_model(
        final_arrays,
        catalog.ad_ids,
        {"rounds": history[-1]["round"], "config": config_dump, "final_metrics": history[-1].get("evaluate", {})},
    )
    log(INFO, "fedads: final metrics table\n%s", report.table(history))
    log(INFO, "fedads: exported the global model to %s", path)


