"""Meta-learning: Optuna searches over hyperparameters and architectures, and policy adaptation.

A trial builds a fresh agent from sampled values, trains it in chunks and reports a greedy
evaluation after each chunk; the median pruner stops trials that fall behind, and a trial whose
loss turns NaN is pruned rather than crashing the study. Studies live in an Optuna storage (SQLite
by default, any RDB URL, or ``journal:PATH`` for several processes on one machine), so running
the same study name again resumes it and several workers can share it.

Nothing here knows about MLflow or Prefect: callers pass ``on_trial`` to observe finished trials.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import torch
from pydantic import BaseModel, ConfigDict, Field

from agent.config import Config, load_config, load_raw, register_section, with_overrides
from agent.dqn import LearningAgent, TrainingDivergedError
from agent.network import NetworkArchitecture

log = logging.getLogger(__name__)

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


class OptimizationType(str, enum.Enum):
    HYPERPARAMETERS = "hyperparameters"
    ARCHITECTURE = "architecture"
    POLICY = "policy"
    TRANSFER = "transfer"


class MetaConfig(BaseModel):
    """The ``meta`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    storage_url: str
    """Optuna storage: sqlite:///file.db, an RDB URL (postgresql://...), or journal:PATH."""
    study_name: str = Field(min_length=1)
    """Studies are named '{study_name}/{kind}', so each search kind keeps its own history."""
    optimization_metric: Literal["mean_reward"]
    """What a trial returns: the mean greedy reward of its final evaluation."""
    direction: Literal["maximize", "minimize"]
    """Whether the metric is to be maximised or minimised."""
    n_trials: int = Field(ge=1)
    """Trials per search (on top of those the study already has)."""
    timeout: float | None = Field(gt=0)
    """Seconds after which a search starts no new trial (null: no limit)."""
    pruner: Literal["median", "none"]
    """'median' stops a trial whose intermediate value falls below the median of earlier trials."""
    n_startup_trials: int = Field(ge=0)
    """Trials that run unpruned (and are sampled at random) before TPE and pruning start."""
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
    online_trials: int = Field(ge=1)
    """Candidates tried by each periodic optimisation during training."""
    online_timesteps: int = Field(ge=1)
    """Steps each periodic-optimisation candidate trains from a copy of the live agent."""


register_section("meta", MetaConfig)


@dataclass(frozen=True)
class OptimizationConfig:
    """How one search runs (defaults: the ``meta`` section of params.yaml)."""

    n_trials: int = 20
    timeout: float | None = None
    metric: str = "mean_reward"
    direction: Literal["maximize", "minimize"] = "maximize"
    pruner: Literal["median", "none"] = "median"
    n_startup_trials: int = 5
    n_jobs: int = 1
    trial_timesteps: int = 20_000
    eval_interval: int = 5_000
    eval_episodes: int = 5

    @classmethod
    def from_meta(cls, meta: MetaConfig, **overrides: Any) -> OptimizationConfig:
        values = {
            "n_trials": meta.n_trials,
            "timeout": meta.timeout,
            "metric": meta.optimization_metric,
            "direction": meta.direction,
            "pruner": meta.pruner,
            "n_startup_trials": meta.n_startup_trials,
            "n_jobs": meta.n_jobs,
            "trial_timesteps": meta.trial_timesteps,
            "eval_interval": meta.eval_interval,
            "eval_episodes": meta.eval_episodes,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def load_meta_config(params_files=(), overrides=()) -> MetaConfig:
    return MetaConfig.model_validate(load_raw(params_files, overrides)["meta"])


# --------------------------------------------------------------------------- search spaces


def sample_hyperparameters(trial: optuna.Trial) -> dict[str, dict[str, Any]]:
    """The spec's list: learning rate, batch size, gamma, update frequencies, buffer size, network."""
    return {
        "train": {
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
            "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
            "gamma": trial.suggest_categorical("gamma", [0.9, 0.95, 0.98, 0.99, 0.995]),
            "target_update_interval": trial.suggest_categorical("target_update_interval", [10, 100, 250, 500, 1000]),
            "train_freq": trial.suggest_categorical("train_freq", [1, 4, 8, 16]),
        },
        "replay": {"local_buffer_size": trial.suggest_categorical("local_buffer_size", [1000, 10_000, 50_000])},
        "network": {
            "hidden_size": trial.suggest_categorical("hidden_size", [64, 128, 256]),
            "num_hidden_layers": trial.suggest_int("num_hidden_layers", 1, 3),
        },
    }


def sample_architecture(trial: optuna.Trial, input_dim: int, output_dim: int) -> NetworkArchitecture:
    """Layers, units per layer, dropout and activation."""
    n_layers = trial.suggest_int("n_layers", 1, 4)
    units = tuple(trial.suggest_categorical(f"units_{i}", [32, 64, 128, 256, 512]) for i in range(n_layers))
    return NetworkArchitecture(
        input_dim=input_dim,
        output_dim=output_dim,
        hidden_layers=units,
        activation=trial.suggest_categorical("activation", ["relu", "tanh", "elu", "leaky_relu", "silu", "gelu"]),
        dropout=trial.suggest_float("dropout", 0.0, 0.3),
    )


def architecture_from_params(params: Mapping[str, Any], input_dim: int, output_dim: int) -> NetworkArchitecture:
    n_layers = int(params["n_layers"])
    return NetworkArchitecture(
        input_dim=input_dim,
        output_dim=output_dim,
        hidden_layers=tuple(int(params[f"units_{i}"]) for i in range(n_layers)),
        activation=str(params["activation"]),
        dropout=float(params["dropout"]),
    )


def hyperparameters_as_params(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A flat Optuna parameter dict as a params.yaml-shaped overlay."""
    sections = {"train": {}, "replay": {}, "network": {}}
    for key, value in params.items():
        if key == "local_buffer_size":
            sections["replay"][key] = value
        elif key in ("hidden_size", "num_hidden_layers"):
            sections["network"][key] = value
        else:
            sections["train"][key] = value
    return {k: v for k, v in sections.items() if v}


# --------------------------------------------------------------------------- storage


def make_storage(url: str) -> str | optuna.storages.BaseStorage:
    """An Optuna storage from a URL; ``journal:PATH`` selects the journal-file backend."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:").removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url


# --------------------------------------------------------------------------- results


@dataclass
class SearchResult:
    kind: OptimizationType
    study_name: str
    best_value: float | None
    best_params: dict[str, Any]
    trials_complete: int
    trials_pruned: int
    trials_failed: int
    steps_trained: int
    best_architecture: NetworkArchitecture | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["best_architecture"] = self.best_architecture.to_dict() if self.best_architecture else None
        return data


# --------------------------------------------------------------------------- the manager


class MetaLearningManager:
    """Runs and remembers searches: hyperparameters, architectures, policy adaptation.

    ``base_config`` holds keys of the ``meta`` section (the spec's ``optimization_metric`` and
    ``storage_url`` among them); everything else comes from params.yaml.
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
        self.meta = MetaConfig.model_validate({**meta.model_dump(), **updates})
        self.config = config or load_config()
        self.on_trial = on_trial
        self.best_params: dict[str, dict[str, Any]] = {}
        self.best_architecture: NetworkArchitecture | None = None
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- studies

    def study_name_for(self, kind: OptimizationType) -> str:
        return f"{self.meta.study_name}/{kind.value}"

    def create_study(self, kind: OptimizationType, options: OptimizationConfig | None = None) -> optuna.Study:
        """Create the study, or load it if it exists: call once before starting workers."""
        options = options or OptimizationConfig.from_meta(self.meta)
        pruner: optuna.pruners.BasePruner = (
            optuna.pruners.MedianPruner(n_startup_trials=options.n_startup_trials, n_warmup_steps=0)
            if options.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=options.n_startup_trials, seed=self.config.run.seed, constant_liar=True
        )
        return optuna.create_study(
            storage=make_storage(self.meta.storage_url),
            study_name=self.study_name_for(kind),
            direction=options.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )

    # ----------------------------------------------------------------- trials

    def _run_trial(
        self,
        trial: optuna.Trial,
        task: str,
        config: Config,
        options: OptimizationConfig,
        task_params: Any,
        architecture: NetworkArchitecture | None,
    ) -> float:
        """Train in chunks, report each evaluation, prune laggards and diverged runs."""
        from agent.training import TrainingManager
        from agent.tasks import task_spaces

        obs_dim, n_actions = task_spaces(task) if architecture is None else (architecture.input_dim, architecture.output_dim)
        config = with_overrides(config, run={"seed": config.run.seed + trial.number}, train={"eval_frequency": 0, "final_model": "last"})
        agent = LearningAgent(obs_dim, n_actions, config=config, architecture=architecture)
        trainer = TrainingManager(agent, task_type=task, task_params=task_params, tensorboard=False)
        value = math.nan
        try:
            checkpoints = range(options.eval_interval, options.trial_timesteps + options.eval_interval, options.eval_interval)
            for index, steps in enumerate(checkpoints):
                steps = min(steps, options.trial_timesteps)
                asyncio.run(trainer.train(total_timesteps=steps))
                value, _ = asyncio.run(trainer.evaluate(num_episodes=options.eval_episodes))
                trial.report(value, step=steps)
                if trial.should_prune():
                    trial.set_user_attr("steps_trained", trainer.global_step)
                    raise optuna.TrialPruned(f"evaluation {value:.2f} at step {steps} below the median")
                if steps >= options.trial_timesteps:
                    break
        except TrainingDivergedError as exc:
            trial.set_user_attr("diverged", str(exc))
            trial.set_user_attr("steps_trained", trainer.global_step)
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        finally:
            trainer.close()
        trial.set_user_attr("steps_trained", trainer.global_step)
        return value

    def _optimize(
        self,
        kind: OptimizationType,
        objective: Callable[[optuna.Trial], float],
        options: OptimizationConfig,
        progress: Callable[[int, int], None] | None,
    ) -> optuna.Study:
        study = self.create_study(kind, options)
        callbacks: list[TrialCallback] = []
        if self.on_trial is not None:
            callbacks.append(self.on_trial)
        if progress is not None:
            done = [0]

            def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                done[0] += 1
                progress(done[0], options.n_trials)

            callbacks.append(report)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=options.n_trials, timeout=options.timeout, n_jobs=options.n_jobs, callbacks=callbacks)
        return study

    def _result(self, kind: OptimizationType, study: optuna.Study) -> SearchResult:
        states = [t.state for t in study.trials]
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = study.best_trial if complete else None
        return SearchResult(
            kind=kind,
            study_name=study.study_name,
            best_value=best.value if best else None,
            best_params=dict(best.params) if best else {},
            trials_complete=len(complete),
            trials_pruned=states.count(optuna.trial.TrialState.PRUNED),
            trials_failed=states.count(optuna.trial.TrialState.FAIL),
            steps_trained=sum(int(t.user_attrs.get("steps_trained", 0)) for t in study.trials),
        )

    # ----------------------------------------------------------------- searches

    def search_hyperparameters(
        self,
        task: str,
        options: OptimizationConfig | None = None,
        task_params: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> SearchResult:
        """Blocking search; returns the best values as a params.yaml-shaped overlay."""
        options = options or OptimizationConfig.from_meta(self.meta)

        def objective(trial: optuna.Trial) -> float:
            sampled = sample_hyperparameters(trial)
            return self._run_trial(trial, task, with_overrides(self.config, **sampled), options, task_params, None)

        study = self._optimize(OptimizationType.HYPERPARAMETERS, objective, options, progress)
        result = self._result(OptimizationType.HYPERPARAMETERS, study)
        if result.best_params:
            self.best_params = hyperparameters_as_params(result.best_params)
        self.history.append(result.to_dict())
        return result

    def search_architecture(
        self,
        task: str,
        input_dim: int,
        output_dim: int,
        options: OptimizationConfig | None = None,
        task_params: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> SearchResult:
        """Blocking search over layers, units, dropout and activation."""
        options = options or OptimizationConfig.from_meta(self.meta)

        def objective(trial: optuna.Trial) -> float:
            architecture = sample_architecture(trial, input_dim, output_dim)
            return self._run_trial(trial, task, self.config, options, task_params, architecture)

        study = self._optimize(OptimizationType.ARCHITECTURE, objective, options, progress)
        result = self._result(OptimizationType.ARCHITECTURE, study)
        if result.best_params:
            self.best_architecture = architecture_from_params(result.best_params, input_dim, output_dim)
            result.best_architecture = self.best_architecture
        self.history.append(result.to_dict())
        return result

    async def optimize_hyperparameters(self, task: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Async form (runs the study in a worker thread so the caller's event loop stays free)."""
        result = await asyncio.to_thread(self.search_hyperparameters, task, **kwargs)
        return hyperparameters_as_params(result.best_params) if result.best_params else {}

    async def optimize_architecture(self, task: str, input_dim: int, output_dim: int, **kwargs: Any) -> NetworkArchitecture | None:
        result = await asyncio.to_thread(self.search_architecture, task, input_dim, output_dim, **kwargs)
        return result.best_architecture

    # ----------------------------------------------------------------- plots

    def write_plots(self, kind: OptimizationType, directory: str | Path) -> dict[str, str]:
        """Optuna's optimization history and parameter importances, as HTML files."""
        import optuna.visualization as vis

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        study = self.create_study(kind)
        written: dict[str, str] = {}
        plots = {"optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances}
        for name, plot in plots.items():
            try:
                figure = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ complete trials
                log.info("no %s plot: %s", name, exc)
                continue
            path = directory / f"{name}.html"
            figure.write_html(str(path), include_plotlyjs="cdn")
            written[name] = str(path)
        return written

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.model_dump(),
            "best_params": self.best_params,
            "best_architecture": self.best_architecture.to_dict() if self.best_architecture else None,
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.meta = MetaConfig.model_validate(state["meta"])
        self.best_params = dict(state["best_params"])
        arch = state.get("best_architecture")
        self.best_architecture = NetworkArchitecture.from_dict(arch) if arch else None
        self.history = list(state.get("history", []))


# --------------------------------------------------------------------------- policy transfer


def transfer_weights(source: torch.nn.Module, target: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Copy every source tensor whose name and shape fit the target; the rest keep their init."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    transferred, reinitialized = [], []
    for name, tensor in target_state.items():
        theirs = source_state.get(name)
        if theirs is not None and theirs.shape == tensor.shape:
            target_state[name] = theirs.detach().clone()
            transferred.append(name)
        else:
            reinitialized.append(name)
    target.load_state_dict(target_state)
    return transferred, reinitialized
