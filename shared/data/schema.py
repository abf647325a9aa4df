"""The interaction-log and ad-catalog schema, validated on load.

A log row is one event of one user on one ad: who, which ad, when, and optionally what
(impression, click, purchase), for which merchant and in which region. Ads are referenced by
the public catalog's ids; every client maps its logs onto the catalog's rows, so the global
parameters have one row per catalog ad no matter who holds which data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import scipy.sparse as sp


class DataValidationError(ValueError):
    """A malformed input: names the file, the line (1-based) and the field."""

    def __init__(self, path: str, line: int | None, field_name: str | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.field_name = field_name
        self.problem = problem
        where = path if line is None else f"{path}:{line}"
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")


class FileFormatError(DataValidationError):
    """A file in none of its accepted formats: its shape is wrong (not text, a wrong field count,
    a first line that is neither a header nor a row), not one of its values. For a log, the
    merchant agent lists the formats it accepts (shared/data/log_formats.py)."""


@dataclass(frozen=True)
class ValidationNotice:
    """Rows that were accepted but deserve a look: what, how many, and where the first one is.

    A loader reports these rather than rejecting the rows (a "-1" id may be a real id) and never
    accepts them silently (it may as well be a missing-value code)."""

    kind: str  # stable name for code and tests, e.g. "negative-number-id", "duplicate-row"
    field_name: str | None
    count: int
    path: str
    first_line: int
    detail: str  # what the first row is and what was done with such rows

    def __str__(self) -> str:
        what = f" field '{self.field_name}'" if self.field_name else ""
        rows = "1 such row" if self.count == 1 else f"{self.count} such rows; this is the first"
        return f"{self.path}:{self.first_line}:{what} {self.detail} ({rows})"


class Event(IntEnum):
    """Event types ordered by strength of the signal; click and purchase are positives."""

    IMPRESSION = 0
    CLICK = 1
    PURCHASE = 2

    @classmethod
    def parse(cls, raw: str) -> Event:
        return cls[raw.strip().upper()]

    @property
    def is_positive(self) -> bool:
        return self >= Event.CLICK


EVENT_NAMES = tuple(e.name.lower() for e in Event)
# the category of an ad whose catalog names none (a catalog without a category column, an
# Amazon item without attributes, a movie without genres)
UNKNOWN_CATEGORY = "unknown"


@dataclass(frozen=True)
class AdCatalog:
    """The public ad catalog. Row i of every global parameter belongs to `ad_ids[i]`."""

    ad_ids: tuple[str, ...]
    categories: tuple[str, ...]
    brands: tuple[str | None, ...]
    titles: tuple[str | None, ...]
    source: str = "<memory>"
    # public content tags per ad (attributes, genres), for content priors; default: its category and brand
    tags: tuple[tuple[str, ...], ...] = ()
    warnings: tuple[ValidationNotice, ...] = field(default=(), compare=False)  # accepted but suspicious ids
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.ad_ids)
        if not self.tags:
            object.__setattr__(self, "tags", tuple((c,) + ((b,) if b else ()) for c, b in zip(self.categories, self.brands)))
        for name in ("categories", "brands", "titles", "tags"):
            if len(getattr(self, name)) != n:
                raise DataValidationError(self.source, None, name, f"has {len(getattr(self, name))} entries, expected {n}")
        index: dict[str, int] = {}
        for row, ad_id in enumerate(self.ad_ids):
            if ad_id in index:
                raise DataValidationError(self.source, None, "ad_id", f"duplicate ad id {ad_id!r}")
            index[ad_id] = row
        object.__setattr__(self, "index", index)

    def __len__(self) -> int:
        return len(self.ad_ids)

    def tag_membership(self) -> np.ndarray:
        """[ads, distinct tags] 0/1 matrix: which public tags each ad carries."""
        return self.sparse_tag_membership().toarray()

    def sparse_tag_membership(self) -> sp.csr_array:
        """`tag_membership` as a sparse matrix (a million-ad catalog has a few tags per ad)."""
        names = sorted({tag for tags in self.tags for tag in tags})
        lookup = {name: column for column, name in enumerate(names)}
        distinct = [sorted({lookup[tag] for tag in tags}) for tags in self.tags]
        offsets = np.cumsum([0, *(len(columns) for columns in distinct)])
        columns = np.fromiter((column for row in distinct for column in row), dtype=np.int64, count=int(offsets[-1]))
        return sp.csr_array((np.ones(len(columns)), columns, offsets), shape=(len(self.ad_ids), len(names)))

    def category_codes(self) -> tuple[np.ndarray, list[str]]:
        """Integer category per ad, and the category names in code order."""
        names = sorted(set(self.categories))
        lookup = {name: code for code, name in enumerate(names)}
        return np.array([lookup[c] for c in self.categories], dtype=np.int64), names


@dataclass
class InteractionLog:
    """Validated interaction rows, with ads already mapped onto catalog rows.

    Strings are kept as numpy object arrays; `ad` holds catalog row numbers.
    """

    user: np.ndarray  # str user ids
    ad: np.ndarray  # int64 catalog rows
    timestamp: np.ndarray  # int64 seconds (or any monotone clock)
    event: np.ndarray  # int8 Event values
    merchant: np.ndarray | None = None  # str
    region: np.ndarray | None = None  # str
    source: str = "<memory>"
    rejected: list[str] = field(default_factory=list)  # human-readable reasons, one per rejected row
    warnings: list[ValidationNotice] = field(default_factory=list)  # accepted but suspicious rows, by kind

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("ad", "timestamp", "event", "merchant", "region"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise DataValidationError(self.source, None, name, f"has {len(column)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, rows: np.ndarray) -> InteractionLog:
        return InteractionLog(
            user=self.user[rows],
            ad=self.ad[rows],
            timestamp=self.timestamp[rows],
            event=self.event[rows],
            merchant=None if self.merchant is None else self.merchant[rows],
            region=None if self.region is None else self.region[rows],
            source=self.source,
            rejected=list(self.rejected),
            warnings=list(self.warnings),
        )

    def summary(self) -> dict[str, Any]:
        events = Counter(Event(int(e)).name.lower() for e in self.event)
        return {
            "rows": len(self),
            "users": int(len(np.unique(self.user))) if len(self) else 0,
            "ads": int(len(np.unique(self.ad))) if len(self) else 0,
            "events": dict(sorted(events.items())),
            "first_timestamp": int(self.timestamp.min()) if len(self) else None,
            "last_timestamp": int(self.timestamp.max()) if len(self) else None,
            "rows_rejected": len(self.rejected),
        }


@dataclass
class Dataset:
    """A catalog plus the logs mapped onto it."""

    name: str
    catalog: AdCatalog
    log: InteractionLog
