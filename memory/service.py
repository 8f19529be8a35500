"""The Memory service without HTTP: collections, each a durable log + a ring + a similarity index.

Every method runs on one thread (the server's event loop), so a batch is logged, then put in the
ring and the index, with nothing interleaved; only IVF builds run elsewhere (see
:mod:`memory.index`). The app turns the exceptions of :mod:`memory.errors` into 4xx answers.

Priorities for prioritized replay live in RAM only: they are a sampling heuristic that the
learner refreshes all the time, so after a restart every stored row starts at the maximum
priority, as a newly stored row does. A priority update is any finite value >= 0; it is clipped to
[PRIORITY_MIN, PRIORITY_MAX] = [1e-6, 1e6] before the alpha power, so that every row keeps a
chance to be drawn, the sum tree's total (at most capacity x 1e6) stays finite, and so do the
importance weights served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from memory.errors import Conflict, InsufficientStorage, InvalidInput, NotFound
from memory.index import SimilarityIndex
from memory.ring import Ring
from memory.settings import Settings
from memory.store import CollectionRow, Log, WriteKey
from memory.sumtree import SumTree
from memory.transitions import Transitions, float_matrix, validate_batch

log = logging.getLogger(__name__)

EVICTION = "fifo: once size reaches capacity, each new transition replaces the oldest one"
PRIORITY_MIN = 1e-6
"""Smallest priority a row can have (a priority of 0 is stored as this)."""
PRIORITY_MAX = 1e6
"""Largest priority a row can have (bigger ones are clipped to this)."""


def reserved_bytes(capacity: int, dim: int, embedding_dim: int | None, exact_max: int) -> int:
    """RAM a collection holds once full, what the memory budget counts: its ring's arrays, the
    sum tree over them, and, if it can outgrow the exact scan, the IVF index's copy of its search
    vectors (4 bytes a value, 8 per id). Arrays grow lazily, but reserving the full size up front is
    what lets the service refuse at create time rather than run out of memory later."""
    leaves = 1 << max(capacity - 1, 0).bit_length()  # the sum tree's: a power of two
    ring = capacity * Ring.row_bytes(dim, embedding_dim)
    tree = 2 * leaves * np.dtype(np.float64).itemsize
    index = capacity * (4 * (embedding_dim or dim) + 8) if capacity > exact_max else 0
    return ring + tree + index


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class StoreResult:
    collection: str
    first_id: int | None
    count: int | None
    duplicate: bool


class Collection:
    """One task's (or agent's) transitions: the ring it samples from and the index it searches."""

    def __init__(self, row: CollectionRow, settings: Settings, builder: ThreadPoolExecutor) -> None:
        self.row = row
        self.reserved_bytes = reserved_bytes(
            row.capacity, row.dim, row.embedding_dim, settings.exact_max
        )
        self.ring = Ring(row.capacity, row.dim, row.embedding_dim, first_id=row.next_id)
        self.priorities = SumTree(self.ring.allocated)
        self.max_priority = 1.0
        self.index = SimilarityIndex(
            exact_max=settings.exact_max,
            nprobe=settings.nprobe,
            builder=builder,
            seed=settings.seed or 0,
        )
        self.counters = {"stored": 0, "sampled": 0, "searched": 0, "priority_updates": 0}

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def vector_dim(self) -> int:
        return self.row.embedding_dim or self.row.dim

    def load(self, segments: Iterable[tuple[int, Transitions]]) -> None:
        """Refill the ring from the log's segments (oldest first), then index them in one go."""
        window_start = self.row.next_id - self.row.capacity
        for first_id, batch in segments:
            if self.ring.size == 0:
                start = max(window_start, first_id)
                self.ring = Ring(
                    self.row.capacity, self.row.dim, self.row.embedding_dim, first_id=start
                )
            cut = max(window_start - first_id, 0)
            self._put(batch.tail(cut) if cut else batch)
        if self.ring.next_id != self.row.next_id:
            log.error(
                "collection %s: log ends at id %d but the ring at %d",
                self.name,
                self.row.next_id,
                self.ring.next_id,
            )
        self.index.maybe_rebuild(self.ring)

    def _put(self, batch: Transitions) -> tuple[int, np.ndarray]:
        first_id, slots = self.ring.append(batch)
        if self.ring.allocated > self.priorities.size:
            self.priorities.grow(self.ring.allocated)
        if batch.priorities is None:
            raw = np.full(len(slots), self.max_priority)
        else:  # an actor's own estimates; NaN rows get the maximum (this batch's included)
            given = batch.priorities[len(batch.priorities) - len(slots) :].astype(np.float64)
            known = ~np.isnan(given)
            raw = np.clip(given, PRIORITY_MIN, PRIORITY_MAX)
            if known.any():
                self.max_priority = max(self.max_priority, float(raw[known].max()))
            raw[~known] = self.max_priority
        self.priorities.set(slots, raw**self.row.priority_alpha)
        return first_id, slots

    def append(self, batch: Transitions) -> int:
        first_id, slots = self._put(batch)
        vectors = batch.embeddings if batch.embeddings is not None else batch.obs
        self.index.added(self.ring, self.ring.ids[slots], vectors[len(vectors) - len(slots) :])
        self.counters["stored"] += batch.rows
        return first_id

    def sample(
        self,
        batch_size: int,
        prioritized: bool,
        beta: float,
        rng: np.random.Generator,
        batches: int = 1,
        end_id: int | None = None,
    ) -> dict[str, np.ndarray]:
        """``batches`` replay batches back to back, drawn with replacement.

        Several batches per request let a client prefetch without paying a round trip per
        batch. Prioritized draws are stratified within each batch and their importance weights
        normalised by that batch's largest weight; uniform draws have weight 1.

        ``end_id`` draws only from the rows stored before it (those that were live when the
        collection's ``next_id`` was ``end_id``), so that, with a seeded ``rng``, the same request
        gives the same rows however many have been stored since: a client's replay is then
        reproducible although its writes arrive asynchronously.
        """
        size = self.ring.size
        if size == 0:
            raise Conflict(f"collection {self.name!r} is empty: store transitions before sampling")
        rows = batch_size * batches
        if end_id is not None:
            return self._sample_before(end_id, batch_size, batches, prioritized, beta, rng)
        if prioritized:
            total = self.priorities.total
            strata = np.tile(np.arange(batch_size), batches)
            targets = (strata + rng.random(rows)) * (total / batch_size)
            slots = self.priorities.find(targets, used=size)
            probabilities = self.priorities.get(slots) / total
            weights = self._weights(size * probabilities, beta, batches)
        else:
            slots = rng.integers(0, size, rows)
            weights = np.ones(rows, dtype=np.float32)
        self.counters["sampled"] += batches
        return {**self.ring.gather(slots), "weights": weights}

    def _sample_before(
        self,
        end_id: int,
        batch_size: int,
        batches: int,
        prioritized: bool,
        beta: float,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """:meth:`sample` from the ids [end_id - capacity, end_id) that are still stored."""
        ring = self.ring
        if end_id > ring.next_id:
            raise Conflict(
                f"end_id {end_id}: collection {self.name!r} holds ids below {ring.next_id} only"
            )
        low = max(ring.oldest_id, end_id - ring.capacity)
        window = end_id - low
        if window <= 0:
            raise Conflict(f"end_id {end_id}: every row below it was evicted (oldest id {low})")
        rows = batch_size * batches
        if not prioritized:
            slots = ring.slots(low + rng.integers(0, window, rows))
            self.counters["sampled"] += batches
            return {**ring.gather(slots), "weights": np.ones(rows, dtype=np.float32)}
        # The window's slots: one run, or two where it wraps round the end of the ring.
        start = int(ring.slots(np.asarray([low]))[0])
        runs = [(start, min(start + window, ring.capacity))]
        if start + window > ring.capacity:
            runs.append((0, start + window - ring.capacity))
        bounds = self.priorities.prefix(np.asarray([b for run in runs for b in run]))
        sums = bounds[1::2] - bounds[0::2]
        total = float(sums.sum())
        strata = np.tile(np.arange(batch_size), batches)
        targets = (strata + rng.random(rows)) * (total / batch_size)
        second = (targets >= sums[0]) & (len(runs) > 1)
        offsets = np.where(second, bounds[-2] - sums[0], bounds[0])
        slots = self.priorities.find(targets + offsets, used=ring.size)
        low_slot = np.where(second, runs[-1][0], runs[0][0])
        high_slot = np.where(second, runs[-1][1], runs[0][1]) - 1
        slots = np.clip(slots, low_slot, high_slot)  # rounding at a run's edge
        probabilities = self.priorities.get(slots) / total
        weights = self._weights(window * probabilities, beta, batches)
        self.counters["sampled"] += batches
        return {**ring.gather(slots), "weights": weights}

    def _weights(self, scaled: np.ndarray, beta: float, batches: int) -> np.ndarray:
        """Importance weights (N * P(i)) ** -beta, normalised by each batch's largest.

        Bounded priorities keep them finite; should they ever not be, the request fails (500)
        rather than hand the learner a NaN it would train on silently.
        """
        raw = (scaled**-beta).reshape(batches, -1)
        weights = (raw / raw.max(axis=1, keepdims=True)).astype(np.float32).reshape(-1)
        if not np.isfinite(weights).all():
            raise RuntimeError(
                f"collection {self.name!r}: non-finite importance weights (sum-tree total "
                f"{self.priorities.total!r}); refusing to serve them"
            )
        return weights

    def read(self, first_id: int, limit: int) -> dict[str, np.ndarray]:
        """Up to ``limit`` stored rows in id order from ``first_id`` (or the oldest stored)."""
        start = max(first_id, self.ring.oldest_id)
        stop = min(start + limit, self.ring.next_id)
        ids = np.arange(start, max(start, stop), dtype=np.int64)
        return self.ring.gather(self.ring.slots(ids))

    def update_priorities(self, ids: np.ndarray, priorities: np.ndarray) -> dict[str, int]:
        """New priorities (e.g. |TD error|) by id; ids evicted since sampling are skipped.

        Each is clipped to [PRIORITY_MIN, PRIORITY_MAX] before the alpha power (see the module
        docstring)."""
        if ids.ndim != 1 or priorities.ndim != 1 or len(ids) != len(priorities):
            raise InvalidInput(
                f"ids and priorities must be 1-D and of equal length, got shapes "
                f"{list(ids.shape)} and {list(priorities.shape)}"
            )
        if len(ids) == 0:  # nothing to update (JSON's [] has no integer dtype to check)
            return {"updated": 0, "evicted": 0}
        if ids.dtype.kind not in "iu":
            raise InvalidInput(f"ids: dtype must be an integer type, got {ids.dtype}")
        if priorities.dtype.kind != "f":
            raise InvalidInput(f"priorities: dtype must be a float type, got {priorities.dtype}")
        priorities = priorities.astype(np.float64)
        if not (np.isfinite(priorities).all() and (priorities >= 0).all()):
            raise InvalidInput("priorities: every value must be finite and >= 0")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.ring.next_id):
            raise InvalidInput(
                f"ids: every id must be in [0, {self.ring.next_id}) (ids issued so far)"
            )
        ids = ids.astype(np.int64)
        live = self.ring.live(ids)
        raw = np.clip(priorities[live], PRIORITY_MIN, PRIORITY_MAX)
        if len(raw):
            self.max_priority = max(self.max_priority, float(raw.max()))
            self.priorities.set(self.ring.slots(ids[live]), raw**self.row.priority_alpha)
        self.counters["priority_updates"] += int(live.sum())
        return {"updated": int(live.sum()), "evicted": int((~live).sum())}

    def search(self, states: np.ndarray, k: int, max_queries: int) -> dict[str, np.ndarray]:
        """The k nearest stored rows to each query, flattened to Q*k rows (fewer if size < k)."""
        if states.ndim == 1:
            states = states[None, :]
        queries = float_matrix("states", states, None, self.vector_dim)
        if not 1 <= len(queries) <= max_queries:
            raise InvalidInput(
                f"states: 1 to {max_queries} query states per search, got {len(queries)}"
            )
        ids, distances = self.index.search(self.ring, np.ascontiguousarray(queries), k)
        found = ids >= 0
        query_index = np.broadcast_to(np.arange(len(queries))[:, None], ids.shape)[found]
        hit_ids = ids[found]
        self.counters["searched"] += len(queries)
        return {
            **self.ring.gather(self.ring.slots(hit_ids)),
            "distances": distances[found].astype(np.float32),
            "query_index": query_index.astype(np.int64),
        }

    @property
    def allocated_bytes(self) -> int:
        """What the ring and sum tree hold now (they grow towards ``reserved_bytes``)."""
        arrays = [getattr(self.ring, name) for name in Ring.layout(1, self.row.embedding_dim)]
        return sum(a.nbytes for a in arrays) + self.priorities.nbytes

    def describe(self) -> dict[str, Any]:
        self.index.poll(self.ring)
        return {
            "name": self.name,
            "dim": self.row.dim,
            "embedding_dim": self.row.embedding_dim,
            "capacity": self.row.capacity,
            "eviction": EVICTION,
            "priority_alpha": self.row.priority_alpha,
            "size": self.ring.size,
            "next_id": self.ring.next_id,
            "oldest_id": self.ring.oldest_id,
            "created_at": self.row.created_at,
            "search": {
                "vector": "embeddings" if self.row.embedding_dim else "obs",
                "metric": "euclidean",
                "index": self.index.kind,
            },
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.describe(),
            **self.counters,
            "reserved_bytes": self.reserved_bytes,
            "allocated_bytes": self.allocated_bytes,
            "max_priority": self.max_priority,
            "index": self.index.stats(),
        }


