"""Learning curves of the four tasks, and a curriculum run, as PNG plots (and JSON) in results/.

Per task: train from scratch with the task's settings (params.yaml, its profile applied) at the
first curriculum stage, and every ``--eval-every`` env steps evaluate the agent (greedy, and
with epsilon 0.05) on fixed evaluation seeds; a random policy on the same seeds is the baseline.
Plots success rate and mean return against env steps: ``curve_<task>.png``.

Curriculum: ``lagent train --task navigation --curriculum`` with the defaults, recording every
training episode's success and stage; plots the success rate over the curriculum's window against
episodes, each stage's threshold, and the stage transitions: ``curriculum_navigation.png``.

One core (torch threads 1); one run at a time. ``--quick`` checks the script in seconds.

    python benchmarks/curves.py [--tasks navigation ...] [--no-curriculum] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from agent import LearningAgent, TrainingManager  # noqa: E402
from agent.config import load_config, load_raw  # noqa: E402
from agent.tasks import CurriculumManager, TaskType, task_spaces  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# As tests/integration/test_task_learning.py (which trains for fewer steps): the task's settings
# (its params.yaml profile), a linear exploration schedule over the first 30% of the budget,
# episodes capped at 200 steps. Env steps per task (rows for multi_agent: 3 per team step).
COMMON = ["train.max_steps_per_episode=200", "train.exploration=linear", "train.exploration_fraction=0.3"]
TASKS: dict[str, tuple[int, list[str]]] = {
    "navigation": (60_000, COMMON),
    "exploration": (150_000, COMMON),
    "multi_agent": (150_000, COMMON),
    "manipulation": (100_000, COMMON),
}


def _trainer(task: str, overrides: list[str], use_curriculum: bool = False) -> TrainingManager:
    layers = [f"train.task={task}", "train.max_episodes=null", "train.total_timesteps=null", *overrides]
    if use_curriculum:
        layers.append("train.use_curriculum=true")
    config = load_config(overrides=layers)
    curriculum = CurriculumManager.from_params(load_raw((), layers)["curriculum"]) if use_curriculum else None
    obs_dim, n_actions = task_spaces(task)
    agent = LearningAgent(obs_dim, n_actions, config=config)
    return TrainingManager(agent, task_type=task, curriculum=curriculum, tensorboard=False)


async def _evaluate(trainer: TrainingManager, episodes: int, epsilon: float) -> dict[str, float]:
    await trainer.evaluate(num_episodes=episodes, epsilon=epsilon, seed=20_000)
    result = trainer.last_evaluation
    return {"success_rate": float(result.get("success_rate", float("nan"))), "mean_reward": result["mean_reward"]}


async def task_curve(task: str, steps: int, overrides: list[str], eval_every: int, episodes: int) -> dict[str, Any]:
    trainer = _trainer(task, overrides)
    curve: dict[str, Any] = {"task": task, "steps": [], "greedy": [], "epsilon_0.05": [], "wall_seconds": []}
    curve["random"] = await _evaluate(trainer, episodes, 1.0)
    curve["config"] = {k: v for k, v in trainer.config.to_dict().items() if k in ("train", "replay", "network")}
    started = time.perf_counter()
    for target in range(0, steps + 1, eval_every):
        if target:
            await trainer.train(total_timesteps=target)
        curve["steps"].append(trainer.global_step)
        curve["wall_seconds"].append(time.perf_counter() - started)
        curve["greedy"].append(await _evaluate(trainer, episodes, 0.0))
        curve["epsilon_0.05"].append(await _evaluate(trainer, episodes, 0.05))
        last = curve["greedy"][-1]
        print(f"  {task:<13}{trainer.global_step:>9,} steps {curve['wall_seconds'][-1]:7.1f} s  "
              f"greedy success {last['success_rate']:.2f} return {last['mean_reward']:8.2f}  "
              f"(eps 0.05: {curve['epsilon_0.05'][-1]['success_rate']:.2f})", flush=True)
    trainer.close()
    return curve


def plot_task(curve: dict[str, Any], path: Path) -> None:
    steps = np.array(curve["steps"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "success_rate", "success rate"), (axes[1], "mean_reward", "mean episode return")):
        ax.plot(steps, [p[key] for p in curve["greedy"]], "o-", label="trained, greedy")
        ax.plot(steps, [p[key] for p in curve["epsilon_0.05"]], "s--", alpha=0.7, label="trained, epsilon 0.05")
        ax.axhline(curve["random"][key], color="grey", linestyle=":", label="random policy")
        ax.set_xlabel("environment steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(loc="best")
    fig.suptitle(f"{curve['task']}: learning curve (first curriculum stage, "
                 f"{curve['episodes']} evaluation episodes per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def curriculum_run(episodes: int, overrides: list[str], eval_episodes: int) -> dict[str, Any]:
    """The CLI's curriculum run, recording each training episode's success and stage."""
    trainer = _trainer("navigation", overrides, use_curriculum=True)
    curriculum = trainer.curriculum
    assert curriculum is not None
    record: dict[str, Any] = {"success": [], "stage": [], "transitions": []}
    update = curriculum.update_progress

    def recording(metrics: Any) -> bool:
        record["success"].append(float(metrics["task_success"]))
        record["stage"].append(curriculum.current_index)
        return update(metrics)

    curriculum.update_progress = recording  # type: ignore[method-assign]
    trainer.on_stage_transition = lambda t: print(
        f"  {t['from']} -> {t['to']} after {t['wall_seconds']:.1f} s, episode {t['training_episode']:,}", flush=True
    )
    await trainer.train(n_episodes=episodes)
    record["transitions"] = trainer.stage_transitions
    record["train_seconds"] = trainer.train_seconds
    record["global_step"] = trainer.global_step
    record["window"] = curriculum.stages[0].window
    record["stages"] = [s.difficulty.value for s in curriculum.stages]
    record["thresholds"] = [s.task_params.success_rate_threshold for s in curriculum.stages]
    record["evaluation"] = await trainer.evaluate_curriculum(num_episodes=eval_episodes)
    trainer.close()
    return record


def plot_curriculum(record: dict[str, Any], path: Path) -> None:
    success = np.array(record["success"])
    stage = np.array(record["stage"])
    window = record["window"]
    episodes = np.arange(1, len(success) + 1)
    # The curriculum's own measure: the success rate over the stage's last `window` episodes.
    rolling = np.empty(len(success))
    for i in range(len(success)):
        start = max(0, i + 1 - window)
        same = stage[start : i + 1] == stage[i]
        rolling[i] = success[start : i + 1][same].mean()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(episodes, rolling, color="tab:blue", label=f"training success rate (last {window} episodes of the stage)")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bounds = [0] + [t["training_episode"] for t in record["transitions"]] + [len(success)]
    for index in range(len(bounds) - 1):
        lo, hi = bounds[index], bounds[index + 1]
        ax.axvspan(lo, hi, color=colours[(index + 1) % len(colours)], alpha=0.08)
        ax.hlines(record["thresholds"][index], lo, hi, colors="black", linestyles="--", linewidth=1)
        ax.text(lo + (hi - lo) / 2, 0.3, record["stages"][index], ha="center", fontsize=10, alpha=0.8)
    for transition in record["transitions"]:
        ax.axvline(transition["training_episode"], color="black", linewidth=1)
        ax.text(transition["training_episode"], 1.03, f"{transition['wall_seconds']:.0f} s", ha="center", fontsize=8)
    ax.plot([], [], "k--", linewidth=1, label="stage threshold")
    ax.set_xlabel("training episode")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.08)
    evaluation = record["evaluation"]
    final = ", ".join(f"{k} {v['success_rate']:.2f}" for k, v in evaluation.items())
    ax.set_title(f"navigation curriculum (defaults): stage transitions marked; final greedy success per stage: {final}",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=[t.value for t in TaskType])
    parser.add_argument("--no-curriculum", action="store_true", help="skip the curriculum run")
    parser.add_argument("--episodes", type=int, default=100, help="evaluation episodes per point")
    parser.add_argument("--points", type=int, default=6, help="evaluations per curve (the untrained agent included)")
    parser.add_argument("--curriculum-episodes", type=int, default=None,
                        help="training episodes of the curriculum run (default: train.max_episodes)")
    parser.add_argument("--steps", type=int, default=None, help="env steps per task (default: TASKS below)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="a config override for every run (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check that the script works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    quick = ["network.hidden_size=32", "train.learning_starts=100"] if args.quick else []

    for task in args.tasks:
        steps, overrides = TASKS[task]
        steps = 2_000 if args.quick else args.steps or steps
        overrides = [*overrides, *args.overrides]
        episodes = 5 if args.quick else args.episodes
        eval_every = max(1, steps // max(1, args.points - 1))
        print(f"{task}: {steps:,} env steps, evaluated every {eval_every:,}", flush=True)
        curve = asyncio.run(task_curve(task, steps, [*overrides, *quick], eval_every, episodes))
        curve["episodes"] = episodes
        (args.out / f"curve_{task}{suffix}.json").write_text(json.dumps(curve, indent=1))
        plot_task(curve, args.out / f"curve_{task}{suffix}.png")

    if not args.no_curriculum:
        episodes = 150 if args.quick else args.curriculum_episodes or load_config().train.max_episodes or 1000
        print(f"navigation curriculum: {episodes:,} training episodes", flush=True)
        record = asyncio.run(curriculum_run(episodes, [*quick, *args.overrides], 5 if args.quick else args.episodes))
        (args.out / f"curriculum_navigation{suffix}.json").write_text(json.dumps(record, indent=1))
        plot_curriculum(record, args.out / f"curriculum_navigation{suffix}.png")
        for name, result in record["evaluation"].items():
            print(f"  {name:<13} final greedy success {result['success_rate']:.2f}  return {result['mean_reward']:.2f}")


if __name__ == "__main__":
    main()
