"""A DQN learning agent: ``from agent import LearningAgent, TrainingManager, ...``.

The public API is every class the spec names; see ``README.md`` for a tour.
"""

from agent.checkpoint import CheckpointError
from agent.config import Config, ConfigError, load_config
from agent.dqn import LearningAgent, TrainingDivergedError
from agent.memory_client import MemoryClient
from agent.meta import (
    AdaptationResult,
    MetaLearningError,
    MetaLearningManager,
    OptimizationConfig,
    OptimizationType,
    SearchResult,
)
from agent.metrics import InMemorySink, MetricsSink, TensorBoardSink
from agent.network import LearningNetwork, NetworkArchitecture
from agent.replay import ExperienceBuffer, Transitions
from agent.tasks import (
    ActionBounds,
    ActionSpace,
    ActionSpaceFactory,
    ActionType,
    CooperativeActionSpace,
    CurriculumManager,
    CurriculumStage,
    DifficultyLevel,
    ManipulationActionSpace,
    NavigationActionSpace,
    RewardComponent,
    RewardConfig,
    TaskParameters,
    TaskRewardManager,
    TaskType,
    create_task,
)
from agent.manager import TrainingManager

__all__ = [
    "ActionBounds",
    "ActionSpace",
    "ActionSpaceFactory",
    "ActionType",
    "CooperativeActionSpace",
    "CurriculumManager",
    "CurriculumStage",
    "DifficultyLevel",
    "ManipulationActionSpace",
    "NavigationActionSpace",
    "RewardComponent",
    "RewardConfig",
    "TaskParameters",
    "TaskRewardManager",
    "TaskType",
    "create_task",
    "CheckpointError",
    "Config",
    "ConfigError",
    "ExperienceBuffer",
    "InMemorySink",
    "LearningAgent",
    "LearningNetwork",
    "MemoryClient",
    "AdaptationResult",
    "MetaLearningError",
    "MetaLearningManager",
    "OptimizationConfig",
    "OptimizationType",
    "SearchResult",
    "MetricsSink",
    "NetworkArchitecture",
    "TensorBoardSink",
    "TrainingDivergedError",
    "TrainingManager",
    "Transitions",
    "load_config",
]
