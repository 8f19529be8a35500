"""Optuna studies: where they are stored, what they are called, and how they are opened.

A study lives in a storage (SQLite by default, any RDB URL, or ``journal:PATH`` for several
processes on one machine) under the name '{study_name}/{task}/{kind}', so running the same search
again resumes it and several workers can share it. Opening is where processes race (SQLite's first
creation) and where a resumed study must be checked against the options it was created with;
both are handled here, once.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from agent.meta.options import MetaLearningError, OptimizationConfig, OptimizationType
from agent.meta.targets import TaskSpec


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial at INFO; our callers report progress themselves."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL; ``journal:PATH`` selects the journal-file backend.

    SQLite waits up to 60 s for a lock instead of failing at once, since several workers may
    write; RDB storages get a heartbeat so that trials of a crashed worker are marked failed.
    """
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:").removeprefix("//"))
        if not path.name:
            raise MetaLearningError(f"storage '{url}' names no journal file (journal:PATH)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        except OSError as exc:
            raise MetaLearningError(f"cannot open journal storage {path}: {exc.strerror or exc}") from None
    if "://" not in url:
        raise MetaLearningError(
            f"storage '{url}' is not a URL: use sqlite:///FILE, an RDB URL such as "
            "postgresql://user@host/db, or journal:FILE"
        )
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    heartbeat: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            try:
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MetaLearningError(f"cannot create the directory of {url}: {exc.strerror or exc}") from None
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        heartbeat = {"heartbeat_interval": 60, "grace_period": 180}
    for attempt in range(7):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
            raise MetaLearningError(f"cannot use storage '{url}': {str(exc).splitlines()[0]}") from None
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
            reason = str(exc.orig or exc).splitlines()[0]
            # Processes creating the same new database race on its tables: retry, then it exists.
            if attempt == 6 or not any(s in reason for s in ("already exists", "UNIQUE constraint", "locked")):
                raise MetaLearningError(f"cannot open storage '{url}': {reason}") from None
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


class Storages:
    """One open storage per URL (an RDB storage holds a connection pool), shared by threads."""

    def __init__(self) -> None:
        self._open: dict[str, optuna.storages.BaseStorage] = {}
        self._lock = threading.Lock()

    def get(self, url: str) -> optuna.storages.BaseStorage:
        with self._lock:
            if url not in self._open:
                self._open[url] = make_storage(url)
            return self._open[url]

    def forget(self, url: str) -> None:
        """Drop the storage of ``url``: the next :meth:`get` opens it afresh."""
        with self._lock:
            self._open.pop(url, None)


def study_name(prefix: str, kind: OptimizationType | str, spec: TaskSpec, source: str | None = None) -> str:
    """'{prefix}/{task}/{kind}': one study per task and kind, resumed by name.

    A search that starts from a source policy (POLICY, TRANSFER) is '{prefix}/{source}->{task}/{kind}':
    what suits one source policy need not suit another.
    """
    target = spec.label if source is None else f"{source}->{spec.label}"
    return f"{prefix}/{target}/{OptimizationType(kind).value}"


def make_pruner(options: OptimizationConfig) -> optuna.pruners.BasePruner:
    """The pruner ``options.pruner`` names, stepping at the trials' evaluation points."""
    if options.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.n_startup_trials, n_warmup_steps=0)
    if options.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=options.eval_interval, max_resource=options.trial_timesteps, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def open_study(storages: Storages, url: str, name: str, direction: str) -> optuna.Study:
    """Create the study, or load it if it exists; retried, since SQLite's first creation races
    between processes."""
    import sqlalchemy.exc

    last: Exception | None = None
    for attempt in range(6):
        try:
            with quiet_optuna():
                return optuna.create_study(
                    storage=storages.get(url), study_name=name, direction=direction, load_if_exists=True
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            last = exc
            storages.forget(url)
            time.sleep(0.1 * 2**attempt)
    raise MetaLearningError(f"cannot create or load study '{name}' in {url}: {last}")


def prepare_study(
    study: optuna.Study, kind: OptimizationType, options: OptimizationConfig, spec: TaskSpec, seed: int, url: str
) -> None:
    """Check a (possibly resumed) study against ``options``, record what it optimises, and give it
    its sampler and pruner.

    The sampler is seeded from ``seed`` and the number of trials the study already holds: one seed
    repeats a search, a resumed search does not replay the trials it already ran, and worker
    processes given different seeds sample differently.
    """
    name = study.study_name
    wanted = optuna.study.StudyDirection[options.direction.upper()]
    if study.direction != wanted:
        raise MetaLearningError(
            f"study '{name}' in {url} is set to {study.direction.name.lower()}, "
            f"not {options.direction}: choose another study name"
        )
    attrs = study.user_attrs
    if "metric" not in attrs:
        study.set_user_attr("metric", options.metric)
        study.set_user_attr("task", spec.task)
        study.set_user_attr("kind", kind.value)
        if spec.task_params is not None:
            study.set_user_attr("task_params", spec.task_params.to_dict())
    elif attrs["metric"] != options.metric:
        raise MetaLearningError(
            f"study '{name}' optimises {attrs['metric']}, not {options.metric}: choose another study name"
        )
    existing = len(study.get_trials(deepcopy=False))
    sampler_seed = int(np.random.SeedSequence([seed, existing]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(
        n_startup_trials=options.n_startup_trials, seed=sampler_seed, constant_liar=True
    )
    study.pruner = make_pruner(options)


def load_study(storages: Storages, url: str, name: str) -> optuna.Study:
    """An existing study; a clear error if there is none."""
    try:
        return optuna.load_study(study_name=name, storage=storages.get(url))
    except KeyError:
        raise MetaLearningError(f"no study '{name}' in {url}") from None


def best_value(study: optuna.Study) -> float | None:
    """The study's best value so far; None before any trial completes."""
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return None
