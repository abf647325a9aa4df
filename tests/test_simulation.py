"""End to end through Flower's simulation runtime: the real ServerApp and ClientApp in Flower's
simulation engine over a private Ray cluster (simulations/runtime/); then resume from the
checkpoint, several runs on one warm runtime, failures, interruption."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.node_state import NodeState
from server.checkpoint import LOCK_FILE
from shared.params import digest
from shared.storage import load_npz
from simulations.runtime import SimulationError, run_simulation
from tests.conftest import is_loopback, listening_addresses, processes_mentioning, small_run_config

NUM_CLIENTS = 3


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sim")
    # evaluations in exchanges of their own: the reference of the carried run below
    cfg = small_run_config(tmp_path, **{"num-rounds": 3, "carry-evaluation": False})
    log = run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=480)
    return tmp_path, cfg, log


def test_federated_training_beats_round_zero_and_merchant_popularity(first_run):
    tmp_path, cfg, log = first_run
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    start, end = history[0]["evaluate"], history[-1]["evaluate"]
    # a random model ranks the test ad among 100 candidates: HR@10 about 0.1
    assert 0.03 < start["hr10_sampled"] < 0.2
    for metric in ("hr10_sampled", "ndcg10_sampled", "ndcg10_full", "auc_full"):
        assert end[metric] > start[metric] + 0.05, metric
    assert end["ndcg10_sampled"] > end["merchant-pop-ndcg10_sampled"] + 0.02
    assert end["ndcg10_full"] > end["merchant-pop-ndcg10_full"]
    # every client answered every round, and each reports its own metrics
    assert all(len(h["clients"]) == NUM_CLIENTS for h in history)
    assert "fedads" in log and "round" in log


def test_carried_evaluation_is_the_same_run_in_one_exchange_per_round(first_run, tmp_path):
    """carry-evaluation (by default: "auto", every merchant training each round): round r's
    model evaluated by round r + 1's training messages, the last one on its own. Without DP every
    step is seeded, so the run is the same as with evaluations in exchanges of their own: the
    same models, the same metrics round by round, merchant by merchant, in 4 exchanges instead of 7."""
    reference_path, _, reference_log = first_run
    cfg = small_run_config(tmp_path, **{"num-rounds": 3})
    assert cfg.carry_evaluation == "auto" and cfg.evaluation_carried
    log = run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=480)
    assert (reference_log.count("configure_train:"), reference_log.count("configure_evaluate:")) == (3, 4)
    assert (log.count("configure_train:"), log.count("configure_evaluate:")) == (3, 1)
    reference = json.loads((reference_path / "out" / "history.json").read_text())
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h.get("evaluated_with") for h in history] == [1, 2, 3, None]
    assert not any("evaluation_pending" in h for h in history)
    for ours, theirs in zip(history, reference, strict=True):
        assert ours["evaluate"] == pytest.approx(theirs["evaluate"], rel=1e-6), ours["round"]
        for name, metrics in theirs["clients"].items():
            assert ours["clients"][name] == pytest.approx(metrics, rel=1e-6), (ours["round"], name)
        assert ours["participants"] == theirs["participants"]
    for r in range(4):
        ours_model = load_npz(tmp_path / "out" / "checkpoints" / f"round-{r:04d}.npz")
        theirs_model = load_npz(reference_path / "out" / "checkpoints" / f"round-{r:04d}.npz")
        for key, value in theirs_model.items():
            np.testing.assert_allclose(ours_model[key], value, rtol=1e-5, atol=1e-7)
    aggregates = [row for row in csv.DictReader((tmp_path / "out" / "metrics.csv").open()) if row["client"] == "aggregate"]
    assert [row["round"] for row in aggregates] == ["0", "1", "2", "3"] and all(row["ndcg10_sampled"] for row in aggregates)


def test_no_process_is_left_running(first_run):
    tmp_path, _, _ = first_run
    assert (tmp_path / "flower" / "ray.log").is_file()  # the run's own Ray cluster was there
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_outputs_checkpoints_and_merchant_state(first_run):
    tmp_path, cfg, _ = first_run
    out = tmp_path / "out"
    for r in range(4):
        assert (out / "checkpoints" / f"round-{r:04d}.npz").is_file()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 3
    exported = load_npz(out / "model" / "global_model.npz")
    final = load_npz(out / "checkpoints" / "round-0003.npz")
    np.testing.assert_array_equal(exported["ad_factors"], final["ad_factors"])
    assert len(exported["ad_ids"]) == cfg.synthetic_ads
    assert (out / "metrics.csv").read_text().startswith("round,")
    for pid in range(NUM_CLIENTS):
        state = NodeState(out / "state" / f"partition-{pid}")
        assert state.user_factors_path.is_file()
        received, server_round = state.load_global_model()
        assert server_round == 3  # the model of the last evaluation
        np.testing.assert_allclose(received["ad_factors"], final["ad_factors"], rtol=1e-6)


def test_resume_continues_from_the_last_checkpoint(first_run):
    tmp_path, cfg, _ = first_run
    out = tmp_path / "out"
    before = json.loads((out / "history.json").read_text())
    round3 = load_npz(out / "checkpoints" / "round-0003.npz")
    factors_before = np.load(out / "state" / "partition-0" / "user_factors.npz")["factors"]

    resumed = small_run_config(tmp_path, **{"num-rounds": 4, "resume": True})
    run_simulation(resumed.to_flower(), NUM_CLIENTS, tmp_path / "flower-resume", timeout=480)

    after = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in after] == [0, 1, 2, 3, 4]
    assert after[:4] == before  # finished rounds are kept, not redone
    # round 4 trained from exactly the round-3 checkpoint, and changed it
    assert after[4]["start_digest"] == digest(round3)
    assert after[3]["start_digest"] == digest(load_npz(out / "checkpoints" / "round-0002.npz"))
    round4 = load_npz(out / "checkpoints" / "round-0004.npz")
    assert not np.allclose(round4["ad_factors"], round3["ad_factors"])
    # user factors persisted across runs were the warm start, and were updated
    factors_after = np.load(out / "state" / "partition-0" / "user_factors.npz")["factors"]
    assert factors_after.shape == factors_before.shape and not np.allclose(factors_after, factors_before)


def test_resume_with_another_seed_or_privacy_is_refused_by_name(first_run):
    """A resume continues the run it resumes: a changed seed or privacy setting fails the run
    (naming the keys), and nothing of the checkpoint changes; so does a catalog other than the
    one the checkpoint's rows belong to."""
    tmp_path, _, _ = first_run
    out = tmp_path / "out"
    latest = (out / "checkpoints" / "latest.json").read_text()
    changed = small_run_config(tmp_path, **{"num-rounds": 9, "resume": True, "seed": 8, "privacy": "user"})
    with pytest.raises(SimulationError, match=r"resume refused: .*privacy: 'none' -> 'user', seed: 7 -> 8"):
        run_simulation(changed.to_flower(), NUM_CLIENTS, tmp_path / "flower-changed", timeout=480)
    assert (out / "checkpoints" / "latest.json").read_text() == latest
    # the run's own config, but a checkpoint whose rows belong to another catalog of as many ads
    pointer = json.loads(latest)
    pointer["catalog"]["ids"] = "0" * 64
    (out / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    try:
        same = small_run_config(tmp_path, **{"num-rounds": 9, "resume": True})
        with pytest.raises(SimulationError, match=r"resume refused: the catalog \(.*\) does not hold the ads"):
            run_simulation(same.to_flower(), NUM_CLIENTS, tmp_path / "flower-other-catalog", timeout=480)
    finally:
        (out / "checkpoints" / "latest.json").write_text(latest)


def _main_job_running(output: Path) -> subprocess.Popen[bytes]:
    """The main job (50 rounds, 2 merchants) in its own process, once its federation is up: its
    first round's checkpoint written (round 0's is written before any message: with evaluation
    carried, the default, round 1's messages evaluate round 0's model)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.simulate", "--rounds", "50", "--clients", "2", "--output", str(output), "--quiet"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (output / "checkpoints" / "round-0001.npz").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    return process


def test_a_killed_actor_is_replaced_and_the_run_goes_on(tmp_path):
    """A ClientApp actor SIGKILLed mid-run (a worker lost to the OOM killer): the messages it held
    fail, the run replaces it and completes every round; the round records who failed."""
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.simulate", "--rounds", "4", "--clients", "3", "--output", str(output), "--quiet",
         "--no-compare", "-c", "privacy=\"none\""],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (output / "checkpoints" / "round-0001.npz").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    actors = [p for p in processes_mentioning(str(output / "runtime")) if "ClientAppActor" in p]
    assert actors, "no ClientApp actor to kill"
    os.kill(int(actors[0].split(":")[0]), signal.SIGKILL)
    assert process.wait(timeout=300) == 0
    history = json.loads((output / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
    assert json.loads((output / "run_status.json").read_text())["status"] == "complete"


def test_sigterm_mid_run_leaves_no_process(tmp_path):
    """A job runner stopping the main job with SIGTERM: the harness unwinds (its own exit code,
    not an abort by Ray's signal handler), stops the run and its Ray cluster."""
    output = tmp_path / "out"
    process = _main_job_running(output)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert processes_mentioning(str(output / "flower")) == []
    # the abandoned run wrote no further rounds: every round recorded was a whole one
    latest = json.loads((output / "checkpoints" / "latest.json").read_text())["round"]
    history = json.loads((output / "history.json").read_text())
    assert latest < 50 and [h["round"] for h in history] == list(range(latest + 1))
    assert all(len(h["clients"]) == 2 and "refused" not in h for h in history)


def test_sigkill_mid_run_leaves_no_process(tmp_path):
    """The main job killed outright: no `finally` runs, yet its sweeper stops the Ray cluster and
    the actors it started, whatever they were re-parented to."""
    output = tmp_path / "out"
    process = _main_job_running(output)
    assert any("raylet" in p for p in processes_mentioning(str(output / "runtime")))  # the cluster the sweeper must stop
    ray_temp = Path((output / "runtime" / "ray-temp-dir").read_text())  # Ray's session folder, outside the output
    assert ray_temp.is_dir()
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while (left := processes_mentioning(str(output / "runtime"))) and time.monotonic() < deadline:
        time.sleep(0.1)  # the sweeper works on its own: poll until it is done, within a bound
    assert left == []
    while ray_temp.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # removed by the sweeper once the cluster's processes are gone
    assert not ray_temp.exists()


def test_a_run_whose_server_app_fails_raises_with_its_log(tmp_path):
    """A ServerApp that cannot load its data fails the run: the harness raises with the log
    instead of returning as if it had trained."""
    from simulations.runtime import SimulationError

    cfg = small_run_config(tmp_path, **{"dataset": "movielens-100k", "data-path": str(tmp_path / "no-such-folder")})
    with pytest.raises(SimulationError, match="no-such-folder") as failure:
        run_simulation(cfg.to_flower(), 2, tmp_path / "flower", timeout=300)
    assert "the run failed" in str(failure.value)  # the ServerApp's own exception, not only its log text
    assert (tmp_path / "flower" / "flwr-run.log").is_file()
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_a_warm_runtime_serves_runs_exactly_as_a_fresh_one(tmp_path):
    """One runtime's actors serve run after run (their imports and data caches stay): a run
    after another one, on other data, gives the results it gives on a runtime of its own."""
    from simulations.runtime import SimulationRuntime

    first = small_run_config(tmp_path / "first")
    second = {"factors": 8, "seed": 11, "synthetic-users": 500}  # other data: the cache must not serve the first run's
    with SimulationRuntime(tmp_path / "runtime", simulations=[(first, NUM_CLIENTS)]) as runtime:
        runtime.run(first.to_flower(), NUM_CLIENTS, tmp_path / "first" / "flower")
        actors = list(runtime._pool.pool)
        # the cluster, its actors and this driver listen on loopback only, Ray's default being every interface
        listening = listening_addresses(str(tmp_path / "runtime"))
        assert len(listening) >= 3  # at least the head's GCS, the raylet and the actors' workers
        assert {pid: a for pid, a in listening.items() if not all(map(is_loopback, a))} == {}
        runtime.run(small_run_config(tmp_path / "warm", **second).to_flower(), NUM_CLIENTS, tmp_path / "warm" / "flower")
        assert sorted(map(id, runtime._pool.pool)) == sorted(map(id, actors))  # the same actors, all free again
    run_simulation(small_run_config(tmp_path / "alone", **second).to_flower(), NUM_CLIENTS, tmp_path / "alone" / "flower")

    warm = json.loads((tmp_path / "warm" / "out" / "history.json").read_text())
    alone = json.loads((tmp_path / "alone" / "out" / "history.json").read_text())
    assert [h["round"] for h in warm] == [h["round"] for h in alone] == [0, 1, 2]
    for w, a in zip(warm, alone):
        assert sorted(w["clients"]) == sorted(a["clients"])
        # client replies arrive in any order: the server's float sums may differ in the last bits
        assert w["evaluate"] == pytest.approx(a["evaluate"], abs=1e-4)
    assert processes_mentioning(str(tmp_path / "runtime")) == []


def test_an_interrupted_run_stops_at_once_and_writes_no_further_round(tmp_path):
    """Ctrl-C (here a signal raised as round 2 begins): the harness abandons the run, whose
    ServerApp stops at its next exchange with the nodes; nothing is recorded after round 1,
    and no thread or process of the run is left."""

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    class SignalAtRound2:
        def write(self, text: str) -> None:
            if "[ROUND 2/" in text:
                os.kill(os.getpid(), signal.SIGUSR1)

        def flush(self) -> None:
            pass

    cfg = small_run_config(tmp_path, **{"num-rounds": 200})
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with pytest.raises(Interrupted):
            run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", stream_to=SignalAtRound2(), timeout=480)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1]
    assert all(len(h["clients"]) == NUM_CLIENTS and "refused" not in h for h in history)
    assert json.loads((tmp_path / "out" / "checkpoints" / "latest.json").read_text())["round"] == 1
    assert not [t.name for t in threading.enumerate() if t.name == "flower-simulation" or "server_th" in t.name]
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_a_second_serverapp_on_a_folder_another_one_writes_stops_before_writing(first_run):
    """A resume submitted while the folder's ServerApp still runs (another process holds the
    folder's lock) fails at once, naming the holder's run, and leaves the folder as it was."""
    tmp_path, _, _ = first_run
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("run_status.json", "history.json", "checkpoints/latest.json")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.ftruncate(fd, 0); os.pwrite(fd, b'41\\n', 0); print('held', flush=True); sys.stdin.read()", str(out / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        resumed = small_run_config(tmp_path, **{"num-rounds": 9, "resume": True})
        with pytest.raises(SimulationError, match=r"being written by another ServerApp \(Flower run 41\)"):
            run_simulation(resumed.to_flower(), NUM_CLIENTS, tmp_path / "flower-second", timeout=480)
    finally:
        holder.communicate("")  # closing its stdin ends it: the lock goes with it
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_run_past_its_timeout_raises_and_leaves_nothing_running(tmp_path):
    from simulations.runtime import SimulationError

    cfg = small_run_config(tmp_path, **{"num-rounds": 200})  # far longer than its timeout
    with pytest.raises(SimulationError, match="ran past"):
        run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=1)
    assert not [t.name for t in threading.enumerate() if t.name == "flower-simulation" or "server_th" in t.name]
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_an_actor_that_died_is_replaced_before_the_next_run(tmp_path):
    import ray

    from simulations.runtime import SimulationRuntime

    with SimulationRuntime(tmp_path / "runtime") as runtime:
        runtime.run(small_run_config(tmp_path / "first").to_flower(), NUM_CLIENTS, tmp_path / "first" / "flower")
        dead = runtime._pool.pool[0]
        ray.kill(dead)  # as if it had run out of memory
        with pytest.raises(ray.exceptions.RayActorError):  # ray.kill returns before the actor is gone
            for _ in range(100_000):  # each ping answers at once while the actor lives
                ray.get(dead.__ray_ready__.remote())
        runtime.run(small_run_config(tmp_path / "second").to_flower(), NUM_CLIENTS, tmp_path / "second" / "flower")
    history = json.loads((tmp_path / "second" / "out" / "history.json").read_text())
    assert all(len(h["clients"]) == NUM_CLIENTS and "refused" not in h for h in history)


def test_a_ray_call_after_the_runtime_left_its_cluster_joins_no_cluster(tmp_path):
    """Once the runtime has left its cluster, a Ray call in this process (an abandoned run's
    engine thread) raises instead of running `ray.init()`, which would make the process a driver
    of another cluster on this machine, or start one."""
    import ray

    from simulations.runtime import SimulationRuntime

    with SimulationRuntime(tmp_path / "runtime") as runtime:
        runtime._wait_connected()
        assert ray.is_initialized()
    with pytest.raises(Exception, match="Ray has not been started yet"):
        ray.put(1)
    assert not ray.is_initialized()


def test_the_harness_joins_a_two_node_ray_cluster_it_did_not_start_and_leaves_it_running(tmp_path, monkeypatch):
    """RAY_ADDRESS (or `ray_address`): the runtime joins that cluster as a driver, places its
    ClientApp actors on every node, runs there and leaves; the cluster's nodes keep running.
    Here a head and a worker node on loopback, started as a cluster operator would (the worker
    as shared.flower_internals starts one on this machine's loopback), one CPU each: the pool's
    two actors can only be one per node."""
    import ray

    from deploy.processes import free_port, stop_tree, wait_for_port
    from shared.flower_internals import pool_size, ray_worker_node_on_loopback
    from simulations import PROJECT_ROOT
    from simulations.runtime import RAY_ADDRESS_VARIABLE, SimulationRuntime
    from simulations.runtime.ray_cluster import BIN, LOOPBACK_ONLY

    port = free_port()
    temp = tempfile.mkdtemp(prefix="fedads-ray-ext-")
    mark = {"FEDADS_TEST_RAY_CLUSTER": temp}  # finds every process of the cluster, the nodes' and their workers'
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK_ONLY, **mark}
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "stdin": subprocess.DEVNULL,
                             "start_new_session": True}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}", "--min-worker-port=0", "--max-worker-port=0",
                             f"--ray-client-server-port={free_port()}"], env=env, **quiet)
    worker: subprocess.Popen | None = None
    try:
        wait_for_port(port, head, tmp_path / "no-log")
        ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING", log_to_driver=False)
        try:
            def wait_for_nodes(count: int, what: str) -> None:
                deadline = time.monotonic() + 120
                while sum(node["Alive"] for node in ray.nodes()) < count:
                    assert head.poll() is None and (worker is None or worker.poll() is None) and time.monotonic() < deadline, what
                    time.sleep(0.2)

            # the head's raylet first: both nodes name their sockets in the one session folder
            wait_for_nodes(1, "the head node did not start")
            argv, worker_env = ray_worker_node_on_loopback(f"127.0.0.1:{port}", temp, 1, {"worker-node": 1.0}, env)
            worker = subprocess.Popen(argv, env=worker_env, **quiet)
            wait_for_nodes(2, "the worker node did not join")  # the pool is sized by the nodes there when the runtime joins
        finally:
            ray.shutdown()
        monkeypatch.setenv(RAY_ADDRESS_VARIABLE, f"127.0.0.1:{port}")
        cfg = small_run_config(tmp_path, **{"num-rounds": 1})
        with SimulationRuntime(tmp_path / "runtime", simulations=[(cfg, NUM_CLIENTS)]) as runtime:
            assert runtime.ray_address == f"127.0.0.1:{port}"
            run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=300, runtime=runtime)
            nodes = [node for node in ray.nodes() if node["Alive"]]
            assert len(nodes) == 2 and {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
            assert sum(node["Resources"].get("worker-node", 0.0) for node in nodes) == 1.0
            # one CPU per node, one per actor: two actors holding every CPU are one on each node
            assert pool_size(runtime._pool) == 2 and ray.available_resources().get("CPU", 0.0) == 0.0
            # every process of both nodes, their workers and this driver listen on loopback only
            listening = listening_addresses(temp)
            assert len(listening) >= 5  # the GCS, two raylets, the actors' workers, this driver
            assert {pid: a for pid, a in listening.items() if not all(map(is_loopback, a))} == {}
        history = json.loads((tmp_path / "out" / "history.json").read_text())
        assert [h["round"] for h in history] == [0, 1] and len(history[1]["clients"]) == NUM_CLIENTS
        assert not (tmp_path / "runtime" / "ray.log").exists()  # no cluster of its own was started
        assert head.poll() is None and worker.poll() is None  # the cluster outlives the harness's runtime
    finally:
        for node in (worker, head):
            if node is not None:
                stop_tree(node, signals=(signal.SIGKILL,))
        shutil.rmtree(temp, ignore_errors=True)
    deadline = time.monotonic() + 30  # a worker forked as the nodes were killed goes a moment later
    while processes_mentioning(temp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(temp) == []


def test_the_serverapp_runs_beside_the_actors_on_one_blas_thread(tmp_path, monkeypatch):
    """While a run lasts the driver, where the ServerApp runs, keeps OpenBLAS to one thread (its
    idle workers would spin on the actors' cores); afterwards it has every thread again."""
    import threadpoolctl
    from flwr.serverapp import ServerApp

    from deploy.processes import usable_cores
    from shared import flower_internals
    from simulations.runtime import SimulationRuntime

    def openblas_threads() -> int:
        return next(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["internal_api"] == "openblas")

    seen: list[int] = []
    probe = ServerApp()

    @probe.main()
    def main(grid, context) -> None:
        seen.append(openblas_threads())

    monkeypatch.setattr(flower_internals, "load_server_app", lambda reference, project_dir: probe)
    before = openblas_threads()
    with SimulationRuntime(tmp_path / "runtime") as runtime:
        runtime.run(small_run_config(tmp_path).to_flower(), NUM_CLIENTS, tmp_path / "flower")
    assert seen == [1]
    assert openblas_threads() == before
    if usable_cores() > 1:
        assert before > 1  # the limit is the run's, not the machine's
