"""Loaders of the generic formats, each validating every row and failing loudly (file, line, field).

- Logs: a table (CSV or Parquet with columns user_id, ad_id, timestamp and optionally event,
  merchant, region; without an event column, a log of positive interactions, clicks) or a pairs
  file (`user item [timestamp]` per line, in time order): shared/data/log_formats.py tells
  which, shared/data/pairs.py reads pairs.
- Catalogs: CSV or Parquet with ad_id and optionally category, brand, title; without a
  category column every ad's category is "unknown".
- A log without a catalog (a simulation's `dataset = "logs"` without catalog-path): the catalog
  is the log's own ads (`load_log_with_own_catalog`).
Public research data sets have their own loaders (shared/data/public_sets.py).
"""

from __future__ import annotations

import csv
from _csv import Reader as CsvReader
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.data.fields import (
    LogBuilder,
    LogRow,
    NoticeTally,
    check_row,
    first_undecodable_line,
    log_notices,
    looks_negative,
    parse_event,
    parse_timestamp,
    require_id,
    require_text,
)
from shared.data.log_formats import PARQUET_SUFFIXES, TABLE_COLUMNS_OPTIONAL, TABLE_COLUMNS_REQUIRED, LogFormat, detect_log_format
from shared.data.pairs import note_pairs_suspicions, pairs_rows
from shared.data.schema import UNKNOWN_CATEGORY, AdCatalog, Dataset, DataValidationError, Event, FileFormatError, InteractionLog

CATATABLE_COLUMNS_REQUIRED = ("ad_id",)
CATATABLE_COLUMNS_OPTIONAL = ("category", "brand", "title")


