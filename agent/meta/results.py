"""What searches and adaptations report, in memory and on disk.

A :class:`SearchResult` summarises a study after a search (what was found, and what pruning
saved); an :class:`AdaptationResult` sets a transferred policy beside one trained from scratch.
Both are written as plain files (``result.json``, ``best_params.yaml``, ``trials.csv``, Optuna's
HTML plots) that the CLI, the pipeline and a user read without this package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from agent.dqn import LearningAgent
from agent.jsonable import jsonable
from agent.meta.options import FROM_SOURCE, OptimizationType
from agent.meta.targets import TaskSpec
from agent.network import NetworkArchitecture

log = logging.getLogger(__name__)


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


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One trial as plain data: its number, state, value, parameters and the steps it trained."""
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": dict(trial.params),
        "steps": int(trial.user_attrs.get("steps_trained", 0)),
        **({"diverged": True} if "diverged" in trial.user_attrs else {}),
        **({"error": trial.user_attrs["error"]} if "error" in trial.user_attrs else {}),
    }


def summarise(
    kind: OptimizationType, spec: TaskSpec, study: optuna.Study, ran: list[int], storage_url: str
) -> SearchResult:
    """A study after a search that ran the trials numbered ``ran`` (``best_config`` left empty:
    the search kind knows how its parameters become settings)."""
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    finished = [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
    complete = [t for t in trials if t.state == states.COMPLETE]
    best = study.best_trial if complete else None
    return SearchResult(
        kind=kind,
        study_name=study.study_name,
        task=spec.label,
        storage_url=storage_url,
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
        trials=[trial_record(t) for t in trials[-500:]],
    )


def write_plots(study: optuna.Study, directory: str | Path) -> dict[str, str]:
    """Optuna's optimisation history, parameter importances and intermediate values as HTML files.

    The files share one ``plotly.min.js`` in the same directory, so they open offline.
    """
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


def write_results(
    result: SearchResult, study: optuna.Study, directory: str | Path, metric: str, plots: bool = True
) -> dict[str, str]:
    """``best_params.yaml`` (a params.yaml overlay), ``result.json``, ``trials.csv`` and the plots;
    returns (and records in ``result.artifacts``) the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, str] = {}
    if result.best_config:
        path = directory / "best_params.yaml"
        command = "adapt --source SOURCE --task TASK" if result.kind in FROM_SOURCE else "train"
        header = (
            f"# Best trial of study '{result.study_name}' ({result.storage_url}): "
            f"{metric} {result.best_value:.4g} after {result.trials_total} trials.\n"
            f"# Apply it with: lagent {command} --params {path}\n"
        )
        path.write_text(header + yaml.safe_dump(result.best_config, sort_keys=False))
        artifacts["best_params"] = str(path)
    frame = study.trials_dataframe()
    if not frame.empty:
        frame.to_csv(directory / "trials.csv", index=False)
        artifacts["trials"] = str(directory / "trials.csv")
    if plots:
        artifacts.update(write_plots(study, directory))
    result.artifacts.update(artifacts)
    path = directory / "result.json"
    result.artifacts["result"] = str(path)
    path.write_text(json.dumps(jsonable(result.to_dict()), indent=2) + "\n")
    return result.artifacts


def write_adaptation(result: AdaptationResult, run_dir: str | Path) -> Path:
    """``adaptation.json`` in the adapted run's directory."""
    path = Path(run_dir, "adaptation.json")
    path.write_text(json.dumps(jsonable(result.to_dict()), indent=2) + "\n")
    return path
