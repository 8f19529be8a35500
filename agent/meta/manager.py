"""MetaLearningManager: the spec's entry point to searches, adaptation and online tuning.

It holds what a user sets once (the ``meta`` section, the learning configuration trials start
from, an ``on_trial`` observer) and what the searches found (best settings and architecture,
history), which travel with a trainer's checkpoint. The work itself is done by the modules beside
it; this class composes them. The blocking methods are plain synchronous code; the spec's async
names (``optimize_hyperparameters``, ``optimize_architecture``, ``adapt_to_new_task``) run them
in a worker thread so that the caller's event loop stays free.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from pydantic import ValidationError

from agent.checkpoint import CheckpointError
from agent.config import Config, MetaConfig, config_for_task, default_config, with_overrides
from agent.jsonable import jsonable
from agent.meta.adaptation import PhaseProgress, adapt_policy
from agent.meta.online import optimize_online
from agent.meta.options import (
    FROM_SOURCE,
    MetaLearningError,
    OptimizationConfig,
    OptimizationType,
    validation_message,
)
from agent.meta.results import (
    AdaptationResult,
    SearchResult,
    summarise,
    write_adaptation,
    write_plots,
    write_results,
)
from agent.meta.spaces import (
    architecture_as_params,
    architecture_from_params,
    hyperparameters_as_params,
    sample_architecture,
    sample_from_source,
    sample_hyperparameters,
    source_trial_as_params,
)
from agent.meta import studies
from agent.meta.studies import Storages, load_study, open_study, prepare_study
from agent.meta.targets import TaskSpec, resolve_task
from agent.meta.transfer import source_name, source_policy, transfer_policy
from agent.meta.trials import SearchProgress, TrialCallback, run_trial, run_trials
from agent.network import NetworkArchitecture
from agent.tasks import TaskType, task_spaces
from agent.training import Trainer

log = logging.getLogger(__name__)


class MetaLearningManager:
    """Runs and remembers searches: hyperparameters, architectures, policy adaptation.

    ``base_config`` holds keys of the ``meta`` section (the spec's ``optimization_metric`` and
    ``storage_url`` among them) that replace those of ``meta_config`` (default: ``config.meta``).
    ``config`` is the learning configuration trials start from (default: params.yaml).
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
        self.config = config or default_config()
        meta = meta_config or self.config.meta
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
            raise MetaLearningError(validation_message(exc, "meta-learning config")) from None
        self.on_trial = on_trial
        self.best_params: dict[str, dict[str, Any]] = {}
        self.best_architecture: NetworkArchitecture | None = None
        self.history: list[dict[str, Any]] = []
        self.online_history: list[dict[str, Any]] = []
        self.adaptations: list[dict[str, Any]] = []
        self._storages = Storages()
        self._next_online: int | None = None
        self._last_study: dict[OptimizationType, str] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- studies

    def options(self, **overrides: Any) -> OptimizationConfig:
        """Search options from the meta section, with any non-None keyword replacing one."""
        return OptimizationConfig.from_meta(self.meta, **overrides)

    def storage(self) -> optuna.storages.BaseStorage:
        """The Optuna storage of ``meta.storage_url`` (opened once)."""
        return self._storages.get(self.meta.storage_url)

    def _spec(self, task: Any, task_params: Any = None, config: Config | None = None) -> TaskSpec:
        if isinstance(task, TaskSpec):
            return task
        return resolve_task(task or (config or self.config).train.task, task_params)

    def study_name_for(self, kind: OptimizationType | str, task: Any = None, source: str | None = None) -> str:
        """'{study_name}/{task}/{kind}' (see :func:`agent.meta.studies.study_name`)."""
        return studies.study_name(self.meta.study_name, kind, self._spec(task), source)

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
        spec = self._spec(task)
        url = self.meta.storage_url
        study = open_study(self._storages, url, self.study_name_for(kind, spec, source), options.direction)
        prepare_study(study, kind, options, spec, self.config.run.seed if seed is None else seed, url)
        return study

    def load_study(self, kind: OptimizationType | str, task: Any = None) -> optuna.Study:
        """An existing study (for plots and reports); a clear error if there is none.

        Without ``task``: the study this manager last searched for ``kind``, else ``train.task``'s.
        """
        kind = OptimizationType(kind)
        name = self._last_study.get(kind) if task is None else None
        return load_study(self._storages, self.meta.storage_url, name or self.study_name_for(kind, task))

    # ----------------------------------------------------------------- running searches

    def _search(
        self,
        kind: OptimizationType,
        spec: TaskSpec,
        objective: Callable[[optuna.Trial], float],
        options: OptimizationConfig,
        progress: SearchProgress | None,
        seed: int,
        source: str | None = None,
    ) -> SearchResult:
        """Run the trials and summarise the study (``best_config`` is left to the caller)."""
        if options.metric == "success_rate" and TaskType.parse(spec.task) is None:
            raise MetaLearningError(f"'{spec.task}' reports no success rate: optimise mean_reward")
        study = self.create_study(kind, options, spec, seed, source)
        self._last_study[kind] = study.study_name
        ran = run_trials(
            study, objective, options, on_trial=self.on_trial, progress=progress, storage_url=self.meta.storage_url
        )
        return summarise(kind, spec, study, ran, self.meta.storage_url)

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
        spec = self._spec(task, task_params, config)
        # Trials start from the task's own settings (its profile), as `lagent train --task` would.
        base = config_for_task(config or self.config, spec.task)
        options = options or self.options()
        eval_seed = base.run.seed + base.evaluate.seed_offset

        def objective(trial: optuna.Trial) -> float:
            trial_config = with_overrides(
                base, run={"seed": base.run.seed + trial.number}, **sample_hyperparameters(trial)
            )
            return run_trial(trial, spec, trial_config, options, eval_seed=eval_seed)

        result = self._search(OptimizationType.HYPERPARAMETERS, spec, objective, options, progress, base.run.seed)
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
        spec = self._spec(task, task_params, config)
        base = config_for_task(config or self.config, spec.task)
        obs_dim, n_actions = task_spaces(spec.task, config=base)
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

        result = self._search(OptimizationType.ARCHITECTURE, spec, objective, options, progress, base.run.seed)
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
        trainer: Trainer | None = None,
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
        trainer: Trainer | None = None,
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
        trainer: Trainer | None,
        progress: SearchProgress | None,
    ) -> SearchResult:
        policy, label = source_policy(source, trainer)
        spec = self._spec(task, task_params, config)
        # The configuration adapt() fine-tunes with, so that what is found applies to it.
        base = config or (trainer.config if trainer is not None else policy.config)
        base = with_overrides(base, train={"task": spec.task})
        options = options or self.options()
        eval_seed = base.run.seed + base.evaluate.seed_offset

        def objective(trial: optuna.Trial) -> float:
            overlay = sample_from_source(kind, trial)
            meta = self.meta.model_copy(update=overlay.get("meta", {}))
            epsilon = meta.adapt_epsilon_start
            train = {**overlay.get("train", {}), **({"epsilon_start": epsilon} if epsilon is not None else {})}
            trial_config = with_overrides(base, run={"seed": base.run.seed + trial.number}, train=train)
            adapted, *_ = transfer_policy(
                policy, spec.task, trial_config, match=meta.adapt_match_features, layers=meta.adapt_transfer_layers
            )
            return run_trial(trial, spec, trial_config, options, eval_seed=eval_seed, agent=adapted)

        result = self._search(kind, spec, objective, options, progress, base.run.seed, source_name(label))
        if result.best_params:
            result.best_config = source_trial_as_params(kind, result.best_params)
        self._record(result)
        return result

    def search(
        self, kind: OptimizationType | str, task: Any = None, *, source: Any = None, **kwargs: Any
    ) -> SearchResult:
        """Run the search of any :class:`OptimizationType` (``source`` is needed by POLICY and TRANSFER)."""
        kind = OptimizationType(kind)
        if kind in FROM_SOURCE:
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
        return write_plots(self.load_study(kind, task), directory)

    def write_results(self, result: SearchResult, directory: str | Path, plots: bool = True) -> dict[str, str]:
        """``best_params.yaml`` (a params.yaml overlay), ``result.json``, ``trials.csv`` and the plots."""
        study = load_study(self._storages, self.meta.storage_url, result.study_name)
        return write_results(result, study, directory, self.meta.optimization_metric, plots)

    # ----------------------------------------------------------------- policy adaptation

    def adapt(
        self,
        source: Any,
        target_task: Any,
        *,
        timesteps: int | None = None,
        trainer: Trainer | None = None,
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
        agent, label = source_policy(source, trainer)
        source_label = source_label or label
        spec = resolve_task(target_task, target_params)
        steps = int(timesteps or self.meta.adapt_timesteps)
        if steps < 1:
            raise MetaLearningError(f"adaptation needs a positive step budget, got {steps}")
        base = config or (trainer.config if trainer is not None else agent.config)
        # Sections of the learning configuration only: a params file's ``meta`` is this manager's.
        sections = {
            name: dict(values)
            for name, values in (overrides or {}).items()
            if name in Config.model_fields and name != "meta"
        }
        sections["train"] = {
            **sections.get("train", {}), "task": spec.task, "eval_frequency": 0, "final_model": "last"
        }
        cfg = with_overrides(base, **sections)
        result = adapt_policy(
            agent,
            spec,
            cfg,
            self.meta,
            timesteps=steps,
            eval_episodes=eval_episodes or cfg.evaluate.episodes,
            run_dir=run_dir,
            progress=progress,
            source_label=source_label,
        )
        if run_dir is not None:
            write_adaptation(result, run_dir)
        with self._lock:
            self.adaptations.append(result.to_dict())
        log.info(
            "adapted %s -> %s in %d steps: %.3g (scratch %.3g); transferred %s, re-initialised %s",
            source_label, spec.label, steps, result.adapted_reward, result.scratch_reward,
            result.transferred, result.reinitialized,
        )
        return result

    async def adapt_to_new_task(self, source_task: Any, target_task: Any, **kwargs: Any) -> AdaptationResult:
        """Async form of :meth:`adapt` (runs in a worker thread)."""
        return await asyncio.to_thread(self.adapt, source_task, target_task, **kwargs)

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

    def optimize_online(self, trainer: Trainer) -> dict[str, Any]:
        """One periodic optimisation of ``trainer``'s live settings (see
        :func:`agent.meta.online.optimize_online`), recorded in ``online_history``."""
        record = optimize_online(self.meta, trainer)
        with self._lock:
            self.online_history.append(record)
        return record

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything the searches found, in plain data (checkpoints load with weights_only=True)."""
        with self._lock:
            return jsonable(
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
