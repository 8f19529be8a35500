"""Run one stage with tracking: the single path both ``dvc repro`` and the Prefect flow take.

``dvc.yaml`` is the one list of what each stage reads: its ``params`` keys are also the params the
stage's MLflow run records, so the two never disagree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.config import PROJECT_ROOT
from flows import stages, tracking
from flows.settings import LEVELS, Layout, Settings

PARENT_RUN_ENV = "LAGENT_MLFLOW_PARENT_RUN"
"""A parent MLflow run id for stage runs started as separate processes (``dvc repro``)."""
TRACKING_ENV = "LAGENT_TRACKING"
"""Set to 0 to run stages without MLflow."""

StageFn = Callable[..., stages.StageResult]


def _train(level: str) -> StageFn:
    def run(settings: Settings, layout: Layout, **kwargs: Any) -> stages.StageResult:
        return stages.train_level(settings, layout, level, **kwargs)

    return run


def stage_table() -> dict[str, StageFn]:
    """Stage name -> function, in pipeline order."""
    from flows import meta_stages

    table: dict[str, StageFn] = {f"train_{level}": _train(level) for level in LEVELS}
    table["evaluate"] = stages.evaluate
    table["search_hyperparameters"] = meta_stages.search_hyperparameters
    table["search_architecture"] = meta_stages.search_architecture
    table["adapt"] = meta_stages.adapt
    table["export"] = stages.export_model
    return table


STAGES: tuple[str, ...] = (
    *(f"train_{level}" for level in LEVELS),
    "evaluate",
    "search_hyperparameters",
    "search_architecture",
    "adapt",
    "export",
)

_TAKES_SINK = {f"train_{level}" for level in LEVELS}
_TAKES_TRIALS = {"search_hyperparameters", "search_architecture"}

StageProgress = Callable[[float, float | None, str], None]
"""``(completed, total, status)``: one shape for every stage's progress, whatever it counts."""


def _status(reward: Any) -> str:
    return f"reward {reward:.2f}" if isinstance(reward, (int, float)) and reward == reward else ""


def _progress_kwargs(name: str, report: StageProgress) -> dict[str, Any]:
    """Each stage's own progress callback, translated to ``report``: training counts env steps,
    a search its trials, adaptation the steps of its two runs (fine-tuned, then from scratch)."""
    if name in _TAKES_SINK:

        def on_train(info: Mapping[str, float]) -> None:
            by_steps = info.get("total_steps", 0) > 0
            total = info["total_steps"] if by_steps else info.get("total_episodes") or None
            report(info["step"] if by_steps else info.get("episodes", 0), total, _status(info.get("reward_mean")))

        return {"progress": on_train}
    if name in _TAKES_TRIALS:

        def on_trial_done(info: Mapping[str, Any]) -> None:
            best = info.get("best_value")
            report(info["done"], info.get("total"), f"best {best:.2f}" if best is not None else "")

        return {"progress": on_trial_done}
    if name == "adapt":

        def on_phase(phase: str, info: Mapping[str, float]) -> None:
            steps = info.get("total_steps") or 0
            offset = steps if phase == "scratch" else 0
            report(offset + info.get("step", 0), 2 * steps or None, f"{phase} {_status(info.get('reward_mean'))}")

        return {"progress": on_phase}
    return {}


def dvc_stage_params(stage: str, root: Path = PROJECT_ROOT) -> list[str]:
    """The dotted params keys ``dvc.yaml`` (beside the code that runs) lists for a stage."""
    path = root / "dvc.yaml"
    if not path.exists():
        return []
    document = yaml.safe_load(path.read_text()) or {}
    keys: list[str] = []
    for entry in document.get("stages", {}).get(stage, {}).get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, Mapping):  # {file: [keys]}
            for names in entry.values():
                keys.extend(names or [])
    return keys


def _dvc_paths(entries: Any) -> list[str]:
    """The paths of a dvc.yaml ``deps``/``outs``/``metrics``/``plots`` list (strings or {path: opts})."""
    paths: list[str] = []
    for entry in entries or []:
        paths.extend([entry] if isinstance(entry, str) else list(entry))
    return [p.rstrip("/") for p in paths]


def stage_dependencies(root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """Stage -> the stages whose outputs it reads, from ``dvc.yaml`` (the one stage graph).

    A stage depends on another when one of its deps is, or lies inside, one of the other's outs,
    metrics or plots; the Prefect flow runs stages with no path between them at the same time.
    """
    document = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    declared = document.get("stages", {})
    produced = {
        name: _dvc_paths(body.get("outs")) + _dvc_paths(body.get("metrics")) + _dvc_paths(body.get("plots"))
        for name, body in declared.items()
    }
    graph: dict[str, list[str]] = {}
    for name in STAGES:
        deps = _dvc_paths(declared.get(name, {}).get("deps"))
        graph[name] = [
            other
            for other in STAGES
            if other != name
            and any(dep == out or dep.startswith(out + "/") for dep in deps for out in produced.get(other, []))
        ]
    return graph


def tracking_enabled() -> bool:
    return os.environ.get(TRACKING_ENV, "1") not in ("0", "false", "no")


def run_stage(
    name: str,
    settings: Settings,
    layout: Layout,
    *,
    parent_run_id: str | None = None,
    progress: StageProgress | None = None,
) -> stages.StageResult:
    """Run stage ``name``; with tracking on, as an MLflow run (a child of ``parent_run_id``)."""
    table = stage_table()
    if name not in table:
        raise ValueError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    kwargs: dict[str, Any] = _progress_kwargs(name, progress) if progress is not None else {}
    if not tracking_enabled():
        return table[name](settings, layout, **kwargs)

    experiment_id = tracking.setup_tracking(layout.root, settings.pipeline.experiment)
    parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    run_id = tracking.start_child_run(
        experiment_id, parent_run_id, name, tags={"lagent.stage": name, "lagent.task": settings.pipeline.task}
    )
    started = time.perf_counter()
    sink = tracking.MlflowSink(run_id)
    try:
        tracking.log_params(run_id, tracking.select_params(settings.raw, dvc_stage_params(name)))
        if name in _TAKES_SINK:
            kwargs["metrics_sink"] = sink
        if name in _TAKES_TRIALS:
            kwargs["on_trial"] = _trial_logger(experiment_id, run_id)
        result = table[name](settings, layout, **kwargs)
        sink.close()
        tracking.log_metrics(run_id, {**result.metrics, "stage_seconds": time.perf_counter() - started})
        if name == "export":
            _register(run_id, settings, result)
        tags = {"lagent.summary": result.summary[:5000]}
        if result.model is not None and result.model.exists():
            tags["dvc.md5"] = tracking.file_md5(result.model)
            tags["lagent.model_path"] = str(result.model.relative_to(layout.root))
        tracking.set_tags(run_id, tags)
        tracking.log_artifacts(run_id, [p for p in result.outputs if p.suffix != ".pt" or p.stat().st_size < 1 << 20])
    except BaseException:
        tracking.end_run(run_id, failed=True)
        raise
    tracking.end_run(run_id)
    result.extras["mlflow_run_id"] = run_id
    return result


def _register(run_id: str, settings: Settings, result: stages.StageResult) -> None:
    evaluation = result.extras.get("evaluation", {})
    metrics = {
        f"{level}_{key}": value
        for level, row in evaluation.items()
        for key, value in row.items()
        if isinstance(value, (int, float))
    }
    uri, version = tracking.log_and_register_model(
        run_id,
        result.extras["network"],
        result.extras["input_example"],
        settings.export.registered_model_name,
        metrics,
        description=f"DQN policy for {settings.pipeline.task}, trained through the curriculum.",
    )
    result.extras.update(model_uri=uri, model_version=version)
    metric, score = _champion_score(metrics)
    champion = tracking.promote_if_better(settings.export.registered_model_name, version, score, metric)
    result.extras["champion"] = champion
    result.summary += f"; registered {settings.export.registered_model_name} v{version}; {champion}"


def _champion_score(metrics: Mapping[str, float]) -> tuple[str, float | None]:
    """What decides the ``champion`` alias: the hardest level's greedy success rate, or its reward
    for tasks that report no success."""
    hardest = LEVELS[-1]
    for key in (f"{hardest}_success_rate", f"{hardest}_mean_reward"):
        if key in metrics:
            return key, float(metrics[key])
    return f"{hardest}_success_rate", None


def _trial_logger(experiment_id: str, parent_run_id: str) -> Callable[[Any, Any], None]:
    """An Optuna callback: one MLflow child run per finished trial (params, value, state)."""

    def on_trial(study: Any, trial: Any) -> None:
        run_id = tracking.start_child_run(
            experiment_id, parent_run_id, f"trial {trial.number}", tags={"optuna.state": trial.state.name}
        )
        tracking.log_params(run_id, trial.params)
        sink = tracking.MlflowSink(run_id)
        for step, value in sorted(trial.intermediate_values.items()):
            sink.log_metrics({"intermediate_value": value}, step)
        if trial.value is not None:
            sink.log_metrics({"value": trial.value}, max(trial.intermediate_values, default=0))
        sink.close()
        tracking.end_run(run_id, failed=trial.state.name == "FAIL")

    return on_trial
