"""Loaders for the supported log formats. Each validates every row and fails loudly.

- MovieLens-100K: `u.data` (user, item, rating, timestamp; tab separated) with `u.item` as the
  catalog (title and first genre as category).
- Amazon sequence format (S3Rec): `user item item ...` per line in time order, with an item ->
  attribute-ids JSON as the catalog.
- Generic logs: CSV or Parquet with columns user_id, ad_id, timestamp and optionally event,
  merchant, region; and a catalog CSV with ad_id, category and optionally brand, title.

Rows that reference an ad outside the catalog are an error by default (`strict=True`); with
`strict=False` they are rejected with a reason kept in `InteractionLog.rejected` and a warning
is logged, never silently dropped.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from shared.data.schema import EVENT_NAMES, AdCatalog, DataValidationError, Dataset, Event, InteractionLog

log = logging.getLogger(__name__)

LOG_COLUMNS_REQUIRED = ("user_id", "ad_id", "timestamp")
LOG_COLUMNS_OPTIONAL = ("event", "merchant", "region")
CATALOG_COLUMNS_REQUIRED = ("ad_id", "category")
CATALOG_COLUMNS_OPTIONAL = ("brand", "title")
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


# ------------------------------------------------------------------ field parsers
def _require_text(path: str, line: int, field_name: str, raw: object) -> str:
    if raw is None:
        raise DataValidationError(path, line, field_name, "is missing")
    text = str(raw).strip()
    if not text:
        raise DataValidationError(path, line, field_name, "is empty")
    return text


def _parse_timestamp(path: str, line: int, raw: object) -> int:
    text = _require_text(path, line, "timestamp", raw)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise DataValidationError(
            path, line, "timestamp", f"{text!r} is neither integer seconds nor an ISO 8601 date-time"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def _parse_event(path: str, line: int, raw: object) -> Event:
    if raw is None or str(raw).strip() == "":
        raise DataValidationError(path, line, "event", f"is empty; expected one of {', '.join(EVENT_NAMES)}")
    try:
        return Event.parse(str(raw))
    except KeyError:
        raise DataValidationError(path, line, "event", f"{raw!r} is not one of {', '.join(EVENT_NAMES)}") from None


# ------------------------------------------------------------------ assembling logs
class _LogBuilder:
    """Accumulates validated rows and maps ad ids onto the catalog."""

    def __init__(self, path: str, catalog: AdCatalog, strict: bool) -> None:
        self.path, self.catalog, self.strict = path, catalog, strict
        self.users: list[str] = []
        self.ads: list[int] = []
        self.timestamps: list[int] = []
        self.events: list[int] = []
        self.merchants: list[str] = []
        self.regions: list[str] = []
        self.rejected: list[str] = []

    def add(
        self, line: int, user: str, ad_id: str, timestamp: int, event: Event,
        merchant: str | None = None, region: str | None = None,
    ) -> None:
        row = self.catalog.index.get(ad_id)
        if row is None:
            if self.strict:
                raise DataValidationError(
                    self.path, line, "ad_id", f"{ad_id!r} is not in the ad catalog ({self.catalog.source})"
                )
            self.rejected.append(f"{self.path}:{line}: field 'ad_id' {ad_id!r} is not in the ad catalog")
            return
        self.users.append(user)
        self.ads.append(row)
        self.timestamps.append(timestamp)
        self.events.append(int(event))
        if merchant is not None:
            self.merchants.append(merchant)
        if region is not None:
            self.regions.append(region)

    def build(self, has_merchant: bool = False, has_region: bool = False) -> InteractionLog:
        if self.rejected:
            log.warning(
                "%s: rejected %d rows whose ad is not in the catalog (first: %s)",
                self.path, len(self.rejected), self.rejected[0],
            )
        if not self.users:
            raise DataValidationError(self.path, None, None, "holds no usable interaction rows")
        return InteractionLog(
            user=np.array(self.users, dtype=object),
            ad=np.array(self.ads, dtype=np.int64),
            timestamp=np.array(self.timestamps, dtype=np.int64),
            event=np.array(self.events, dtype=np.int8),
            merchant=np.array(self.merchants, dtype=object) if has_merchant else None,
            region=np.array(self.regions, dtype=object) if has_region else None,
            source=self.path,
            rejected=self.rejected,
        )


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
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        handle.close()
        raise DataValidationError(str(path), 1, None, "is empty: a header row is required") from None

    def rows() -> Iterator[tuple[int, dict[str, object]]]:
        with handle:
            for values in reader:
                line = reader.line_num
                if not values or all(not v.strip() for v in values):
                    continue  # blank lines carry no row
                if len(values) != len(header):
                    raise DataValidationError(
                        str(path), line, None, f"has {len(values)} fields, the header has {len(header)}"
                    )
                yield line, dict(zip(header, values))

    return header, rows()


def load_catalog_file(path: str | Path) -> AdCatalog:
    """A catalog CSV (or Parquet): ad_id, category, and optionally brand and title."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "catalog file does not exist")
    header, rows = _records(path)
    _check_header(str(path), header, CATALOG_COLUMNS_REQUIRED, CATALOG_COLUMNS_OPTIONAL)
    ids, categories, brands, titles = [], [], [], []
    seen: dict[str, int] = {}
    for line, row in rows:
        ad_id = _require_text(str(path), line, "ad_id", row.get("ad_id"))
        if ad_id in seen:
            raise DataValidationError(str(path), line, "ad_id", f"duplicate ad id {ad_id!r} (first on line {seen[ad_id]})")
        seen[ad_id] = line
        ids.append(ad_id)
        categories.append(_require_text(str(path), line, "category", row.get("category")))
        brands.append((str(row.get("brand") or "").strip() or None))
        titles.append((str(row.get("title") or "").strip() or None))
    if not ids:
        raise DataValidationError(str(path), None, None, "catalog holds no ads")
    return AdCatalog(tuple(ids), tuple(categories), tuple(brands), tuple(titles), source=str(path))


