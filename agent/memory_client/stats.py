"""What the Memory client reports about itself: event counters and round-trip latency.

The reader and writer threads record; the training loop reads once per logging window (through
``MemoryClient.metrics()``). Both are thread-safe and know nothing of HTTP, so the read and write
paths can share one of each without knowing about each other.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

# Every counter ``MemoryClient.metrics()`` reports, in the order it reports them (rows for the
# write outcomes, requests or calls for the rest).
COUNTER_NAMES: tuple[str, ...] = (
    "delivered",
    "duplicates",
    "dropped",
    "rejected",
    "retries",
    "read_failures",
    "reads_skipped",
    "prefetch_hits",
    "priority_updates_skipped",
)


class Counters:
    """Named event counts (see :data:`COUNTER_NAMES`); thread-safe."""

    def __init__(self, names: tuple[str, ...] = COUNTER_NAMES) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        """A copy of every count, in :data:`COUNTER_NAMES` order."""
        with self._lock:
            return dict(self._counts)


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