def _check_header(path: str, line: int, header: Iterable[str], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    columns = list(header)
    repeated = [c for c in dict.fromkeys(columns) if columns.count(c) > 1]
    if repeated:
        raise DataValidationError(path, line, repeated[0], "column appears more than once in the header")
    missing = [c for c in required if c not in columns]
    if missing:
        hint = ""
        if missing == ["timestamp"] and required == TABLE_COLUMNS_REQUIRED:
            hint = "; user-item pairs in time order need none: name their columns user,item (docs/DATA.md)"
        raise DataValidationError(path, line, missing[0], f"required column is missing (header: {columns}){hint}")
    unknown = [c for c in columns if c not in required + optional]
    if unknown:
        raise DataValidationError(
            path, line, unknown[0], f"unknown column; expected {list(required)} and optionally {list(optional)}"
        )


def _records(path: Path) -> tuple[int, list[str], Iterator[tuple[int, dict[str, object]]]]:
    """Header line, header and (line number, row) pairs of a CSV or Parquet file."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise FileFormatError(str(path), None, None, f"is not a readable Parquet file: {exc}") from exc
        rows = table.to_pylist()
        # Parquet has no lines: row i is reported as "line" i + 1 of the data.
        return 1, table.column_names, ((i + 1, row) for i, row in enumerate(rows))
    handle = path.open(newline="", encoding="utf-8-sig")  # tolerate the BOM spreadsheet tools write
    reader = csv.reader(handle)
    records = _csv_records(path, reader)
    try:
        # blank lines before the header carry nothing (the format detection skips them too)
        first = next((values for values in records if any(v.strip() for v in values)), None)
    except DataValidationError:
        handle.close()
        raise
    if first is None:
        handle.close()
        raise FileFormatError(str(path), 1, None, "is empty: a header row is required")
    header_line = reader.line_num
    header = [h.strip() for h in first]

    def csv_rows() -> Iterator[tuple[int, dict[str, object]]]:
        with handle:
            for values in records:
                line = reader.line_num
                if not values or all(not v.strip() for v in values):
                    continue  # blank lines carry no row
                if len(values) != len(header):
                    raise FileFormatError(
                        str(path), line, None, f"has {len(values)} fields, the header has {len(header)}"
                    )
                yield line, dict(zip(header, values))

    return header_line, header, csv_rows()


def _csv_records(path: Path, reader: CsvReader) -> Iterator[list[str]]:
    """The reader's rows, its errors turned into DataValidationErrors naming the line."""
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv's size limit (128 KiB)
            raise FileFormatError(str(path), reader.line_num, None, f"is not readable CSV: {exc}") from None
        except UnicodeDecodeError:
            raise FileFormatError(str(path), first_undecodable_line(path), None, "is not UTF-8 text") from None
        yield values


def load_catalog_file(path: str | Path) -> AdCatalog:
    """A catalog CSV (or Parquet): ad_id, and optionally category, brand and title."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "catalog file does not exist")
    header_line, header, rows = _records(path)
    _check_header(str(path), header_line, header, CATATABLE_COLUMNS_REQUIRED, CATATABLE_COLUMNS_OPTIONAL)
    has_category = "category" in header
    ids, categories, brands, titles = [], [], [], []
    seen: dict[str, int] = {}
    notices = NoticeTally(str(path))
    for line, row in rows:
        ad_id = require_id(str(path), line, "ad_id", row.get("ad_id"))
        if looks_negative(ad_id):
            notices.note("negative-number-id", "ad_id", line, ad_id)
        if ad_id in seen:
            raise DataValidationError(str(path), line, "ad_id", f"duplicate ad id {ad_id!r} (first on line {seen[ad_id]})")
        seen[ad_id] = line
        ids.append(ad_id)
        # a category column, where there is one, names every ad's: an empty cell is a gap in the data
        categories.append(require_text(str(path), line, "category", row.get("category")) if has_category else UNKNOWN_CATEGORY)
        brands.append(str(row.get("brand") or "").strip() or None)
        titles.append(str(row.get("title") or "").strip() or None)
    if not ids:
        raise DataValidationError(str(path), None, None, "catalog holds no ads")
    return AdCatalog(tuple(ids), tuple(categories), tuple(brands), tuple(titles), source=str(path), warnings=tuple(log_notices(notices.notices())))


def load_log_file(path: str | Path, catalog: AdCatalog, strict: bool = True) -> InteractionLog:
    """An interaction log in any accepted format (a table or pairs) mapped onto `catalog`."""
    path = Path(path)
    fmt = detect_log_format(path)
    has_merchant, has_region, rows = read_log_rows(path, fmt)
    builder = LogBuilder(str(path), catalog, strict)
    for row in rows:
        builder.add_row(row)
    return _build(builder, fmt, has_merchant, has_region)


def load_log_with_own_catalog(path: str | Path) -> Dataset:
    """A log with no catalog given: its catalog is its own ads, in order of first appearance,
    each with category "unknown" (a simulation's `dataset = "logs"` without catalog-path)."""
    path = Path(path)
    fmt = detect_log_format(path)
    has_merchant, has_region, parsed = read_log_rows(path, fmt)
    rows = []
    for row in parsed:
        # checked before its ad joins the catalog: an id like "nan" must not become an ad
        check_row(str(path), row.line, row.user, row.ad_id, row.timestamp)
        rows.append(row)
    ad_ids = tuple(dict.fromkeys(row.ad_id for row in rows))
    count = len(ad_ids)
    catalog = AdCatalog(ad_ids, (UNKNOWN_CATEGORY,) * count, (None,) * count, (None,) * count, source=f"{path} (its own ads)")
    builder = LogBuilder(str(path), catalog, strict=True)
    for row in rows:
        builder.add_row(row)
    return Dataset(path.name, catalog, _build(builder, fmt, has_merchant, has_region))


def read_log_rows(path: Path, fmt: LogFormat) -> tuple[bool, bool, Iterator[LogRow]]:
    """Whether the log has merchant and region columns, and its rows, each field parsed."""
    if fmt.kind == "pairs":
        return False, False, pairs_rows(path, fmt)
    header_line, header, records = _records(path)
    _check_header(str(path), header_line, header, TABLE_COLUMNS_REQUIRED, TABLE_COLUMNS_OPTIONAL)
    has_event, has_merchant, has_region = "event" in header, "merchant" in header, "region" in header

    def rows() -> Iterator[LogRow]:
        for line, row in records:
            yield LogRow(
                line,
                user=require_text(str(path), line, "user_id", row.get("user_id")),
                ad_id=require_text(str(path), line, "ad_id", row.get("ad_id")),
                timestamp=parse_timestamp(str(path), line, row.get("timestamp")),
                # a log without an event column is a log of positive interactions (clicks)
                event=parse_event(str(path), line, row.get("event")) if has_event else Event.CLICK,
                merchant=require_text(str(path), line, "merchant", row.get("merchant")) if has_merchant else None,
                region=require_text(str(path), line, "region", row.get("region")) if has_region else None,
            )

    return has_merchant, has_region, rows()


def _build(builder: LogBuilder, fmt: LogFormat, has_merchant: bool, has_region: bool) -> InteractionLog:
    if fmt.kind == "pairs":
        note_pairs_suspicions(fmt, builder)
    return builder.build(has_merchant, has_region)


def write_log_csv(path: str | Path, dataset: Dataset) -> None:
    """Write a log in the generic CSV format (the inverse of `load_log_file`)."""
    data = dataset.log
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        columns = ["user_id", "ad_id", "timestamp", "event"]
        columns += ["merchant"] if data.merchant is not None else []
        columns += ["region"] if data.region is not None else []
        writer.writerow(columns)
        for i in range(len(data)):
            row = [data.user[i], dataset.catalog.ad_ids[data.ad[i]], int(data.timestamp[i]), Event(int(data.event[i])).name.lower()]
            row += [data.merchant[i]] if data.merchant is not None else []
            row += [data.region[i]] if data.region is not None else []
            writer.writerow(row)


def write_catalog_csv(path: str | Path, catalog: AdCatalog) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ad_id", "category", "brand", "title"])
        for row in zip(catalog.ad_ids, catalog.categories, catalog.brands, catalog.titles):
            writer.writerow(["" if v is None else v for v in row])
