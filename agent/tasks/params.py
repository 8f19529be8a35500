"""The task world's params.yaml sections: ``rewards``, ``curriculum`` and ``tasks``.

The models live in :mod:`agent.config_sections` (so that :class:`agent.config.Config` holds them
without importing this package) and are re-exported here. Their values come from the resolved
config a caller passes down (``config=``); the readers below are the fallback of callers given
none: the sections of :func:`agent.config.default_config`, i.e. of params.yaml alone.
"""

from __future__ import annotations

from agent.config import Config, default_config
from agent.config_sections import (
    CurriculumSection,
    ExplorationSection,
    ManipulationSection,
    MultiAgentSection,
    NavigationSection,
    RewardSection,
    StageSection,
    TasksSection,
)

__all__ = [
    "CurriculumSection",
    "ExplorationSection",
    "ManipulationSection",
    "MultiAgentSection",
    "NavigationSection",
    "RewardSection",
    "StageSection",
    "TasksSection",
    "curriculum_defaults",
    "resolve",
    "reward_defaults",
    "task_settings",
]


def resolve(config: Config | None) -> Config:
    """``config``, or the defaults when a caller passed none."""
    if config is None:
        return default_config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be an agent.config.Config (a resolved configuration), got {type(config).__name__}")
    return config


def reward_defaults(config: Config | None = None) -> RewardSection:
    """The ``rewards`` section of ``config`` (default: params.yaml's)."""
    return resolve(config).rewards


def curriculum_defaults(config: Config | None = None) -> CurriculumSection:
    """The ``curriculum`` section of ``config`` (default: params.yaml's)."""
    return resolve(config).curriculum


def task_settings(config: Config | None = None) -> TasksSection:
    """The ``tasks`` section of ``config`` (default: params.yaml's)."""
    return resolve(config).tasks
