"""The task environments: the batch contract the trainer relies on, for every task type."""

from __future__ import annotations

import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agent.tasks import (
    CurriculumManager,
    DifficultyLevel,
    RewardConfig,
    TaskRewardManager,
    TaskStateError,
    TaskType,
    capture_env_state,
    create_task,
    make_vector_env,
    restore_env_state,
    task_spaces,
)
from agent.tasks import kernels

TASKS = list(TaskType)
REQUIRED_METRICS = {
    "task_success", "collision_rate", "exploration_coverage", "cooperation_score",
    "tool_use_efficiency", "completion_time",
}
EXTRA_METRICS = {
    TaskType.NAVIGATION: {"final_distance"},
    TaskType.EXPLORATION: {"resources_found", "resource_discovery_rate", "explored_area"},
    TaskType.MULTI_AGENT: {"formation_error", "formation_maintenance_rate", "agent_index", "joint_action"},
    TaskType.MANIPULATION: {"final_distance", "grasped"},
}
HARDEST = {"workspace_size": (15.0, 15.0, 6.0), "num_obstacles": 12, "time_limit": 180.0,
           "vision_required": True, "tool_use_enabled": True, "cooperation_required": True}


def rollout(envs, steps: int, seed: int = 0, actions_seed: int = 1):
    rng = np.random.default_rng(actions_seed)
    obs, _ = envs.reset(seed=seed)
    trace = [obs]
    for _ in range(steps):
        obs, reward, term, trunc, info = envs.step(rng.integers(0, envs.single_action_space.n, envs.num_envs))
        trace += [obs, reward, term, trunc]
    return trace


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("task", TASKS)
def test_spaces_fit_a_dqn_and_do_not_change_across_stages(task):
    dims = set()
    for stage in CurriculumManager().stages:
        envs = make_vector_env(task, 2, task_params=stage.task_params)
        space = envs.single_observation_space
        assert isinstance(space, gym.spaces.Box) and space.dtype == np.float32 and len(space.shape) == 1
        assert isinstance(envs.single_action_space, gym.spaces.Discrete)
        assert envs.metadata["autoreset_mode"] is gym.vector.AutoresetMode.SAME_STEP
        obs, _ = envs.reset(seed=0)
        assert obs.dtype == np.float32 and obs.shape == (envs.num_envs, space.shape[0])
        for _ in range(20):
            obs, *_ = envs.step(np.zeros(envs.num_envs, dtype=np.int64))
        assert all(space.contains(row) for row in obs)
        dims.add((space.shape[0], envs.single_action_space.n))
    assert dims == {task_spaces(task)}
    assert task_spaces(task.value) == task_spaces(task)


@pytest.mark.parametrize("task", TASKS)
def test_step_info_carries_what_the_trainer_reads(task):
    envs = make_vector_env(task, 3, max_episode_steps=5)
    n = envs.num_envs
    envs.reset(seed=0)
    for step in range(5):
        obs, reward, term, trunc, info = envs.step(np.arange(n) % envs.single_action_space.n)
        assert reward.shape == (n,) and term.dtype == bool and trunc.dtype == bool
        assert info["action_invalid"].dtype == bool and info["action_invalid"].shape == (n,)
        assert info["action_clipped"].dtype == bool and info["action_clipped"].shape == (n,)
        components = info["reward_components"]
        assert set(components) == {c for c in RewardConfig().to_dict()}
        np.testing.assert_allclose(sum(components.values()), reward, atol=1e-9)
    assert trunc.all()  # the 5-step cap
    metrics, mask = info["task_metrics"], info["_task_metrics"]
    assert mask.dtype == bool and mask.all()
    assert REQUIRED_METRICS | EXTRA_METRICS[task] <= set(metrics)
    assert all(v.dtype == np.float32 and v.shape == (n,) for v in metrics.values())
    np.testing.assert_array_equal(metrics["completion_time"], 5.0)


