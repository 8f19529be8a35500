"""MemoryClient's blocking API against the real service: the same operations as the async API,
and, for one seed, bitwise the same replay batches whichever API (or mix of them) asks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.memory_client import MemoryClient, ReplayBatch, SimilarExperiences
from tests.integration import memory_fixtures
from tests.integration.memory_fixtures import MemoryServer, transitions

shared_memory_server = memory_fixtures.shared_memory_server

pytestmark = pytest.mark.integration


def test_blocking_round_trip(shared_memory_server: MemoryServer, tmp_path: Path) -> None:
    data = transitions(300, 3)
    with MemoryClient(
        shared_memory_server.url, collection="sync-rt", outbox_dir=tmp_path, batch_rows=64
    ) as client:
        assert client.is_healthy()
        assert client.sample_replay(8) is None  # no collection yet
        client.write_transitions(**{name: value[:200] for name, value in data.items()})
        # read_own_writes delivers what was queued before the search, without a flush
        similar = client.find_similar(data["obs"][150], k=3, read_own_writes=True)
        assert isinstance(similar, SimilarExperiences)
        assert similar.batch.ids[0] == 150 and similar.distances[0] == 0.0
        client.write_transitions(
            **{name: value[200:] for name, value in data.items()},
            episode_returns=np.full(100, 7.0),
        )
        assert client.deliver(10)
        assert client.metrics()["delivered"] == 300 and client.metrics()["queued_writes"] == 0
        batch = client.sample_replay(32)
        assert isinstance(batch, ReplayBatch) and batch.obs.shape == (32, 3)
        np.testing.assert_array_equal(batch.obs, data["obs"][batch.ids])
        np.testing.assert_array_equal(batch.actions, data["actions"][batch.ids])
        assert (batch.weights == 1.0).all()
        for _ in range(20):  # served from prefetched batches
            assert client.sample_replay(32).obs.shape == (32, 3)
        assert client.metrics()["prefetch_hits"] > 0
        prioritized = client.sample_replay(16, prioritized=True, beta=0.5)
        assert prioritized is not None and prioritized.weights.max() == pytest.approx(1.0)
        client.send_priorities(prioritized.ids, np.abs(prioritized.rewards) + 0.1)
        many = client.find_similar(data["obs"][:4], k=2)
        assert many is not None and many.query_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        tagged = client.find_similar(data["obs"][250], k=1)
        assert tagged is not None and tagged.batch.episode_returns.tolist() == [7.0]
    assert client.metrics()["priority_updates_skipped"] == 0


# How the learner asks: (batch_size, prioritized) per step, with stores in between.
STEPS = [(32, False)] * 20 + [(16, False)] * 5 + [(32, False)] * 40


def _seeded_client(server: MemoryServer, collection: str, outbox: Path) -> MemoryClient:
    return MemoryClient(
        server.url, collection=collection, outbox_dir=outbox, seed=11, prefetch_batches=4
    )


def _store(client: MemoryClient, step: int) -> dict[str, np.ndarray]:
    rows = transitions(40, 4, seed=step, start=40 * step)
    client.write_transitions(**rows)
    return rows


def _sample_blocking(server: MemoryServer, collection: str, outbox: Path) -> list[ReplayBatch]:
    with _seeded_client(server, collection, outbox) as client:
        batches = []
        for step, (size, prioritized) in enumerate(STEPS):
            _store(client, step)
            batches.append(client.sample_replay(size, prioritized=prioritized))
        return batches


def _sample_async(server: MemoryServer, collection: str, outbox: Path) -> list[ReplayBatch]:
    async def run() -> list[ReplayBatch]:
        async with _seeded_client(server, collection, outbox) as client:
            batches = []
            for step, (size, prioritized) in enumerate(STEPS):
                await client.store_transitions(**transitions(40, 4, seed=step, start=40 * step))
                batches.append(await client.get_replay_batch(size, prioritized=prioritized))
                await asyncio.sleep(0.001 * (step % 3))  # other timing than the blocking run
            return batches

    return asyncio.run(run())


def _sample_mixed(server: MemoryServer, collection: str, outbox: Path) -> list[ReplayBatch]:
    client = _seeded_client(server, collection, outbox)
    try:
        batches = []
        for step, (size, prioritized) in enumerate(STEPS):
            if step % 2:
                _store(client, step)
                batches.append(client.sample_replay(size, prioritized=prioritized))
            else:
                rows = transitions(40, 4, seed=step, start=40 * step)
                asyncio.run(client.store_transitions(**rows))
                batches.append(asyncio.run(client.get_replay_batch(size, prioritized=prioritized)))
        return batches
    finally:
        client.shutdown()


def test_one_seed_gives_the_same_batches_blocking_or_async(
    shared_memory_server: MemoryServer, tmp_path: Path
) -> None:
    """Switching a learner from ``await get_replay_batch`` to ``sample_replay`` (or mixing them)
    changes no batch: both draw seeds and row bounds in call order, from one body."""
    runs = {
        "blocking": _sample_blocking(shared_memory_server, "sync-seed-blocking", tmp_path / "b"),
        "async": _sample_async(shared_memory_server, "sync-seed-async", tmp_path / "a"),
        "mixed": _sample_mixed(shared_memory_server, "sync-seed-mixed", tmp_path / "m"),
    }
    reference = runs.pop("async")
    assert all(batch is not None for batch in reference)
    assert len({int(batch.ids[0]) for batch in reference}) > 1  # not one batch over and over
    for name, batches in runs.items():
        assert len(batches) == len(reference), name
        for step, (ours, theirs) in enumerate(zip(batches, reference, strict=True)):
            for field in ("ids", "obs", "actions", "rewards", "next_obs", "dones", "weights"):
                a, b = getattr(ours, field), getattr(theirs, field)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, step, field)
        # Each batch is drawn only from rows stored before it was asked for.
        for step, batch in enumerate(batches):
            assert (batch.obs[:, 0] < 40 * (step + 1)).all(), (name, step)
