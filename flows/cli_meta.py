"""``lagent optimize`` and ``lagent adapt``: Optuna searches and policy adaptation from the shell.

Registered by ``flows.cli.build_parser``; with the helpers of :mod:`flows.cli_common` they follow
the other subcommands: the same config layers (``--params``, ``--set``), a progress bar on a
terminal, a summary table at the end, ``--json`` for one JSON object as the last line, and
one-line errors with exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.cli_common import (
    UsageError,
    add_config_arguments,
    console,
    echo,
    emit_json,
    load_cli_config,
    progress_bars,
)
from flows.formatting import number, percent

EXIT_NOTHING_FOUND = 1


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("_") or "run"


# --------------------------------------------------------------------------- optimize


def _optimize_command(args: argparse.Namespace) -> int:
    from agent.meta import MetaLearningManager, OptimizationType, resolve_task, source_name

    for flag, value in (("--trials", args.trials), ("--n-jobs", args.n_jobs), ("--timesteps", args.timesteps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    extra = [f"run.seed={args.seed}"] if args.seed is not None else []
    config = load_cli_config(args, extra)  # its ``meta`` section is the manager's
    updates = {k: v for k, v in (("storage_url", args.storage), ("study_name", args.study)) if v is not None}
    manager = MetaLearningManager(updates, config=config)
    options = manager.options(
        n_trials=args.trials, n_jobs=args.n_jobs, trial_timesteps=args.timesteps, timeout=args.timeout
    )
    kind = OptimizationType(args.kind)
    spec = resolve_task(args.task or config.train.task)
    from_source = kind in (OptimizationType.POLICY, OptimizationType.TRANSFER)
    source = _source_checkpoint(args.source) if args.source else None
    if from_source and source is None:
        raise UsageError(f"--kind {kind.value} starts from a trained policy: give its run directory with --source")
    if source is not None and not from_source:
        raise UsageError(f"--kind {kind.value} trains fresh agents: --source is for --kind policy or transfer")
    study_name = manager.study_name_for(kind, spec, source_name(str(source)) if source else None)
    out = Path(args.out) if args.out else Path("runs") / "optimize" / _safe(study_name.replace("/", "__"))

    echo(
        f"{kind.value} search on {spec.label}: {options.n_trials} trials of {options.trial_timesteps:,} steps "
        f"(pruner {options.pruner}, {options.n_jobs} parallel) in study '{study_name}' ({manager.meta.storage_url})",
        args,
    )
    with progress_bars(not args.no_progress, {"trials": (f"optimize {spec.label}", options.n_trials)}) as update:

        def on_trial(info: Mapping[str, Any]) -> None:
            best = info.get("best_value")
            update("trials", info["done"], status=f"best {number(best)}  last: {info['state']}")

        result = manager.search(
            kind, spec.task, source=source, options=options, task_params=spec.task_params, progress=on_trial
        )
    artifacts = manager.write_results(result, out, plots=not args.no_plots)
    _print_search_table(result, args)
    command = f"adapt --source {args.source} --task {args.task or spec.task}" if source is not None else "train"
    best = artifacts.get("best_params")
    apply = f"   (apply: lagent {command} --params {best})" if best else ""
    echo(f"results: {out}{apply}", args)
    if args.json:
        emit_json({**result.to_dict(include_trials=False), "out": str(out)})
    if result.trials_complete == 0:
        errors = [t["error"] for t in result.trials if "error" in t]
        first = f"; first error: {errors[0]}" if errors else ""
        print(
            f"lagent: no trial of '{result.study_name}' completed ({result.trials_pruned} pruned, "
            f"{result.trials_failed} failed{first})",
            file=sys.stderr,
        )
        return EXIT_NOTHING_FOUND
    return 0


def _print_search_table(result: Any, args: argparse.Namespace) -> None:
    from rich.table import Table

    table = Table(title=f"{result.kind.value} search: {result.study_name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    saved = result.steps_saved / result.steps_unpruned if result.steps_unpruned else 0.0
    rows = [
        ("task", result.task),
        ("trials (this run / study)", f"{result.trials_run} / {result.trials_total}"),
        ("complete / pruned / failed", f"{result.trials_complete} / {result.trials_pruned} / {result.trials_failed}"),
        ("diverged (pruned)", str(result.trials_diverged)),
        ("env steps trained", f"{result.steps_trained:,}"),
        ("saved by pruning", f"{result.steps_saved:,} steps ({saved:.0%} of {result.steps_unpruned:,})"),
        (f"best value ({result.direction})", number(result.best_value)),
    ]
    for key, value in result.best_params.items():
        rows.append((f"  {key}", number(value)))
    if result.best_architecture is not None:
        arch = result.best_architecture
        rows.append(("best architecture", f"{arch.input_dim} -> {list(arch.hidden_layers)} -> {arch.output_dim}, "
                                          f"{arch.activation}, dropout {arch.dropout:.2f}"))
    for key, value in rows:
        table.add_row(key, value)
    console(args).print(table)


def _source_checkpoint(source: str) -> Path:
    """The checkpoint of a source policy given as a run directory or a checkpoint file."""
    path = Path(source)
    checkpoint = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise UsageError(f"{source} holds no policy checkpoint (looked for {checkpoint})")
    return checkpoint


# --------------------------------------------------------------------------- adapt


def _adapt_command(args: argparse.Namespace) -> int:
    from agent.config import collect_overrides
    from agent.meta import MetaLearningManager, load_meta_config, load_policy, resolve_task

    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"source {source} does not exist (expected a run directory or a checkpoint file)")
    checkpoint = Path(args.checkpoint) if args.checkpoint else (
        source / "checkpoints" / "last.pt" if source.is_dir() else source
    )
    if not checkpoint.is_file():
        raise UsageError(f"{source} holds no checkpoint (looked for {checkpoint})")
    if args.timesteps is not None and args.timesteps < 1:
        raise UsageError(f"--timesteps must be at least 1, got {args.timesteps}")
    if args.eval_episodes is not None and args.eval_episodes < 1:
        raise UsageError(f"--eval-episodes must be at least 1, got {args.eval_episodes}")
    spec = resolve_task(args.task)
    extra = [f"run.seed={args.seed}"] if args.seed is not None else []
    overrides = collect_overrides(args.params, [*args.overrides, *extra])
    meta = load_meta_config(args.params, args.overrides)
    agent = load_policy(checkpoint)
    manager = MetaLearningManager(meta_config=meta, config=agent.config)
    steps = args.timesteps or meta.adapt_timesteps
    seed = overrides.get("run", {}).get("seed", agent.config.run.seed)
    run_dir = Path(args.run_dir or Path("runs") / "adapt" / f"{_safe(spec.label)}__{seed}__{int(time.time())}")
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise UsageError(f"{run_dir} already holds a run: choose another --run-dir")

    echo(f"adapting {checkpoint} to {spec.label}: {steps:,} fine-tuning steps, and as many from scratch", args)
    bars = {"adapted": ("fine-tune", float(steps)), "scratch": ("from scratch", float(steps))}
    with progress_bars(not args.no_progress, bars) as update:

        def on_progress(phase: str, info: Mapping[str, float]) -> None:
            reward = info.get("reward_mean", float("nan"))
            update(phase, info.get("step", 0.0), status=f"reward {reward:8.2f}" if reward == reward else "")

        result = manager.adapt(
            agent,
            args.task,
            timesteps=steps,
            overrides=overrides,
            run_dir=run_dir,
            eval_episodes=args.eval_episodes,
            progress=on_progress,
            source_label=str(checkpoint),
        )
    _print_adapt_table(result, args)
    echo(f"adapted run: {run_dir}   (continue: lagent train --resume {run_dir})", args)
    if args.json:
        emit_json(result.to_dict())
    return 0


def _print_adapt_table(result: Any, args: argparse.Namespace) -> None:
    from rich.table import Table

    table = Table(title=f"adaptation to {result.target_task} ({result.timesteps:,} steps each)", title_justify="left")
    table.add_column("policy", style="bold")
    table.add_column("mean reward", justify="right")
    table.add_column("std", justify="right")
    table.add_column("success", justify="right")
    table.add_row("adapted (transfer + fine-tune)", number(result.adapted_reward), number(result.adapted_std),
                  percent(result.adapted_success_rate))
    table.add_row("from scratch", number(result.scratch_reward), number(result.scratch_std),
                  percent(result.scratch_success_rate))
    if result.zero_shot_reward is not None:
        table.add_row("source, no fine-tuning", number(result.zero_shot_reward), "-", "-")
    out = console(args)
    out.print(table)
    out.print(f"difference adapted - scratch: {result.improvement:+.4g} over {result.eval_episodes} episodes")
    out.print(f"transferred layers: {', '.join(result.transferred) or 'none'}")
    fresh = [layer for layer in result.reinitialized if layer not in result.partially_transferred]
    for layer, kept in result.partially_transferred.items():
        out.print(f"partly transferred: {layer} kept {kept}")
    out.print(f"re-initialised layers: {', '.join(fresh) or 'none'}")


# --------------------------------------------------------------------------- parser


def add_meta_commands(commands: Any) -> None:
    """Add ``optimize`` and ``adapt`` to lagent's subcommands."""
    optimize = commands.add_parser(
        "optimize", help="search hyperparameters, architectures, policy adaptation or transfer with Optuna"
    )
    optimize.add_argument(
        "--task", help="task type, named variant (navigation_complex) or Gymnasium id (default: train.task)"
    )
    optimize.add_argument("--trials", type=int, help="trials to run, on top of the study's (default: meta.n_trials)")
    optimize.add_argument(
        "--kind",
        choices=["hyperparameters", "architecture", "policy", "transfer"],
        default="hyperparameters",
        help="what to search: learning settings, network shapes, how a source policy is fine-tuned on "
        "the task (policy), or what it hands over (transfer)",
    )
    optimize.add_argument(
        "--source",
        metavar="RUN_DIR",
        help="run directory (or checkpoint) of the source policy (--kind policy or transfer)",
    )
    optimize.add_argument("--study", help="study name prefix (default: meta.study_name); the same name resumes")
    optimize.add_argument("--storage", help="Optuna storage: sqlite:///FILE, postgresql://..., journal:FILE")
    optimize.add_argument("--n-jobs", type=int, help="trials in parallel threads (default: meta.n_jobs)")
    optimize.add_argument("--timesteps", type=int, help="env steps per trial (default: meta.trial_timesteps)")
    optimize.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    optimize.add_argument("--seed", type=int, help="run.seed (give each parallel worker its own)")
    optimize.add_argument("--out", help="results directory (default: runs/optimize/STUDY)")
    optimize.add_argument("--no-plots", action="store_true", help="skip the Optuna plots")
    add_config_arguments(optimize)
    optimize.set_defaults(handler=_optimize_command)

    adapt = commands.add_parser("adapt", help="adapt a trained policy to another task, compared with scratch")
    adapt.add_argument(
        "--source", required=True, metavar="RUN_DIR", help="run directory (or checkpoint file) of the source policy"
    )
    adapt.add_argument("--task", required=True, help="target task: task type, named variant or Gymnasium id")
    adapt.add_argument(
        "--timesteps", type=int, help="fine-tuning steps, also given to scratch (default: meta.adapt_timesteps)"
    )
    adapt.add_argument("--checkpoint", help="checkpoint inside the source (default: RUN_DIR/checkpoints/last.pt)")
    adapt.add_argument("--run-dir", help="where the adapted run is saved (default: runs/adapt/TASK__SEED__TIME)")
    adapt.add_argument("--eval-episodes", type=int, help="evaluation episodes per policy (default: evaluate.episodes)")
    adapt.add_argument("--seed", type=int, help="run.seed for the target runs")
    add_config_arguments(adapt)
    adapt.set_defaults(handler=_adapt_command)
