"""The merchant CLI (client/merchant_cli.py) on a real node state.

The state directories are written by the real ClientApp, called in-process as a deployed
SuperNode would be (node config `data-path`, `catalog-path`, `state-dir`), for a few rounds on a
small synthetic market. Expected values are computed independently of the CLI: logs are read
back with the csv module and the state's .npz/.json files with numpy and the ledger class.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client.merchant_cli import main
from client.node_state import NodeState
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from client.user_step import ALSUserStep, SGDUserStep
from server.als_aggregation import ALSAggregation
from shared.als import ALSSettings
from shared.config import RunConfig
from shared.data.loaders import write_catalog_csv, write_log_csv
from shared.data.schema import Dataset, Event
from shared.data.synthetic import SyntheticSpec, generate
from shared.flower_internals import server_identity
from shared.node_config import NodeConfig
from shared.params import init_global_arrays
from shared.wire import ARRAYS, from_array_record
from tests.conftest import client_call

REPO = Path(__file__).resolve().parents[1]
NUM_ADS = 80
NEW_USERS = 20  # users of the merchant's log that training never saw: fold-in's job
ROUNDS = 3


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def market():
    dataset, _ = generate(SyntheticSpec(merchants=1, users=300, ads=NUM_ADS, categories=6, mean_clicks_per_user=15, seed=3))
    return dataset


def _train(tmp: Path, log_csv: Path, catalog_csv: Path, privacy: str, rounds: int, solver: str = "als") -> Path:
    """`rounds` ClientApp train rounds of one merchant, the server's side done in-process (ALS:
    the strategy's solve of the statistics; SGD: a one-client FedAvg, the reply is the next
    global model); the last global model is stored as the next round would store it."""
    state_dir = tmp / f"state-{privacy}-{solver}"
    cfg = RunConfig.from_flower({
        "output-dir": str(tmp / "out"), "state-dir": str(tmp / "unused"), "num-rounds": rounds,
        "local-epochs": 3, "learning-rate": 0.05, "privacy": privacy, "mf-solver": solver,
    })
    server = ALSAggregation(ALSSettings.from_config(cfg), NUM_ADS, cfg.factors, num_rounds=rounds, min_train_nodes=1)
    node_config = {"data-path": str(log_csv), "catalog-path": str(catalog_csv), "state-dir": str(state_dir),
                   "privacy-mode": "user" if privacy == "user" else "none"}  # the merchant opts out of DP for the plain runs
    arrays = init_global_arrays(NUM_ADS, cfg.factors, seed=1)
    with server_identity():
        for server_round in range(1, rounds + 1):
            release, arrays = server.begin_round(server_round, arrays)  # what configure_train would ask for and send
            reply = client_call("train", cfg, arrays, server_round, node_config=node_config, release=release)
            assert not reply.has_error(), reply.error
            arrays = from_array_record(server.aggregate_train(server_round, [reply])[0] if solver == "als" else reply.content[ARRAYS])
    step = NodeState(state_dir).load_user_step()  # the one the merchant trained with (alpha0 "auto": its density)
    assert isinstance(step, {"als": ALSUserStep, "sgd": SGDUserStep}[solver])
    NodeState(state_dir).save_global_model(arrays, rounds, step)
    return state_dir


@pytest.fixture(scope="module")
def node(tmp_path_factory, market):
    """Files of a merchant whose first NEW_USERS users joined after training (`merchant.csv`
    holds them, without half of their positives: `held_out`), and its trained state dirs."""
    tmp = tmp_path_factory.mktemp("merchant")
    catalog_csv, train_csv, merchant_csv = tmp / "catalog.csv", tmp / "train.csv", tmp / "merchant.csv"
    write_catalog_csv(catalog_csv, market.catalog)
    log = market.log
    new_users = np.unique(log.user)[:NEW_USERS]
    is_new = np.isin(log.user, new_users)
    write_log_csv(train_csv, Dataset("train", market.catalog, log.subset(np.flatnonzero(~is_new))))
    rng = np.random.default_rng(0)
    keep, held_out = np.ones(len(log), dtype=bool), {}
    for user in new_users:
        positives = np.flatnonzero((log.user == user) & (log.event >= Event.CLICK))
        hidden = rng.choice(positives, size=len(positives) // 2, replace=False)
        keep[hidden] = False
        held_out[str(user)] = {market.catalog.ad_ids[a] for a in log.ad[hidden]}
    write_log_csv(merchant_csv, Dataset("merchant", market.catalog, log.subset(np.flatnonzero(keep))))
    return {
        "tmp": tmp, "catalog": catalog_csv, "train": train_csv, "log": merchant_csv,
        "new_users": [str(u) for u in new_users], "held_out": held_out,
        "state": _train(tmp, train_csv, catalog_csv, "none", ROUNDS),
        "dp_state": _train(tmp, train_csv, catalog_csv, "user", 2),
        "sgd_state": _train(tmp, train_csv, catalog_csv, "none", ROUNDS, solver="sgd"),
    }


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def summary_fields(out: str) -> dict[str, str]:
    """`  label:  value` lines of validate's summary (rejection details are indented deeper)."""
    fields = {}
    for line in out.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("    "):
            label, _, value = line.strip().partition(":")
            fields[label] = value.strip()
    return fields


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- command line
def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "client.merchant_cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("validate", "budget", "recommend", "fold-in"):
        assert command in result.stdout