class MemoryService:
    """All collections of one data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = time.time()
        faiss.omp_set_num_threads(settings.faiss_threads)
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivf-build")
        self.rng = np.random.default_rng(settings.seed)
        self.log = Log(settings.db_path)
        self.collections: dict[str, Collection] = {}
        started = time.perf_counter()
        for row in self.log.collections():
            collection = Collection(row, settings, self._builder)
            collection.load(self.log.segments(row))
            self.collections[row.name] = collection
        log.info(
            "loaded %d collections (%d transitions) from %s in %.2fs",
            len(self.collections),
            sum(c.ring.size for c in self.collections.values()),
            settings.db_path,
            time.perf_counter() - started,
        )
        if self.reserved_bytes > settings.max_memory_bytes:
            log.warning(
                "the stored collections reserve %s, beyond the memory budget of %s: "
                "new collections will be refused until the budget is raised",
                _mib(self.reserved_bytes),
                _mib(settings.max_memory_bytes),
            )

    @property
    def reserved_bytes(self) -> int:
        """What all collections reserve together (see :func:`reserved_bytes`)."""
        return sum(c.reserved_bytes for c in self.collections.values())

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)
        self.log.close()

    def get(self, name: str) -> Collection:
        try:
            return self.collections[name]
        except KeyError:
            raise NotFound(
                f"unknown collection {name!r}; create it with POST /v1/collections"
            ) from None

    def create(
        self,
        name: str,
        dim: int,
        capacity: int | None,
        embedding_dim: int | None,
        priority_alpha: float,
    ) -> tuple[Collection, bool]:
        """The collection and whether it is new; asking again with the same settings is fine."""
        capacity = capacity or self.settings.default_capacity
        if capacity > self.settings.max_capacity:
            raise InvalidInput(f"capacity: at most {self.settings.max_capacity}, got {capacity}")
        existing = self.collections.get(name)
        if existing is not None:
            wanted = (dim, capacity, embedding_dim, priority_alpha)
            have = (
                existing.row.dim,
                existing.row.capacity,
                existing.row.embedding_dim,
                existing.row.priority_alpha,
            )
            if wanted != have:
                raise Conflict(
                    f"collection {name!r} exists with dim={have[0]}, capacity={have[1]}, "
                    f"embedding_dim={have[2]}, priority_alpha={have[3]}"
                )
            return existing, False
        if len(self.collections) >= self.settings.max_collections:
            raise Conflict(
                f"this service already holds its limit of "
                f"{self.settings.max_collections} collections"
            )
        need = reserved_bytes(capacity, dim, embedding_dim, self.settings.exact_max)
        used, budget = self.reserved_bytes, self.settings.max_memory_bytes
        if used + need > budget:
            raise InsufficientStorage(
                f"collection {name!r} (capacity={capacity}, dim={dim}, "
                f"embedding_dim={embedding_dim}) would reserve {_mib(need)} of RAM, but only "
                f"{_mib(max(budget - used, 0))} of the service's memory budget of {_mib(budget)} "
                f"is left ({len(self.collections)} collections reserve {_mib(used)}): ask for a "
                "smaller capacity, or start the service with a larger --max-memory-mb"
            )
        row = CollectionRow(name, dim, embedding_dim, capacity, priority_alpha, 0, time.time())
        self.log.create_collection(row)
        collection = Collection(row, self.settings, self._builder)
        self.collections[name] = collection
        log.info("created collection %s (dim=%d, capacity=%d)", name, dim, capacity)
        return collection, True

    def store(self, name: str, arrays: dict[str, np.ndarray], key: WriteKey | None) -> StoreResult:
        """Validate, log (one transaction), then make the batch visible to sampling and search."""
        collection = self.get(name)
        batch = validate_batch(
            arrays,
            dim=collection.row.dim,
            embedding_dim=collection.row.embedding_dim,
            max_rows=self.settings.max_batch_rows,
        )
        first_id = collection.ring.next_id
        previous = self.log.append(name, first_id, batch, collection.row.capacity, key)
        if previous is not None:
            return StoreResult(
                previous.collection, previous.first_id, previous.count, duplicate=True
            )
        collection.append(batch)
        return StoreResult(name, first_id, batch.rows, duplicate=False)

    def stats(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "memory": {
                "budget_bytes": self.settings.max_memory_bytes,
                "reserved_bytes": self.reserved_bytes,
                "available_bytes": max(self.settings.max_memory_bytes - self.reserved_bytes, 0),
                "allocated_bytes": sum(c.allocated_bytes for c in self.collections.values()),
            },
            "collections": {name: c.stats() for name, c in self.collections.items()},
            "log": self.log.stats(),
        }
