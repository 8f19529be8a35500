"""Task-specific rewards: components, their weights, and the manager that adds and tracks them.

A reward is a weighted sum of *signals*, one per :class:`RewardComponent`. A signal is what the
task measured this step (progress, a collision, new cells, ...); the weight is the component's
field of :class:`RewardConfig`. The spec's six steps are the order of the components: (1) base
reward and time penalty, (2) collision penalty, (3) task-specific exploration and cooperation
bonuses, (4) completion bonus, (5) efficiency bonus, then (6) tracking of every component.

None of the positive components can be farmed by dragging an episode out: the base reward pays
for *progress* (a difference of potentials: going back costs what going forward paid), the
exploration bonus pays only for cells and resources not seen before in the episode, the
cooperation bonus for *improvement* of the formation (and once for a joint finish), the
completion and efficiency bonuses once, on success.

Adding a component (the spec's four customisation steps, shown in tests/unit/test_rewards.py):
1. add a member to the component enum (a subclass manager names its enum in ``components``);
2. add a field of the same name to the config (a RewardConfig subclass);
3. implement ``signal_<name>(state, action, next_state, info)`` on the manager;
4. nothing else: metrics (``get_metrics()["reward_components"]``) and the plot pick it up.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from agent.config import Config
from agent.config_sections import RewardSection
from agent.tasks.params import resolve, reward_defaults
from agent.tasks.types import TaskType

Signal = Callable[[Any, Any, Any, Mapping[str, Any]], Any]


class RewardError(ValueError):
    """A reward configuration or manager state is invalid."""


class RewardComponent(str, enum.Enum):
    """The components in calculation order; each value names the component's RewardConfig field."""

    BASE_REWARD = "base_reward"
    TIME_PENALTY = "time_penalty"
    COLLISION_PENALTY = "collision_penalty"
    EXPLORATION_BONUS = "exploration_bonus"
    COOPERATION_BONUS = "cooperation_bonus"
    COMPLETION_BONUS = "completion_bonus"
    EFFICIENCY_BONUS = "efficiency_bonus"


def _default(name: str) -> Callable[[], float]:
    return lambda: float(getattr(reward_defaults(), name))


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Component weights. Fields not given take the ``rewards`` section of params.yaml (the
    spec's defaults); :meth:`from_config` takes them from a resolved config instead."""

    base_reward: float = dataclasses.field(default_factory=_default("base_reward"))
    time_penalty: float = dataclasses.field(default_factory=_default("time_penalty"))
    collision_penalty: float = dataclasses.field(default_factory=_default("collision_penalty"))
    completion_bonus: float = dataclasses.field(default_factory=_default("completion_bonus"))
    exploration_bonus: float = dataclasses.field(default_factory=_default("exploration_bonus"))
    cooperation_bonus: float = dataclasses.field(default_factory=_default("cooperation_bonus"))
    efficiency_bonus: float = dataclasses.field(default_factory=_default("efficiency_bonus"))

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(f"RewardConfig.{field.name} must be a finite number, got {value!r}")
            if field.name.endswith("_penalty") and value > 0:
                raise RewardError(f"RewardConfig.{field.name} is a penalty and must be <= 0, got {value}")
            if field.name.endswith("_bonus") and value < 0:
                raise RewardError(f"RewardConfig.{field.name} is a bonus and must be >= 0, got {value}")

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any] | None, *, config: Config | RewardSection | None = None
    ) -> RewardConfig:
        """A config from a dict (a params file, a checkpoint); unknown keys are an error. Keys
        not given come from ``config`` (a resolved Config or its ``rewards`` section) if given,
        else from params.yaml."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if set(values) - known:
            raise RewardError(f"unknown reward settings {sorted(set(values) - known)}; known: {sorted(known)}")
        if config is not None:
            section = config.rewards if isinstance(config, Config) else config
            if not isinstance(section, RewardSection):
                raise RewardError(f"config must be a Config or its rewards section, got {type(config).__name__}")
            values = {**{k: v for k, v in section.model_dump().items() if k in known}, **values}
        return cls(**values)

    @classmethod
    def from_config(cls, config: Config | RewardSection | None = None, **overrides: Any) -> RewardConfig:
        """The weights of a resolved config's ``rewards`` section (default: params.yaml's), with
        any keyword replacing one of them."""
        return cls.from_mapping(overrides, config=config if config is not None else resolve(None))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def weight(self, component: enum.Enum) -> float:
        try:
            return float(getattr(self, component.value))
        except AttributeError:
            raise RewardError(
                f"{type(self).__name__} has no field '{component.value}' for component {component.name} "
                "(customisation step 2: add it to the config)"
            ) from None


# ---------------------------------------------------------------------- shared signal formulas
# Used by the manager's generic path and by the environments' batch path alike.


def exploration_signal(new_cells: Any, new_resources: Any, resource_value: float, out: Any = None) -> Any:
    """Newly covered cells, a found resource counting ``resource_value`` cells."""
    scaled = np.multiply(new_resources, resource_value, out=out)
    return np.add(new_cells, scaled, out=out)


def cooperation_signal(formation_progress: Any, joint_finish: Any, out: Any = None) -> Any:
    """Improvement of the team formation (a potential difference) plus 1 for a joint finish."""
    return np.add(formation_progress, joint_finish, out=out)


def efficiency_signal(success: Any, smoothness: Any, out: Any = None) -> Any:
    """On success, the episode's mean action smoothness in [0, 1]."""
    return np.multiply(success, smoothness, out=out)



