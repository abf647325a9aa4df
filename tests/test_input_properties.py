"""Property-based tests of the input edges: whatever a file holds, a loader returns valid data or
raises the project's own error naming the file and the place, never another exception.

- Text loaders (generic CSV log and catalog, MovieLens `u.data`, Amazon sequences): a valid
  InteractionLog / AdCatalog, or a DataValidationError naming the file and a line. A valid file
  with one value replaced by an arbitrary one loads, or fails at exactly that line (and field).
- Experiment files: a valid Experiment, or an ExperimentError naming the file and a field.

Each example writes its files into its own temporary folder: pytest's tmp_path is shared by all
examples of one test. Example counts are modest so that the file runs in seconds; run with
`--hypothesis-show-statistics` to see how the examples split between loaded and each error.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from shared.config import RunConfig
from shared.data.loaders import load_catalog_file, load_log_file
from shared.data.public_sets import MOVIELENS_GENRES, load_amazon_sequences, load_movielens_100k
from shared.data.schema import AdCatalog, DataValidationError, Event, InteractionLog
from simulations.experiment import BaselineSpec, Experiment, ExperimentError, SweepSpec, load_experiment

PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
END_2100 = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp())
MISSING = {"nan", "none", "null", "<na>", "nat"}
LOG_HEADER = ["user_id", "ad_id", "timestamp", "event"]


@contextmanager
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def line_count(path: Path, newline: str | None) -> int:
    """Lines as the loader's reader counts them (newline="" for CSV, None for plain text)."""
    with path.open(newline=newline, encoding="utf-8-sig") as handle:
        return len(handle.readlines())


def outcome(load: Callable[[], Any]) -> Any:
    """What `load` returns, or the DataValidationError it raises; any other exception fails the test."""
    try:
        result = load()
    except DataValidationError as error:
        event(f"error in field {error.field_name}")  # for --hypothesis-show-statistics
        return error
    event("loaded")
    return result


def check_error_names_file_and_line(error: DataValidationError, path: Path, lines: int) -> None:
    assert error.path == str(path)
    assert str(path) in str(error)
    if error.line is None:  # only when there is no row at all to point at
        assert "no usable" in error.problem or "no ads" in error.problem
    else:
        assert 1 <= error.line <= lines, (error.line, lines)
        assert f"{path}:{error.line}:" in str(error)


def check_valid_log(log: InteractionLog) -> None:
    """What every loaded log holds, whatever its file looked like."""
    assert all(0 <= t < END_2100 for t in log.timestamp.tolist())
    assert all(0 < len(u) <= 256 and u == u.strip() and u.lower() not in MISSING for u in log.user.tolist())


def negative_number(text: str) -> bool:
    return re.fullmatch(r"-[0-9]+(\.[0-9]*)?", text) is not None


# ------------------------------------------------------------------ strategies
def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four: enough valid values that whole files load too, not just fail."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: good if ok else bad)


