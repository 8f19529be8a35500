"""Running trials: one trial trains an agent in chunks and reports each evaluation; a study runs
many, in parallel threads, and carries on past a failed one.

A trial builds a fresh agent from sampled values (or starts from a transferred policy), trains it
in chunks and reports a greedy evaluation after each; the pruner stops trials that fall behind,
and a trial whose loss turns NaN is pruned rather than crashing the study.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from agent.config import Config
from agent.dqn import LearningAgent, TrainingDivergedError
from agent.meta.options import MetaLearningError, OptimizationConfig
from agent.meta.studies import best_value, quiet_optuna
from agent.meta.targets import TaskSpec
from agent.network import NetworkArchitecture
from agent.tasks import task_spaces
from agent.training import Trainer

log = logging.getLogger(__name__)

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
"""Called by Optuna after every finished trial (the MLflow layer logs trials through it)."""
SearchProgress = Callable[[Mapping[str, Any]], None]
"""Called after every finished trial with done, total, state, value and best_value."""


def metric_value(trainer: Trainer, metric: str) -> float:
    """The trainer's last evaluation, as ``metric`` measures it."""
    if metric == "success_rate":
        value = trainer.last_evaluation.get("success_rate")
        if value is None:
            raise MetaLearningError(f"task '{trainer.task}' reports no success rate: optimise mean_reward")
        return float(value)
    return float(trainer.last_evaluation["mean_reward"])


def run_trial(
    trial: optuna.Trial | optuna.trial.FixedTrial,
    spec: TaskSpec,
    config: Config,
    options: OptimizationConfig,
    architecture: NetworkArchitecture | None = None,
    *,
    eval_seed: int | None = None,
    agent: LearningAgent | None = None,
) -> float:
    """Train a fresh agent (or ``agent``, built with ``config``: a transferred policy) in chunks,
    report each evaluation, stop laggards and diverged runs.

    Every trial is evaluated on the same episodes (``eval_seed``, default: the config's
    evaluation seed), so trials differ only in what they learned.
    """
    seed = eval_seed if eval_seed is not None else config.run.seed + config.evaluate.seed_offset
    if agent is None:
        obs_dim, n_actions = (
            task_spaces(spec.task, config=config) if architecture is None else (architecture.input_dim, architecture.output_dim)
        )
        agent = LearningAgent(obs_dim, n_actions, config=config, architecture=architecture)
    trainer = Trainer(
        agent,
        task_type=spec.task,
        task_params=spec.task_params,
        training_config={"eval_frequency": 0, "final_model": "last"},
        tensorboard=False,
    )
    trainer.plan_exploration(options.trial_timesteps, None)  # one schedule over the whole trial
    trial.set_user_attr("planned_steps", options.trial_timesteps)
    value = math.nan
    try:
        for steps in options.evaluation_steps():
            trainer.run(total_timesteps=steps)
            trainer.run_evaluation(num_episodes=options.eval_episodes, seed=seed)
            value = metric_value(trainer, options.metric)
            trial.set_user_attr("steps_trained", trainer.global_step)
            trial.report(value, step=steps)
            if steps < options.trial_timesteps and trial.should_prune():
                raise optuna.TrialPruned(f"evaluation {value:.3g} at step {steps} fell behind")
        return value
    except TrainingDivergedError as exc:
        trial.set_user_attr("steps_trained", trainer.global_step)
        trial.set_user_attr("diverged", str(exc))
        raise optuna.TrialPruned(f"diverged: {exc}") from None
    finally:
        trainer.close()


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    options: OptimizationConfig,
    *,
    on_trial: TrialCallback | None = None,
    progress: SearchProgress | None = None,
    storage_url: str | None = None,
) -> list[int]:
    """Run ``options.n_trials`` trials of ``objective`` on ``study``; the numbers of those this call
    ran (other workers may add trials to the study meanwhile).

    A trial that raises a RuntimeError (a torch error, out of memory, ...) is recorded as failed,
    with its error, and the study goes on. With ``options.trial_runner`` 'ray' the trials run as
    Ray tasks sharing the study at ``storage_url`` (:mod:`agent.meta.ray_trials`).
    """
    lock = threading.Lock()
    ran: list[int] = []
    callbacks: list[TrialCallback] = [on_trial] if on_trial is not None else []
    if progress is not None:
        done = [0]

        def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            with lock:
                done[0] += 1
                progress(
                    {
                        "done": done[0],
                        "total": options.n_trials,
                        "number": trial.number,
                        "state": trial.state.name.lower(),
                        "value": trial.value,
                        "best_value": best_value(study),
                    }
                )

        callbacks.append(report)

    def guarded(trial: optuna.Trial) -> float:
        with lock:
            ran.append(trial.number)
        try:
            return objective(trial)
        except RuntimeError as exc:  # recorded, the study goes on (torch errors, OOM, ...)
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            log.warning("trial %d of %s failed: %s", trial.number, study.study_name, exc)
            raise

    if options.trial_runner == "ray":
        from agent.meta.ray_trials import run_trials_on_ray

        if storage_url is None:
            raise MetaLearningError("trials on Ray need the study's storage URL")
        return run_trials_on_ray(
            study, storage_url, objective, n_trials=options.n_trials, workers=options.n_jobs,
            timeout=options.timeout, callbacks=callbacks,
        )
    with quiet_optuna():
        study.optimize(
            guarded,
            n_trials=options.n_trials,
            timeout=options.timeout,
            n_jobs=options.n_jobs,
            callbacks=callbacks,
            catch=(RuntimeError,),
        )
    return ran
