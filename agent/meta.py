"""Meta-learning: Optuna searches over hyperparameters and architectures, and policy adaptation.

A search trial builds a fresh agent from sampled values, trains it in chunks and reports a greedy
evaluation after each chunk; the pruner (median by default) stops trials that fall behind, and a
trial whose loss turns NaN is pruned rather than crashing the study. Studies live in an Optuna
storage (SQLite by default, any RDB URL, or ``journal:PATH`` for several processes on one
machine), so running the same study name again resumes it and several workers can share it.

Policy adaptation copies every layer of a trained policy that fits a new task, fine-tunes it there
and reports its reward next to a policy trained from scratch for the same budget. Two more searches
start every trial from such a transferred policy: how to fine-tune it (``OptimizationType.POLICY``)
and what to transfer (``OptimizationType.TRANSFER``). Periodic
optimisation during training tries a few learning settings on copies of the live agent and
applies the best one (``TrainingManager.train(optimize_interval=...)``).

Nothing here knows about MLflow or Prefect: callers pass ``on_trial`` to observe finished trials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import enum
import hashlib
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import optuna
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.seeding import preserved_torch_rng
from agent.checkpoint import CheckpointError, check_buffer_size, load_checkpoint_file
from agent.config import (
    Config,
    ConfigError,
    config_for_task,
    config_from_dict,
    load_config,
    load_raw,
    load_section,
    register_section,
    with_overrides,
)
from agent.dqn import LearningAgent, TrainingDivergedError
from agent.network import NetworkArchitecture
from agent.tasks import (
    CurriculumManager,
    DifficultyLevel,
    TaskParameters,
    TaskType,
    is_gym_id,
    make_vector_env,
    task_name,
    task_spaces,
)

if TYPE_CHECKING:
    from agent.training import TrainingManager

log = logging.getLogger(__name__)

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
SearchProgress = Callable[[Mapping[str, Any]], None]
"""Called after every finished trial with done, total, state, value and best_value."""
PhaseProgress = Callable[[str, Mapping[str, float]], None]
"""Called with a phase name ('adapted', 'scratch') and the trainer's progress dict."""


class MetaLearningError(ConfigError):
    """A meta-learning setting is unusable: storage URL, study, task name or source policy."""


class OptimizationType(str, enum.Enum):
    """What a meta-learning process optimises; :meth:`MetaLearningManager.search` runs any of them.

    The last two start every trial from a trained source policy moved to the target task
    (``source=``), and differ in what they vary.
    """

    HYPERPARAMETERS = "hyperparameters"
    """Learning settings of a fresh agent (:meth:`MetaLearningManager.search_hyperparameters`)."""
    ARCHITECTURE = "architecture"
    """Network shapes (:meth:`MetaLearningManager.search_architecture`)."""
    POLICY = "policy"
    """Policy adaptation: how a transferred policy is fine-tuned on the target task (its step
    size, the exploration it restarts with, its warm-up): :meth:`MetaLearningManager.search_policy`."""
    TRANSFER = "transfer"
    """Knowledge transfer: what the source policy hands over (every layer that fits, the hidden
    layers only, or nothing; the weights of shared inputs and actions or not),
    :meth:`MetaLearningManager.search_transfer`."""


_FROM_SOURCE = (OptimizationType.POLICY, OptimizationType.TRANSFER)

TransferLayers = Literal["all", "body", "none"]
"""Which layers of a source policy a transfer copies: every one that fits, the hidden layers only
(the output head starts fresh), or none (a from-scratch start, the baseline a search must beat)."""


# --------------------------------------------------------------------------- configuration


class MetaConfig(BaseModel):
    """The ``meta`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    storage_url: str = Field(min_length=1)
    """Optuna storage: sqlite:///FILE, an RDB URL (postgresql://...), or journal:FILE."""
    study_name: str = Field(min_length=1)
    """Studies are named '{study_name}/{task}/{kind}', so each task and search kind keeps its own."""
    optimization_metric: Literal["mean_reward", "success_rate"]
    """What a trial returns: the mean greedy reward (or task success rate) of its last evaluation."""
    direction: Literal["maximize", "minimize"]
    """Whether the metric is to be maximised or minimised."""
    n_trials: int = Field(ge=1)
    """Trials per search (on top of those the study already has)."""
    timeout: float | None = Field(gt=0)
    """Seconds after which a search starts no new trial (null: no limit)."""
    pruner: Literal["median", "hyperband", "none"]
    """'median' stops a trial whose evaluation falls below the median of earlier trials' at that step."""
    n_startup_trials: int = Field(ge=0)
    """Trials sampled at random and never pruned before TPE and pruning start."""
    n_jobs: int = Field(ge=1)
    """Trials run in parallel threads of one process."""
    trial_timesteps: int = Field(ge=1)
    """Environment steps each trial trains for."""
    eval_interval: int = Field(ge=1)
    """Steps between a trial's intermediate evaluations (its pruning points)."""
    eval_episodes: int = Field(ge=1)
    """Greedy episodes per trial evaluation."""
    adapt_timesteps: int = Field(ge=1)
    """Fine-tuning budget of a policy adaptation (and of the from-scratch baseline)."""
    adapt_epsilon_start: float | None = Field(ge=0.0, le=1.0)
    """Exploration when fine-tuning starts (None: train.epsilon_start, as for the from-scratch run)."""
    adapt_match_features: bool = True
    """Between task types, also keep the input weights of the observation slots and the output
    rows of the actions both tasks share (by name), not only the layers of identical shape."""
    adapt_transfer_layers: TransferLayers = "all"
    """Layers a policy adaptation copies from the source: 'all' that fit, 'body' (hidden layers;
    a fresh output head) or 'none' (see ``lagent optimize --kind transfer``)."""
    online_trials: int = Field(ge=1)
    """Candidates tried by each periodic optimisation during training (besides the unchanged settings)."""
    online_timesteps: int = Field(ge=1)
    """Steps each periodic-optimisation candidate trains from a copy of the live agent."""


register_section("meta", MetaConfig)


def load_meta_config(
    params_files: Iterable[str | Path] = (), overrides: Iterable[str | Mapping[str, Any]] = ()
) -> MetaConfig:
    """The ``meta`` section of the layered params (params.yaml, files, ``section.key=value``)."""
    return load_section("meta", MetaConfig, load_raw(params_files, overrides))  # type: ignore[return-value]


