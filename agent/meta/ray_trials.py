"""A search's trials as Ray tasks, sharing one Optuna study through its storage.

Optuna's own model of distributed search: every worker loads the study from a shared storage and
asks it for its next trial, so the sampler sees every finished trial whichever worker ran it. The
workers here are Ray tasks; the study's storage must be one they all reach (SQLite or a journal
file on one machine, PostgreSQL across machines). Each task gets a copy of the caller's sampler
and pruner (seeded as the caller's are), so a search with one worker samples as a search in
threads does.

The caller's callbacks (MLflow's trial runs, progress) stay in the calling process: it polls the
study while the tasks run and calls them for every trial that finishes, so nothing that holds a
connection or a terminal travels to a worker.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence

import optuna

from agent.meta.studies import make_storage, quiet_optuna

_POLL_SECONDS = 0.5
_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _optimize_share(
    study_name: str,
    storage_url: str,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    timeout: float | None,
) -> list[int]:
    """One worker: ``n_trials`` trials of the shared study (the numbers of those it ran)."""
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage_url), sampler=sampler, pruner=pruner)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran: list[int] = []

    def tagged(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        trial.set_user_attr("worker", worker)
        try:
            return objective(trial)
        except RuntimeError as exc:  # recorded, the study goes on (as in threads)
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            raise

    with quiet_optuna():
        study.optimize(tagged, n_trials=n_trials, timeout=timeout, catch=(RuntimeError,))
    return ran


def shares(n_trials: int, workers: int) -> list[int]:
    """``n_trials`` split as evenly as can be over at most ``workers`` workers."""
    workers = max(1, min(workers, n_trials))
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def run_trials_on_ray(
    study: optuna.Study,
    storage_url: str,
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int,
    workers: int,
    timeout: float | None,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
) -> list[int]:
    """Run ``n_trials`` trials of ``objective`` as ``workers`` Ray tasks on ``study`` (stored at
    ``storage_url``); ``callbacks`` run here as trials finish. Returns the numbers of the trials
    these tasks ran."""
    import ray

    from agent.distributed.run import connect_ray

    if storage_url.startswith("sqlite:///:memory:") or storage_url in ("sqlite://", "sqlite:///"):
        raise ValueError("trials on Ray need a storage every worker reaches, not an in-memory SQLite")
    started_ray = connect_ray(None, None)
    try:
        before = {t.number for t in study.get_trials(deepcopy=False)}
        remote = ray.remote(num_cpus=1)(_optimize_share)
        pending = [
            remote.remote(study.study_name, storage_url, study.sampler, study.pruner, objective, share, timeout)
            for share in shares(n_trials, workers)
        ]
        refs = list(pending)
        reported: set[int] = set()

        def report_finished() -> None:
            for trial in study.get_trials(deepcopy=False, states=_FINISHED):
                if trial.number not in before and trial.number not in reported:
                    reported.add(trial.number)
                    for callback in callbacks:
                        callback(study, trial)

        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_SECONDS)
            report_finished()
        ran = sorted(number for share in ray.get(refs) for number in share)
        report_finished()
        return ran
    finally:
        if started_ray:
            ray.shutdown()
