"""The meta-learning stages: hyperparameter search, architecture search, policy adaptation.

Each search keeps its Optuna study inside its own output directory, so ``dvc repro`` (which
removes a stage's outs before running it) always starts a fresh, reproducible study, while a user
who wants a long-lived study runs ``lagent optimize --storage ...`` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.checkpoint import save_checkpoint_file
from agent.meta import MetaLearningManager, PhaseProgress, SearchProgress
from agent.tasks import CurriculumManager
from flows.settings import LEVELS, Layout, Settings
from flows.stages import StageResult, write_json

SEARCH_LEVEL = LEVELS[0]
"""Searches run at the first curriculum level: short trials still separate good settings there."""


def _manager(settings: Settings, layout: Layout, kind: str, on_trial: Callable[..., None] | None) -> MetaLearningManager:
    directory = layout.search_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    study_name = f"pipeline_{settings.pipeline.task}"
    storage = settings.pipeline.search_storage
    if storage is None:
        study_db = directory / "study.db"
        study_db.unlink(missing_ok=True)  # a stage run is one fresh study (see the module docstring)
        storage = f"sqlite:///{study_db.resolve()}"
    else:  # a shared database (trials on many machines): a study of this stage run's own
        study_name += time.strftime("_%Y%m%d-%H%M%S")
    return MetaLearningManager(
        base_config={
            "storage_url": storage,
            "study_name": study_name,
            "n_trials": settings.pipeline.search_trials,
            "trial_timesteps": settings.pipeline.search_timesteps,
            "timeout": None,
            # on Ray, trials run as Ray tasks beside the stage's, sharing the stage's study
            "trial_runner": "ray" if settings.pipeline.task_runner == "ray" else "threads",
        },
        config=settings.config,
        on_trial=on_trial,
    )


def _search_metrics(result: Any) -> dict[str, float]:
    metrics = {
        "trials_complete": float(result.trials_complete),
        "trials_pruned": float(result.trials_pruned),
        "trials_failed": float(result.trials_failed),
        "steps_trained": float(result.steps_trained),
        "steps_saved_by_pruning": float(result.steps_unpruned - result.steps_trained),
    }
    if result.best_value is not None:
        metrics["best_value"] = float(result.best_value)
    return metrics


def _search(
    settings: Settings,
    layout: Layout,
    kind: str,
    on_trial: Callable[..., None] | None,
    progress: SearchProgress | None = None,
) -> StageResult:
    """Run one search at the first curriculum level and write its results beside its study."""
    manager = _manager(settings, layout, kind, on_trial)
    task_params = CurriculumManager.for_task(settings.pipeline.task, config=settings.config).parameters_for(SEARCH_LEVEL)
    directory = layout.search_dir(kind)
    if kind == "hyperparameters":
        result = manager.search_hyperparameters(settings.pipeline.task, task_params=task_params, progress=progress)
        best = _value(result.best_value)
    else:
        result = manager.search_architecture(settings.pipeline.task, task_params=task_params, progress=progress)
        architecture = result.best_architecture
        write_json(directory / "best_architecture.json", architecture.to_dict() if architecture else {})
        shape = f"{list(architecture.hidden_layers)} {architecture.activation}" if architecture else "none"
        best = f"{shape} ({_value(result.best_value)})"
    artifacts = manager.write_results(result, directory)
    if "best_params" in artifacts:
        best += f"; apply with --params {artifacts['best_params']}"
    metrics = _search_metrics(result)
    metrics_path = write_json(layout.metrics(f"search_{kind}"), metrics)
    return StageResult(
        name=f"search_{kind}",
        metrics=metrics,
        outputs=[directory, metrics_path],
        summary=f"{result.trials_complete} trials complete, {result.trials_pruned} pruned, best {best}",
    )


def search_hyperparameters(
    settings: Settings,
    layout: Layout,
    *,
    on_trial: Callable[..., None] | None = None,
    progress: SearchProgress | None = None,
) -> StageResult:
    """TPE + median pruning over the learning settings; writes the best as a params file."""
    return _search(settings, layout, "hyperparameters", on_trial, progress)


def search_architecture(
    settings: Settings,
    layout: Layout,
    *,
    on_trial: Callable[..., None] | None = None,
    progress: SearchProgress | None = None,
) -> StageResult:
    """Layers, units, dropout and activation; writes the best architecture beside the study."""
    return _search(settings, layout, "architecture", on_trial, progress)


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def adapt(settings: Settings, layout: Layout, *, progress: PhaseProgress | None = None) -> StageResult:
    """Adapt the final policy to a second task, next to a policy trained from scratch."""
    manager = MetaLearningManager(config=settings.config)
    target = settings.pipeline.adapt_task
    result = manager.adapt(
        layout.final_model,
        target,
        timesteps=settings.pipeline.adapt_timesteps,
        config=settings.config,
        source_label=layout.final_model.name,
        progress=progress,
    )
    assert result.agent is not None
    model = save_checkpoint_file(
        {"config": result.agent.config.to_dict(), "task": target, "agent": result.agent.state_dict(include_buffer=False)},
        layout.adapted_model,
    )
    report = {k: v for k, v in result.to_dict().items() if isinstance(v, (int, float)) and v is not None}
    metrics_path = write_json(layout.metrics("adapt"), report)
    success = ""
    if result.adapted_success_rate is not None and result.scratch_success_rate is not None:
        success = f", success {result.adapted_success_rate:.0%} vs {result.scratch_success_rate:.0%}"
    return StageResult(
        name="adapt",
        metrics={k: float(v) for k, v in report.items()},
        outputs=[model, metrics_path],
        summary=(
            f"{layout.final_model.stem} -> {target} in {result.timesteps:,} steps: reward "
            f"{result.adapted_reward:.2f} adapted vs {result.scratch_reward:.2f} from scratch{success}; "
            f"layers transferred {len(result.transferred)}, partly {len(result.partially_transferred)}, "
            f"re-initialised {len(result.reinitialized) - len(result.partially_transferred)}"
        ),
        model=model,
    )
