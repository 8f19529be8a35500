"""One task copy as a plain ``gymnasium.Env`` (the spec's ``create_task``).

A thin wrapper over the batch environment with one copy, so both forms share every line of the
task logic. A single-agent task keeps the batch env's spaces (flat Box, Discrete). A team
(multi-agent) is one env whose observation is [agents, features], whose action is one discrete
choice per agent (MultiDiscrete) and whose reward is the team's (the agents' sum).

The batch env resets a finished copy on the same step; here the finished step returns the true
last observation, as a Gymnasium env should, and the caller resets.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agent.tasks.base import BatchTaskEnv


class TaskEnv(gym.Env):
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, batch: BatchTaskEnv) -> None:
        if batch.copies != 1:
            raise ValueError(f"TaskEnv wraps a batch env of one copy, got {batch.copies}")
        self.batch = batch
        self.agents = batch.agents
        single, n = batch.single_observation_space, int(batch.single_action_space.n)
        if self.agents == 1:
            self.observation_space = single
            self.action_space: gym.Space = gym.spaces.Discrete(n)
        else:
            self.observation_space = gym.spaces.Box(
                np.tile(single.low, (self.agents, 1)), np.tile(single.high, (self.agents, 1)), dtype=np.float32
            )
            self.action_space = gym.spaces.MultiDiscrete([n] * self.agents)

    @property
    def task_type(self) -> Any:
        return self.batch.task_type

    def _shape(self, obs: np.ndarray) -> np.ndarray:
        return obs[0] if self.agents == 1 else obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        obs, info = self.batch.reset(seed=seed)
        return self._shape(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        actions = np.atleast_1d(np.asarray(action)).astype(np.int64, copy=False)
        obs, reward, terminated, truncated, batch_info = self.batch.step(actions)
        if batch_info.get("_final_obs") is not None:
            obs = batch_info["final_obs"]
        info: dict[str, Any] = {
            "action_invalid": batch_info["action_invalid"],
            "action_clipped": batch_info["action_clipped"],
            "reward_components": {k: float(v.sum()) for k, v in batch_info["reward_components"].items()},
        }
        if "task_metrics" in batch_info:
            info["task_metrics"] = {k: v.tolist() if self.agents > 1 else float(v[0]) for k, v in batch_info["task_metrics"].items()}
        return self._shape(obs), float(reward.sum()), bool(terminated[0]), bool(truncated[0]), info

    def get_state(self) -> dict[str, Any]:
        return self.batch.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.batch.set_state(state)
