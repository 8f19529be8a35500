"""Search spaces: what each kind of search samples, and how a trial's values become settings.

A sampler draws values from an Optuna trial; its ``*_as_params`` partner turns a finished trial's
flat values back into what the rest of the project reads (a params.yaml overlay, a
:class:`NetworkArchitecture`), so the best trial of a study can be applied without re-running it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from agent.meta.options import MetaLearningError, OptimizationType
from agent.network import NetworkArchitecture

Overlay = dict[str, dict[str, Any]]
"""A params.yaml-shaped overlay: ``{"train": {...}, "network": {...}, ...}``."""

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


def sample_hyperparameters(trial: optuna.Trial) -> Overlay:
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


def hyperparameters_as_params(params: Mapping[str, Any]) -> Overlay:
    """A flat Optuna parameter dict as a params.yaml-shaped overlay (``{"train": {...}, ...}``)."""
    sections: Overlay = {}
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


def architecture_as_params(architecture: NetworkArchitecture) -> Overlay:
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


def sample_policy_adaptation(trial: optuna.trial.BaseTrial) -> Overlay:
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


def sample_transfer(trial: optuna.trial.BaseTrial) -> Overlay:
    """What a transfer hands over, as a params.yaml overlay (``meta.adapt_*``)."""
    layers = trial.suggest_categorical("adapt_transfer_layers", ["all", "body", "none"])
    # Shared inputs and actions matter only when some layer is copied.
    match = trial.suggest_categorical("adapt_match_features", [True, False]) if layers != "none" else False
    return {"meta": {"adapt_transfer_layers": layers, "adapt_match_features": match}}


def sample_from_source(kind: OptimizationType, trial: optuna.trial.BaseTrial) -> Overlay:
    """The sampler of a search that starts from a source policy (POLICY or TRANSFER)."""
    if kind is OptimizationType.POLICY:
        return sample_policy_adaptation(trial)
    return sample_transfer(trial)


def source_trial_as_params(kind: OptimizationType, params: Mapping[str, Any]) -> Overlay:
    """A finished POLICY or TRANSFER trial's parameters as the overlay its sampler produced."""
    return sample_from_source(kind, optuna.trial.FixedTrial(dict(params)))