def load_log_file(path: str | Path, catalog: AdCatalog, strict: bool = True) -> InteractionLog:
    """A generic interaction log (CSV or Parquet) mapped onto `catalog`."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "log file does not exist")
    header, rows = _records(path)
    _check_header(str(path), header, LOG_COLUMNS_REQUIRED, LOG_COLUMNS_OPTIONAL)
    has_merchant, has_region = "merchant" in header, "region" in header
    builder = _LogBuilder(str(path), catalog, strict)
    for line, row in rows:
        builder.add(
            line,
            user=_require_text(str(path), line, "user_id", row.get("user_id")),
            ad_id=_require_text(str(path), line, "ad_id", row.get("ad_id")),
            timestamp=_parse_timestamp(str(path), line, row.get("timestamp")),
            # a log without an event column is a log of positive interactions (clicks)
            event=_parse_event(str(path), line, row.get("event")) if "event" in header else Event.CLICK,
            merchant=_require_text(str(path), line, "merchant", row.get("merchant")) if has_merchant else None,
            region=_require_text(str(path), line, "region", row.get("region")) if has_region else None,
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


# ------------------------------------------------------------------ MovieLens-100K
def load_movielens_catalog(folder: str | Path) -> AdCatalog:
    """`u.item`: movie id, title, and the first of its genres as the category."""
    item_path = Path(folder) / "u.item"
    if not item_path.is_file():
        raise DataValidationError(str(item_path), None, None, "MovieLens-100K file does not exist")
    ids, categories, titles, tags = [], [], [], []
    with item_path.open(encoding="latin-1") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            fields = raw.rstrip("\n").split("|")
            if len(fields) != 5 + len(MOVIELENS_GENRES):
                raise DataValidationError(str(item_path), line, None, f"has {len(fields)} fields, expected {5 + len(MOVIELENS_GENRES)}")
            ids.append(_require_text(str(item_path), line, "movie_id", fields[0]))
            titles.append(fields[1].strip() or None)
            flags = fields[5:]
            if any(f not in ("0", "1") for f in flags):
                raise DataValidationError(str(item_path), line, "genre", "genre flags must be 0 or 1")
            genres = [g for g, f in zip(MOVIELENS_GENRES, flags) if f == "1"]
            categories.append(genres[0] if genres else "unknown")
            tags.append(tuple(genres) or ("unknown",))
    return AdCatalog(tuple(ids), tuple(categories), (None,) * len(ids), tuple(titles), source=str(item_path), tags=tuple(tags))


def load_movielens_100k(folder: str | Path, strict: bool = True) -> Dataset:
    """`u.data` as the log (every rating is a positive interaction), `u.item` as the catalog."""
    catalog = load_movielens_catalog(folder)
    data_path = Path(folder) / "u.data"
    if not data_path.is_file():
        raise DataValidationError(str(data_path), None, None, "MovieLens-100K file does not exist")
    builder = _LogBuilder(str(data_path), catalog, strict)
    with data_path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            fields = raw.rstrip("\n").split("\t")
            if len(fields) != 4:
                raise DataValidationError(str(data_path), line, None, f"has {len(fields)} fields, expected 4 (user, item, rating, timestamp)")
            rating = _require_text(str(data_path), line, "rating", fields[2])
            if rating not in ("1", "2", "3", "4", "5"):
                raise DataValidationError(str(data_path), line, "rating", f"{rating!r} is not 1-5")
            builder.add(
                line,
                user=_require_text(str(data_path), line, "user_id", fields[0]),
                ad_id=_require_text(str(data_path), line, "item_id", fields[1]),
                timestamp=_parse_timestamp(str(data_path), line, fields[3]),
                event=Event.CLICK,
            )
    return Dataset("movielens-100k", catalog, builder.build())


# ------------------------------------------------------------------ Amazon sequences
def load_amazon_catalog(attributes_path: str | Path) -> AdCatalog:
    """Item id -> attribute ids (category and brand, unnamed). An item's category is its most
    common attribute across the catalog (the coarsest grouping); all its attributes are its tags."""
    attributes_path = Path(attributes_path)
    if not attributes_path.is_file():
        raise DataValidationError(str(attributes_path), None, None, "attribute file does not exist")
    try:
        attributes = json.loads(attributes_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataValidationError(str(attributes_path), exc.lineno, None, f"is not valid JSON: {exc.msg}") from exc
    if not isinstance(attributes, dict) or not attributes:
        raise DataValidationError(str(attributes_path), 1, None, "must be a non-empty object item id -> [attribute ids]")
    for item, attrs in attributes.items():
        if not isinstance(attrs, list) or not all(isinstance(a, int) for a in attrs):
            raise DataValidationError(str(attributes_path), None, f"{item}", "attributes must be a list of integers")
    frequency = Counter(a for attrs in attributes.values() for a in attrs)
    ids = tuple(sorted(attributes, key=lambda s: (len(s), s)))
    categories = tuple(
        f"attr-{max(attributes[i], key=lambda a: (frequency[a], -a))}" if attributes[i] else "unknown" for i in ids
    )
    tags = tuple(tuple(f"attr-{a}" for a in attributes[i]) or ("unknown",) for i in ids)
    return AdCatalog(ids, categories, (None,) * len(ids), (None,) * len(ids), source=str(attributes_path), tags=tags)


def load_amazon_sequences(sequence_path: str | Path, attributes_path: str | Path, strict: bool = True) -> Dataset:
    """S3Rec's format: one line per user, `user item item ...` in time order; the position in
    the sequence serves as the timestamp."""
    catalog = load_amazon_catalog(attributes_path)
    sequence_path = Path(sequence_path)
    if not sequence_path.is_file():
        raise DataValidationError(str(sequence_path), None, None, "sequence file does not exist")
    builder = _LogBuilder(str(sequence_path), catalog, strict)
    with sequence_path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            fields = raw.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataValidationError(str(sequence_path), line, "items", "a user line needs at least one item")
            for position, item in enumerate(fields[1:]):
                builder.add(line, user=fields[0], ad_id=item, timestamp=position, event=Event.CLICK)
    return Dataset("amazon-seq", catalog, builder.build())
