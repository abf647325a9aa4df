"""Parsing and assembling log rows: every field validated, every ad mapped onto the catalog.

Rows that reference an ad outside the catalog are an error by default (`strict=True`); with
`strict=False` they are rejected with a reason kept in `InteractionLog.rejected` and a warning
is logged, never silently dropped.

Input edges (docs/ARCHITECTURE.md, "Data"):
- timestamps are seconds in [0, 2100-01-01T00:00:00Z); anything else is an error, in either mode;
- an id spelled as a missing value ("nan", "None", "null", "<NA>", "NaT", any case) or longer than
  MAX_ID_LENGTH is an error;
- ids that look like negative numbers ("-1") and rows repeating an earlier row exactly are
  accepted and reported: counted, with their first line, in `warnings` and in a logged warning.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shared.data.schema import EVENT_NAMES, AdCatalog, DataValidationError, Event, InteractionLog, ValidationNotice

log = logging.getLogger(__name__)

# Click logs start after the epoch; a negative time is a sentinel (-1) or a sign error, and a time
# past 2100 is a clock in the wrong unit (milliseconds) or garbage; numpy's int64 ends at 2**63 - 1.
MIN_TIMESTAMP = 0
END_TIMESTAMP = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp())  # exclusive
MAX_ID_LENGTH = 256
# How pandas, numpy, JSON and SQL tools write a missing value into a text column: an id spelled so
# is an export artefact, not an id.
MISSING_VALUE_SPELLINGS = frozenset({"nan", "none", "null", "<na>", "nat"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NEGATIVE_NUMBER = re.compile(r"-[0-9]+(?:\.[0-9]*)?")


def require_text(path: str, line: int, field_name: str, raw: object) -> str:
    if raw is None:
        raise DataValidationError(path, line, field_name, "is missing")
    text = str(raw).strip()
    if not text:
        raise DataValidationError(path, line, field_name, "is empty")
    return text


def check_id(path: str, line: int, field_name: str, text: str) -> str:
    """`text` (already stripped and non-empty) if it can be an id; a DataValidationError if not."""
    if len(text) > MAX_ID_LENGTH:
        raise DataValidationError(
            path, line, field_name, f"is {len(text)} characters long; ids are at most {MAX_ID_LENGTH} ({text[:20]!r}...)"
        )
    if text.lower() in MISSING_VALUE_SPELLINGS:
        raise DataValidationError(
            path, line, field_name, f"{text!r} is how a missing value is exported (pandas, JSON, SQL), not an id"
        )
    return text


def require_id(path: str, line: int, field_name: str, raw: object) -> str:
    return check_id(path, line, field_name, require_text(path, line, field_name, raw))


def looks_negative(text: str) -> bool:
    """Whether an id reads as a negative number: "-1" is a common missing-value code."""
    return text.startswith("-") and _NEGATIVE_NUMBER.fullmatch(text) is not None


def _out_of_range(path: str, line: int, shown: str, value: int | None) -> DataValidationError:
    hint = ""
    if value is not None and MIN_TIMESTAMP <= value // 1000 < END_TIMESTAMP:
        hint = "; milliseconds? timestamps are seconds"
    return DataValidationError(
        path, line, "timestamp",
        f"{shown} is outside [{MIN_TIMESTAMP}, {END_TIMESTAMP}) (seconds from 1970-01-01 to 2100-01-01 UTC){hint}",
    )


def check_timestamp(path: str, line: int, value: int) -> int:
    if not MIN_TIMESTAMP <= value < END_TIMESTAMP:
        raise _out_of_range(path, line, str(value), value)
    return value


def parse_timestamp(path: str, line: int, raw: object) -> int:
    """Integer seconds or an ISO 8601 date-time (naive = UTC), as seconds; the range is checked
    where the row is added (`LogBuilder.add`), for every loader."""
    text = require_text(path, line, "timestamp", raw)
    # ASCII digits only: int() would also take "1_000" and other scripts' digits
    if _INTEGER.fullmatch(text):
        if len(text.lstrip("+-0")) > 20:  # far out of range, and int() refuses beyond 4300 digits
            raise _out_of_range(path, line, f"{text[:24]}... ({len(text)} digits)", None)
        return int(text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise DataValidationError(
            path, line, "timestamp", f"{text!r} is neither integer seconds nor an ISO 8601 date-time"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def parse_event(path: str, line: int, raw: object) -> Event:
    if raw is None or str(raw).strip() == "":
        raise DataValidationError(path, line, "event", f"is empty; expected one of {', '.join(EVENT_NAMES)}")
    try:
        return Event.parse(str(raw))
    except KeyError:
        raise DataValidationError(path, line, "event", f"{raw!r} is not one of {', '.join(EVENT_NAMES)}") from None


class LogRow(NamedTuple):
    """One parsed log row, whatever format it came from; its ids and time are checked where it
    is added (`check_row`)."""

    line: int
    user: str
    ad_id: str
    timestamp: int
    event: Event
    merchant: str | None = None
    region: str | None = None


def check_row(path: str, line: int, user: str, ad_id: str, timestamp: int) -> None:
    """The checks every row passes, from any loader: ids that can be ids, a time in range."""
    check_id(path, line, "user_id", user)
    check_id(path, line, "ad_id", ad_id)
    check_timestamp(path, line, timestamp)


class LogBuilder:
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
        self.lines: list[int] = []  # the line of each kept row, to report duplicates by line
        self.notices = NoticeTally(path)

    def add(
        self, line: int, user: str, ad_id: str, timestamp: int, event: Event,
        merchant: str | None = None, region: str | None = None,
    ) -> None:
        # ids and the time range are checked here, not in each loader, so that no loader skips them
        check_row(self.path, line, user, ad_id, timestamp)
        row = self.catalog.index.get(ad_id)
        if row is None:
            if self.strict:
                raise DataValidationError(
                    self.path, line, "ad_id", f"{ad_id!r} is not in the ad catalog ({self.catalog.source})"
                )
            self.rejected.append(f"{self.path}:{line}: field 'ad_id' {ad_id!r} is not in the ad catalog")
            return
        # noted only for kept rows: a rejected row is reported as rejected, not twice
        for field_name, value in (("user_id", user), ("ad_id", ad_id)):
            if looks_negative(value):
                self.notices.note("negative-number-id", field_name, line, value)
        self.lines.append(line)
        self.users.append(user)
        self.ads.append(row)
        self.timestamps.append(timestamp)
        self.events.append(int(event))
        if merchant is not None:
            self.merchants.append(merchant)
        if region is not None:
            self.regions.append(region)

    def add_row(self, row: LogRow) -> None:
        self.add(row.line, row.user, row.ad_id, row.timestamp, row.event, row.merchant, row.region)

    def build(self, has_merchant: bool = False, has_region: bool = False) -> InteractionLog:
        if self.rejected:
            log.warning(
                "%s: rejected %d rows whose ad is not in the catalog (first: %s)",
                self.path, len(self.rejected), self.rejected[0],
            )
        if not self.users:
            raise DataValidationError(self.path, None, None, "holds no usable interaction rows")
        data = InteractionLog(
            user=np.array(self.users, dtype=object),
            ad=np.array(self.ads, dtype=np.int64),
            timestamp=np.array(self.timestamps, dtype=np.int64),
            event=np.array(self.events, dtype=np.int8),
            merchant=np.array(self.merchants, dtype=object) if has_merchant else None,
            region=np.array(self.regions, dtype=object) if has_region else None,
            source=self.path,
            rejected=self.rejected,
        )
        repeats = duplicate_rows(data)
        if len(repeats):
            first = int(repeats[0, 0])
            self.notices.note("duplicate-row", None, self.lines[first], f"line {self.lines[int(repeats[0, 1])]}", count=len(repeats))
        data.warnings = log_notices(self.notices.notices())
        return data


def duplicate_rows(data: InteractionLog) -> np.ndarray:
    """[n, 2] array of (row, earlier row it repeats) for each row equal in every column to an
    earlier one, in row order."""
    columns = [np.unique(data.user, return_inverse=True)[1].reshape(-1), data.ad, data.timestamp, data.event.astype(np.int64)]
    for extra in (data.merchant, data.region):
        if extra is not None:
            columns.append(np.unique(extra, return_inverse=True)[1].reshape(-1))
    keys = np.stack(columns, axis=1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    earlier = first[group.reshape(-1)]
    rows = np.flatnonzero(earlier != np.arange(len(keys)))
    return np.stack([rows, earlier[rows]], axis=1)


# what each kind of notice says of its first row, and what was done with such rows
NOTICE_DETAILS = {
    "negative-number-id": "{first!r} reads as a negative number, a common missing-value code; accepted as a string id",
    "duplicate-row": "repeats {first} exactly (every field); accepted, the split keeps one of each",
    "possible-header": ("{first} may be a header: its user and its item appear on no other line; read as an interaction "
                        "(a header line names its columns user,item[,timestamp]: docs/DATA.md)"),
    "rating-like-timestamp": ("every timestamp is between 0 and 10 (this one: {first}): a rating column? a pairs file's third "
                              "column is the time; accepted as seconds (docs/DATA.md: dropping a rating column)"),
}


class NoticeTally:
    """Counts accepted-but-suspicious rows per (kind, field), keeping the first one's line and value."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counts: Counter[tuple[str, str | None]] = Counter()
        self.first: dict[tuple[str, str | None], tuple[int, str]] = {}

    def note(self, kind: str, field_name: str | None, line: int, first: str, count: int = 1) -> None:
        key = (kind, field_name)
        self.counts[key] += count
        self.first.setdefault(key, (line, first))

    def notices(self) -> list[ValidationNotice]:
        return [
            ValidationNotice(kind, field_name, self.counts[kind, field_name], self.path, line,
                             NOTICE_DETAILS[kind].format(first=first))
            for (kind, field_name), (line, first) in self.first.items()
        ]


def log_notices(notices: Iterable[ValidationNotice]) -> list[ValidationNotice]:
    """Log each notice as a warning (nothing accepted silently), and hand them back."""
    notices = list(notices)
    for notice in notices:
        log.warning("%s", notice)
    return notices


def first_undecodable_line(path: Path) -> int | None:
    """The line of the first byte that is not UTF-8: the text reader decodes ahead of the CSV
    reader, so the CSV reader's line is no guide."""
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line
    return None


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; bytes that are not UTF-8 are a
    DataValidationError naming the file and the line, not a bare UnicodeDecodeError."""
    try:
        with path.open(encoding="utf-8") as handle:
            yield from enumerate(handle, start=1)
    except UnicodeDecodeError:
        raise DataValidationError(str(path), first_undecodable_line(path), None, "is not UTF-8 text") from None