@pytest.mark.parametrize("task", TASKS)
def test_same_step_autoreset_reports_the_true_last_observation(task):
    envs = make_vector_env(task, 2, max_episode_steps=3)
    envs.reset(seed=4)
    time_left = envs.layout.slices["time_left"].start
    for _ in range(2):
        obs, _, _, trunc, info = envs.step(np.zeros(envs.num_envs, dtype=np.int64))
        assert "final_obs" not in info and not trunc.any()
    before = obs.copy()
    obs, _, _, trunc, info = envs.step(np.zeros(envs.num_envs, dtype=np.int64))
    assert trunc.all() and info["_final_obs"].all()
    final = info["final_obs"]
    assert final.dtype == np.float32 and final.shape == obs.shape
    np.testing.assert_allclose(final[:, time_left], 0.0)  # the last step of the old episode
    np.testing.assert_allclose(obs[:, time_left], 1.0)  # the first of the new one
    assert not np.allclose(final, obs)
    assert not np.allclose(before, obs)


@pytest.mark.parametrize("task", TASKS)
def test_a_seed_reproduces_the_episodes(task):
    a = rollout(make_vector_env(task, 3, task_params=HARDEST), 40, seed=7)
    b = rollout(make_vector_env(task, 3, task_params=HARDEST), 40, seed=7)
    assert_same(a, b)
    c = rollout(make_vector_env(task, 3, task_params=HARDEST), 1, seed=8)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("task", [TaskType.NAVIGATION, TaskType.MULTI_AGENT])
def test_copy_i_is_seeded_with_seed_plus_i(task):
    batch = make_vector_env(task, 3)
    single = make_vector_env(task, 1)
    rows = batch.num_envs // 3
    batch_obs, _ = batch.reset(seed=10)
    single_obs, _ = single.reset(seed=12)
    np.testing.assert_array_equal(batch_obs[2 * rows :], single_obs)
    actions = np.arange(rows) % single.single_action_space.n
    batch_obs, *_ = batch.step(np.tile(actions, 3))
    single_obs, *_ = single.step(actions)
    np.testing.assert_array_equal(batch_obs[2 * rows :], single_obs)


@pytest.mark.parametrize("task", TASKS)
def test_state_capture_continues_bit_identically(task):
    envs = make_vector_env(task, 3, task_params=HARDEST, max_episode_steps=15)
    rollout(envs, 23, seed=2)
    snapshot = capture_env_state(envs)
    assert snapshot["complete"]
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    rng = np.random.default_rng(9)
    actions = [rng.integers(0, envs.single_action_space.n, envs.num_envs) for _ in range(30)]
    expected = [envs.step(a)[:4] for a in actions]
    fresh = make_vector_env(task, 3, task_params=HARDEST, max_episode_steps=15)
    assert restore_env_state(fresh, loaded)
    got = [fresh.step(a)[:4] for a in actions]
    for want, have in zip(expected, got):
        for x, y in zip(want, have):
            np.testing.assert_array_equal(x, y)
    assert fresh.rewards.get_metrics() == envs.rewards.get_metrics()


def test_state_of_another_configuration_is_refused():
    envs = make_vector_env("navigation", 2)
    envs.reset(seed=0)
    state = envs.get_state()
    with pytest.raises(TaskStateError, match="copies"):
        make_vector_env("navigation", 3).set_state(state)
    with pytest.raises(TaskStateError, match="task parameters"):
        make_vector_env("navigation", 2, task_params={"num_obstacles": 5}).set_state(state)
    with pytest.raises(TaskStateError, match="task"):
        make_vector_env("exploration", 2).set_state(state)


def test_episode_length_follows_the_time_limit_and_the_cap():
    envs = make_vector_env("navigation", 1, task_params={"time_limit": 300.0})
    assert envs.max_steps == math.ceil(300.0 / envs.dt)
    assert make_vector_env("navigation", 1, max_episode_steps=50).max_steps == 50
    with pytest.raises(ValueError, match="num_envs"):
        make_vector_env("navigation", 0)


def test_invalid_indices_are_reported_and_become_stop():
    envs = make_vector_env("navigation", 3)
    envs.reset(seed=0)
    obs, _, _, _, info = envs.step(np.array([-1, 9, 0]))
    np.testing.assert_array_equal(info["action_invalid"], [True, True, False])
    velocity = envs.layout.slices["velocity"]
    np.testing.assert_array_equal(obs[:2, velocity], 0.0)  # stopped
    assert envs.action_metrics()["invalid_action_count"] == 2
    with pytest.raises(TypeError):
        envs.step(np.array([0.5, 1.0, 2.0]))


