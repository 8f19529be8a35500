"""The parts the agent is composed of, each on its own (issue 12): a Learner fed tensors, replay
sources behind one protocol, and a Collector that needs only a config and a state dict."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch

from agent import load_config
from agent.collector import Collector
from agent.learner import Learner, UpdateStats
from agent.memory_client import ReplayBatch
from agent.network import NetworkArchitecture
from agent.policy import EpsilonGreedy
from agent.replay import ExperienceBuffer, Transitions
from agent.replay_sources import LocalReplay, MemoryReplay, MixedReplay, RowShapeGuard

ARCH = NetworkArchitecture(input_dim=4, output_dim=2, hidden_layers=(16, 16))


class Recorder:
    """A transition sink that keeps everything it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[np.ndarray, ...]] = []

    def add(self, *arrays: Any) -> None:
        self.rows.append(tuple(np.array(a, copy=True) for a in arrays))


def _config(*overrides: str):
    return load_config(overrides=["train.task=CartPole-v1", "train.num_envs=3", *overrides])


def _learner(config) -> Learner:
    return Learner(ARCH, config.train, seed=config.run.seed, device=torch.device("cpu"))


def test_a_collector_pickles_to_its_state_and_continues_identically() -> None:
    config = _config()
    policy = EpsilonGreedy(_learner(config).q_network, np.random.default_rng(3))
    original = Collector(config, policy, sinks=[Recorder()])
    original.reset(seed=11)
    original.rollout(40, epsilon=0.3)

    twin = pickle.loads(pickle.dumps(original))  # envs and sinks do not travel: rebuilt, reattached
    assert twin.envs is not original.envs and twin.sinks == []
    a, b = Recorder(), Recorder()
    original.sinks, twin.sinks = [a], [b]
    finished_a = original.rollout(300, epsilon=0.3)
    finished_b = twin.rollout(300, epsilon=0.3)
    assert finished_a == finished_b and len(finished_a) > 3
    assert len(a.rows) == len(b.rows) == 300
    for row_a, row_b in zip(a.rows, b.rows):
        for x, y in zip(row_a, row_b):
            np.testing.assert_array_equal(x, y)
    assert original.actions_taken == twin.actions_taken


def test_a_collector_from_a_config_and_a_learners_state_acts_as_the_learner_would() -> None:
    config = _config()
    learner = _learner(config)
    state = {"policy": {"architecture": ARCH.to_dict(), "weights": learner.q_network.state_dict()}}
    actor = Collector.from_state(config.to_dict(), state)
    actor.reset(seed=0)
    live = EpsilonGreedy(learner.q_network, np.random.default_rng(0))
    obs = actor.obs
    np.testing.assert_array_equal(actor.policy.greedy(obs), live.greedy(obs))
    # Newer weights arrive between rollouts; the snapshot follows them and nothing else.
    with torch.no_grad():
        for p in learner.q_network.parameters():
            p.mul_(-1.0)
    actor.policy.load_weights(learner.q_network.state_dict())
    np.testing.assert_array_equal(actor.policy.greedy(obs), live.greedy(obs))
    assert actor.policy.network is not learner.q_network
    actor.close()


def _transitions(n: int, seed: int) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    return Transitions(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g),
                       torch.randn(n, generator=g), torch.randn(n, 4, generator=g), torch.zeros(n))


def test_the_learner_updates_from_tensors_alone_and_reports_both_losses() -> None:
    learner = _learner(_config())
    before = [p.clone() for p in learner.q_network.parameters()]
    stats = learner.update(_transitions(8, 0), memory=_transitions(5, 1), memory_weights=torch.full((5,), 0.5))
    assert isinstance(stats, UpdateStats) and learner.training_steps == 1
    assert all(isinstance(value, torch.Tensor) for value in stats.scalars())
    assert float(stats.loss) == pytest.approx(float(stats.loss_local) + float(stats.loss_memory), rel=1e-6)
    assert stats.td_local.shape == (8,) and stats.td_memory is not None and stats.td_memory.shape == (5,)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.q_network.parameters()))
    alone = learner.update(_transitions(8, 2))
    assert alone.td_memory is None and float(alone.loss_memory) == 0.0


