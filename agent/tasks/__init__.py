"""The task world: task environments, action spaces, rewards, the curriculum, and Gymnasium ids.

Wherever a task is accepted, a registered Gymnasium env id is too: :func:`make_vector_env`
dispatches on the name. A task type (``TaskType`` or its value: navigation, exploration,
multi_agent, manipulation) gives one of this package's batch environments: ``num_envs`` copies
stepped as one numpy batch, ``num_envs * agents`` rows for the multi-agent task (one row per
agent; ``envs.num_envs`` is always the row count the network sees).
"""

from __future__ import annotations

import enum
from typing import Any

import gymnasium as gym

from agent.config import Config
from agent.tasks.base import BatchTaskEnv, TaskStateError
from agent.tasks.cooperative import CooperativeEnv
from agent.tasks.curriculum import (
    CurriculumError,
    CurriculumManager,
    CurriculumStage,
    DifficultyLevel,
    TaskParameters,
)
from agent.tasks.exploration import ExplorationEnv
from agent.tasks.gym_adapter import (
    UnsupportedEnvironmentError,
    autoreset_mode,
    capture_env_state,
    is_gym_id,
    make_gym_vector_env,
    restore_env_state,
)
from agent.tasks.manipulation import ManipulationEnv
from agent.tasks.navigation import NavigationEnv
from agent.tasks.rewards import (
    RewardComponent,
    RewardConfig,
    RewardError,
    TaskRewardManager,
    plot_reward_components,
)
from agent.tasks.single import TaskEnv
from agent.tasks.spaces import (
    ActionBounds,
    ActionSpace,
    ActionSpaceError,
    ActionSpaceFactory,
    ActionType,
    CooperativeActionSpace,
    ManipulationActionSpace,
    NavigationActionSpace,
)
from agent.tasks.types import TaskType

__all__ = [
    "ActionBounds",
    "ActionSpace",
    "ActionSpaceError",
    "ActionSpaceFactory",
    "ActionType",
    "BatchTaskEnv",
    "CooperativeActionSpace",
    "CooperativeEnv",
    "CurriculumError",
    "CurriculumManager",
    "CurriculumStage",
    "DifficultyLevel",
    "ExplorationEnv",
    "ManipulationActionSpace",
    "ManipulationEnv",
    "NavigationActionSpace",
    "NavigationEnv",
    "RewardComponent",
    "RewardConfig",
    "RewardError",
    "TaskEnv",
    "TaskParameters",
    "TaskRewardManager",
    "TaskStateError",
    "TaskType",
    "UnsupportedEnvironmentError",
    "autoreset_mode",
    "capture_env_state",
    "create_task",
    "make_vector_env",
    "plot_reward_components",
    "restore_env_state",
    "task_name",
    "task_spaces",
]

TASK_ENVS: dict[TaskType, type[BatchTaskEnv]] = {
    TaskType.NAVIGATION: NavigationEnv,
    TaskType.EXPLORATION: ExplorationEnv,
    TaskType.MULTI_AGENT: CooperativeEnv,
    TaskType.MANIPULATION: ManipulationEnv,
}


def task_name(task: Any) -> str:
    """The canonical string of a task type or env id (enums give their value)."""
    return str(task.value) if isinstance(task, enum.Enum) else str(task)


def make_vector_env(
    task: Any,
    num_envs: int,
    *,
    max_episode_steps: int | None = None,
    task_params: Any = None,
    reward_config: Any = None,
    config: Config | None = None,
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of a task (or of a Gymnasium env id) stepped as one batch.

    For a task type: ``config`` is the resolved configuration (None: params.yaml's) whose
    ``tasks``, ``rewards`` and ``curriculum`` sections the env uses; ``task_params`` is
    TaskParameters, a mapping of some of its fields, or None (the first stage of the config's
    curriculum); ``reward_config`` a RewardConfig, a mapping (keys it lacks: the config's), or
    None (the config's ``rewards``); the episode's step limit is the stage's time limit /
    ``tasks.dt``, capped by ``max_episode_steps``. A Gymnasium env uses none of these sections.
    """
    task_type = TaskType.parse(task)
    if task_type is not None:
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be an agent.config.Config, got {type(config).__name__}")
        rewards = reward_config
        if rewards is not None and not isinstance(rewards, RewardConfig):
            rewards = RewardConfig.from_mapping(rewards, config=config)
        return TASK_ENVS[task_type](
            num_envs,
            task_params=task_params,
            reward_config=rewards,
            max_episode_steps=max_episode_steps,
            config=config,
        )
    name = task_name(task)
    if is_gym_id(name):
        return make_gym_vector_env(name, num_envs, max_episode_steps)
    raise UnsupportedEnvironmentError(
        f"unknown task '{name}': expected a task type ({', '.join(t.value for t in TaskType)}) "
        "or a registered Gymnasium env id"
    )


def create_task(
    task_type: Any,
    task_params: Any = None,
    reward_config: Any = None,
    *,
    max_episode_steps: int | None = None,
    config: Config | None = None,
) -> TaskEnv:
    """One copy of a task as a ``gymnasium.Env`` (a team, for the multi-agent task); ``config``
    as for :func:`make_vector_env`."""
    if TaskType.parse(task_type) is None:
        raise UnsupportedEnvironmentError(
            f"unknown task type {task_type!r}; expected one of {[t.value for t in TaskType]}"
        )
    return TaskEnv(
        make_vector_env(
            task_type,
            1,
            task_params=task_params,
            reward_config=reward_config,
            max_episode_steps=max_episode_steps,
            config=config,
        )
    )


def task_spaces(task: Any, *, config: Config | None = None) -> tuple[int, int]:
    """(observation size, number of discrete actions) of a task: the agent's input/output sizes
    (under ``config``'s ``tasks`` settings: sensors, team size and grid decide them).

    Both are the same at every curriculum stage, so one network serves the whole curriculum."""
    envs = make_vector_env(task, 1, config=config)
    try:
        return int(envs.single_observation_space.shape[0]), int(envs.single_action_space.n)
    finally:
        envs.close()
