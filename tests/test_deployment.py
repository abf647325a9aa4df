"""The deployment path end to end, on loopback: dev certificates, a TLS SuperLink with SuperNode
authentication, a state database (owner-only) and no run-time installation, started as
`python -m deploy.superlink start` starts it, with the Fleet gateway in front; three registered
merchants, each a SuperNode with its own log and state dir, connected through the gateway; a
2-round run under user-level DP submitted with `flwr run`. Then the refusals: an unregistered
key, plain HTTP from a SuperNode and from `flwr`. Last, a SuperLink killed mid-run and resumed
with one command. Strangers and app pinning: tests/test_deploy_security.py.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography", reason="deploy.dev_certs needs the `cryptography` package (a flwr dependency)")

from deploy.local import DEPLOYMENT_MARK, Merchant, local_deployment, shared_cores, stop_process, write_merchant_data
from deploy.processes import THREAD_LIMIT_VARIABLES, stop_tree
from deploy.superlink import CONNECTION, parse_cli_json, tool_env, write_cli_config
from shared.storage import load_npz
from simulations import PROJECT_ROOT
from tests.conftest import processes_mentioning, small_run_config

NUM_MERCHANTS = 3
RUN_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    cfg = small_run_config(root, **{"num-rounds": 2, "min-nodes": NUM_MERCHANTS, "privacy": "user", "local-epochs": 1})
    merchants = write_merchant_data(root / "merchants", cfg.to_flower(), NUM_MERCHANTS)
    with local_deployment(root / "flower", merchants, unregistered=["intruder"]) as deployed:
        yield root, cfg, merchants, deployed
    assert processes_mentioning(str(root / "flower")) == [], "a Flower process outlived the deployment"


@pytest.fixture(scope="module")
def finished_run(deployment):
    """The module's deployed run, with carry-evaluation (one exchange per round) through Flower's
    real wire; the restart test's run below evaluates in exchanges of their own."""
    root, cfg, merchants, deployed = deployment
    reply = deployed.submit(cfg.with_values(carry_evaluation=True).to_flower())
    assert reply.get("success"), reply
    status, log = deployed.wait_for_run(int(reply["run-id"]), RUN_TIMEOUT)
    return status, log


def test_a_run_the_superlink_does_not_know_reads_as_unknown(deployment, finished_run):
    """Flower 1.42's answer for an unknown run id is what deploy.runs.run_status recognises (any
    other failure is asked again, then raised): an empty row, at once, not an error."""
    _, _, _, deployed = deployment
    started = time.monotonic()
    assert deployed.run_status(10**9) == {}
    assert time.monotonic() - started < 30.0  # answered, not waited out (run_status's patience is 60 s)


def test_run_returns_global_model_and_metrics(deployment, finished_run):
    root, cfg, merchants, _ = deployment
    status, _ = finished_run
    assert status["status"] == "finished:completed", status
    out = Path(cfg.output_dir)
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(sorted(h["clients"]) == sorted(m.merchant_id for m in merchants) for h in history)
    assert "hr10_sampled" in history[-1]["evaluate"] and "dp-epsilon" in history[-1]["evaluate"]
    # each model's evaluation came with the next round's training replies, the last one's on its own
    assert [h.get("evaluated_with") for h in history] == [1, 2, None]
    assert all("hr10_sampled" in h["evaluate"] and "evaluation_pending" not in h for h in history)
    model = load_npz(out / "model" / "global_model.npz")
    assert model["ad_factors"].shape == (cfg.synthetic_ads, cfg.factors)
    np.testing.assert_array_equal(model["ad_factors"], load_npz(out / "checkpoints" / "round-0002.npz")["ad_factors"])
    assert status["network-traffic"]["total-bytes"] > 0


def test_merchant_state_stays_with_the_merchant(deployment, finished_run):
    root, cfg, merchants, _ = deployment
    for merchant in merchants:
        assert (merchant.state_dir / "privacy_ledger.json").is_file()
        stored = np.load(merchant.state_dir / "user_factors.npz")
        own_users = {line.split(",", 1)[0] for line in merchant.data_path.read_text().splitlines()[1:]}
        assert set(stored["user_ids"].tolist()) <= own_users  # user factors of this merchant only
    # the server's side holds no user factor and no ledger
    server_files = [p.name for p in Path(cfg.output_dir).rglob("*") if p.is_file()]
    assert not any(name in ("user_factors.npz", "privacy_ledger.json") for name in server_files)


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every process: its parent's id and its command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            found[int(entry.name)] = (parent, (entry / "cmdline").read_bytes())
        except (OSError, StopIteration, ValueError):  # a process that ended meanwhile
            continue
    return found


