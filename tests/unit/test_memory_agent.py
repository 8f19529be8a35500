"""The learner's side of the Memory service, against a fake client: prioritized memory batches
send TD errors back, similar experiences join every step's batch from one search per training
call, and rows of the wrong size are ignored instead of crashing training. (The real service:
tests/integration/test_memory_training.py.)"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest
import torch

from agent import LearningAgent, load_config
from agent.memory_client import ReplayBatch, SimilarExperiences


class FakeMemory:
    """Answers like MemoryClient: replay batches, neighbours (each query itself, k times)."""

    def __init__(self, dim: int = 4) -> None:
        self.dim = dim
        self.sample_calls: list[dict[str, Any]] = []
        self.searches: list[tuple[np.ndarray, int]] = []
        self.priority_updates: list[tuple[np.ndarray, np.ndarray]] = []
        self.rng = np.random.default_rng(0)

    def _batch(self, obs: np.ndarray, ids: np.ndarray) -> ReplayBatch:
        n = len(obs)
        return ReplayBatch(
            ids=ids.astype(np.int64),
            obs=obs.astype(np.float32),
            actions=self.rng.integers(0, 2, n),
            rewards=np.full(n, 3.0, np.float32),
            next_obs=obs.astype(np.float32),
            dones=np.zeros(n, np.float32),
            weights=np.full(n, 0.5, np.float32),
        )

    def sample_replay(
        self, batch_size: int = 32, *, prioritized: bool = False, beta: float = 0.4
    ) -> ReplayBatch:
        self.sample_calls.append({"batch_size": batch_size, "prioritized": prioritized, "beta": beta})
        obs = self.rng.normal(size=(batch_size, self.dim))
        return self._batch(obs, np.arange(batch_size) + 100 * len(self.sample_calls))

    def send_priorities(self, ids: Any, priorities: Any) -> None:
        self.priority_updates.append((np.asarray(ids), np.asarray(priorities)))

    def find_similar(self, states: Any, k: int = 5) -> SimilarExperiences:
        queries = np.asarray(states, dtype=np.float32)
        self.searches.append((queries, k))
        obs = np.repeat(queries, k, axis=0)
        if obs.shape[1] != self.dim:
            obs = np.zeros((len(obs), self.dim), np.float32)
        query_index = np.repeat(np.arange(len(queries)), k)
        return SimilarExperiences(
            self._batch(obs, np.arange(len(obs))), np.zeros(len(obs), np.float32), query_index
        )

    def write_transitions(self, *arrays: Any) -> None:
        pass


def make_agent(*overrides: str) -> LearningAgent:
    config = load_config(overrides=["network.hidden_size=16", "train.batch_size=8", *overrides])
    agent = LearningAgent(4, 2, config=config)
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(64, 4)).astype(np.float32)
    asyncio.run(agent.store_experience(obs, rng.integers(0, 2, 64), rng.normal(size=64), obs, np.zeros(64)))
    return agent


def test_prioritized_memory_batches_send_their_td_errors_back() -> None:
    agent = make_agent("memory.prioritized=true", "memory.priority_beta=0.7", "replay.memory_batch_size=6")
    memory = FakeMemory()
    stats = asyncio.run(agent.learn_from_experiences(memory_client=memory, gradient_steps=3))
    assert stats is not None and stats["memory_batches"] == 3
    assert memory.sample_calls == [{"batch_size": 6, "prioritized": True, "beta": 0.7}] * 3
    assert len(memory.priority_updates) == 3
    for (ids, priorities), call in zip(memory.priority_updates, range(1, 4)):
        assert ids.tolist() == list(range(100 * call, 100 * call + 6))  # the sampled rows' ids
        assert priorities.shape == (6,) and np.isfinite(priorities).all() and (priorities > 0).all()


def test_priorities_are_the_absolute_td_errors_of_the_memory_rows() -> None:
    agent = make_agent("memory.prioritized=true", "replay.memory_batch_size=5", "train.gamma=0.0")
    memory = FakeMemory()
    before = {k: v.clone() for k, v in agent.q_network.state_dict().items()}
    asyncio.run(agent.learn_from_experiences(memory_client=memory, gradient_steps=1))
    # With gamma 0 the target is the reward (3.0): |TD| = |Q(s, a) - 3| under the weights the
    # step started from.
    agent.q_network.load_state_dict(before)
    _, priorities = memory.priority_updates[0]
    sampled = FakeMemory().sample_replay(5)  # same seed: the batch it was given
    q = agent.q_values(sampled.obs).gather(1, torch.as_tensor(sampled.actions)[:, None]).squeeze(1)
    np.testing.assert_allclose(priorities, (q - 3.0).abs().numpy() + 1e-6, rtol=1e-4, atol=1e-5)


def test_uniform_memory_batches_send_no_priorities() -> None:
    agent = make_agent("replay.memory_batch_size=4")
    memory = FakeMemory()
    asyncio.run(agent.learn_from_experiences(memory_client=memory, gradient_steps=2))
    assert memory.sample_calls[0]["prioritized"] is False and memory.priority_updates == []


def test_similar_experiences_join_every_step_from_one_search() -> None:
    agent = make_agent("replay.memory_batch_size=0", "replay.similar_batch_size=8")
    memory = FakeMemory()
    stats = asyncio.run(agent.learn_from_experiences(memory_client=memory, gradient_steps=4))
    assert len(memory.searches) == 1  # one round trip per training call, not per step
    queries, k = memory.searches[0]
    assert k == 5 and queries.shape == (4 * 2, 4)  # ceil(8 / 5) = 2 query states per step
    assert stats is not None and stats["similar_rows"] == 8 and stats["memory_batches"] == 4
    assert stats["loss_memory"] > 0 and agent.last_similar_count == 8


def test_rows_of_another_observation_size_are_ignored_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = make_agent("replay.memory_batch_size=4")
    memory = FakeMemory(dim=3)  # a collection that holds another task's 3-feature states
    with caplog.at_level(logging.ERROR, logger="agent.dqn"):
        stats = asyncio.run(agent.learn_from_experiences(memory_client=memory, gradient_steps=3))
        asyncio.run(agent.learn_from_experiences(memory_client=memory, gradient_steps=1))
    assert stats is not None and stats["memory_batches"] == 0 and stats["loss_memory"] == 0
    messages = [r.getMessage() for r in caplog.records if "features" in r.getMessage()]
    assert len(messages) == 1 and "memory.collection" in messages[0]  # said once, not per step