def _validation_message(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{source}: {where}: {first['msg']} (got {first.get('input')!r})"


_META_TO_OPTIONS = {
    "n_trials": "n_trials",
    "timeout": "timeout",
    "optimization_metric": "metric",
    "direction": "direction",
    "pruner": "pruner",
    "n_startup_trials": "n_startup_trials",
    "n_jobs": "n_jobs",
    "trial_timesteps": "trial_timesteps",
    "eval_interval": "eval_interval",
    "eval_episodes": "eval_episodes",
}


class OptimizationConfig(BaseModel):
    """How one search runs: the spec's trials, timeout, metric, direction and pruner, and budgets.

    Keys not given come from the ``meta`` section of params.yaml (the one place for defaults).
    ``trials`` is accepted for ``n_trials``: ``OptimizationConfig(trials=10, pruner="median")``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    n_trials: int = Field(ge=1, alias="trials")
    """Trials to run (on top of those the study already has)."""
    timeout: float | None = Field(gt=0)
    """Seconds after which no new trial starts (None: no limit)."""
    metric: Literal["mean_reward", "success_rate"]
    """What a trial returns."""
    direction: Literal["maximize", "minimize"]
    """Whether the metric is maximised or minimised."""
    pruner: Literal["median", "hyperband", "none"]
    """Pruning strategy for trials that fall behind."""
    n_startup_trials: int = Field(ge=0)
    """Random, unpruned trials before TPE and pruning start."""
    n_jobs: int = Field(ge=1)
    """Parallel trial threads."""
    trial_timesteps: int = Field(ge=1)
    """Environment steps per trial."""
    eval_interval: int = Field(ge=1)
    """Steps between intermediate evaluations."""
    eval_episodes: int = Field(ge=1)
    """Episodes per evaluation."""

    @model_validator(mode="before")
    @classmethod
    def _fill_from_params(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        given = {"n_trials" if k == "trials" else k for k in data}
        missing = set(_META_TO_OPTIONS.values()) - given
        if not missing:
            return data
        meta = load_meta_config()
        defaults = {option: getattr(meta, key) for key, option in _META_TO_OPTIONS.items() if option in missing}
        return {**defaults, **data}

    @property
    def trials(self) -> int:
        return self.n_trials

    @classmethod
    def from_meta(cls, meta: MetaConfig, **overrides: Any) -> OptimizationConfig:
        """The meta section's values, with any non-None keyword replacing one of them."""
        values: dict[str, Any] = {option: getattr(meta, key) for key, option in _META_TO_OPTIONS.items()}
        if "trials" in overrides:
            overrides["n_trials"] = overrides.pop("trials")
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise MetaLearningError(_validation_message(exc, "search options")) from None

    def evaluation_steps(self) -> list[int]:
        """The step counts at which a trial is evaluated (and may be pruned); the last is the budget."""
        points = list(range(self.eval_interval, self.trial_timesteps, self.eval_interval))
        return [*points, self.trial_timesteps]


# --------------------------------------------------------------------------- tasks


_VARIANTS: dict[str, DifficultyLevel] = {
    "simple": DifficultyLevel.BEGINNER,
    "easy": DifficultyLevel.BEGINNER,
    "beginner": DifficultyLevel.BEGINNER,
    "medium": DifficultyLevel.INTERMEDIATE,
    "intermediate": DifficultyLevel.INTERMEDIATE,
    "complex": DifficultyLevel.ADVANCED,
    "advanced": DifficultyLevel.ADVANCED,
    "hard": DifficultyLevel.EXPERT,
    "expert": DifficultyLevel.EXPERT,
}


@dataclass(frozen=True)
class TaskSpec:
    """A concrete task: a task type at some difficulty, or a Gymnasium env id."""

    task: str
    task_params: TaskParameters | None
    label: str

    def same_task(self, other: TaskSpec) -> bool:
        return self.task == other.task and self.task_params == other.task_params


def _stage_label(params: TaskParameters) -> str:
    for stage in CurriculumManager().stages:
        if stage.task_params == params:
            return stage.difficulty.value
    digest = hashlib.sha1(json.dumps(params.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"custom-{digest}"


def resolve_task(task: Any, task_params: Any = None) -> TaskSpec:
    """Turn a task name into a concrete task.

    Accepted: a task type (``navigation``: its first curriculum stage unless ``task_params`` says
    otherwise), a task type with a difficulty suffix (``navigation_simple`` = beginner,
    ``_medium`` = intermediate, ``_complex`` = advanced, ``_hard`` / ``_expert`` = expert, or a
    level's own name), or a registered Gymnasium env id.
    """
    name = task_name(task)
    task_type = TaskType.parse(name)
    if task_type is None and "_" in name:
        base, _, variant = name.rpartition("_")
        level = _VARIANTS.get(variant.lower())
        if TaskType.parse(base) is not None and level is not None:
            if task_params is not None:
                raise MetaLearningError(
                    f"'{name}' already names a difficulty: pass task_params or a variant, not both"
                )
            task_type = TaskType.parse(base)
            task_params = CurriculumManager().parameters_for(level)
    if task_type is not None:
        params = TaskParameters.coerce(task_params)
        return TaskSpec(task_type.value, params, f"{task_type.value}@{_stage_label(params)}")
    if is_gym_id(name):
        if task_params is not None:
            raise MetaLearningError(f"task parameters apply to task types, not to the Gymnasium env '{name}'")
        return TaskSpec(name, None, name)
    variants = ", ".join(sorted({k for k in _VARIANTS}))
    raise MetaLearningError(
        f"unknown task '{name}': expected a task type ({', '.join(t.value for t in TaskType)}), "
        f"a task type with a difficulty suffix (e.g. navigation_simple; suffixes: {variants}) "
        "or a registered Gymnasium env id"
    )


# --------------------------------------------------------------------------- search spaces


HYPERPARAMETER_SECTIONS: dict[str, str] = {
    "learning_rate": "train",
    "batch_size": "train",
    "gamma": "train",
    "target_update_interval": "train",
    "train_freq": "train",
    "local_buffer_size": "replay",
    "hidden_size": "network",
    "num_hidden_layers": "network",
}
"""Where each searched hyperparameter lives in params.yaml."""


def sample_hyperparameters(trial: optuna.Trial) -> dict[str, dict[str, Any]]:
    """The spec's list: learning rate, batch size, gamma, update frequencies, buffer size, network."""
    flat = {
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
        "gamma": trial.suggest_categorical("gamma", [0.9, 0.95, 0.98, 0.99, 0.995]),
        "target_update_interval": trial.suggest_categorical("target_update_interval", [10, 100, 250, 500, 1000]),
        "train_freq": trial.suggest_categorical("train_freq", [1, 4, 8, 16]),
        "local_buffer_size": trial.suggest_categorical("local_buffer_size", [1_000, 10_000, 50_000]),
        "hidden_size": trial.suggest_categorical("hidden_size", [64, 128, 256]),
        "num_hidden_layers": trial.suggest_int("num_hidden_layers", 1, 3),
    }
    return hyperparameters_as_params(flat)


def hyperparameters_as_params(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A flat Optuna parameter dict as a params.yaml-shaped overlay (``{"train": {...}, ...}``)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section = HYPERPARAMETER_SECTIONS.get(key)
        if section is None:
            known = ", ".join(HYPERPARAMETER_SECTIONS)
            raise MetaLearningError(f"'{key}' is not a searched hyperparameter ({known})")
        sections.setdefault(section, {})[key] = value
    if "network" in sections:
        sections["network"]["hidden_layers"] = None  # the searched width and depth apply
    return sections


ARCHITECTURE_UNITS = (32, 64, 128, 256, 512)
ARCHITECTURE_ACTIVATIONS = ("relu", "tanh", "elu", "leaky_relu", "silu", "gelu")


def sample_architecture(trial: optuna.Trial, input_dim: int, output_dim: int) -> NetworkArchitecture:
    """Layers, units per layer, dropout and activation."""
    n_layers = trial.suggest_int("n_layers", 1, 4)
    units = tuple(trial.suggest_categorical(f"units_{i}", list(ARCHITECTURE_UNITS)) for i in range(n_layers))
    return NetworkArchitecture(
        input_dim=input_dim,
        output_dim=output_dim,
        hidden_layers=units,
        activation=trial.suggest_categorical("activation", list(ARCHITECTURE_ACTIVATIONS)),
        dropout=trial.suggest_float("dropout", 0.0, 0.3),
    )


def architecture_from_params(params: Mapping[str, Any], input_dim: int, output_dim: int) -> NetworkArchitecture:
    """The architecture a finished trial's parameters describe."""
    n_layers = int(params["n_layers"])
    return NetworkArchitecture(
        input_dim=input_dim,
        output_dim=output_dim,
        hidden_layers=tuple(int(params[f"units_{i}"]) for i in range(n_layers)),
        activation=str(params["activation"]),
        dropout=float(params["dropout"]),
    )


def architecture_as_params(architecture: NetworkArchitecture) -> dict[str, dict[str, Any]]:
    """A params.yaml overlay that makes ``LearningAgent`` build this architecture."""
    return {
        "network": {
            "hidden_layers": list(architecture.hidden_layers),
            "activation": architecture.activation,
            "dropout": architecture.dropout,
            "dueling": architecture.dueling,
        }
    }


ADAPTATION_LEARNING_STARTS = (0, 250, 1000)
ADAPTATION_EPSILONS = (0.05, 0.2, 0.5, 1.0)


def sample_policy_adaptation(trial: optuna.Trial) -> dict[str, dict[str, Any]]:
    """How a transferred policy is fine-tuned, as a params.yaml overlay: its step size, the
    exploration it restarts with (``meta.adapt_epsilon_start``) and its warm-up."""
    return {
        "train": {
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
            "learning_starts": trial.suggest_categorical("learning_starts", list(ADAPTATION_LEARNING_STARTS)),
        },
        "meta": {
            "adapt_epsilon_start": trial.suggest_categorical("adapt_epsilon_start", list(ADAPTATION_EPSILONS))
        },
    }


def sample_transfer(trial: optuna.Trial) -> dict[str, dict[str, Any]]:
    """What a transfer hands over, as a params.yaml overlay (``meta.adapt_*``)."""
    layers = trial.suggest_categorical("adapt_transfer_layers", ["all", "body", "none"])
    # Shared inputs and actions matter only when some layer is copied.
    match = trial.suggest_categorical("adapt_match_features", [True, False]) if layers != "none" else False
    return {"meta": {"adapt_transfer_layers": layers, "adapt_match_features": match}}


def _trial_overlay(kind: OptimizationType, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A finished POLICY or TRANSFER trial's parameters as the overlay its sampler produced."""
    fixed = optuna.trial.FixedTrial(dict(params))
    return sample_policy_adaptation(fixed) if kind is OptimizationType.POLICY else sample_transfer(fixed)


# --------------------------------------------------------------------------- storage


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


# --------------------------------------------------------------------------- results


@dataclass
class SearchResult:
    """What one search call found, and what it cost."""

    kind: OptimizationType
    study_name: str
    task: str
    storage_url: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any]
    best_config: dict[str, dict[str, Any]]
    """The best trial as a params.yaml overlay (apply it with ``lagent train --params FILE``)."""
    trials_total: int
    trials_run: int
    trials_complete: int
    trials_pruned: int
    trials_failed: int
    trials_diverged: int
    steps_trained: int
    steps_unpruned: int
    """Steps the same trials would have taken without pruning (each its full budget)."""
    best_architecture: NetworkArchitecture | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def steps_saved(self) -> int:
        return self.steps_unpruned - self.steps_trained

    def to_dict(self, include_trials: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.value
        data["best_architecture"] = self.best_architecture.to_dict() if self.best_architecture else None
        data["steps_saved"] = self.steps_saved
        if not include_trials:
            data.pop("trials")
        return data


@dataclass
class AdaptationResult:
    """A policy moved to a new task, next to one trained there from scratch for the same budget."""

    source: str
    target_task: str
    timesteps: int
    transferred: list[str]
    """Layers copied from the source policy."""
    reinitialized: list[str]
    """Layers whose shapes differ on the target task, trained from a fresh initialisation."""
    adapted_reward: float
    adapted_std: float
    scratch_reward: float
    scratch_std: float
    partially_transferred: dict[str, str] = field(default_factory=dict)
    """Re-initialised layers that kept the weights of the inputs or actions both tasks share."""
    zero_shot_reward: float | None = None
    """The source policy's reward on the target before fine-tuning (when every layer fits)."""
    adapted_success_rate: float | None = None
    scratch_success_rate: float | None = None
    eval_episodes: int = 0
    run_dir: str | None = None
    agent: LearningAgent | None = field(default=None, repr=False, compare=False)
    """The adapted agent (not saved in checkpoints or JSON)."""

    @property
    def improvement(self) -> float:
        return self.adapted_reward - self.scratch_reward

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "agent"}
        data["transferred"] = list(self.transferred)
        data["reinitialized"] = list(self.reinitialized)
        data["partially_transferred"] = dict(self.partially_transferred)
        data["improvement"] = self.improvement
        return data


# --------------------------------------------------------------------------- one trial


def _metric_value(trainer: TrainingManager, metric: str) -> float:
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
    from agent.training import TrainingManager

    seed = eval_seed if eval_seed is not None else config.run.seed + config.evaluate.seed_offset
    if agent is None:
        obs_dim, n_actions = (
            task_spaces(spec.task) if architecture is None else (architecture.input_dim, architecture.output_dim)
        )
        agent = LearningAgent(obs_dim, n_actions, config=config, architecture=architecture)
    trainer = TrainingManager(
        agent,
        task_type=spec.task,
        task_params=spec.task_params,
        training_config={"eval_frequency": 0, "final_model": "last"},
        tensorboard=False,
    )
    trainer._plan_exploration(options.trial_timesteps, None)  # one schedule over the whole trial
    trial.set_user_attr("planned_steps", options.trial_timesteps)

    async def chunks() -> float:
        value = math.nan
        for steps in options.evaluation_steps():
            await trainer.train(total_timesteps=steps)
            await trainer.evaluate(num_episodes=options.eval_episodes, seed=seed)
            value = _metric_value(trainer, options.metric)
            trial.set_user_attr("steps_trained", trainer.global_step)
            trial.report(value, step=steps)
            if steps < options.trial_timesteps and trial.should_prune():
                raise optuna.TrialPruned(f"evaluation {value:.3g} at step {steps} fell behind")
        return value

    try:
        return asyncio.run(chunks())
    except TrainingDivergedError as exc:
        trial.set_user_attr("steps_trained", trainer.global_step)
        trial.set_user_attr("diverged", str(exc))
        raise optuna.TrialPruned(f"diverged: {exc}") from None
    finally:
        trainer.close()


# --------------------------------------------------------------------------- the manager


class MetaLearningManager:
    """Runs and remembers searches: hyperparameters, architectures, policy adaptation.

    ``base_config`` holds keys of the ``meta`` section (the spec's ``optimization_metric`` and
    ``storage_url`` among them); everything else comes from params.yaml. ``config`` is the
    learning configuration trials start from (default: params.yaml).
    """

    def __init__(
        self,
        base_config: Mapping[str, Any] | None = None,
        study_name: str | None = None,
        *,
        config: Config | None = None,
        meta_config: MetaConfig | None = None,
        on_trial: TrialCallback | None = None,
    ) -> None:
        meta = meta_config or load_meta_config()
        updates = dict(base_config or {})
        if study_name is not None:
            updates["study_name"] = study_name
        for key in updates:
            if key not in MetaConfig.model_fields:
                close = difflib.get_close_matches(key, list(MetaConfig.model_fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise MetaLearningError(f"meta-learning config: unknown key '{key}'{hint}")
        try:
            self.meta = MetaConfig.model_validate({**meta.model_dump(), **updates})
        except ValidationError as exc:
            raise MetaLearningError(_validation_message(exc, "meta-learning config")) from None
        self.config = config or load_config()
        self.on_trial = on_trial
        self.best_params: dict[str, dict[str, Any]] = {}
        self.best_architecture: NetworkArchitecture | None = None
        self.history: list[dict[str, Any]] = []
        self.online_history: list[dict[str, Any]] = []
        self.adaptations: list[dict[str, Any]] = []
        self._storages: dict[str, optuna.storages.BaseStorage] = {}
        self._next_online: int | None = None
        self._last_study: dict[OptimizationType, str] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- studies

    def options(self, **overrides: Any) -> OptimizationConfig:
        """Search options from the meta section, with any non-None keyword replacing one."""
        return OptimizationConfig.from_meta(self.meta, **overrides)

    def storage(self) -> optuna.storages.BaseStorage:
        url = self.meta.storage_url
        if url not in self._storages:
            self._storages[url] = make_storage(url)
        return self._storages[url]

    def study_name_for(self, kind: OptimizationType | str, task: Any = None, source: str | None = None) -> str:
        """'{study_name}/{task}/{kind}': one study per task and kind, resumed by name.

        A search that starts from a source policy (POLICY, TRANSFER) is '{study_name}/{source}->
        {task}/{kind}': what suits one source policy need not suit another.
        """
        spec = task if isinstance(task, TaskSpec) else resolve_task(task or self.config.train.task)
        target = spec.label if source is None else f"{source}->{spec.label}"
        return f"{self.meta.study_name}/{target}/{OptimizationType(kind).value}"

    def create_study(
        self,
        kind: OptimizationType | str,
        options: OptimizationConfig | None = None,
        task: Any = None,
        seed: int | None = None,
        source: str | None = None,
    ) -> optuna.Study:
        """Create the study, or load it if it exists. With several workers, call it once first.

        The sampler is seeded from ``seed`` (default ``run.seed``) and the number of trials the
        study already holds: one seed repeats a search, a resumed search does not replay the
        trials it already ran, and worker processes given different seeds sample differently.
        """
        kind = OptimizationType(kind)
        options = options or self.options()
        spec = task if isinstance(task, TaskSpec) else resolve_task(task or self.config.train.task)
        name = self.study_name_for(kind, spec, source)
        study = self._open_study(name, options.direction)
        wanted = optuna.study.StudyDirection[options.direction.upper()]
        if study.direction != wanted:
            raise MetaLearningError(
                f"study '{name}' in {self.meta.storage_url} is set to {study.direction.name.lower()}, "
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
        base_seed = self.config.run.seed if seed is None else seed
        sampler_seed = int(np.random.SeedSequence([base_seed, existing]).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(
            n_startup_trials=options.n_startup_trials, seed=sampler_seed, constant_liar=True
        )
        study.pruner = _make_pruner(options)
        return study

    def _open_study(self, name: str, direction: str) -> optuna.Study:
        """create_study(load_if_exists=True), retried: SQLite's first creation races between processes."""
        import sqlalchemy.exc

        last: Exception | None = None
        for attempt in range(6):
            try:
                with _quiet_optuna():
                    return optuna.create_study(
                        storage=self.storage(), study_name=name, direction=direction, load_if_exists=True
                    )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
                last = exc
                self._storages.pop(self.meta.storage_url, None)
                time.sleep(0.1 * 2**attempt)
        raise MetaLearningError(f"cannot create or load study '{name}' in {self.meta.storage_url}: {last}")

    def load_study(self, kind: OptimizationType | str, task: Any = None) -> optuna.Study:
        """An existing study (for plots and reports); a clear error if there is none.

        Without ``task``: the study this manager last searched for ``kind``, else ``train.task``'s.
        """
        kind = OptimizationType(kind)
        name = self._last_study.get(kind) if task is None else None
        name = name or self.study_name_for(kind, task)
        try:
            return optuna.load_study(study_name=name, storage=self.storage())
        except KeyError:
            raise MetaLearningError(f"no study '{name}' in {self.meta.storage_url}") from None

    # ----------------------------------------------------------------- running searches

    def _optimize(
        self,
        kind: OptimizationType,
        spec: TaskSpec,
        objective: Callable[[optuna.Trial], float],
        options: OptimizationConfig,
        progress: SearchProgress | None,
        seed: int,
        source: str | None = None,
    ) -> tuple[optuna.Study, list[int]]:
        """Run the trials; returns the study and the numbers of the trials this call ran."""
        _require_no_running_loop(f"search_{kind.value}", f"optimize_{kind.value}")
        if options.metric == "success_rate" and TaskType.parse(spec.task) is None:
            raise MetaLearningError(f"'{spec.task}' reports no success rate: optimise mean_reward")
        study = self.create_study(kind, options, spec, seed, source)
        self._last_study[kind] = study.study_name
        ran: list[int] = []  # other workers may add trials to the study meanwhile
        callbacks: list[TrialCallback] = []
        if self.on_trial is not None:
            callbacks.append(self.on_trial)
        if progress is not None:
            done = [0]

            def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                with self._lock:
                    done[0] += 1
                    progress(
                        {
                            "done": done[0],
                            "total": options.n_trials,
                            "number": trial.number,
                            "state": trial.state.name.lower(),
                            "value": trial.value,
                            "best_value": _best_value(study),
                        }
                    )

            callbacks.append(report)

        def guarded(trial: optuna.Trial) -> float:
            with self._lock:
                ran.append(trial.number)
            try:
                return objective(trial)
            except RuntimeError as exc:  # recorded, the study goes on (torch errors, OOM, ...)
                trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
                log.warning("trial %d of %s failed: %s", trial.number, study.study_name, exc)
                raise

        with _quiet_optuna():
            study.optimize(
                guarded,
                n_trials=options.n_trials,
                timeout=options.timeout,
                n_jobs=options.n_jobs,
                callbacks=callbacks,
                catch=(RuntimeError,),
            )
        return study, ran

    def _summarise(
        self, kind: OptimizationType, spec: TaskSpec, study: optuna.Study, ran: list[int]
    ) -> SearchResult:
        trials = study.get_trials(deepcopy=False)
        states = optuna.trial.TrialState
        finished = [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
        complete = [t for t in trials if t.state == states.COMPLETE]
        best = study.best_trial if complete else None
        return SearchResult(
            kind=kind,
            study_name=study.study_name,
            task=spec.label,
            storage_url=self.meta.storage_url,
            direction=study.direction.name.lower(),
            best_value=best.value if best else None,
            best_params=dict(best.params) if best else {},
            best_config={},
            trials_total=len(trials),
            trials_run=len(ran),
            trials_complete=len(complete),
            trials_pruned=sum(t.state == states.PRUNED for t in trials),
            trials_failed=sum(t.state == states.FAIL for t in trials),
            trials_diverged=sum("diverged" in t.user_attrs for t in trials),
            steps_trained=sum(int(t.user_attrs.get("steps_trained", 0)) for t in finished),
            steps_unpruned=sum(int(t.user_attrs.get("planned_steps", 0)) for t in finished),
            trials=[_trial_record(t) for t in trials[-500:]],
        )

    def _record(self, result: SearchResult) -> None:
        with self._lock:
            self.history.append(result.to_dict())

    def search_hyperparameters(
        self,
        task: Any = None,
        options: OptimizationConfig | None = None,
        *,
        config: Config | None = None,
        task_params: Any = None,
        progress: SearchProgress | None = None,
    ) -> SearchResult:
        """Blocking search over the spec's hyperparameters on one task (default: ``train.task``)."""
        spec = resolve_task(task or (config or self.config).train.task, task_params)
        # Trials start from the task's own settings (its profile), as `lagent train --task` would.
        base = config_for_task(config or self.config, spec.task)
        options = options or self.options()
        eval_seed = base.run.seed + base.evaluate.seed_offset

        def objective(trial: optuna.Trial) -> float:
            trial_config = with_overrides(
                base, run={"seed": base.run.seed + trial.number}, **sample_hyperparameters(trial)
            )
            return run_trial(trial, spec, trial_config, options, eval_seed=eval_seed)

        study, ran = self._optimize(
            OptimizationType.HYPERPARAMETERS, spec, objective, options, progress, base.run.seed
        )
        result = self._summarise(OptimizationType.HYPERPARAMETERS, spec, study, ran)
        if result.best_params:
            result.best_config = {"train": {"task": spec.task}}
            for section, values in hyperparameters_as_params(result.best_params).items():
                result.best_config.setdefault(section, {}).update(values)
            self.best_params = hyperparameters_as_params(result.best_params)
        self._record(result)
        return result

    def search_architecture(
        self,
        task: Any = None,
        input_dim: int | None = None,
        output_dim: int | None = None,
        options: OptimizationConfig | None = None,
        *,
        config: Config | None = None,
        task_params: Any = None,
        progress: SearchProgress | None = None,
    ) -> SearchResult:
        """Blocking search over layers, units per layer, dropout and activation."""
        spec = resolve_task(task or (config or self.config).train.task, task_params)
        base = config_for_task(config or self.config, spec.task)
        obs_dim, n_actions = task_spaces(spec.task)
        input_dim = obs_dim if input_dim is None else int(input_dim)
        output_dim = n_actions if output_dim is None else int(output_dim)
        if (input_dim, output_dim) != (obs_dim, n_actions):
            raise MetaLearningError(
                f"task '{spec.task}' has {obs_dim} observation features and {n_actions} actions, "
                f"not input_dim={input_dim} and output_dim={output_dim}"
            )
        options = options or self.options()
        eval_seed = base.run.seed + base.evaluate.seed_offset

        def objective(trial: optuna.Trial) -> float:
            architecture = sample_architecture(trial, input_dim, output_dim)
            trial_config = with_overrides(base, run={"seed": base.run.seed + trial.number})
            return run_trial(trial, spec, trial_config, options, architecture, eval_seed=eval_seed)

        study, ran = self._optimize(OptimizationType.ARCHITECTURE, spec, objective, options, progress, base.run.seed)
        result = self._summarise(OptimizationType.ARCHITECTURE, spec, study, ran)
        if result.best_params:
            self.best_architecture = architecture_from_params(result.best_params, input_dim, output_dim)
            result.best_architecture = self.best_architecture
            result.best_config = {"train": {"task": spec.task}, **architecture_as_params(self.best_architecture)}
        self._record(result)
        return result

    def search_policy(
        self,
        source: Any,
        task: Any = None,
        options: OptimizationConfig | None = None,
        *,
        config: Config | None = None,
        task_params: Any = None,
        trainer: TrainingManager | None = None,
        progress: SearchProgress | None = None,
    ) -> SearchResult:
        """Blocking search over how ``source``'s policy is fine-tuned on ``task`` (policy adaptation).

        Each trial moves the source policy to the task as :meth:`adapt` does (with this manager's
        transfer settings) and fine-tunes it with sampled settings; ``best_config`` is a params
        overlay for ``lagent adapt --params``. ``source`` is what :meth:`adapt` accepts.
        """
        return self._search_from_source(
            OptimizationType.POLICY, source, task, options, config, task_params, trainer, progress
        )

    def search_transfer(
        self,
        source: Any,
        task: Any = None,
        options: OptimizationConfig | None = None,
        *,
        config: Config | None = None,
        task_params: Any = None,
        trainer: TrainingManager | None = None,
        progress: SearchProgress | None = None,
    ) -> SearchResult:
        """Blocking search over what ``source``'s policy hands over to ``task`` (knowledge transfer):
        which layers are copied (including none: the from-scratch baseline) and whether the weights
        of shared inputs and actions are kept. Fine-tuning uses the configuration's settings."""
        return self._search_from_source(
            OptimizationType.TRANSFER, source, task, options, config, task_params, trainer, progress
        )

    def _search_from_source(
        self,
        kind: OptimizationType,
        source: Any,
        task: Any,
        options: OptimizationConfig | None,
        config: Config | None,
        task_params: Any,
        trainer: TrainingManager | None,
        progress: SearchProgress | None,
    ) -> SearchResult:
        policy, label = self._source_policy(source, trainer)
        spec = resolve_task(task or (config or self.config).train.task, task_params)
        # The configuration adapt() fine-tunes with, so that what is found applies to it.
        base = config or (trainer.config if trainer is not None else policy.config)
        base = with_overrides(base, train={"task": spec.task})
        options = options or self.options()
        eval_seed = base.run.seed + base.evaluate.seed_offset

        def objective(trial: optuna.Trial) -> float:
            overlay = sample_policy_adaptation(trial) if kind is OptimizationType.POLICY else sample_transfer(trial)
            meta = self.meta.model_copy(update=overlay.get("meta", {}))
            epsilon = meta.adapt_epsilon_start
            train = {**overlay.get("train", {}), **({"epsilon_start": epsilon} if epsilon is not None else {})}
            trial_config = with_overrides(base, run={"seed": base.run.seed + trial.number}, train=train)
            adapted, *_ = transfer_policy(
                policy, spec.task, trial_config, match=meta.adapt_match_features, layers=meta.adapt_transfer_layers
            )
            return run_trial(trial, spec, trial_config, options, eval_seed=eval_seed, agent=adapted)

        study, ran = self._optimize(kind, spec, objective, options, progress, base.run.seed, source_name(label))
        result = self._summarise(kind, spec, study, ran)
        if result.best_params:
            result.best_config = _trial_overlay(kind, result.best_params)
        self._record(result)
        return result

    def search(
        self, kind: OptimizationType | str, task: Any = None, *, source: Any = None, **kwargs: Any
    ) -> SearchResult:
        """Run the search of any :class:`OptimizationType` (``source`` is needed by POLICY and TRANSFER)."""
        kind = OptimizationType(kind)
        if kind in _FROM_SOURCE:
            if source is None:
                raise MetaLearningError(f"a {kind.value} search starts from a source policy: pass source=")
            search = self.search_policy if kind is OptimizationType.POLICY else self.search_transfer
            return search(source, task, **kwargs)
        if source is not None:
            raise MetaLearningError(f"a {kind.value} search trains fresh agents: it takes no source policy")
        if kind is OptimizationType.HYPERPARAMETERS:
            return self.search_hyperparameters(task, **kwargs)
        return self.search_architecture(task, **kwargs)

    async def optimize_hyperparameters(self, task: Any = None, **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Async form of :meth:`search_hyperparameters`: the best values as a params.yaml overlay.

        The study runs in a worker thread, so the caller's event loop stays free.
        """
        result = await asyncio.to_thread(self.search_hyperparameters, task, **kwargs)
        return hyperparameters_as_params(result.best_params) if result.best_params else {}

    async def optimize_architecture(
        self, task: Any = None, input_dim: int | None = None, output_dim: int | None = None, **kwargs: Any
    ) -> NetworkArchitecture | None:
        """Async form of :meth:`search_architecture`: the best architecture (None if no trial completed)."""
        result = await asyncio.to_thread(self.search_architecture, task, input_dim, output_dim, **kwargs)
        return result.best_architecture

    # ----------------------------------------------------------------- outputs

    def write_plots(self, kind: OptimizationType | str, directory: str | Path, task: Any = None) -> dict[str, str]:
        """Optuna's optimisation history, parameter importances and intermediate values (HTML).

        The HTML files share one ``plotly.min.js`` in the same directory, so they open offline.
        """
        return _write_plots(self.load_study(kind, task), directory)

    def write_results(self, result: SearchResult, directory: str | Path, plots: bool = True) -> dict[str, str]:
        """``best_params.yaml`` (a params.yaml overlay), ``result.json``, ``trials.csv`` and the plots."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        artifacts: dict[str, str] = {}
        if result.best_config:
            path = directory / "best_params.yaml"
            command = "adapt --source SOURCE --task TASK" if result.kind in _FROM_SOURCE else "train"
            header = (
                f"# Best trial of study '{result.study_name}' ({result.storage_url}): "
                f"{self.meta.optimization_metric} {result.best_value:.4g} after {result.trials_total} trials.\n"
                f"# Apply it with: lagent {command} --params {path}\n"
            )
            path.write_text(header + yaml.safe_dump(result.best_config, sort_keys=False))
            artifacts["best_params"] = str(path)
        study = optuna.load_study(study_name=result.study_name, storage=self.storage())
        frame = study.trials_dataframe()
        if not frame.empty:
            frame.to_csv(directory / "trials.csv", index=False)
            artifacts["trials"] = str(directory / "trials.csv")
        if plots:
            artifacts.update(_write_plots(study, directory))
        result.artifacts.update(artifacts)
        path = directory / "result.json"
        result.artifacts["result"] = str(path)
        path.write_text(json.dumps(_jsonable(result.to_dict()), indent=2) + "\n")
        return result.artifacts

    # ----------------------------------------------------------------- policy adaptation

    def adapt(
        self,
        source: Any,
        target_task: Any,
        *,
        timesteps: int | None = None,
        trainer: TrainingManager | None = None,
        config: Config | None = None,
        target_params: Any = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        run_dir: str | Path | None = None,
        eval_episodes: int | None = None,
        progress: PhaseProgress | None = None,
        source_label: str | None = None,
    ) -> AdaptationResult:
        """Move a policy to ``target_task``: transfer what fits, fine-tune, compare with scratch.

        ``source`` is a run directory, a checkpoint file, a ``LearningAgent``, or a task name
        whose policy is ``trainer``'s agent (the trainer must have learned that task). Layers
        whose shapes differ on the target (input and output layers, when the observation or
        action sizes change) start from a fresh initialisation. The from-scratch baseline has the
        same architecture, seed, configuration and step budget; the configuration is ``config``,
        else the trainer's, else the source checkpoint's, with ``overrides`` (by section) on top.
        With ``run_dir`` the fine-tuned run is saved there (checkpoints, episode log,
        ``adaptation.json``).
        """
        from agent.training import TrainingManager

        _require_no_running_loop("adapt", "adapt_to_new_task")
        agent, label = self._source_policy(source, trainer)
        source_label = source_label or label
        spec = resolve_task(target_task, target_params)
        steps = int(timesteps or self.meta.adapt_timesteps)
        if steps < 1:
            raise MetaLearningError(f"adaptation needs a positive step budget, got {steps}")
        base = config or (trainer.config if trainer is not None else agent.config)
        # Sections of the learning configuration only: a params file's ``meta`` is this manager's.
        sections = {
            name: dict(values) for name, values in (overrides or {}).items() if name in Config.model_fields
        }
        sections["train"] = {
            **sections.get("train", {}), "task": spec.task, "eval_frequency": 0, "final_model": "last"
        }
        cfg = with_overrides(base, **sections)
        adapted, transferred, reinitialized, partial = transfer_policy(
            agent, spec.task, cfg, match=self.meta.adapt_match_features, layers=self.meta.adapt_transfer_layers
        )
        obs_dim, n_actions, architecture = adapted.input_size, adapted.output_size, adapted.architecture
        episodes = eval_episodes or cfg.evaluate.episodes
        seed = cfg.run.seed + cfg.evaluate.seed_offset

        def phase(name: str) -> Callable[[Mapping[str, float]], None] | None:
            return None if progress is None else (lambda info: progress(name, info))

        async def run() -> AdaptationResult:
            epsilon = self.meta.adapt_epsilon_start
            tuned = TrainingManager(
                adapted,
                task_type=spec.task,
                task_params=spec.task_params,
                training_config={"epsilon_start": epsilon} if epsilon is not None else None,
                run_dir=run_dir,
                tensorboard=False,
            )
            scratch = TrainingManager(
                LearningAgent(obs_dim, n_actions, config=cfg, architecture=architecture),
                task_type=spec.task,
                task_params=spec.task_params,
                tensorboard=False,
            )
            try:
                zero_shot = None
                if not reinitialized:
                    zero_shot, _ = await tuned.evaluate(num_episodes=episodes, seed=seed)
                await tuned.train(total_timesteps=steps, progress=phase("adapted"))
                adapted_mean, adapted_std = await tuned.evaluate(num_episodes=episodes, seed=seed)
                adapted_success = tuned.last_evaluation.get("success_rate")
                await scratch.train(total_timesteps=steps, progress=phase("scratch"))
                scratch_mean, scratch_std = await scratch.evaluate(num_episodes=episodes, seed=seed)
                scratch_success = scratch.last_evaluation.get("success_rate")
            finally:
                tuned.close()
                scratch.close()
            return AdaptationResult(
                source=source_label,
                target_task=spec.label,
                timesteps=steps,
                transferred=transferred,
                reinitialized=reinitialized,
                partially_transferred=partial,
                adapted_reward=adapted_mean,
                adapted_std=adapted_std,
                scratch_reward=scratch_mean,
                scratch_std=scratch_std,
                zero_shot_reward=zero_shot,
                adapted_success_rate=adapted_success,
                scratch_success_rate=scratch_success,
                eval_episodes=episodes,
                run_dir=str(run_dir) if run_dir is not None else None,
                agent=adapted,
            )

        with preserved_torch_rng():  # leave the caller's torch RNG where it was
            result = asyncio.run(run())
        if run_dir is not None:
            report = json.dumps(_jsonable(result.to_dict()), indent=2)
            Path(run_dir, "adaptation.json").write_text(report + "\n")
        with self._lock:
            self.adaptations.append(result.to_dict())
        log.info(
            "adapted %s -> %s in %d steps: %.3g (scratch %.3g); transferred %s, re-initialised %s",
            source_label, spec.label, steps, result.adapted_reward, result.scratch_reward,
            transferred, reinitialized,
        )
        return result

    async def adapt_to_new_task(self, source_task: Any, target_task: Any, **kwargs: Any) -> AdaptationResult:
        """Async form of :meth:`adapt` (runs in a worker thread)."""
        return await asyncio.to_thread(self.adapt, source_task, target_task, **kwargs)

    def _source_policy(self, source: Any, trainer: TrainingManager | None) -> tuple[LearningAgent, str]:
        if isinstance(source, LearningAgent):
            return source, "agent"
        text = str(source.value if isinstance(source, enum.Enum) else source)
        path = Path(text)
        if path.exists() or text.endswith(".pt") or "/" in text:
            checkpoint = path / "checkpoints" / "last.pt" if path.is_dir() else path
            if not checkpoint.is_file():
                raise MetaLearningError(f"source {path} holds no policy checkpoint (looked for {checkpoint})")
            return load_policy(checkpoint), str(checkpoint)
        spec = resolve_task(text)
        if trainer is None:
            raise MetaLearningError(
                f"source '{text}' names a task, not a policy: pass a run directory or checkpoint, "
                "or call adapt_to_new_task on the trainer that learned it"
            )
        own = resolve_task(trainer.task, trainer.task_params)
        if not own.same_task(spec):
            raise MetaLearningError(
                f"the trainer learned {own.label}, not {spec.label}: pass the source policy's run "
                "directory or checkpoint instead"
            )
        return trainer.agent, spec.label

    # ----------------------------------------------------------------- periodic optimisation

    def online_due(self, episodes_done: int, interval: int) -> bool:
        """True once per ``interval`` episodes (at multiples of it), for ``train(optimize_interval=...)``."""
        if interval < 1:
            raise ValueError(f"optimize_interval must be >= 1, got {interval}")
        if self._next_online is None:
            self._next_online = (episodes_done // interval + 1) * interval
        if episodes_done < self._next_online:
            return False
        self._next_online = (episodes_done // interval + 1) * interval
        return True

    async def optimize_online(self, trainer: TrainingManager) -> dict[str, Any]:
        """One periodic optimisation: try settings on copies of the live agent, apply the best.

        Candidates (``meta.online_trials`` of them, plus the unchanged settings as a baseline)
        each continue a copy of the live agent (weights, optimiser, replay buffer, epsilon) for
        ``meta.online_timesteps`` steps on fresh environments with the same seed, and are scored
        by the same greedy evaluation. A candidate replaces the live settings only if it beats
        the baseline. Learning rate, gamma, batch size and target-update interval are tried:
        what can change without rebuilding the agent.
        """
        live = trainer.config.train
        current = {
            "learning_rate": live.learning_rate,
            "gamma": live.gamma,
            "batch_size": live.batch_size,
            "target_update_interval": live.target_update_interval,
        }
        seed = trainer.config.run.seed + trainer.episodes_done
        metric = self.meta.optimization_metric if TaskType.parse(trainer.task) is not None else "mean_reward"
        eval_seed = trainer.config.run.seed + trainer.config.evaluate.seed_offset + 2000
        with _quiet_optuna():
            study = optuna.create_study(
                direction=self.meta.direction,
                sampler=optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=max(1, self.meta.online_trials // 2)
                ),
            )
            study.enqueue_trial(current)
        candidates: list[dict[str, Any]] = []
        started = time.perf_counter()
        for _ in range(self.meta.online_trials + 1):
            trial = study.ask()
            params = sample_online(trial, current)
            try:
                value, error = await _train_candidate(
                    trainer, params, self.meta.online_timesteps, self.meta.eval_episodes, seed, eval_seed, metric
                )
            except TrainingDivergedError:
                with _quiet_optuna():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                candidates.append({"params": params, "value": None, "stderr": None, "diverged": True})
                continue
            with _quiet_optuna():
                study.tell(trial, value)
            candidates.append({"params": params, "value": value, "stderr": error})
        baseline = candidates[0]
        best = max(
            (c for c in candidates[1:] if c["value"] is not None),
            key=lambda c: c["value"] if self.meta.direction == "maximize" else -c["value"],
            default=None,
        )
        # Evaluations are noisy: a candidate must beat the baseline by more than one standard
        # error of the difference, else the settings would drift with the noise.
        applied = best is not None and (
            baseline["value"] is None
            or _better(best["value"], baseline["value"], self.meta.direction)
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
            "steps": len(candidates) * self.meta.online_timesteps,
            "seconds": time.perf_counter() - started,
        }
        with self._lock:
            self.online_history.append(record)
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

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything the searches found, in plain data (checkpoints load with weights_only=True)."""
        with self._lock:
            return _jsonable(
                {
                    "meta": self.meta.model_dump(),
                    "best_params": self.best_params,
                    "best_architecture": self.best_architecture.to_dict() if self.best_architecture else None,
                    "history": self.history,
                    "online_history": self.online_history,
                    "adaptations": self.adaptations,
                    "next_online": self._next_online,
                }
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            defaults = self.meta.model_dump()
            saved = {k: v for k, v in dict(state["meta"]).items() if k in defaults}
            self.meta = MetaConfig.model_validate({**defaults, **saved})
            self.best_params = {k: dict(v) for k, v in dict(state["best_params"]).items()}
            arch = state.get("best_architecture")
            self.best_architecture = NetworkArchitecture.from_dict(dict(arch)) if arch else None
            self.history = list(state.get("history", []))
            self.online_history = list(state.get("online_history", []))
            self.adaptations = list(state.get("adaptations", []))
            self._next_online = state.get("next_online")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"meta-learning state does not fit: {exc}") from None


# --------------------------------------------------------------------------- helpers


def _require_no_running_loop(blocking: str, awaitable: str) -> None:
    """Trials run their own event loops: a blocking call from inside a loop would fail every trial."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise MetaLearningError(f"{blocking}() blocks and cannot run inside an event loop: await {awaitable}() instead")


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial at INFO; our callers report progress themselves."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _make_pruner(options: OptimizationConfig) -> optuna.pruners.BasePruner:
    if options.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.n_startup_trials, n_warmup_steps=0)
    if options.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=options.eval_interval, max_resource=options.trial_timesteps, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _fmt_value(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.3g}"


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return None


def _trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": dict(trial.params),
        "steps": int(trial.user_attrs.get("steps_trained", 0)),
        **({"diverged": True} if "diverged" in trial.user_attrs else {}),
        **({"error": trial.user_attrs["error"]} if "error" in trial.user_attrs else {}),
    }


def _write_plots(study: optuna.Study, directory: str | Path) -> dict[str, str]:
    """Optuna's optimisation history, parameter importances and intermediate values as HTML files."""
    import optuna.visualization as vis

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    plots = {
        "optimization_history": vis.plot_optimization_history,
        "param_importances": vis.plot_param_importances,
        "intermediate_values": vis.plot_intermediate_values,
    }
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # importances warn when few trials separate
                figure = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances need 2+ trials
            log.info("no %s plot: %s", name, exc)
            continue
        path = directory / f"{name}.html"
        figure.write_html(str(path), include_plotlyjs="directory")
        written[name] = str(path)
    return written


def _jsonable(value: Any) -> Any:
    """Plain data: enums to values, tuples to lists, numpy scalars to numbers."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def load_policy(path: str | Path) -> LearningAgent:
    """The Q-network of a checkpoint, in an agent built with the checkpoint's own configuration."""
    document = load_checkpoint_file(path)
    try:
        config = config_from_dict(document["config"], source=str(path))
        architecture = NetworkArchitecture.from_dict(document["agent"]["architecture"])
        check_buffer_size(config.replay.local_buffer_size, architecture.input_dim, path)
        agent = LearningAgent(
            architecture.input_dim, architecture.output_dim, config=config, architecture=architecture
        )
        agent.q_network.load_state_dict(document["agent"]["q_network"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: checkpoint holds no usable policy: {exc}") from None
    agent.update_target_network()
    return agent


IndexPairs = tuple[list[int], list[int]]  # (source indices, target indices) of the same meaning


@dataclass(frozen=True)
class FeatureMatch:
    """Which observation features and actions two tasks share, by name (see ``match_features``)."""

    inputs: IndexPairs
    actions: IndexPairs
    shared_inputs: list[str]


def match_features(source_task: Any, target_task: Any) -> FeatureMatch | None:
    """Observation slots (same name and size) and actions (same label) two task types share.

    The planar tasks share their first 17 observation floats (position, velocity, obstacle,
    range sensors, ...) and their 8 headings, so a navigation policy's input weights for those
    still mean something on exploration. None when either task has no such description (a
    Gymnasium env id): then only layers of identical shape transfer.
    """
    described = []
    for task in (source_task, target_task):
        envs = make_vector_env(task, 1)
        try:
            describe = getattr(envs, "describe", None)
            described.append(describe() if describe is not None else None)
        finally:
            envs.close()
    source, target = described
    if source is None or target is None:
        return None
    slots = {name: (start, stop) for name, start, stop in source["observation"]}
    inputs: IndexPairs = ([], [])
    shared = []
    for name, start, stop in target["observation"]:
        if name in slots and slots[name][1] - slots[name][0] == stop - start:
            inputs[0].extend(range(*slots[name]))
            inputs[1].extend(range(start, stop))
            shared.append(name)
    labels = {label: i for i, label in enumerate(source["actions"])}
    actions: IndexPairs = ([], [])
    for j, label in enumerate(target["actions"]):
        if label in labels:
            actions[0].append(labels[label])
            actions[1].append(j)
    return FeatureMatch(inputs, actions, shared)


def _fits(pairs: IndexPairs, source_size: int, target_size: int) -> bool:
    """Non-empty, and every index inside its layer (a policy whose config names another task's
    layout than the one it was built for must not be copied into by that layout)."""
    return bool(pairs[0]) and max(pairs[0]) < source_size and max(pairs[1]) < target_size


def transfer_weights(
    source: torch.nn.Module,
    target: torch.nn.Module,
    match: FeatureMatch | None = None,
    layers: TransferLayers = "all",
) -> tuple[list[str], list[str], dict[str, str]]:
    """Copy every layer of ``source`` whose tensors all fit ``target``; the rest keep their init.

    Layer by layer, not tensor by tensor: an input layer whose weight no longer fits is
    re-initialised whole, bias included, unless ``match`` names the inputs (or, for the output
    layer, the actions) both tasks share. Then the input layer keeps the source's weights for the
    shared inputs and its bias, and starts the new inputs at zero weight, so the transferred
    features start as they were and the new inputs are learned into them; the output layer keeps
    the rows of the shared actions. Returns (transferred layers, re-initialised layers, and for
    each partly transferred layer, which is also in the second list, what it kept).
    ``layers`` limits what is copied at all: 'body' copies the hidden layers only, 'none' nothing.
    """
    source_state = source.state_dict()
    if layers != "all":
        source_state = {n: v for n, v in source_state.items() if layers == "body" and n.startswith("body.")}
    target_state = target.state_dict()
    layers: dict[str, list[str]] = {}
    for name in target_state:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    first, last = next(iter(layers)), next(reversed(layers))
    transferred, reinitialized, partial = [], [], {}
    for layer, names in layers.items():
        if all(n in source_state and source_state[n].shape == target_state[n].shape for n in names):
            for n in names:
                target_state[n] = source_state[n].detach().clone()
            transferred.append(layer)
            continue
        reinitialized.append(layer)
        weight, bias = f"{layer}.weight", f"{layer}.bias"
        if match is None or weight not in source_state or bias not in source_state:
            continue
        old_w, new_w = source_state[weight], target_state[weight].clone()
        if layer == first and _fits(match.inputs, old_w.shape[1], new_w.shape[1]) and old_w.shape[0] == new_w.shape[0]:
            new_w.zero_()
            new_w[:, match.inputs[1]] = old_w[:, match.inputs[0]]
            target_state[weight], target_state[bias] = new_w, source_state[bias].detach().clone()
            partial[layer] = f"{len(match.inputs[1])} of {new_w.shape[1]} inputs ({', '.join(match.shared_inputs)})"
        elif layer == last and _fits(match.actions, old_w.shape[0], new_w.shape[0]) and old_w.shape[1] == new_w.shape[1]:
            new_b = target_state[bias].clone()
            new_w[match.actions[1]] = old_w[match.actions[0]]
            new_b[match.actions[1]] = source_state[bias][match.actions[0]]
            target_state[weight], target_state[bias] = new_w, new_b
            partial[layer] = f"{len(match.actions[1])} of {new_w.shape[0]} actions"
    target.load_state_dict(target_state)  # in place: views of the weights stay valid
    return transferred, reinitialized, partial


def transfer_policy(
    source: LearningAgent,
    task: str,
    config: Config,
    *,
    match: bool = True,
    layers: TransferLayers = "all",
) -> tuple[LearningAgent, list[str], list[str], dict[str, str]]:
    """A new agent for ``task`` (built with ``config``, the source's hidden layers resized to the
    task) that starts from what ``source``'s policy hands over; see :func:`transfer_weights`.

    Returns the agent and transfer_weights's (transferred, re-initialised, partly kept) layers.
    """
    obs_dim, n_actions = task_spaces(task)
    architecture = dataclasses.replace(source.architecture, input_dim=obs_dim, output_dim=n_actions)
    adapted = LearningAgent(obs_dim, n_actions, config=config, architecture=architecture)
    shared = match_features(source.config.train.task, task) if match else None
    transferred, reinitialized, partial = transfer_weights(source.q_network, adapted.q_network, shared, layers)
    adapted.update_target_network()
    return adapted, transferred, reinitialized, partial


def source_name(label: str) -> str:
    """A short name of a source policy for study names: a checkpoint's run directory, else the label."""
    path = Path(label)
    if path.suffix == ".pt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run.name or path.stem
    return label


def clone_agent(agent: LearningAgent, config: Config | None = None) -> LearningAgent:
    """An independent copy of an agent (weights, optimiser, buffer, RNG), optionally with another config."""
    copy = LearningAgent(
        agent.input_size, agent.output_size, config=config or agent.config, architecture=agent.architecture
    )
    copy.load_state_dict(agent.state_dict(include_buffer=True))
    copy.set_learning_rate((config or agent.config).train.learning_rate)
    return copy


ONLINE_KEYS = ("learning_rate", "gamma", "batch_size", "target_update_interval")


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


def apply_live_hyperparameters(trainer: TrainingManager, values: Mapping[str, Any]) -> None:
    """Change learning settings of a live trainer and its agent (no rebuild needed for these)."""
    unknown = set(values) - set(ONLINE_KEYS)
    if unknown:
        raise MetaLearningError(f"{sorted(unknown)} cannot change during training; only {list(ONLINE_KEYS)}")
    trainer.config = with_overrides(trainer.config, train=dict(values))
    trainer.agent.config = trainer.config
    trainer.agent.set_learning_rate(trainer.config.train.learning_rate)


async def _train_candidate(
    trainer: TrainingManager,
    params: Mapping[str, Any],
    timesteps: int,
    eval_episodes: int,
    seed: int,
    eval_seed: int,
    metric: str,
) -> tuple[float, float]:
    """Continue a copy of the live agent with ``params``; (metric, its standard error)."""
    from agent.training import TrainingManager

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
    candidate = TrainingManager(
        clone_agent(trainer.agent, config),
        task_type=trainer.task,
        task_params=trainer.task_params,
        reward_config=trainer.reward_config,
        tensorboard=False,
    )
    try:
        with preserved_torch_rng():
            await candidate.train(total_timesteps=timesteps)
            await candidate.evaluate(num_episodes=eval_episodes, seed=eval_seed)
        value = _metric_value(candidate, metric)
        n = candidate.last_evaluation["episodes"]
        if metric == "success_rate":
            spread = math.sqrt(value * (1 - value))
        else:
            spread = candidate.last_evaluation["std_reward"]
        return value, spread / math.sqrt(max(n, 1))
    finally:
        candidate.close()
