"""What a meta-learning process is asked to do, and the options one search runs with.

The ``meta`` section of params.yaml is :class:`agent.config.MetaConfig`, part of the one resolved
configuration. :class:`OptimizationConfig` (the spec's name for one search's options) takes each of
its fields' bounds and description from that section's field, and every key a caller leaves out
from the section's value, so a budget, a pruner or a bound is defined once.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from agent.config import ConfigError, MetaConfig, default_config, load_raw, load_section
from agent.config_sections import TransferLayers

__all__ = [
    "FROM_SOURCE",
    "MetaConfig",
    "MetaLearningError",
    "OptimizationConfig",
    "OptimizationType",
    "TransferLayers",
    "load_meta_config",
    "validation_message",
]


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


FROM_SOURCE = (OptimizationType.POLICY, OptimizationType.TRANSFER)
"""The searches whose trials start from a source policy rather than a fresh agent."""


def validation_message(exc: ValidationError, source: str) -> str:
    """One line for a pydantic error: where, what, and the value given."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{source}: {where}: {first['msg']} (got {first.get('input')!r})"


def load_meta_config(
    params_files: Iterable[str | Path] = (), overrides: Iterable[str | Mapping[str, Any]] = ()
) -> MetaConfig:
    """The ``meta`` section of the layered params (params.yaml, files, ``section.key=value``)."""
    return load_section("meta", MetaConfig, load_raw(params_files, overrides))  # type: ignore[return-value]


_RENAMED = {"metric": "optimization_metric"}
"""Options whose ``meta`` key has another name (the spec names both)."""


def _meta_field(option: str) -> Any:
    """The ``meta`` section's definition of an option: its bounds and its description."""
    return copy.deepcopy(MetaConfig.model_fields[_RENAMED.get(option, option)])


class OptimizationConfig(BaseModel):
    """How one search runs: the spec's trials, timeout, metric, direction and pruner, and budgets.

    Keys not given come from the ``meta`` section of params.yaml (the one place for defaults).
    ``trials`` is accepted for ``n_trials``: ``OptimizationConfig(trials=10, pruner="median")``.
    Each field's bounds and description are the ``meta`` key's of the same name (``metric``:
    ``optimization_metric``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_trials: int = _meta_field("n_trials")
    timeout: float | None = _meta_field("timeout")
    metric: Literal["mean_reward", "success_rate"] = _meta_field("metric")
    direction: Literal["maximize", "minimize"] = _meta_field("direction")
    pruner: Literal["median", "hyperband", "none"] = _meta_field("pruner")
    n_startup_trials: int = _meta_field("n_startup_trials")
    n_jobs: int = _meta_field("n_jobs")
    trial_runner: Literal["threads", "ray"] = _meta_field("trial_runner")
    trial_timesteps: int = _meta_field("trial_timesteps")
    eval_interval: int = _meta_field("eval_interval")
    eval_episodes: int = _meta_field("eval_episodes")

    @classmethod
    def meta_values(cls, meta: MetaConfig) -> dict[str, Any]:
        """The options ``meta`` sets, under their option names."""
        return {option: getattr(meta, _RENAMED.get(option, option)) for option in cls.model_fields}

    @model_validator(mode="before")
    @classmethod
    def _fill_from_params(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "trials" in data:
            if "n_trials" in data:
                raise ValueError("give trials or n_trials, not both")
            data["n_trials"] = data.pop("trials")
        if set(cls.model_fields) <= set(data):
            return data
        return {**cls.meta_values(default_config().meta), **data}

    @property
    def trials(self) -> int:
        return self.n_trials

    @classmethod
    def from_meta(cls, meta: MetaConfig, **overrides: Any) -> OptimizationConfig:
        """The meta section's values, with any non-None keyword replacing one of them."""
        values = cls.meta_values(meta)
        if "trials" in overrides:
            overrides["n_trials"] = overrides.pop("trials")
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise MetaLearningError(validation_message(exc, "search options")) from None

    def evaluation_steps(self) -> list[int]:
        """The step counts at which a trial is evaluated (and may be pruned); the last is the budget."""
        points = list(range(self.eval_interval, self.trial_timesteps, self.eval_interval))
        return [*points, self.trial_timesteps]
