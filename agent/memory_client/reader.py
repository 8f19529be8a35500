"""The Memory client's read path: replay sampling with prefetch, similarity search, priorities.

Every read runs on one reader thread with its own synchronous httpx client, so a learner that
does not yield to an event loop for long stretches still gets its next replay batch prefetched
while it works on the current one. Reads are a hint, never a stall: a failure, a refusal or an
open circuit breaker gives ``None`` (counted), and priority updates are fire-and-forget.

Each read operation is a generator of :mod:`~agent.memory_client.steps` (``*_steps``), so the
client's blocking and async methods share one body. With a ``seed``, a sample request carries a
seed from the reader's generator and the count of rows this client had queued, both taken in the
learner's call order (:meth:`Reader._submit_sample`), never on the reader thread: replay is
reproducible however the writes and requests were timed, and whichever API the learner used.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from agent.memory_client.batches import (
    BATCH_FIELDS,
    ReplayBatch,
    SimilarExperiences,
    as_numpy,
    batch_from,
)
from agent.memory_client.breaker import CircuitBreaker
from agent.memory_client.stats import Counters, LatencyWindow
from agent.memory_client.steps import Blocking, Steps
from agent.memory_client.writer import Writer
from memory import wire

log = logging.getLogger(__name__)

MAX_PRIORITY_UPDATES_IN_FLIGHT = 8
MAX_QUERIES = 4096  # query states per search request (memory.settings.Settings.max_queries)

# What a prefetched sample was asked for: (batch_size, prioritized, beta).
SampleKey = tuple[int, bool, float]


class Reader:
    """Runs reads on the reader thread and keeps the prefetched replay batches.

    ``http`` is used on the reader thread only (and closed by :meth:`stop`); ``writer`` is asked
    for this client's row ledger, so that reads can see this client's own writes.
    """

    def __init__(
        self,
        *,
        http: httpx.Client,
        writer: Writer,
        breaker: CircuitBreaker,
        latency: LatencyWindow,
        counters: Counters,
        collection: str,
        read_timeout: float,
        prefetch: bool,
        prefetch_batches: int,
        seed: int | None,
    ) -> None:
        self.http = http
        self.collection = collection
        self.read_timeout = read_timeout
        self.prefetch = prefetch
        self.prefetch_batches = prefetch_batches
        self._writer = writer
        self._breaker = breaker
        self._latency = latency
        self._counters = counters
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-reader")
        # Prefetched replay batches for the latest (batch_size, prioritized, beta) asked for.
        self._ready_key: SampleKey | None = None
        self._ready: deque[ReplayBatch] = deque()
        self._in_flight: Future[list[ReplayBatch] | None] | None = None
        self._priority_lock = threading.Lock()
        self._priority_updates_in_flight = 0
        self.sample_rng = None if seed is None else np.random.default_rng(seed)
        self.closed = False

    def stop(self) -> None:
        """Refuse new reads, finish the one running, drop the queued ones, close the connection."""
        self.closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    # ------------------------------------------------------------- on the reader thread
    def read(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request on the reader thread; None (and a breaker failure) if the service failed."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self._breaker.failure()
            self._counters.add("read_failures")
            log.debug("read %s failed: %s", path, exc)
            return None
        self._latency.record("read", response.elapsed.total_seconds())
        if response.status_code >= 500:
            self._breaker.failure()
            self._counters.add("read_failures")
            return None
        self._breaker.success()
        return response

    def arrays(
        self, response: httpx.Response | None, what: str, fields: tuple[str, ...]
    ) -> dict[str, np.ndarray] | None:
        """The arrays of a binary answer; None (logged) for a refusal or an unreadable answer.

        404 (no collection yet) and 409 (nothing stored yet) are normal early in a run."""
        if response is None:
            return None
        if response.status_code != 200:
            if response.status_code not in (404, 409):
                log.warning(
                    "%s refused: HTTP %d %s", what, response.status_code, response.text[:300]
                )
            return None
        try:
            arrays, _ = wire.decode(response.content, writable=True)
            if missing := [name for name in fields if name not in arrays]:
                raise wire.WireError(f"missing arrays {missing}")
        except wire.WireError as exc:
            self._counters.add("read_failures")
            log.warning("%s: unreadable answer (%s)", what, exc)
            return None
        return arrays

    def _sample(
        self,
        key: SampleKey,
        batches: int,
        seed: int | None = None,
        rows: int | None = None,
    ) -> list[ReplayBatch] | None:
        batch_size, prioritized, beta = key
        if self._breaker.is_open:
            return None
        params: dict[str, Any] = {
            "batch_size": batch_size,
            "prioritized": prioritized,
            "beta": beta,
            "batches": batches,
        }
        if seed is not None:
            params["seed"] = seed
        if rows:  # draw from what this client had queued by then, once the service holds it
            if not self._writer.deliver_rows(rows, self.read_timeout):
                log.debug("sampling before this client's first %d rows reached the service", rows)
            end_id = self._writer.end_id(rows)
            if end_id is not None:
                params["end_id"] = end_id
        response = self.read(
            "GET",
            f"/v1/collections/{self.collection}/sample",
            params=params,
            headers={"accept": wire.CONTENT_TYPE},
        )
        arrays = self.arrays(response, "sample", BATCH_FIELDS)
        if arrays is None:
            return None
        return [
            batch_from(
                {
                    name: value[i * batch_size : (i + 1) * batch_size]
                    for name, value in arrays.items()
                }
            )
            for i in range(batches)
        ]

    def _search(self, states: np.ndarray, k: int) -> SimilarExperiences | None:
        """One request per ``MAX_QUERIES`` states (the service's default limit), joined."""
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(states), MAX_QUERIES):
            if self._breaker.is_open:
                return None
            response = self.read(
                "POST",
                f"/v1/collections/{self.collection}/search",
                params={"k": k},
                content=wire.encode({"states": states[start : start + MAX_QUERIES]}),
                headers={"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE},
            )
            fields = ("distances", "query_index", *BATCH_FIELDS[:-1])
            arrays = self.arrays(response, "search", fields)
            if arrays is None:
                return None
            arrays["query_index"] = arrays["query_index"] + start
            parts.append(arrays)
        arrays = parts[0] if len(parts) == 1 else {
            name: np.concatenate([part[name] for part in parts]) for name in parts[0]
        }
        if len(arrays["ids"]) == 0:
            return None
        return SimilarExperiences(batch_from(arrays), arrays["distances"], arrays["query_index"])

    # ---------------------------------------------------------- on the learner's thread
    def health_steps(self) -> Steps[bool]:
        """True if the service answers; False at once while the breaker is open (until a probe)."""
        if self.closed or not self._breaker.may_probe():
            return False
        response: httpx.Response | None = yield self._executor.submit(
            self.read, "GET", "/v1/health"
        )
        return response is not None and response.status_code == 200

    def _submit_sample(self, key: SampleKey, batches: int) -> Future[list[ReplayBatch] | None]:
        """Queue a sample request on the reader thread; a seeded client draws its seed and notes
        its row bound here, in the learner's order, so they do not depend on timing."""
        seed = rows = None
        if self.sample_rng is not None:
            seed, rows = int(self.sample_rng.integers(2**63 - 1)), self._writer.rows_in
        return self._executor.submit(self._sample, key, batches, seed, rows)

    def sample_steps(
        self, batch_size: int, prioritized: bool, beta: float
    ) -> Steps[ReplayBatch | None]:
        """A replay batch from the service; None when it is unavailable or the collection is empty.

        With ``prefetch`` on, batches come ``prefetch_batches`` per request, and the next request
        goes out while the learner works through the current ones. Only the wait for a request
        not yet answered is yielded; the bookkeeping (and a seeded client's seed draws) happens
        on the caller's thread, in call order.
        """
        if batch_size < 1 or not 0.0 <= beta <= 1.0:
            raise ValueError(
                f"batch_size must be >= 1 and beta in [0, 1], got {batch_size}, {beta}"
            )
        if self.closed or self._breaker.is_open:
            self._counters.add("reads_skipped")
            self._ready.clear()
            self._in_flight = None
            return None
        key = (batch_size, prioritized, beta)
        per_request = (
            max(1, min(self.prefetch_batches, 65_536 // batch_size)) if self.prefetch else 1
        )
        if key != self._ready_key:
            self._ready_key, self._in_flight = key, None
            self._ready.clear()
        if not self._ready:
            if self._in_flight is None:
                self._in_flight = self._submit_sample(key, per_request)
            else:
                self._counters.add("prefetch_hits")
            batches: list[ReplayBatch] | None = yield self._in_flight
            self._in_flight = None
            if not batches:
                return None
            self._ready.extend(batches)
        elif self._in_flight is not None and self._in_flight.done():
            self._ready.extend(self._in_flight.result() or [])
            self._in_flight = None
            self._counters.add("prefetch_hits")
        else:
            self._counters.add("prefetch_hits")
        batch = self._ready.popleft()
        if (
            self.prefetch
            and self._in_flight is None
            and len(self._ready) < per_request
            and not self.closed
        ):
            self._in_flight = self._submit_sample(key, per_request)
        return batch

    def search_steps(
        self, states: Any, k: int, read_own_writes: bool
    ) -> Steps[SimilarExperiences | None]:
        """The k stored transitions nearest to each state ([D] or [Q, D]); None if unavailable.

        ``read_own_writes`` first waits (at most ``read_timeout``) until the rows this client
        queued before the call are settled, so the search sees them."""
        queries = np.asarray(as_numpy(states), dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or not np.isfinite(queries).all():
            raise ValueError(f"states must be finite, of shape [D] or [Q, D], got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.closed or self._breaker.is_open:
            self._counters.add("reads_skipped")
            return None
        if read_own_writes:
            queued = self._writer.rows_in  # not rows queued while waiting: a busy writer never ends
            delivered = yield Blocking(self._writer.deliver_rows, (queued, self.read_timeout))
            if not delivered:
                log.debug("searching before this client's queued writes reached the service")
        found: SimilarExperiences | None = yield self._executor.submit(self._search, queries, k)
        return found

    def send_priorities(self, ids: Any, priorities: Any) -> None:
        """Send new priorities for sampled ids without waiting for the answer.

        Priorities are a sampling hint: while the breaker is open, or if updates pile up faster
        than the service takes them, they are skipped (counted in ``priority_updates_skipped``).
        """
        ids_a = np.asarray(as_numpy(ids), dtype=np.int64).reshape(-1)
        values = np.asarray(as_numpy(priorities), dtype=np.float32).reshape(-1)
        if len(ids_a) != len(values):
            raise ValueError(f"{len(ids_a)} ids but {len(values)} priorities")
        with self._priority_lock:
            busy = self._priority_updates_in_flight >= MAX_PRIORITY_UPDATES_IN_FLIGHT
            if not busy:
                self._priority_updates_in_flight += 1
        if busy or self.closed or self._breaker.is_open:
            if not busy:
                self._priority_update_finished()
            self._counters.add("priority_updates_skipped")
            return
        body = wire.encode({"ids": ids_a, "priorities": values})
        future = self._executor.submit(
            self.read,
            "POST",
            f"/v1/collections/{self.collection}/priorities",
            content=body,
            headers={"content-type": wire.CONTENT_TYPE},
        )
        future.add_done_callback(self._priority_update_done)

    def _priority_update_finished(self) -> None:
        with self._priority_lock:
            self._priority_updates_in_flight -= 1

    def _priority_update_done(self, future: Future[httpx.Response | None]) -> None:
        self._priority_update_finished()
        failed = future.cancelled() or future.exception() is not None
        response = None if failed else future.result()
        if response is None or response.status_code != 200:
            self._counters.add("priority_updates_skipped")
