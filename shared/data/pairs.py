"""Reading a pairs log: one interaction per line, `user item [timestamp]`, lines in time order
(the format and its detection: shared/data/log_formats.py).

Every line is a positive interaction (a click). A line's time is its timestamp column, or else
its line number: the split orders a user's rows by time, so the file's order is the time order.
What the format cannot rule out is accepted and reported (`note_pairs_suspicions`), never silent.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from shared.data.fields import LogBuilder, LogRow, first_undecodable_line, parse_timestamp, require_text
from shared.data.log_formats import LogFormat, Separator, split_line
from shared.data.schema import DataValidationError, Event, FileFormatError

# a timestamp column whose every value is at most this reads like a rating (1-5, 0-10) read as a time
RATING_LIKE_MAX = 10


def pairs_rows(path: Path, fmt: LogFormat) -> Iterator[LogRow]:
    """The file's interactions, each field checked, in file order."""
    names = "user item timestamp" if fmt.timestamps else "user item"
    for line, fields in _lines(path, fmt.separator):
        if fmt.header and line == fmt.first_line:
            continue
        if len(fields) != fmt.columns:
            raise FileFormatError(str(path), line, None, (
                f"has {len(fields)} field{'' if len(fields) == 1 else 's'}, line {fmt.first_line} has {fmt.columns}: "
                f"every line of this pairs file holds {names} ({fmt.separator}-separated)"))
        user = require_text(str(path), line, "user_id", fields[0])
        ad_id = require_text(str(path), line, "ad_id", fields[1])
        timestamp = _timestamp(path, line, fields[2], fmt) if fmt.timestamps else line
        yield LogRow(line, user, ad_id, timestamp, Event.CLICK)


def _timestamp(path: Path, line: int, raw: str, fmt: LogFormat) -> int:
    try:
        return parse_timestamp(str(path), line, raw)
    except DataValidationError as exc:
        if line != fmt.first_line:
            raise
        # a first line that is no interaction is most likely a header of names we do not know
        raise FileFormatError(str(path), line, "timestamp", (
            f"{exc.problem}; so line {line} is no interaction, and no header either "
            f"(a header names its columns, e.g. user,item,timestamp)")) from None


def _lines(path: Path, separator: Separator) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line."""
    try:
        if separator == "comma":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                try:
                    for values in reader:
                        if any(v.strip() for v in values):
                            yield reader.line_num, [v.strip() for v in values]
                except csv.Error as exc:  # e.g. a field over csv's size limit (128 KiB)
                    raise FileFormatError(str(path), reader.line_num, None, f"is not readable CSV: {exc}") from None
            return
        with path.open(encoding="utf-8-sig") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield number, split_line(raw.rstrip("\r\n"), separator)
    except UnicodeDecodeError:
        raise FileFormatError(str(path), first_undecodable_line(path), None, "is not UTF-8 text") from None


def note_pairs_suspicions(fmt: LogFormat, builder: LogBuilder) -> None:
    """Report, as notices of `builder`'s log, what reading a pairs file cannot rule out: a
    header of names we do not know read as an interaction, and a rating column read as times."""
    if not builder.lines:
        return
    first_kept = builder.lines[0] == fmt.first_line
    if not fmt.header and first_kept and len(builder.lines) > 1:
        user, ad = builder.users[0], builder.ads[0]
        if builder.users.count(user) == 1 and builder.ads.count(ad) == 1:
            shown = f"line {fmt.first_line} ({user!r}, {builder.catalog.ad_ids[ad]!r})"
            builder.notices.note("possible-header", None, fmt.first_line, shown)
    if fmt.timestamps and max(builder.timestamps) <= RATING_LIKE_MAX:
        builder.notices.note("rating-like-timestamp", "timestamp", builder.lines[0], str(builder.timestamps[0]),
                             count=len(builder.timestamps))