def test_usage_error_is_nonzero(capsys):
    code, _, err = run(capsys, "recommend", "--state-dir", "x")
    assert code == 2 and "required" in err


# ---------------------------------------------------------------------- validate
def test_validate_summarizes_what_the_file_holds(capsys, node):
    code, out, err = run(capsys, "validate", "--log", node["log"], "--catalog", node["catalog"])
    assert code == 0, err
    rows = read_rows(node["log"])
    stamps = [int(r["timestamp"]) for r in rows]
    events = Counter(r["event"] for r in rows)
    lines = summary_fields(out)
    assert int(lines["rows"]) == len(rows)
    assert int(lines["users"]) == len({r["user_id"] for r in rows})
    assert lines["ads"] == f"{len({r['ad_id'] for r in rows})} of {NUM_ADS} in the catalog"
    for name in ("impression", "click", "purchase"):
        assert int(lines[name]) == events[name]
    assert lines["first"].split()[0] == str(min(stamps))
    assert lines["last"].split()[0] == str(max(stamps))
    assert int(lines["rejected"]) == 0


def test_validate_names_file_line_and_field(capsys, node, tmp_path):
    header = write(tmp_path / "header.csv", "user,ad_id,timestamp\nu1,ad-00001,5\n")
    code, _, err = run(capsys, "validate", "--log", header, "--catalog", node["catalog"])
    assert code == 2 and f"{header}:1:" in err and "'user_id'" in err and len(err.strip().splitlines()) == 1

    value = write(tmp_path / "value.csv", "user_id,ad_id,timestamp,event\nu1,ad-00001,5,click\nu1,ad-00002,yesterday,click\n")
    code, _, err = run(capsys, "validate", "--log", value, "--catalog", node["catalog"])
    assert code == 2 and f"{value}:3:" in err and "'timestamp'" in err

    event = write(tmp_path / "event.csv", "user_id,ad_id,timestamp,event\nu1,ad-00001,5,like\n")
    code, _, err = run(capsys, "validate", "--log", event, "--catalog", node["catalog"])
    assert code == 2 and f"{event}:2:" in err and "'event'" in err


