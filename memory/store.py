"""The durable log: SQLite in WAL mode, one row and one transaction per stored batch.

Why a row per batch (a segment) rather than per transition: the arrays go in as a handful of
blobs, so a 4096-transition batch is one small write, and reloading a million transitions is a
few hundred reads. The writer's idempotency key is written in the same transaction as the
segment, so a batch is either stored and remembered, or neither. ``synchronous=NORMAL`` in WAL
mode survives a killed process (``kill -9``) without losing a commit; only a power cut can lose
the last few.

Eviction deletes a segment once all of its rows have left the ring; a partly evicted segment
stays and reloading cuts it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory.errors import Conflict
from memory.transitions import Transitions

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    embedding_dim INTEGER,
    capacity INTEGER NOT NULL,
    priority_alpha REAL NOT NULL,
    next_id INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    collection TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    obs BLOB NOT NULL,
    actions BLOB NOT NULL,
    rewards BLOB NOT NULL,
    next_obs BLOB NOT NULL,
    dones BLOB NOT NULL,
    embeddings BLOB,
    episode_returns BLOB,
    PRIMARY KEY (collection, first_id)
);
"""
# The latest idempotency key of each writer in each collection (see WriteKey).
WRITERS = """
CREATE TABLE IF NOT EXISTS writers (
    client_id TEXT NOT NULL,
    collection TEXT NOT NULL,
    seq INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (client_id, collection)
)
"""


@dataclass(frozen=True)
class CollectionRow:
    name: str
    dim: int
    embedding_dim: int | None
    capacity: int
    priority_alpha: float
    next_id: int
    created_at: float


@dataclass(frozen=True)
class WriteKey:
    """An idempotency key, scoped per collection: the sequence numbers one client sends to one
    collection increase with every batch.

    The log keeps each (client, collection)'s latest key. That key again, to the same collection,
    is a retry of a batch whose answer was lost: acknowledged as a duplicate, not stored again. A
    lower one, or the key a client last used in another collection, cannot be a retry (a client
    re-sends its latest batch until it is acknowledged): refused (409), never dropped silently.
    """

    client_id: str
    seq: int


@dataclass(frozen=True)
class PreviousWrite:
    """What a key already stored: a retried batch is answered with this instead of stored again."""

    collection: str
    first_id: int
    count: int


