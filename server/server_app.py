"""The Flower ServerApp: owns the global ad parameters, the round loop and the run's outputs.

Flow: validate the run config -> load the public catalog (it fixes the parameter shapes) ->
the strategy (server/strategies.py) ->
initial parameters (fresh, or the last checkpoint with `resume=true`) -> federated evaluation
of the starting model -> rounds, each checkpointed with its metrics -> final export.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server import report
from server.als_aggregation import ALSAggregation
from server.checkpoint import Checkpointer, RunStatus, catalog_identity, check_resume_catalog, check_resume_config, exclusive_output
from server.probes import probe, write_probes
from server.prompt_grid import PromptGrid
from server.round_loop import EVALUATION_PENDING, RoundLog, RoundLoop, RunEndedShort, awaiting_evaluation, one_line
from server.secure_round import SecureTraining
from server.strategies import build_strategy
from shared.als import ALSSettings
from shared.app_log import log
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.data.sources import load_catalog
from shared.flower_internals import CheckedGrid, prompt_object_pulls
from shared.params import check_global_arrays, global_shapes, initial_model
from shared.wire import Arrays, from_array_record, to_array_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # the simulation runtime's grid (CheckedGrid) is already woken by each reply, and checks its actors
    grid = grid if isinstance(grid, CheckedGrid) else PromptGrid(grid)
    prompt_object_pulls()  # replies pulled as soon as they are in (shared/flower_internals.py)
    cfg = RunConfig.from_flower(context.run_config)
    catalog = load_catalog(cfg)
    checkpointer = Checkpointer(cfg.output_path)
    config_dump = cfg.to_flower()
    catalog_record = catalog_identity(catalog)
    log.info("fedads: %d ads in the catalog (%s); outputs in %s", len(catalog), catalog.source, checkpointer.root)
    with exclusive_output(checkpointer.root, context.run_id):  # before anything in the folder is read or written
        _start(cfg, grid, context, checkpointer, catalog, catalog_record, config_dump)


def _start(cfg: RunConfig, grid: Grid, context: Context, checkpointer: Checkpointer, catalog: AdCatalog,
           catalog_record: dict[str, Any], config_dump: dict[str, Any]) -> None:
    if cfg.resume:
        done, arrays, history, stored_config = checkpointer.latest()
        check_resume_config(stored_config, config_dump, cfg.accepted_resume_changes)
        check_resume_catalog(checkpointer.catalog(), catalog_record, catalog.source, cfg.accepted_resume_changes)
        check_global_arrays(arrays, global_shapes(cfg, len(catalog)))
        log.info("fedads: resuming after round %d of %d (checkpoint in %s)", done, cfg.num_rounds, checkpointer.checkpoints)
    else:
        done, history = 0, []
        arrays = initial_model(cfg, catalog)
    status = RunStatus(checkpointer, flower_run_id=context.run_id, rounds_planned=cfg.num_rounds, rounds_completed=done)
    try:
        _run(cfg, grid, context, checkpointer, catalog, catalog_record, config_dump, status, done, arrays, history)
    except RunEndedShort:
        raise
    except BaseException as exc:  # the status file must not say "running" for a ServerApp that died
        status.update(status="failed", reason=one_line(f"{type(exc).__name__}: {exc}"))
        raise


def _run(cfg: RunConfig, grid: Grid, context: Context, checkpointer: Checkpointer, catalog: AdCatalog, catalog_record: dict[str, Any],
         config_dump: dict[str, Any], status: RunStatus, done: int, arrays: Arrays, history: list[dict[str, Any]]) -> None:
    num_nodes = max(len(list(grid.get_node_ids())), cfg.min_nodes)
    strategy, privacy_spent = build_strategy(cfg, num_nodes, catalog, rounds_done=done, initial=None if done else arrays)
    # private ALS remembers the pooled noisy counts and its popularity rule's decision across rounds
    remembering = strategy if isinstance(strategy, ALSAggregation) else None
    if remembering is not None and done and (state := checkpointer.server_state(done)) is not None:
        remembering.restore(state)
    secure = None
    if cfg.secure_aggregation:
        settings = ALSSettings.from_config(cfg)
        secure = SecureTraining(settings, cfg.max_users_per_merchant, cfg.secure_threshold, cfg.reply_timeout, context)
    loop = RoundLoop(strategy, grid, global_shapes(cfg, len(catalog)), timeout=cfg.reply_timeout, min_replies=cfg.quorum,
                     retries=cfg.round_retries, secure=secure, carry_evaluation=cfg.evaluation_carried)
    if cfg.probe_messages:
        probes = probe(grid, cfg.probe_messages, cfg.reply_timeout)
        log.info("fedads: %d probe exchanges with %d nodes, median %.3f s (%s)", cfg.probe_messages, probes["nodes"],
                 probes["median_seconds"], write_probes(checkpointer.root, probes))
    if not cfg.resume:
        # round 0: the initial model's evaluation (with carry-evaluation, by round 1's messages)
        initial: dict[str, Any] = {"round": 0, "train": {}, "evaluate": {}, "clients": {}, "participants": RoundLog().participants(),
                                   EVALUATION_PENDING: True}
        if not loop.carry_evaluation:
            loop.evaluate(initial, to_array_record(arrays), ConfigRecord())  # also the nodes' start-up: their first message
        initial["round_seconds"] = initial.get("evaluate_seconds", 0.0)
        history.append(initial)
        checkpointer.save_round(0, arrays, history, config_dump, catalog=catalog_record)

    log.info("fedads per-round metrics (federated, weighted by test users):\n%s", report.table(history))

    def on_round_end(server_round: int, new_arrays: Arrays, record: dict[str, Any]) -> None:
        history.append(record)
        checkpointer.save_round(server_round, new_arrays, history, config_dump, remembering.state() if remembering else None,
                                catalog=catalog_record)
        status.update(rounds_completed=server_round)
        if EVALUATION_PENDING not in record:
            log.info("fedads %s\n%s", report.header(), "fedads " + report.row(record))

    def on_evaluated(record: dict[str, Any]) -> None:  # a round's evaluation that came after its checkpoint
        checkpointer.save_history(history)
        log.info("fedads %s\n%s", report.header(), "fedads " + report.row(record))

    outcome = loop.run(
        to_array_record(arrays), first_round=done + 1, last_round=cfg.num_rounds,
        train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
        on_round_end=on_round_end, privacy_spent=privacy_spent,
        pending=awaiting_evaluation(history, loop.carry_evaluation), on_evaluated=on_evaluated,
    )
    completed = history[-1]["round"]
    path = checkpointer.export_model(
        from_array_record(outcome.arrays),
        catalog.ad_ids,
        {"rounds": completed, "config": config_dump, "final_metrics": history[-1].get("evaluate", {})},
    )
    status.update(status="complete" if outcome.short_reason is None else "ended-short", rounds_completed=completed,
                  reason=outcome.short_reason, failed_round=outcome.failed_round)
    log.info("fedads: final metrics table\n%s", report.table(history))
    log.info("fedads: exported the global model to %s", path)
    if outcome.short_reason is not None:
        # a failed ServerApp: `flwr run` and the simulation harness report the run as failed
        raise RunEndedShort(f"the run ended after round {completed} of {cfg.num_rounds}: {outcome.short_reason} "
                            f"(resume with resume=true once the cause is fixed; {checkpointer.root / 'run_status.json'})")
