"""Searches in several processes on one Optuna study: what ``lagent optimize`` workers do."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState as Trial

from agent import MetaLearningManager, OptimizationType
from agent.config import load_config
from tests.unit.test_meta import TINY, manager

pytestmark = pytest.mark.integration


def _worker(storage: str, seed: int, results) -> None:
    """One search process: what ``lagent optimize --storage ... --seed N`` runs."""
    config = load_config(overrides=["network.hidden_size=32", "train.learning_starts=64", f"run.seed={seed}"])
    meta = MetaLearningManager({"storage_url": storage}, study_name="shared", config=config)
    result = meta.search_hyperparameters("CartPole-v1", TINY)
    results.put((seed, result.trials_run, result.trials_total))


@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_two_worker_processes_share_one_study_without_losing_trials(tmp_path, backend):
    """Worker processes (the CLI path is tested in test_meta_cli.py).

    Spawned, not forked: a fork taken after Prefect's or MLflow's background threads have started
    (an earlier test in the same session) leaves the child unable to shut down cleanly.
    """
    import multiprocessing

    storage = f"journal:{tmp_path / 'study.journal'}" if backend == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    meta = manager(tmp_path, storage=storage, study="shared")
    meta.create_study(OptimizationType.HYPERPARAMETERS, TINY, "CartPole-v1")  # once, before the workers
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(storage, seed, results)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    reports = sorted(results.get(timeout=5) for _ in workers)
    assert [trials_run for _, trials_run, _ in reports] == [2, 2]
    trials = meta.load_study(OptimizationType.HYPERPARAMETERS, "CartPole-v1").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state in (Trial.COMPLETE, Trial.PRUNED) for t in trials)
    # Different seeds: the two workers did not try the same settings.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4


def _create(storage: str, barrier, results) -> None:
    barrier.wait()  # all at once, on a database that does not exist yet
    try:
        study = MetaLearningManager({"storage_url": storage}, study_name="race").create_study("hyperparameters")
        results.put(study.study_name)
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_a_new_sqlite_study_at_once_all_get_it(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    storage = f"sqlite:///{tmp_path / 'race.db'}"
    workers = [context.Process(target=_create, args=(storage, barrier, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    names = {results.get(timeout=5) for _ in workers}
    assert names == {"race/CartPole-v1/hyperparameters"}
    assert len(optuna.get_all_study_names(storage)) == 1
