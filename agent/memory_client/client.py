"""MemoryClient: the learner's side of the Memory service, built to cost the training loop nothing.

Why threads and not asyncio tasks: the training loop is CPU-bound and may not yield to the event
loop for long stretches, so anything that must make progress on its own runs in a thread with its
own synchronous httpx client (socket I/O releases the GIL). The learner's calls only hand work to
those threads and wait for the result, so each comes twice, with one body
(:mod:`~agent.memory_client.steps`): blocking (``write_transitions``, ``sample_replay``,
``find_similar``, ``send_priorities``, ``deliver``, ``is_healthy``) for a loop without an event
loop, and async (``store_transitions``, ``get_replay_batch``, ``search_similar``,
``update_priorities``, ``flush``, ``health_check``), which await the threads without blocking the
event loop and work from any event loop. Both give the same batches for the same seed.

- Writes (:mod:`~agent.memory_client.writer`): ``store_*`` copies rows into a staging block and
  returns. Full blocks (and, every ``flush_interval``, partial ones) are encoded and written to an
  on-disk outbox (:mod:`~agent.memory_client.outbox`), one file per batch, each with an
  idempotency key (client id + sequence number). A writer thread delivers the files oldest first
  and deletes each once the service has acknowledged it; the service stores a key at most once,
  so retries after a lost answer never store a batch twice. The outbox is bounded
  (``max_outbox_bytes``); past that, new rows are dropped and counted in ``dropped``.
- Reads (:mod:`~agent.memory_client.reader`): replay batches and similarity searches run on a
  reader thread; the next replay batch is prefetched while the learner works on the current one.
  With a ``seed``, replay is reproducible: a request carries a seed from the client's generator
  and the count of rows queued when the learner asked; the reader thread makes sure the service
  holds them (one flush path, shared with read-your-own-writes search), and the service draws
  from exactly those rows.
- Latency (:mod:`~agent.memory_client.stats`): every answered request's round trip (httpx's
  ``response.elapsed``) goes into a :class:`LatencyWindow`; ``metrics()`` reports its p50/p99 and
  ``new_latency_window()`` starts the next window (the trainer does, once per logging window).
- Failures (:mod:`~agent.memory_client.breaker`): a 1 s connect timeout, backoff between retries,
  and a circuit breaker. While the breaker is open, reads return ``None`` at once (no network),
  writes wait in the outbox, and the writer thread probes the service now and then; the first
  success closes the breaker.

This module composes those parts; the package imports httpx, numpy and :mod:`memory.wire` (which
imports no server code).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from agent.memory_client.batches import ReplayBatch, SimilarExperiences, as_numpy
from agent.memory_client.breaker import CircuitBreaker
from agent.memory_client.outbox import Outbox
from agent.memory_client.reader import Reader
from agent.memory_client.stats import Counters, LatencyWindow
from agent.memory_client.steps import run_async, run_blocking
from agent.memory_client.writer import Writer
from memory import wire

log = logging.getLogger(__name__)


class MemoryClient:
    """Client of the Memory service, blocking or async; see the module docstring for how it
    behaves."""

    def __init__(
        self,
        base_url: str = "http://localhost:8401",
        timeout: float = 30.0,
        *,
        collection: str = "default",
        connect_timeout: float = 1.0,
        token: str | None = None,
        outbox_dir: str | Path | None = None,
        read_timeout: float | None = None,
        capacity: int | None = None,
        batch_rows: int = 1024,
        flush_interval: float = 0.05,
        max_outbox_bytes: int = 1 << 30,
        prefetch: bool = True,
        prefetch_batches: int = 16,
        failure_threshold: int = 3,
        breaker_reset: float = 0.25,
        breaker_max_reset: float = 2.0,
        close_timeout: float = 5.0,
        seed: int | None = None,
    ) -> None:
        """``timeout`` bounds a write; reads use ``read_timeout`` (default min(timeout, 5 s)),
        because a learner should never wait 30 s for a replay batch it can do without.
        ``capacity`` is used only if this client creates the collection. ``token`` defaults to
        the environment variable ``MEMORY_TOKEN``, as the service's does. ``outbox_dir`` keeps
        undelivered writes across processes (default: a temporary directory, removed once
        drained). ``close_timeout`` is how long :meth:`close` waits to deliver queued writes.

        ``seed`` makes replay reproducible: each sample request carries a seed drawn from a
        generator seeded with it, and the number of rows this client had queued when it was made;
        the service holds those rows before it answers (the reader thread delivers them first if
        need be) and draws only from the rows stored up to the last of them. So one seed and one
        sequence of stores and requests give the same batches, however the writes were timed.
        Exact for uniform replay when no other client writes to the collection meanwhile;
        prioritized batches also depend on when priority updates arrive. None: the service
        draws with its own generator from whatever it holds."""
        if not wire.is_collection_name(collection):
            raise ValueError(f"collection name {collection!r}: use {wire.COLLECTION_NAME_RULE}")
        if token is None:
            token = os.environ.get("MEMORY_TOKEN") or None
        self.close_timeout = close_timeout
        self.base_url = base_url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._owns_outbox = outbox_dir is None
        directory = (
            Path(tempfile.mkdtemp(prefix="memory-outbox-"))
            if outbox_dir is None
            else Path(outbox_dir)
        )
        self.latency = LatencyWindow()
        breaker = CircuitBreaker(failure_threshold, breaker_reset, breaker_max_reset)
        counters = Counters()
        self._breaker, self._counters = breaker, counters  # shared by the writer and the reader
        self._writer = Writer(
            http=httpx.Client(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=connect_timeout),
            ),
            outbox=Outbox(directory, max_outbox_bytes),
            breaker=breaker,
            latency=self.latency,
            counters=counters,
            collection=collection,
            capacity=capacity,
            batch_rows=batch_rows,
            flush_interval=flush_interval,
        )
        read_timeout = min(timeout, 5.0) if read_timeout is None else read_timeout
        self._reader = Reader(
            http=httpx.Client(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            ),
            writer=self._writer,
            breaker=breaker,
            latency=self.latency,
            counters=counters,
            collection=collection,
            read_timeout=read_timeout,
            prefetch=prefetch,
            prefetch_batches=prefetch_batches,
            seed=seed,
        )
        self._closed = False
        self._writer.start()

    # ------------------------------------------------- settings (kept where they are used)
    @property
    def collection(self) -> str:
        return self._reader.collection

    @collection.setter
    def collection(self, name: str) -> None:
        self._reader.collection = self._writer.collection = name

    @property
    def capacity(self) -> int | None:
        return self._writer.capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        self._writer.capacity = value

    @property
    def batch_rows(self) -> int:
        return self._writer.batch_rows

    @batch_rows.setter
    def batch_rows(self, value: int) -> None:
        self._writer.batch_rows = value

    @property
    def flush_interval(self) -> float:
        return self._writer.flush_interval

    @flush_interval.setter
    def flush_interval(self, value: float) -> None:
        self._writer.flush_interval = value

    @property
    def read_timeout(self) -> float:
        return self._reader.read_timeout

    @read_timeout.setter
    def read_timeout(self, value: float) -> None:
        self._reader.read_timeout = value

    @property
    def prefetch(self) -> bool:
        return self._reader.prefetch

    @prefetch.setter
    def prefetch(self, value: bool) -> None:
        self._reader.prefetch = value

    @property
    def prefetch_batches(self) -> int:
        return self._reader.prefetch_batches

    @prefetch_batches.setter
    def prefetch_batches(self, value: int) -> None:
        self._reader.prefetch_batches = value

    # The parts, under the names they had before the client was split (tests look at them).
    @property
    def _outbox(self) -> Outbox:
        return self._writer.outbox

    @property
    def _write_http(self) -> httpx.Client:
        return self._writer.http

    @property
    def _read_http(self) -> httpx.Client:
        return self._reader.http

    @property
    def _sample_rng(self) -> np.random.Generator | None:
        return self._reader.sample_rng

    @property
    def _client_id(self) -> str:
        return self._writer.client_id

    # ----------------------------------------------------------------------------- lifecycle
    @classmethod
    def from_config(
        cls, config: Any, *, outbox_dir: str | Path | None = None, **overrides: Any
    ) -> MemoryClient:
        """A client for the ``memory`` section of params.yaml (a :class:`~agent.config.Config` or
        its ``memory`` section); keyword arguments override single settings.

        Given a whole Config, replay is seeded with ``run.seed`` (see ``seed`` above). A
        collection still ``auto`` (the caller did not resolve it for its run with
        :func:`agent.config.with_run_collection`) becomes a new collection of this client's own."""
        memory = getattr(config, "memory", config)
        collection = memory.collection
        if collection == "auto":
            from agent.config import run_collection_name

            collection = run_collection_name("client")
            log.info("memory.collection is auto: this client writes to new collection %s", collection)
        run = getattr(config, "run", None)
        settings: dict[str, Any] = {
            "seed": None if run is None else run.seed,
            "timeout": memory.timeout,
            "connect_timeout": memory.connect_timeout,
            "collection": collection,
            "capacity": memory.capacity,
            "max_outbox_bytes": int(memory.max_outbox_mb * 2**20),
            "close_timeout": memory.flush_timeout,
            "outbox_dir": outbox_dir,
        }
        settings.update(overrides)
        return cls(memory.base_url, **settings)

    async def __aenter__(self) -> MemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def close(self, flush_timeout: float | None = None) -> None:
        """Deliver what is queued (up to ``flush_timeout`` seconds, default ``close_timeout``),
        then stop the threads.

        Anything still undelivered stays in the outbox directory; a client opened on that
        directory later delivers it.
        """
        await asyncio.to_thread(self.shutdown, flush_timeout)

    def shutdown(self, flush_timeout: float | None = None) -> bool:
        """:meth:`close` for code without an event loop (the CLI, a Prefect task); True if every
        queued write was delivered."""
        outbox = self._writer.outbox
        if self._closed:
            return not len(outbox)
        timeout = self.close_timeout if flush_timeout is None else flush_timeout
        drained = self._writer.flush(timeout)
        self._closed = True
        self._reader.closed = True  # reads return None from now on
        self._writer.stop()  # before the reader: a sample waiting for writes wakes up
        self._reader.stop()
        if drained and self._owns_outbox:
            shutil.rmtree(outbox.directory, ignore_errors=True)
        elif not drained:
            log.warning(
                "closing with %d rows undelivered; they stay in %s", outbox.rows, outbox.directory
            )
        return drained

    def new_latency_window(self) -> None:
        """Start a new latency window: ``metrics()``'s percentiles cover requests from now on."""
        self.latency.reset()

    def metrics(self) -> dict[str, float]:
        """Health and delivery counters (rows), for the training loop's metrics sink, and the
        round-trip latency of the requests since :meth:`new_latency_window` (see
        :meth:`LatencyWindow.summary`: ``latency_p50_ms``, ``latency_p99_ms``, ...)."""
        counts = self._counters.snapshot()
        breaker, outbox = self._breaker, self._writer.outbox
        return {
            "healthy": 0.0 if breaker.is_open else 1.0,
            "breaker_open": 1.0 if breaker.is_open else 0.0,
            "breaker_trips": float(breaker.trips),
            "queued_writes": float(self._writer.queued_rows),
            "outbox_bytes": float(outbox.bytes),
            "outbox_batches": float(len(outbox)),
            **{name: float(value) for name, value in counts.items()},
            **self.latency.summary(),
        }

    # ------------------------------------------------------------------------ blocking API
    def write_transitions(
        self,
        obs: Any,
        actions: Any,
        rewards: Any,
        next_obs: Any,
        dones: Any,
        episode_returns: Any = None,
        priorities: Any = None,
    ) -> None:
        """Queue a batch ([B, D] observations, [B] the rest) and return at once.

        ``episode_returns`` ([B], optional) is the return of the episode each row belongs to, for
        searches that prefer neighbours from successful episodes; None (or NaN) means unknown.
        ``priorities`` ([B], optional) are the rows' initial sampling priorities (an Ape-X actor's
        |TD error|); None (or NaN): the collection's running maximum.
        Raises ValueError for data the service would refuse (wrong shapes, NaN/inf, dones not
        0/1), so bad rows never reach the outbox; RuntimeError once the client is closed.
        """
        self._writer.write(obs, actions, rewards, next_obs, dones, episode_returns, priorities)

    def sample_replay(
        self, batch_size: int = 32, *, prioritized: bool = False, beta: float = 0.4
    ) -> ReplayBatch | None:
        """A replay batch from the service; None when it is unavailable or the collection is empty.

        Blocks (at most about ``read_timeout``) only when no prefetched batch is ready. With
        ``prefetch`` on, batches come ``prefetch_batches`` per request, and the next request goes
        out while the learner works through the current ones, so a batch is usually ready when
        asked for. A prioritized batch may then predate the latest priority updates by a few
        steps, as with any prefetching replay (Reverb, Ape-X). Same batches, seeds and counters
        as :meth:`get_replay_batch`; the two may be mixed.
        """
        return run_blocking(self._reader.sample_steps(batch_size, prioritized, beta))

    def send_priorities(self, ids: Any, priorities: Any) -> None:
        """Send new priorities for sampled ids without waiting for the answer.

        Priorities are a sampling hint: while the breaker is open, or if updates pile up faster
        than the service takes them, they are skipped (counted in ``priority_updates_skipped``).
        """
        self._reader.send_priorities(ids, priorities)

    def find_similar(
        self, states: Any, k: int = 5, *, read_own_writes: bool = False
    ) -> SimilarExperiences | None:
        """The k stored transitions nearest to each state ([D] or [Q, D]); None if unavailable.

        Writes are queued (see the module docstring), so a search right after a store would not
        find it. ``read_own_writes`` first delivers what this client queued before the call (for
        its collection; waiting at most ``read_timeout``), so the search sees this client's own
        writes. The training loop leaves it off: it must not wait for a round trip per step.
        """
        return run_blocking(self._reader.search_steps(states, k, read_own_writes))

    def deliver(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is acknowledged; False if ``timeout`` ran out."""
        return self._writer.flush(timeout)

    def is_healthy(self) -> bool:
        """True if the service answers; False at once while the breaker is open (until a probe)."""
        return run_blocking(self._reader.health_steps())

    # --------------------------------------------------------------------------- async API
    async def store_experience(
        self, state: Any, action: Any, reward: Any, next_state: Any, done: Any
    ) -> None:
        """Queue one transition (see :meth:`write_transitions`)."""
        self.write_transitions(
            as_numpy(state)[None],
            np.asarray([action]),
            np.asarray([reward]),
            as_numpy(next_state)[None],
            np.asarray([done]),
        )

    async def store_transitions(
        self,
        obs: Any,
        actions: Any,
        rewards: Any,
        next_obs: Any,
        dones: Any,
        episode_returns: Any = None,
    ) -> None:
        """:meth:`write_transitions` (it never waits for the network)."""
        self.write_transitions(obs, actions, rewards, next_obs, dones, episode_returns)

    async def get_replay_batch(
        self, batch_size: int = 32, *, prioritized: bool = False, beta: float = 0.4
    ) -> ReplayBatch | None:
        """:meth:`sample_replay`, awaiting the reader thread instead of blocking the event loop."""
        return await run_async(self._reader.sample_steps(batch_size, prioritized, beta))

    async def update_priorities(self, ids: Any, priorities: Any) -> None:
        """:meth:`send_priorities` (it never waits for the answer)."""
        self.send_priorities(ids, priorities)

    async def search_similar(
        self, states: Any, k: int = 5, *, read_own_writes: bool = False
    ) -> SimilarExperiences | None:
        """:meth:`find_similar`, awaiting the reader thread (and, with ``read_own_writes``, the
        delivery of this client's writes) instead of blocking the event loop."""
        return await run_async(self._reader.search_steps(states, k, read_own_writes))

    async def flush(self, timeout: float | None = None) -> bool:
        """:meth:`deliver`, waiting in a worker thread instead of blocking the event loop."""
        return await run_async(self._writer.flush_steps(timeout))

    async def health_check(self) -> bool:
        """:meth:`is_healthy`, awaiting the reader thread instead of blocking the event loop."""
        return await run_async(self._reader.health_steps())
