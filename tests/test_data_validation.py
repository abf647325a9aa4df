"""Loading and validating interaction logs and catalogs.

A malformed row or file must raise a DataValidationError that names the file, the 1-based line
and the field, both in its message and in its attributes.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.data.loaders import load_catalog_file, load_log_file, write_catalog_csv, write_log_csv
from shared.data.public_sets import MOVIELENS_GENRES, load_amazon_sequences, load_movielens_100k
from shared.data.schema import DataValidationError, Event
from shared.data.synthetic import SyntheticSpec, generate

# The real datasets live beside the repository (../shared/data), never inside it.
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
MOVIELENS_DIR = DATA_ROOT / "movielens" / "ml-100k"
BEAUTY_DIR = DATA_ROOT / "seqrec" / "s3rec-amazon"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def check_error(error: DataValidationError, path: Path, line: int | None, field_name: str | None) -> None:
    """The error names file, line and field, as attributes and in its message."""
    assert error.path == str(path)
    assert error.line == line
    assert error.field_name == field_name
    message = str(error)
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message
    if field_name is not None:
        assert f"field '{field_name}'" in message


@pytest.fixture
def catalog(tmp_path):
    path = write(tmp_path / "catalog.csv", "ad_id,category,brand,title\na1,shoes,acme,Red shoe\na2,books,,\na3,shoes,acme,Blue shoe\n")
    return load_catalog_file(path)


# ------------------------------------------------------------------ CSV logs
def test_valid_csv_log_loads_and_maps_ads_onto_catalog_rows(tmp_path, catalog):
    path = write(
        tmp_path / "log.csv",
        "user_id,ad_id,timestamp,event,merchant,region\n"
        "u1,a3,100,impression,m1,eu\n"
        "u1,a1,200,click,m1,eu\n"
        "\n"  # blank lines carry no row
        "u2,a2,300,Purchase,m2,us\n",
    )
    log = load_log_file(path, catalog)
    assert list(log.user) == ["u1", "u1", "u2"]
    assert list(log.ad) == [2, 0, 1]
    assert list(log.timestamp) == [100, 200, 300]
    assert list(log.event) == [Event.IMPRESSION, Event.CLICK, Event.PURCHASE]
    assert list(log.merchant) == ["m1", "m1", "m2"]
    assert list(log.region) == ["eu", "eu", "us"]
    assert log.rejected == []


def test_log_without_event_column_is_all_clicks_and_has_no_merchant(tmp_path, catalog):
    log = load_log_file(write(tmp_path / "log.csv", "user_id,ad_id,timestamp\nu1,a1,5\nu2,a2,6\n"), catalog)
    assert list(log.event) == [Event.CLICK, Event.CLICK]
    assert log.merchant is None and log.region is None


@pytest.mark.parametrize("missing", ["user_id", "ad_id", "timestamp"])
def test_missing_required_column_in_header(tmp_path, catalog, missing):
    columns = [c for c in ("user_id", "ad_id", "timestamp") if c != missing]
    path = write(tmp_path / "log.csv", ",".join(columns) + "\n" + ",".join("x" for _ in columns) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 1, missing)
    assert "required column" in str(info.value)


def test_unknown_column_in_header(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp,colour\nu1,a1,1,red\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 1, "colour")


def test_empty_file_needs_a_header(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 1, None)


def test_missing_file(tmp_path, catalog):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, None, None)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("bad_row", ["u2,a1", "u2,a1,2,click,extra"])
def test_wrong_field_count_names_the_line(tmp_path, catalog, bad_row):
    path = write(tmp_path / "log.csv", f"user_id,ad_id,timestamp,event\nu1,a1,1,click\n{bad_row}\nu3,a1,3,click\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3, None)
    assert f"has {len(bad_row.split(','))} fields, the header has 4" in str(info.value)


def test_line_numbers_count_blank_lines(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp\nu1,a1,1\n\n\nu2,a1,soon\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 5, "timestamp")


@pytest.mark.parametrize("user", ["", "   "])
def test_empty_user_id(tmp_path, catalog, user):
    path = write(tmp_path / "log.csv", f"user_id,ad_id,timestamp\nu1,a1,1\nu1,a2,2\n{user},a1,3\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 4, "user_id")
    assert "is empty" in str(info.value)


def test_empty_ad_id(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp\nu1,,1\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 2, "ad_id")


@pytest.mark.parametrize("stamp", ["yesterday", "12.5", "2024-13-01T00:00:00", ""])
def test_bad_timestamp(tmp_path, catalog, stamp):
    path = write(tmp_path / "log.csv", f"user_id,ad_id,timestamp\nu1,a1,1\nu2,a2,{stamp}\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3, "timestamp")


@pytest.mark.parametrize("event", ["view", "clicked", "1"])
def test_bad_event_name(tmp_path, catalog, event):
    path = write(tmp_path / "log.csv", f"user_id,ad_id,timestamp,event\nu1,a1,1,click\nu1,a2,2,{event}\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3, "event")
    assert "impression, click, purchase" in str(info.value)


def test_empty_merchant_when_the_column_exists(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp,merchant\nu1,a1,1,m1\nu1,a2,2,\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3, "merchant")


def test_iso_timestamps_are_accepted(tmp_path, catalog):
    path = write(
        tmp_path / "log.csv",
        "user_id,ad_id,timestamp\n"
        "u1,a1,2024-03-01T12:30:00\n"  # naive: read as UTC
        "u1,a2,2024-03-01T12:30:00+02:00\n"
        "u1,a3,2024-03-01T12:30:00Z\n"
        "u2,a1,2024-03-01\n"
        "u2,a2,1709296200\n",
    )
    log = load_log_file(path, catalog)
    noon_utc = int(datetime(2024, 3, 1, 12, 30, tzinfo=UTC).timestamp())
    midnight_utc = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp())
    assert list(log.timestamp) == [noon_utc, noon_utc - 2 * 3600, noon_utc, midnight_utc, 1709296200]
    assert noon_utc == 1709296200


# ------------------------------------------------------------------ Parquet logs
def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_log_loads(tmp_path, catalog):
    path = write_parquet(
        tmp_path / "log.parquet",
        {"user_id": ["u1", "u2", "u2"], "ad_id": ["a1", "a2", "a3"], "timestamp": [10, 20, 30], "event": ["click", "impression", "purchase"]},
    )
    log = load_log_file(path, catalog)
    assert list(log.user) == ["u1", "u2", "u2"]
    assert list(log.ad) == [0, 1, 2]
    assert list(log.timestamp) == [10, 20, 30]
    assert list(log.event) == [Event.CLICK, Event.IMPRESSION, Event.PURCHASE]


def test_missing_event_in_an_event_column_is_an_error_not_a_click(tmp_path, catalog):
    path = write_parquet(
        tmp_path / "log.parquet",
        {"user_id": ["u1", "u2"], "ad_id": ["a1", "a2"], "timestamp": [10, 20], "event": ["click", None]},
    )
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 2, "event")


def test_utf8_bom_header_is_accepted(tmp_path, catalog):
    path = tmp_path / "log.csv"
    path.write_bytes("\ufeffuser_id,ad_id,timestamp\nu1,a1,1\n".encode("utf-8"))
    assert list(load_log_file(path, catalog).user) == ["u1"]


def test_repeated_header_column_is_an_error(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp,user_id\nu1,a1,1,u2\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 1, "user_id")


@pytest.mark.parametrize(
    "column, bad, field_name",
    [("timestamp", "not-a-time", "timestamp"), ("event", "view", "event"), ("user_id", None, "user_id"), ("ad_id", "", "ad_id")],
)
def test_parquet_bad_value_in_row_3_is_reported_as_line_3(tmp_path, catalog, column, bad, field_name):
    columns = {
        "user_id": ["u1", "u1", "u2", "u2"],
        "ad_id": ["a1", "a2", "a3", "a1"],
        "timestamp": ["1", "2", "3", "4"],
        "event": ["click", "click", "click", "click"],
    }
    columns[column][2] = bad
    path = write_parquet(tmp_path / "log.parquet", columns)
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3, field_name)


def test_parquet_missing_required_column(tmp_path, catalog):
    path = write_parquet(tmp_path / "log.parquet", {"user_id": ["u1"], "timestamp": [1]})
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    assert info.value.path == str(path)
    assert info.value.field_name == "ad_id"


def test_unreadable_parquet_file(tmp_path, catalog):
    path = write(tmp_path / "log.parquet", "this is not parquet\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, None, None)
    assert "Parquet" in str(info.value)


# ------------------------------------------------------------------ catalog CSV
def test_catalog_loads_with_optional_columns(catalog, tmp_path):
    assert catalog.ad_ids == ("a1", "a2", "a3")
    assert catalog.categories == ("shoes", "books", "shoes")
    assert catalog.brands == ("acme", None, "acme")
    assert catalog.titles == ("Red shoe", None, "Blue shoe")
    assert catalog.index == {"a1": 0, "a2": 1, "a3": 2}
    codes, names = catalog.category_codes()
    assert names == ["books", "shoes"]
    assert list(codes) == [1, 0, 1]


def test_catalog_duplicate_ad_id_names_both_lines(tmp_path):
    path = write(tmp_path / "catalog.csv", "ad_id,category\nx1,a\nx2,b\nx3,c\nx1,d\n")
    with pytest.raises(DataValidationError) as info:
        load_catalog_file(path)
    check_error(info.value, path, 5, "ad_id")
    assert "duplicate ad id 'x1'" in str(info.value)
    assert "first on line 2" in str(info.value)


@pytest.mark.parametrize("category", ["", "  "])
def test_catalog_missing_category_value(tmp_path, category):
    path = write(tmp_path / "catalog.csv", f"ad_id,category\nx1,a\nx2,{category}\n")
    with pytest.raises(DataValidationError) as info:
        load_catalog_file(path)
    check_error(info.value, path, 3, "category")


def test_catalog_without_category_column_has_unknown_categories(tmp_path):
    # the category column is optional (docs/DATA.md); where it exists, every value is required (above)
    catalog = load_catalog_file(write(tmp_path / "catalog.csv", "ad_id,brand\nx1,acme\nx2,\n"))
    assert catalog.categories == ("unknown", "unknown")
    assert catalog.tags == (("unknown", "acme"), ("unknown",))


def test_catalog_without_ads(tmp_path):
    path = write(tmp_path / "catalog.csv", "ad_id,category\n")
    with pytest.raises(DataValidationError) as info:
        load_catalog_file(path)
    check_error(info.value, path, None, None)


# ------------------------------------------------------------------ ads outside the catalog
UNKNOWN_ADS_LOG = (
    "user_id,ad_id,timestamp\n"
    "u1,a1,1\n"
    "u1,zz,2\n"  # line 3: not in the catalog
    "u2,a2,3\n"
    "u2,a9,4\n"  # line 5: not in the catalog
    "u3,a3,5\n"
)


def test_unknown_ad_strict_raises_naming_line_and_field(tmp_path, catalog):
    path = write(tmp_path / "log.csv", UNKNOWN_ADS_LOG)
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog, strict=True)
    check_error(info.value, path, 3, "ad_id")
    assert "'zz'" in str(info.value)


def test_unknown_ad_lenient_rejects_with_a_reason_per_row(tmp_path, catalog, caplog):
    path = write(tmp_path / "log.csv", UNKNOWN_ADS_LOG)
    with caplog.at_level(logging.WARNING):
        log = load_log_file(path, catalog, strict=False)
    data_rows = UNKNOWN_ADS_LOG.count("\n") - 1
    assert len(log) + len(log.rejected) == data_rows  # nothing dropped silently
    assert list(log.user) == ["u1", "u2", "u3"]
    assert list(log.ad) == [0, 1, 2]
    assert list(log.timestamp) == [1, 3, 5]
    assert len(log.rejected) == 2
    assert f"{path}:3:" in log.rejected[0] and "'zz'" in log.rejected[0] and "ad_id" in log.rejected[0]
    assert f"{path}:5:" in log.rejected[1] and "'a9'" in log.rejected[1]
    assert log.summary()["rows_rejected"] == 2
    assert any("rejected 2 rows" in record.getMessage() for record in caplog.records)


def test_lenient_mode_still_fails_when_every_row_is_rejected(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp\nu1,q1,1\nu2,q2,2\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog, strict=False)
    assert "no usable interaction rows" in str(info.value)


def test_lenient_mode_does_not_excuse_malformed_rows(tmp_path, catalog):
    path = write(tmp_path / "log.csv", "user_id,ad_id,timestamp\nu1,a1,1\nu2,a2,later\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog, strict=False)
    check_error(info.value, path, 3, "timestamp")


# ------------------------------------------------------------------ round trip
def test_csv_round_trip_of_a_synthetic_dataset(tmp_path):
    dataset, _ = generate(SyntheticSpec(users=40, ads=30, merchants=3, seed=7))
    write_catalog_csv(tmp_path / "catalog.csv", dataset.catalog)
    write_log_csv(tmp_path / "log.csv", dataset)

    catalog = load_catalog_file(tmp_path / "catalog.csv")
    assert catalog.ad_ids == dataset.catalog.ad_ids
    assert catalog.categories == dataset.catalog.categories
    assert catalog.brands == dataset.catalog.brands
    assert catalog.titles == dataset.catalog.titles

    log = load_log_file(tmp_path / "log.csv", catalog)
    original = dataset.log
    assert len(log) == len(original) and log.rejected == []
    assert list(log.user) == list(original.user)
    np.testing.assert_array_equal(log.ad, original.ad)
    np.testing.assert_array_equal(log.timestamp, original.timestamp)
    np.testing.assert_array_equal(log.event, original.event)
    assert list(log.merchant) == list(original.merchant)
    assert list(log.region) == list(original.region)
    assert set(np.unique(original.event)) == {Event.IMPRESSION, Event.CLICK, Event.PURCHASE}


# ------------------------------------------------------------------ MovieLens-100K
def fake_movielens(folder: Path, data_lines: list[str]) -> Path:
    """A tiny ml-100k folder: three movies and the given u.data lines."""
    folder.mkdir()
    genres = ["0"] * len(MOVIELENS_GENRES)

    def item(movie_id: int, title: str, genre: int | None) -> str:
        flags = list(genres)
        if genre is not None:
            flags[genre] = "1"
        return "|".join([str(movie_id), title, "01-Jan-1995", "", "http://example.invalid"] + flags)

    items = [item(1, "Toy Story (1995)", 3), item(2, "GoldenEye (1995)", 1), item(3, "Nameless", None)]
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    (folder / "u.data").write_text("\n".join(data_lines) + "\n", encoding="utf-8")
    return folder


def test_fake_movielens_folder_loads(tmp_path):
    folder = fake_movielens(tmp_path / "ml-100k", ["10\t1\t5\t881250949", "10\t3\t1\t881250950", "20\t2\t3\t881250951"])
    dataset = load_movielens_100k(folder)
    assert dataset.catalog.ad_ids == ("1", "2", "3")
    assert dataset.catalog.categories == ("Animation", "Action", "unknown")
    assert dataset.catalog.tags[0] == ("Animation", "year-1995", "decade-1990s")  # genres, then the release's year and decade
    assert dataset.catalog.tags[2] == ("unknown", "year-1995", "decade-1990s")
    assert list(dataset.log.user) == ["10", "10", "20"]
    assert list(dataset.log.ad) == [0, 2, 1]
    assert list(dataset.log.timestamp) == [881250949, 881250950, 881250951]
    assert set(dataset.log.event) == {Event.CLICK}


def test_movielens_release_date_is_optional_and_checked(tmp_path):
    folder = fake_movielens(tmp_path / "ml-a", ["10\t1\t5\t881250949"])
    item = folder / "u.item"
    lines = item.read_text(encoding="latin-1").splitlines()
    item.write_text("\n".join([lines[0], lines[1].replace("01-Jan-1995", ""), lines[2]]) + "\n", encoding="latin-1")
    assert load_movielens_100k(folder).catalog.tags[1] == ("Action",)  # no date given: no release tags
    item.write_text("\n".join([lines[0], lines[1].replace("01-Jan-1995", "1995-01-01"), lines[2]]) + "\n", encoding="latin-1")
    with pytest.raises(DataValidationError) as info:
        load_movielens_100k(folder)
    check_error(info.value, item, 2, "release_date")


@pytest.mark.parametrize("rating", ["7", "0", "4.5", "", "five"])
def test_malformed_movielens_rating(tmp_path, rating):
    folder = fake_movielens(tmp_path / "ml-100k", ["10\t1\t5\t881250949", f"10\t2\t{rating}\t881250950", "20\t3\t3\t881250951"])
    with pytest.raises(DataValidationError) as info:
        load_movielens_100k(folder)
    check_error(info.value, folder / "u.data", 2, "rating")


def test_movielens_unknown_item_and_short_line(tmp_path):
    folder = fake_movielens(tmp_path / "ml-a", ["10\t1\t5\t881250949", "10\t2\t5\t881250949", "10\t4\t5\t881250950"])
    with pytest.raises(DataValidationError) as info:
        load_movielens_100k(folder)
    check_error(info.value, folder / "u.data", 3, "ad_id")

    folder = fake_movielens(tmp_path / "ml-b", ["10\t1\t5\t881250949", "10\t2\t5"])
    with pytest.raises(DataValidationError) as info:
        load_movielens_100k(folder)
    check_error(info.value, folder / "u.data", 2, None)


def test_real_movielens_100k():
    if not (MOVIELENS_DIR / "u.data").is_file() or not (MOVIELENS_DIR / "u.item").is_file():
        pytest.skip(f"MovieLens-100K not found at {MOVIELENS_DIR}")
    dataset = load_movielens_100k(MOVIELENS_DIR)
    log = dataset.log
    assert len(log) == 100_000
    assert len(np.unique(log.user)) == 943
    assert len(dataset.catalog) == 1682
    assert len(np.unique(log.ad)) == 1682
    assert log.rejected == []
    assert set(log.event) == {Event.CLICK}
    assert dataset.catalog.ad_ids[0] == "1" and dataset.catalog.titles[0] == "Toy Story (1995)"


def test_real_amazon_beauty():
    sequences, attributes = BEAUTY_DIR / "Beauty.txt", BEAUTY_DIR / "Beauty_item2attributes.json"
    if not sequences.is_file() or not attributes.is_file():
        pytest.skip(f"Amazon Beauty (S3Rec) not found at {BEAUTY_DIR}")
    dataset = load_amazon_sequences(sequences, attributes)
    log = dataset.log
    assert len(dataset.catalog) == 12_101
    assert len(np.unique(log.user)) == 22_363
    assert len(log) == 198_502
    assert log.rejected == []
    assert set(log.event) == {Event.CLICK}
    # the position in a user's sequence is the timestamp: each user starts at 0
    first_rows = np.r_[0, np.flatnonzero(log.user[1:] != log.user[:-1]) + 1]
    assert set(log.timestamp[first_rows]) == {0}


# ------------------------------------------------------------------ Amazon sequence format (tiny fake)
def test_amazon_sequence_format(tmp_path):
    attributes = write(tmp_path / "attrs.json", '{"1": [7, 9], "2": [7], "10": [9, 9, 8]}')
    sequences = write(tmp_path / "seq.txt", "A 1 2 10\n\nB 10 10\n")
    dataset = load_amazon_sequences(sequences, attributes)
    assert dataset.catalog.ad_ids == ("1", "2", "10")  # numeric-looking ids in numeric order
    assert list(dataset.log.user) == ["A", "A", "A", "B", "B"]
    assert list(dataset.log.ad) == [0, 1, 2, 2, 2]
    assert list(dataset.log.timestamp) == [0, 1, 2, 0, 1]

    bad = write(tmp_path / "bad.txt", "A 1 2\nB\n")
    with pytest.raises(DataValidationError) as info:
        load_amazon_sequences(bad, attributes)
    check_error(info.value, bad, 2, "items")

    unknown = write(tmp_path / "unknown.txt", "A 1 2\nB 2 3\n")
    with pytest.raises(DataValidationError) as info:
        load_amazon_sequences(unknown, attributes)
    check_error(info.value, unknown, 2, "ad_id")


# ------------------------------------------------------------------ input edges (issue 14, item 8)
# Timestamps: seconds in [0, 2100-01-01); outside is an error in either mode. Ids spelled as a
# missing value or over 256 characters: errors. "-1"-like ids and exact duplicate rows: accepted,
# and reported in `warnings` (count, first line) and in a logged warning.
END_2100 = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp())


def log_rows(tmp_path: Path, *rows: str, header: str = "user_id,ad_id,timestamp") -> Path:
    return write(tmp_path / "log.csv", header + "\n" + "".join(f"{row}\n" for row in rows))


@pytest.mark.parametrize("stamp", [str(10**20), str(2**63), str(END_2100), "9" * 5000, "2100-01-01", "9999-12-31T23:59:59"])
def test_timestamp_past_2100_is_an_error_naming_line_and_field(tmp_path, catalog, stamp):
    path = log_rows(tmp_path, "u1,a1,1", f"u2,a2,{stamp}")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3, "timestamp")
    assert "outside [0, 4102444800)" in str(info.value)


@pytest.mark.parametrize("stamp", ["-1", "-1700000000", "1969-12-31T23:59:59Z"])
def test_timestamp_before_1970_is_an_error(tmp_path, catalog, stamp):
    path = log_rows(tmp_path, "u1,a1,1", f"u2,a2,{stamp}")
    for strict in (True, False):  # a lenient load excuses ads outside the catalog, not bad times
        with pytest.raises(DataValidationError) as info:
            load_log_file(path, catalog, strict=strict)
        check_error(info.value, path, 3, "timestamp")


def test_timestamp_range_edges_are_accepted(tmp_path, catalog):
    log = load_log_file(log_rows(tmp_path, "u1,a1,0", f"u1,a2,{END_2100 - 1}", "u1,a3,2099-12-31T23:59:59Z"), catalog)
    assert list(log.timestamp) == [0, END_2100 - 1, END_2100 - 1]


def test_millisecond_timestamps_get_a_hint(tmp_path, catalog):
    path = log_rows(tmp_path, "u1,a1,1709296200000")
    with pytest.raises(DataValidationError, match="milliseconds"):
        load_log_file(path, catalog)


@pytest.mark.parametrize("stamp", ["1_000", "\u0663"])  # int() takes both: "1000" and Arabic-Indic 3
def test_integer_timestamps_are_ascii_digits(tmp_path, catalog, stamp):
    path = log_rows(tmp_path, f"u1,a1,{stamp}")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 2, "timestamp")


def test_parquet_timestamp_beyond_int64_is_an_error(tmp_path, catalog):
    table = pa.table({"user_id": ["u1", "u2"], "ad_id": ["a1", "a2"], "timestamp": pa.array([1, 2**63], type=pa.uint64())})
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 2, "timestamp")


def test_movielens_timestamp_out_of_range(tmp_path):
    folder = fake_movielens(tmp_path / "ml-100k", ["10\t1\t5\t881250949", f"10\t2\t5\t{10**20}"])
    with pytest.raises(DataValidationError) as info:
        load_movielens_100k(folder)
    check_error(info.value, folder / "u.data", 2, "timestamp")


@pytest.mark.parametrize("marker", ["nan", "NaN", "None", "null", "NULL", "<NA>", "NaT"])
@pytest.mark.parametrize("column", ["user_id", "ad_id"])
def test_missing_value_spellings_are_not_ids(tmp_path, catalog, marker, column):
    row = {"user_id": "u2", "ad_id": "a2"} | {column: marker}
    path = log_rows(tmp_path, "u1,a1,1", f"{row['user_id']},{row['ad_id']},2")
    for strict in (True, False):
        with pytest.raises(DataValidationError) as info:
            load_log_file(path, catalog, strict=strict)
        check_error(info.value, path, 3, column)
        assert "missing value" in str(info.value)


def test_missing_value_spelling_in_the_catalog(tmp_path):
    path = write(tmp_path / "catalog.csv", "ad_id,category\nx1,a\nnan,b\n")
    with pytest.raises(DataValidationError) as info:
        load_catalog_file(path)
    check_error(info.value, path, 3, "ad_id")


def test_missing_value_spelling_in_an_amazon_sequence(tmp_path):
    attributes = write(tmp_path / "attrs.json", '{"1": [7], "2": [7]}')
    sequences = write(tmp_path / "seq.txt", "A 1 2\nNone 1\n")
    with pytest.raises(DataValidationError) as info:
        load_amazon_sequences(sequences, attributes)
    check_error(info.value, sequences, 2, "user_id")


@pytest.mark.parametrize("length", [257, 100_000, 200_000])  # 200 kB is past csv's own field limit
@pytest.mark.parametrize("column", ["user_id", "ad_id"])
def test_ids_over_256_characters_are_an_error(tmp_path, catalog, length, column):
    row = {"user_id": "u2", "ad_id": "a2"} | {column: "x" * length}
    path = log_rows(tmp_path, "u1,a1,1", f"{row['user_id']},{row['ad_id']},2")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    # csv itself stops at a field over 128 KiB, before the field is known
    check_error(info.value, path, 3, column if length < 131_072 else None)


def test_id_of_256_characters_is_accepted(tmp_path):
    ad_id = "a" * 256
    catalog_path = write(tmp_path / "catalog.csv", f"ad_id,category\n{ad_id},c\n")
    log = load_log_file(log_rows(tmp_path, f"{'u' * 256},{ad_id},1"), load_catalog_file(catalog_path))
    assert list(log.user) == ["u" * 256] and log.warnings == []


def test_long_id_in_the_catalog(tmp_path):
    path = write(tmp_path / "catalog.csv", f"ad_id,category\nx1,a\n{'x' * 100_000},b\n")
    with pytest.raises(DataValidationError) as info:
        load_catalog_file(path)
    check_error(info.value, path, 3, "ad_id")
    assert "100000 characters" in str(info.value) and len(str(info.value)) < 500


def test_negative_number_ids_are_accepted_and_reported(tmp_path, caplog):
    catalog = load_catalog_file(write(tmp_path / "catalog.csv", "ad_id,category\na1,c\n-1,c\n"))
    [notice] = catalog.warnings
    assert (notice.kind, notice.field_name, notice.count, notice.first_line) == ("negative-number-id", "ad_id", 1, 3)
    path = log_rows(tmp_path, "u1,a1,1", "-1,a1,2", "u2,-1,3", "-2.0,a1,4", "u-1,a1,5")
    with caplog.at_level(logging.WARNING):
        log = load_log_file(path, catalog)
    assert list(log.user) == ["u1", "-1", "u2", "-2.0", "u-1"]  # kept, as string ids
    by_field = {n.field_name: n for n in log.warnings}
    assert set(by_field) == {"user_id", "ad_id"}
    users, ads = by_field["user_id"], by_field["ad_id"]
    assert (users.kind, users.count, users.first_line, users.path) == ("negative-number-id", 2, 3, str(path))
    assert (ads.count, ads.first_line) == (1, 4)
    assert str(users) == (f"{path}:3: field 'user_id' '-1' reads as a negative number, a common missing-value code; "
                          "accepted as a string id (2 such rows; this is the first)")
    assert str(ads).endswith("(1 such row)")
    logged = [record.getMessage() for record in caplog.records]
    assert str(users) in logged and str(ads) in logged


def test_exact_duplicate_rows_are_accepted_and_reported(tmp_path, catalog, caplog):
    path = log_rows(
        tmp_path,
        "u1,a1,1,click,m1", "u1,a2,1,click,m1",
        "u1,a1,1,click,m1",  # line 4 repeats line 2
        "u1,a1,1,impression,m1", "u1,a1,1,click,m2", "u2,a1,1,click,m1",  # each differs in one field
        "u1,a1,1,click,m1", "u1,a2,1,click,m1",  # lines 8 and 9 repeat lines 2 and 3
        header="user_id,ad_id,timestamp,event,merchant",
    )
    with caplog.at_level(logging.WARNING):
        log = load_log_file(path, catalog)
    assert len(log) == 8  # accepted: the split deduplicates
    [notice] = log.warnings
    assert (notice.kind, notice.field_name, notice.count, notice.first_line) == ("duplicate-row", None, 3, 4)
    assert str(notice) == f"{path}:4: repeats line 2 exactly (every field); accepted, the split keeps one of each (3 such rows; this is the first)"
    assert str(notice) in [record.getMessage() for record in caplog.records]
    assert log.subset(np.arange(2)).warnings == log.warnings  # a shard keeps what its source file said


def test_clean_logs_have_no_warnings(tmp_path, catalog, caplog):
    with caplog.at_level(logging.WARNING):
        log = load_log_file(log_rows(tmp_path, "u1,a1,1", "u1,a1,2", "u2,a1,1"), catalog)
    assert log.warnings == [] and catalog.warnings == () and not caplog.records


def test_undecodable_bytes_name_their_line(tmp_path, catalog):
    path = tmp_path / "log.csv"
    path.write_bytes(b"user_id,ad_id,timestamp\n" + b"u1,a1,1\n" * 3000 + b"u\xff,a1,2\n")
    with pytest.raises(DataValidationError) as info:
        load_log_file(path, catalog)
    check_error(info.value, path, 3002, None)
    assert "UTF-8" in str(info.value)


def test_public_set_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    folder = fake_movielens(tmp_path / "ml-100k", ["10\t1\t5\t881250949", "10\t3\t1\t881250950"])
    data = folder / "u.data"
    data.write_bytes(data.read_bytes() + b"20\t2\t3\t88125\xff0951\n")
    with pytest.raises(DataValidationError) as error:
        load_movielens_100k(folder)
    assert f"{data}:3" in str(error.value) and "UTF-8" in str(error.value)
