"""The one-run privacy audit (simulations/audit/): canaries, the report's section, and an audit
end to end through Flower's simulation runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.config import RunConfig
from shared.data.loaders import load_catalog_file, load_log_file
from shared.data.sources import load_dataset, simulated_shards
from shared.data.split import NO_TEST, leave_last_out
from simulations.audit.canaries import CATEGORY, draw_canaries, pin_shards, write_dataset
from simulations.audit.command import main as audit_main
from simulations.audit.figures import markdown_table
from simulations.audit.runs import plan_runs
from simulations.audit.statistics import largest_bound
from simulations.experiment import load_experiment
from simulations.report import write_report
from tests.conftest import processes_mentioning

# the report's own figures have no series when no cell ran; the audit's section is what is tested
no_empty_legend_warning = pytest.mark.filterwarnings("ignore:No artists with labels found")

TINY = """
dataset = "synthetic"
synthetic-users = 300
synthetic-ads = 120
partitioning = "merchant"
num-rounds = 2
factors = 8
privacy = "none"

[sweep]
clients = [2]
epsilons = [1]
seeds = [3]
"""


def _synthetic(**values: object) -> RunConfig:
    return RunConfig.from_flower({"synthetic-users": 300, "synthetic-ads": 120, "synthetic-merchants": 3, "seed": 3, **values})


def test_canaries_half_in_with_their_ads_public_and_trained_on(tmp_path):
    dataset = load_dataset(_synthetic())
    augmented, canaries = draw_canaries(dataset, 200, seed=11, ordinary=3)
    again, same = draw_canaries(dataset, 200, seed=11, ordinary=3)
    assert np.array_equal(canaries.included, same.included) and np.array_equal(augmented.log.ad, again.log.ad)  # seeded
    assert 70 < canaries.included.sum() < 130
    # every canary ad is in the public catalog, included or not
    assert augmented.catalog.ad_ids[: len(dataset.catalog)] == dataset.catalog.ad_ids
    assert augmented.catalog.ad_ids[len(dataset.catalog):] == canaries.ad_ids
    assert set(augmented.catalog.categories[len(dataset.catalog):]) == {CATEGORY}
    # only the included canaries have rows: their canary ad and three ordinary ads, each under one existing merchant
    users = set(augmented.log.user.tolist()) - set(dataset.log.user.tolist())
    assert users == {u for u, flag in zip(canaries.user_ids, canaries.included) if flag}
    assert len(augmented.log) == len(dataset.log) + 4 * int(canaries.included.sum())
    assert augmented.log.merchant is not None and dataset.log.merchant is not None
    assert set(augmented.log.merchant.tolist()) == set(dataset.log.merchant.tolist())
    # the canary ad always trains (the latest ordinary ad is the held-out one)
    split = leave_last_out(augmented.log, len(augmented.catalog))
    for i, user in enumerate(split.user_ids.tolist()):
        if user in users:
            own = augmented.catalog.index[canaries.ad_ids[canaries.user_ids.index(user)]]
            assert own in split.positives(i) and split.test_ad[i] != NO_TEST and split.test_ad[i] < len(dataset.catalog)
    # written as a "logs" dataset, it reads back the same
    log_path, catalog_path, digest = write_dataset(augmented, tmp_path / "data")
    catalog = load_catalog_file(catalog_path)
    reread = load_log_file(log_path, catalog)
    assert catalog.ad_ids == augmented.catalog.ad_ids and np.array_equal(reread.ad, augmented.log.ad)
    assert write_dataset(again, tmp_path / "again")[2] == digest


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "merchant"])
def test_a_canary_joins_one_shard_and_moves_no_other_user(partitioning):
    """The shards are cut before the canaries join: with the shards pinned, every merchant holds
    exactly its own users of the run without canaries, plus the canaries drawn in for it (an iid
    cut of the augmented log would reshuffle every shard with each canary)."""
    cfg = _synthetic(partitioning=partitioning)
    dataset = load_dataset(cfg)
    before = {name: set(shard.user.tolist()) for name, shard in simulated_shards(cfg, dataset, 3)}
    augmented, canaries = draw_canaries(pin_shards(dataset, cfg, 3), 60, seed=5)
    after = {name: set(shard.user.tolist()) for name, shard in simulated_shards(cfg.with_values(partitioning="merchant"), augmented, 3)}
    assert set(after) == set(before)
    joined = set()
    for name, users in after.items():
        assert users - set(canaries.user_ids) == before[name]
        joined |= users & set(canaries.user_ids)
    assert joined == {u for u, flag in zip(canaries.user_ids, canaries.included) if flag}


def test_without_ordinary_ads_the_canary_ad_is_the_only_positive():
    dataset = load_dataset(_synthetic())
    augmented, canaries = draw_canaries(dataset, 20, seed=1, ordinary=0)
    split = leave_last_out(augmented.log, len(augmented.catalog))
    mine = [i for i, u in enumerate(split.user_ids.tolist()) if u in canaries.user_ids]
    assert mine and all(len(split.positives(i)) == 1 and split.test_ad[i] == NO_TEST for i in mine)


def test_runs_follow_the_experiment(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace("epsilons = [1]", "epsilons = [1, 4]\nsolvers = [\"als\", \"sgd\"]\nprivate-als-rounds = 1"))
    runs = plan_runs(load_experiment(path))
    assert [r.name for r in runs] == ["als-nodp", "als-eps1", "als-eps4", "sgd-nodp", "sgd-eps1", "sgd-eps4"]
    assert [r.config.num_rounds for r in runs] == [2, 1, 1, 2, 2, 2]
    assert [r.config.privacy for r in runs] == ["none", "user", "user"] * 2
    assert all(r.clients == 2 and r.config.synthetic_merchants == 2 and r.config.seed == 3 for r in runs)
    assert [r.name for r in plan_runs(load_experiment(path), ["sgd"], [8.0], non_private=False)] == ["sgd-eps8"]


def _record(solver: str, epsilon: float | None, bound: float) -> dict[str, object]:
    return {"solver": solver, "dataset": "synthetic", "dp": epsilon is not None, "epsilon": epsilon, "canaries": 100,
            "epsilon_lower_bound": bound, "guesses": 50, "correct": 40, "delta": 1e-6, "epsilon_lower_bound_max": 2.46}


@no_empty_legend_warning
def test_the_report_shows_an_audit_when_there_is_one(tmp_path):
    experiment = load_experiment((tmp_path / "tiny.toml", (tmp_path / "tiny.toml").write_text(TINY))[0])
    page = write_report(experiment, tmp_path, [], {"cells": []}).read_text()
    assert "Privacy audit" not in page and not (tmp_path / "plots" / "audit.png").exists()
    records = [_record("als", None, 2.46), _record("als", 1.0, 0.0), _record("sgd", None, 1.9), _record("sgd", 1.0, 0.1)]
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "audit.json").write_text(json.dumps(records))
    page = write_report(experiment, tmp_path, [], {"cells": []}).read_text()
    assert "Privacy audit" in page and 'src="plots/audit.png"' in page and ">SGD</td>" in page
    assert (tmp_path / "plots" / "audit.png").read_bytes()[:4] == b"\x89PNG"
    assert markdown_table(records).count("\n") == 5
    (tmp_path / "audit" / "audit.json").write_text("{broken")
    assert "Privacy audit" not in write_report(experiment, tmp_path, [], {"cells": []}).read_text()


@no_empty_legend_warning
def test_an_audit_finds_the_canaries_without_dp_and_not_beyond_the_claim_with_dp(tmp_path, capsys):
    """Private ALS on a tiny market, 80 canaries: without DP every guess is right (the bound is
    the most 80 canaries can show, well above 1); at epsilon 1 the bound stays below 1. The
    audit lies in the experiment's sweep folder, so the sweep's report shows it."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    sweep_dir = tmp_path / "runs" / "tiny"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "results.json").write_text("[]")  # a sweep's run folder (no cell finished)
    output = sweep_dir / "audit"
    assert audit_main([str(path), "--output", str(output), "--canaries", "80"]) == 0
    records = json.loads((output / "audit.json").read_text())
    assert [(r["solver"], r["dp"], r["epsilon"]) for r in records] == [("als", False, None), ("als", True, 1.0)]
    assert all(r["canaries"] == 80 and r["dataset"] == "synthetic" for r in records)
    free, private = records
    assert free["delta"] == 0 and free["epsilon_lower_bound"] >= 0.8 * largest_bound(80, 0.0) and free["epsilon_lower_bound"] > 1.5
    assert 0 < private["delta"] < 1e-3 and private["epsilon_lower_bound"] < 1.0
    assert (output / "audit.png").read_bytes()[:4] == b"\x89PNG" and "Privacy audit" in (output / "audit.html").read_text()
    assert "Privacy audit" in (sweep_dir / "report.html").read_text()
    canaries = json.loads((output / "canaries.json").read_text())["canaries"]
    assert len(canaries) == 80 and free["included"] == sum(c["included"] for c in canaries)
    assert "| ALS | synthetic | no |" in capsys.readouterr().out
    # nothing of the runtime outlives the audit; a second audit reuses the finished runs
    assert not processes_mentioning(str(output))
    assert audit_main([str(path), "--output", str(output), "--canaries", "80"]) == 0
    assert json.loads((output / "audit.json").read_text()) == records
    assert not processes_mentioning(str(output))


@pytest.mark.parametrize("argv", [["--canaries", "1"], ["--no-dp", "--dp-only"]])
def test_bad_audits_are_refused(tmp_path, argv):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    if "--dp-only" in argv:
        with pytest.raises(SystemExit):
            audit_main([str(path), *argv])
    else:
        assert audit_main([str(path), "--output", str(tmp_path / "out"), *argv]) == 1
    assert not processes_mentioning(str(tmp_path))

