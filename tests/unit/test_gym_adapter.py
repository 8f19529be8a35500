"""Gymnasium env ids as vector envs, and environment state that survives a checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from agent.tasks import (
    UnsupportedEnvironmentError,
    autoreset_mode,
    capture_env_state,
    make_vector_env,
    restore_env_state,
    task_spaces,
)


def roll(envs, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        obs, reward, term, trunc, _ = envs.step(rng.integers(0, envs.single_action_space.n, envs.num_envs))
        out.append((obs.copy(), reward.copy(), term.copy(), trunc.copy()))
    return out


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "MountainCar-v0"])
def test_state_survives_a_torch_checkpoint(env_id):
    envs = make_vector_env(env_id, 3, max_episode_steps=40)
    envs.reset(seed=5)
    roll(envs, 57)
    snapshot = capture_env_state(envs)
    assert snapshot["complete"]
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no pickled code in checkpoints
    expected = roll(envs, 60, seed=1)

    fresh = make_vector_env(env_id, 3, max_episode_steps=40)
    fresh.reset(seed=999)
    assert restore_env_state(fresh, loaded)
    actual = roll(fresh, 60, seed=1)
    for (o1, r1, t1, u1), (o2, r2, t2, u2) in zip(expected, actual):
        assert np.array_equal(o1, o2) and np.array_equal(r1, r2)
        assert np.array_equal(t1, t2) and np.array_equal(u1, u2)


def test_env_vector_form_from_four_copies_and_both_autoreset_modes():
    # CartPole's own vector class (next-step autoreset) pays off from a few copies up;
    # below that, plain envs in SyncVectorEnv (same-step autoreset) are faster.
    assert autoreset_mode(make_vector_env("CartPole-v1", 4)).value == "NextStep"
    assert autoreset_mode(make_vector_env("CartPole-v1", 1)).value == "SameStep"
    assert autoreset_mode(make_vector_env("Acrobot-v1", 8)).value == "SameStep"


def test_step_limit_is_the_lower_of_config_and_env():
    envs = make_vector_env("CartPole-v1", 1, max_episode_steps=10)
    envs.reset(seed=0)
    for step in range(1, 11):
        _, _, term, trunc, _ = envs.step(np.array([step % 2]))
        if term[0]:
            pytest.skip("pole fell before the limit")
    assert trunc[0]


def test_spaces_and_refusals():
    assert task_spaces("CartPole-v1") == (4, 2)
    assert task_spaces("Acrobot-v1") == (6, 3)
    with pytest.raises(UnsupportedEnvironmentError, match="Discrete action space"):
        make_vector_env("Pendulum-v1", 1)
    with pytest.raises(UnsupportedEnvironmentError, match="unknown task 'NoSuchEnv-v9'"):
        make_vector_env("NoSuchEnv-v9", 1)
