"""MemoryClient: the learner's side of the Memory service, built to cost the training loop nothing.

Why threads and not asyncio tasks: the training loop is CPU-bound and may not yield to the event
loop for long stretches, so anything that must make progress on its own runs in a thread with its
own synchronous httpx client (socket I/O releases the GIL). The async methods are thin: they hand
work to those threads and await the result, so they work from any event loop.

- Writes: ``store_*`` copies rows into a staging block and returns. Full blocks (and, every
  ``flush_interval``, partial ones) are encoded and written to an on-disk outbox, one file per
  batch, each with an idempotency key (client id + sequence number). A writer thread delivers the
  files oldest first and deletes each once the service has acknowledged it; the service stores a
  key at most once, so retries after a lost answer never store a batch twice. The outbox is
  bounded (``max_outbox_bytes``); past that, new rows are dropped and counted in ``dropped``.
- Reads: ``get_replay_batch`` and ``search_similar`` run on a reader thread; the next replay batch
  is prefetched while the learner works on the current one. With a ``seed``, replay is
  reproducible: a request carries a seed from the client's generator and the count of rows queued
  when the learner asked; the reader thread makes sure the service holds them (one flush path,
  shared with read-your-own-writes search), and the service draws from exactly those rows.
- Latency: every answered request's round trip (httpx's ``response.elapsed``) goes into a
  :class:`LatencyWindow`; ``metrics()`` reports its p50/p99 and ``new_latency_window()`` starts
  the next window (the trainer does, once per logging window).
- Failures: a 1 s connect timeout, backoff between retries, and a circuit breaker. While the
  breaker is open, reads return ``None`` at once (no network), writes wait in the outbox, and the
  writer thread probes the service now and then; the first success closes the breaker.

This module imports httpx, numpy and :mod:`memory.wire` (which imports no server code).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import httpx
import numpy as np

from memory import wire

log = logging.getLogger(__name__)

_OUTBOX_SUFFIX = ".mwb"
_MAX_PRIORITY_UPDATES_IN_FLIGHT = 8
_MAX_QUERIES = 4096  # query states per search request (memory.settings.Settings.max_queries)
_T = TypeVar("_T")
_BATCH_FIELDS = ("ids", "obs", "actions", "rewards", "next_obs", "dones", "weights")


class ReplayBatch(NamedTuple):
    """Transitions as numpy arrays, ready for ``torch.as_tensor``."""

    ids: np.ndarray  # int64 [B]
    obs: np.ndarray  # float32 [B, D]
    actions: np.ndarray  # int64 [B]
    rewards: np.ndarray  # float32 [B]
    next_obs: np.ndarray  # float32 [B, D]
    dones: np.ndarray  # float32 [B] (1.0 = terminated)
    weights: np.ndarray  # float32 [B] importance weights (all 1.0 for uniform sampling)
    # float32 [B]: the return of each row's episode, as its writer stored it (NaN: unknown);
    # None from a service that does not keep it.
    episode_returns: np.ndarray | None = None


class SimilarExperiences(NamedTuple):
    """The k nearest stored transitions per query, flattened to Q*k rows."""

    batch: ReplayBatch
    distances: np.ndarray  # float32 [Q*k], Euclidean
    query_index: np.ndarray  # int64 [Q*k], which query each row answers


class Experience(NamedTuple):
    """One stored transition a similarity search found, and how far its state lies from the query."""

    state: np.ndarray  # float32 [D]
    action: int
    reward: float
    next_state: np.ndarray  # float32 [D]
    done: bool  # the episode terminated (not merely truncated) after this step
    distance: float  # Euclidean, between the query and ``state``
    id: int  # the row's id in the collection
    query: int  # which query it answers (always 0 for one state)


class NearestExperiences(tuple[Experience, ...]):
    """The spec's ``similar_experiences``: the k nearest stored experiences, nearest first.

    A sequence of :class:`Experience` (``len(similar) == k`` once the collection holds k rows,
    ``similar[0].state``, ...), as the spec's ``get_similar_experiences`` is read. It keeps the
    columnar arrays of :class:`SimilarExperiences` too (``batch``, ``distances``,
    ``query_index``), for code that feeds them to torch in one piece.
    """

    batch: ReplayBatch
    distances: np.ndarray
    query_index: np.ndarray

    def __new__(cls, found: SimilarExperiences) -> NearestExperiences:
        batch = found.batch
        rows = (
            Experience(
                state=batch.obs[i],
                action=int(batch.actions[i]),
                reward=float(batch.rewards[i]),
                next_state=batch.next_obs[i],
                done=bool(batch.dones[i]),
                distance=float(found.distances[i]),
                id=int(batch.ids[i]),
                query=int(found.query_index[i]),
            )
            for i in range(len(batch.ids))
        )
        self = super().__new__(cls, rows)
        self.batch, self.distances, self.query_index = found
        return self


class LatencyWindow:
    """Round-trip times of the requests of one window, by kind ("read", "write"); thread-safe.

    The reader and writer threads record; the training loop reads the percentiles once per
    logging window and starts a new window. Each kind keeps at most ``max_samples`` (the latest).
    """

    KINDS = ("read", "write")

    def __init__(self, max_samples: int = 65_536) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {k: deque(maxlen=max_samples) for k in self.KINDS}

    def record(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._samples[kind].append(seconds)

    def reset(self) -> None:
        with self._lock:
            for samples in self._samples.values():
                samples.clear()

    def summary(self) -> dict[str, float]:
        """``round_trips`` (the window's count) and, once there is one, ``latency_p50_ms``,
        ``latency_p99_ms``, ``latency_max_ms`` over all requests and p50/p99 per kind
        (``read_latency_p50_ms``, ...)."""
        with self._lock:
            samples = {kind: np.fromiter(values, np.float64) for kind, values in self._samples.items()}
        every = np.concatenate(list(samples.values()))
        result = {"round_trips": float(len(every))}
        if len(every):
            p50, p99 = np.percentile(every, (50, 99)) * 1000.0
            result.update(latency_p50_ms=p50, latency_p99_ms=p99, latency_max_ms=every.max() * 1000.0)
        for kind, values in samples.items():
            if len(values):
                p50, p99 = np.percentile(values, (50, 99)) * 1000.0
                result[f"{kind}_latency_p50_ms"], result[f"{kind}_latency_p99_ms"] = p50, p99
        return {name: float(value) for name, value in result.items()}


class CircuitBreaker:
    """Stops traffic to a service that keeps failing, and lets one probe through now and then.

    Closed: requests go. ``threshold`` consecutive failures open it: nothing goes until
    ``retry_at``, then probes may go (half-open); a success closes it, a failure reopens it with
    the wait doubled, up to ``max_reset``. Thread-safe: the reader and writer threads share one.
    """

    def __init__(
        self,
        threshold: int = 3,
        reset: float = 0.25,
        max_reset: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self._clock = clock
        self.reset = reset
        self.max_reset = max_reset
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self._wait = reset
        self._retry_at = 0.0
        self.trips = 0

    @property
    def is_open(self) -> bool:
        return self._open

    def may_probe(self) -> bool:
        """True if a request may go now: the breaker is closed, or open and due for a probe."""
        return not self._open or self._clock() >= self._retry_at

    def seconds_to_probe(self) -> float:
        return max(0.0, self._retry_at - self._clock()) if self._open else 0.0

    def success(self) -> None:
        with self._lock:
            if self._open:
                log.info("Memory service reachable again; circuit breaker closed")
            self._failures = 0
            self._open = False
            self._wait = self.reset

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._open:
                self._wait = min(self._wait * 2, self.max_reset)
            elif self._failures >= self.threshold:
                self._open = True
                self.trips += 1
                log.warning(
                    "Memory service unreachable; circuit breaker open (reads return None, "
                    "writes wait in the outbox)"
                )
            if self._open:
                self._retry_at = self._clock() + self._wait * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class _OutboxEntry:
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
        self._pending: deque[_OutboxEntry] = deque()
        self.bytes = 0
        self.rows = 0
        for stale in directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        for path in sorted(directory.glob(f"*{_OUTBOX_SUFFIX}")):
            try:
                rows = int(wire.read_meta(path.read_bytes())["rows"])
            except (OSError, ValueError, KeyError, TypeError):
                log.error("outbox file %s is unreadable; moved aside", path)
                self._move_aside(path)
                continue
            self._add(_OutboxEntry(path, path.stat().st_size, rows))
        self._next_number = int(self._pending[-1].path.stem) + 1 if self._pending else 0
        if self._pending:
            log.info(
                "outbox %s holds %d batches (%d rows) from an earlier client",
                directory,
                len(self._pending),
                self.rows,
            )

    def _add(self, entry: _OutboxEntry) -> None:
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
            path = self.directory / f"{self._next_number:016d}{_OUTBOX_SUFFIX}"
            self._next_number += 1
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(payload)
            temporary.replace(path)
            self._add(_OutboxEntry(path, len(payload), rows))
            return True

    def peek(self) -> _OutboxEntry | None:
        with self._lock:
            return self._pending[0] if self._pending else None

    def _remove(self, entry: _OutboxEntry) -> None:
        with self._lock:
            if self._pending and self._pending[0] == entry:
                self._pending.popleft()
                self.bytes -= entry.nbytes
                self.rows -= entry.rows

    def delivered(self, entry: _OutboxEntry) -> None:
        self._remove(entry)
        entry.path.unlink(missing_ok=True)

    def rejected(self, entry: _OutboxEntry) -> None:
        """Move aside a batch the service refuses for good, so it cannot block the queue."""
        self._remove(entry)
        self._move_aside(entry.path)

    def _move_aside(self, path: Path) -> None:
        aside = self.directory / "rejected"
        aside.mkdir(exist_ok=True)
        path.replace(aside / path.name)


def _numpy(value: Any) -> np.ndarray:
    """A numpy array from numpy, lists or a torch tensor (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _batch_from(arrays: dict[str, np.ndarray]) -> ReplayBatch:
    weights = arrays.get("weights")
    if weights is None:
        weights = np.ones(len(arrays["ids"]), dtype=np.float32)
    return ReplayBatch(
        ids=arrays["ids"],
        obs=arrays["obs"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        next_obs=arrays["next_obs"],
        dones=arrays["dones"],
        weights=weights,
        episode_returns=arrays.get("episode_returns"),
    )


class MemoryClient:
    """Async client of the Memory service; see the module docstring for how it behaves."""

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
        self.collection = collection
        self.capacity = capacity
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.prefetch = prefetch
        self.prefetch_batches = prefetch_batches
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._owns_outbox = outbox_dir is None
        directory = (
            Path(tempfile.mkdtemp(prefix="memory-outbox-"))
            if outbox_dir is None
            else Path(outbox_dir)
        )
        self._outbox = Outbox(directory, max_outbox_bytes)
        self._breaker = CircuitBreaker(failure_threshold, breaker_reset, breaker_max_reset)
        self._write_http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
        )
        read_timeout = min(timeout, 5.0) if read_timeout is None else read_timeout
        self.read_timeout = read_timeout
        self._read_http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-reader")
        # Prefetched replay batches for the latest (batch_size, prioritized, beta) asked for.
        self._ready_key: tuple[int, bool, float] | None = None
        self._ready: deque[ReplayBatch] = deque()
        self._in_flight: Future[list[ReplayBatch] | None] | None = None
        self._priority_updates_in_flight = 0
        self._sample_rng = None if seed is None else np.random.default_rng(seed)
        # This client's rows: queued so far, and settled (acknowledged, or refused or dropped for
        # good); the collection id its first row got, and the id after its latest acknowledged row.
        self._rows_in = 0
        self._rows_settled = 0
        self._id_base: int | None = None
        self._id_end = 0
        # Staging: rows copied in by store_*, not yet encoded into an outbox file.
        self._client_id = uuid.uuid4().hex[:16]
        self._seq = 0
        self._dim: int | None = None
        self._block: dict[str, np.ndarray] = {}
        self._staged = 0
        self._staged_since = 0.0
        self._last_drop_log = -math.inf
        self._stage_lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "delivered",
                "duplicates",
                "dropped",
                "rejected",
                "retries",
                "read_failures",
                "reads_skipped",
                "prefetch_hits",
                "priority_updates_skipped",
            ),
            0,
        )
        self._count_lock = threading.Lock()
        self.latency = LatencyWindow()
        self._drained = threading.Condition()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="memory-writer", daemon=True)
        self._writer.start()

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
        if self._closed:
            return not len(self._outbox)
        timeout = self.close_timeout if flush_timeout is None else flush_timeout
        self._spool_partial()
        drained = not len(self._outbox)
        if not drained:
            self._wake.set()
            drained = self._wait_drained(timeout)
        self._closed = True
        self._stopping.set()
        self._wake.set()
        self._writer.join(5.0)
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._write_http.close()
        self._read_http.close()
        if drained and self._owns_outbox:
            shutil.rmtree(self._outbox.directory, ignore_errors=True)
        elif not drained:
            log.warning(
                "closing with %d rows undelivered; they stay in %s",
                self._outbox.rows,
                self._outbox.directory,
            )
        return drained

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self._counts[name] += n

    def new_latency_window(self) -> None:
        """Start a new latency window: ``metrics()``'s percentiles cover requests from now on."""
        self.latency.reset()

    def metrics(self) -> dict[str, float]:
        """Health and delivery counters (rows), for the training loop's metrics sink, and the
        round-trip latency of the requests since :meth:`new_latency_window` (see
        :meth:`LatencyWindow.summary`: ``latency_p50_ms``, ``latency_p99_ms``, ...)."""
        with self._count_lock:
            counts = dict(self._counts)
        return {
            "healthy": 0.0 if self._breaker.is_open else 1.0,
            "breaker_open": 1.0 if self._breaker.is_open else 0.0,
            "breaker_trips": float(self._breaker.trips),
            "queued_writes": float(self._staged + self._outbox.rows),
            "outbox_bytes": float(self._outbox.bytes),
            "outbox_batches": float(len(self._outbox)),
            **{name: float(value) for name, value in counts.items()},
            **self.latency.summary(),
        }

    # ------------------------------------------------------------------------------- writes
    async def store_experience(
        self, state: Any, action: Any, reward: Any, next_state: Any, done: Any
    ) -> None:
        """Queue one transition (see :meth:`store_transitions`)."""
        await self.store_transitions(
            _numpy(state)[None],
            np.asarray([action]),
            np.asarray([reward]),
            _numpy(next_state)[None],
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
        """Queue a batch ([B, D] observations, [B] the rest) and return at once.

        ``episode_returns`` ([B], optional) is the return of the episode each row belongs to, for
        searches that prefer neighbours from successful episodes; None (or NaN) means unknown.
        Raises ValueError for data the service would refuse (wrong shapes, NaN/inf, dones not
        0/1), so bad rows never reach the outbox.
        """
        self._stage(*self._check(obs, actions, rewards, next_obs, dones, episode_returns))

    def _check(
        self,
        obs: Any,
        actions: Any,
        rewards: Any,
        next_obs: Any,
        dones: Any,
        episode_returns: Any = None,
    ) -> tuple[np.ndarray, ...]:
        obs_a = np.asarray(_numpy(obs), dtype=np.float32)
        next_a = np.asarray(_numpy(next_obs), dtype=np.float32)
        if obs_a.ndim != 2 or next_a.shape != obs_a.shape:
            raise ValueError(
                f"obs and next_obs must both be [B, D], got {obs_a.shape} and {next_a.shape}"
            )
        rows, dim = obs_a.shape
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"observation size {dim} differs from the {self._dim} stored before")
        columns = []
        for name, value, dtype in (
            ("actions", actions, np.int64),
            ("rewards", rewards, np.float32),
            ("dones", dones, np.float32),
        ):
            array = _numpy(value)
            if array.size != rows:
                raise ValueError(f"{name} must hold {rows} values, got shape {array.shape}")
            columns.append(array.reshape(rows).astype(dtype))
        actions_a, rewards_a, dones_a = columns
        if not (
            np.isfinite(obs_a).all() and np.isfinite(next_a).all() and np.isfinite(rewards_a).all()
        ):
            raise ValueError("obs, next_obs and rewards must be finite (no NaN or infinity)")
        if not np.isin(dones_a, (0.0, 1.0)).all():
            raise ValueError("dones must be 0 or 1 (terminated)")
        if episode_returns is None:
            returns_a = np.full(rows, np.nan, dtype=np.float32)
        else:
            returns_a = _numpy(episode_returns).astype(np.float32)
            if returns_a.size != rows:
                raise ValueError(f"episode_returns must hold {rows} values, got {returns_a.shape}")
            returns_a = returns_a.reshape(rows)
            if np.isinf(returns_a).any():
                raise ValueError("episode_returns must be finite (NaN: unknown)")
        return obs_a, actions_a, rewards_a, next_a, dones_a, returns_a

    def _stage(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        dones: np.ndarray,
        episode_returns: np.ndarray,
    ) -> None:
        if self._closed:
            raise RuntimeError("MemoryClient is closed")
        columns = {
            "obs": obs,
            "actions": actions,
            "rewards": rewards,
            "next_obs": next_obs,
            "dones": dones,
            "episode_returns": episode_returns,
        }
        with self._stage_lock:
            self._rows_in += len(obs)
            if not self._block:
                self._dim = obs.shape[1]
                self._block = {
                    name: np.empty((self.batch_rows, *value.shape[1:]), dtype=value.dtype)
                    for name, value in columns.items()
                }
            start = 0
            while start < len(obs):
                if self._staged == 0:
                    self._staged_since = time.monotonic()
                take = min(len(obs) - start, self.batch_rows - self._staged)
                for name, value in columns.items():
                    self._block[name][self._staged : self._staged + take] = value[
                        start : start + take
                    ]
                self._staged += take
                start += take
                if self._staged == self.batch_rows:
                    self._spool()

    def _spool(self) -> None:
        """Encode the staged rows into one outbox file (caller holds the staging lock)."""
        rows = self._staged
        if rows == 0:
            return
        meta = {
            "client_id": self._client_id,
            "seq": self._seq,
            "collection": self.collection,
            "dim": self._dim,
            "rows": rows,
        }
        arrays = {name: value[:rows] for name, value in self._block.items()}
        if np.isnan(arrays["episode_returns"]).all():  # untagged rows: the service assumes unknown
            del arrays["episode_returns"]
        payload = wire.encode(arrays, meta)
        self._seq += 1
        self._staged = 0
        if not self._outbox.put(payload, rows):
            self._count("dropped", rows)
            self._settle(rows)
            if time.monotonic() - self._last_drop_log > 60.0:  # once a minute, not once a batch
                self._last_drop_log = time.monotonic()
                log.error(
                    "outbox %s is full (%d bytes): dropping rows until the service takes some "
                    "(%d dropped so far)",
                    self._outbox.directory,
                    self._outbox.max_bytes,
                    self._counts["dropped"],
                )
        self._wake.set()

    def _spool_partial(self, min_age: float = 0.0) -> None:
        with self._stage_lock:
            if self._staged and time.monotonic() - self._staged_since >= min_age:
                self._spool()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is acknowledged; False if ``timeout`` ran out."""
        self._spool_partial()
        if not len(self._outbox):
            return True
        self._wake.set()
        return await asyncio.to_thread(self._wait_drained, timeout)

    async def _deliver_queued(self, timeout: float | None) -> bool:
        """Wait until the writes queued before this call are acknowledged (not those other tasks
        queue meanwhile, which could keep a busy learner waiting for ever); False on timeout."""
        return await asyncio.to_thread(self._deliver_rows, self._rows_in, timeout)

    def _deliver_rows(self, rows: int, timeout: float | None) -> bool:
        """Block until this client's first ``rows`` rows are settled (acknowledged, or refused for
        good); False on timeout. Spools and wakes the writer only when they are not yet: the one
        flush path of reads that must see this client's writes (search, seeded replay)."""
        if self._rows_settled >= rows:
            return True
        self._spool_partial()
        self._wake.set()
        with self._drained:
            self._drained.wait_for(
                lambda: self._rows_settled >= rows or self._stopping.is_set(), timeout
            )
        return self._rows_settled >= rows

    def _settle(self, rows: int, first_id: int | None = None) -> None:
        """Count rows of this client settled in queue order; ``first_id``: where the service put
        them (consecutive ids), for :meth:`_end_id`."""
        with self._drained:
            if first_id is not None:
                if self._id_base is None:
                    self._id_base = first_id - self._rows_settled
                self._id_end = first_id + rows
            self._rows_settled += rows
            self._drained.notify_all()

    def _end_id(self, rows: int) -> int | None:
        """The collection id after this client's first ``rows`` rows (None before any is stored).

        Assumes this client's rows got consecutive ids, which holds while it is the only writer
        (a collection per run); never beyond the last id acknowledged."""
        if self._id_base is None or rows <= 0:
            return None
        return min(self._id_base + rows, self._id_end)

    def _wait_drained(self, timeout: float | None) -> bool:
        with self._drained:
            self._drained.wait_for(
                lambda: not len(self._outbox) or self._stopping.is_set(), timeout
            )
        return not len(self._outbox)

    def _write_loop(self) -> None:
        """The writer thread: spool partial blocks on time, deliver the outbox, probe when open."""
        while not self._stopping.is_set():
            try:
                self._spool_partial(self.flush_interval)
                pause = self._deliver()
            except Exception:  # the thread must outlive any surprise; the outbox keeps the data
                log.exception("Memory writer failed; retrying")
                pause = 1.0
            if self._staged:
                pause = min(
                    pause, max(0.0, self._staged_since + self.flush_interval - time.monotonic())
                )
            self._wake.wait(pause)
            self._wake.clear()
        with self._drained:
            self._drained.notify_all()

    def _deliver(self) -> float:
        """Send outbox files oldest first until it is empty or a send fails; returns how long to
        wait before the next attempt."""
        while (entry := self._outbox.peek()) is not None and not self._stopping.is_set():
            if not self._breaker.may_probe():
                return self._breaker.seconds_to_probe()
            try:
                payload = entry.path.read_bytes()
                meta = wire.read_meta(payload)
                key = f"{meta['client_id']}:{meta['seq']}"
            except (OSError, ValueError, KeyError) as exc:
                log.error("outbox file %s is unreadable (%s); moved aside", entry.path, exc)
                self._finish(entry, "rejected")
                continue
            try:
                response = self._post_batch(meta, payload, key)
                answer = response.json() if response.status_code < 300 else {}
                duplicate = answer.get("duplicate") is True
            except (httpx.HTTPError, ValueError) as exc:
                return self._write_failed(f"{type(exc).__name__}: {exc}")
            status = response.status_code
            own = meta.get("client_id") == self._client_id
            if status < 300:
                self._breaker.success()
                if duplicate:
                    self._count("duplicates", entry.rows)
                self._finish(entry, "delivered")
                if own:
                    first_id = answer.get("first_id")
                    self._settle(entry.rows, first_id if isinstance(first_id, int) else None)
            elif status >= 500 or status in (401, 403, 404, 408, 429):
                return self._write_failed(f"HTTP {status}: {response.text[:200]}")
            else:
                log.error(
                    "Memory service refused %d rows for good (HTTP %d: %s); moved aside",
                    entry.rows,
                    status,
                    response.text[:500],
                )
                self._finish(entry, "rejected")
                if own:
                    self._settle(entry.rows)
        if self._breaker.is_open and self._breaker.may_probe():
            self._probe()
        return self._breaker.seconds_to_probe() if self._breaker.is_open else 0.5

    def _post_batch(self, meta: dict[str, Any], payload: bytes, key: str) -> httpx.Response:
        """POST one outbox batch; if the collection is missing, create it and post once more."""
        path = f"/v1/collections/{meta['collection']}/transitions"
        headers = {"content-type": wire.CONTENT_TYPE, "idempotency-key": key}
        response = self._write_http.post(path, content=payload, headers=headers)
        self.latency.record("write", response.elapsed.total_seconds())
        if response.status_code == 404 and self._create_collection(meta):
            response = self._write_http.post(path, content=payload, headers=headers)
            self.latency.record("write", response.elapsed.total_seconds())
        return response

    def _finish(self, entry: _OutboxEntry, outcome: str) -> None:
        self._count(outcome, entry.rows)
        if outcome == "delivered":
            self._outbox.delivered(entry)
        else:
            self._outbox.rejected(entry)
        with self._drained:
            self._drained.notify_all()

    def _write_failed(self, reason: str) -> float:
        self._breaker.failure()
        self._count("retries")
        log.debug("delivery failed (%s); retrying", reason)
        if self._breaker.is_open:
            return self._breaker.seconds_to_probe()
        return 0.05 * random.uniform(0.5, 1.5)

    def _create_collection(self, meta: dict[str, Any]) -> bool:
        body: dict[str, Any] = {"name": meta["collection"], "dim": meta["dim"]}
        if self.capacity:
            body["capacity"] = self.capacity
        response = self._write_http.post("/v1/collections", json=body)
        if response.status_code in (200, 201):
            log.info("created collection %s (dim=%d)", meta["collection"], meta["dim"])
            return True
        log.error(
            "could not create collection %s: HTTP %d %s",
            meta["collection"],
            response.status_code,
            response.text[:300],
        )
        return False

    def _probe(self) -> bool:
        try:
            ok = self._write_http.get("/v1/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        (self._breaker.success if ok else self._breaker.failure)()
        return ok

    # -------------------------------------------------------------------------------- reads
    def _read(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request on the reader thread; None (and a breaker failure) if the service failed."""
        try:
            response = self._read_http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self._breaker.failure()
            self._count("read_failures")
            log.debug("read %s failed: %s", path, exc)
            return None
        self.latency.record("read", response.elapsed.total_seconds())
        if response.status_code >= 500:
            self._breaker.failure()
            self._count("read_failures")
            return None
        self._breaker.success()
        return response

    def _arrays(
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
            self._count("read_failures")
            log.warning("%s: unreadable answer (%s)", what, exc)
            return None
        return arrays

    async def _on_reader(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.wrap_future(self._reader.submit(fn, *args))

    async def health_check(self) -> bool:
        """True if the service answers; False at once while the breaker is open (until a probe)."""
        if self._closed or not self._breaker.may_probe():
            return False
        response = await self._on_reader(self._read, "GET", "/v1/health")
        return response is not None and response.status_code == 200

    def _submit_sample(
        self, key: tuple[int, bool, float], batches: int
    ) -> Future[list[ReplayBatch] | None]:
        """Queue a sample request on the reader thread; a seeded client draws its seed and notes
        its row bound here, in the learner's order, so they do not depend on timing."""
        seed = rows = None
        if self._sample_rng is not None:
            seed, rows = int(self._sample_rng.integers(2**63 - 1)), self._rows_in
        return self._reader.submit(self._sample, key, batches, seed, rows)

    def _sample(
        self,
        key: tuple[int, bool, float],
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
            if not self._deliver_rows(rows, self.read_timeout):
                log.debug("sampling before this client's first %d rows reached the service", rows)
            end_id = self._end_id(rows)
            if end_id is not None:
                params["end_id"] = end_id
        response = self._read(
            "GET",
            f"/v1/collections/{self.collection}/sample",
            params=params,
            headers={"accept": wire.CONTENT_TYPE},
        )
        arrays = self._arrays(response, "sample", _BATCH_FIELDS)
        if arrays is None:
            return None
        return [
            _batch_from(
                {
                    name: value[i * batch_size : (i + 1) * batch_size]
                    for name, value in arrays.items()
                }
            )
            for i in range(batches)
        ]

    async def get_replay_batch(
        self, batch_size: int = 32, *, prioritized: bool = False, beta: float = 0.4
    ) -> ReplayBatch | None:
        """A replay batch from the service; None when it is unavailable or the collection is empty.

        With ``prefetch`` on, batches come ``prefetch_batches`` per request, and the next request
        goes out while the learner works through the current ones, so a batch is usually ready
        when asked for. A prioritized batch may then predate the latest priority updates by a
        few steps, as with any prefetching replay (Reverb, Ape-X).
        """
        if batch_size < 1 or not 0.0 <= beta <= 1.0:
            raise ValueError(
                f"batch_size must be >= 1 and beta in [0, 1], got {batch_size}, {beta}"
            )
        if self._closed or self._breaker.is_open:
            self._count("reads_skipped")
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
                self._count("prefetch_hits")
            batches = await asyncio.wrap_future(self._in_flight)
            self._in_flight = None
            if not batches:
                return None
            self._ready.extend(batches)
        elif self._in_flight is not None and self._in_flight.done():
            self._ready.extend(self._in_flight.result() or [])
            self._in_flight = None
            self._count("prefetch_hits")
        else:
            self._count("prefetch_hits")
        batch = self._ready.popleft()
        if (
            self.prefetch
            and self._in_flight is None
            and len(self._ready) < per_request
            and not self._closed
        ):
            self._in_flight = self._submit_sample(key, per_request)
        return batch

    async def update_priorities(self, ids: Any, priorities: Any) -> None:
        """Send new priorities for sampled ids without waiting for the answer.

        Priorities are a sampling hint: while the breaker is open, or if updates pile up faster
        than the service takes them, they are skipped (counted in ``priority_updates_skipped``).
        """
        ids_a = np.asarray(_numpy(ids), dtype=np.int64).reshape(-1)
        values = np.asarray(_numpy(priorities), dtype=np.float32).reshape(-1)
        if len(ids_a) != len(values):
            raise ValueError(f"{len(ids_a)} ids but {len(values)} priorities")
        with self._count_lock:
            busy = self._priority_updates_in_flight >= _MAX_PRIORITY_UPDATES_IN_FLIGHT
            if not busy:
                self._priority_updates_in_flight += 1
        if busy or self._closed or self._breaker.is_open:
            if not busy:
                self._priority_update_finished()
            self._count("priority_updates_skipped")
            return
        body = wire.encode({"ids": ids_a, "priorities": values})
        future = self._reader.submit(
            self._read,
            "POST",
            f"/v1/collections/{self.collection}/priorities",
            content=body,
            headers={"content-type": wire.CONTENT_TYPE},
        )
        future.add_done_callback(self._priority_update_done)

    def _priority_update_finished(self) -> None:
        with self._count_lock:
            self._priority_updates_in_flight -= 1

    def _priority_update_done(self, future: Future[httpx.Response | None]) -> None:
        self._priority_update_finished()
        failed = future.cancelled() or future.exception() is not None
        response = None if failed else future.result()
        if response is None or response.status_code != 200:
            self._count("priority_updates_skipped")

    def _search(self, states: np.ndarray, k: int) -> SimilarExperiences | None:
        """One request per ``_MAX_QUERIES`` states (the service's default limit), joined."""
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(states), _MAX_QUERIES):
            if self._breaker.is_open:
                return None
            response = self._read(
                "POST",
                f"/v1/collections/{self.collection}/search",
                params={"k": k},
                content=wire.encode({"states": states[start : start + _MAX_QUERIES]}),
                headers={"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE},
            )
            fields = ("distances", "query_index", *_BATCH_FIELDS[:-1])
            arrays = self._arrays(response, "search", fields)
            if arrays is None:
                return None
            arrays["query_index"] = arrays["query_index"] + start
            parts.append(arrays)
        arrays = parts[0] if len(parts) == 1 else {
            name: np.concatenate([part[name] for part in parts]) for name in parts[0]
        }
        if len(arrays["ids"]) == 0:
            return None
        return SimilarExperiences(_batch_from(arrays), arrays["distances"], arrays["query_index"])

    async def search_similar(
        self, states: Any, k: int = 5, *, read_own_writes: bool = False
    ) -> SimilarExperiences | None:
        """The k stored transitions nearest to each state ([D] or [Q, D]); None if unavailable.

        Writes are queued (see the module docstring), so a search right after a store would not
        find it. ``read_own_writes`` first delivers what this client queued before the call (for
        its collection; waiting at most ``read_timeout``), so the search sees this client's own
        writes. The training loop leaves it off: it must not wait for a round trip per step.
        """
        queries = np.asarray(_numpy(states), dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or not np.isfinite(queries).all():
            raise ValueError(f"states must be finite, of shape [D] or [Q, D], got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._closed or self._breaker.is_open:
            self._count("reads_skipped")
            return None
        if read_own_writes and not await self._deliver_queued(self.read_timeout):
            log.debug("searching before this client's queued writes reached the service")
        return await self._on_reader(self._search, queries, k)
