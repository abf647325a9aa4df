"""The merchant's own log of what it served and how its users answered: append-only, exactly once.

Each delivery round appends one batch of rows (an impression for every ad shown and not clicked,
a click or a purchase for every one that was) to a CSV log in the project's table format
(user_id, ad_id, timestamp, event; docs/DATA.md), so every tool that reads a merchant's log reads
this one. A batch is identified by its name (e.g. "round-7"); a journal beside the log
(`<log>.batches`, one JSON line per committed batch: name, rows, byte offset of its end) is
written after the rows are on disk. So:
- a batch appended twice (a round replayed after a restart) is written once;
- a crash between the rows and the journal leaves rows no journal line covers: the next open
  cuts the log back to the last committed batch, and replaying the batch writes it whole;
- rows are fsynced before their journal line, the journal after it: a committed batch is on disk.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.data.schema import Event
from shared.storage import atomic_write_bytes

HEADER = ("user_id", "ad_id", "timestamp", "event")
JOURNAL_SUFFIX = ".batches"


@dataclass(frozen=True)
class LogRow:
    user_id: str
    ad_id: str
    timestamp: int
    event: Event


class DeliveryLogError(RuntimeError):
    pass


class DeliveryLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.journal_path = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self.batches: dict[str, int] = {}  # committed batch name -> its rows
        self._end = 0  # byte offset where the last committed batch ends
        self._open()

    def _open(self) -> None:
        if not self.path.exists():
            atomic_write_bytes(self.path, (",".join(HEADER) + "\n").encode())
        if self.journal_path.exists():
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    entry = json.loads(line)
                    self.batches[str(entry["batch"])] = int(entry["rows"])
                    self._end = int(entry["end"])
                except (ValueError, KeyError, TypeError) as exc:
                    # the journal is fsynced line by line: a torn last line is the only way to get here
                    # after a crash, and the rows it would have covered are cut away below
                    if number != len(lines):
                        raise DeliveryLogError(f"{self.journal_path}:{number}: not a journal line ({exc})") from None
                    atomic_write_bytes(self.journal_path, "".join(kept + "\n" for kept in lines[:-1]).encode())
        else:
            self._end = self.path.stat().st_size
            atomic_write_bytes(self.journal_path, b"")
        size = self.path.stat().st_size
        if size < self._end:
            raise DeliveryLogError(f"{self.path} is shorter ({size} bytes) than its journal's committed batches ({self._end} bytes)")
        if size > self._end:  # rows of a batch whose journal line never came: cut away, the batch will be replayed
            with self.path.open("r+b") as handle:
                handle.truncate(self._end)
                os.fsync(handle.fileno())

    def append(self, batch: str, rows: Iterable[LogRow]) -> int:
        """Append `rows` as batch `batch` unless it is already committed; the rows written (0 if it was)."""
        if batch in self.batches:
            return 0
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        count = 0
        for row in rows:
            writer.writerow([row.user_id, row.ad_id, int(row.timestamp), Event(row.event).name.lower()])
            count += 1
        data = buffer.getvalue().encode()
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        end = self._end + len(data)
        with self.journal_path.open("a", encoding="utf-8") as journal:
            journal.write(json.dumps({"batch": batch, "rows": count, "end": end}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        self.batches[batch] = count
        self._end = end
        return count
