"""Training through the real Memory service: a crash mid-run loses and duplicates nothing, and a
service that is down from the start costs training nothing but is reported in the metrics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent import InMemorySink, LearningAgent, MemoryClient, TrainingManager
from memory import wire
from tests.integration import memory_fixtures
from tests.integration.memory_fixtures import MemoryServer, free_port

memory_server = memory_fixtures.memory_server

pytestmark = pytest.mark.integration

FIELDS = ("obs", "actions", "rewards", "next_obs", "dones")


def make_trainer(config: Any, client: MemoryClient | None, sink: InMemorySink) -> TrainingManager:
    agent = LearningAgent(4, 2, config=config)
    return TrainingManager(
        agent, client, task_type="CartPole-v1", metrics_sink=sink, tensorboard=False
    )


def stored_rows(server: MemoryServer, collection: str) -> dict[str, np.ndarray]:
    """Every row of a collection, in id order (the order the service stored them)."""
    parts: list[dict[str, np.ndarray]] = []
    first = 0
    with server.client() as http:
        while True:
            response = http.get(
                f"/v1/collections/{collection}/transitions",
                params={"first_id": first, "limit": 65536},
                headers={"accept": wire.CONTENT_TYPE},
            )
            assert response.status_code == 200, response.text
            arrays = wire.decode(response.content)[0]
            if not len(arrays["ids"]):
                break
            parts.append(arrays)
            first = int(arrays["ids"][-1]) + 1
    return {name: np.concatenate([p[name] for p in parts]) for name in ("ids", *FIELDS)}


def local_rows(trainer: TrainingManager) -> dict[str, np.ndarray]:
    """Every transition the run generated: the local buffer is large enough to hold them all."""
    buffer = trainer.agent.buffer
    assert buffer.size == trainer.global_step < buffer.capacity
    return {name: getattr(buffer._storage, name)[: buffer.size].numpy() for name in FIELDS}


def test_training_rides_out_a_kill_9_and_stores_every_transition_exactly_once(
    memory_server: MemoryServer, small_config: Any, tmp_path: Path
) -> None:
    config = small_config(
        "train.num_envs=4",  # Gymnasium's vector CartPole: rows that reset store nothing
        "replay.local_buffer_size=200000",
        "replay.memory_batch_size=16",
        "replay.similar_batch_size=8",  # knowledge transfer: neighbours join the batch
        "memory.prioritized=true",
        "train.max_episodes=null",
    )
    client = MemoryClient(
        memory_server.url,
        collection="crash-run",
        outbox_dir=tmp_path / "outbox",
        batch_rows=256,
        breaker_reset=0.05,
        breaker_max_reset=0.2,
    )
    sink = InMemorySink()
    trainer = make_trainer(config, client, sink)
    seen: dict[str, Any] = {}

    async def steps(target: int) -> None:
        while trainer.global_step < target:
            await asyncio.sleep(0.005)

    async def chaos() -> None:
        await steps(1500)
        memory_server.kill()  # SIGKILL mid-run: whatever it had acknowledged must survive
        seen["killed_at"] = trainer.global_step
        await steps(seen["killed_at"] + 1500)  # training goes on against a dead service
        seen["down"] = client.metrics()
        await asyncio.to_thread(memory_server.start)  # training goes on while it restarts
        deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
        while client.metrics()["breaker_open"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the client's next probe finds the service back
        seen["back_at"] = trainer.global_step
        await steps(seen["back_at"] + 1500)
        trainer.request_stop()

    async def run() -> None:
        chaos_task = asyncio.create_task(chaos())
        await trainer.train(total_timesteps=1_000_000)  # stopped by chaos()
        await chaos_task
        assert await client.flush(30)
        seen["final"] = client.metrics()
        await client.close()

    asyncio.run(run())
    trainer.close()

    down, final = seen["down"], seen["final"]
    assert down["breaker_open"] == 1.0 and down["healthy"] == 0.0
    assert down["queued_writes"] > 0 and down["dropped"] == 0
    assert seen["killed_at"] < seen["back_at"] < trainer.global_step
    assert trainer.agent.training_steps > 0
    # The outage is in the trainer's metrics, and so is the recovery.
    healthy = [value for _, value in sink.series("memory/healthy")]
    assert 0.0 in healthy and healthy[-1] == 1.0
    assert max(value for _, value in sink.series("memory/queued_writes")) > 0
    # Memory batches and similar experiences joined the learning batches (before and after).
    assert max(value for _, value in sink.series("train/memory_batches")) > 0
    assert max(value for _, value in sink.series("train/similar_rows")) > 0

    # Every generated transition is stored exactly once, in the order it was generated.
    generated, stored = local_rows(trainer), stored_rows(memory_server, "crash-run")
    assert len(stored["ids"]) == trainer.global_step == final["delivered"] - final["duplicates"]
    assert stored["ids"].tolist() == list(range(trainer.global_step))
    for name in FIELDS:
        np.testing.assert_array_equal(stored[name], generated[name].astype(stored[name].dtype))
    assert final["dropped"] == 0 and final["queued_writes"] == 0 and final["rejected"] == 0
    with memory_server.client() as http:
        stats = http.get("/v1/collections/crash-run/stats").json()
    assert stats["priority_updates"] > 0  # prioritized replay sent TD errors back


def test_training_with_the_service_down_from_the_start_completes_and_reports_it(
    small_config: Any, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here (yet)
    config = small_config("replay.local_buffer_size=10000", "replay.similar_batch_size=8")
    client = MemoryClient(
        f"http://127.0.0.1:{port}",
        collection="late",
        outbox_dir=tmp_path / "outbox",
        batch_rows=128,
        breaker_reset=0.05,
        breaker_max_reset=0.2,
    )
    sink = InMemorySink()
    trainer = make_trainer(config, client, sink)
    summary = asyncio.run(trainer.train(total_timesteps=1500))
    assert summary["global_step"] == 1500 and trainer.agent.training_steps > 0
    # Local replay only: no memory batch was ever used, the outage is in the metrics.
    assert all(value == 0 for _, value in sink.series("train/memory_batches"))
    final_window = sink.rows[-1][1]
    assert final_window["memory/healthy"] == 0.0 and final_window["memory/breaker_open"] == 1.0
    assert final_window["memory/dropped"] == 0
    assert client.metrics()["queued_writes"] == 1500  # everything waits in the outbox

    # The service comes up later: the queued writes arrive, all of them, once.
    server = MemoryServer(tmp_path / "memory-data")
    server.port = port
    server.start()
    try:
        assert asyncio.run(client.flush(30))
        asyncio.run(client.close())
        metrics = client.metrics()
        assert metrics["delivered"] == 1500 and metrics["queued_writes"] == 0
        stored = stored_rows(server, "late")
        generated = local_rows(trainer)
        np.testing.assert_array_equal(stored["obs"], generated["obs"])
    finally:
        server.kill()
        trainer.close()


def test_the_specs_memory_examples_work_as_written(memory_server: MemoryServer) -> None:
    """The spec's Memory System Integration snippet, against the real service."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(65, 4)).astype(np.float32)
    agent = LearningAgent(input_size=4, output_size=2, hidden_size=16)

    async def run() -> tuple[Any, Any, dict[str, float]]:
        async with MemoryClient(base_url=memory_server.url, timeout=30) as memory_client:
            assert await memory_client.health_check()
            for i in range(64):
                await agent.store_experience(
                    state=states[i],
                    action=int(i % 2),
                    reward=float(i),
                    next_state=states[i + 1],
                    done=i == 63,
                    memory_client=memory_client,
                )
            assert await memory_client.flush(10)
            losses = await agent.learn_from_experiences(
                memory_client=memory_client, gamma=0.99, local_batch_size=32
            )
            similar_experiences = await agent.get_similar_experiences(
                state=states[10], memory_client=memory_client, k=5
            )
            return losses, similar_experiences, memory_client.metrics()

    losses, similar, metrics = asyncio.run(run())
    assert metrics["delivered"] == 64 and metrics["queued_writes"] == 0
    assert losses is not None and losses["memory_batches"] == 1
    assert losses["loss"] == pytest.approx(losses["loss_local"] + losses["loss_memory"], rel=1e-5)
    assert similar is not None and len(similar.batch.ids) == 5
    assert similar.batch.ids[0] == 10 and similar.distances[0] == 0.0  # itself, then neighbours
    np.testing.assert_array_equal(similar.batch.obs[0], states[10])
    assert similar.batch.rewards[0] == 10.0 and similar.batch.actions[0] == 0


