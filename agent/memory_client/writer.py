"""The Memory client's write path: staging, the outbox, and the writer thread that delivers it.

Storing must cost the training loop a copy and nothing more, whatever the service is doing. So
``write`` checks rows and copies them into a staging block; full blocks (and, every
``flush_interval``, partial ones) are encoded into an :class:`~agent.memory_client.outbox.Outbox`
file with an idempotency key (client id + sequence number); a thread of its own, with its own
synchronous httpx client, delivers the files oldest first and deletes each once the service has
acknowledged it. Retries after a lost answer never store a batch twice: the service keeps a key
at most once.

It also keeps this client's row ledger (rows queued, rows settled, the ids the service gave them),
which the read path uses to see its own writes: :meth:`Writer.deliver_rows` is the one flush path
of reads that must (read-your-own-writes search, seeded replay), and :meth:`Writer.end_id` bounds
a seeded sample to exactly the rows queued when it was asked for.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np

from agent.memory_client.batches import as_numpy
from agent.memory_client.breaker import CircuitBreaker
from agent.memory_client.outbox import Outbox, OutboxEntry
from agent.memory_client.stats import Counters, LatencyWindow
from agent.memory_client.steps import Blocking, Steps, run_blocking
from memory import wire

log = logging.getLogger(__name__)


class Writer:
    """Stages rows, spools them into the outbox, and delivers the outbox on its own thread.

    ``http`` is used on the writer thread only (and closed by :meth:`stop`); ``breaker``,
    ``latency`` and ``counters`` are shared with the read path.
    """

    def __init__(
        self,
        *,
        http: httpx.Client,
        outbox: Outbox,
        breaker: CircuitBreaker,
        latency: LatencyWindow,
        counters: Counters,
        collection: str,
        capacity: int | None,
        batch_rows: int,
        flush_interval: float,
    ) -> None:
        self.http = http
        self.outbox = outbox
        self.collection = collection
        self.capacity = capacity
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self._breaker = breaker
        self._latency = latency
        self._counters = counters
        # This client's rows: queued so far, and settled (acknowledged, or refused or dropped for
        # good); the collection id its first row got, and the id after its latest acknowledged row.
        self._rows_in = 0
        self._rows_settled = 0
        self._id_base: int | None = None
        self._id_end = 0
        # Staging: rows copied in by write(), not yet encoded into an outbox file.
        self.client_id = uuid.uuid4().hex[:16]
        self._seq = 0
        self._dim: int | None = None
        self._block: dict[str, np.ndarray] = {}
        self._staged = 0
        self._staged_since = 0.0
        self._last_drop_log = -math.inf
        self._stage_lock = threading.Lock()
        self._drained = threading.Condition()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.closed = False
        self._thread = threading.Thread(target=self._write_loop, name="memory-writer", daemon=True)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new rows, stop the writer thread and close its connection. Whatever is still
        in the outbox stays there (call :meth:`flush` first to deliver it)."""
        self.closed = True
        self._stopping.set()
        self._wake.set()
        self._thread.join(5.0)
        self.http.close()

    @property
    def rows_in(self) -> int:
        """How many rows this client has queued so far (accepted by :meth:`write`)."""
        return self._rows_in

    @property
    def queued_rows(self) -> int:
        """Rows not yet acknowledged: staged, or waiting in the outbox."""
        return self._staged + self.outbox.rows

    # -------------------------------------------------------------------------------- staging
    def write(
        self,
        obs: Any,
        actions: Any,
        rewards: Any,
        next_obs: Any,
        dones: Any,
        episode_returns: Any = None,
        priorities: Any = None,
    ) -> None:
        """Check a batch ([B, D] observations, [B] the rest) and stage it; never waits for the
        network. Raises ValueError for rows the service would refuse, RuntimeError once closed."""
        self._stage(*self.check(obs, actions, rewards, next_obs, dones, episode_returns, priorities))

    def check(
        self,
        obs: Any,
        actions: Any,
        rewards: Any,
        next_obs: Any,
        dones: Any,
        episode_returns: Any = None,
        priorities: Any = None,
    ) -> tuple[np.ndarray, ...]:
        """The columns as the arrays the service stores; ValueError for rows it would refuse."""
        obs_a = np.asarray(as_numpy(obs), dtype=np.float32)
        next_a = np.asarray(as_numpy(next_obs), dtype=np.float32)
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
            array = as_numpy(value)
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
        returns_a = self._optional_column("episode_returns", episode_returns, rows)
        if np.isinf(returns_a).any():
            raise ValueError("episode_returns must be finite (NaN: unknown)")
        priorities_a = self._optional_column("priorities", priorities, rows)
        with np.errstate(invalid="ignore"):
            if np.isinf(priorities_a).any() or (priorities_a < 0).any():
                raise ValueError("priorities must be finite and >= 0 (NaN: the service's default)")
        return obs_a, actions_a, rewards_a, next_a, dones_a, returns_a, priorities_a

    @staticmethod
    def _optional_column(name: str, value: Any, rows: int) -> np.ndarray:
        """A float32 [rows] column, all NaN (the service's default) when ``value`` is None."""
        if value is None:
            return np.full(rows, np.nan, dtype=np.float32)
        array = as_numpy(value).astype(np.float32)
        if array.size != rows:
            raise ValueError(f"{name} must hold {rows} values, got {array.shape}")
        return array.reshape(rows)

    def _stage(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        dones: np.ndarray,
        episode_returns: np.ndarray,
        priorities: np.ndarray,
    ) -> None:
        if self.closed:
            raise RuntimeError("MemoryClient is closed")
        columns = {
            "obs": obs,
            "actions": actions,
            "rewards": rewards,
            "next_obs": next_obs,
            "dones": dones,
            "episode_returns": episode_returns,
            "priorities": priorities,
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
            "client_id": self.client_id,
            "seq": self._seq,
            "collection": self.collection,
            "dim": self._dim,
            "rows": rows,
        }
        arrays = {name: value[:rows] for name, value in self._block.items()}
        for optional in ("episode_returns", "priorities"):  # all NaN: the service's default
            if np.isnan(arrays[optional]).all():
                del arrays[optional]
        payload = wire.encode(arrays, meta)
        self._seq += 1
        self._staged = 0
        if not self.outbox.put(payload, rows):
            self._counters.add("dropped", rows)
            self.settle(rows)
            if time.monotonic() - self._last_drop_log > 60.0:  # once a minute, not once a batch
                self._last_drop_log = time.monotonic()
                log.error(
                    "outbox %s is full (%d bytes): dropping rows until the service takes some "
                    "(%d dropped so far)",
                    self.outbox.directory,
                    self.outbox.max_bytes,
                    self._counters["dropped"],
                )
        self._wake.set()

    def spool_partial(self, min_age: float = 0.0) -> None:
        """Spool a partly filled staging block once its oldest row is ``min_age`` seconds old."""
        with self._stage_lock:
            if self._staged and time.monotonic() - self._staged_since >= min_age:
                self._spool()

    # ---------------------------------------------------------------------- waiting for delivery
    def flush_steps(self, timeout: float | None) -> Steps[bool]:
        """Wait until everything queued so far is acknowledged; False if ``timeout`` ran out.

        Spools and wakes the writer at once (on the caller's thread); only the wait is yielded."""
        self.spool_partial()
        if not len(self.outbox):
            return True
        self._wake.set()
        drained: bool = yield Blocking(self.wait_drained, (timeout,))
        return drained

    def flush(self, timeout: float | None) -> bool:
        """:meth:`flush_steps`, blocking."""
        return run_blocking(self.flush_steps(timeout))

    def wait_drained(self, timeout: float | None) -> bool:
        """Block until the outbox is empty (or the writer stops); False on timeout."""
        with self._drained:
            self._drained.wait_for(
                lambda: not len(self.outbox) or self._stopping.is_set(), timeout
            )
        return not len(self.outbox)

    def deliver_rows(self, rows: int, timeout: float | None) -> bool:
        """Block until this client's first ``rows`` rows are settled (acknowledged, or refused for
        good); False on timeout. Spools and wakes the writer only when they are not yet: the one
        flush path of reads that must see this client's writes (search, seeded replay)."""
        if self._rows_settled >= rows:
            return True
        self.spool_partial()
        self._wake.set()
        with self._drained:
            self._drained.wait_for(
                lambda: self._rows_settled >= rows or self._stopping.is_set(), timeout
            )
        return self._rows_settled >= rows

    def settle(self, rows: int, first_id: int | None = None) -> None:
        """Count rows of this client settled in queue order; ``first_id``: where the service put
        them (consecutive ids), for :meth:`end_id`."""
        with self._drained:
            if first_id is not None:
                if self._id_base is None:
                    self._id_base = first_id - self._rows_settled
                self._id_end = first_id + rows
            self._rows_settled += rows
            self._drained.notify_all()

    def end_id(self, rows: int) -> int | None:
        """The collection id after this client's first ``rows`` rows (None before any is stored).

        Assumes this client's rows got consecutive ids, which holds while it is the only writer
        (a collection per run); never beyond the last id acknowledged."""
        if self._id_base is None or rows <= 0:
            return None
        return min(self._id_base + rows, self._id_end)

    # ----------------------------------------------------------------------- the writer thread
    def _write_loop(self) -> None:
        """The writer thread: spool partial blocks on time, deliver the outbox, probe when open."""
        while not self._stopping.is_set():
            try:
                self.spool_partial(self.flush_interval)
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
        while (entry := self.outbox.peek()) is not None and not self._stopping.is_set():
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
            own = meta.get("client_id") == self.client_id
            if status < 300:
                self._breaker.success()
                if duplicate:
                    self._counters.add("duplicates", entry.rows)
                self._finish(entry, "delivered")
                if own:
                    first_id = answer.get("first_id")
                    self.settle(entry.rows, first_id if isinstance(first_id, int) else None)
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
                    self.settle(entry.rows)
        if self._breaker.is_open and self._breaker.may_probe():
            self._probe()
        return self._breaker.seconds_to_probe() if self._breaker.is_open else 0.5

    def _post_batch(self, meta: dict[str, Any], payload: bytes, key: str) -> httpx.Response:
        """POST one outbox batch; if the collection is missing, create it and post once more."""
        path = f"/v1/collections/{meta['collection']}/transitions"
        headers = {"content-type": wire.CONTENT_TYPE, "idempotency-key": key}
        response = self.http.post(path, content=payload, headers=headers)
        self._latency.record("write", response.elapsed.total_seconds())
        if response.status_code == 404 and self._create_collection(meta):
            response = self.http.post(path, content=payload, headers=headers)
            self._latency.record("write", response.elapsed.total_seconds())
        return response

    def _finish(self, entry: OutboxEntry, outcome: str) -> None:
        self._counters.add(outcome, entry.rows)
        if outcome == "delivered":
            self.outbox.delivered(entry)
        else:
            self.outbox.rejected(entry)
        with self._drained:
            self._drained.notify_all()

    def _write_failed(self, reason: str) -> float:
        self._breaker.failure()
        self._counters.add("retries")
        log.debug("delivery failed (%s); retrying", reason)
        if self._breaker.is_open:
            return self._breaker.seconds_to_probe()
        return 0.05 * random.uniform(0.5, 1.5)

    def _create_collection(self, meta: dict[str, Any]) -> bool:
        body: dict[str, Any] = {"name": meta["collection"], "dim": meta["dim"]}
        if self.capacity:
            body["capacity"] = self.capacity
        response = self.http.post("/v1/collections", json=body)
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
            ok = self.http.get("/v1/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        (self._breaker.success if ok else self._breaker.failure)()
        return ok
