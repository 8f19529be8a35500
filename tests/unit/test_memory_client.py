"""MemoryClient on its own: input checks, the circuit breaker, the outbox, and a service that is
not there (a closed port on 127.0.0.1). Against a real service: tests/integration."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.memory_client import CircuitBreaker, MemoryClient, Outbox
from memory import wire
from tests.integration.memory_fixtures import free_port


def rows(n: int, dim: int = 3) -> dict[str, np.ndarray]:
    return {
        "obs": np.zeros((n, dim), np.float32),
        "actions": np.zeros(n, np.int64),
        "rewards": np.zeros(n, np.float32),
        "next_obs": np.ones((n, dim), np.float32),
        "dones": np.zeros(n, np.float32),
    }


@pytest.fixture
def nowhere() -> str:
    """A URL where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"obs": np.zeros(3, np.float32)}, r"must both be \[B, D\]"),
        ({"next_obs": np.zeros((2, 4), np.float32)}, r"must both be \[B, D\]"),
        ({"actions": np.zeros(3, np.int64)}, "actions must hold 2 values"),
        ({"rewards": np.array([0.0, np.nan], np.float32)}, "must be finite"),
        ({"obs": np.full((2, 3), np.inf, np.float32)}, "must be finite"),
        ({"dones": np.array([0.0, 0.5])}, "dones must be 0 or 1"),
    ],
)
def test_bad_rows_are_refused_before_they_are_queued(
    nowhere: str, tmp_path: Path, change: dict, message: str
) -> None:
    async def run() -> None:
        async with MemoryClient(nowhere, outbox_dir=tmp_path) as client:
            with pytest.raises(ValueError, match=message):
                await client.store_transitions(**{**rows(2), **change})
            assert client.metrics()["queued_writes"] == 0
            await client.close(flush_timeout=0)

    asyncio.run(run())


def test_observation_size_is_fixed_by_the_first_store(nowhere: str, tmp_path: Path) -> None:
    async def run() -> None:
        async with MemoryClient(nowhere, outbox_dir=tmp_path) as client:
            await client.store_transitions(**rows(2, dim=3))
            with pytest.raises(ValueError, match="observation size 4 differs from the 3"):
                await client.store_transitions(**rows(2, dim=4))
            await client.close(flush_timeout=0)

    asyncio.run(run())


def test_collection_names_are_checked() -> None:
    with pytest.raises(ValueError, match="collection name"):
        MemoryClient(collection="no spaces/or slashes")


def test_single_transitions_from_numpy_lists_or_tensors_are_queued(
    nowhere: str, tmp_path: Path
) -> None:
    async def run() -> dict[str, float]:
        client = MemoryClient(nowhere, outbox_dir=tmp_path, batch_rows=4)
        await client.store_experience(
            torch.zeros(3), torch.tensor(1), torch.tensor(0.5), torch.ones(3), torch.tensor(True)
        )
        await client.store_experience([0.0, 1.0, 2.0], 2, 1.0, np.ones(3), False)
        await client.store_experience(np.zeros(3), np.int64(0), np.float32(0.0), np.zeros(3), 1.0)
        metrics = client.metrics()
        await client.close(flush_timeout=0)
        return metrics

    assert asyncio.run(run())["queued_writes"] == 3


