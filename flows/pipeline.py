"""The Prefect flow: the stages of ``dvc.yaml`` chained as tasks, one MLflow parent run around them.

Run it with ``lagent pipeline`` (no server needed: Prefect starts a temporary local one), schedule
it with ``lagent schedule --cron "0 2 * * *"`` (``flow.serve``) or the deployment in
``prefect.yaml`` (work pool + worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows import dvc_state, progress, runner, tracking
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
    """One stage; retried with backoff (a Memory-service restart or a busy store are worth a retry).

    Its progress goes to the process's reporter (the terminal) and, a line per quarter, to the
    run logger, so the Prefect UI's task-run page shows how the stage went.
    """
    logger = get_run_logger()
    reporter = progress.current()
    quarters = [0]

    def report(completed: float, total: float | None, status: str) -> None:
        reporter.stage_progress(name, completed, total, status)
        quarter = min(4, int(4 * completed / total)) if total else 0
        if 0 < quarter < 4 and quarter > quarters[0]:
            quarters[0] = quarter
            logger.info("%s: %d%% (%s/%s) %s", name, 25 * quarter, f"{completed:,.0f}", f"{total:,.0f}", status)

    settings = settings_for(params_files, overrides, quick)
    logger.info("%s: started (task %s, root %s)", name, settings.pipeline.task, root)
    reporter.stage_started(name)
    started = time.perf_counter()
    try:
        result = runner.run_stage(name, settings, Layout(Path(root)), parent_run_id=parent_run_id, progress=report)
    except BaseException as exc:
        reporter.stage_finished(name, f"{type(exc).__name__}: {exc}", time.perf_counter() - started, failed=True)
        raise
    reporter.stage_finished(name, result.summary, time.perf_counter() - started)
    logger.info("%s: %s", name, result.summary)
    payload = result.to_dict()
    payload["mlflow_run_id"] = result.extras.get("mlflow_run_id")
    payload["model_uri"] = result.extras.get("model_uri")
    payload["seconds"] = time.perf_counter() - started
    return payload


@contextlib.contextmanager
def _memory_service(settings: Settings, layout: Layout) -> Iterator[None]:
    if not settings.pipeline.use_memory:
        yield
        return
    from flows.memory_service import ensure_memory_service

    with ensure_memory_service(settings.config.memory.base_url, layout.memory_data):
        yield


def _run_graph(
    chosen: Sequence[str],
    limit: int,
    submit: Callable[[str, list[PrefectFuture[Any]]], PrefectFuture[Any]],
    on_done: Callable[[str, dict[str, Any] | BaseException], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``chosen`` stages in dependency order, at most ``limit`` at a time.

    A stage is submitted once every chosen stage it depends on (``dvc.yaml``'s graph) has
    finished; its ``wait_for`` names them, so the Prefect UI draws the graph's branches. A failed
    stage stops new submissions; the running ones finish, then its error is raised.
    """
    graph = runner.stage_dependencies()
    needs = {name: [d for d in graph[name] if d in chosen] for name in chosen}
    pending, running = list(chosen), {}  # running: future -> name
    futures: dict[str, PrefectFuture[Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    failure: BaseException | None = None
    while running or (pending and failure is None):
        for name in list(pending):
            if failure is not None or len(running) >= limit:
                break
            if all(d in results for d in needs[name]):
                futures[name] = submit(name, [futures[d] for d in needs[name]])
                running[futures[name]] = name
                pending.remove(name)
        if not running:  # nothing can start: a dependency failed
            break
        done = next(as_completed(list(running)))
        name = running.pop(done)
        try:
            results[name] = done.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised once the running stages finish
            failure = failure or exc
            if on_done is not None:
                on_done(name, exc)
        else:
            if on_done is not None:
                on_done(name, results[name])
    if failure is not None:
        raise failure
    return results


@flow(name="lagent-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def pipeline(
    params_files: list[str] | None = None,
    overrides: list[str] | None = None,
    quick: bool = False,
    root: str = ".",
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Curriculum training, evaluation, searches, adaptation and export, tracked in MLflow.

    Independent stages (the searches beside the training chain, adaptation beside evaluation and
    export) run at the same time, up to ``pipeline.max_parallel_stages``; each stage reads only
    what its dependencies wrote, so the results are those of a serial run.
    """
    params_files, overrides = list(params_files or []), list(overrides or [])
    settings = settings_for(params_files, overrides, quick)
    layout = Layout(Path(root).resolve())
    chosen = list(stages or runner.STAGES)
    unknown = sorted(set(chosen) - set(runner.STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages: {', '.join(runner.STAGES)}")
    chosen = [name for name in runner.STAGES if name in chosen]
    logger = get_run_logger()
    on_ray = settings.pipeline.task_runner == "ray"
    # On Ray every independent stage runs at once: Ray places them by the CPUs they ask for.
    limit = len(chosen) if on_ray else settings.pipeline.max_parallel_stages
    logger.info(
        "pipeline on %s: %s (up to %d stages at a time, %s)",
        settings.pipeline.task, ", ".join(chosen), limit, "as Ray tasks" if on_ray else "in threads",
    )

    parent_run_id = None
    if runner.tracking_enabled():
        experiment_id = tracking.setup_tracking(layout.root, settings.pipeline.experiment)
        parent_run_id = tracking.start_child_run(
            experiment_id,
            None,
            f"pipeline {time.strftime('%Y-%m-%d %H:%M')}",
            tags={"lagent.kind": "pipeline", "lagent.task": settings.pipeline.task},
        )
        tracking.log_params(parent_run_id, tracking.flatten(settings.raw))

    reporter = progress.current()
    submitted: dict[str, float] = {}

    def submit(name: str, wait_for: list[PrefectFuture[Any]]) -> PrefectFuture[Any]:
        if on_ray:  # the stage reports to a Ray worker's (silent) reporter: show it from here
            reporter.stage_started(name)
            submitted[name] = time.perf_counter()
        return stage_task.submit(
            name, params_files, overrides, quick, str(layout.root), parent_run_id, wait_for=wait_for
        )

    def done(name: str, outcome: dict[str, Any] | BaseException) -> None:
        if on_ray:
            failed = isinstance(outcome, BaseException)
            summary = f"{type(outcome).__name__}: {outcome}" if failed else outcome["summary"]
            reporter.stage_finished(name, summary, time.perf_counter() - submitted[name], failed=failed)

    started = time.perf_counter()
    try:
        with _memory_service(settings, layout):
            by_name = _run_graph(chosen, limit, submit, done)
    except BaseException:
        if parent_run_id:
            tracking.end_run(parent_run_id, failed=True)
        raise
    results = [by_name[name] for name in chosen]
    elapsed = time.perf_counter() - started
    record = dvc_state.record_run(layout.root, settings.raw, chosen)
    logger.info("DVC: %s", record.line)
    if parent_run_id:
        tracking.finish_pipeline_run(parent_run_id, results, elapsed, layout.root, record.line)

    create_table_artifact(
        key="lagent-pipeline-summary",
        table=[{"stage": r["name"], "seconds": round(r["seconds"], 1), "result": r["summary"]} for r in results],
        description=f"lagent pipeline on {settings.pipeline.task}, {elapsed:.0f} s",
    )
    summary = {
        "stages": results,
        "seconds": elapsed,
        "mlflow_parent_run_id": parent_run_id,
        "tracking_uri": tracking.tracking_uri() if parent_run_id else None,
        "root": str(layout.root),
        "dvc": {"committed": list(record.committed), "line": record.line},
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


_WORKER_ENV = ("MLFLOW_TRACKING_URI", "MEMORY_TOKEN", runner.TRACKING_ENV, "RAY_ADDRESS")
"""Environment variables the stages read, passed on to Ray workers."""


def task_runner_for(settings: Settings) -> Any:
    """The flow's task runner: threads of this process, or Ray (``pipeline.task_runner``)."""
    if settings.pipeline.task_runner == "ray":
        import logging

        from prefect_ray import RayTaskRunner

        # What a worker on another machine cannot know: where MLflow and the Memory service are.
        forwarded = {name: os.environ[name] for name in _WORKER_ENV if name in os.environ}
        return RayTaskRunner(
            address=settings.pipeline.ray_address,
            init_kwargs={
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
                **({"runtime_env": {"env_vars": forwarded}} if forwarded else {}),
            },
        )
    return ThreadPoolTaskRunner(max_workers=8)


def pipeline_flow(params_files: Sequence[str] = (), overrides: Sequence[str] = (), quick: bool = False) -> Any:
    """The pipeline flow with the task runner its settings ask for (the flow object itself runs
    stages in threads)."""
    settings = settings_for(params_files, overrides, quick)
    if settings.pipeline.task_runner == "local":
        return pipeline
    return pipeline.with_options(task_runner=task_runner_for(settings))


def build_deployment(
    cron: str, name: str, params_files: Sequence[str] = (), overrides: Sequence[str] = (), quick: bool = False
) -> Any:
    """The pipeline as a deployment on a cron schedule, run in this project directory."""
    return pipeline_flow(params_files, overrides, quick).to_deployment(
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
    """Serve the scheduled deployment from this process until Ctrl-C or SIGTERM.

    Either signal takes the same way out: the runner's exit pauses the deployment's schedule, so no
    run is scheduled for a process that is gone. (Prefect's own SIGTERM handler calls its async
    ``stop`` without awaiting it, which warns "coroutine was never awaited".)
    """
    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

    runner = _Runner(name=f"lagent-{name}", pause_on_shutdown=True)
    runner.add_deployment(build_deployment(cron, name, params_files, overrides, quick))
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
