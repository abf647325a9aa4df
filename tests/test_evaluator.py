"""The harness's exact evaluator gives what the merchants' own evaluation gives, where that is exact."""

from __future__ import annotations

import json

import pytest

from simulations.evaluator import EXACT_HISTORY, write_exact_history
from simulations.runtime import run_simulation
from tests.conftest import small_run_config


@pytest.mark.parametrize("solver", ["sgd", "als"])
def test_the_exact_evaluator_reproduces_the_merchants_own_metrics(tmp_path, solver):
    cfg = small_run_config(tmp_path, **{"mf-solver": solver, "num-rounds": 2, "local-epochs": 1})
    run_simulation(cfg.to_flower(), 3, tmp_path / "flower", timeout=480)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    exact = write_exact_history(cfg, 3, tmp_path / "out")
    assert json.loads((tmp_path / "out" / EXACT_HISTORY).read_text()) == exact
    assert [r["round"] for r in exact] == [r["round"] for r in history] == [0, 1, 2]
    for evaluated, released in zip(exact, history):
        for key, value in evaluated["evaluate"].items():
            assert released["evaluate"][key] == pytest.approx(value, abs=1e-9), (evaluated["round"], key)
        for name, metrics in evaluated["clients"].items():
            for key, value in metrics.items():
                assert released["clients"][name][key] == pytest.approx(value, abs=1e-9), (evaluated["round"], name, key)
