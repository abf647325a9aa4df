"""The simulation harness: experiment files, cached and resumable sweeps, results, report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import matplotlib.image
import pytest

import simulations.sweep as sweep
from shared.config import RunConfig
from shared.data.sources import load_dataset
from simulations.baselines import centralized
from simulations.browser_check import chromium, screenshot
from simulations.experiment import ExperimentError, expand_cells, load_experiment
from simulations.results import COLUMNS
from simulations.runtime import run_simulation
from simulations.sweep_progress import BarProgress, PlainProgress, RoundWatcher, sweep_progress
from tests.conftest import processes_mentioning

TINY = """
privacy = "none"
dataset = "synthetic"
synthetic-users = 300
synthetic-ads = 120
partitioning = "merchant"
num-rounds = 2
local-epochs = 2
factors = 8
dp-metrics = "none"

[sweep]
clients = [2]
epsilons = [4]
seeds = [3]
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_errors_name_file_line_and_field(tmp_path):
    text = TINY.replace("num-rounds = 2", "num-rounds = 0")
    path = write(tmp_path, text)
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    message = str(info.value)
    assert f"{path}:{line_of(text, 'num-rounds = 0')}:" in message and "field 'num-rounds'" in message
    text = TINY.replace('partitioning = "merchant"', 'partitioning = "by-merchant"')
    with pytest.raises(ExperimentError, match=rf"exp\.toml:{line_of(text, 'by-merchant')}: field 'partitioning'"):
        load_experiment(write(tmp_path, text))
    text = TINY.replace("factors = 8", "factor = 8")  # a misspelt run-config key is an error, not ignored
    with pytest.raises(ExperimentError, match=rf"exp\.toml:{line_of(text, 'factor = 8')}: field 'factor': Extra inputs"):
        load_experiment(write(tmp_path, text))
    path = write(tmp_path, TINY.replace("[sweep]", "[sweep]\nepsilon = [1]"))
    with pytest.raises(ExperimentError, match=r"field 'sweep\.epsilon': Extra inputs are not permitted"):
        load_experiment(path)
    text = TINY.replace("epsilons = [4]", "epsilons = [0]")
    with pytest.raises(ExperimentError, match=rf"exp\.toml:{line_of(text, 'epsilons = [0]')}: field 'sweep\.epsilons'"):
        load_experiment(write(tmp_path, text))
    with pytest.raises(ExperimentError, match="not valid TOML"):
        load_experiment(write(tmp_path, "num-rounds = "))
    with pytest.raises(ExperimentError, match="needs data-path"):
        load_experiment(write(tmp_path, TINY.replace('dataset = "synthetic"', 'dataset = "movielens-100k"')))


def test_an_experiment_is_run_config_overrides_named_after_its_file(tmp_path):
    experiment = load_experiment(write(tmp_path, TINY, name="tiny.toml"))
    assert experiment.name == "tiny"
    cells = expand_cells(experiment)
    assert [c.name for c in cells] == ["federated-c2-s3", "user-als-eps4-c2-s3"]
    federated, private = (c.config for c in cells)
    # the file's keys, the sweep's, and RunConfig's defaults for everything else
    expected = RunConfig.from_flower({
        "privacy": "none", "synthetic-users": 300, "synthetic-ads": 120, "num-rounds": 2, "local-epochs": 2, "factors": 8, "dp-metrics": "none",
        "synthetic-merchants": 2, "min-nodes": 2, "seed": 3,
    })
    assert federated == expected
    assert private == expected.with_values(privacy="user", target_epsilon=4.0, num_rounds=3)  # private-als-rounds
    # where a cell writes does not change what it computes, so not its cache key either
    moved = cells[0].model_copy(update={"config": federated.with_values(output_dir=str(tmp_path / "elsewhere"))})
    assert moved.key == cells[0].key
    assert cells[0].model_copy(update={"config": federated.with_values(factors=9)}).key != cells[0].key