def test_clientapps_share_the_machines_cores(deployment, finished_run):
    """Three merchants on one machine: what each SuperNode starts (its warm ClientApp process,
    whose forks are the ClientApps, and its SuperExec) limits its numerical libraries to the
    merchant's share of the cores."""
    root = deployment[0]
    mark = str((root / "flower").resolve())
    processes = _processes()
    supernodes = {pid for pid, (_, command) in processes.items()
                  if b"deploy.supernode" in command.split(b"\0") and _environment(pid).get(DEPLOYMENT_MARK) == mark}
    started = {pid: command for pid, (parent, command) in processes.items() if parent in supernodes}
    warm = [pid for pid, command in started.items() if b"deploy.warm_clientapp" in command.split(b"\0")]
    superexecs = [pid for pid, command in started.items() if any(part.endswith(b"flower-superexec") for part in command.split(b"\0"))]
    assert len(supernodes) == len(warm) == len(superexecs) == NUM_MERCHANTS, (supernodes, started)
    expected = str(shared_cores(NUM_MERCHANTS))
    for pid in warm + superexecs:
        environment = _environment(pid)
        assert all(environment.get(name) == expected for name in THREAD_LIMIT_VARIABLES), (pid, started[pid])


def _wait_exit(process: subprocess.Popen, timeout: float = 90.0) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        stop_process(process)  # whatever it started (its SuperExec) goes too


def test_unregistered_supernode_is_refused(deployment):
    root, cfg, merchants, deployed = deployment
    intruder = Merchant("intruder", merchants[0].data_path, root / "intruder-state", merchants[0].catalog_path)
    process = deployed.start_supernode(intruder, deployed.keys["intruder"].private_key)
    assert _wait_exit(process) != 0
    log = deployed.log("supernode-intruder")
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "No SuperNode found with the given public key" in deployed.log("superlink")
    assert deployed.online_nodes() == NUM_MERCHANTS
    assert not (root / "intruder-state").exists()  # it never got to run the ClientApp


def test_plain_http_supernode_is_refused(deployment):
    root, cfg, merchants, deployed = deployment
    plain = Merchant("plain-http", merchants[1].data_path, root / "plain-state", merchants[1].catalog_path)
    process = deployed.start_supernode(plain, key=None, tls=False, max_retries=1)
    assert _wait_exit(process) != 0
    assert "Failed to initialize the connection" in deployed.log("supernode-plain-http")


