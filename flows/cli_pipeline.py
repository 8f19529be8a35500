"""``lagent pipeline``, ``lagent stage`` and ``lagent schedule``: the orchestration subcommands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows.cli_common import UsageError, add_config_arguments, echo, emit_json


def _quiet_defaults() -> None:
    """Telemetry off; Prefect logs at INFO to its API (the UI's run pages show every stage's lines)
    but only warnings reach the terminal, where our own display says what runs. Each default
    yields to a value the user set."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "agent,flows",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }.items():
        os.environ.setdefault(key, value)


def _check_stages(names: list[str] | None) -> list[str] | None:
    from flows.runner import STAGES

    if names:
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            raise UsageError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return names


def _pipeline_command(args: argparse.Namespace) -> int:
    _quiet_defaults()
    from flows.pipeline import pipeline_flow, settings_for, where_to_look

    settings_for(args.params, args.overrides, args.quick)  # bad params fail here, before Prefect starts
    stages = _check_stages(args.stages)
    echo(
        f"running the pipeline{' (quick profile)' if args.quick else ''}: Prefect starts a temporary local "
        "server unless PREFECT_API_URL points at one",
        args,
    )
    from flows.progress import reporter_for, reporting
    from flows.runner import STAGES

    started = time.perf_counter()
    chosen = [name for name in STAGES if name in (stages or STAGES)]
    reporter = reporter_for(chosen, enabled=not args.no_progress, stream=sys.stderr if args.json else sys.stdout)
    with reporting(reporter):
        summary = pipeline_flow(args.params, args.overrides, args.quick)(
            params_files=list(args.params), overrides=list(args.overrides), quick=args.quick, root=".", stages=stages
        )
    width = max(len(r["name"]) for r in summary["stages"]) if summary["stages"] else 5
    echo("", args)
    for result in summary["stages"]:
        echo(f"  {result['name']:<{width}}  {result.get('seconds', 0):5.0f} s  {result['summary']}", args)
    echo(f"\npipeline finished in {time.perf_counter() - started:.0f} s", args)
    echo(f"DVC: {summary['dvc']['line']}\n", args)
    echo(where_to_look(summary), args)
    if args.json:
        emit_json(summary)
    return 0


def _stage_command(args: argparse.Namespace) -> int:
    """One stage in this process: what ``dvc repro`` runs (``python -m flows stage NAME``)."""
    _quiet_defaults()
    from flows.pipeline import settings_for
    from flows.runner import run_stage
    from flows.settings import Layout

    _check_stages([args.name])
    settings = settings_for(args.params, args.overrides, args.quick)
    result = run_stage(args.name, settings, Layout(Path(".").resolve()))
    echo(f"{args.name}: {result.summary}", args)
    if args.json:
        emit_json(result.to_dict())
    return 0


def _schedule_command(args: argparse.Namespace) -> int:
    _quiet_defaults()
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=args.cron)
    except ValueError as exc:
        raise UsageError(f"invalid cron expression '{args.cron}': {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    from flows.pipeline import serve, settings_for

    settings_for(args.params, args.overrides, args.quick)
    echo(
        f"serving deployment 'lagent-pipeline/{args.name}' on cron '{args.cron}' (Ctrl-C stops it); "
        "runs show in the Prefect UI of the server PREFECT_API_URL points at",
        args,
    )
    serve(args.cron, args.name, args.params, args.overrides, args.quick)
    echo(
        f"stopped: the schedule of 'lagent-pipeline/{args.name}' is paused "
        f"(serve it again with the same command, or: prefect deployment schedule ls lagent-pipeline/{args.name})",
        args,
    )
    return 0


def add_pipeline_commands(commands: Any) -> None:
    pipeline = commands.add_parser("pipeline", help="run the whole pipeline as a Prefect flow (tracked in MLflow)")
    pipeline.add_argument("--quick", action="store_true", help="tiny budgets (configs/quick.yaml): under 2 minutes")
    pipeline.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages (in pipeline order)")
    add_config_arguments(pipeline)
    pipeline.set_defaults(handler=_pipeline_command)

    stage = commands.add_parser("stage", help="run one pipeline stage (what dvc repro calls)")
    stage.add_argument("name", metavar="STAGE")
    stage.add_argument("--quick", action="store_true", help="tiny budgets (configs/quick.yaml)")
    add_config_arguments(stage)
    stage.set_defaults(handler=_stage_command)

    schedule = commands.add_parser("schedule", help="serve the pipeline on a cron schedule (Prefect deployment)")
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *"')
    schedule.add_argument("--name", default="nightly", help="deployment name")
    schedule.add_argument("--quick", action="store_true", help="schedule the quick profile")
    add_config_arguments(schedule)
    schedule.set_defaults(handler=_schedule_command)
