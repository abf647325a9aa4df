"""Loaders of the generic formats, each validating every row and failing loudly (file, line, field).

- Logs: CSV or Parquet with columns user_id, ad_id, timestamp and optionally event, merchant,
  region. A log without an event column is a log of positive interactions (clicks).
- Catalogs: CSV or Parquet with ad_id, category and optionally brand, title.
Public research data sets have their own loaders (shared/data/public_sets.py).
"""

from __future__ import annotations

import csv
from _csv import Reader as CsvReader
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.data.fields import (
    LogBuilder,
    NoticeTally,
    first_undecodable_line,
    log_notices,
    looks_negative,
    parse_event,
    parse_timestamp,
    require_id,
    require_text,
)
from shared.data.schema import AdCatalog, Dataset, DataValidationError, Event, InteractionLog

LOG_COLUMNS_REQUIRED = ("user_id", "ad_id", "timestamp")
LOG_COLUMNS_OPTIONAL = ("event", "merchant", "region")
CATALOG_COLUMNS_REQUIRED = ("ad_id", "category")
CATALOG_COLUMNS_OPTIONAL = ("brand", "title")


def _check_header(path: str, header: Iterable[str], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    columns = list(header)
    repeated = [c for c in dict.fromkeys(columns) if columns.count(c) > 1]
    if repeated:
        raise DataValidationError(path, 1, repeated[0], "column appears more than once in the header")
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataValidationError(path, 1, missing[0], f"required column is missing (header: {columns})")
    unknown = [c for c in columns if c not in required + optional]
    if unknown:
        raise DataValidationError(
            path, 1, unknown[0], f"unknown column; expected {list(required)} and optionally {list(optional)}"
        )


def _records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    """Header and (line number, row) pairs of a CSV or Parquet file."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataValidationError(str(path), None, None, f"is not a readable Parquet file: {exc}") from exc
        rows = table.to_pylist()
        # Parquet has no lines: row i is reported as "line" i + 1 of the data.
        return table.column_names, ((i + 1, row) for i, row in enumerate(rows))
    handle = path.open(newline="", encoding="utf-8-sig")  # tolerate the BOM spreadsheet tools write
    reader = csv.reader(handle)
    records = _csv_records(path, reader)
    try:
        first = next(records, None)
    except DataValidationError:
        handle.close()
        raise
    if first is None:
        handle.close()
        raise DataValidationError(str(path), 1, None, "is empty: a header row is required")
    header = [h.strip() for h in first]

    def csv_rows() -> Iterator[tuple[int, dict[str, object]]]:
        with handle:
            for values in records:
                line = reader.line_num
                if not values or all(not v.strip() for v in values):
                    continue  # blank lines carry no row
                if len(values) != len(header):
                    raise DataValidationError(
                        str(path), line, None, f"has {len(values)} fields, the header has {len(header)}"
                    )
                yield line, dict(zip(header, values))

    return header, csv_rows()


def _csv_records(path: Path, reader: CsvReader) -> Iterator[list[str]]:
    """The reader's rows, its errors turned into DataValidationErrors naming the line."""
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv's size limit (128 KiB)
            raise DataValidationError(str(path), reader.line_num, None, f"is not readable CSV: {exc}") from None
        except UnicodeDecodeError:
            raise DataValidationError(str(path), first_undecodable_line(path), None, "is not UTF-8 text") from None
        yield values


def load_catalog_file(path: str | Path) -> AdCatalog:
    """A catalog CSV (or Parquet): ad_id, category, and optionally brand and title."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "catalog file does not exist")
    header, rows = _records(path)
    _check_header(str(path), header, CATALOG_COLUMNS_REQUIRED, CATALOG_COLUMNS_OPTIONAL)
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
        categories.append(require_text(str(path), line, "category", row.get("category")))
        brands.append(str(row.get("brand") or "").strip() or None)
        titles.append(str(row.get("title") or "").strip() or None)
    if not ids:
        raise DataValidationError(str(path), None, None, "catalog holds no ads")
    return AdCatalog(tuple(ids), tuple(categories), tuple(brands), tuple(titles), source=str(path), warnings=tuple(log_notices(notices.notices())))


def load_log_file(path: str | Path, catalog: AdCatalog, strict: bool = True) -> InteractionLog:
    """A generic interaction log (CSV or Parquet) mapped onto `catalog`."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "log file does not exist")
    header, rows = _records(path)
    _check_header(str(path), header, LOG_COLUMNS_REQUIRED, LOG_COLUMNS_OPTIONAL)
    has_merchant, has_region = "merchant" in header, "region" in header
    builder = LogBuilder(str(path), catalog, strict)
    for line, row in rows:
        builder.add(
            line,
            user=require_text(str(path), line, "user_id", row.get("user_id")),
            ad_id=require_text(str(path), line, "ad_id", row.get("ad_id")),
            timestamp=parse_timestamp(str(path), line, row.get("timestamp")),
            # a log without an event column is a log of positive interactions (clicks)
            event=parse_event(str(path), line, row.get("event")) if "event" in header else Event.CLICK,
            merchant=require_text(str(path), line, "merchant", row.get("merchant")) if has_merchant else None,
            region=require_text(str(path), line, "region", row.get("region")) if has_region else None,
        )
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