def test_importance_weights_scale_the_local_loss() -> None:
    config = _config()
    plain, weighted = _learner(config), _learner(config)
    batch = _transitions(8, 0)
    half = plain.update(batch)
    scaled = weighted.update(batch, torch.full((8,), 0.5))
    assert float(scaled.loss_local) == pytest.approx(0.5 * float(half.loss_local), rel=1e-6)


class FakeService:
    """Just the synchronous client calls a MemoryReplay makes."""

    def __init__(self, features: int = 4) -> None:
        self.features = features
        self.priorities: list[tuple[np.ndarray, np.ndarray]] = []

    def sample_replay(self, batch_size: int, *, prioritized: bool, beta: float) -> ReplayBatch:
        rng = np.random.default_rng(len(self.priorities))
        obs = rng.normal(size=(batch_size, self.features)).astype(np.float32)
        return ReplayBatch(np.arange(100, 100 + batch_size), obs, np.zeros(batch_size, np.int64),
                           np.ones(batch_size, np.float32), obs, np.zeros(batch_size, np.float32),
                           np.full(batch_size, 0.25, np.float32))

    def send_priorities(self, ids: Any, priorities: Any) -> None:
        self.priorities.append((np.asarray(ids), np.asarray(priorities)))


@pytest.mark.parametrize("prioritized", [True, False])
def test_mixed_replay_sends_the_memory_rows_priorities_back(prioritized: bool) -> None:
    config = _config(f"memory.prioritized={str(prioritized).lower()}")
    buffer = ExperienceBuffer(100, 4, seed=0)
    t = _transitions(50, 0)
    buffer.add(t.obs.numpy(), t.actions.numpy(), t.rewards.numpy(), t.next_obs.numpy(), t.dones.numpy())
    service = FakeService()
    memory = MemoryReplay(service, config.memory, torch.device("cpu"), RowShapeGuard(4))
    replay = MixedReplay(LocalReplay(buffer), memory, memory_batch_size=6)
    learner = _learner(config)
    batches = replay.sample(8, num_batches=2)
    assert batches is not None and len(batches) == 2
    for batch in batches:
        assert batch.local.obs.shape == (8, 4) and batch.extra is not None and batch.extra.obs.shape == (6, 4)
        assert torch.equal(batch.extra_weights, torch.full((6,), 0.25))
        stats = learner.update(batch.local, memory=batch.extra, memory_weights=batch.extra_weights)
        replay.update_priorities(batch, stats.td_memory)
    if prioritized:
        assert len(service.priorities) == 2
        ids, priorities = service.priorities[0]
        assert ids.tolist() == list(range(100, 106)) and (priorities > 0).all()
    else:
        assert service.priorities == []
    assert MixedReplay(LocalReplay(ExperienceBuffer(100, 4)), memory).sample(8) is None  # nothing local yet


def test_rows_of_another_size_are_refused_not_learned() -> None:
    config = _config()
    memory = MemoryReplay(FakeService(features=7), config.memory, torch.device("cpu"), RowShapeGuard(4))
    assert memory.sample(6, num_batches=2) == [None, None]


@pytest.mark.parametrize("closed_form", [True, False])
def test_rewards_are_scaled_then_clipped_in_the_update_only(closed_form: bool) -> None:
    flags = [f"train.closed_form_update={str(closed_form).lower()}"]
    shaped = _learner(_config(*flags, "train.reward_scale=0.5", "train.reward_clip=1.0"))
    plain = _learner(_config(*flags))
    rng = np.random.default_rng(0)
    batch = Transitions(
        torch.from_numpy(rng.normal(size=(16, 4)).astype(np.float32)),
        torch.from_numpy(rng.integers(0, 2, 16)),
        torch.tensor([-9.0, -1.0, 0.4, 3.0] * 4),
        torch.from_numpy(rng.normal(size=(16, 4)).astype(np.float32)),
        torch.zeros(16),
    )
    by_hand = batch._replace(rewards=torch.tensor([-1.0, -0.5, 0.2, 1.0] * 4))
    stats = shaped.update(batch)
    expected = plain.update(by_hand)
    torch.testing.assert_close(stats.td_local, expected.td_local)
    for a, b in zip(shaped.q_network.parameters(), plain.q_network.parameters()):
        torch.testing.assert_close(a, b)
    assert batch.rewards[0] == -9.0  # the caller's rows (a buffer's, the service's) are untouched
