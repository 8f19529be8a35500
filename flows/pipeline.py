"""The Prefect flow: the stages of ``dvc.yaml`` chained as tasks, one MLflow parent run around them.

Run it with ``lagent pipeline`` (no server needed: Prefect starts a temporary local one), schedule
it with ``lagent schedule --cron "0 2 * * *"`` (``flow.serve``) or the deployment in
``prefect.yaml`` (work pool + worker).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import runner, tracking
from flows.settings import Layout, Settings, load_settings

QUICK_PARAMS = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"


def settings_for(params_files: Sequence[str], overrides: Sequence[str], quick: bool) -> Settings:
    files = [str(QUICK_PARAMS)] if quick else []
    return load_settings([*files, *params_files], overrides)


@task(
    name="stage",
    task_run_name="{name}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    cache_policy=NO_CACHE,  # training is never served from a cache: DVC decides what is stale
)
def stage_task(
    name: str, params_files: list[str], overrides: list[str], quick: bool, root: str, parent_run_id: str | None
) -> dict[str, Any]:
    """One stage; retried with backoff (a Memory-service restart or a busy store are worth a retry)."""
    settings = settings_for(params_files, overrides, quick)
    result = runner.run_stage(name, settings, Layout(Path(root)), parent_run_id=parent_run_id)
    get_run_logger().info("%s: %s", name, result.summary)
    payload = result.to_dict()
    payload["mlflow_run_id"] = result.extras.get("mlflow_run_id")
    payload["model_uri"] = result.extras.get("model_uri")
    return payload


@contextlib.contextmanager
def _memory_service(settings: Settings, layout: Layout) -> Iterator[None]:
    if not settings.pipeline.use_memory:
        yield
        return
    from flows.memory_service import ensure_memory_service

    with ensure_memory_service(settings.config.memory.base_url, layout.memory_data):
        yield


@flow(name="lagent-pipeline", log_prints=True)
def pipeline(
    params_files: list[str] | None = None,
    overrides: list[str] | None = None,
    quick: bool = False,
    root: str = ".",
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Curriculum training, evaluation, searches, adaptation and export, tracked in MLflow."""
    params_files, overrides = list(params_files or []), list(overrides or [])
    settings = settings_for(params_files, overrides, quick)
    layout = Layout(Path(root).resolve())
    chosen = list(stages or runner.STAGES)
    unknown = sorted(set(chosen) - set(runner.STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages: {', '.join(runner.STAGES)}")

    parent_run_id = None
    if runner.tracking_enabled():
        experiment_id = tracking.setup_tracking(layout.root, settings.pipeline.experiment)
        parent_run_id = tracking.start_child_run(
            experiment_id, None, f"pipeline {time.strftime('%Y-%m-%d %H:%M')}", tags={"lagent.kind": "pipeline"}
        )
        tracking.log_params(parent_run_id, tracking.flatten(settings.raw))

    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        with _memory_service(settings, layout):
            for name in runner.STAGES:
                if name in chosen:
                    results.append(stage_task(name, params_files, overrides, quick, str(layout.root), parent_run_id))
    except BaseException:
        if parent_run_id:
            tracking.end_run(parent_run_id, failed=True)
        raise
    elapsed = time.perf_counter() - started
    if parent_run_id:
        tracking.log_metrics(parent_run_id, {"pipeline_seconds": elapsed})
        tracking.end_run(parent_run_id)

    create_table_artifact(
        key="lagent-pipeline-summary",
        table=[{"stage": r["name"], "result": r["summary"]} for r in results],
        description=f"lagent pipeline on {settings.pipeline.task}, {elapsed:.0f} s",
    )
    summary = {
        "stages": results,
        "seconds": elapsed,
        "mlflow_parent_run_id": parent_run_id,
        "tracking_uri": tracking.tracking_uri() if parent_run_id else None,
        "root": str(layout.root),
    }
    create_markdown_artifact(key="lagent-pipeline-where", markdown=where_to_look(summary))
    return summary


def where_to_look(summary: dict[str, Any]) -> str:
    root = Path(summary["root"])
    lines = ["Where to look:"]
    if summary.get("tracking_uri"):
        lines.append(
            f"  MLflow UI:    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
            f"{summary['tracking_uri']} --workers 1 --host 127.0.0.1 --port 5000"
        )
    lines.append(f"  DVC metrics:  dvc metrics show   (files in {root / 'metrics'})")
    lines.append(f"  Evaluation:   {root / 'reports' / 'evaluation.md'}")
    lines.append(f"  Curves:       {root / 'plots' / 'learning_curve.png'}   (dvc plots show)")
    lines.append(f"  Exported:     {root / 'models' / 'export'}  (policy.onnx, policy_state.pt, model_card.md)")
    return "\n".join(lines)


def build_deployment(
    cron: str, name: str, params_files: Sequence[str] = (), overrides: Sequence[str] = (), quick: bool = False
) -> Any:
    """The pipeline as a deployment on a cron schedule, run in this project directory."""
    return pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters={
            "params_files": list(params_files),
            "overrides": list(overrides),
            "quick": quick,
            "root": os.getcwd(),
        },
        tags=["lagent"],
        description="lagent pipeline: curriculum training, evaluation, searches, adaptation, export",
    )


def serve(cron: str, name: str, params_files: Sequence[str], overrides: Sequence[str], quick: bool) -> None:
    """Serve the scheduled deployment from this process until Ctrl-C (``prefect.serve``)."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(cron, name, params_files, overrides, quick))
