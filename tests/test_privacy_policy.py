"""The guarantee holds against the server operator (issue 13): the merchant's policy decides, not
the run config; nothing released depends on the shard's size; DP is the default."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client import merchant_cli
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger, PrivacyRefusal
from shared.config import ConfigError, RunConfig
from shared.data.loaders import write_catalog_csv, write_log_csv
from shared.data.schema import Dataset
from shared.data.sources import load_dataset
from shared.node_config import NodeConfig
from shared.params import init_global_arrays
from shared.privacy_policy import DEFAULT_DELTA, PrivacyPolicy
from shared.wire import DP_EPSILON, DP_NOISE_MULTIPLIER, METRICS, NUM_EXAMPLES, PRIVACY_REFUSED
from simulations.baselines import dp_popularity
from tests.conftest import client_call, simulated_node, small_run_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("as_server"), pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")]


def _deployed(tmp_path: Path, **policy: object) -> dict[str, object]:
    """A deployed merchant's node config whose log does not exist: a reply that is not refused
    before any data is read fails on the missing file instead."""
    return {"data-path": str(tmp_path / "absent.csv"), "state-dir": str(tmp_path / "merchant"), "merchant-id": "m", **policy}


@pytest.mark.parametrize(("asked", "reason"), [
    ({"privacy": "none"}, "requires user-level DP"),
    ({"privacy": "client", "mf-solver": "sgd"}, "requires user-level DP"),
    ({"target-epsilon": 20.0}, "allows at most 8"),
    ({"target-delta": 1e-3}, "allows at most 1e-06"),
])
def test_a_run_asking_for_less_privacy_is_refused_before_any_data_is_read(tmp_path, asked, reason):
    cfg = small_run_config(tmp_path, **{"privacy": "user", **asked})
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, cfg.seed)
    for kind in ("train", "evaluate"):
        reply = client_call(kind, cfg, arrays, node_config=_deployed(tmp_path))
        assert reply.has_error() and reply.error.code == PRIVACY_REFUSED and reason in reply.error.reason
    assert not (tmp_path / "merchant").exists()  # nothing read, nothing written


def test_the_merchants_policy_pins_metrics_and_solvers(tmp_path):
    arrays = init_global_arrays(200, 16, 7)
    cases = [({"metrics-release": "none"}, {}, "releases no evaluation metrics"),
             ({"solvers": "als"}, {"mf-solver": "sgd"}, "not mf-solver 'sgd'")]
    for policy, asked, reason in cases:
        reply = client_call("evaluate", small_run_config(tmp_path, privacy="user", **asked), arrays, node_config=_deployed(tmp_path, **policy))
        assert reply.has_error() and reason in reply.error.reason
    with pytest.raises(ConfigError, match="solvers must name some of als, sgd, neumf"):
        NodeConfig.from_flower(_deployed(tmp_path, solvers="als,ncf"))
    with pytest.raises(ConfigError, match="dp-metrics"):  # the exact release is no longer a run-config choice
        RunConfig.from_flower({"dp-metrics": "exact"})


def test_a_state_directory_with_a_dp_ledger_never_makes_a_non_dp_release(tmp_path):
    private = small_run_config(tmp_path, privacy="user", **{"num-rounds": 2, "dp-metrics": "none"})
    node = simulated_node(private, 0)
    arrays = init_global_arrays(node.data.num_ads, private.factors, private.seed)
    assert not client_call("train", private, arrays, server_round=1).has_error()
    ledger_before = (node.state.directory / LEDGER_FILE).read_bytes()
    for kind in ("train", "evaluate"):  # a simulated node's policy is its run's: even then, no
        reply = client_call(kind, small_run_config(tmp_path, privacy="none"), arrays, server_round=2)
        assert reply.has_error() and "holds a differential-privacy budget" in reply.error.reason
    assert (node.state.directory / LEDGER_FILE).read_bytes() == ledger_before


def _released(cfg: RunConfig, partition: int) -> dict[str, float]:
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, cfg.seed)
    reply = client_call("train", cfg, arrays, partition=partition)
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content[METRICS])


@pytest.mark.parametrize(("solver", "mode"), [("als", "auto"), ("sgd", "fused"), ("sgd", "hooks"), ("sgd", "ghost")])
def test_what_leaves_does_not_depend_on_the_shards_size(tmp_path, solver, mode):
    """Two merchants of different sizes release the same epsilon, noise and weight: before, delta
    = 0.1 / users made every reported epsilon a function of the user count (and DP-SGD's
    sampling rate and FedAvg weight were derived from it, in Opacus' own modes too)."""
    cfg = small_run_config(tmp_path, privacy="user", **{"mf-solver": solver, "num-rounds": 2, "dp-metrics": "none", "local-epochs": 1,
                                                        "dp-grad-sample-mode": mode})
    sizes = [simulated_node(cfg, p).data.num_users for p in (0, 1)]
    assert sizes[0] != sizes[1]
    small, large = _released(cfg, 0), _released(cfg, 1)
    assert small[DP_EPSILON] == large[DP_EPSILON] and small[DP_NOISE_MULTIPLIER] == large[DP_NOISE_MULTIPLIER]
    if solver == "als":
        assert NUM_EXAMPLES not in small and NUM_EXAMPLES not in large  # the server sums, it needs no count
    else:
        assert small[NUM_EXAMPLES] == large[NUM_EXAMPLES] == 1.0 and small["dp-steps"] == large["dp-steps"]
    ledger = PrivacyLedger.open(simulated_node(cfg, 0).state.directory)
    assert ledger.state.delta == DEFAULT_DELTA


def test_delta_is_checked_against_a_public_bound_never_against_the_count(tmp_path):
    """A delta too large for the policy's public max-users is refused on public values alone; a
    merchant with more users than it declared is not refused (a refusal would tell its count)."""
    with pytest.raises(ConfigError, match="not below 1 / max-users"):
        NodeConfig.from_flower(_deployed(tmp_path, delta=1e-3, **{"max-users": 5000}))
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 1, "dp-metrics": "none"})
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, cfg.seed)
    refused = client_call("train", cfg.with_values(target_delta=0.5), arrays)  # a simulated node's policy is its run's
    assert refused.has_error() and "not below 1 / max-users" in refused.error.reason
    assert not (tmp_path / "out" / "state").exists()  # refused before any data was read
    node = simulated_node(cfg, 0)
    dataset = load_dataset(cfg)
    log = tmp_path / "merchant.csv"
    write_log_csv(log, Dataset("m", dataset.catalog, dataset.log.subset(np.flatnonzero(np.isin(dataset.log.user, node.data.user_ids)))))
    catalog = tmp_path / "catalog.csv"
    write_catalog_csv(catalog, dataset.catalog)
    small_bound = _deployed(tmp_path, **{"data-path": str(log), "catalog-path": str(catalog), "max-users": 10, "delta": 1e-3})
    assert node.data.num_users > 10
    reply = client_call("train", cfg.with_values(target_delta=1e-3), arrays, node_config=small_bound)
    assert not reply.has_error(), reply.error.reason