class TaskRewardManager:
    """Computes the reward of a step (one or a batch) and tracks components and task metrics.

    ``calculate_reward`` is the general entry: signals come from ``info`` keys (``progress``,
    ``collisions``, ``new_cells``, ``new_resources``, ``formation_progress``, ``joint_finish``,
    ``success``, ``smoothness``; absent means 0) and from ``signal_<component>`` methods.
    Batch environments fill the signal matrix themselves and call :meth:`weigh`.
    """

    components: ClassVar[type[enum.Enum]] = RewardComponent
    """The component enum; its order is the calculation order."""

    def __init__(
        self,
        task_type: Any = TaskType.NAVIGATION,
        config: RewardConfig | Config | None = None,
        *,
        resource_value: float | None = None,
        history: int = 1000,
    ) -> None:
        """``config``: the weights (a RewardConfig), or a resolved :class:`agent.config.Config`
        whose ``rewards`` give them and whose ``tasks.exploration.resource_value`` is the default
        of ``resource_value``; None: params.yaml's."""
        task = TaskType.parse(task_type)
        if task is None:
            raise RewardError(f"unknown task type {task_type!r}")
        resolved: Config | None = None
        if isinstance(config, Config):
            resolved, config = config, RewardConfig.from_config(config)
        if config is not None and not isinstance(config, RewardConfig):
            raise RewardError(f"config must be a RewardConfig or a Config, got {type(config).__name__}")
        if history < 1:
            raise RewardError(f"history must be >= 1, got {history}")
        self.task_type = task
        self.config = config if config is not None else RewardConfig()
        self.order: list[enum.Enum] = list(self.components)
        self.names = [component.value for component in self.order]
        self.weights = np.array([self.config.weight(c) for c in self.order], dtype=np.float64)
        self._column = self.weights[:, None]
        self._signals: list[Signal] = [self._signal_for(c) for c in self.order]
        if resource_value is None:
            resource_value = resolve(resolved).tasks.exploration.resource_value
        self.resource_value = float(resource_value)
        self._history = history
        self.reset_metrics()

    def _signal_for(self, component: enum.Enum) -> Signal:
        method = getattr(self, f"signal_{component.value}", None)
        if method is None:
            raise RewardError(
                f"{type(self).__name__} has no method signal_{component.value} for component "
                f"{component.name} (customisation step 3: implement its calculation)"
            )
        return method

    @property
    def builtin_only(self) -> bool:
        """True when every component is a built-in one, so a batch env may fill the signals."""
        return self.names == [c.value for c in RewardComponent]

    # ------------------------------------------------------------------ signals (steps 1-5)

    def signal_base_reward(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return info.get("progress", 0.0)

    def signal_time_penalty(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return 1.0

    def signal_collision_penalty(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return info.get("collisions", 0.0)

    def signal_exploration_bonus(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return exploration_signal(info.get("new_cells", 0.0), info.get("new_resources", 0.0), self.resource_value)

    def signal_cooperation_bonus(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return cooperation_signal(info.get("formation_progress", 0.0), info.get("joint_finish", 0.0))

    def signal_completion_bonus(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return info.get("success", 0.0)

    def signal_efficiency_bonus(self, state: Any, action: Any, next_state: Any, info: Mapping[str, Any]) -> Any:
        return efficiency_signal(info.get("success", 0.0), info.get("smoothness", 0.0))

    # ------------------------------------------------------------------ the calculation

    def calculate_reward(
        self,
        state: Any = None,
        action: Any = None,
        next_state: Any = None,
        info: Mapping[str, Any] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Reward and its components for one step (floats) or a batch (arrays of one shape)."""
        info = info or {}
        raw = [np.asarray(fn(state, action, next_state, info), dtype=np.float64) for fn in self._signals]
        try:
            shape = np.broadcast_shapes(*(r.shape for r in raw))
        except ValueError:
            raise RewardError(f"reward signals have incompatible shapes {[r.shape for r in raw]}") from None
        if len(shape) > 1:
            raise RewardError(f"reward signals must be scalars or 1-D batches, got shape {shape}")
        if not all(np.isfinite(r).all() for r in raw):
            bad = [name for name, r in zip(self.names, raw) if not np.isfinite(r).all()]
            raise RewardError(f"non-finite reward signals for {bad}")
        signals = np.stack([np.broadcast_to(r, shape).reshape(-1) for r in raw])
        reward, components = self.weigh(signals)
        if shape == ():
            return float(reward[0]), {n: float(v[0]) for n, v in zip(self.names, components)}
        return reward, dict(zip(self.names, components))

    def weigh(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batch path: ``signals`` [C, N] -> (reward [N], components [C, N]), tracked (step 6)."""
        components = signals * self._column
        if self._episode.shape != components.shape:
            self._episode = np.zeros_like(components)
        self._episode += components
        self.steps += components.shape[1]
        return self.weights @ signals, components

    # ------------------------------------------------------------------ tracking (step 6)

    def reset_metrics(self) -> None:
        self.steps = 0
        self.episodes = 0
        self._episode = np.zeros((len(self.order), 0))
        self._finished_totals = np.zeros(len(self.order))
        self._episode_totals: deque[np.ndarray] = deque(maxlen=self._history)
        self._metric_sums: dict[str, float] = {}
        self._metric_counts: dict[str, int] = {}
        self._success_time = [0.0, 0]
        self._agent_cooperation: dict[int, list[float]] = {}

    def end_episodes(self, rows: Any, names: Sequence[str] = (), values: Any = None) -> None:
        """Close the episodes of batch rows ``rows`` (indices or a mask); ``values`` [len(names),
        len(rows)] are their task metrics."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if self._episode.shape[1] > int(rows.max()):
            totals = self._episode[:, rows]
            self._finished_totals += totals.sum(axis=1)
            self._episode_totals.extend(totals.T.copy())
            self._episode[:, rows] = 0.0
        self.episodes += int(rows.size)
        if names:
            self._record(list(names), np.asarray(values, dtype=np.float64).reshape(len(names), -1))

    def record_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Add finished episodes' task metrics (scalars, or arrays of one length)."""
        arrays = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in metrics.values()]
        if not arrays:
            return
        try:
            values = np.stack(np.broadcast_arrays(*arrays))
        except ValueError:
            raise RewardError(f"metric arrays differ in length: {[a.shape for a in arrays]}") from None
        self._record(list(metrics), values)

    def _record(self, names: list[str], values: np.ndarray) -> None:
        for name, total in zip(names, values.sum(axis=1).tolist()):
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + total
            self._metric_counts[name] = self._metric_counts.get(name, 0) + values.shape[1]
        column = {name: i for i, name in enumerate(names)}
        if "task_success" in column and "completion_time" in column:
            won = values[column["task_success"]] > 0.5
            self._success_time[0] += float(values[column["completion_time"]][won].sum())
            self._success_time[1] += int(won.sum())
        if "agent_index" in column and "cooperation_score" in column:
            for agent, score in zip(values[column["agent_index"]].astype(int).tolist(), values[column["cooperation_score"]].tolist()):
                entry = self._agent_cooperation.setdefault(agent, [0.0, 0.0])
                entry[0] += score
                entry[1] += 1.0

    def _mean(self, key: str) -> float:
        count = self._metric_counts.get(key, 0)
        return self._metric_sums[key] / count if count else 0.0

    def get_metrics(self) -> dict[str, Any]:
        """Reward components (mean per step, totals, per-episode distribution) and task metrics."""
        totals = self._finished_totals + self._episode.sum(axis=1)
        per_step = totals / max(self.steps, 1)
        history = np.array(self._episode_totals) if self._episode_totals else np.zeros((0, len(self.names)))
        distributions = {
            name: {
                "mean": float(history[:, i].mean()) if len(history) else 0.0,
                "std": float(history[:, i].std()) if len(history) else 0.0,
                "min": float(history[:, i].min()) if len(history) else 0.0,
                "max": float(history[:, i].max()) if len(history) else 0.0,
            }
            for i, name in enumerate(self.names)
        }
        wins = self._success_time[1]
        metrics: dict[str, Any] = {
            "reward_components": dict(zip(self.names, per_step.tolist())),
            "reward_component_totals": dict(zip(self.names, totals.tolist())),
            "reward_component_distributions": distributions,
            "steps": self.steps,
            "episodes": self.episodes,
            "completion_rate": self._mean("task_success"),
            "average_completion_time": self._success_time[0] / wins if wins else 0.0,
            "collision_rate": self._mean("collision_rate"),
            "exploration_coverage": self._mean("exploration_coverage"),
            "explored_area": self._mean("explored_area"),
            "resource_discovery_rate": self._mean("resource_discovery_rate"),
            "average_cooperation": self._mean("cooperation_score"),
            "per_agent_cooperation": {
                agent: total / count for agent, (total, count) in sorted(self._agent_cooperation.items())
            },
            "formation_maintenance_rate": self._mean("formation_maintenance_rate"),
            "tool_use_efficiency": self._mean("tool_use_efficiency"),
        }
        for key in self._metric_sums:
            metrics.setdefault(key, self._mean(key))
        return metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Tracking state as plain data: a resumed run reports the same metrics."""
        return {
            "names": list(self.names),
            "steps": self.steps,
            "episodes": self.episodes,
            "episode": self._episode.copy(),
            "finished_totals": self._finished_totals.copy(),
            "episode_totals": np.array(self._episode_totals).reshape(-1, len(self.names)),
            "metric_sums": dict(self._metric_sums),
            "metric_counts": dict(self._metric_counts),
            "success_time": list(self._success_time),
            "agent_cooperation": {str(k): list(v) for k, v in self._agent_cooperation.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("names", [])) != self.names:
            raise RewardError(f"reward state has components {state.get('names')}, this manager {self.names}")
        if int(state["steps"]) < 0 or int(state["episodes"]) < 0:
            raise RewardError("reward state has negative counters")
        self.steps, self.episodes = int(state["steps"]), int(state["episodes"])
        self._episode = np.asarray(state["episode"], dtype=np.float64).copy()
        self._finished_totals = np.asarray(state["finished_totals"], dtype=np.float64).copy()
        self._episode_totals = deque(np.asarray(state["episode_totals"], dtype=np.float64), maxlen=self._history)
        self._metric_sums = {k: float(v) for k, v in state["metric_sums"].items()}
        self._metric_counts = {k: int(v) for k, v in state["metric_counts"].items()}
        self._success_time = [float(state["success_time"][0]), int(state["success_time"][1])]
        self._agent_cooperation = {int(k): list(v) for k, v in state["agent_cooperation"].items()}


def plot_reward_components(manager: TaskRewardManager, path: Any) -> Any:
    """Bar chart of every component's mean contribution per step (customisation step 4 for free)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = manager.get_metrics()["reward_components"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(list(components), list(components.values()), color="tab:blue")
    ax.set_ylabel("mean reward per step")
    ax.set_title(f"reward components: {manager.task_type.value}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
