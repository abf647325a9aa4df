"""The interaction-log formats the loaders accept, and which one a file is in (docs/DATA.md).

- table: CSV or Parquet with a header naming its columns: user_id, ad_id, timestamp and
  optionally event, merchant, region (read by shared/data/loaders.py).
- pairs: one interaction per line, `user item` or `user item timestamp`, split by whitespace,
  by commas or by tabs, lines in time order, optionally under a header line (read by
  shared/data/pairs.py), as several public data sets ship. Every line is a positive interaction
  (a click); without a timestamp column a line's time is its line number.

A text file's format is read off its first non-blank line, in this order:
1. a pairs header: a user column, an item column and optionally a time column, named as in
   PAIRS_*_NAMES (any case; a RecBole-style `:type` suffix is ignored) -> pairs, with header;
2. a line naming any table column (user_id, ad_id, timestamp, event, merchant, region) -> a
   table, whose header is then checked column by column;
3. anything else with 2 or 3 fields -> pairs without header: line 1 is an interaction.
A pairs file's separator is its first line's: a tab if it holds one, else a comma if it holds
one, else runs of whitespace. A Parquet file is a table.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.data.fields import first_undecodable_line
from shared.data.schema import DataValidationError, FileFormatError

TABLE_COLUMNS_REQUIRED = ("user_id", "ad_id", "timestamp")
TABLE_COLUMNS_OPTIONAL = ("event", "merchant", "region")
# header names of a pairs file's columns. Not "ad_id": a header naming it is a table's, whose
# errors (a missing timestamp column) then stay as strict as they were before pairs existed.
PAIRS_USER_NAMES = ("user", "user_id", "userid", "uid")
PAIRS_ITEM_NAMES = ("item", "item_id", "itemid", "iid", "product_id", "asin", "movie_id", "movieid", "business_id")
PAIRS_TIME_NAMES = ("timestamp", "time", "ts", "date")
PARQUET_SUFFIXES = (".parquet", ".pq")

Separator = Literal["whitespace", "comma", "tab"]

# each accepted format: its name, what it is, and an example line
ACCEPTED_LOG_FORMATS = (
    ("table", "CSV or Parquet; a header line names user_id, ad_id, timestamp [, event, merchant, region]",
     "user_id,ad_id,timestamp,event  then rows such as  u1,ad-7,1700000000,click"),
    ("pairs", "one interaction per line, in time order: user item [timestamp]; whitespace, comma or tab separated; "
              "an optional header such as user,item,timestamp",
     "u1 ad-7   or   u1,ad-7,1700000000"),
)


def accepted_formats_text() -> str:
    """The accepted log formats, one example each: what a merchant is shown for a log in none."""
    lines = ["accepted log formats (docs/DATA.md):"]
    for name, what, example in ACCEPTED_LOG_FORMATS:
        lines += [f"  {name}: {what}", f"    e.g.  {example}"]
    return "\n".join(lines)


@dataclass(frozen=True)
class LogFormat:
    """How one log file is laid out, as detected from its first non-blank line."""

    kind: Literal["table", "pairs"]
    first_line: int  # the first non-blank line: the header, or a pairs file's first interaction
    parquet: bool = False  # a table in Parquet rather than CSV
    separator: Separator = "comma"
    header: bool = True  # pairs: whether `first_line` names the columns
    timestamps: bool = True  # pairs: a third column holds the time; without it, the line number does

    @property
    def columns(self) -> int:
        """Fields on every line of a pairs file."""
        return 3 if self.timestamps else 2

    def describe(self) -> str:
        if self.kind == "table":
            return "table (Parquet)" if self.parquet else f"table (CSV, header on line {self.first_line})"
        columns = "user item timestamp" if self.timestamps else "user item; time = line order"
        header = f"header on line {self.first_line}" if self.header else "no header"
        return f"pairs ({columns}; {self.separator}-separated; {header})"


def split_line(text: str, separator: Separator) -> list[str]:
    """The stripped fields of one line of a pairs file (a comma-separated line as CSV: quotes)."""
    if separator == "comma":
        return [field.strip() for field in next(csv.reader([text]), [])]
    if separator == "tab":
        return [field.strip() for field in text.split("\t")]
    return text.split()


def field_count_problem(count: int, separator: Separator) -> str:
    """Why a line of `count` fields is in no accepted format, and the conversions that help."""
    problem = (f"has {count} field{'' if count == 1 else 's'} ({separator}-separated), and is no table header: "
               "a pairs file has 2 or 3 on every line (user item [timestamp])")
    if count > 3:
        problem += ("; a ratings file (user item rating timestamp)? keep columns 1, 2 and 4; a sequence file "
                    "(user item item ...)? write one line per item (docs/DATA.md: one-line conversions)")
    return problem


def detect_log_format(path: str | Path) -> LogFormat:
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "log file does not exist")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return LogFormat("table", first_line=1, parquet=True)
    line, text = _first_line(path)
    separator: Separator = "tab" if "\t" in text else "comma" if "," in text else "whitespace"
    fields = split_line(text, separator)
    names = [field.lower().split(":")[0] for field in fields]
    if _is_pairs_header(names):
        return LogFormat("pairs", first_line=line, separator=separator, header=True, timestamps=len(names) == 3)
    # a table is CSV, but a tab-separated one is told its header is wrong rather than read as pairs;
    # not split at spaces: an item of a whitespace-separated pairs file may be called "event"
    splits: tuple[Separator, ...] = ("comma", "tab")
    named = {field.lower() for split in splits for field in split_line(text, split)}
    if named & set(TABLE_COLUMNS_REQUIRED + TABLE_COLUMNS_OPTIONAL):
        return LogFormat("table", first_line=line)
    if len(fields) not in (2, 3):
        raise FileFormatError(str(path), line, None, field_count_problem(len(fields), separator))
    return LogFormat("pairs", first_line=line, separator=separator, header=False, timestamps=len(fields) == 3)


def _is_pairs_header(names: list[str]) -> bool:
    return (len(names) in (2, 3) and names[0] in PAIRS_USER_NAMES and names[1] in PAIRS_ITEM_NAMES
            and (len(names) == 2 or names[2] in PAIRS_TIME_NAMES))


def _first_line(path: Path) -> tuple[int, str]:
    """The number and text of the first non-blank line."""
    try:
        with path.open(encoding="utf-8-sig") as handle:  # tolerate the BOM spreadsheet tools write
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    return number, raw.rstrip("\r\n")
    except UnicodeDecodeError:
        raise FileFormatError(str(path), first_undecodable_line(path), None, "is not UTF-8 text") from None
    raise FileFormatError(str(path), 1, None, "is empty: it holds neither a header nor an interaction")