def test_validate_shows_what_it_accepted_but_reports(capsys, node, tmp_path):
    """Rows accepted with a notice (a "-1" user id, an exact duplicate) are shown, counted, with
    their first line."""
    log = write(tmp_path / "odd.csv", "user_id,ad_id,timestamp,event\n-1,ad-00001,5,click\nu1,ad-00002,6,click\nu1,ad-00002,6,click\n")
    code, out, err = run(capsys, "validate", "--log", log, "--catalog", node["catalog"])
    assert code == 0, err
    assert summary_fields(out)["notices"].startswith("2")
    assert f"{log}:2: field 'user_id'" in out and f"{log}:4:" in out


def test_unknown_ads_fail_strict_and_are_counted_lenient(capsys, node, tmp_path):
    log = write(tmp_path / "drift.csv", (
        "user_id,ad_id,timestamp,event\n"
        "u1,ad-00001,100,click\n"
        "u1,ad-99999,200,click\n"
        "u2,ad-00002,300,impression\n"
        "u2,gone,400,purchase\n"
        "u2,ad-00003,500,purchase\n"
    ))
    code, _, err = run(capsys, "validate", "--log", log, "--catalog", node["catalog"])
    assert code == 2 and f"{log}:3:" in err and "'ad_id'" in err and "ad-99999" in err

    code, out, err = run(capsys, "validate", "--log", log, "--catalog", node["catalog"], "--lenient")
    assert code == 0, err
    lines = summary_fields(out)
    assert lines["rows"] == "3" and lines["users"] == "2"
    assert lines["impression"] == lines["click"] == lines["purchase"] == "1"
    assert lines["rejected"] == "2"
    assert f"2 x field 'ad_id' is not in the ad catalog (e.g. {log}:3, {log}:5)" in out


def test_validate_missing_files(capsys, node, tmp_path):
    code, _, err = run(capsys, "validate", "--log", tmp_path / "nope.csv", "--catalog", node["catalog"])
    assert code == 2 and "nope.csv" in err and "does not exist" in err
    code, _, err = run(capsys, "validate", "--log", node["log"], "--catalog", tmp_path / "nocat.csv")
    assert code == 2 and "nocat.csv" in err and "does not exist" in err