def test_tool_actions_are_invalid_until_the_stage_enables_tools():
    scan = 8  # exploration: 8 headings, scan, stop
    without = make_vector_env("exploration", 2)
    without.reset(seed=0)
    assert without.step(np.array([scan, 0]))[4]["action_invalid"].tolist() == [True, False]
    with_tools = make_vector_env("exploration", 2, task_params={"tool_use_enabled": True})
    with_tools.reset(seed=0)
    assert not with_tools.step(np.array([scan, 0]))[4]["action_invalid"].any()


def test_speed_is_limited_near_obstacles_in_the_environment():
    envs = make_vector_env("navigation", 64, task_params={"num_obstacles": 12, "workspace_size": (5, 5, 3)})
    envs.reset(seed=0)
    clipped = 0
    for _ in range(30):
        clipped += envs.step(np.zeros(64, dtype=np.int64))[4]["action_clipped"].sum()
    assert clipped > 0
    assert envs.action_metrics()["clipped_action_count"] == clipped


@pytest.mark.parametrize("task", TASKS)
def test_batch_rewards_equal_the_managers_general_calculation(task):
    envs = make_vector_env(task, 4, task_params=HARDEST)
    envs.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, reward, _, _, _ = envs.step(rng.integers(0, envs.single_action_space.n, envs.num_envs))
        expected, _ = TaskRewardManager(task).calculate_reward(info=envs.events)
        np.testing.assert_allclose(reward, expected, atol=1e-12)


def test_a_team_is_one_row_per_agent_and_finishes_together():
    envs = make_vector_env(TaskType.MULTI_AGENT, 4, max_episode_steps=6)
    agents = envs.agents
    assert envs.num_envs == 4 * agents
    obs, _ = envs.reset(seed=0)
    agent_slots = obs[:, envs.layout.slices["agent"]]
    np.testing.assert_array_equal(agent_slots.argmax(axis=1), np.tile(np.arange(agents), 4))
    for _ in range(6):
        _, _, term, trunc, info = envs.step(np.zeros(envs.num_envs, dtype=np.int64))
        done = (term | trunc).reshape(4, agents)
        assert (done.all(axis=1) == done.any(axis=1)).all()
    cooperation = info["task_metrics"]["cooperation_score"]
    assert cooperation.shape == (4 * agents,) and np.all((0 <= cooperation) & (cooperation <= 1))


@pytest.mark.parametrize("task", TASKS)
def test_create_task_is_a_gymnasium_env(task):
    env = create_task(task, task_params=HARDEST)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert isinstance(reward, float) and "reward_components" in info


def test_episode_metrics_feed_the_curriculum():
    curriculum = CurriculumManager()
    envs = make_vector_env("navigation", 8, task_params=curriculum.get_current_parameters(), max_episode_steps=4)
    envs.reset(seed=0)
    for _ in range(4):
        _, reward, _, _, info = envs.step(np.zeros(8, dtype=np.int64))
    mask = info["_task_metrics"]
    for row in np.flatnonzero(mask):
        metrics = {k: float(v[row]) for k, v in info["task_metrics"].items()}
        curriculum.update_progress({**metrics, "average_reward": float(reward[row])})
    assert curriculum.current_stage.episodes_completed == 8
    assert curriculum.current_difficulty is DifficultyLevel.BEGINNER


@pytest.mark.skipif(not kernels.ENABLED, reason="numba not installed: only the numpy step exists")
@pytest.mark.parametrize("vision", [False, True])
def test_compiled_navigation_step_matches_numpy_to_the_bit(vision):
    params = {"vision_required": vision, "num_obstacles": 8}
    compiled, plain = make_vector_env("navigation", 16, task_params=params), make_vector_env("navigation", 16, task_params=params)
    assert compiled.compiled
    plain.compiled = False
    np.testing.assert_array_equal(compiled.reset(seed=3)[0], plain.reset(seed=3)[0])
    rng = np.random.default_rng(1)
    for _ in range(700):  # past the time limit: resets, invalid indices and collisions included
        actions = rng.integers(-1, 10, 16)
        a, b = compiled.step(actions), plain.step(actions)
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a[4]["action_clipped"], b[4]["action_clipped"])
    assert compiled.rewards.get_metrics() == plain.rewards.get_metrics()