def test_the_dp_popularity_floors_noise_cannot_be_replayed_from_the_config(tmp_path):
    cfg = small_run_config(tmp_path)
    dataset = load_dataset(cfg)
    first, second = (dp_popularity(cfg, dataset, 3, [0.5]) for _ in range(2))
    assert first != second  # the same config, fresh noise (OS entropy, as every other release)


def test_privacy_is_the_default():
    assert RunConfig().privacy == "user"
    policy = NodeConfig.from_flower({"data-path": "/srv/log.csv"}).pinned_policy()
    assert policy == PrivacyPolicy() and policy.mode == "user" and policy.delta == DEFAULT_DELTA


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`make run`'s job, small: its output folder and what it printed."""
    out = tmp_path_factory.mktemp("main-job") / "quick"
    done = subprocess.run(
        [sys.executable, "-m", "simulations.simulate", "--rounds", "2", "--clients", "2", "--output", str(out), "--quiet",
         "-c", "synthetic-users=300", "-c", "synthetic-ads=120"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_the_main_job_trains_under_user_level_dp_beside_a_run_without(main_job):
    out, stdout = main_job
    assert "user-level DP per merchant (private ALS, epsilon 8)" in stdout and "no-DP NDCG@10s" in stdout
    for partition in (0, 1):
        budget = subprocess.run([sys.executable, "-m", "client.merchant_cli", "budget", "--state-dir",
                                 str(out / "state" / f"partition-{partition}"), "--json"], cwd=ROOT, capture_output=True, text=True)
        report = json.loads(budget.stdout)
        assert report["dp_guarantee"] is True and 0 < report["epsilon_spent"] <= 8.0
        assert PrivacyLedger.open(out / "no-dp" / "state" / f"partition-{partition}").epsilon() == np.inf  # the comparison
    exact = json.loads((out / "exact_history.json").read_text())
    assert [record["round"] for record in exact] == [0, 1, 2]


def test_the_main_job_prints_merchant_agent_commands_that_work(main_job, capsys):
    """A user tries the merchant agent on a simulated merchant exactly as the job says to."""
    out, stdout = main_job
    printed = stdout.split("try the merchant agent", 1)[1].splitlines()[1:]
    commands = [shlex.split(line) for line in printed if line.startswith("  ")]
    assert [next(word for word in argv if word in ("recommend", "budget")) for argv in commands] == ["recommend", "budget"]
    for argv in commands:
        command = next(i for i, word in enumerate(argv) if word in ("recommend", "budget"))
        assert (ROOT / argv[0]).is_file()  # the agent's console script (or Python), as typed from the project root
        options = dict(zip(argv[command + 1::2], argv[command + 2::2]))
        assert Path(options["--state-dir"]) == out / "state" / "partition-0"
        for flag in ("--state-dir", "--log", "--catalog"):
            assert flag not in options or Path(options[flag]).exists(), flag
        capsys.readouterr()
        assert merchant_cli.main(argv[command:]) == 0, capsys.readouterr().err
        shown = capsys.readouterr().out
        if argv[command] == "budget":
            assert "epsilon spent:" in shown and "NO DP GUARANTEE" not in shown
            continue
        user, k = options["--users"], int(options["--k"])
        rows = [line.split() for line in shown.splitlines()[1:]]
        assert [(row[0], int(row[1])) for row in rows] == [(user, rank) for rank in range(1, k + 1)]
        with open(options["--log"], newline="", encoding="utf-8") as handle:
            seen = {row["ad_id"] for row in csv.DictReader(handle) if row["user_id"] == user}
        assert seen and not seen & {row[2] for row in rows}  # the user's own log was read: nothing seen is recommended again


def test_an_exact_release_shows_as_infinite_epsilon_wherever_epsilon_is_reported(tmp_path):
    """A ledger that ever recorded exact metrics (the old `dp-metrics = "exact"`) or a non-private
    release reports epsilon infinite, refuses further DP releases, and the agent says so."""
    ledger = PrivacyLedger.open(tmp_path)
    ledger.bind(8.0, 1e-6)
    ledger.record([(2.0, 1.0, 1)])
    finite = ledger.epsilon()
    ledger.state.exact_metric_releases = 1
    ledger.save()
    assert 0 < finite < 8.0 and PrivacyLedger.open(tmp_path).epsilon() == np.inf
    with pytest.raises(PrivacyRefusal, match="without DP"):
        PrivacyLedger.open(tmp_path).require([(2.0, 1.0, 1)], "one more release")
    report = json.loads(subprocess.run([sys.executable, "-m", "client.merchant_cli", "budget", "--state-dir", str(tmp_path), "--json"],
                                       cwd=ROOT, capture_output=True, text=True).stdout)
    assert report["dp_guarantee"] is False and report["epsilon_spent"] is None
