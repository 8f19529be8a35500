"""Greedy (or epsilon-greedy) evaluation of a policy on environments of its own.

Evaluation never touches a training run's environments or random streams, so evaluating during
training changes nothing about what training does next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from agent.collector import team_metrics
from agent.tasks import autoreset_mode


def evaluate_policy(
    greedy: Callable[[np.ndarray], np.ndarray],
    n_actions: int,
    envs: gym.vector.VectorEnv,
    n_episodes: int,
    seed: int,
    epsilon: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``n_episodes`` episodes on ``envs`` (its copies share them) and summarise them.

    Each copy runs a fixed number of episodes, so short episodes are not over-represented. For
    the multi-agent task an episode is a team's and its return the mean of its agents'.
    ``progress(done, total)`` is called as episodes finish (a progress bar's feed).
    """
    n_copies = int(envs.num_envs) // int(getattr(envs, "agents", 1))
    k = int(getattr(envs, "agents", 1))
    rng = np.random.default_rng(seed)
    targets = np.array([(n_episodes + i) // n_copies for i in range(n_copies)])
    counts = np.zeros(n_copies, dtype=np.int64)
    returns = np.zeros(envs.num_envs)
    lengths = np.zeros(envs.num_envs, dtype=np.int64)
    pending_reset = np.zeros(envs.num_envs, dtype=bool)
    episode_returns: list[float] = []
    episode_lengths: list[int] = []
    task_metrics: dict[str, list[float]] = {}
    next_step_reset = autoreset_mode(envs) == gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = envs.reset(seed=seed)
    while (counts < targets).any():
        actions = greedy(obs)
        if epsilon > 0:
            explore = rng.random(len(actions)) < epsilon
            actions = np.where(explore, rng.integers(0, n_actions, len(actions)), actions)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        active = np.repeat(counts < targets, k)
        if next_step_reset:
            active &= ~pending_reset
            pending_reset = terminated | truncated
        returns[active] += rewards[active]
        lengths[active] += 1
        finished = (terminated | truncated) & active
        for copy in np.unique(np.flatnonzero(finished) // k):
            team = slice(copy * k, copy * k + k)
            episode_returns.append(float(returns[team].mean()))
            episode_lengths.append(int(lengths[copy * k]))
            if "_task_metrics" in info and info["_task_metrics"][copy * k]:
                for key, value in team_metrics(info["task_metrics"], team).items():
                    task_metrics.setdefault(key, []).append(value)
            counts[copy] += 1
            returns[team] = 0.0
            lengths[team] = 0
        if progress is not None and finished.any():
            progress(len(episode_returns), n_episodes)
    result: dict[str, Any] = {
        "episodes": len(episode_returns),
        "epsilon": epsilon,
        "mean_reward": float(np.mean(episode_returns)),
        "std_reward": float(np.std(episode_returns)),
        "min_reward": float(np.min(episode_returns)),
        "max_reward": float(np.max(episode_returns)),
        "mean_length": float(np.mean(episode_lengths)),
        "rewards": episode_returns,
        "task_metrics": {key: float(np.mean(values)) for key, values in task_metrics.items()},
    }
    if "task_success" in task_metrics:
        result["success_rate"] = float(np.mean(task_metrics["task_success"]))
    return result