class Log:
    """The SQLite file under the data directory; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit, so one batch is exactly one transaction.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        # Large pages: a batch is a few big blobs, and 64 KiB pages halve the cost of writing them.
        # (Only takes effect on a new file, before WAL mode is set.)
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.execute(WRITERS)
        self._scope_writers_per_collection()
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(segments)")}
        if "episode_returns" not in columns:  # a data directory from before the column existed
            self._db.execute("ALTER TABLE segments ADD COLUMN episode_returns BLOB")

    def _scope_writers_per_collection(self) -> None:
        """A data directory from before keys were scoped per collection had one ``writers`` row
        per client (keyed by client id alone): move those rows to the (client, collection) table."""
        keys = [row[1] for row in self._db.execute("PRAGMA table_info(writers)") if row[5] > 0]
        if keys != ["client_id"]:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("ALTER TABLE writers RENAME TO writers_per_client")
            self._db.execute(WRITERS)
            self._db.execute(
                "INSERT INTO writers (client_id, collection, seq, first_id, count)"
                " SELECT client_id, collection, seq, first_id, count FROM writers_per_client"
            )
            self._db.execute("DROP TABLE writers_per_client")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def collections(self) -> list[CollectionRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, dim, embedding_dim, capacity, priority_alpha, next_id, created_at"
                " FROM collections ORDER BY name"
            ).fetchall()
        return [CollectionRow(*row) for row in rows]

    def create_collection(self, row: CollectionRow) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO collections VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.name,
                    row.dim,
                    row.embedding_dim,
                    row.capacity,
                    row.priority_alpha,
                    row.next_id,
                    row.created_at,
                ),
            )

    def append(
        self,
        collection: str,
        first_id: int,
        batch: Transitions,
        capacity: int,
        key: WriteKey | None,
    ) -> PreviousWrite | None:
        """Store a batch in one transaction; for a ``key`` seen before, store nothing, say so."""
        next_id = first_id + batch.rows
        evict_below = next_id - capacity
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if key is not None:
                    previous = self._previous_write(key, collection)
                    if previous is not None:
                        self._db.execute("ROLLBACK")
                        return previous
                    self._db.execute(
                        "INSERT INTO writers (client_id, collection, seq, first_id, count)"
                        " VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT(client_id, collection) DO UPDATE"
                        " SET seq = excluded.seq, first_id = excluded.first_id,"
                        " count = excluded.count",
                        (key.client_id, collection, key.seq, first_id, batch.rows),
                    )
                self._db.execute(
                    "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        collection,
                        first_id,
                        batch.rows,
                        batch.obs.tobytes(),
                        batch.actions.tobytes(),
                        batch.rewards.tobytes(),
                        batch.next_obs.tobytes(),
                        batch.dones.tobytes(),
                        None if batch.embeddings is None else batch.embeddings.tobytes(),
                        None
                        if batch.episode_returns is None
                        else batch.episode_returns.tobytes(),
                    ),
                )
                self._db.execute(
                    "UPDATE collections SET next_id = ? WHERE name = ?", (next_id, collection)
                )
                if evict_below > 0:
                    self._db.execute(
                        "DELETE FROM segments"
                        " WHERE collection = ? AND first_id < ? AND first_id + count <= ?",
                        (collection, evict_below, evict_below),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None

    def _previous_write(self, key: WriteKey, collection: str) -> PreviousWrite | None:
        """What ``key`` stored in ``collection`` if it is a retry; None if it is new; Conflict
        (rolled back by the caller) if it cannot be either. Runs inside the batch's transaction."""
        latest = {
            name: (seq, first_id, count)
            for name, seq, first_id, count in self._db.execute(
                "SELECT collection, seq, first_id, count FROM writers WHERE client_id = ?",
                (key.client_id,),
            )
        }
        here = latest.get(collection)
        if here is not None and key.seq == here[0]:
            return PreviousWrite(collection, here[1], here[2])
        if here is not None and key.seq < here[0]:
            raise Conflict(
                f"idempotency key {key.client_id}:{key.seq}: client {key.client_id!r} already "
                f"stored sequence number {here[0]} in collection {collection!r}; a lower one "
                "cannot be a retry (a retry re-sends the latest batch). Nothing stored: use a new "
                "client id for a new writer, or continue its sequence"
            )
        elsewhere = sorted(name for name, seen in latest.items() if seen[0] == key.seq)
        if elsewhere:  # not this collection: its latest sequence number is lower
            raise Conflict(
                f"idempotency key {key.client_id}:{key.seq} already stored a batch in collection "
                f"{elsewhere[0]!r}, so it cannot be a retry of a batch for {collection!r}. Nothing "
                "stored: give every batch its own key"
            )
        return None

    def segments(self, row: CollectionRow) -> Iterator[tuple[int, Transitions]]:
        """The stored batches still (partly) in a collection's window, oldest first."""
        window_start = row.next_id - row.capacity
        with self._lock:
            found = self._db.execute(
                "SELECT first_id, count, obs, actions, rewards, next_obs, dones, embeddings,"
                " episode_returns"
                " FROM segments WHERE collection = ? AND first_id + count > ? ORDER BY first_id",
                (row.name, window_start),
            )
            for first_id, count, obs, actions, rewards, next_obs, dones, embeddings, returns in found:
                yield (
                    first_id,
                    Transitions(
                        obs=np.frombuffer(obs, np.float32).reshape(count, row.dim),
                        actions=np.frombuffer(actions, np.int64),
                        rewards=np.frombuffer(rewards, np.float32),
                        next_obs=np.frombuffer(next_obs, np.float32).reshape(count, row.dim),
                        dones=np.frombuffer(dones, np.float32),
                        embeddings=(
                            None
                            if embeddings is None
                            else np.frombuffer(embeddings, np.float32).reshape(
                                count, row.embedding_dim or 0
                            )
                        ),
                        episode_returns=(
                            None if returns is None else np.frombuffer(returns, np.float32)
                        ),
                    ),
                )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
            segments = self._db.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        return {
            "path": str(self.path),
            "segments": segments,
            "db_bytes": pages * page_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }
