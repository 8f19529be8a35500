"""Curriculum learning: stages of growing difficulty, and when to move on.

A stage is left when, over its recent window of episodes, the success rate reaches the stage's
threshold and every extra completion criterion holds, and at least ``min_episodes`` were played
in it. Rates are measured over a window (not the whole stage) so that the early failures of a
stage do not hold a learned agent back forever. The four stages and their numbers are the
spec's and live in params.yaml (``curriculum``).

State (``save_state``/``load_state``) is plain Python data, so it goes into a checkpoint that
``torch.load(weights_only=True)`` can read back.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.config import Config, ConfigError, config_for_task, default_config, load_section
from agent.tasks.params import CurriculumSection, curriculum_defaults

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Completion criteria on these metrics are upper bounds; on every other metric, lower bounds.
LOWER_IS_BETTER = frozenset({"collision_rate", "completion_time", "formation_error"})


class CurriculumError(ValueError):
    """Invalid curriculum parameters, metrics or saved state."""


class DifficultyLevel(str, enum.Enum):
    BEGINNER = "beginner"
    INTERMEDIATE = "intermediate"
    ADVANCED = "advanced"
    EXPERT = "expert"

    @property
    def rank(self) -> int:
        return list(DifficultyLevel).index(self)

    @classmethod
    def parse(cls, value: Any) -> DifficultyLevel:
        if isinstance(value, cls):
            return value
        text = str(value.value if isinstance(value, enum.Enum) else value).lower()
        for member in cls:
            if text == member.value:
                return member
        raise CurriculumError(f"unknown difficulty {value!r}; expected one of {[m.value for m in cls]}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CurriculumError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise CurriculumError(f"{name} must be finite, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class TaskParameters:
    """What a task looks like at one difficulty (the spec's TaskParameters)."""

    workspace_size: tuple[float, float, float]
    num_obstacles: int
    time_limit: float
    vision_required: bool = False
    tool_use_enabled: bool = False
    cooperation_required: bool = False
    success_rate_threshold: float = 0.7
    min_episodes: int = 100

    def __post_init__(self) -> None:
        try:
            size = tuple(float(v) for v in self.workspace_size)
        except (TypeError, ValueError):
            raise CurriculumError(f"workspace_size must be 3 numbers, got {self.workspace_size!r}") from None
        if len(size) != 3 or not all(math.isfinite(v) and v > 0 for v in size):
            raise CurriculumError(f"workspace_size must be 3 positive finite numbers (x, y, z), got {self.workspace_size!r}")
        object.__setattr__(self, "workspace_size", size)
        if isinstance(self.num_obstacles, bool) or not isinstance(self.num_obstacles, int) or not 0 <= self.num_obstacles <= 64:
            raise CurriculumError(f"num_obstacles must be an integer in [0, 64], got {self.num_obstacles!r}")
        time_limit = _number(self.time_limit, "time_limit")
        if time_limit <= 0:
            raise CurriculumError(f"time_limit must be > 0 seconds, got {self.time_limit!r}")
        object.__setattr__(self, "time_limit", time_limit)
        for flag in ("vision_required", "tool_use_enabled", "cooperation_required"):
            if not isinstance(getattr(self, flag), bool):
                raise CurriculumError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        threshold = _number(self.success_rate_threshold, "success_rate_threshold")
        if not 0.0 < threshold <= 1.0:
            raise CurriculumError(f"success_rate_threshold must be in (0, 1], got {self.success_rate_threshold!r}")
        object.__setattr__(self, "success_rate_threshold", threshold)
        if isinstance(self.min_episodes, bool) or not isinstance(self.min_episodes, int) or self.min_episodes < 1:
            raise CurriculumError(f"min_episodes must be a positive integer, got {self.min_episodes!r}")

    @classmethod
    def default(cls, *, config: Config | CurriculumSection | None = None) -> TaskParameters:
        """The first stage's parameters (what a task gets when nothing is said), of ``config``'s
        curriculum (a resolved Config or its ``curriculum`` section; default: params.yaml's)."""
        return default_stages(section=_section(config))[0].task_params

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        base: TaskParameters | None = None,
        *,
        config: Config | CurriculumSection | None = None,
    ) -> TaskParameters:
        """Parameters from a dict; keys not given are taken from ``base`` (default: the first
        stage of ``config``'s curriculum)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise CurriculumError(f"unknown task parameters {sorted(unknown)}; known: {sorted(known)}")
        merged = dataclasses.asdict(base if base is not None else cls.default(config=config))
        merged.update(values)
        return cls(**merged)

    @classmethod
    def coerce(cls, value: Any, *, config: Config | CurriculumSection | None = None) -> TaskParameters:
        """Accept TaskParameters, a mapping of some of its fields, or None (the first stage of
        ``config``'s curriculum; default: params.yaml's)."""
        if value is None:
            return cls.default(config=config)
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_mapping(value, config=config)
        raise CurriculumError(f"task_params must be TaskParameters or a mapping, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["workspace_size"] = list(self.workspace_size)
        return values

    def max_steps(self, dt: float) -> int:
        """The episode's step limit: the time limit at ``dt`` seconds per step."""
        return max(1, math.ceil(self.time_limit / dt - 1e-9))


