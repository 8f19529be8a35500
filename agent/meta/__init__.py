"""Meta-learning: Optuna searches over hyperparameters and architectures, policy adaptation, and
periodic optimisation during training. It sits above training (its trials run Trainers, online
tuning is a trainer callback) and nothing in ``agent.training`` imports it.

One job per module:

- :mod:`~agent.meta.options`: what to optimise (OptimizationType), one search's options
  (OptimizationConfig, derived from the ``meta`` section), MetaLearningError.
- :mod:`~agent.meta.targets`: task names to concrete tasks (TaskSpec, resolve_task).
- :mod:`~agent.meta.spaces`: the search spaces, and a trial's values as settings.
- :mod:`~agent.meta.studies`: storages, study names, opening and checking studies.
- :mod:`~agent.meta.trials`: one trial (train in chunks, report, prune) and a study's trials.
- :mod:`~agent.meta.transfer`: loading a policy and copying what fits another task.
- :mod:`~agent.meta.adaptation`: fine-tuning a transferred policy beside one from scratch.
- :mod:`~agent.meta.online`: periodic optimisation, and its trainer callback.
- :mod:`~agent.meta.results`: SearchResult, AdaptationResult and the files they are written to.
- :mod:`~agent.meta.manager`: MetaLearningManager, the spec's entry point composing the above.

Nothing here knows about MLflow or Prefect: callers pass ``on_trial`` to observe finished trials.
"""

from agent.config import MetaConfig
from agent.meta.adaptation import PhaseProgress, adapt_policy
from agent.meta.manager import MetaLearningManager
from agent.meta.online import (
    ONLINE_KEYS,
    PeriodicOptimisation,
    apply_live_hyperparameters,
    optimize_online,
    sample_online,
)
from agent.meta.options import (
    FROM_SOURCE,
    MetaLearningError,
    OptimizationConfig,
    OptimizationType,
    TransferLayers,
    load_meta_config,
)
from agent.meta.results import AdaptationResult, SearchResult, write_plots, write_results
from agent.meta.spaces import (
    ARCHITECTURE_ACTIVATIONS,
    ARCHITECTURE_UNITS,
    HYPERPARAMETER_SECTIONS,
    architecture_as_params,
    architecture_from_params,
    hyperparameters_as_params,
    sample_architecture,
    sample_hyperparameters,
    sample_policy_adaptation,
    sample_transfer,
)
from agent.meta.studies import make_storage
from agent.meta.targets import TaskSpec, resolve_task
from agent.meta.transfer import (
    FeatureMatch,
    clone_agent,
    load_policy,
    match_features,
    source_name,
    transfer_policy,
    transfer_weights,
)
from agent.meta.trials import SearchProgress, TrialCallback, metric_value, run_trial

__all__ = [
    "ARCHITECTURE_ACTIVATIONS",
    "ARCHITECTURE_UNITS",
    "FROM_SOURCE",
    "HYPERPARAMETER_SECTIONS",
    "ONLINE_KEYS",
    "AdaptationResult",
    "FeatureMatch",
    "MetaConfig",
    "MetaLearningError",
    "MetaLearningManager",
    "OptimizationConfig",
    "OptimizationType",
    "PeriodicOptimisation",
    "PhaseProgress",
    "SearchProgress",
    "SearchResult",
    "TaskSpec",
    "TransferLayers",
    "TrialCallback",
    "adapt_policy",
    "apply_live_hyperparameters",
    "architecture_as_params",
    "architecture_from_params",
    "clone_agent",
    "hyperparameters_as_params",
    "load_meta_config",
    "load_policy",
    "make_storage",
    "match_features",
    "metric_value",
    "optimize_online",
    "resolve_task",
    "run_trial",
    "sample_architecture",
    "sample_hyperparameters",
    "sample_online",
    "sample_policy_adaptation",
    "sample_transfer",
    "source_name",
    "transfer_policy",
    "transfer_weights",
    "write_plots",
    "write_results",
]
