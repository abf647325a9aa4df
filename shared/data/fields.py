"""Parsing and assembling log rows: every field validated, every ad mapped onto the catalog.

Rows that reference an ad outside the catalog are an error by default (`strict=True`); with
`strict=False` they are rejected with a reason kept in `InteractionLog.rejected` and a warning
is logged, never silently dropped.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import numpy as np

from shared.data.schema import EVENT_NAMES, AdCatalog, DataValidationError, Event, InteractionLog

log = logging.getLogger(__name__)


def require_text(path: str, line: int, field_name: str, raw: object) -> str:
    if raw is None:
        raise DataValidationError(path, line, field_name, "is missing")
    text = str(raw).strip()
    if not text:
        raise DataValidationError(path, line, field_name, "is empty")
    return text


def parse_timestamp(path: str, line: int, raw: object) -> int:
    text = require_text(path, line, "timestamp", raw)
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
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def parse_event(path: str, line: int, raw: object) -> Event:
    if raw is None or str(raw).strip() == "":
        raise DataValidationError(path, line, "event", f"is empty; expected one of {', '.join(EVENT_NAMES)}")
    try:
        return Event.parse(str(raw))
    except KeyError:
        raise DataValidationError(path, line, "event", f"{raw!r} is not one of {', '.join(EVENT_NAMES)}") from None


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
