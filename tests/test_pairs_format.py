"""Bringing your own data (docs/DATA.md): a user-item pairs log loads wherever a log is accepted,
a catalog may come without a category column, and `fedads-merchant validate` shows the accepted
formats for a file in none of them.

Every file is small, synthetic and written into tmp_path; expected interactions are spelled out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.merchant_cli import main
from shared.config import RunConfig
from shared.data.loaders import load_catalog_file, load_log_file, load_log_with_own_catalog
from shared.data.log_formats import ACCEPTED_LOG_FORMATS, detect_log_format
from shared.data.partition import partition_users, shard_log
from shared.data.schema import UNKNOWN_CATEGORY, AdCatalog, DataValidationError, Event, FileFormatError
from shared.data.sources import load_catalog, load_dataset, simulated_shards
from shared.data.split import leave_last_out
from simulations.baselines import centralized


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def interactions(log, catalog: AdCatalog) -> list[tuple[str, str, int]]:
    return [(str(u), catalog.ad_ids[a], int(t)) for u, a, t in zip(log.user, log.ad, log.timestamp)]


@pytest.fixture
def catalog(tmp_path: Path) -> AdCatalog:
    return load_catalog_file(write(tmp_path / "catalog.csv", "ad_id,category\ni1,shoes\ni2,bags\ni3,shoes\ni4,hats\n"))


# ---------------------------------------------------------------------- pairs files load
# each: the file's text, and the (user, item, time) it holds in file order; without a timestamp
# column a line's time is its line number
PAIRS_FILES = {
    "whitespace, no header": ("u1 i1\nu2 i2\nu1   i3\n", [("u1", "i1", 1), ("u2", "i2", 2), ("u1", "i3", 3)]),
    "comma, header": ("user,item\nu1,i1\nu2,i2\nu1,i3\n", [("u1", "i1", 2), ("u2", "i2", 3), ("u1", "i3", 4)]),
    "tab, header, timestamps": ("user_id\titem_id\ttimestamp\nu1\ti1\t100\nu2\ti2\t50\nu1\ti3\t300\n",
                                [("u1", "i1", 100), ("u2", "i2", 50), ("u1", "i3", 300)]),
    "comma, no header, timestamps": ("u1,i1,1700000000\nu2,i2,2024-03-01T00:00:00Z\n\nu1,i3,1700000300\n",
                                     [("u1", "i1", 1700000000), ("u2", "i2", 1709251200), ("u1", "i3", 1700000300)]),
    "whitespace, RecBole-style header, timestamps": ("user_id:token item_id:token timestamp:float\nu1 i1 7\nu2 i2 8\nu1 i3 9\n",
                                                      [("u1", "i1", 7), ("u2", "i2", 8), ("u1", "i3", 9)]),
}


@pytest.mark.parametrize("name", PAIRS_FILES)
def test_pairs_file_loads_to_its_interactions_in_file_order(tmp_path, catalog, name):
    text, expected = PAIRS_FILES[name]
    log = load_log_file(write(tmp_path / "pairs.txt", text), catalog)
    assert interactions(log, catalog) == expected
    assert set(log.event.tolist()) == {Event.CLICK}  # every pair is a positive
    assert log.merchant is None and log.region is None


def test_pairs_file_with_utf8_bom_and_leading_blank_lines(tmp_path, catalog):
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeff\n\nuser,item\nu1,i1\n".encode())
    assert detect_log_format(path).first_line == 3
    assert interactions(load_log_file(path, catalog), catalog) == [("u1", "i1", 4)]


def test_line_order_is_the_time_order_of_the_split(tmp_path, catalog):
    # u1's lines, interleaved with u2's: the last of u1's lines is u1's held-out ad
    log = load_log_file(write(tmp_path / "pairs.txt", "u1 i3\nu2 i1\nu1 i1\nu1 i4\nu2 i2\nu1 i2\n"), catalog)
    split = leave_last_out(log, len(catalog))
    u1 = list(split.user_ids).index("u1")
    assert catalog.ad_ids[split.test_ad[u1]] == "i2"
    assert [catalog.ad_ids[a] for a in split.positives(u1)] == ["i3", "i1", "i4"]


def test_timestamps_order_the_split_whatever_the_line_order(tmp_path, catalog):
    log = load_log_file(write(tmp_path / "pairs.csv", "u1,i1,300\nu1,i2,100\nu1,i3,200\n"), catalog)
    split = leave_last_out(log, len(catalog))
    assert catalog.ad_ids[split.test_ad[0]] == "i1"
    assert [catalog.ad_ids[a] for a in split.positives(0)] == ["i2", "i3"]


def test_a_table_header_still_makes_a_table(tmp_path, catalog):
    # user_id,ad_id,... names the table format: its rules (a timestamp column) stay as they were
    assert detect_log_format(write(tmp_path / "t.csv", "user_id,ad_id,timestamp\nu1,i1,5\n")).kind == "table"
    with pytest.raises(DataValidationError) as info:
        load_log_file(write(tmp_path / "t2.csv", "user_id,ad_id\nu1,i1\n"), catalog)
    assert (info.value.line, info.value.field_name) == (1, "timestamp")
    assert "name their columns user,item" in str(info.value)


# ---------------------------------------------------------------------- errors name file and line
def test_item_missing_from_the_catalog_fails_naming_file_and_first_offending_line(tmp_path, catalog):
    path = write(tmp_path / "pairs.txt", "u1 i1\nu1 i2\nu2 nine\nu2 ten\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    assert (info.value.path, info.value.line, info.value.field_name) == (str(path), 3, "ad_id")
    assert f"{path}:3:" in str(info.value) and "'nine' is not in the ad catalog" in str(info.value)


@pytest.mark.parametrize("text, line", [("u1 i1\nu2 i2 5\n", 2), ("u1,i1,5\nu2,i2\n", 2), ("u1 i1 i2 i3\n", 1), ("u1\n", 1),
                                        ("customer,sku,when\nu1,i1,5\n", 1), ("", 1)])
def test_a_file_in_no_format_is_a_format_error_at_its_line(tmp_path, catalog, text, line):
    path = write(tmp_path / "log.txt", text)
    with pytest.raises(FileFormatError) as info:
        load_log_file(path, catalog)
    assert (info.value.path, info.value.line) == (str(path), line)


def test_a_bad_value_in_a_pairs_file_names_line_and_field(tmp_path, catalog):
    path = write(tmp_path / "pairs.csv", "u1,i1,5\nu2,i2,yesterday\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    assert (info.value.line, info.value.field_name) == (2, "timestamp")
    assert not isinstance(info.value, FileFormatError)  # a value, not the file's shape


# ---------------------------------------------------------------------- what pairs cannot rule out
def test_an_unknown_header_read_as_an_interaction_is_reported(tmp_path):
    dataset = load_log_with_own_catalog(write(tmp_path / "pairs.txt", "customer sku\nu1 i1\nu1 i2\nu2 i1\n"))
    assert len(dataset.log) == 4  # accepted, not dropped
    notices = {n.kind: n for n in dataset.log.warnings}
    assert notices["possible-header"].first_line == 1 and "'customer'" in str(notices["possible-header"])


def test_a_rating_column_read_as_times_is_reported(tmp_path):
    dataset = load_log_with_own_catalog(write(tmp_path / "pairs.csv", "u1,i1,5\nu1,i2,3\nu2,i1,4\n"))
    notice = {n.kind: n for n in dataset.log.warnings}["rating-like-timestamp"]
    assert notice.count == 3 and notice.field_name == "timestamp"


# ---------------------------------------------------------------------- catalogs
def test_catalog_without_category_column_loads_with_unknown_categories(tmp_path):
    catalog = load_catalog_file(write(tmp_path / "catalog.csv", "ad_id,title\ni1,Red shoe\ni2,\ni3,Hat\n"))
    assert catalog.ad_ids == ("i1", "i2", "i3")
    assert catalog.categories == (UNKNOWN_CATEGORY,) * 3
    assert catalog.titles == ("Red shoe", None, "Hat")
    codes, names = catalog.category_codes()
    assert names == [UNKNOWN_CATEGORY] and codes.tolist() == [0, 0, 0]


def test_catalog_of_ad_ids_only_loads(tmp_path):
    assert load_catalog_file(write(tmp_path / "catalog.csv", "ad_id\ni1\ni2\n")).ad_ids == ("i1", "i2")


def test_log_without_catalog_has_its_own_ads_in_order_of_first_appearance(tmp_path):
    dataset = load_log_with_own_catalog(write(tmp_path / "pairs.txt", "u1 i9\nu2 i2\nu1 i2\nu3 i5\n"))
    assert dataset.catalog.ad_ids == ("i9", "i2", "i5")
    assert dataset.catalog.categories == (UNKNOWN_CATEGORY,) * 3
    assert interactions(dataset.log, dataset.catalog) == [("u1", "i9", 1), ("u2", "i2", 2), ("u1", "i2", 3), ("u3", "i5", 4)]


def test_log_without_catalog_checks_ids_before_they_become_ads(tmp_path):
    path = write(tmp_path / "pairs.txt", "u1 i1\nu2 nan\n")
    with pytest.raises(DataValidationError) as info:
        load_log_with_own_catalog(path)
    assert (info.value.line, info.value.field_name) == (2, "ad_id")


# ---------------------------------------------------------------------- end to end: dataset = "logs"
def pairs_market(tmp_path: Path, users: int = 40, items: int = 12, seed: int = 0) -> Path:
    """A small pairs file: each user 3-6 distinct items, lines in a shuffled time order."""
    rng = np.random.default_rng(seed)
    lines = [(f"user{u}", f"item{i}") for u in range(users) for i in rng.choice(items, size=rng.integers(3, 7), replace=False)]
    order = rng.permutation(len(lines))
    return write(tmp_path / "pairs.txt", "".join(f"{lines[k][0]} {lines[k][1]}\n" for k in order))


def test_pairs_and_catalog_load_as_dataset_logs_and_cut_into_two_iid_shards(tmp_path):
    path = pairs_market(tmp_path)
    write(tmp_path / "catalog.csv", "ad_id,brand\n" + "".join(f"item{i},{'acme' if i % 2 else ''}\n" for i in range(12)))
    cfg = RunConfig(dataset="logs", data_path=str(path), catalog_path=str(tmp_path / "catalog.csv"), partitioning="iid", seed=7)
    dataset = load_dataset(cfg)
    assert len(dataset.catalog) == 12 and dataset.catalog == load_catalog(cfg)
    assert len(dataset.log) == len(path.read_text().splitlines())
    shards = partition_users(dataset.log, dataset.catalog, "iid", 2, seed=cfg.seed)
    assert len(shards) == 2 and all(len(s) == 20 for s in shards)
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(dataset.log.user)
    assert sum(len(shard_log(dataset.log, s)) for s in shards) == len(dataset.log)
    assert [name for name, _ in simulated_shards(cfg, dataset, 2)] == ["partition-0", "partition-1"]


def test_dataset_logs_without_catalog_path_uses_the_logs_own_ads(tmp_path):
    path = pairs_market(tmp_path)
    with pytest.raises(ValueError, match="catalog-path"):
        RunConfig(dataset="logs")  # a deployment's run must name the public catalog
    cfg = RunConfig(dataset="logs", data_path=str(path), partitioning="iid")
    dataset = load_dataset(cfg)
    assert dataset.catalog == load_catalog(cfg)  # the server's catalog is the merchants'
    assert sorted(dataset.catalog.ad_ids) == sorted(f"item{i}" for i in range(12))


def test_catalog_warm_start_and_training_run_on_a_catalog_without_categories(tmp_path):
    path = pairs_market(tmp_path)
    write(tmp_path / "catalog.csv", "ad_id\n" + "".join(f"item{i}\n" for i in range(12)))
    cfg = RunConfig(dataset="logs", data_path=str(path), catalog_path=str(tmp_path / "catalog.csv"), partitioning="iid",
                    init="catalog", als_catalog_prior=True, privacy="none", num_rounds=2, factors=4)
    history = centralized(cfg, load_dataset(cfg))
    assert len(history) == 3
    assert all(np.isfinite(v) for record in history for v in record["evaluate"].values())


# ---------------------------------------------------------------------- fedads-merchant validate
def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_accepts_a_pairs_file_with_or_without_a_catalog(capsys, tmp_path):
    log = write(tmp_path / "pairs.csv", "user,item,timestamp\nu1,i1,1700000000\nu1,i2,1700000100\nu2,i1,1700000200\n")
    catalog = write(tmp_path / "catalog.csv", "ad_id\ni1\ni2\ni3\n")
    code, out, err = run(capsys, "validate", "--log", log, "--catalog", catalog)
    assert code == 0, err
    assert "format:     pairs (user item timestamp; comma-separated; header on line 1)" in out
    assert "rows:       3" in out and "ads:        2 of 3 in the catalog" in out
    code, out, err = run(capsys, "validate", "--log", log)
    assert code == 0, err
    assert "against its own ads" in out and "ads:        2 of 2 in the catalog" in out


def test_validate_on_an_unparsable_file_names_the_line_and_lists_the_accepted_formats(capsys, tmp_path):
    log = write(tmp_path / "log.txt", "u1 i1\nu2 i2\nu3 i3 i4 i5\n")
    code, out, err = run(capsys, "validate", "--log", log)
    assert code == 2 and out == ""
    first, *rest = err.strip().splitlines()
    assert first.startswith(f"fedads-merchant: error: {log}:3: has 4 fields")
    assert "accepted log formats" in rest[0]
    for name, _, example in ACCEPTED_LOG_FORMATS:
        assert any(line.strip().startswith(f"{name}:") for line in rest)
        assert any(example in line for line in rest)


def test_validate_names_the_first_pair_whose_item_is_not_in_the_catalog(capsys, tmp_path):
    log = write(tmp_path / "pairs.txt", "u1 i1\nu2 i7\n")
    catalog = write(tmp_path / "catalog.csv", "ad_id,category\ni1,shoes\n")
    code, _, err = run(capsys, "validate", "--log", log, "--catalog", catalog)
    assert code == 2 and f"{log}:2: field 'ad_id' 'i7' is not in the ad catalog" in err
    assert len(err.strip().splitlines()) == 1  # a value error: the file's format was fine
