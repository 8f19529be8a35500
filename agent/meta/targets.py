"""Which concrete task a search or an adaptation targets.

Study names, success-rate checks and transfers all need a task in one form: a task type at one
difficulty, or a Gymnasium env id. Users name tasks the spec's way (``navigation_complex``); this
module turns such a name into a :class:`TaskSpec` once, so every other module compares specs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from agent.meta.options import MetaLearningError
from agent.tasks import CurriculumManager, DifficultyLevel, TaskParameters, TaskType, is_gym_id, task_name

_VARIANTS: dict[str, DifficultyLevel] = {
    "simple": DifficultyLevel.BEGINNER,
    "easy": DifficultyLevel.BEGINNER,
    "beginner": DifficultyLevel.BEGINNER,
    "medium": DifficultyLevel.INTERMEDIATE,
    "intermediate": DifficultyLevel.INTERMEDIATE,
    "complex": DifficultyLevel.ADVANCED,
    "advanced": DifficultyLevel.ADVANCED,
    "hard": DifficultyLevel.EXPERT,
    "expert": DifficultyLevel.EXPERT,
}


@dataclass(frozen=True)
class TaskSpec:
    """A concrete task: a task type at some difficulty, or a Gymnasium env id."""

    task: str
    task_params: TaskParameters | None
    label: str

    def same_task(self, other: TaskSpec) -> bool:
        return self.task == other.task and self.task_params == other.task_params


def _stage_label(params: TaskParameters) -> str:
    for stage in CurriculumManager().stages:
        if stage.task_params == params:
            return stage.difficulty.value
    digest = hashlib.sha1(json.dumps(params.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"custom-{digest}"


def resolve_task(task: Any, task_params: Any = None) -> TaskSpec:
    """Turn a task name into a concrete task.

    Accepted: a task type (``navigation``: its first curriculum stage unless ``task_params`` says
    otherwise), a task type with a difficulty suffix (``navigation_simple`` = beginner,
    ``_medium`` = intermediate, ``_complex`` = advanced, ``_hard`` / ``_expert`` = expert, or a
    level's own name), or a registered Gymnasium env id.
    """
    name = task_name(task)
    task_type = TaskType.parse(name)
    if task_type is None and "_" in name:
        base, _, variant = name.rpartition("_")
        level = _VARIANTS.get(variant.lower())
        if TaskType.parse(base) is not None and level is not None:
            if task_params is not None:
                raise MetaLearningError(
                    f"'{name}' already names a difficulty: pass task_params or a variant, not both"
                )
            task_type = TaskType.parse(base)
            task_params = CurriculumManager().parameters_for(level)
    if task_type is not None:
        params = TaskParameters.coerce(task_params)
        return TaskSpec(task_type.value, params, f"{task_type.value}@{_stage_label(params)}")
    if is_gym_id(name):
        if task_params is not None:
            raise MetaLearningError(f"task parameters apply to task types, not to the Gymnasium env '{name}'")
        return TaskSpec(name, None, name)
    variants = ", ".join(sorted(_VARIANTS))
    raise MetaLearningError(
        f"unknown task '{name}': expected a task type ({', '.join(t.value for t in TaskType)}), "
        f"a task type with a difficulty suffix (e.g. navigation_simple; suffixes: {variants}) "
        "or a registered Gymnasium env id"
    )
