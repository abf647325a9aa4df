"""Checkpoint files: atomic, complete, resumable, refusing what cannot be resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import (
    LOCK_FILE,
    Checkpointer,
    CheckpointError,
    OutputDirBusy,
    RunStatus,
    catalog_identity,
    check_resume_catalog,
    check_resume_config,
    exclusive_output,
    history_to_csv,
)
from shared.data.schema import AdCatalog
from shared.storage import load_npz


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ad_factors": rng.normal(size=(5, 3)).astype(np.float32), "ad_bias": rng.normal(size=5).astype(np.float32)}


def test_latest_returns_the_last_saved_round(tmp_path):
    ckpt = Checkpointer(tmp_path)
    history = []
    for r in range(3):
        history.append({"round": r, "train": {"train-loss": 1.0 / (r + 1)}, "evaluate": {"hr10_sampled": 0.1 * r}, "clients": {}})
        ckpt.save_round(r, _arrays(r), history, {"num-rounds": 5})
    done, arrays, saved_history, config = ckpt.latest()
    assert done == 2
    np.testing.assert_array_equal(arrays["ad_factors"], _arrays(2)["ad_factors"])
    assert saved_history == history and config == {"num-rounds": 5}
    assert not list(tmp_path.rglob("*.tmp"))  # no leftovers of the atomic writes


def test_history_beyond_the_pointer_is_not_resumed(tmp_path):
    """A crash after history.json but before latest.json: resume from what latest.json names."""
    ckpt = Checkpointer(tmp_path)
    history = [{"round": 0, "clients": {}}, {"round": 1, "clients": {}}]
    ckpt.save_round(1, _arrays(1), history, {})
    (tmp_path / "history.json").write_text(json.dumps(history + [{"round": 2, "clients": {}}]))
    done, _, saved_history, _ = ckpt.latest()
    assert done == 1 and [h["round"] for h in saved_history] == [0, 1]


def test_missing_or_corrupt_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Checkpointer(tmp_path).latest()
    ckpt = Checkpointer(tmp_path)
    ckpt.save_round(0, _arrays(0), [{"round": 0, "clients": {}}], {})
    bad = tmp_path / "checkpoints" / "round-0000.npz"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint loads") as error:
        ckpt.latest()
    assert str(bad) in str(error.value)  # the message names the damaged file


def _three_rounds(tmp_path) -> tuple[Checkpointer, list[dict]]:
    ckpt = Checkpointer(tmp_path)
    history: list[dict] = []
    for r in range(3):
        history.append({"round": r, "clients": {}})
        ckpt.save_round(r, _arrays(r), history, {"num-rounds": 5, "seed": 1})
    return ckpt, history


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_good_round(tmp_path, caplog):
    """A damaged latest checkpoint (here cut in half: zipfile's BadZipFile) is named in the log
    and resume goes on from the round before, with the history up to that round."""
    ckpt, _ = _three_rounds(tmp_path)
    latest = tmp_path / "checkpoints" / "round-0002.npz"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        done, arrays, history, config = ckpt.latest()
    assert done == 1 and [h["round"] for h in history] == [0, 1] and config["seed"] == 1
    np.testing.assert_array_equal(arrays["ad_factors"], _arrays(1)["ad_factors"])
    assert str(latest) in caplog.text


def test_a_damaged_pointer_falls_back_to_the_round_files_and_config_json(tmp_path):
    ckpt, _ = _three_rounds(tmp_path)
    (tmp_path / "checkpoints" / "latest.json").write_text("{ cut")
    done, arrays, _, config = ckpt.latest()
    assert done == 2 and config == {"num-rounds": 5, "seed": 1}
    np.testing.assert_array_equal(arrays["ad_bias"], _arrays(2)["ad_bias"])


def test_resume_refuses_a_changed_config_naming_the_keys():
    stored = {"num-rounds": 5, "seed": 42, "privacy": "user", "partitioning": "iid", "output-dir": "a"}
    same_plan_longer = {**stored, "num-rounds": 9, "output-dir": "b"}
    check_resume_config(stored, same_plan_longer, frozenset())  # extending the plan or moving the folder: fine
    changed = {**stored, "seed": 7, "privacy": "none"}
    with pytest.raises(CheckpointError, match="privacy: 'user' -> 'none', seed: 42 -> 7"):
        check_resume_config(stored, changed, frozenset())
    with pytest.raises(CheckpointError, match="privacy") as error:
        check_resume_config(stored, changed, frozenset({"seed"}))
    assert "seed" not in str(error.value).split("differs")[1].split(".")[0]
    check_resume_config(stored, changed, frozenset({"seed", "privacy"}))  # accepted explicitly
    with pytest.raises(CheckpointError, match="no run config"):
        check_resume_config({}, changed, frozenset())


def test_a_checkpoint_older_than_a_key_resumes_with_the_value_its_run_had():
    """A run checkpointed before als-catalog-prior-weight existed lent its tags' factors at full
    weight: its config compares as 1.0, so the resume asks for that, not for None."""
    stored = {"num-rounds": 5, "seed": 42, "als-catalog-prior": True}
    check_resume_config(stored, {**stored, "als-catalog-prior-weight": 1.0}, frozenset())
    with pytest.raises(CheckpointError, match="als-catalog-prior-weight: 1.0 -> 0.01"):
        check_resume_config(stored, {**stored, "als-catalog-prior-weight": 0.01}, frozenset())
    # before content affinity, merchants ranked by the model alone
    check_resume_config(stored, {**stored, "content-affinity": 0.0, "content-affinity-halflife": 3.0}, frozenset())
    with pytest.raises(CheckpointError, match="content-affinity: 0.0 -> 1.6"):
        check_resume_config(stored, {**stored, "content-affinity": 1.6}, frozenset())
    check_resume_config(stored, {**stored, "content-affinity": 1.6}, frozenset({"content-affinity"}))


def _catalog(ad_ids: tuple[str, ...], titles: tuple[str | None, ...] | None = None) -> AdCatalog:
    return AdCatalog(ad_ids, ("shoes",) * len(ad_ids), ("acme",) * len(ad_ids), titles or (None,) * len(ad_ids))


def test_a_checkpoint_records_its_catalog_and_a_resume_on_another_is_refused(tmp_path, caplog):
    """Row i of the parameters belongs to the catalog's i-th ad: a resume on a catalog of as many
    ads in another order would read the old model wrongly (always refused); one whose ads only
    have other content is refused unless the resume accepts `catalog`."""
    catalog = _catalog(("a", "b", "c", "d", "e"))
    ckpt = Checkpointer(tmp_path)
    assert ckpt.catalog() is None  # nothing saved yet
    ckpt.save_round(0, _arrays(0), [{"round": 0, "clients": {}}], {"num-rounds": 5}, catalog=catalog_identity(catalog))
    stored = Checkpointer(tmp_path).catalog()
    assert stored == catalog_identity(catalog) and stored["ads"] == 5
    check_resume_catalog(stored, catalog_identity(_catalog(("a", "b", "c", "d", "e"))), "same.csv", frozenset())  # read again

    reordered = catalog_identity(_catalog(("b", "a", "c", "d", "e")))
    assert reordered["content"] == stored["content"] and reordered["ids"] != stored["ids"]
    for accepted in (frozenset(), frozenset({"catalog", "seed"})):  # never accepted: the rows would mean other ads
        with pytest.raises(CheckpointError, match=r"reordered.csv, 5 ads\) does not hold the ads .* in their order"):
            check_resume_catalog(stored, reordered, "reordered.csv", accepted)
    with pytest.raises(CheckpointError, match=r"6 ads\) does not hold"):
        check_resume_catalog(stored, catalog_identity(_catalog(("a", "b", "c", "d", "e", "f"))), "bigger.csv", frozenset({"catalog"}))

    retitled = catalog_identity(_catalog(("a", "b", "c", "d", "e"), ("new", None, None, None, None)))
    assert retitled["ids"] == stored["ids"] and retitled["content"] != stored["content"]
    with pytest.raises(CheckpointError, match=r"same ads in the same order, but their content .* resume-accept-changes = \"catalog\""):
        check_resume_catalog(stored, retitled, "retitled.csv", frozenset())
    check_resume_catalog(stored, retitled, "retitled.csv", frozenset({"catalog"}))  # accepted: the same ads, new titles
    assert "resuming on retitled.csv with its ads' content changed" in caplog.text
    check_resume_catalog(None, reordered, "old-checkpoint.csv", frozenset())  # written before catalogs were recorded
    assert "resuming on old-checkpoint.csv unchecked" in caplog.text


def test_a_damaged_pointer_still_checks_the_catalog(tmp_path):
    """latest.json damaged: config.json stands in for the run config, catalog.json for the catalog."""
    catalog = _catalog(("a", "b"))
    ckpt = Checkpointer(tmp_path)
    for server_round in range(2):
        ckpt.save_round(server_round, _arrays(server_round), [{"round": r, "clients": {}} for r in range(server_round + 1)],
                        {"num-rounds": 5}, catalog=catalog_identity(catalog))
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    assert Checkpointer(tmp_path).latest()[0] == 1
    assert Checkpointer(tmp_path).catalog() == catalog_identity(catalog)
    with pytest.raises(CheckpointError, match="does not hold the ads"):
        check_resume_catalog(Checkpointer(tmp_path).catalog(), catalog_identity(_catalog(("b", "a"))), "swapped.csv", frozenset())


def test_a_recorded_catalog_that_cannot_be_read_refuses_the_resume(tmp_path):
    """Both records damaged: the resume cannot check the rows against the catalog, so it is
    refused, naming the file, rather than resumed unchecked as a checkpoint from before fedads
    recorded catalogs would be."""
    catalog = _catalog(("a", "b"))
    Checkpointer(tmp_path).save_round(0, _arrays(0), [{"round": 0, "clients": {}}], {"num-rounds": 5}, catalog=catalog_identity(catalog))
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    (tmp_path / "checkpoints" / "catalog.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"catalog.json is unreadable .* cannot be checked"):
        Checkpointer(tmp_path).catalog()


def test_a_catalogs_identity_is_its_own_fields_only():
    """The same catalog built again (another process, another run) has the same identity; it
    does not depend on fedads' feature settings."""
    import subprocess
    import sys

    program = ("from server.checkpoint import catalog_identity; from shared.data.schema import AdCatalog; "
               "print(catalog_identity(AdCatalog(('a', 'b'), ('shoes', 'hats'), ('acme', None), (None, 'Hat'))))")
    other_process = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    here = catalog_identity(AdCatalog(("a", "b"), ("shoes", "hats"), ("acme", None), (None, "Hat")))
    assert other_process == str(here)


def test_resume_accept_changes_names_real_keys():
    from shared.config import ConfigError, RunConfig

    assert RunConfig.from_flower({"resume-accept-changes": "seed, privacy"}).accepted_resume_changes == {"seed", "privacy"}
    assert RunConfig.from_flower({"resume-accept-changes": "catalog"}).accepted_resume_changes == {"catalog"}  # the catalog's content
    with pytest.raises(ConfigError, match="unknown keys: sede"):
        RunConfig.from_flower({"resume-accept-changes": "sede"})


def test_export_and_csv(tmp_path):
    ckpt = Checkpointer(tmp_path)
    path = ckpt.export_model(_arrays(4), ("a", "b", "c", "d", "e"), {"rounds": 4})
    exported = load_npz(path)
    assert exported["ad_ids"].tolist() == ["a", "b", "c", "d", "e"]
    assert json.loads((tmp_path / "model" / "model.json").read_text())["rounds"] == 4
    csv_text = history_to_csv([
        {"round": 1, "round_seconds": 2.0, "train": {"train-loss": 0.5}, "evaluate": {"hr10_sampled": 0.3},
         "clients": {"merchant-1": {"hr10_sampled": 0.2}, "merchant-0": {"hr10_sampled": 0.4}}},
    ])
    lines = csv_text.strip().splitlines()
    assert lines[0].split(",")[:3] == ["round", "round_seconds", "client"]
    assert [line.split(",")[2] for line in lines[1:]] == ["aggregate", "merchant-0", "merchant-1"]


def test_run_status_is_current_from_the_start(tmp_path):
    """run_status.json says "running" (with Flower's run id) from the first moment, the rounds
    completed after each, then how the run ended: what `deploy.runs resume` reads."""
    checkpointer = Checkpointer(tmp_path)
    status = RunStatus(checkpointer, flower_run_id=42, rounds_planned=3, rounds_completed=1)
    read = lambda: json.loads(checkpointer.status_path.read_text())  # noqa: E731
    assert read() == {"status": "running", "flower_run_id": 42, "rounds_planned": 3, "rounds_completed": 1,
                      "reason": None, "failed_round": None}
    status.update(rounds_completed=2)
    assert read()["rounds_completed"] == 2 and read()["status"] == "running"
    status.update(status="failed", reason="OSError: disk full")
    assert read()["status"] == "failed" and read()["reason"] == "OSError: disk full" and read()["flower_run_id"] == 42


def test_one_serverapp_holds_a_run_folder_at_a_time(tmp_path):
    """exclusive_output: a second holder, in this process or another, is refused with the first
    one's run id; the folder is free again once the first lets go, or once its process is killed."""
    out = tmp_path / "out"
    with exclusive_output(out, 7):
        with pytest.raises(OutputDirBusy, match=r"another ServerApp \(Flower run 7\)"), exclusive_output(out, 8):
            pass
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from server.checkpoint import exclusive_output\n"
             "with exclusive_output(Path(sys.argv[1]), 9): pass", str(out)],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
        )
        assert other.returncode != 0 and "Flower run 7" in other.stderr
    with exclusive_output(out, 8):  # let go: free
        assert (out / LOCK_FILE).read_text() == "8\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from server.checkpoint import exclusive_output\n"
         "with exclusive_output(Path(sys.argv[1]), 10):\n    print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputDirBusy, match=r"Flower run 10"), exclusive_output(out, 11):
        pass
    holder.kill()  # SIGKILL: no block ends, the lock goes with the process
    holder.wait(timeout=60)
    with exclusive_output(out, 11):
        assert (out / LOCK_FILE).read_text() == "11\n"
