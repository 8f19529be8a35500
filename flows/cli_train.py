"""``lagent train`` and ``lagent evaluate``: train an agent (optionally through the curriculum or
the Memory service), resume a run, and evaluate a trained run greedily.

Registered by ``flows.cli.build_parser``; the shared argument, output and progress helpers are in
:mod:`flows.cli_common`.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.cli_common import (
    EXIT_INTERRUPTED,
    UsageError,
    add_config_arguments,
    default_run_dir,
    echo,
    emit_json,
    ensure_dir,
    gym_profile_note,
    load_cli_config,
    progress_bar,
    progress_bars,
    stop_on_signals,
    write_json,
)


# --------------------------------------------------------------------------- train / evaluate


def _train_command(args: argparse.Namespace) -> int:
    from agent import LearningAgent, TrainingManager
    from agent.tasks import task_name

    extra = []
    if args.task:
        extra.append(f"train.task={args.task}")
    if args.seed is not None:
        extra.append(f"run.seed={args.seed}")
    if args.timesteps is not None:
        extra += [f"train.total_timesteps={args.timesteps}"]
        if args.episodes is None:
            extra.append("train.max_episodes=null")
    if args.episodes is not None:
        extra.append(f"train.max_episodes={args.episodes}")
        if args.timesteps is None:
            extra.append("train.total_timesteps=null")
    if args.num_envs is not None:
        extra.append(f"train.num_envs={args.num_envs}")
    if args.memory:  # kept in the run's config, so a resumed run replays through it too
        extra.append("memory.enabled=true")
    if args.curriculum:
        extra.append("train.use_curriculum=true")
    if args.actors is not None:
        if args.actors < 1:
            raise UsageError(f"--actors must be at least 1, got {args.actors}")
        if args.resume:
            raise UsageError("--actors: a distributed run cannot be resumed yet; start a new run")
        if args.curriculum:
            raise UsageError("the curriculum runs in one process: drop --curriculum or --actors")
        # Ape-X: the actors' rows reach the learner through the Memory service only.
        extra += [f"distributed.actors={args.actors}", "memory.enabled=true"]
    if args.ray_address is not None:
        extra.append(f"distributed.ray_address={args.ray_address}")
    if args.learner_device is not None:
        extra.append(f"distributed.learner_device={args.learner_device}")

    if args.resume:
        run_dir = Path(args.resume)
        checkpoint = run_dir / "checkpoints" / "last.pt"
        from agent.config import collect_overrides

        # Only what the user names changes on resume; everything else is the run's own.
        overrides = collect_overrides(args.params, [*args.overrides, *extra])
        trainer = TrainingManager.from_checkpoint(checkpoint, overrides=overrides, run_dir=run_dir)
        echo(f"resuming {run_dir} at step {trainer.global_step:,} (episode {trainer.episodes_done:,})", args)
    else:
        from agent.config import with_run_collection

        config = load_cli_config(args, extra)
        task = config.train.task
        note = gym_profile_note(args, task)
        if note is not None:
            echo(note, args)
        # memory.collection auto: a collection of this run's own, kept in its config for --resume.
        config = with_run_collection(config, task)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(task, config.run.seed)
        if (run_dir / "checkpoints" / "last.pt").exists():
            if not args.force:
                raise UsageError(
                    f"{run_dir} already holds a run: resume it with --resume {run_dir}, "
                    "or pass --force to start over"
                )
            shutil.rmtree(run_dir)  # it holds one of our runs (checked above), nothing else
        from agent.tasks import task_spaces

        curriculum = _curriculum_for(args, config, extra)
        obs_dim, n_actions = task_spaces(task, config=config)
        agent = LearningAgent(obs_dim, n_actions, config=config)
        trainer = TrainingManager(agent, task_type=task, run_dir=run_dir, curriculum=curriculum)
        trainer.write_config(ensure_dir(run_dir) / "config.yaml")
    if trainer.curriculum is not None:
        trainer.on_stage_transition = lambda t: echo(_transition_line(t), args)
        echo(f"curriculum: training at {trainer.curriculum.current_difficulty.value}", args)

    from flows.memory_service import MemoryServiceError, memory_session

    distributed = trainer.config.distributed.actors > 0

    try:
        # With --memory (or memory.enabled) replay goes through the Memory service, started on
        # loopback if none answers; its client is flushed and closed before the service stops.
        with memory_session(trainer.config, run_dir=run_dir) as memory_client:
            with progress_bar(not args.no_progress, f"train {task_name(trainer.task)}") as update, stop_on_signals(
                trainer.request_stop
            ) as signals:
                if distributed:
                    summary = _run_distributed(trainer, update, args)
                else:
                    trainer.memory_client = memory_client
                    summary = trainer.run(progress=update)
    except MemoryServiceError as exc:
        raise UsageError(exc.headline) from None
    if memory_client is not None and not distributed:  # a distributed run's actors reported above
        summary["memory"] = memory_client.metrics()  # after the final flush
        echo(
            f"memory: {summary['memory']['delivered']:,.0f} transitions stored in "
            f"{trainer.config.memory.base_url} collection '{trainer.config.memory.collection}' "
            f"({summary['memory']['queued_writes']:,.0f} still queued, "
            f"{summary['memory']['dropped']:,.0f} dropped)",
            args,
        )
    if signals:
        echo(
            f"stopped at step {trainer.global_step:,}; checkpoint saved. "
            + ("" if distributed else f"Resume with: lagent train --resume {run_dir}"),
            args,
        )
        if args.json:
            emit_json({"run_dir": str(run_dir), "train": summary, "stopped": True})
        return EXIT_INTERRUPTED

    evaluation: dict[str, Any] = {}
    curriculum_report: dict[str, Any] = {}
    if args.eval_episodes != 0:
        episodes = args.eval_episodes or trainer.config.evaluate.episodes
        trainer.run_evaluation(num_episodes=episodes)
        evaluation = trainer.last_evaluation
        if trainer.curriculum is not None:
            curriculum_report = _curriculum_report(trainer, episodes)
            evaluation["stages"] = curriculum_report["evaluation"]
            write_json(run_dir / "curriculum.json", curriculum_report)
        write_json(run_dir / "evaluation.json", evaluation)
    elif trainer.curriculum is not None:
        curriculum_report = _curriculum_report(trainer, None)
        write_json(run_dir / "curriculum.json", curriculum_report)
    write_json(run_dir / "summary.json", summary)
    trainer.close()

    echo(
        f"trained {trainer.task} for {summary['global_step']:,} steps ({summary['episodes']:,} episodes, "
        f"{summary['training_steps']:,} updates) in {summary.get('wall_seconds', 0):.1f} s "
        f"({summary.get('steps_per_second', 0):,.0f} steps/s)",
        args,
    )
    if summary.get("reached_reward") is not None:
        echo(
            f"stopped at step {summary['reached_reward']:,}: an evaluation reached "
            f"train.stop_at_reward={trainer.config.train.stop_at_reward:g}",
            args,
        )
    if evaluation:
        echo(
            f"greedy evaluation over {evaluation['episodes']} episodes: "
            f"{evaluation['mean_reward']:.2f} ± {evaluation['std_reward']:.2f}",
            args,
        )
    if curriculum_report:
        echo(_curriculum_table(curriculum_report), args)
    echo(f"run directory: {run_dir}   (tensorboard --logdir {run_dir / 'tb'})", args)
    if args.json:
        payload = {"run_dir": str(run_dir), "train": summary, "evaluation": evaluation}
        if curriculum_report:
            payload["curriculum"] = curriculum_report
        emit_json(payload)
    return 0


def _run_distributed(trainer: Any, update: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The Ape-X run on Ray (``--actors N``); prints how its parts did."""
    from agent.distributed import DistributedTrainer

    try:
        runner = DistributedTrainer(trainer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    dist = trainer.config.distributed
    where = dist.ray_address or "a local Ray instance"
    echo(f"Ape-X on {where}: {dist.actors} actors (epsilons " + ", ".join(f"{e:.3g}" for e in runner.epsilons) + ")", args)
    echo(f"replay: {trainer.config.memory.base_url} collection '{trainer.config.memory.collection}'", args)
    summary = runner.run(progress=update)
    report = summary["distributed"]
    echo(
        f"learner on {report['learner_device']}: {report['updates']:,} updates "
        f"({report['updates_per_second']:,.0f}/s, idle {report['learner_idle_fraction']:.0%})",
        args,
    )
    echo(
        f"actors: {report['rows_delivered']:,.0f} rows stored ({report['rows_queued']:,.0f} queued, "
        f"{report['rows_dropped']:,.0f} dropped); restarts: {report['actor_restarts']} of actors, "
        f"{report['learner_restarts']} of the learner",
        args,
    )
    return summary


# --------------------------------------------------------------------------- curriculum


def _curriculum_for(args: argparse.Namespace, config: Any, extra: Sequence[str]) -> Any:
    """The run's curriculum, from the resolved params (task profile, --params and --set applied)."""
    if not config.train.use_curriculum:
        return None
    from agent.tasks import CurriculumError, CurriculumManager, TaskType

    if TaskType.parse(config.train.task) is None:
        raise UsageError(
            f"--curriculum needs a task type ({', '.join(t.value for t in TaskType)}), "
            f"not '{config.train.task}'"
        )
    try:
        return CurriculumManager.from_params(config)
    except CurriculumError as exc:
        raise UsageError(f"curriculum: {exc}") from None


def _transition_line(transition: Mapping[str, Any]) -> str:
    return (
        f"curriculum: {transition['from']} -> {transition['to']} after {transition['wall_seconds']:.1f} s "
        f"(step {transition['global_step']:,}, episode {transition['training_episode']:,}; "
        f"success rate {transition['success_rate']:.2f} over the stage's last episodes, "
        f"{transition['stage_episodes']:,} episodes in the stage)"
    )


def _curriculum_report(trainer: Any, episodes: int | None) -> dict[str, Any]:
    """Where the curriculum got to and when, each stage's training record, and (with ``episodes``)
    the final agent evaluated at every stage: the run's curriculum.json."""
    curriculum = trainer.curriculum
    metrics = curriculum.get_metrics()
    reached = {curriculum.stages[0].difficulty.value: {"wall_seconds": 0.0, "global_step": 0, "training_episode": 0}}
    for transition in trainer.stage_transitions:
        reached[transition["to"]] = {
            key: transition[key] for key in ("wall_seconds", "global_step", "training_episode") if key in transition
        }
    stages = {}
    for name, stage in metrics["stages"].items():
        stages[name] = {
            "reached": reached.get(name),
            "training_episodes": stage["episodes"],
            "training_success_rate": stage["success_rate"] if stage["episodes"] else None,
            "criteria": stage["criteria"],
        }
    report: dict[str, Any] = {
        "task": trainer.task,
        "final_stage": metrics["current_difficulty"],
        "stage_index": metrics["stage_index"],
        "num_stages": len(curriculum.stages),
        "complete": metrics["is_complete"],
        "train_seconds": trainer.train_seconds,
        "global_step": trainer.global_step,
        "episodes": trainer.episodes_done,
        "transitions": trainer.stage_transitions,
        "stages": stages,
    }
    if episodes:
        report["evaluation"] = trainer.run_curriculum_evaluation(num_episodes=episodes)
        report["evaluation_epsilon"] = trainer.config.evaluate.epsilon
    return report


def _curriculum_table(report: Mapping[str, Any]) -> str:
    """The final report: when each stage was reached, how training went there, and how the final
    agent does at every stage."""
    evaluation = report.get("evaluation") or {}
    lines = [
        f"curriculum: reached {report['final_stage']} (stage {report['stage_index'] + 1} of "
        f"{report['num_stages']}) in {report['train_seconds']:.1f} s of training"
        + (f"; final agent evaluated over {next(iter(evaluation.values()))['episodes']} episodes per stage"
           f" (epsilon {report.get('evaluation_epsilon', 0):g})" if evaluation else ""),
        f"  {'stage':<13}{'reached at':>12}{'step':>12}{'episode':>9}{'train success':>15}"
        f"{'eval success':>14}{'eval reward':>13}",
    ]

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for name, stage in report["stages"].items():
        reached = stage["reached"] or {}
        result = evaluation.get(name, {})
        lines.append(
            f"  {name:<13}"
            f"{cell(reached.get('wall_seconds'), '.1f') + (' s' if reached else ''):>12}"
            f"{cell(reached.get('global_step'), ','):>12}"
            f"{cell(reached.get('training_episode'), ','):>9}"
            f"{cell(stage['training_success_rate'], '.2f'):>15}"
            f"{cell(result.get('success_rate'), '.2f'):>14}"
            f"{cell(result.get('mean_reward'), '.2f'):>13}"
        )
    return "\n".join(lines)


def _evaluate_command(args: argparse.Namespace) -> int:
    from agent import TrainingManager

    run_dir = Path(args.run_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoints" / "last.pt"
    if not run_dir.exists() and not args.checkpoint:
        raise UsageError(f"run directory {run_dir} does not exist")
    from agent.config import collect_overrides

    overrides = collect_overrides(args.params, args.overrides)
    trainer = TrainingManager.from_checkpoint(checkpoint, overrides=overrides, tensorboard=False)
    episodes = args.episodes or trainer.config.evaluate.episodes
    with progress_bars(not args.no_progress, {"eval": (f"evaluate {trainer.task}", float(episodes))}) as update:
        mean, std = trainer.run_evaluation(
            num_episodes=episodes, seed=args.seed, progress=lambda done, total: update("eval", done, total)
        )
    report = {**trainer.last_evaluation, "checkpoint": str(checkpoint)}
    if run_dir.exists():
        write_json(run_dir / "evaluation.json", report)
    trainer.close()
    echo(f"{trainer.task}: {mean:.2f} ± {std:.2f} over {report['episodes']} greedy episodes ({checkpoint})", args)
    if args.json:
        emit_json(report)
    return 0


# --------------------------------------------------------------------------- parser


def add_train_commands(commands: Any) -> None:
    """Add ``train`` and ``evaluate`` to lagent's subcommands."""
    train = commands.add_parser("train", help="train an agent (and evaluate it)")
    train.add_argument("--task", help="task type or Gymnasium env id (default: train.task)")
    train.add_argument("--timesteps", type=int, help="total environment-step budget")
    train.add_argument("--episodes", type=int, help="total episode budget")
    train.add_argument("--seed", type=int, help="run.seed")
    train.add_argument("--num-envs", type=int, help="environment copies stepped together")
    train.add_argument("--run-dir", help="where checkpoints, metrics and TensorBoard events go")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    train.add_argument("--force", action="store_true", help="start over in a run dir that holds a run")
    train.add_argument(
        "--curriculum", action="store_true",
        help="advance a task type through the curriculum's stages (train.use_curriculum); "
        "ends with a success rate per stage (RUN_DIR/curriculum.json)",
    )
    train.add_argument(
        "--memory", action="store_true",
        help="replay through the Memory service (memory.* in params; started on loopback if none answers)",
    )
    train.add_argument(
        "--eval-episodes", type=int, default=None,
        help="greedy evaluation episodes after training (default: evaluate.episodes; 0 skips)",
    )
    train.add_argument(
        "--actors", type=int, metavar="N",
        help="Ape-X on Ray: N collector actors write to the Memory service, one learner samples it "
        "(distributed.*; without --ray-address a local Ray instance sized to the machine)",
    )
    train.add_argument(
        "--ray-address", metavar="ADDRESS",
        help="with --actors: join this Ray cluster (auto, or ray://HOST:PORT) instead of starting one",
    )
    train.add_argument(
        "--learner-device", choices=("auto", "cpu", "cuda"),
        help="with --actors: where the learner runs (auto: a GPU when the cluster has one)",
    )
    add_config_arguments(train)
    train.set_defaults(handler=_train_command)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run greedily")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--episodes", type=int, help="evaluation episodes (default: evaluate.episodes)")
    evaluate.add_argument("--checkpoint", help="a checkpoint file (default: RUN_DIR/checkpoints/last.pt)")
    evaluate.add_argument("--seed", type=int, help="evaluation seed (default: run.seed + evaluate.seed_offset)")
    add_config_arguments(evaluate)
    evaluate.set_defaults(handler=_evaluate_command)
