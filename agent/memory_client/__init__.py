"""The learner's client of the Memory service: ``from agent.memory_client import MemoryClient``.

One job per module, so each can be read (and tested) on its own:

- :mod:`~agent.memory_client.client`: :class:`MemoryClient`, which composes the parts below and
  offers each operation blocking and async (its docstring says how the client behaves and why);
- :mod:`~agent.memory_client.writer`: the write path (staging, spooling, the writer thread);
- :mod:`~agent.memory_client.reader`: the read path (the reader thread, sampling with prefetch,
  search, priority updates);
- :mod:`~agent.memory_client.outbox`: the bounded on-disk queue of undelivered batches;
- :mod:`~agent.memory_client.breaker`: the circuit breaker both paths share;
- :mod:`~agent.memory_client.stats`: event counters and round-trip latency;
- :mod:`~agent.memory_client.batches`: the batch types the client returns;
- :mod:`~agent.memory_client.steps`: how one operation body is run blocking or awaited.

The package imports httpx, numpy and :mod:`memory.wire` (which imports no server code).
"""

from agent.memory_client.batches import (
    Experience,
    NearestExperiences,
    ReplayBatch,
    SimilarExperiences,
)
from agent.memory_client.breaker import CircuitBreaker
from agent.memory_client.client import MemoryClient
from agent.memory_client.outbox import Outbox, OutboxEntry
from agent.memory_client.stats import LatencyWindow

__all__ = [
    "CircuitBreaker",
    "Experience",
    "LatencyWindow",
    "MemoryClient",
    "NearestExperiences",
    "Outbox",
    "OutboxEntry",
    "ReplayBatch",
    "SimilarExperiences",
]