def test_shipped_experiments_validate_and_expand():
    root = Path(__file__).resolve().parents[1] / "experiments"
    for name in ("quick", "ml100k", "beauty"):
        experiment = load_experiment(root / f"{name}.toml")
        cells = expand_cells(experiment)
        assert cells[0].config.privacy == "none"
        solvers = experiment.sweep.solvers or [experiment.base.mf_solver]
        assert [c.epsilon for c in cells[1:]] == [e for e in experiment.sweep.epsilons for _ in solvers]
        assert [c.config.mf_solver for c in cells[1:]] == solvers * len(experiment.sweep.epsilons)
        assert len({c.key for c in cells}) == len(cells)
    assert Path(load_experiment(root / "ml100k.toml").base.data_path).is_absolute()


def _progress_lines(text: str) -> list[str]:
    """The sweep's plain progress lines, without their leading '[ 12.3s] ' stamp, checked to grow."""
    stamped = [re.fullmatch(r"\[ *(\d+\.\d)s\] (.*)", line) for line in text.splitlines()]
    found = [match for match in stamped if match]
    seconds = [float(match[1]) for match in found]
    assert seconds == sorted(seconds)
    return [match[2] for match in found]


def test_sweep_is_cached_resumes_after_an_interruption_and_reports(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, TINY)
    output = tmp_path / "run"
    real_run_cell = sweep.run_cell
    calls: list[str] = []

    def interrupted_after_one(cell, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the user stops the sweep during its second cell
        calls.append(cell.name)
        return real_run_cell(cell, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_cell", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_experiment(path, output)
    first = next(output.glob("cells/*/done.json"))
    stamp = first.stat().st_mtime_ns
    # its output is not a terminal: a plain line per baseline set, cell and round, as they happen
    lines = _progress_lines(capsys.readouterr().out)
    assert [re.sub(r" \((baselines|cell) \d+\.\ds\)$", "", line) for line in lines] == [
        "baselines for federated-c2-s3: started", "baselines for federated-c2-s3: done",
        "cell federated-c2-s3: started (2 rounds)", "cell federated-c2-s3: round 1/2", "cell federated-c2-s3: round 2/2",
        "cell federated-c2-s3: done", "cell user-als-eps4-c2-s3: started (3 rounds)",
    ]
    cell_seconds = [float(m[1]) for m in (re.search(r"\(cell (\d+\.\d)s\)$", line) for line in lines) if m]
    assert len(cell_seconds) == 3 and cell_seconds == sorted(cell_seconds) and cell_seconds[-1] > 0

    resumed: list[str] = []

    def counting(cell, *args, **kwargs):
        resumed.append(cell.name)
        return real_run_cell(cell, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_cell", counting)
    sweep.run_experiment(path, output)
    assert calls == ["federated-c2-s3"] and resumed == ["user-als-eps4-c2-s3"]  # the finished cell was not redone
    assert first.stat().st_mtime_ns == stamp
    lines = _progress_lines(capsys.readouterr().out)
    assert [re.sub(r" \(cell \d+\.\ds\)$", "", line) for line in lines] == [
        "cached: federated-c2-s3", "cached: baselines for federated-c2-s3", "cell user-als-eps4-c2-s3: started (3 rounds)",
        "cell user-als-eps4-c2-s3: round 1/3", "cell user-als-eps4-c2-s3: round 2/3", "cell user-als-eps4-c2-s3: round 3/3",
        "cell user-als-eps4-c2-s3: done",
    ]

    rows = json.loads((output / "results.json").read_text())
    assert rows and all(set(row) == set(COLUMNS) for row in rows)
    methods = {row["method"] for row in rows}
    assert methods == {"federated", "user-dp-als", "centralized", "local-only", "toppop", "dp-popularity"}
    federated = [r for r in rows if r["method"] == "federated" and r["client"] == "aggregate"]
    assert [r["round"] for r in federated] == [0, 1, 2]
    dp = [r for r in rows if r["method"] == "user-dp-als" and r["client"] == "aggregate" and r["round"] > 0]
    assert all(0 < r["epsilon_spent"] <= 4.0 for r in dp)
    assert len({r["client"] for r in rows if r["method"] == "local-only"}) == 3  # two merchants + aggregate
    assert (output / "results.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    for name in ("convergence", "frontier", "per_merchant", "epsilon"):
        png = output / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = (output / "report.html").read_text()
    assert "user-level (4, 1e-06)-DP" in page and 'src="plots/frontier.png"' in page
    assert json.loads((output / "environment.json").read_text())["packages"]["flwr"] == "1.42.0"

    # the page renders, with its figures, in a real browser
    if chromium() is not None:
        shot = screenshot(output / "report.html", tmp_path / "report.png")
        pixels = matplotlib.image.imread(shot)
        blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)  # the plots' blue lines and bars
        assert pixels.shape[0] >= 2000 and blue.sum() > 2000

    # a third run has nothing left to do
    monkeypatch.setattr(sweep, "run_cell", lambda *a, **k: pytest.fail("a finished cell was run again"))
    sweep.run_experiment(path, output)

    # the sweep's Ray cluster is gone (after the interruption too; an interruption mid-run:
    # test_simulation.py)
    assert (output / "runtime" / "ray.log").is_file()
    assert not processes_mentioning(str(output))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_redirected_sweep_prints_a_line_per_round_a_terminal_gets_a_bar(monkeypatch):
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")  # as in many CIs: rich alone would draw its bar into the file
    lines = io.StringIO()
    with sweep_progress(1, lines) as progress:
        assert isinstance(progress, PlainProgress)
        progress.cell_started("c", 2)
        watcher = RoundWatcher(progress, log := io.StringIO())
        watcher.write("INFO :      [ROUND 1")  # a line may arrive in pieces
        watcher.write("/2]\nINFO :      other\n[ROUND 2/2]\n")
        progress.cell_done("c")
    assert log.getvalue() == "INFO :      [ROUND 1/2]\nINFO :      other\n[ROUND 2/2]\n"
    assert [re.sub(r" \(cell \d+\.\ds\)$", "", line) for line in _progress_lines(lines.getvalue())] == [
        "cell c: started (2 rounds)", "cell c: round 1/2", "cell c: round 2/2", "cell c: done"]
    monkeypatch.delenv("FORCE_COLOR")
    assert isinstance(sweep_progress(1, _Terminal()), BarProgress)


def test_centralized_and_one_client_federated_agree(tmp_path):
    """With one merchant holding all data, FedAvg is that merchant's training: same model code,
    same metrics; only the sampled negatives' random streams differ."""
    values = {"privacy": "none", "synthetic-users": 400, "synthetic-ads": 150, "synthetic-merchants": 1, "partitioning": "iid",
              "num-rounds": 4, "min-nodes": 1, "local-epochs": 2, "factors": 8, "seed": 5,
              "output-dir": str(tmp_path / "out"), "state-dir": str(tmp_path / "out" / "state")}
    cfg = RunConfig.from_flower(values)
    central = centralized(cfg, load_dataset(cfg))
    run_simulation(cfg.to_flower(), 1, tmp_path / "flower", timeout=480)
    federated = json.loads((tmp_path / "out" / "history.json").read_text())
    assert federated[-1]["evaluate"]["ndcg10_sampled"] > federated[0]["evaluate"]["ndcg10_sampled"] + 0.1
    for metric in ("hr10_sampled", "ndcg10_sampled", "ndcg10_full", "auc_full"):
        for fed, cen in ((federated[0], central[0]), (federated[-1], central[-1])):
            assert fed["evaluate"][metric] == pytest.approx(cen["evaluate"][metric], abs=0.03), metric