def test_a_down_service_costs_reads_nothing_and_keeps_writes(nowhere: str, tmp_path: Path) -> None:
    async def run() -> None:
        client = MemoryClient(nowhere, outbox_dir=tmp_path, batch_rows=50, breaker_reset=10.0)
        await client.store_transitions(**rows(120))
        assert not await client.flush(timeout=0.2)  # tries, fails fast (refused), opens the breaker
        deadline = time.monotonic() + 10  # a guard against hanging, not a timing assertion
        while not client.metrics()["breaker_open"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        metrics = client.metrics()
        assert (
            metrics["breaker_open"] == 1.0
            and metrics["healthy"] == 0.0
            and metrics["breaker_trips"] == 1
        )
        assert (
            metrics["retries"] >= 3 and metrics["queued_writes"] == 120 and metrics["dropped"] == 0
        )
        assert metrics["outbox_batches"] == 3 and metrics["outbox_bytes"] > 120 * 3 * 4
        # While the breaker is open, reads return None without touching the network.
        assert await client.get_replay_batch(32) is None
        assert await client.search_similar(np.zeros(3)) is None
        assert await client.health_check() is False
        await client.update_priorities([1, 2], [0.5, 0.5])
        after = client.metrics()
        assert after["reads_skipped"] == 2 and after["read_failures"] == 0
        assert after["priority_updates_skipped"] == 1
        await client.close(flush_timeout=0.1)

    asyncio.run(run())
    assert len(list(tmp_path.glob("*.mwb"))) == 3  # kept for the next client on this directory


def test_reads_that_fail_count_as_failures_and_return_none(nowhere: str, tmp_path: Path) -> None:
    async def run() -> None:
        async with MemoryClient(nowhere, outbox_dir=tmp_path, failure_threshold=100) as client:
            assert await client.get_replay_batch(8) is None
            assert await client.search_similar(np.zeros((2, 3)), k=2) is None
            assert await client.health_check() is False
            assert client.metrics()["read_failures"] == 3

    asyncio.run(run())


def test_a_full_outbox_drops_and_counts_instead_of_growing(nowhere: str, tmp_path: Path) -> None:
    one_batch = len(
        wire.encode(
            rows(10),
            {"client_id": "x" * 16, "seq": 0, "collection": "default", "dim": 3, "rows": 10},
        )
    )

    async def run() -> dict[str, float]:
        client = MemoryClient(
            nowhere, outbox_dir=tmp_path, batch_rows=10, max_outbox_bytes=3 * one_batch + 10
        )
        await client.store_transitions(**rows(100))
        metrics = client.metrics()
        await client.close(flush_timeout=0)
        return metrics

    metrics = asyncio.run(run())
    assert metrics["outbox_batches"] == 3 and metrics["dropped"] == 70
    assert metrics["queued_writes"] + metrics["dropped"] == 100


def test_a_client_can_be_used_from_successive_event_loops(nowhere: str, tmp_path: Path) -> None:
    client = MemoryClient(nowhere, outbox_dir=tmp_path)
    for _ in range(2):
        asyncio.run(client.store_transitions(**rows(3)))
        assert asyncio.run(client.get_replay_batch(4)) is None
    asyncio.run(client.close(flush_timeout=0))
    assert client.metrics()["queued_writes"] == 6


def test_breaker_opens_after_consecutive_failures_and_probes_with_backoff() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, reset=1.0, max_reset=3.0, clock=lambda: now[0])
    breaker.failure()
    assert not breaker.is_open
    breaker.success()  # resets the count
    breaker.failure()
    assert not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.may_probe() and breaker.trips == 1
    now[0] = 1.3
    assert breaker.may_probe()  # half-open: a probe may go
    breaker.failure()  # the probe failed: wait about twice as long
    assert breaker.is_open and not breaker.may_probe()
    assert 1.5 <= breaker.seconds_to_probe() <= 2.5
    now[0] = 10.0
    breaker.failure()
    assert breaker.seconds_to_probe() <= 3.0 * 1.2  # capped
    breaker.success()
    assert not breaker.is_open and breaker.may_probe() and breaker.trips == 1


def test_outbox_keeps_order_across_instances_and_sets_aside_what_cannot_be_sent(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path, max_bytes=10**6)
    for i in range(3):
        assert outbox.put(wire.encode({"x": np.arange(i + 1)}, {"rows": i + 1}), rows=i + 1)
    (tmp_path / "0000000000000099.tmp").write_bytes(b"half a batch")  # a crash mid-write
    again = Outbox(tmp_path, max_bytes=10**6)
    assert len(again) == 3 and again.rows == 6 and not list(tmp_path.glob("*.tmp"))
    first = again.peek()
    assert first is not None and first.rows == 1
    again.delivered(first)
    second = again.peek()
    assert second is not None and second.rows == 2
    again.rejected(second)
    assert (tmp_path / "rejected" / second.path.name).exists()
    assert again.peek().rows == 3 and again.rows == 3
    assert again.put(wire.encode({"x": np.arange(1)}, {"rows": 1}), rows=1)
    assert again.peek().rows == 3  # new files go to the back
    (tmp_path / "0000000000000050.mwb").write_bytes(b"not a batch")
    third = Outbox(tmp_path, max_bytes=10**6)
    assert third.peek().rows == 3 and len(third) == 2
    assert (tmp_path / "rejected" / "0000000000000050.mwb").exists()


def test_a_client_from_params_takes_every_memory_setting(tmp_path: Path) -> None:
    from agent.config import load_config

    config = load_config(
        overrides=[
            "memory.base_url=http://127.0.0.1:9/",
            "memory.collection=nav-beginner",
            "memory.capacity=5000",
            "memory.timeout=7",
            "memory.max_outbox_mb=2",
            "memory.flush_timeout=0.5",
        ]
    )
    client = MemoryClient.from_config(config, outbox_dir=tmp_path / "outbox")
    try:
        assert client.base_url == "http://127.0.0.1:9" and client.collection == "nav-beginner"
        assert client.capacity == 5000 and client.close_timeout == 0.5
        assert client._outbox.max_bytes == 2 * 2**20 and client._outbox.directory == tmp_path / "outbox"
        assert client._write_http.timeout.connect == 1.0 and client._write_http.timeout.read == 7
        assert MemoryClient.from_config(config.memory, collection="x").collection == "x"
    finally:
        client.shutdown(0)


