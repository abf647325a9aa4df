"""The ledger under concurrency and crashes (issue 13, item 4).

- Flower's SuperNode runs a node's ClientApp processes without waiting for each other: messages
  racing on one state directory release at most the budget, and every release made is recorded;
- the ledger's lock is exclusive, its file is the owner's only and is gone once released;
- an atomic write syncs the directory after the rename, so a crash cannot undo a recorded release.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import stat
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from client.privacy.ledger import LEDGER_FILE, LOCK_FILE, LedgerState, PrivacyLedger
from shared.config import RunConfig
from shared.flower_internals import server_identity
from shared.params import init_global_arrays
from shared.wire import PRIVACY_REFUSED
from tests.conftest import client_call, simulated_node, small_run_config

RACERS = 3
# a guard against a hang, never a timing assumption: every wait below ends on a condition
HANG_GUARD_S = 180.0


def _one_release_config(tmp_path: Path) -> RunConfig:
    """Private ALS planned for one round: the budget allows exactly one release."""
    return small_run_config(tmp_path, privacy="user", **{"num-rounds": 1, "dp-metrics": "none"})


def _race(tmp_path: Path, start: Any, gate: Any, arrived: Any, results: Any, racer: int) -> None:
    """One ClientApp process of the node: a training message, sent when every racer is ready.
    Each racer's global parameters differ a little (two runs, or two rounds, racing): the same
    instruction twice would get the recorded release again (client/release_record.py), no race.

    Widens the race deterministically: a racer that passed the budget check waits, before it
    releases and records, until every other racer has either passed the check too (the ledger
    is not locked) or is blocked waiting for the ledger's lock. So without the lock all racers
    pass the check on the same ledger; with it, the others check only after the first recorded."""
    try:
        cfg = _one_release_config(tmp_path)
        node = simulated_node(cfg)  # the node's data loads before the start: the racers meet at the handler
        arrays = {key: value + np.float32(1e-3 * racer) for key, value in init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed).items()}

        def arrive() -> None:
            with gate:
                arrived.value += 1
                gate.notify_all()

        check = PrivacyLedger.require

        def check_then_wait_for_the_others(self: PrivacyLedger, planned: Any, what: str) -> float:
            after = check(self, planned, what)
            arrive()
            with gate:
                if not gate.wait_for(lambda: arrived.value >= RACERS, timeout=HANG_GUARD_S):
                    raise RuntimeError(f"only {arrived.value} of {RACERS} racers passed the check or waited for the lock")
            return after

        flock = fcntl.flock

        def flock_reporting_a_wait(fd: Any, operation: int) -> None:
            if operation & fcntl.LOCK_EX and not operation & fcntl.LOCK_NB:
                try:
                    return flock(fd, operation | fcntl.LOCK_NB)
                except BlockingIOError:
                    arrive()  # another racer holds the lock: this one blocks below until it is released
            return flock(fd, operation)

        PrivacyLedger.require = check_then_wait_for_the_others  # type: ignore[method-assign]
        fcntl.flock = flock_reporting_a_wait
        start.wait(timeout=HANG_GUARD_S)
        with server_identity():
            reply = client_call("train", cfg, arrays, 1)
        results.put(("error", reply.error.code, reply.error.reason) if reply.has_error() else ("released", None, ""))
    except BaseException:
        start.abort()  # the racers still waiting to start fail at once instead of waiting for this one
        results.put(("crashed", None, traceback.format_exc()))


def test_messages_racing_on_one_node_release_at_most_the_budget_and_record_every_release(tmp_path):
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as the SuperNode's ClientApp processes
    start, gate, arrived, results = context.Barrier(RACERS), context.Condition(), context.Value("i", 0, lock=False), context.Queue()
    racers = [context.Process(target=_race, args=(tmp_path, start, gate, arrived, results, racer)) for racer in range(RACERS)]
    for racer in racers:
        racer.start()
    try:
        replies = [results.get(timeout=HANG_GUARD_S) for _ in racers]
    finally:
        for racer in racers:
            racer.join(timeout=HANG_GUARD_S)
            if racer.is_alive():
                racer.kill()

    crashed = [reason for outcome, _, reason in replies if outcome == "crashed"]
    assert not crashed, crashed[0]
    released = sum(outcome == "released" for outcome, _, _ in replies)
    ledger = PrivacyLedger.open(simulated_node(_one_release_config(tmp_path)).state.directory)
    recorded = ledger.summary()["releases"]
    assert released == recorded, f"{released} replies released, the ledger recorded {recorded}: a release was lost"
    assert released == 1 and ledger.state.rounds_trained == 1  # the budget allows one release
    refusals = [(code, reason) for outcome, code, reason in replies if outcome == "error"]
    assert len(refusals) == RACERS - 1
    assert all(code == PRIVACY_REFUSED and "budget" in reason for code, reason in refusals), refusals


def test_the_ledger_lock_is_exclusive_its_file_the_owners_only_and_gone_once_released(tmp_path):
    directory = tmp_path / "state"
    with PrivacyLedger.lock(directory):
        other = os.open(directory / LOCK_FILE, os.O_RDWR)
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("a second holder took the ledger's lock")
            except BlockingIOError:
                pass
        finally:
            os.close(other)
        assert stat.S_IMODE(os.stat(directory / LOCK_FILE).st_mode) == 0o600
    assert not any(directory.iterdir())  # a refused message leaves the state directory as it found it
    with PrivacyLedger.lock(directory):  # and the next message takes it again
        pass


def test_recording_a_release_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / LEDGER_FILE
    synced: list[tuple[bool, tuple[int, int], bool]] = []  # (a directory?, which, the new ledger in place?)
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), (info.st_dev, info.st_ino), path.is_file()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    PrivacyLedger(directory, LedgerState(target_epsilon=1.0, delta=1e-5)).record([(1.0, 1.0, 1)])

    here = os.stat(directory)
    directory_syncs = [renamed for is_dir, which, renamed in synced if is_dir and which == (here.st_dev, here.st_ino)]
    assert directory_syncs == [True]  # once, after the ledger took its place
    assert synced[0][0] is False  # the file's content is synced first
