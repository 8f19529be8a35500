"""Periodic optimisation during training: try learning settings on copies of the live agent and
apply the best, every N episodes.

It runs as a trainer callback (:class:`PeriodicOptimisation`), so training knows nothing of it:
``Trainer.run(callbacks=[PeriodicOptimisation(manager, 10)])``. Each optimisation continues copies
of the live agent (weights, optimiser, replay buffer, epsilon) with a few candidate settings on
fresh environments with one seed, scores them by the same greedy evaluation, and changes the live
settings (through :meth:`Trainer.reconfigure`) only if a candidate beats the unchanged ones by more
than the evaluation noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import optuna

from agent.config import MetaConfig, with_overrides
from agent.dqn import TrainingDivergedError
from agent.meta.options import MetaLearningError
from agent.meta.studies import quiet_optuna
from agent.meta.transfer import clone_agent
from agent.meta.trials import metric_value
from agent.seeding import preserved_torch_rng
from agent.tasks import TaskType
from agent.training import Trainer

log = logging.getLogger(__name__)

ONLINE_KEYS = ("learning_rate", "gamma", "batch_size", "target_update_interval")
"""The learning settings periodic optimisation tries: what can change without rebuilding the agent."""


def sample_online(trial: optuna.Trial, current: Mapping[str, Any]) -> dict[str, Any]:
    """Settings near the live ones: learning rate within 4x, and gamma, batch size, target interval."""
    lr = float(current["learning_rate"])
    return {
        "learning_rate": trial.suggest_float("learning_rate", lr / 4, lr * 4, log=True),
        "gamma": trial.suggest_categorical("gamma", sorted({0.95, 0.98, 0.99, 0.995, float(current["gamma"])})),
        "batch_size": trial.suggest_categorical("batch_size", sorted({16, 32, 64, 128, int(current["batch_size"])})),
        "target_update_interval": trial.suggest_categorical(
            "target_update_interval", sorted({100, 250, 500, 1000, int(current["target_update_interval"])})
        ),
    }


def apply_live_hyperparameters(trainer: Trainer, values: Mapping[str, Any]) -> None:
    """Change learning settings of a live trainer (and so of its agent) mid-run."""
    unknown = set(values) - set(ONLINE_KEYS)
    if unknown:
        raise MetaLearningError(f"{sorted(unknown)} cannot change during training; only {list(ONLINE_KEYS)}")
    trainer.reconfigure(train=dict(values))


def _train_candidate(
    trainer: Trainer,
    params: Mapping[str, Any],
    timesteps: int,
    eval_episodes: int,
    seed: int,
    eval_seed: int,
    metric: str,
) -> tuple[float, float]:
    """Continue a copy of the live agent with ``params``; (metric, its standard error)."""
    config = with_overrides(
        trainer.config,
        run={"seed": seed},
        train={
            **params,
            "learning_starts": 0,  # the copied buffer is already warm
            "epsilon_start": trainer.epsilon,
            "eval_frequency": 0,
            "final_model": "last",
        },
    )
    candidate = Trainer(
        clone_agent(trainer.agent, config),
        task_type=trainer.task,
        task_params=trainer.task_params,
        reward_config=trainer.reward_config,
        tensorboard=False,
    )
    try:
        with preserved_torch_rng():
            candidate.run(total_timesteps=timesteps)
            candidate.run_evaluation(num_episodes=eval_episodes, seed=eval_seed)
        value = metric_value(candidate, metric)
        n = candidate.last_evaluation["episodes"]
        if metric == "success_rate":
            spread = math.sqrt(value * (1 - value))
        else:
            spread = candidate.last_evaluation["std_reward"]
        return value, spread / math.sqrt(max(n, 1))
    finally:
        candidate.close()


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _fmt_value(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.3g}"


def optimize_online(meta: MetaConfig, trainer: Trainer) -> dict[str, Any]:
    """One periodic optimisation: try settings on copies of the live agent, apply the best.

    Candidates (``meta.online_trials`` of them, plus the unchanged settings as a baseline)
    each continue a copy of the live agent (weights, optimiser, replay buffer, epsilon) for
    ``meta.online_timesteps`` steps on fresh environments with the same seed, and are scored
    by the same greedy evaluation. A candidate replaces the live settings only if it beats
    the baseline. Learning rate, gamma, batch size and target-update interval are tried:
    what can change without rebuilding the agent. Returns the record of what was tried.
    """
    live = trainer.config.train
    current = {key: getattr(live, key) for key in ONLINE_KEYS}
    seed = trainer.config.run.seed + trainer.episodes_done
    metric = meta.optimization_metric if TaskType.parse(trainer.task) is not None else "mean_reward"
    eval_seed = trainer.config.run.seed + trainer.config.evaluate.seed_offset + 2000
    with quiet_optuna():
        study = optuna.create_study(
            direction=meta.direction,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, meta.online_trials // 2)),
        )
        study.enqueue_trial(current)
    candidates: list[dict[str, Any]] = []
    started = time.perf_counter()
    for _ in range(meta.online_trials + 1):
        trial = study.ask()
        params = sample_online(trial, current)
        try:
            value, error = _train_candidate(
                trainer, params, meta.online_timesteps, meta.eval_episodes, seed, eval_seed, metric
            )
        except TrainingDivergedError:
            with quiet_optuna():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            candidates.append({"params": params, "value": None, "stderr": None, "diverged": True})
            continue
        with quiet_optuna():
            study.tell(trial, value)
        candidates.append({"params": params, "value": value, "stderr": error})
    baseline = candidates[0]
    best = max(
        (c for c in candidates[1:] if c["value"] is not None),
        key=lambda c: c["value"] if meta.direction == "maximize" else -c["value"],
        default=None,
    )
    # Evaluations are noisy: a candidate must beat the baseline by more than one standard
    # error of the difference, else the settings would drift with the noise.
    applied = best is not None and (
        baseline["value"] is None
        or _better(best["value"], baseline["value"], meta.direction)
        and abs(best["value"] - baseline["value"]) > math.hypot(best["stderr"], baseline["stderr"])
    )
    if applied:
        apply_live_hyperparameters(trainer, best["params"])
    record = {
        "episode": trainer.episodes_done,
        "global_step": trainer.global_step,
        "recent_mean_reward": trainer.recent_mean_reward(),
        "baseline_value": baseline["value"],
        "best_value": None if best is None else best["value"],
        "previous": current,
        "params": dict(best["params"]) if applied else current,
        "applied": applied,
        "candidates": candidates,
        "steps": len(candidates) * meta.online_timesteps,
        "seconds": time.perf_counter() - started,
    }
    trainer.metrics.log_metrics(
        {
            "meta/online_baseline": _nan_if_none(baseline["value"]),
            "meta/online_best": _nan_if_none(record["best_value"]),
            "meta/online_applied": float(applied),
            "train/learning_rate": trainer.agent.learning_rate,
        },
        trainer.global_step,
    )
    if applied:
        changes = ", ".join(
            f"{k} {current[k]:.4g} -> {v:.4g}" for k, v in best["params"].items() if v != current[k]
        )
        log.info(
            "periodic optimisation at episode %d: %s (evaluation %.3g vs %s unchanged)",
            trainer.episodes_done, changes, best["value"], _fmt_value(baseline["value"]),
        )
    else:
        log.info(
            "periodic optimisation at episode %d: settings kept (unchanged %s, best candidate %s)",
            trainer.episodes_done, _fmt_value(baseline["value"]), _fmt_value(record["best_value"]),
        )
    return record


class OnlineTuner(Protocol):
    """What :class:`PeriodicOptimisation` needs of a manager (``MetaLearningManager`` is one)."""

    def online_due(self, episodes_done: int, interval: int) -> bool: ...

    def optimize_online(self, trainer: Trainer) -> dict[str, Any]: ...


class PeriodicOptimisation:
    """A trainer callback: one periodic optimisation every ``interval`` episodes.

    ``manager`` decides when one is due (its schedule is saved with its state, so a resumed run
    keeps it) and records what each one tried.
    """

    def __init__(self, manager: OnlineTuner, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"optimize_interval must be >= 1, got {interval}")
        self.manager = manager
        self.interval = interval

    def on_step(self, trainer: Trainer) -> None:
        if self.manager.online_due(trainer.episodes_done, self.interval):
            self.manager.optimize_online(trainer)
