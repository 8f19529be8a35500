"""n-step returns and prioritized local replay (issue 14, item 2): targets by hand, sampling by
priority, weights, priority updates, checkpoints, and short runs with each option on."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent import LearningAgent, TrainingManager, load_config
from agent.config import with_overrides
from agent.collector import Collector
from agent.learner import Learner
from agent.network import NetworkArchitecture
from agent.nstep import NStepWindows, bootstrap_mask, one_step_rows
from agent.policy import EpsilonGreedy
from agent.replay import ExperienceBuffer, PrioritizedBuffer, Transitions
from agent.replay_sources import LocalReplay, MixedReplay

GAMMA = 0.9
ARCH = NetworkArchitecture(input_dim=4, output_dim=2, hidden_layers=(16, 16))


class Recorder:
    """A sink keeping every row it is given (1-step rows, like the Memory service's sink)."""

    def __init__(self) -> None:
        self.rows: list[tuple[np.ndarray, ...]] = []

    def add(self, *arrays: Any) -> None:
        n = len(np.atleast_2d(np.asarray(arrays[0])))
        columns = [np.array(a, copy=True).reshape(n, -1) for a in arrays]
        self.rows.extend(tuple(c[i] for c in columns) for i in range(n))

    def column(self, index: int) -> np.ndarray:
        values = np.array([row[index] for row in self.rows]).reshape(len(self.rows), -1)
        return values[:, 0] if values.shape[1] == 1 else values


class NStepRecorder(Recorder):
    n_step_rows = True


def _episode(windows: NStepWindows, rewards: list[float], end: str) -> list[tuple[np.ndarray, ...]]:
    """Push one episode of one row (obs i = [i, i, i, i], action i % 2); collect what comes out."""
    out = []
    for t, r in enumerate(rewards):
        last = t == len(rewards) - 1
        emitted = windows.push(
            None, np.full((1, 4), t), np.array([t % 2]), np.array([r]), np.full((1, 4), t + 1),
            np.array([last and end == "terminated"]), np.array([last and end == "truncated"]),
        )
        if emitted is not None:
            out.extend(zip(*emitted))
    return out


# --------------------------------------------------------------------------- n-step targets


@pytest.mark.parametrize("end", ["terminated", "truncated"])
def test_n_step_rows_of_a_short_episode_by_hand(end: str) -> None:
    r = [1.0, 2.0, 3.0, 4.0, 5.0]
    rows = _episode(NStepWindows(3, GAMMA, 1), r, end)
    g = GAMMA
    # (first state, return, next state, real steps k) of each row, in the order they come out
    expected = [
        (0, r[0] + g * r[1] + g**2 * r[2], 3, 3),
        (1, r[1] + g * r[2] + g**2 * r[3], 4, 3),
        (2, r[2] + g * r[3] + g**2 * r[4], 5, 3),  # the episode's end flushes these three
        (3, r[3] + g * r[4], 5, 2),
        (4, r[4], 5, 1),
    ]
    assert len(rows) == len(expected)
    for (obs, action, ret, next_obs, mask), (start, want, nxt, k) in zip(rows, expected):
        assert obs[0] == start and action == start % 2 and next_obs[0] == nxt
        assert ret == pytest.approx(want, rel=1e-6)
        if end == "terminated" and nxt == 5:
            assert mask == 1.0  # nothing bootstraps past a termination
        else:  # the update's gamma^3 times (1 - mask) is the row's own gamma^k
            assert g**3 * (1.0 - mask) == pytest.approx(g**k, rel=1e-6)
            assert (mask == 0.0) == (k == 3)


def test_an_episode_shorter_than_n_bootstraps_with_its_own_steps() -> None:
    rows = _episode(NStepWindows(5, GAMMA, 1), [1.0, 1.0], "truncated")
    assert [float(row[2]) for row in rows] == pytest.approx([1.0 + GAMMA, 1.0])
    masks = np.array([row[4] for row in rows])
    np.testing.assert_allclose(GAMMA**5 * (1 - masks), [GAMMA**2, GAMMA], rtol=1e-6)
    assert NStepWindows(5, GAMMA, 1).pending == 0


def _keys(rows: list[tuple[np.ndarray, ...]]) -> list[tuple[float, ...]]:
    return sorted((float(o[0]), int(a), float(r), float(nx[0]), float(m)) for o, a, r, nx, m in rows)


def test_rows_are_windowed_apart_whichever_copies_step_together() -> None:
    """Three copies stepping in varying subsets (a NEXT_STEP autoreset skips a copy's reset
    step) give exactly the rows each copy gives alone."""
    rng = np.random.default_rng(1)
    together = NStepWindows(3, GAMMA, 3)
    alone = [NStepWindows(3, GAMMA, 1) for _ in range(3)]
    got: list[tuple[np.ndarray, ...]] = []
    want: list[tuple[np.ndarray, ...]] = []
    for _ in range(300):
        rows = np.flatnonzero(rng.random(3) < 0.7)
        if len(rows) == 0:
            continue
        obs, next_obs = rng.normal(size=(len(rows), 4)), rng.normal(size=(len(rows), 4))
        actions, rewards = rng.integers(0, 2, len(rows)), rng.normal(size=len(rows))
        ends = rng.random(len(rows))
        terminated, truncated = ends < 0.05, (ends >= 0.05) & (ends < 0.1)
        out = together.push(rows, obs, actions, rewards, next_obs, terminated, truncated)
        got.extend(zip(*out) if out is not None else [])
        for i, copy in enumerate(rows):
            one = slice(i, i + 1)
            single = alone[copy].push(None, obs[one], actions[one], rewards[one], next_obs[one],
                                      terminated[one], truncated[one])
            want.extend(zip(*single) if single is not None else [])
    assert together.pending == sum(w.pending for w in alone)
    assert len(want) > 500 and _keys(got) == _keys(want)
    masks = np.array([row[4] for row in got])
    assert (masks < 0).any() and (masks == 1).any() and (masks == 0).any()


def test_the_learner_target_is_the_n_step_target_and_memory_rows_stay_one_step() -> None:
    config = load_config(overrides=["train.task=CartPole-v1"])
    learner = Learner(ARCH, config.train, seed=0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    n, b = 3, 6
    obs, next_obs = torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g)
    actions, returns = torch.randint(0, 2, (b,), generator=g), torch.randn(b, generator=g)
    steps = np.array([3, 3, 2, 1, 2, 3])
    terminated = np.array([False, True, False, False, True, False])
    masks = torch.as_tensor(bootstrap_mask(steps, n, GAMMA, terminated))
    with torch.no_grad():  # Double DQN: the online network chooses, the target network values
        best = learner.q_network(next_obs).argmax(dim=1, keepdim=True)
        value = learner.target_network(next_obs).gather(1, best).squeeze(1)
        q = learner.q_network(obs).gather(1, actions[:, None]).squeeze(1)
    bootstrap = torch.as_tensor(np.where(terminated, 0.0, GAMMA**steps), dtype=torch.float32)
    _, _, td = learner.td_loss(Transitions(obs, actions, returns, next_obs, masks), GAMMA**n)
    torch.testing.assert_close(q - td, returns + bootstrap * value, rtol=1e-6, atol=1e-6)

    dones = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # 1-step rows, as the service stores them
    one_step = one_step_rows(Transitions(obs, actions, returns, next_obs, dones), GAMMA, n)
    _, _, td = learner.td_loss(one_step, GAMMA**n)
    torch.testing.assert_close(q - td, returns + GAMMA * (1 - dones) * value, rtol=1e-6, atol=1e-6)


def _rebuild_n_step(one_step: Recorder, n: int, gamma: float) -> list[tuple[float, ...]]:
    """The n-step rows of one environment copy's 1-step rows, the slow way: (first row, return,
    last row, bootstrap discount) per window. An episode ends at a termination or where a next
    state is not the following row's state; the last episode still runs (full windows only)."""
    obs, rewards, next_obs, dones = (one_step.column(i) for i in (0, 2, 3, 4))
    rows, start, total = [], 0, len(rewards)
    for t in range(total):
        ended = bool(dones[t]) or (t + 1 < total and not np.array_equal(next_obs[t], obs[t + 1]))
        if not ended and t + 1 < total:
            continue
        for i in range(start, t + 1):
            k = min(n, t + 1 - i)
            if not ended and k < n:
                break  # still open
            last = i + k - 1
            terminal = bool(dones[last])
            ret = sum(gamma**j * rewards[i + j] for j in range(k))
            rows.append((i, ret, last, 0.0 if terminal else gamma**k))
        start = t + 1
    return rows


def test_the_collector_builds_n_step_rows_per_copy_and_the_service_gets_one_step_rows() -> None:
    n = 3
    config = load_config(overrides=[
        "train.task=CartPole-v1", "train.num_envs=1", "train.max_steps_per_episode=16",
        f"replay.n_step={n}", f"train.gamma={GAMMA}",
    ])
    learner = Learner(ARCH, config.train, seed=0, device=torch.device("cpu"))
    policy = EpsilonGreedy(learner.q_network, np.random.default_rng(0))
    service, local = Recorder(), NStepRecorder()
    collector = Collector(config, policy, sinks=[service, local])
    collector.reset(seed=5)
    collector.rollout(600, epsilon=1.0)
    states, next_states, dones = service.column(0), service.column(3), service.column(4)
    assert set(np.unique(dones)) <= {0.0, 1.0}  # what the Memory service accepts
    truncations = sum(
        not dones[t] and not np.array_equal(next_states[t], states[t + 1]) for t in range(len(dones) - 1)
    )
    assert dones.sum() > 5 and truncations > 5  # both kinds of episode end happened
    expected = _rebuild_n_step(service, n, GAMMA)
    assert len(local.rows) == len(expected) == len(service.rows) - collector.n_step_windows.pending
    for (obs, _, ret, next_obs, mask), (i, want, last, bootstrap) in zip(local.rows, expected):
        np.testing.assert_array_equal(obs, states[i])
        np.testing.assert_array_equal(next_obs, next_states[last])
        assert ret.item() == pytest.approx(want, rel=1e-5)
        assert GAMMA**n * (1.0 - mask.item()) == pytest.approx(bootstrap, rel=1e-5, abs=1e-7)
    collector.close()


def test_a_collectors_open_windows_travel_with_its_state() -> None:
    config = load_config(overrides=["train.task=CartPole-v1", "train.num_envs=3", "replay.n_step=4"])
    policy = EpsilonGreedy(Learner(ARCH, config.train, seed=0, device=torch.device("cpu")).q_network,
                           np.random.default_rng(3))
    original = Collector(config, policy, sinks=[NStepRecorder()])
    original.reset(seed=11)
    original.rollout(37, epsilon=0.3)
    assert original.n_step_windows.pending > 0
    twin = pickle.loads(pickle.dumps(original))
    a, b = NStepRecorder(), NStepRecorder()
    original.sinks, twin.sinks = [a], [b]
    original.rollout(200, epsilon=0.3)
    twin.rollout(200, epsilon=0.3)
    assert len(a.rows) == len(b.rows) > 500
    for row_a, row_b in zip(a.rows, b.rows):
        for x, y in zip(row_a, row_b):
            np.testing.assert_array_equal(x, y)


def test_new_environments_cut_the_open_windows_as_truncated() -> None:
    config = load_config(overrides=["train.task=CartPole-v1", "train.num_envs=2", "replay.n_step=4",
                                    f"train.gamma={GAMMA}"])
    policy = EpsilonGreedy(Learner(ARCH, config.train, seed=0, device=torch.device("cpu")).q_network,
                           np.random.default_rng(0))
    local = NStepRecorder()
    collector = Collector(config, policy, sinks=[local])
    collector.reset(seed=0)
    collector.rollout(2, epsilon=0.5)  # two steps per copy: no window is full yet
    assert local.rows == [] and collector.n_step_windows.pending == 4
    cut_at = collector.obs.copy()
    collector.use_task_params(None, seed=1)  # a curriculum stage's new environments
    assert collector.n_step_windows.pending == 0 and len(local.rows) == 4
    for i, (_, _, _, next_obs, mask) in enumerate(local.rows):
        np.testing.assert_array_equal(next_obs, cut_at[i // 2])
        k = 2 - i % 2  # each copy's older window has both steps, its newer one the last
        assert GAMMA**4 * (1 - mask.item()) == pytest.approx(GAMMA**k, rel=1e-6)
    collector.close()


def test_a_change_of_n_during_a_run_closes_the_open_windows_under_the_new_n() -> None:
    config = load_config(overrides=["train.task=CartPole-v1", "train.num_envs=1", "replay.n_step=4",
                                    f"train.gamma={GAMMA}"])
    policy = EpsilonGreedy(Learner(ARCH, config.train, seed=0, device=torch.device("cpu")).q_network,
                           np.random.default_rng(0))
    local = NStepRecorder()
    collector = Collector(config, policy, sinks=[local])
    collector.reset(seed=0)
    collector.rollout(3, epsilon=0.5)
    assert local.rows == [] and collector.n_step_windows.pending == 3
    collector.config = with_overrides(config, replay={"n_step": 1})  # the trainer's reconfigure
    collector.step(epsilon=0.5)
    assert collector.n_step_windows is None and len(local.rows) == 4
    masks = local.column(4)
    np.testing.assert_allclose(GAMMA * (1 - masks[:3]), GAMMA ** np.array([3, 2, 1]), rtol=1e-6)
    assert masks[3] in (0.0, 1.0)  # from here on, 1-step rows


def test_spec_store_experience_rows_are_one_step_under_an_n_step_update() -> None:
    config = load_config(overrides=["train.task=CartPole-v1", "replay.n_step=3", f"train.gamma={GAMMA}"])
    agent = LearningAgent(4, 2, config=config)
    asyncio.run(agent.store_experience(np.zeros((2, 4)), [0, 1], [1.0, 1.0], np.ones((2, 4)), [0.0, 1.0]))
    masks = agent.buffer.sample(64).dones.unique()
    expected = torch.tensor([1.0 - GAMMA**-2, 1.0])
    torch.testing.assert_close(torch.sort(masks).values, expected)


# --------------------------------------------------------------------------- prioritized replay


def _filled(priorities: list[float], alpha: float = 1.0, seed: int = 0) -> PrioritizedBuffer:
    buffer = PrioritizedBuffer(8, 4, seed=seed, alpha=alpha, beta=1.0, eps=1e-6)
    n = len(priorities)
    buffer.add(np.arange(4 * n).reshape(n, 4), np.zeros(n), np.arange(n), np.zeros((n, 4)), np.zeros(n))
    buffer.update_priorities(np.arange(n), np.asarray(priorities) - 1e-6)
    return buffer


def test_prioritized_sampling_is_proportional_to_priority_and_weights_correct_it() -> None:
    priorities = np.array([1.0, 2.0, 3.0, 4.0])
    buffer = _filled(list(priorities))
    drawn = buffer.sample_weighted(64, num_batches=400)
    counts = np.bincount(drawn.slots.reshape(-1), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), priorities / priorities.sum(), atol=0.01)
    # each row's rewards column says which slot it is: the rows are the slots' rows
    np.testing.assert_array_equal(drawn.transitions.rewards.numpy(), drawn.slots.astype(np.float32))
    # beta = 1: weights (N P(i))^-1 over the batch's largest = p_min / p_i, where row 0 was drawn
    probabilities = priorities / priorities.sum()
    raw = (4 * probabilities[drawn.slots]) ** -1.0
    expected = raw / raw.max(axis=1, keepdims=True)
    np.testing.assert_allclose(drawn.weights.numpy(), expected, rtol=1e-6)
    # the replay-source form: one SampledBatch per update, with its weights and slots
    sampled = LocalReplay(buffer).sample(3, num_batches=2)
    assert all(b is not None and b.weights.shape == (3,) and b.ids.shape == (3,) for b in sampled)


def test_alpha_flattens_priorities_and_zero_alpha_is_uniform() -> None:
    buffer = _filled([1.0, 100.0], alpha=0.0)
    drawn = buffer.sample_weighted(64, num_batches=200)
    share = np.bincount(drawn.slots.reshape(-1), minlength=2) / drawn.slots.size
    np.testing.assert_allclose(share, [0.5, 0.5], atol=0.02)
    np.testing.assert_allclose(drawn.weights.numpy(), 1.0)


def test_new_rows_get_the_highest_priority_and_updates_take_abs_td_plus_eps() -> None:
    buffer = PrioritizedBuffer(4, 4, seed=0, alpha=0.5, beta=0.4, eps=0.01)
    buffer.add(np.zeros((2, 4)), [0, 1], [0.0, 0.0], np.zeros((2, 4)), [0.0, 0.0])
    np.testing.assert_allclose(buffer.priorities(), [1.0, 1.0])
    buffer.update_priorities(np.array([0, 1, 1]), torch.tensor([-3.0, 0.5, 0.25]))  # the last wins
    np.testing.assert_allclose(buffer.priorities(), [3.01, 0.26])
    buffer.add(np.zeros((3, 4)), [0, 1, 0], [0.0] * 3, np.zeros((3, 4)), [0.0] * 3)  # wraps round
    np.testing.assert_allclose(buffer.priorities(), [3.01, 0.26, 3.01, 3.01])  # slots 2, 3, 0
    assert buffer.position == 1 and buffer.added == 5


def test_beta_rises_to_one_over_the_horizon() -> None:
    buffer = PrioritizedBuffer(100, 4, seed=0, beta=0.4, beta_horizon=50)
    assert buffer.beta == pytest.approx(0.4)
    buffer.add(np.zeros((25, 4)), np.zeros(25), np.zeros(25), np.zeros((25, 4)), np.zeros(25))
    assert buffer.beta == pytest.approx(0.7)
    buffer.add(np.zeros((50, 4)), np.zeros(50), np.zeros(50), np.zeros((50, 4)), np.zeros(50))
    assert buffer.beta == 1.0


def test_a_prioritized_buffer_round_trips_through_its_state() -> None:
    buffer = _filled([1.0, 5.0, 2.0, 0.5, 3.0], alpha=0.6, seed=4)
    buffer.beta_horizon = 40
    buffer.sample_weighted(3, num_batches=2)  # the sampler has moved on
    state = buffer.state_dict()
    twin = PrioritizedBuffer(8, 4, seed=99, alpha=0.6, beta=1.0, eps=1e-6)
    twin.load_state_dict(state)
    assert (twin.added, twin.beta_horizon, twin.max_priority) == (buffer.added, 40, buffer.max_priority)
    np.testing.assert_array_equal(twin.priorities(), buffer.priorities())
    for _ in range(3):
        a, b = buffer.sample_weighted(5, num_batches=3), twin.sample_weighted(5, num_batches=3)
        np.testing.assert_array_equal(a.slots, b.slots)
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
        buffer.update_priorities(a.slots.reshape(-1), np.arange(15.0))
        twin.update_priorities(b.slots.reshape(-1), np.arange(15.0))
    # a uniform buffer's checkpoint loads into a prioritized one: every row at the top priority
    uniform = ExperienceBuffer(8, 4, seed=1)
    uniform.add(np.zeros((3, 4)), np.zeros(3), np.zeros(3), np.zeros((3, 4)), np.zeros(3))
    fresh = PrioritizedBuffer(8, 4)
    fresh.load_state_dict(uniform.state_dict())
    np.testing.assert_array_equal(fresh.priorities(), np.ones(3))


def test_the_local_rows_td_errors_come_back_as_their_priorities() -> None:
    config = load_config(overrides=[
        "train.task=CartPole-v1", "replay.prioritized=true", "replay.priority_eps=0.001",
        "replay.local_buffer_size=64", "train.batch_size=16",
    ])
    agent = LearningAgent(4, 2, config=config)
    g = np.random.default_rng(0)
    agent.buffer.add(g.normal(size=(64, 4)), g.integers(0, 2, 64), g.normal(size=64),
                     g.normal(size=(64, 4)), np.zeros(64))
    sources = agent.replay_sources()
    assert isinstance(sources.local, LocalReplay) and sources.local.prioritized
    seen: dict[int, float] = {}
    learner_update = agent.learner.update

    def spy(batch: Transitions, weights: torch.Tensor | None = None, **kwargs: Any):
        assert weights is not None and weights.shape == (16,) and float(weights.max()) == 1.0
        stats = learner_update(batch, weights, **kwargs)
        # rewards are unique per row: they say which slot a row came from (the last update wins)
        for reward, td in zip(batch.rewards.tolist(), stats.td_local.tolist()):
            seen[reward] = abs(td) + 0.001
        return stats

    agent.learner.update = spy  # type: ignore[method-assign]
    rewards_before = agent.buffer.state_dict()["data"]["rewards"].numpy()
    stats = agent.learn(gradient_steps=3)
    assert stats is not None and 0.4 <= stats["priority_beta"] <= 1.0
    priorities = agent.buffer.priorities()
    for reward, priority in seen.items():
        slot = int(np.flatnonzero(rewards_before == np.float32(reward))[0])
        assert priorities[slot] == pytest.approx(priority, rel=1e-5)
    untouched = [s for s in range(64) if float(rewards_before[s]) not in seen]
    np.testing.assert_array_equal(priorities[untouched], 1.0)


def test_uniform_sources_hand_out_no_weights_and_no_slots() -> None:
    buffer = ExperienceBuffer(16, 4, seed=0)
    buffer.add(np.zeros((16, 4)), np.zeros(16), np.zeros(16), np.zeros((16, 4)), np.zeros(16))
    batch = next(iter(MixedReplay(LocalReplay(buffer)).stream(4, 2)))
    assert batch.local_weights is None and batch.local_ids is None


# --------------------------------------------------------------------------- training with them


class _SaveAt:
    """Saves a mid-run checkpoint after the vector step that reaches ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_step(self, trainer: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("options", [["replay.n_step=3"], ["replay.prioritized=true"],
                                     ["replay.n_step=3", "replay.prioritized=true"]])
def test_a_short_run_with_each_option_learns_and_resumes_exactly(options: list[str], tmp_path: Path) -> None:
    config = load_config(overrides=[
        "train.task=CartPole-v1", "run.seed=2", "train.total_timesteps=3000", "train.max_episodes=null",
        "network.hidden_size=32", "train.learning_starts=300", "train.num_envs=2",
        "train.max_steps_per_episode=25", "replay.local_buffer_size=3000", *options,
    ])
    straight = TrainingManager(LearningAgent(4, 2, config=config), task_type="CartPole-v1", tensorboard=False)
    straight.run(callbacks=[_SaveAt(1500, tmp_path / "mid.pt")])
    straight.close()
    assert straight.agent.training_steps > 300
    if "replay.n_step=3" in options:
        masks = straight.agent.buffer.state_dict()["data"]["dones"]
        assert (masks < 0).any() and (masks == 1).any() and (masks == 0).any()  # cut, ended, full
    if "replay.prioritized=true" in options:
        buffer = straight.agent.buffer  # beta reaches 1 at the step budget (less open n-step windows)
        assert buffer.beta == pytest.approx(1.0, abs=0.01) and len(np.unique(buffer.priorities())) > 100

    resumed = TrainingManager.from_checkpoint(tmp_path / "mid.pt", tensorboard=False)
    resumed.run()
    resumed.close()
    assert resumed.global_step == straight.global_step
    assert resumed.episode_rewards == straight.episode_rewards
    for name, tensor in straight.agent.q_network.state_dict().items():
        assert torch.equal(tensor, resumed.agent.q_network.state_dict()[name]), name
