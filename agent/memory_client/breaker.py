"""The circuit breaker the Memory client's reader and writer threads share.

A learner must not pay a timeout per step while the service is down: after a few consecutive
failures the breaker opens, reads return ``None`` at once and writes wait in the outbox, and only
an occasional probe goes out until one succeeds. It knows nothing of HTTP, so it is tested with
a fake clock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


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
