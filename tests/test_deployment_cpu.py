"""benchmarks/deployment_cpu.py's arithmetic: which process is which, and one exchange's CPU
from /proc samples taken while the exchanges ran (the benchmark itself is a script)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("deployment_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "deployment_cpu.py")
assert _SPEC is not None and _SPEC.loader is not None
deployment_cpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(deployment_cpu)

# pid -> (parent, command line) of a one-merchant deployment, as /proc shows it
TREE = {
    10: (1, "python -m deploy.superlink start --ca-cert c --in-memory --port 9093 --fleet-address 127.0.0.1:9092"),
    11: (10, "python -m deploy.flower_superlink --ssl-ca-certfile c --database :flwr-in-memory:"),
    12: (11, "python /venv/bin/flower-superexec --plugin-type serverapp --appio-api-address 127.0.0.1:9091"),
    13: (12, "python /venv/bin/flwr-serverapp --serverappio-api-address 127.0.0.1:9091 --token t"),
    20: (1, "python -m deploy.supernode --superlink 127.0.0.1:9092 --node-config data-path=x"),
    21: (20, "python /tmp/fedads-supernode-x/flower-superexec --plugin-type clientapp --appio-api-address 127.0.0.1:9094"),
    22: (20, "python -m deploy.warm_clientapp --socket /tmp/fedads-supernode-x/warm.sock --parent-pid 20"),
    30: (1, "python -m something.else"),
}


def _sample(t: float, cpu: dict[int, float]) -> tuple[float, dict[int, tuple[int, str, float]]]:
    return t, {pid: (TREE[pid][0], TREE[pid][1], cpu[pid]) for pid in cpu}


def test_each_process_gets_its_role_superexecs_by_whom_they_run_under():
    table = {pid: (parent, command, 0.0) for pid, (parent, command) in TREE.items()}
    roles = {pid: deployment_cpu._role(pid, table) for pid in TREE}
    assert roles == {10: "Fleet gateway", 11: "SuperLink", 12: "SuperLink's SuperExec + ServerApp",
                     13: "SuperLink's SuperExec + ServerApp", 20: "SuperNodes", 21: "SuperNodes' SuperExecs",
                     22: "warm ClientApp processes + their ClientApps", 30: "other"}


def test_one_exchange_is_the_cpu_between_two_samples_over_the_exchanges_begun_between_them():
    started_at = [100.0 + i for i in range(30)]  # an exchange a second
    rates = {pid: 0.01 * pid for pid in TREE}  # CPU seconds per wall second, per process
    samples = [_sample(95.0 + 0.5 * k, {pid: rate * 0.5 * k for pid, rate in rates.items()}) for k in range(80)]
    cpu, count, seconds, ended = deployment_cpu.per_exchange(samples, started_at)
    # the window: first sample at or after exchange 5 began (105.0), last at or before the 5th from last (125.0)
    assert (count, seconds, ended) == (20, 20.0, 0)
    assert cpu["SuperLink"] == pytest.approx(rates[11])
    assert cpu["SuperLink's SuperExec + ServerApp"] == pytest.approx(rates[12] + rates[13])
    assert cpu["warm ClientApp processes + their ClientApps"] == pytest.approx(rates[22])
    assert sum(cpu.values()) == pytest.approx(sum(rates.values()))


def test_a_process_that_ends_inside_the_window_is_counted_as_such_and_too_few_samples_refused():
    started_at = [100.0 + i for i in range(30)]
    samples = [_sample(105.0, {11: 1.0, 13: 2.0}), _sample(125.0, {11: 3.0})]
    cpu, count, _, ended = deployment_cpu.per_exchange(samples, started_at)
    assert ended == 1 and cpu["SuperLink"] == pytest.approx(2.0 / count)
    with pytest.raises(RuntimeError, match="too few samples"):
        deployment_cpu.per_exchange(samples[:1], started_at)
