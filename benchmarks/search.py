"""Hyperparameter search under a fixed budget: what pruning saves and what the search finds.

For each task (CartPole-v1 and navigation at its first curriculum stage) this runs, in order:

1. a TPE search with the median pruner (the ``meta`` section's settings unless flags say
   otherwise): trials completed, pruned (and diverged), environment steps and seconds spent;
2. the *same* trials again without a pruner (their sampled parameters enqueued in the same order,
   so each gets the same seed): the compute pruning saved, and whether a pruned trial would have
   beaten the pruned search's best;
3. the default parameters (params.yaml) and the search's best parameters, each trained with the
   same per-trial budget on ``--seeds`` fresh seeds: the search's best value is a maximum over
   trials, so only this re-run says whether it beats the defaults.

One torch thread, in-memory Optuna storage, nothing else running. Full size takes tens of
minutes on one core; ``--quick`` checks that the script works (6 trials of 1,500 steps).

    python benchmarks/search.py [--quick] [--tasks CartPole-v1 navigation] [--trials N]
        [--timesteps N] [--eval-interval N] [--seeds K] [--json FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import torch  # noqa: E402

from agent.config import Config, load_config, with_overrides  # noqa: E402
from agent.dqn import LearningAgent  # noqa: E402
from agent.meta import (  # noqa: E402
    MetaLearningManager,
    OptimizationConfig,
    OptimizationType,
    TaskSpec,
    hyperparameters_as_params,
    resolve_task,
    run_trial,
)

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def search(
    config: Config, spec: TaskSpec, options: OptimizationConfig, pruner: str, enqueue: list[dict] | None
) -> dict[str, Any]:
    """One search in a fresh in-memory study; with ``enqueue`` it replays those parameters."""
    storage = {"storage_url": "sqlite:///:memory:", "study_name": f"bench_{pruner}"}
    manager = MetaLearningManager(storage, config=config)
    options = options.model_copy(update={"pruner": pruner})
    study = manager.create_study(OptimizationType.HYPERPARAMETERS, options, spec)
    for params in enqueue or []:
        study.enqueue_trial(params)
    started = time.perf_counter()
    result = manager.search_hyperparameters(spec.task, options, task_params=spec.task_params)
    seconds = time.perf_counter() - started
    trials = manager.load_study(OptimizationType.HYPERPARAMETERS, spec).trials
    return {"result": result, "seconds": seconds, "trials": trials}


def fixed_run(config: Config, spec: TaskSpec, options: OptimizationConfig, overlay: dict, seed: int) -> float:
    """Train one agent with the per-trial budget and procedure; its final evaluation."""
    trial_config = with_overrides(config, run={"seed": seed}, **overlay)
    eval_seed = config.run.seed + config.evaluate.seed_offset
    return run_trial(optuna.trial.FixedTrial({}), spec, trial_config, options, eval_seed=eval_seed)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def bench_task(task: str, args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.params or None, args.overrides)
    spec = resolve_task(task)
    options = MetaLearningManager(config=config).options(
        n_trials=args.trials, trial_timesteps=args.timesteps, eval_interval=args.eval_interval,
        eval_episodes=args.eval_episodes, n_jobs=1, timeout=None,
    )
    print(f"\n== {spec.label}: {options.n_trials} trials x {options.trial_timesteps:,} steps, "
          f"evaluations every {options.eval_interval:,} steps ({options.eval_episodes} episodes)", flush=True)

    pruned = search(config, spec, options, "median", None)
    result = pruned["result"]
    params = [t.params for t in pruned["trials"]]
    unpruned = search(config, spec, options, "none", params)
    full = unpruned["result"]
    full_values = {t.number: t.value for t in unpruned["trials"]}
    pruned_numbers = [t.number for t in pruned["trials"] if t.state == optuna.trial.TrialState.PRUNED]
    best_full = max((v for v in full_values.values() if v is not None), default=None)
    lost = [n for n in pruned_numbers if full_values.get(n) is not None and result.best_value is not None
            and full_values[n] > result.best_value]
    reproduced = [t.number for t in pruned["trials"] if t.state == optuna.trial.TrialState.COMPLETE
                  and full_values.get(t.number) == t.value]

    seeds = [config.run.seed + 1000 + i for i in range(args.seeds)]
    default_values = [fixed_run(config, spec, options, {}, s) for s in seeds]
    best_overlay = hyperparameters_as_params(result.best_params) if result.best_params else {}
    best_values = [fixed_run(config, spec, options, best_overlay, s) for s in seeds] if best_overlay else []

    saved_steps = full.steps_trained - result.steps_trained
    row = {
        "task": spec.label,
        "trials": options.n_trials,
        "trial_timesteps": options.trial_timesteps,
        "complete": result.trials_complete,
        "pruned": result.trials_pruned,
        "diverged": result.trials_diverged,
        "failed": result.trials_failed,
        "steps_pruned_search": result.steps_trained,
        "steps_unpruned": full.steps_trained,
        "steps_saved": saved_steps,
        "steps_saved_fraction": saved_steps / full.steps_trained if full.steps_trained else 0.0,
        "seconds_pruned_search": pruned["seconds"],
        "seconds_unpruned": unpruned["seconds"],
        "best_value_pruned_search": result.best_value,
        "best_value_unpruned": best_full,
        "pruned_trials_that_would_have_won": lost,
        "complete_trials_reproduced_exactly": f"{len(reproduced)}/{result.trials_complete}",
        "best_params": result.best_params,
        "default_values": default_values,
        "best_params_values": best_values,
        "seeds": seeds,
    }
    print(f"trials: {result.trials_complete} complete, {result.trials_pruned} pruned ({result.trials_diverged} diverged), "
          f"{result.trials_failed} failed")
    print(f"env steps: {result.steps_trained:,} with pruning vs {full.steps_trained:,} without: "
          f"{saved_steps:,} saved ({row['steps_saved_fraction']:.0%}); "
          f"{pruned['seconds']:.1f} s vs {unpruned['seconds']:.1f} s")
    print(f"best value: {fmt(result.best_value)} with pruning, {fmt(best_full)} without "
          f"(pruned trials that would have beaten it: {lost or 'none'}; "
          f"complete trials reproduced exactly: {row['complete_trials_reproduced_exactly']})")
    print(f"re-run on seeds {seeds}: defaults {mean_std(default_values)}, "
          f"search's best {mean_std(best_values) if best_values else 'n/a'}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few tiny trials: checks that the script works")
    parser.add_argument("--tasks", nargs="+", default=["CartPole-v1", "navigation"])
    parser.add_argument("--trials", type=int, help="default: meta.n_trials (quick: 6)")
    parser.add_argument("--timesteps", type=int, help="steps per trial (default: meta.trial_timesteps; quick: 1500)")
    parser.add_argument("--eval-interval", type=int, help="default: meta.eval_interval (quick: 500)")
    parser.add_argument("--eval-episodes", type=int, help="default: meta.eval_episodes (quick: 2)")
    parser.add_argument("--seeds", type=int, default=3, help="fresh seeds for defaults vs best (quick: 1)")
    parser.add_argument("--params", action="append", default=[], help="params.yaml-shaped overlay (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.trials = args.trials or 6
        args.timesteps = args.timesteps or 1500
        args.eval_interval = args.eval_interval or 500
        args.eval_episodes = args.eval_episodes or 2
        args.seeds = 1
        args.overrides = ["train.learning_starts=100", "meta.n_startup_trials=2", *args.overrides]
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    LearningAgent(4, 2)  # warm-up: torch's first optimizer imports torch._dynamo (about 2 s)
    started = time.perf_counter()
    rows = [bench_task(task, args) for task in args.tasks]
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