def test_one_seed_gives_the_same_weights_however_the_writes_are_timed(
    memory_server: MemoryServer, small_config: Any
) -> None:
    """Replay through the service is reproducible: each sample request carries a seed from the
    client's seeded generator and the number of rows it had queued, and the service draws from
    exactly those rows. One run delivers its writes at once, the other a second late (so every
    sample waits for a flush): same batches, same losses, same weights."""
    config = small_config(
        f"memory.base_url={memory_server.url}",
        "replay.memory_batch_size=16",
        "train.max_episodes=null",
    )

    def train(collection: str, flush_interval: float) -> tuple[TrainingManager, InMemorySink]:
        client = MemoryClient.from_config(
            config, collection=collection, flush_interval=flush_interval, batch_rows=4096
        )
        sink = InMemorySink()
        trainer = make_trainer(config, client, sink)
        asyncio.run(trainer.train(total_timesteps=1500))
        client.shutdown()
        trainer.close()
        return trainer, sink

    eager, eager_sink = train("seeded-eager", 0.0)
    late, late_sink = train("seeded-late", 1.0)
    assert max(value for _, value in eager_sink.series("train/memory_batches")) > 0
    for name in ("train/loss", "train/loss_memory", "rollout/reward_mean"):
        assert eager_sink.series(name) == late_sink.series(name), name
    for key, value in eager.agent.q_network.state_dict().items():
        assert torch.equal(value, late.agent.q_network.state_dict()[key]), key
