"""The Memory client's bounded on-disk queue of encoded write batches.

Writes must survive a service outage and a killed learner without holding rows in memory, so
each batch is a file until the service acknowledges it. Only the writer path uses it; it knows
nothing of HTTP (the wire format is read just to count a file's rows).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from memory import wire

log = logging.getLogger(__name__)

OUTBOX_SUFFIX = ".mwb"


@dataclass(frozen=True)
class OutboxEntry:
    """One batch file waiting in the outbox."""

    path: Path
    nbytes: int
    rows: int


class Outbox:
    """Encoded batches waiting for the service: one file each, delivered and deleted oldest first.

    Files are written whole under a temporary name and renamed, so a crash never leaves half a
    batch; a client started on the same directory delivers what a previous one left (each file
    carries its own idempotency key, so nothing is stored twice). No fsync: this survives a killed
    process, not a power cut. Thread-safe.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: deque[OutboxEntry] = deque()
        self.bytes = 0
        self.rows = 0
        for stale in directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        for path in sorted(directory.glob(f"*{OUTBOX_SUFFIX}")):
            try:
                rows = int(wire.read_meta(path.read_bytes())["rows"])
            except (OSError, ValueError, KeyError, TypeError):
                log.error("outbox file %s is unreadable; moved aside", path)
                self._move_aside(path)
                continue
            self._add(OutboxEntry(path, path.stat().st_size, rows))
        self._next_number = int(self._pending[-1].path.stem) + 1 if self._pending else 0
        if self._pending:
            log.info(
                "outbox %s holds %d batches (%d rows) from an earlier client",
                directory,
                len(self._pending),
                self.rows,
            )

    def _add(self, entry: OutboxEntry) -> None:
        self._pending.append(entry)
        self.bytes += entry.nbytes
        self.rows += entry.rows

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, payload: bytes, rows: int) -> bool:
        """Keep a batch for delivery; False (nothing kept) if that would exceed ``max_bytes``."""
        with self._lock:
            if self.bytes + len(payload) > self.max_bytes:
                return False
            path = self.directory / f"{self._next_number:016d}{OUTBOX_SUFFIX}"
            self._next_number += 1
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(payload)
            temporary.replace(path)
            self._add(OutboxEntry(path, len(payload), rows))
            return True

    def peek(self) -> OutboxEntry | None:
        with self._lock:
            return self._pending[0] if self._pending else None

    def _remove(self, entry: OutboxEntry) -> None:
        with self._lock:
            if self._pending and self._pending[0] == entry:
                self._pending.popleft()
                self.bytes -= entry.nbytes
                self.rows -= entry.rows

    def delivered(self, entry: OutboxEntry) -> None:
        self._remove(entry)
        entry.path.unlink(missing_ok=True)

    def rejected(self, entry: OutboxEntry) -> None:
        """Move aside a batch the service refuses for good, so it cannot block the queue."""
        self._remove(entry)
        self._move_aside(entry.path)

    def _move_aside(self, path: Path) -> None:
        aside = self.directory / "rejected"
        aside.mkdir(exist_ok=True)
        path.replace(aside / path.name)