# ---------------------------------------------------------------------- budget
def test_budget_reports_the_ledger_after_dp_rounds(capsys, node):
    ledger = PrivacyLedger.open(node["dp_state"])
    expected = ledger.epsilon()
    assert 0 < expected <= ledger.state.target_epsilon

    code, out, err = run(capsys, "budget", "--state-dir", node["dp_state"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["dp_guarantee"] is True
    assert report["epsilon_spent"] == expected
    assert report["epsilon_remaining"] == pytest.approx(ledger.state.target_epsilon - expected)
    assert report["target_epsilon"] == ledger.state.target_epsilon == 8.0
    assert report["delta"] == ledger.state.delta
    assert report["rounds_trained"] == 2
    assert report["noise_multiplier"] == ledger.state.noise_multiplier
    assert report["releases"] == sum(n for _, _, n in ledger.state.history) > 0
    assert report["non_private_releases"] == 0

    code, out, _ = run(capsys, "budget", "--state-dir", node["dp_state"])
    assert code == 0
    assert f"epsilon spent:         {expected:.6g}" in out
    assert "rounds trained:        2" in out


def test_the_node_config_the_supernode_runs_with_stands_in_for_the_flags(capsys, node, tmp_path):
    config = NodeConfig(data_path=str(node["log"]), catalog_path=str(node["catalog"]), state_dir=str(node["dp_state"]),
                        merchant_id="m").write(tmp_path / "node-config.toml")
    by_flags = [run(capsys, "budget", "--state-dir", node["dp_state"], "--json"),
                run(capsys, "validate", "--log", node["log"], "--catalog", node["catalog"]),
                run(capsys, "recommend", "--state-dir", node["dp_state"], "--log", node["log"], "--catalog", node["catalog"], "--k", "3")]
    by_file = [run(capsys, "budget", "--node-config", config, "--json"),
               run(capsys, "validate", "--node-config", config),
               run(capsys, "recommend", "--node-config", config, "--k", "3")]
    assert [code for code, _, _ in by_file] == [0, 0, 0]
    assert [out for _, out, _ in by_file[1:]] == [out for _, out, _ in by_flags[1:]]
    # budget also shows the merchant's policy, which only the node config holds
    with_policy, without = json.loads(by_file[0][1]), json.loads(by_flags[0][1])
    assert with_policy.pop("policy") == {"mode": "user", "max_epsilon": 8.0, "delta": 1e-6, "max_users": 100000, "metrics": "noised",
                                         "solvers": ["als", "sgd", "neumf"], "secure_aggregation": "refuse", "secure_colluders": 0}
    assert without.pop("policy") is None and with_policy == without
    code, out, _ = run(capsys, "budget", "--node-config", config)
    assert "policy:                user-level DP required; epsilon at most 8, delta 1e-06" in out
    # a flag given beside the file wins; a node config without a state dir cannot serve budget
    code, out, _ = run(capsys, "budget", "--node-config", config, "--state-dir", node["state"], "--json")
    assert code == 0 and json.loads(out)["state_dir"] == str(node["state"])
    bare = NodeConfig(data_path=str(node["log"])).write(tmp_path / "bare.toml")
    code, _, err = run(capsys, "budget", "--node-config", bare)
    assert code == 2 and "--state-dir is required (or --node-config with state-dir)" in err
    broken = write(tmp_path / "broken.toml", 'data-path = "/x.csv"\nstate_dir = "s"\n')
    code, _, err = run(capsys, "budget", "--node-config", broken)
    assert code == 2 and f"{broken}:2: field 'state_dir'" in err


def test_budget_of_non_private_training_says_there_is_no_guarantee(capsys, node):
    code, out, _ = run(capsys, "budget", "--state-dir", node["state"], "--json")
    assert code == 0
    report = json.loads(out)
    assert report["dp_guarantee"] is False and report["epsilon_spent"] is None
    assert report["non_private_releases"] == ROUNDS and report["rounds_trained"] == ROUNDS
    code, out, _ = run(capsys, "budget", "--state-dir", node["state"])
    assert "NO DP GUARANTEE" in out and "epsilon spent:         inf" in out


def test_budget_fails_on_a_missing_or_corrupt_ledger(capsys, node, tmp_path):
    code, _, err = run(capsys, "budget", "--state-dir", tmp_path / "absent")
    assert code == 2 and "does not exist" in err

    code, _, err = run(capsys, "budget", "--state-dir", tmp_path)
    assert code == 2 and LEDGER_FILE in err and "no privacy ledger" in err
    assert not (tmp_path / LEDGER_FILE).exists()  # reading never creates one

    corrupt = tmp_path / "corrupt"
    shutil.copytree(node["dp_state"], corrupt)
    document = json.loads((corrupt / LEDGER_FILE).read_text())
    document["ledger"]["rounds_trained"] = 0  # an edit the checksum does not cover
    (corrupt / LEDGER_FILE).write_text(json.dumps(document))
    code, out, err = run(capsys, "budget", "--state-dir", corrupt)
    assert code == 2 and "checksum" in err and out == ""


# ---------------------------------------------------------------------- recommend
def _expected_top_k(node, users: list[str], k: int) -> dict[str, list[tuple[str, float]]]:
    """Top-K unseen ads by p.q + b, from the raw state files and the raw CSVs."""
    model = np.load(node["state"] / "global_model.npz")
    stored = np.load(node["state"] / "user_factors.npz")
    factor_of = dict(zip(stored["user_ids"].tolist(), stored["factors"].astype(np.float64)))
    ad_ids = [r["ad_id"] for r in read_rows(node["catalog"])]
    seen: dict[str, set[str]] = {}
    for row in read_rows(node["log"]):
        seen.setdefault(row["user_id"], set()).add(row["ad_id"])
    out = {}
    for user in users:
        scores = model["ad_factors"].astype(np.float64) @ factor_of[user] + model["ad_bias"].astype(np.float64)
        ranked = sorted((a for a in range(len(ad_ids)) if ad_ids[a] not in seen[user]), key=lambda a: -scores[a])
        out[user] = [(ad_ids[a], float(scores[a])) for a in ranked[:k]]
    return out


def test_recommend_table_is_top_k_unseen_by_score(capsys, node):
    users = read_rows(node["train"])[0]["user_id"], read_rows(node["train"])[-1]["user_id"]
    code, out, err = run(capsys, "recommend", "--state-dir", node["state"], "--log", node["log"], "--catalog", node["catalog"],
                         "--users", *users, "--k", 5)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["user_id", "rank", "ad_id", "score"]
    got: dict[str, list[tuple[str, float]]] = {}
    for line in lines[1:]:
        user, rank, ad_id, score, _category = line.split()
        got.setdefault(user, []).append((ad_id, float(score)))
        assert int(rank) == len(got[user])
    expected = _expected_top_k(node, list(users), 5)
    assert set(got) == set(users)
    for user in users:
        assert [a for a, _ in got[user]] == [a for a, _ in expected[user]]
        np.testing.assert_allclose([s for _, s in got[user]], [s for _, s in expected[user]], atol=1e-4)


def test_recommend_csv_for_every_user(capsys, node, tmp_path):
    output = tmp_path / "recs.csv"
    k = 7
    code, out, err = run(capsys, "recommend", "--state-dir", node["state"], "--log", node["log"], "--catalog", node["catalog"],
                         "--k", k, "--output", output)
    assert code == 0, err
    assert "no stored factors" in err and "fold-in" in err  # the new users are skipped, with a note
    rows = read_rows(output)
    assert list(rows[0]) == ["user_id", "rank", "ad_id", "score"]
    trained = sorted({r["user_id"] for r in read_rows(node["train"])})
    by_user: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row)
    assert sorted(by_user) == trained
    expected = _expected_top_k(node, trained, k)
    for user, recs in by_user.items():
        assert [int(r["rank"]) for r in recs] == list(range(1, k + 1))
        scores = [float(r["score"]) for r in recs]
        assert scores == sorted(scores, reverse=True)
        assert [r["ad_id"] for r in recs] == [a for a, _ in expected[user]]
        np.testing.assert_allclose(scores, [s for _, s in expected[user]], rtol=1e-5, atol=1e-5)
    assert f"wrote {len(trained) * k} recommendations for {len(trained)} user(s)" in out


def test_recommend_errors(capsys, node, tmp_path):
    base = ["--log", node["log"], "--catalog", node["catalog"]]
    code, _, err = run(capsys, "recommend", "--state-dir", node["state"], *base, "--users", node["new_users"][0])
    assert code == 2 and node["new_users"][0] in err and "fold-in" in err

    code, _, err = run(capsys, "recommend", "--state-dir", node["state"], *base, "--users", "nobody")
    assert code == 2 and "nobody" in err

    code, _, err = run(capsys, "recommend", "--state-dir", tmp_path / "absent", *base)
    assert code == 2 and "does not exist" in err and not (tmp_path / "absent").exists()

    code, _, err = run(capsys, "recommend", "--state-dir", tmp_path, *base)
    assert code == 2 and "no global model" in err

    code, _, err = run(capsys, "recommend", "--state-dir", node["state"], "--log", tmp_path / "gone.csv", "--catalog", node["catalog"])
    assert code == 2 and "gone.csv" in err and "does not exist" in err

    small = tmp_path / "small-catalog.csv"
    small.write_text("\n".join(read_text_lines(node["catalog"])[: NUM_ADS // 2]) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "recommend", "--state-dir", node["state"], "--log", node["log"], "--catalog", small, "--lenient")
    assert code == 2 and "ad rows" in err and "catalog" in err


def read_text_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------------- fold-in
def _held_out_percentile(recs: list[dict[str, str]], held_out: set[str]) -> float:
    """Mean position (0 = top, 1 = bottom) of the held-out ads in a full ranking of unseen ads."""
    ranking = [r["ad_id"] for r in recs]
    return float(np.mean([ranking.index(a) / len(ranking) for a in held_out]))


@pytest.mark.parametrize("trained", ["state", "sgd_state"])  # the recorded user step: ALS or SGD's
def test_fold_in_serves_new_users_with_personal_factors(capsys, node, tmp_path, trained):
    state = tmp_path / "state"
    shutil.copytree(node[trained], state)
    before = np.load(state / "user_factors.npz")
    before = dict(zip(before["user_ids"].tolist(), before["factors"]))
    base = ["--state-dir", state, "--log", node["log"], "--catalog", node["catalog"]]

    code, out, err = run(capsys, "fold-in", *base)
    assert code == 0, err
    assert f"folded in {NEW_USERS} user(s)" in out
    after = np.load(state / "user_factors.npz")
    after = dict(zip(after["user_ids"].tolist(), after["factors"]))
    assert set(after) == set(before) | set(node["new_users"])
    for user, factor in before.items():  # merged: the trained users are untouched
        np.testing.assert_array_equal(after[user], factor)
    for user in node["new_users"]:
        assert np.abs(after[user]).sum() > 0

    code, out, _ = run(capsys, "fold-in", *base)
    assert code == 0 and "folded in 0 users" in out

    # every unseen ad ranked: the user's held-out positives must come out near the top, and
    # clearly above where the global model's ad biases alone (a zero user factor) put them
    output = tmp_path / "new.csv"
    code, _, err = run(capsys, "recommend", *base, "--users", *node["new_users"], "--k", NUM_ADS, "--output", output)
    assert code == 0, err
    rows = read_rows(output)
    bias = np.load(state / "global_model.npz")["ad_bias"]
    ad_ids = [r["ad_id"] for r in read_rows(node["catalog"])]
    folded, bias_only = [], []
    for user in node["new_users"]:
        recs = [r for r in rows if r["user_id"] == user]
        folded.append(_held_out_percentile(recs, node["held_out"][user]))
        unseen = {r["ad_id"] for r in recs}
        by_bias = [{"ad_id": ad_ids[a]} for a in np.argsort(-bias, kind="stable") if ad_ids[a] in unseen]
        bias_only.append(_held_out_percentile(by_bias, node["held_out"][user]))
    assert np.mean(folded) < 0.25
    assert np.mean(folded) < np.mean(bias_only) - 0.08


def test_fold_in_refits_named_users_and_rejects_unknown_ones(capsys, node, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(node["sgd_state"], state)
    base = ["--state-dir", state, "--log", node["log"], "--catalog", node["catalog"]]
    named = node["new_users"][:2]
    code, out, err = run(capsys, "fold-in", *base, "--users", *named)
    assert code == 0, err
    assert "folded in 2 user(s)" in out
    stored = np.load(state / "user_factors.npz")["user_ids"].tolist()
    assert set(named) <= set(stored) and not set(node["new_users"][2:]) & set(stored)

    # a stronger user-l2 shrinks the refitted factors: the flag reaches the solver
    norm = np.linalg.norm(NodeState(state).load_user_factors(np.array(named), 16), axis=1)
    code, _, _ = run(capsys, "fold-in", *base, "--users", *named, "--user-l2", "500")
    assert code == 0
    shrunk = np.linalg.norm(NodeState(state).load_user_factors(np.array(named), 16), axis=1)
    assert np.all(shrunk < 0.5 * norm)

    code, _, err = run(capsys, "fold-in", *base, "--users", "nobody")
    assert code == 2 and "nobody" in err and "no rows" in err
    code, _, err = run(capsys, "fold-in", *base, "--negatives", "0")
    assert code == 2 and "--negatives" in err
