"""The learner: spec defaults, acting, one learning step, target networks, state round trip."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import numpy as np
import pytest
import torch

from agent import LearningAgent, TrainingDivergedError


def run(coro):
    return asyncio.run(coro)


def fill(agent: LearningAgent, n: int, seed: int = 0, gamma_zero_rewards: bool = False) -> None:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, agent.input_size)).astype(np.float32)
    actions = rng.integers(0, agent.output_size, n)
    rewards = rng.normal(size=n).astype(np.float32)
    run(agent.store_experience(obs, actions, rewards, obs + 0.1, np.zeros(n)))


def test_spec_defaults():
    agent = LearningAgent(input_size=4, output_size=2)
    assert agent.architecture.hidden_layers[0] == 256
    assert agent.learning_rate == pytest.approx(0.001)
    assert agent.gamma == pytest.approx(0.99)
    assert agent.buffer.capacity == 1000
    assert agent.config.train.batch_size == 32
    assert agent.training_steps == 0
    assert agent.device.type in {"cpu", "cuda"}


def test_keyword_arguments_override_params():
    agent = LearningAgent(3, 5, hidden_size=16, learning_rate=0.01, gamma=0.5, local_buffer_size=40, batch_size=4, device="cpu", seed=3)
    assert agent.architecture.hidden_layers == (16, 16)
    assert (agent.learning_rate, agent.gamma, agent.buffer.capacity) == (0.01, 0.5, 40)
    assert agent.config.train.batch_size == 4 and agent.config.run.seed == 3


def test_same_seed_same_weights():
    a, b, c = LearningAgent(4, 2, seed=1), LearningAgent(4, 2, seed=1), LearningAgent(4, 2, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in x.q_network.parameters()]) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(pa, torch.cat([p.flatten() for p in a.target_network.parameters()]))


def test_acting_is_greedy_at_zero_and_random_at_one():
    agent = LearningAgent(4, 3, hidden_size=16, seed=0)
    states = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    greedy = agent.act(states, epsilon=0.0)
    assert greedy.shape == (200,) and greedy.dtype == np.int64
    assert np.array_equal(greedy, agent.q_values(states).argmax(1).numpy())
    random_actions = agent.act(states, epsilon=1.0)
    counts = np.bincount(random_actions, minlength=3)
    assert counts.min() > 40  # roughly uniform over 3 actions
    assert isinstance(agent.select_action(states[0]), int)


def test_store_experience_single_and_batch():
    agent = LearningAgent(2, 2, hidden_size=8, local_buffer_size=10)
    run(agent.store_experience([0.0, 1.0], 1, 0.5, [1.0, 1.0], False))
    run(agent.store_experience(np.zeros((3, 2)), [0, 1, 0], [1, 2, 3], np.ones((3, 2)), [0, 0, 1]))
    assert len(agent.buffer) == 4


def test_learning_waits_for_a_full_batch():
    agent = LearningAgent(4, 2, hidden_size=8, batch_size=16)
    fill(agent, 10)
    assert run(agent.learn_from_experiences()) is None
    fill(agent, 10)
    stats = run(agent.learn_from_experiences())
    assert stats is not None and agent.training_steps == 1
    assert stats["loss"] == pytest.approx(stats["loss_local"]) and stats["loss_memory"] == 0.0


def test_loss_falls_on_a_fixed_batch():
    agent = LearningAgent(4, 2, hidden_size=32, batch_size=16, local_buffer_size=16, learning_rate=0.01, seed=0)
    fill(agent, 16)
    first = run(agent.learn_from_experiences(gamma=0.0))["loss"]
    for _ in range(30):
        last = run(agent.learn_from_experiences(gamma=0.0, gradient_steps=10))["loss"]
    assert last < first / 10
    assert agent.training_steps == 301


def test_double_dqn_target_uses_online_argmax_and_target_value():
    agent = LearningAgent(3, 4, hidden_size=8, batch_size=6, seed=0, train_overrides={"double_dqn": True})
    fill(agent, 6)
    with torch.no_grad():  # make the target network differ from the online one
        for p in agent.target_network.parameters():
            p.add_(torch.randn_like(p))
    batch = agent.buffer.sample(6)
    loss, q_taken = agent.learner.td_loss(batch, gamma=0.9)[:2]
    with torch.no_grad():
        best = agent.q_network(batch.next_obs).argmax(1, keepdim=True)
        expected_target = batch.rewards + 0.9 * (1 - batch.dones) * agent.target_network(batch.next_obs).gather(1, best).squeeze(1)
        expected = torch.nn.functional.smooth_l1_loss(q_taken, expected_target, reduction="none")
    assert torch.allclose(loss, expected)


def test_hard_target_update_happens_every_interval():
    agent = LearningAgent(4, 2, hidden_size=8, batch_size=8, train_overrides={"target_update_interval": 5})
    fill(agent, 32)

    def same() -> bool:
        return all(torch.equal(a, b) for a, b in zip(agent.q_network.parameters(), agent.target_network.parameters()))

    run(agent.learn_from_experiences(gradient_steps=4))
    assert not same()
    run(agent.learn_from_experiences(gradient_steps=1))
    assert same()


def test_soft_target_update_moves_by_tau():
    agent = LearningAgent(4, 2, hidden_size=8, batch_size=8, train_overrides={"target_update": "soft", "tau": 0.25})
    fill(agent, 32)
    before = [p.clone() for p in agent.target_network.parameters()]
    run(agent.learn_from_experiences())
    for old, new, online in zip(before, agent.target_network.parameters(), agent.q_network.parameters()):
        assert torch.allclose(new, old + 0.25 * (online - old), atol=1e-6)


def test_divergence_is_an_error_not_silence():
    agent = LearningAgent(2, 2, hidden_size=8, batch_size=4)
    run(agent.store_experience(np.zeros((8, 2)), np.zeros(8), np.full(8, np.nan), np.zeros((8, 2)), np.zeros(8)))
    with pytest.raises(TrainingDivergedError, match="nan"):
        run(agent.learn_from_experiences())


def test_state_dict_round_trip_continues_identically():
    a = LearningAgent(4, 2, hidden_size=16, batch_size=8, seed=0)
    fill(a, 64)
    run(a.learn_from_experiences(gradient_steps=5))
    b = LearningAgent(4, 2, hidden_size=16, batch_size=8, seed=123)
    b.load_state_dict(a.state_dict())
    assert b.training_steps == 5
    run(a.learn_from_experiences(gradient_steps=3))
    run(b.learn_from_experiences(gradient_steps=3))
    for pa, pb in zip(a.q_network.parameters(), b.q_network.parameters()):
        assert torch.equal(pa, pb)
    states = np.ones((5, 4), dtype=np.float32)
    assert np.array_equal(a.act(states, 0.5), b.act(states, 0.5))


def test_state_dict_refuses_another_architecture():
    a = LearningAgent(4, 2, hidden_size=16)
    with pytest.raises(ValueError, match="does not match"):
        LearningAgent(4, 2, hidden_size=32).load_state_dict(a.state_dict())


class _Batch(NamedTuple):
    ids: np.ndarray
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    dones: np.ndarray
    weights: np.ndarray


class _FakeMemory:
    """Stands in for MemoryClient in unit tests (the real service is tested in integration)."""

    def __init__(self, available: bool = True) -> None:
        self.available = available
        self.stored = 0
        self.requests = 0

    def write_transitions(self, obs, actions, rewards, next_obs, dones) -> None:
        assert obs.shape[0] == actions.shape[0] == rewards.shape[0] == next_obs.shape[0] == dones.shape[0]
        self.stored += obs.shape[0]

    def sample_replay(self, batch_size: int = 32, **_):
        self.requests += 1
        if not self.available:
            return None
        rng = np.random.default_rng(self.requests)
        obs = rng.normal(size=(batch_size, 4)).astype(np.float32)
        return _Batch(
            np.arange(batch_size), obs, rng.integers(0, 2, batch_size), np.full(batch_size, 5.0, np.float32),
            obs, np.ones(batch_size, np.float32), np.ones(batch_size, np.float32),
        )


def test_memory_batches_add_a_separate_memory_loss():
    agent = LearningAgent(4, 2, hidden_size=8, batch_size=8)
    memory = _FakeMemory()
    fill(agent, 16)
    run(agent.store_experience(np.zeros((3, 4)), [0, 1, 0], [1, 2, 3], np.ones((3, 4)), [0, 0, 1], memory_client=memory))
    assert memory.stored == 3 and len(agent.buffer) == 19
    stats = run(agent.learn_from_experiences(memory_client=memory, gradient_steps=2))
    assert memory.requests == 2 and stats["memory_batches"] == 2
    assert stats["loss_memory"] > 0
    assert stats["loss"] == pytest.approx(stats["loss_local"] + stats["loss_memory"], rel=1e-5)


def test_an_unavailable_memory_falls_back_to_local_replay():
    agent = LearningAgent(4, 2, hidden_size=8, batch_size=8)
    fill(agent, 16)
    stats = run(agent.learn_from_experiences(memory_client=_FakeMemory(available=False)))
    assert stats is not None and stats["memory_batches"] == 0 and stats["loss_memory"] == 0
