"""A training run's own state: counters, exploration, episode history, evaluations.

Everything here goes into a checkpoint's ``trainer`` section, so that a resumed run continues the
same run (step counter, epsilon, the best weights so far, the curriculum's transitions). The
environments' state belongs to the Collector and the weights to the Learner; this is the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RunState:
    global_step: int = 0
    """environment transitions collected (every copy's, every agent's)"""
    episodes_done: int = 0
    epsilon: float = 1.0
    exploration_steps: int | None = None
    """the linear schedule's horizon, fixed once per run so resuming keeps the same schedule"""
    planned_steps: int | None = None
    """the run's step horizon (its budget), fixed with the exploration schedule: what the
    learning-rate schedule's progress is measured against, across resumes and chunks"""
    steps_since_train: int = 0
    episode_rewards: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    best_reward: float = -math.inf
    best_recent_mean: float = -math.inf
    best_eval_reward: float = -math.inf
    next_eval: int = 0
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    """(global step, mean greedy reward) of each evaluation during training"""
    best_weights: dict[str, torch.Tensor] | None = None
    stage_transitions: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    """wall time spent in training, over every call and resume"""

    def record_episode(self, reward: float, length: int) -> None:
        self.episode_rewards.append(reward)
        self.episode_lengths.append(length)
        self.best_reward = max(self.best_reward, reward)
        self.episodes_done += 1

    def to_checkpoint(self) -> dict[str, Any]:
        """Tensors and plain values only: a checkpoint loads with ``weights_only=True``."""
        return {
            "global_step": self.global_step,
            "episodes_done": self.episodes_done,
            "epsilon": self.epsilon,
            "exploration_steps": self.exploration_steps,
            "planned_steps": self.planned_steps,
            "steps_since_train": self.steps_since_train,
            "episode_rewards": torch.tensor(self.episode_rewards, dtype=torch.float64),
            "episode_lengths": torch.tensor(self.episode_lengths, dtype=torch.int64),
            "best_reward": self.best_reward,
            "best_recent_mean": self.best_recent_mean,
            "best_eval_reward": self.best_eval_reward,
            "next_eval": self.next_eval,
            "evaluations": torch.tensor(self.evaluations, dtype=torch.float64).reshape(-1, 2),
            "best_weights": self.best_weights,
            "stage_transitions": self.stage_transitions,
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> RunState:
        return cls(
            global_step=int(state["global_step"]),
            episodes_done=int(state["episodes_done"]),
            epsilon=float(state["epsilon"]),
            exploration_steps=state["exploration_steps"],
            planned_steps=state.get("planned_steps"),
            steps_since_train=int(state["steps_since_train"]),
            episode_rewards=state["episode_rewards"].tolist(),
            episode_lengths=state["episode_lengths"].tolist(),
            best_reward=float(state["best_reward"]),
            best_recent_mean=float(state["best_recent_mean"]),
            best_eval_reward=float(state["best_eval_reward"]),
            next_eval=int(state["next_eval"]),
            evaluations=[(int(step), float(reward)) for step, reward in state["evaluations"].tolist()],
            best_weights=state["best_weights"],
            stage_transitions=list(state.get("stage_transitions", [])),
            train_seconds=float(state.get("train_seconds", 0.0)),
        )
