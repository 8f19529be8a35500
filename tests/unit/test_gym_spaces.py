"""More of Gymnasium (issue 14, item 5): Discrete observations one-hot, Dict and Tuple ones
flattened, image observations refused with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from agent.tasks import UnsupportedEnvironmentError, task_spaces
from agent.tasks.gym_adapter import make_gym_vector_env
from flows.cli import main


class _SpaceEnv(gym.Env):
    """A one-step env whose observation space is whatever the test registers it with."""

    def __init__(self, observation_space: gym.Space[Any]) -> None:
        self.observation_space = observation_space
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: int) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), float(action), True, False, {}


def _register(name: str, space: gym.Space[Any]) -> str:
    env_id = f"lagent-test/{name}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda: _SpaceEnv(space), max_episode_steps=5)
    return env_id


@pytest.mark.parametrize("env_id, size", [("FrozenLake-v1", 16), ("CliffWalking-v1", 48), ("Taxi-v4", 500)])
def test_discrete_observations_are_one_hot(env_id: str, size: int) -> None:
    assert task_spaces(env_id)[0] == size
    envs = make_gym_vector_env(env_id, 2)
    obs, _ = envs.reset(seed=0)
    envs.close()
    assert obs.shape == (2, size) and (obs.sum(axis=1) == 1).all() and set(np.unique(obs)) <= {0, 1}


def test_dict_and_tuple_observations_are_flattened() -> None:
    space = gym.spaces.Dict(
        {"position": gym.spaces.Box(-1, 1, (3,)), "mode": gym.spaces.Discrete(4),
         "pair": gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Box(0, 1, (2,))))}
    )
    env_id = _register("dict", space)
    assert task_spaces(env_id) == (3 + 4 + 2 + 2, 2)


@pytest.mark.parametrize(
    "space",
    [gym.spaces.Box(0, 255, (8, 8, 3), np.uint8), gym.spaces.Dict({"camera": gym.spaces.Box(0, 255, (8, 8), np.uint8)})],
    ids=["pixels", "dict-with-camera"],
)
def test_image_observations_are_refused_with_a_clear_error(space: gym.Space[Any], capsys) -> None:
    env_id = _register(f"image-{len(space.shape) if space.shape else 'dict'}", space)
    with pytest.raises(UnsupportedEnvironmentError, match="need a convolutional network"):
        task_spaces(env_id)


def test_a_discrete_observation_env_trains_and_resumes_exactly(tmp_path: Path, capsys) -> None:
    run = tmp_path / "frozen"
    assert main(["train", "--task", "FrozenLake-v1", "--timesteps", "600", "--run-dir", str(run),
                 "--eval-episodes", "2", "--no-progress"]) == 0
    assert main(["train", "--resume", str(run), "--timesteps", "900", "--eval-episodes", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "cannot be restored" not in out