def test_plain_http_flwr_run_is_refused(deployment):
    root, cfg, merchants, deployed = deployment
    insecure_home = root / "insecure-flwr-home"
    write_cli_config(insecure_home, deployed.address, root_certificates=None)
    runs_before = len(parse_cli_json(deployed.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"])
    reply = deployed.submit(cfg.to_flower(), env=tool_env(insecure_home))
    assert reply.get("success") is False, reply
    assert "unavailable" in str(reply.get("error-message", "")).lower(), reply
    assert len(parse_cli_json(deployed.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]) == runs_before


def test_superlink_state_is_owner_only(deployment, finished_run):
    """The database and its WAL files (runs, node keys, messages, models) are 0600 like keys;
    so is what the ServerApp writes (umask 077 for the SuperLink and its children)."""
    root, cfg, merchants, deployed = deployment
    database = deployed.work_dir / "superlink" / "state.db"
    files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    assert all(path.is_file() for path in files), files  # WAL mode, SuperLink running
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {path.name: "0o600" for path in files}
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    model = Path(cfg.output_dir) / "model" / "global_model.npz"
    assert stat.S_IMODE(model.stat().st_mode) & 0o077 == 0


def test_a_superlink_restart_mid_run_is_resumed_with_one_command(tmp_path):
    """The SuperLink dies mid-run with its SuperExec and ServerApp (SIGKILL of the whole tree:
    the run stays "running" in its database for good) and comes back on its database. Its state
    survived (registered merchants, the interrupted run); the merchants' SuperNodes reconnect by
    themselves; `python -m deploy.runs resume --output-dir OUT --wait`, the one command the
    operator runs, stops the dead run and resumes from the last checkpoint to the end of the
    plan. No merchant spends budget twice: a round released before the crash and asked again is
    answered with the recorded release."""
    rounds = 3
    cfg = small_run_config(tmp_path, **{"num-rounds": rounds, "min-nodes": NUM_MERCHANTS, "privacy": "user", "local-epochs": 1})
    merchants = write_merchant_data(tmp_path / "merchants", cfg.to_flower(), NUM_MERCHANTS)
    out = Path(cfg.output_dir)
    with local_deployment(tmp_path / "flower", merchants) as deployed:
        first = int(deployed.submit(cfg.to_flower())["run-id"])
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (out / "checkpoints" / "round-0001.npz").exists():
            assert time.monotonic() < deadline and deployed.processes["superlink"].poll() is None, deployed.log("superlink")[-3000:]
            time.sleep(0.2)  # polls the run's own output
        # a crash: SIGKILL for the whole tree at once (a SIGTERM would let the ServerApp record
        # its exit as a failure, which is not this test's case)
        stop_tree(deployed.processes["superlink"], signals=(signal.SIGKILL,))
        interrupted = json.loads((out / "run_status.json").read_text())
        assert interrupted["status"] == "running" and interrupted["flower_run_id"] == first

        deployed.restart_superlink()
        assert deployed.run_status(first)["status"] == "running"  # the database kept the run, and no one ended it
        nodes = parse_cli_json(deployed.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]
        assert len(nodes) == NUM_MERCHANTS  # registrations survived
        deployed.wait_online(NUM_MERCHANTS, timeout=300)

        resumed = subprocess.run(
            [sys.executable, "-m", "deploy.runs", "resume", "--output-dir", str(out), "--flwr-home", deployed.operator_env["FLWR_HOME"],
             "--app", str(PROJECT_ROOT), "--wait", "--timeout", str(RUN_TIMEOUT)],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT + 120, stdin=subprocess.DEVNULL,
        )
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"stopping run {first}" in resumed.stdout
        assert deployed.run_status(first)["status"].startswith("finished:")
        history = json.loads((out / "history.json").read_text())
        assert [h["round"] for h in history] == list(range(rounds + 1))
        status = json.loads((out / "run_status.json").read_text())
        assert status["status"] == "complete" and status["rounds_completed"] == rounds and status["flower_run_id"] != first
        for merchant in merchants:
            ledger = json.loads((merchant.state_dir / "privacy_ledger.json").read_text())["ledger"]
            assert ledger["rounds_trained"] == rounds, (merchant.merchant_id, ledger["rounds_trained"])
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_superlink_with_its_state_in_memory_runs_and_comes_back_with_its_merchants(tmp_path):
    """`deploy.superlink start --in-memory`: no database file; a run completes; a restart forgets
    the registered merchants, the deployment registers them again and restarts their
    SuperNodes, and the next run completes too."""
    merchants_count = 2
    cfg = small_run_config(tmp_path, **{"num-rounds": 1, "min-nodes": merchants_count, "synthetic-merchants": merchants_count,
                                        "privacy": "user", "local-epochs": 1, "probe-messages": 3})
    merchants = write_merchant_data(tmp_path / "merchants", cfg.to_flower(), merchants_count)
    # the merchants' SuperExecs would look for work once a minute: the runs complete in time only
    # if each SuperNode wakes its SuperExec when a message arrives (deploy/superexec.py)
    with local_deployment(tmp_path / "flower", merchants, in_memory_state=True,
                          supernode_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "60"}) as deployed:
        for attempt in range(2):
            if attempt:
                stop_process(deployed.processes["superlink"])
                deployed.restart_superlink()
                deployed.wait_online(merchants_count, timeout=300)
            run_cfg = cfg.to_flower() | {"output-dir": str(tmp_path / f"out-{attempt}")}
            reply = deployed.submit(run_cfg)
            assert reply.get("success"), reply
            # six exchanges (three probes, round 0's evaluation, round 1): left to the 60 s poll, minutes
            status, log = deployed.wait_for_run(int(reply["run-id"]), 120.0)
            assert status["status"] == "finished:completed", log[-3000:]
            assert [h["round"] for h in json.loads((tmp_path / f"out-{attempt}" / "history.json").read_text())] == [0, 1]
        assert not list((tmp_path / "flower" / "superlink").glob("*.db*"))
        assert not [p for p in tmp_path.rglob("*") if "flwr-in-memory" in p.name]  # not a SQLite file named after the flag
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_secure_aggregation_across_supernodes(tmp_path):
    """SecAgg+ over the TLS deployment: each SuperNode keeps the protocol's state in its context
    across the round's four messages (a new ClientApp process each). Two merchants allow secure
    aggregation; the third's policy refuses it, so it leaves the round after the key sharing,
    and the server unmasks the sum of the two (the threshold is 2)."""
    cfg = small_run_config(tmp_path, **{"num-rounds": 1, "min-nodes": NUM_MERCHANTS, "privacy": "user", "local-epochs": 1,
                                        "secure-aggregation": True, "secure-threshold": 0.6, "min-replies": 2})
    merchants = write_merchant_data(tmp_path / "merchants", cfg.to_flower(), NUM_MERCHANTS, secure_aggregation="allow")
    merchants[-1] = replace(merchants[-1], secure_aggregation="refuse")
    with local_deployment(tmp_path / "flower", merchants) as deployed:
        reply = deployed.submit(cfg.to_flower())
        assert reply.get("success"), reply
        status, log = deployed.wait_for_run(int(reply["run-id"]), RUN_TIMEOUT)
    assert status["status"] == "finished:completed", log[-3000:]
    history = json.loads((Path(cfg.output_dir) / "history.json").read_text())
    secure = history[1]["secure"]
    assert secure["contributors"] == 2 and secure["threshold"] == 2 and secure["asked"] == NUM_MERCHANTS
    refused = history[1]["participants"]["refused"]
    assert list(refused) == [merchants[-1].merchant_id] and "refuses secure aggregation" in refused[merchants[-1].merchant_id]
    for merchant in merchants[:2]:
        assert json.loads((merchant.state_dir / "privacy_ledger.json").read_text())["ledger"]["rounds_trained"] == 1
    assert processes_mentioning(str(tmp_path / "flower")) == []