def one_line_text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Arbitrary text that stays on its line, so that the line of an error can be predicted."""
    return st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=min_size, max_size=max_size)


def on_one_line(text: str) -> bool:
    return "\r" not in text and "\n" not in text


SPECIAL_IDS = ["nan", "NaN", "None", "null", "<NA>", "NaT", "-1", "-0", "-3.5", "", " ", "x" * 257, "a1"]
SPECIAL_TIMESTAMPS = ["0", "-1", str(END_2100 - 1), str(END_2100), str(10**20), "9" * 5000, "1_000", "12.5", "", "2024-03-01",
                      "1960-01-01T00:00:00Z", "9999-12-31"]
any_id = st.one_of(st.sampled_from(SPECIAL_IDS), st.text(max_size=30), st.text(min_size=250, max_size=300))
any_timestamp = st.one_of(
    st.integers(-(2**70), 2**70).map(str), st.sampled_from(SPECIAL_TIMESTAMPS), st.datetimes().map(datetime.isoformat), st.text(max_size=20),
)
any_event = st.one_of(st.sampled_from(["click", "impression", "purchase", "Purchase ", "view", ""]), st.text(max_size=10))
# well-formed values: what a valid row may hold ("-1" too: accepted, and reported)
ACCEPTED_IDS = st.sampled_from(["-1", "-2.5", "-0", "u1", "ad-7", "x" * 256])
good_id = st.one_of(ACCEPTED_IDS, st.text(min_size=1, max_size=40).map(str.strip).filter(lambda s: bool(s) and s.lower() not in MISSING))
one_line_good_id = st.one_of(ACCEPTED_IDS, one_line_text(40, min_size=1).map(str.strip).filter(lambda s: bool(s) and s.lower() not in MISSING))
good_timestamp = st.integers(0, END_2100 - 1)
good_event = st.sampled_from([e.name.lower() for e in Event])
catalogs = st.lists(good_id, min_size=1, max_size=5, unique=True)


def good_rows(ad_ids: list[str], width: int, min_size: int = 0, users: st.SearchStrategy[str] = good_id) -> st.SearchStrategy[list[list[str]]]:
    row = st.tuples(users, st.sampled_from(ad_ids), good_timestamp.map(str), good_event).map(lambda r: list(r[:width]))
    return st.lists(row, min_size=min_size, max_size=5)


def write_catalog(directory: Path, ad_ids: list[str]) -> AdCatalog:
    return load_catalog_file(write_csv(directory / "catalog.csv", ["ad_id", "category"], [[a, "c"] for a in ad_ids]))


# ------------------------------------------------------------------ generic CSV logs
@PROPERTY
@given(ad_ids=catalogs, data=st.data(), width=st.sampled_from([3, 4]), strict=st.booleans())
def test_any_csv_log_loads_or_names_file_and_line(ad_ids, data, width, strict):
    arbitrary = st.tuples(mostly(good_id, any_id), mostly(st.sampled_from(ad_ids), any_id), mostly(good_timestamp.map(str), any_timestamp),
                          mostly(good_event, any_event)).map(lambda r: list(r[:width]))
    rows = data.draw(st.lists(mostly(good_rows(ad_ids, width, min_size=1).map(lambda rows: rows[0]), arbitrary), max_size=6))
    with folder() as directory:
        catalog = write_catalog(directory, ad_ids)
        path = write_csv(directory / "log.csv", LOG_HEADER[:width], rows)
        result = outcome(lambda: load_log_file(path, catalog, strict=strict))
        if isinstance(result, DataValidationError):
            check_error_names_file_and_line(result, path, line_count(path, ""))
            assert result.field_name in (None, *LOG_HEADER[:width])
            return
    assert 0 < len(result) + len(result.rejected) <= len(rows)  # only blank rows are skipped
    check_valid_log(result)


@PROPERTY
@given(ad_ids=st.lists(one_line_good_id, min_size=1, max_size=5, unique=True), data=st.data(), width=st.sampled_from([3, 4]), strict=st.booleans())
def test_one_bad_value_is_reported_at_its_line_and_field(ad_ids, data, width, strict):
    # values on one line each, so that row i is on line i + 2 (a quoted line break would shift the lines)
    rows = data.draw(good_rows(ad_ids, width, min_size=1, users=one_line_good_id))
    row, column = data.draw(st.integers(0, len(rows) - 1)), data.draw(st.integers(0, width - 1))
    one_line_id = st.one_of(st.sampled_from(SPECIAL_IDS), one_line_text(30), one_line_text(300, min_size=250))
    rows[row][column] = data.draw([one_line_id, one_line_id, any_timestamp, any_event][column].filter(on_one_line))
    with folder() as directory:
        catalog = write_catalog(directory, ad_ids)
        path = write_csv(directory / "log.csv", LOG_HEADER[:width], rows)
        result = outcome(lambda: load_log_file(path, catalog, strict=strict))
    if isinstance(result, DataValidationError):
        if result.line is None:  # lenient, and its only row was rejected
            assert not strict and column == 1 and len(rows) == 1 and "no usable" in result.problem
        else:
            assert (result.path, result.line, result.field_name) == (str(path), row + 2, LOG_HEADER[column])
        return
    assert len(result) + len(result.rejected) == len(rows)
    if result.rejected:  # lenient, and the new ad id is not in the catalog
        assert not strict and column == 1
        assert result.rejected == [f"{path}:{row + 2}: field 'ad_id' {rows[row][1].strip()!r} is not in the ad catalog"]
    check_valid_log(result)


@PROPERTY
@given(ad_ids=catalogs, data=st.data(), width=st.sampled_from([3, 4]))
def test_well_formed_csv_log_round_trips_with_its_warnings(ad_ids, data, width):
    rows = data.draw(good_rows(ad_ids, width, min_size=1))
    rows += data.draw(st.lists(st.sampled_from(rows), max_size=3))  # some exact repeats
    with folder() as directory:
        catalog = write_catalog(directory, ad_ids)
        log = load_log_file(write_csv(directory / "log.csv", LOG_HEADER[:width], rows), catalog)
    assert log.user.tolist() == [r[0] for r in rows]
    assert [catalog.ad_ids[a] for a in log.ad.tolist()] == [r[1] for r in rows]
    assert log.timestamp.tolist() == [int(r[2]) for r in rows]
    assert [Event(e).name.lower() for e in log.event.tolist()] == [r[3] if width == 4 else "click" for r in rows]
    counts = {(n.kind, n.field_name): n.count for n in log.warnings}
    assert counts.get(("duplicate-row", None), 0) == len(rows) - len({tuple(r) for r in rows})
    assert counts.get(("negative-number-id", "user_id"), 0) == sum(negative_number(r[0]) for r in rows)
    assert counts.get(("negative-number-id", "ad_id"), 0) == sum(negative_number(r[1]) for r in rows)


@PROPERTY
@given(stamp=st.one_of(st.integers(-(2**80), 2**80), st.integers(-5, 5), st.integers(END_2100 - 5, END_2100 + 5)), line=st.integers(0, 3))
def test_integer_timestamp_loads_exactly_when_in_range(stamp, line):
    with folder() as directory:
        catalog = write_catalog(directory, ["a1"])
        rows = [["u", "a1", "1"]] * line + [["u", "a1", str(stamp)]]
        path = write_csv(directory / "log.csv", ["user_id", "ad_id", "timestamp"], rows)
        result = outcome(lambda: load_log_file(path, catalog))
    if 0 <= stamp < END_2100:
        assert result.timestamp.tolist()[-1] == stamp
    else:
        assert isinstance(result, DataValidationError)
        assert (result.path, result.line, result.field_name) == (str(path), line + 2, "timestamp")


# ------------------------------------------------------------------ catalog CSV
@PROPERTY
@given(rows=st.lists(st.tuples(mostly(good_id, any_id), mostly(good_id, st.text(max_size=10)), st.text(max_size=10), st.text(max_size=10)),
                     max_size=6))
def test_any_catalog_loads_or_names_file_and_line(rows):
    with folder() as directory:
        path = write_csv(directory / "catalog.csv", ["ad_id", "category", "brand", "title"], [list(r) for r in rows])
        result = outcome(lambda: load_catalog_file(path))
        if isinstance(result, DataValidationError):
            check_error_names_file_and_line(result, path, line_count(path, ""))
            return
    assert isinstance(result, AdCatalog)
    assert all(0 < len(a) <= 256 and a.lower() not in MISSING for a in result.ad_ids)
    negatives = sum(negative_number(a) for a in result.ad_ids)
    assert [n.count for n in result.warnings] == ([negatives] if negatives else [])


# ------------------------------------------------------------------ public data sets' text formats
def fake_movielens(directory: Path, lines: list[str]) -> Path:
    genres = ["0"] * len(MOVIELENS_GENRES)
    items = ["|".join([str(i), f"Movie {i}", "01-Jan-1995", "", "http://example.invalid", *genres]) for i in (1, 2, 3)]
    (directory / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    return write_lines(directory / "u.data", lines)


movielens_value = st.one_of(st.sampled_from(["1", "5", "nan", "-1", str(10**20), "-1", "x" * 300, "", " "]), one_line_text(8))
movielens_rows = st.lists(
    st.tuples(st.integers(1, 9).map(str), st.sampled_from(["1", "2", "3"]), st.sampled_from("12345"), good_timestamp.map(str)).map(list),
    min_size=1, max_size=5,
)


@PROPERTY
@given(rows=movielens_rows, data=st.data())
def test_one_bad_movielens_value_is_reported_at_its_line(rows, data):
    row, column = data.draw(st.integers(0, len(rows) - 1)), data.draw(st.integers(0, 3))
    rows[row][column] = data.draw(movielens_value)
    with folder() as directory:
        path = fake_movielens(directory, ["\t".join(r) for r in rows])
        result = outcome(lambda: load_movielens_100k(directory))
    if isinstance(result, DataValidationError):
        assert (result.path, result.line) == (str(path), row + 1)
        return
    assert len(result.log) == len(rows)
    check_valid_log(result.log)


@PROPERTY
@given(lines=st.lists(one_line_text(30), max_size=4))
def test_any_movielens_data_loads_or_names_file_and_line(lines):
    with folder() as directory:
        path = fake_movielens(directory, lines)
        result = outcome(lambda: load_movielens_100k(directory))
        if isinstance(result, DataValidationError):
            check_error_names_file_and_line(result, path, line_count(path, None))


amazon_value = st.one_of(st.sampled_from(["nan", "None", "-1", "x" * 300, "3", ""]), one_line_text(6))
amazon_rows = st.lists(st.lists(st.sampled_from(["1", "2", "10"]), min_size=1, max_size=4).map(lambda items: [f"user{len(items)}", *items]),
                       min_size=1, max_size=5)


@PROPERTY
@given(rows=amazon_rows, data=st.data())
def test_one_bad_amazon_token_is_reported_at_its_line(rows, data):
    row = data.draw(st.integers(0, len(rows) - 1))
    rows[row][data.draw(st.integers(0, len(rows[row]) - 1))] = data.draw(amazon_value)
    with folder() as directory:
        attributes = directory / "attrs.json"
        attributes.write_text('{"1": [7, 9], "2": [7], "10": [9]}', encoding="utf-8")
        path = write_lines(directory / "seq.txt", [" ".join(r) for r in rows])
        result = outcome(lambda: load_amazon_sequences(path, attributes))
    if isinstance(result, DataValidationError):  # every line keeps a token, so no line turns blank
        assert (result.path, result.line) == (str(path), row + 1)
        return
    check_valid_log(result.log)
    assert set(result.log.timestamp.tolist()) <= set(range(5))


# ------------------------------------------------------------------ experiment files
RUN_DEFAULTS = RunConfig().to_flower()
TABLE_DEFAULTS = {"sweep": SweepSpec().model_dump(by_alias=True), "baselines": BaselineSpec().model_dump(by_alias=True)}
scalar = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["synthetic", "logs", "movielens-100k", "amazon-seq", "iid", "dirichlet", "merchant", "als", "sgd", "none", "user", "client"]),
)
toml_value = st.one_of(scalar, st.lists(scalar, max_size=3))
path_value = st.one_of(st.sampled_from(["data/log.csv", "../catalog.csv", "/abs/log.csv", "nul\x00byte"]), st.text(max_size=12))
any_key = st.one_of(st.sampled_from(["data-path", "catalog-path"]), st.sampled_from(sorted(RUN_DEFAULTS)), st.text(min_size=1, max_size=12))


@st.composite
def table(draw: st.DrawFn, defaults: dict[str, Any], keys: st.SearchStrategy[str]) -> dict[str, Any]:
    """Some keys of `defaults` (or others), each with its default or an arbitrary value."""
    chosen = draw(st.lists(keys, max_size=5, unique=True))
    values = {key: path_value if key.endswith("-path") else toml_value for key in chosen}
    return {key: draw(mostly(st.just(defaults[key]), values[key]) if key in defaults else values[key]) for key in chosen}


@st.composite
def experiments(draw: st.DrawFn) -> dict[str, Any]:
    document = draw(table(RUN_DEFAULTS, any_key))
    document |= {"num-rounds": 1, "synthetic-users": 50, "synthetic-ads": 20}  # keep any expansion cheap
    for name, defaults in TABLE_DEFAULTS.items():
        if draw(st.booleans()):
            sub_keys = mostly(st.sampled_from(sorted(defaults)), st.text(min_size=1, max_size=8))
            document[name] = draw(mostly(table(defaults, sub_keys), toml_value))
    return document


@PROPERTY
@given(document=experiments())
@example(document={"data-path": "nul\x00byte"})  # once a bare ValueError from resolving the path
def test_any_experiment_file_parses_or_names_file_and_field(document):
    with folder() as directory:
        path = directory / "exp.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        try:
            experiment = load_experiment(path)
        except ExperimentError as error:
            event("error")
            message = str(error)
            assert str(path) in message and "field '" in message, message
            return
    event("parsed")
    assert isinstance(experiment, Experiment)
    assert experiment.source == str(path)