def test_the_token_defaults_to_the_services_environment_variable(
    monkeypatch: pytest.MonkeyPatch, nowhere: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEMORY_TOKEN", "s3cret")
    client = MemoryClient(nowhere, outbox_dir=tmp_path)
    assert client._read_http.headers["authorization"] == "Bearer s3cret"
    client.shutdown(0)


def test_shutdown_without_an_event_loop_keeps_what_it_could_not_deliver(
    nowhere: str, tmp_path: Path
) -> None:
    client = MemoryClient(nowhere, outbox_dir=tmp_path, close_timeout=0.2)
    asyncio.run(client.store_transitions(**rows(5)))
    assert client.shutdown() is False  # close_timeout bounds the wait for a down service
    assert client.metrics()["queued_writes"] == 5 and len(list(tmp_path.glob("*.mwb"))) == 1
    assert client.shutdown() is False  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(client.store_transitions(**rows(1)))


def test_a_client_from_a_whole_config_is_seeded_and_auto_means_a_collection_of_its_own(
    tmp_path: Path,
) -> None:
    from agent.config import load_config

    config = load_config(overrides=["memory.base_url=http://127.0.0.1:9/", "run.seed=3"])
    clients = [MemoryClient.from_config(config, outbox_dir=tmp_path / str(i)) for i in range(2)]
    try:
        assert clients[0].collection != clients[1].collection
        assert clients[0].collection.startswith("client-")
        draws = [int(c._sample_rng.integers(2**63 - 1)) for c in clients]
        assert draws[0] == draws[1] == int(np.random.default_rng(3).integers(2**63 - 1))
        section_only = MemoryClient.from_config(config.memory, outbox_dir=tmp_path / "s")
        assert section_only._sample_rng is None  # no run.seed: the service draws as it likes
        section_only.shutdown(0)
    finally:
        for client in clients:
            client.shutdown(0)


# ------------------------------------------------------------------------------ blocking API
def test_the_blocking_api_checks_and_queues_rows_like_the_async_one(
    nowhere: str, tmp_path: Path
) -> None:
    with MemoryClient(nowhere, outbox_dir=tmp_path, close_timeout=0) as client:
        with pytest.raises(ValueError, match="dones must be 0 or 1"):
            client.write_transitions(**{**rows(2), "dones": np.array([0.0, 0.5])})
        client.write_transitions(**rows(3), episode_returns=np.array([1.0, np.nan, 2.0]))
        client.write_transitions(*(torch.as_tensor(v) for v in rows(2).values()))
        assert client.metrics()["queued_writes"] == 5
    with pytest.raises(RuntimeError, match="closed"):
        client.write_transitions(**rows(1))


def test_a_down_service_costs_blocking_reads_nothing(nowhere: str, tmp_path: Path) -> None:
    client = MemoryClient(nowhere, outbox_dir=tmp_path, breaker_reset=10.0)
    try:
        client.write_transitions(**rows(5))
        assert client.deliver(timeout=0.2) is False  # refused at once: the breaker opens
        deadline = time.monotonic() + 10  # a guard against hanging, not a timing assertion
        while not client.metrics()["breaker_open"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.metrics()["breaker_open"] == 1.0
        assert client.sample_replay(8) is None
        assert client.find_similar(np.zeros(3), k=2) is None
        assert client.is_healthy() is False
        client.send_priorities([1, 2], [0.5, 0.5])
        after = client.metrics()
        assert after["reads_skipped"] == 2 and after["read_failures"] == 0
        assert after["priority_updates_skipped"] == 1
    finally:
        client.shutdown(0)


def test_blocking_reads_that_fail_count_as_failures_and_return_none(
    nowhere: str, tmp_path: Path
) -> None:
    with MemoryClient(nowhere, outbox_dir=tmp_path, failure_threshold=100) as client:
        assert client.sample_replay(8) is None
        assert client.find_similar(np.zeros((2, 3)), k=2) is None
        assert client.is_healthy() is False
        assert client.metrics()["read_failures"] == 3
        with pytest.raises(ValueError, match="batch_size"):
            client.sample_replay(0)
        with pytest.raises(ValueError, match="k must be"):
            client.find_similar(np.zeros(3), k=0)
        with pytest.raises(ValueError, match="ids but"):
            client.send_priorities([1, 2], [0.5])
        assert client.deliver(timeout=0) is True  # nothing queued


def test_one_operation_body_waits_blocking_or_awaiting() -> None:
    """The drivers behind the two APIs: same answers, and a failure surfaces where it waited."""
    from concurrent.futures import Future

    from agent.memory_client.steps import Blocking, run_async, run_blocking

    def operation(fail: bool):  # type: ignore[no-untyped-def]
        done: Future[int] = Future()
        if fail:
            done.set_exception(KeyError("lost"))
        else:
            done.set_result(2)
        try:
            first = yield done
        except KeyError:
            first = -1
        second = yield Blocking(lambda a, b: a * b, (first, 5))
        return first, second

    assert run_blocking(operation(False)) == asyncio.run(run_async(operation(False))) == (2, 10)
    assert run_blocking(operation(True)) == asyncio.run(run_async(operation(True))) == (-1, -5)