class CurriculumStage:
    """One difficulty: its parameters, completion criteria, progress and metrics history."""

    def __init__(
        self,
        difficulty: DifficultyLevel | str,
        task_params: TaskParameters | Mapping[str, Any],
        completion_criteria: Mapping[str, float] | None = None,
        *,
        window: int = 100,
        history_limit: int = 1000,
    ) -> None:
        self.difficulty = DifficultyLevel.parse(difficulty)
        self.task_params = (
            task_params if isinstance(task_params, TaskParameters) else TaskParameters.from_mapping(task_params)
        )
        self.completion_criteria = {
            str(k): _number(v, f"completion criterion '{k}'") for k, v in (completion_criteria or {}).items()
        }
        if window < 1 or history_limit < 1:
            raise CurriculumError(f"window and history_limit must be >= 1, got {window}, {history_limit}")
        self.window = window
        self.history_limit = history_limit
        self.reset_progress()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CurriculumStage:
        """From the spec's stage dict: ``difficulty``, ``task_params``, ``completion_criteria``."""
        missing = {"difficulty", "task_params"} - set(config)
        if missing:
            raise CurriculumError(f"stage config lacks {sorted(missing)}")
        return cls(config["difficulty"], config["task_params"], config.get("completion_criteria"), **kwargs)

    def reset_progress(self) -> None:
        self.episodes_completed = 0
        self.successes = 0
        self.recent: deque[dict[str, float]] = deque(maxlen=self.window)
        self.metrics_history: deque[dict[str, float]] = deque(maxlen=self.history_limit)
        self.metric_sums: dict[str, float] = {}

    def record(self, metrics: Mapping[str, Any]) -> None:
        """Add one finished episode's metrics (must include ``task_success``)."""
        if not isinstance(metrics, Mapping):
            raise CurriculumError(f"episode metrics must be a mapping, got {type(metrics).__name__}")
        if "task_success" not in metrics:
            raise CurriculumError("episode metrics need 'task_success' (1 for a success, 0 otherwise)")
        clean = {str(k): _number(v, f"metric '{k}'") for k, v in metrics.items()}
        if clean["task_success"] not in (0.0, 1.0):
            raise CurriculumError(f"task_success must be 0 or 1, got {metrics['task_success']!r}")
        self.episodes_completed += 1
        self.successes += int(clean["task_success"])
        self.recent.append(clean)
        self.metrics_history.append(clean)
        for key, value in clean.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value

    def recent_mean(self, key: str) -> float | None:
        values = [m[key] for m in self.recent if key in m]
        return sum(values) / len(values) if values else None

    @property
    def success_rate(self) -> float:
        """Success rate over the recent window."""
        return self.recent_mean("task_success") or 0.0

    def criteria_progress(self) -> dict[str, dict[str, Any]]:
        """Each criterion: its current value, its threshold and whether it holds."""
        progress = {
            "min_episodes": {
                "value": float(self.episodes_completed),
                "threshold": float(self.task_params.min_episodes),
                "met": self.episodes_completed >= self.task_params.min_episodes,
            },
            "success_rate": {
                "value": self.success_rate,
                "threshold": self.task_params.success_rate_threshold,
                "met": len(self.recent) > 0 and self.success_rate >= self.task_params.success_rate_threshold,
            },
        }
        for key, threshold in self.completion_criteria.items():
            value = self.recent_mean(key)
            met = value is not None and (value <= threshold if key in LOWER_IS_BETTER else value >= threshold)
            progress[key] = {"value": value, "threshold": threshold, "met": met}
        return progress

    def is_complete(self) -> bool:
        return all(entry["met"] for entry in self.criteria_progress().values())

    def summary(self) -> dict[str, Any]:
        means = {k: v / self.episodes_completed for k, v in self.metric_sums.items()} if self.episodes_completed else {}
        return {
            "difficulty": self.difficulty.value,
            "episodes": self.episodes_completed,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "overall_success_rate": self.successes / self.episodes_completed if self.episodes_completed else 0.0,
            "metric_means": means,
            "criteria": self.criteria_progress(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "difficulty": self.difficulty.value,
            "task_params": self.task_params.to_dict(),
            "completion_criteria": dict(self.completion_criteria),
            "episodes": self.episodes_completed,
            "successes": self.successes,
            "recent": [dict(m) for m in self.recent],
            "history": [dict(m) for m in self.metrics_history],
            "metric_sums": dict(self.metric_sums),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        where = f"stage '{self.difficulty.value}'"
        episodes, successes = state.get("episodes"), state.get("successes")
        if not isinstance(episodes, int) or not isinstance(successes, int) or not 0 <= successes <= episodes:
            raise CurriculumError(f"{where}: inconsistent counters episodes={episodes!r}, successes={successes!r}")
        recent, history = state.get("recent"), state.get("history")
        if not isinstance(recent, list) or not isinstance(history, list) or len(recent) > episodes or len(history) > episodes:
            raise CurriculumError(f"{where}: recent/history must be lists no longer than the episode count")
        for entry in recent + history:
            if not isinstance(entry, Mapping) or "task_success" not in entry:
                raise CurriculumError(f"{where}: every recorded episode needs task_success")
        self.reset_progress()
        self.episodes_completed, self.successes = episodes, successes
        self.recent.extend({str(k): float(v) for k, v in m.items()} for m in recent)
        self.metrics_history.extend({str(k): float(v) for k, v in m.items()} for m in history)
        self.metric_sums = {str(k): float(v) for k, v in dict(state.get("metric_sums", {})).items()}


def _section(config: Config | CurriculumSection | None) -> CurriculumSection:
    """The curriculum section of a resolved config (or the section itself; None: params.yaml's)."""
    if config is None:
        return curriculum_defaults()
    if isinstance(config, Config):
        return config.curriculum
    if isinstance(config, CurriculumSection):
        return config
    raise CurriculumError(f"config must be a Config or its curriculum section, got {type(config).__name__}")


def default_stages(
    window: int | None = None,
    history_limit: int | None = None,
    section: CurriculumSection | None = None,
    *,
    config: Config | None = None,
) -> list[CurriculumStage]:
    """The spec's four stages, as params.yaml gives them (or as ``section``, or a resolved
    ``config``'s curriculum, does)."""
    section = section if section is not None else _section(config)
    stages = []
    for name, stage in section.stages.items():
        values = stage.model_dump()
        criteria = values.pop("completion_criteria")
        values["workspace_size"] = tuple(values["workspace_size"])
        stages.append(
            CurriculumStage(
                name,
                TaskParameters(**values),
                criteria,
                window=window or section.window,
                history_limit=history_limit or section.history_limit,
            )
        )
    return stages


class CurriculumManager:
    """Walks the stages in order as the agent meets each stage's completion criteria."""

    def __init__(
        self,
        stages: Sequence[CurriculumStage | Mapping[str, Any]] | None = None,
        *,
        window: int | None = None,
        history_limit: int | None = None,
        config: Config | None = None,
    ) -> None:
        """``stages`` None: those of ``config``'s ``curriculum`` section (a resolved Config;
        default: params.yaml's), with its window and history limit unless given here."""
        if stages is None:
            built = default_stages(window, history_limit, _section(config))
        else:
            kwargs = {k: v for k, v in (("window", window), ("history_limit", history_limit)) if v is not None}
            built = [s if isinstance(s, CurriculumStage) else CurriculumStage.from_config(s, **kwargs) for s in stages]
        if not built:
            raise CurriculumError("a curriculum needs at least one stage")
        ranks = [stage.difficulty.rank for stage in built]
        if ranks != sorted(set(ranks)):
            raise CurriculumError(
                f"stages must be in increasing difficulty without repeats, got {[s.difficulty.value for s in built]}"
            )
        self.stages: list[CurriculumStage] = built
        self.current_index = 0
        self.total_episodes = 0
        self.transitions: list[dict[str, Any]] = []

    @classmethod
    def from_params(cls, section: Config | CurriculumSection | Mapping[str, Any]) -> CurriculumManager:
        """The curriculum a params ``curriculum`` section describes, as resolved for a run (the
        task's profile, ``--params`` files and ``--set`` overrides applied); a resolved Config
        gives its own section."""
        if isinstance(section, Config):
            section = section.curriculum
        if not isinstance(section, CurriculumSection):
            try:
                section = load_section("curriculum", CurriculumSection, {"curriculum": section})  # type: ignore[assignment]
            except ConfigError as exc:
                raise CurriculumError(str(exc)) from None
        assert isinstance(section, CurriculumSection)
        return cls(default_stages(section=section))

    @classmethod
    def for_task(cls, task: Any, *, config: Config | None = None) -> CurriculumManager:
        """The curriculum of a task: that of ``config`` (a resolved Config) moved to ``task``
        (:func:`agent.config.config_for_task`: the task's profile applied under what the config
        chose; a config loaded for this task is used as it is); without one, the defaults with
        the task's profile applied."""
        name = str(getattr(task, "value", task))
        if config is None:
            return cls.from_params(default_config(name).curriculum)
        if not isinstance(config, Config):
            raise CurriculumError(f"config must be an agent.config.Config, got {type(config).__name__}")
        return cls.from_params(config_for_task(config, name).curriculum)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CurriculumManager:
        """The curriculum a checkpoint was made with (its stages, criteria and window), restored.

        A resumed run keeps the thresholds it started with, even if params.yaml changed since."""
        stages = state.get("stages") if isinstance(state, Mapping) else None
        if not isinstance(stages, list) or not all(isinstance(s, Mapping) for s in stages):
            raise CurriculumError("not a curriculum state: it has no list of stages")
        window, history_limit = state.get("window"), state.get("history_limit")
        kwargs = {k: v for k, v in (("window", window), ("history_limit", history_limit)) if v is not None}
        try:
            built = [
                CurriculumStage(s["difficulty"], s["task_params"], s.get("completion_criteria"), **kwargs)
                for s in stages
            ]
        except (KeyError, TypeError) as exc:
            raise CurriculumError(f"saved curriculum stage lacks or garbles {exc}") from None
        manager = cls(built)
        manager.load_state(state)
        return manager

    # ------------------------------------------------------------------ where we are

    @property
    def current_stage(self) -> CurriculumStage:
        return self.stages[self.current_index]

    @property
    def current_difficulty(self) -> DifficultyLevel:
        return self.current_stage.difficulty

    @property
    def is_final_stage(self) -> bool:
        return self.current_index == len(self.stages) - 1

    @property
    def is_complete(self) -> bool:
        """The last stage's criteria hold: nothing harder to move on to."""
        return self.is_final_stage and self.current_stage.is_complete()

    def get_current_parameters(self) -> TaskParameters:
        return self.current_stage.task_params

    def parameters_for(self, difficulty: DifficultyLevel | str) -> TaskParameters:
        return self.stage(difficulty).task_params

    def stage(self, difficulty: DifficultyLevel | str) -> CurriculumStage:
        wanted = DifficultyLevel.parse(difficulty)
        for stage in self.stages:
            if stage.difficulty is wanted:
                return stage
        raise CurriculumError(f"this curriculum has no {wanted.value} stage")

    # ------------------------------------------------------------------ progress

    def update_progress(self, metrics: Mapping[str, Any]) -> bool:
        """Record one finished episode; True when this made the difficulty increase."""
        stage = self.current_stage
        stage.record(metrics)
        self.total_episodes += 1
        if self.is_final_stage or not stage.is_complete():
            return False
        self._advance(stage)
        return True

    def update_progress_many(self, episodes: Iterable[Mapping[str, Any]]) -> bool:
        """Several finished episodes in order; True if any of them advanced the stage."""
        advanced = False
        for metrics in episodes:
            advanced = self.update_progress(metrics) or advanced
        return advanced

    def _advance(self, stage: CurriculumStage) -> None:
        self.current_index += 1
        new = self.current_stage
        self.transitions.append(
            {
                "episode": self.total_episodes,
                "from": stage.difficulty.value,
                "to": new.difficulty.value,
                "success_rate": stage.success_rate,
                "stage_episodes": stage.episodes_completed,
            }
        )
        log.info(
            "curriculum: %s -> %s after %d episodes in the stage (success rate %.2f over the last %d)",
            stage.difficulty.value,
            new.difficulty.value,
            stage.episodes_completed,
            stage.success_rate,
            len(stage.recent),
        )

    def get_metrics(self) -> dict[str, Any]:
        return {
            "current_difficulty": self.current_difficulty.value,
            "stage_index": self.current_index,
            "total_episodes": self.total_episodes,
            "is_complete": self.is_complete,
            "stages": {stage.difficulty.value: stage.summary() for stage in self.stages},
            "transitions": [dict(t) for t in self.transitions],
        }

    # ------------------------------------------------------------------ checkpoints

    def save_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "window": self.stages[0].window,
            "history_limit": self.stages[0].history_limit,
            "current_index": self.current_index,
            "total_episodes": self.total_episodes,
            "stages": [stage.state_dict() for stage in self.stages],
            "transitions": [dict(t) for t in self.transitions],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore progress; the saved stages must be this curriculum's stages."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise CurriculumError(
                f"not a curriculum state of version {STATE_VERSION} (got {state.get('version') if isinstance(state, Mapping) else type(state).__name__})"
            )
        saved = state.get("stages")
        if not isinstance(saved, list) or [s.get("difficulty") for s in saved] != [s.difficulty.value for s in self.stages]:
            raise CurriculumError(
                f"saved curriculum has stages {[s.get('difficulty') for s in saved] if isinstance(saved, list) else saved!r}, "
                f"this one {[s.difficulty.value for s in self.stages]}"
            )
        index, total = state.get("current_index"), state.get("total_episodes")
        if not isinstance(index, int) or not 0 <= index < len(self.stages):
            raise CurriculumError(f"current_index {index!r} outside 0..{len(self.stages) - 1}")
        stage_episodes = sum(int(s.get("episodes", 0)) for s in saved)
        if not isinstance(total, int) or total != stage_episodes:
            raise CurriculumError(f"total_episodes {total!r} differs from the stages' sum {stage_episodes}")
        if any(int(s.get("episodes", 0)) for s in saved[index + 1 :]):
            raise CurriculumError("a stage after the current one has episodes: the state is inconsistent")
        for stage, stage_state in zip(self.stages, saved):
            if stage_state.get("task_params") != stage.task_params.to_dict():
                log.warning("curriculum: stage %s parameters changed since the checkpoint; using the current ones", stage.difficulty.value)
            stage.load_state_dict(stage_state)
        self.current_index, self.total_episodes = index, total
        self.transitions = [dict(t) for t in state.get("transitions", [])]
