"""Typed, frozen configuration: the only reader of ``params.yaml``.

Every default lives in ``params.yaml``; the models below declare types and bounds but no values,
so there is exactly one place to change a default. Layers are applied in order:

1. the project's ``params.yaml`` (``$LAGENT_PARAMS`` points elsewhere),
1a. for a Gymnasium env trained from the CLI or the pipeline (``gym_env=True``), ``gym_profiles``:
   robust defaults for any env, then the env's tuned entry if it has one (see :func:`gym_profile`),
1b. the ``profiles`` entry of the chosen task (``train.task``), if params.yaml has one: the
   settings that task needs beyond the project-wide defaults (see :func:`task_profile`;
   :func:`config_for_task` moves a loaded config to another task the same way),
2. any number of params.yaml-shaped files (partial files are fine: they override what they name),
3. ``section.key=value`` overrides (the CLI's ``--set``; values are parsed as YAML),
4. keyword arguments of the Python API (applied by the caller with :func:`with_overrides`).

Unknown keys and wrong types are errors that name the file and the dotted key.

The result is one frozen :class:`Config` holding every section a run uses (the task world's
``rewards``, ``tasks`` and ``curriculum`` and meta-learning's ``meta`` included, their models in
:mod:`agent.config_sections`), built at the edge and passed down; library code given no config
falls back to :func:`default_config`, and no library module reads params.yaml itself.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from agent.config_sections import (  # noqa: F401 - re-exported: agent.config holds every section
    CurriculumSection,
    ExplorationSection,
    ManipulationSection,
    MetaConfig,
    MultiAgentSection,
    NavigationSection,
    RewardSection,
    Section,
    StageSection,
    TasksSection,
)
from memory import wire  # the collection-name rule the service applies

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS_PATH = PROJECT_ROOT / "params.yaml"
PROFILES = "profiles"  # params.yaml's per-task settings, see task_profile()
GYM_PROFILES = "gym_profiles"  # settings for Gymnasium envs at the edge (CLI, pipeline), see gym_profile()
AUTO_BUFFER_MAX = 1_000_000  # replay.local_buffer_size: auto never allocates more


AUTO_COLLECTION = "auto"
"""``memory.collection`` value meaning: a new collection for every run."""


class ConfigError(ValueError):
    """A configuration file or override is unreadable, unknown or ill-typed."""


class RunConfig(Section):
    seed: int = Field(ge=0)
    """Seeds torch, numpy, the replay sampler and the environments: one seed, one run (on CPU)."""
    device: str
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    torch_threads: int = Field(ge=0)
    """Intra-op threads; 1 is fastest for small MLPs on shared cores, 0 leaves torch's default."""


class NetworkConfig(Section):
    hidden_size: int = Field(ge=1)
    """Units per hidden layer (the spec's default is 256)."""
    num_hidden_layers: int = Field(ge=1, le=16)
    """How many hidden layers of ``hidden_size`` units."""
    hidden_layers: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, max_length=16)] | None
    """Explicit per-layer widths (what architecture search finds); when set, the two keys above are unused."""
    activation: Literal["relu", "tanh", "elu", "leaky_relu", "gelu", "silu"]
    """Activation after each hidden layer."""
    dropout: float = Field(ge=0.0, lt=1.0)
    """Dropout after each hidden activation (0 disables it)."""
    dueling: bool
    """Split the head into state-value and advantage streams (Wang et al. 2016)."""
    normalize_obs: bool
    """Standardise observations with running mean and variance (float64, updated from the
    observations acted on while training; clipped to [-10, 10]), kept in the network's state."""


class ReplayConfig(Section):
    local_buffer_size: int = Field(ge=1)
    """Capacity of the local circular buffer, in transitions ('auto' in a params file: the step
    budget, at most 1M, resolved when the configuration is loaded)."""
    memory_batch_size: int = Field(ge=0)
    """Transitions fetched from the Memory service per learning step (0: local replay only)."""
    similar_batch_size: int = Field(ge=0)
    """Similar past experiences (from the Memory service) added to each learning batch."""
    similar_embedding: Literal["state", "network"]
    """What 'similar' compares: 'state', the raw observations the service indexes; 'network', the
    Q-network's penultimate layer, computed at query time by the current network for the query
    and for ``similar_candidates`` neighbours per query the service found by state (so both
    sides come from the same weights and nothing stored goes stale)."""
    similar_prefer_success: bool
    """Of the ``similar_candidates`` neighbours per query, keep those from the episodes with the
    highest stored return (distance breaks ties; rows of unknown return come last). Needs rows
    stored with their episode's return (``tag_episode_returns``, by whoever wrote them)."""
    similar_candidates: int = Field(ge=1, le=50)
    """Neighbours fetched per query when ``similar_embedding`` is 'network' or
    ``similar_prefer_success`` is on, as a multiple of the k kept (1: no choice among them; at
    most 50, so that k <= 5 times it stays within the service's default ``max_k`` of 256)."""
    tag_episode_returns: bool
    """Store each episode's rows in the Memory service when it ends, tagged with its return
    (for ``similar_prefer_success``); the service then receives them one episode later. Rows of
    episodes still running when training stops are stored untagged."""
    n_step: int = Field(ge=1, le=100)
    """Steps summed into each local transition's return: (s_t, a_t, sum_{k<n} gamma^k r_{t+k},
    s_{t+n}), built per environment copy by the Collector (partial windows at an episode's end:
    no bootstrap if it terminated, gamma^k if truncated); the update then discounts by gamma^n.
    The Memory service keeps receiving 1-step rows, rescaled when replayed. 1: plain DQN."""
    prioritized: bool
    """Sample the *local* buffer in proportion to (|TD error| + ``priority_eps``)^``priority_alpha``
    (Schaul et al. 2016, proportional); new rows get the highest priority so far. The Memory
    service's own prioritized replay is ``memory.prioritized``, a separate option."""
    priority_alpha: float = Field(ge=0.0, le=1.0)
    """How much the local buffer's priorities count (0: uniform)."""
    priority_beta: float = Field(ge=0.0, le=1.0)
    """Importance-weight exponent of local prioritized batches at the start of a run, raised
    linearly to 1 over the run's step budget (``train.total_timesteps``, or ``max_episodes`` x
    ``max_steps_per_episode``), fixed when the first row is stored."""
    priority_eps: float = Field(gt=0.0)
    """Added to |TD error|, so that every local row keeps a chance to be drawn."""


class TrainConfig(Section):
    task: str
    """A task type (navigation, exploration, multi_agent, manipulation) or a Gymnasium env id."""
    use_curriculum: bool
    """Walk a task type through the curriculum's stages (params ``curriculum``; the CLI's --curriculum)."""
    learning_rate: float = Field(gt=0.0)
    """Adam step size."""
    gamma: float = Field(ge=0.0, le=1.0)
    """Discount factor."""
    batch_size: int = Field(ge=1)
    """Transitions sampled from the local buffer per gradient step."""
    double_dqn: bool
    """Pick the next action with the online network, value it with the target network."""
    loss: Literal["huber", "mse"]
    """TD-error loss; Huber is the robust default."""
    closed_form_update: bool = True
    """Compute a plain MLP's gradients with its backward pass written out (``agent.closed_form``),
    about twice as fast as autograd on a CPU; false, or any other network, uses autograd."""
    max_grad_norm: float | None = Field(gt=0.0)
    """Clip the global gradient norm to this value (null disables clipping)."""
    target_update: Literal["hard", "soft"]
    """Copy the weights every ``target_update_interval`` updates, or Polyak-average every update."""
    target_update_interval: int = Field(ge=1)
    """Gradient updates between hard target-network copies."""
    tau: float = Field(gt=0.0, le=1.0)
    """Polyak coefficient for soft target updates."""
    learning_starts: int = Field(ge=0)
    """Environment steps collected before the first gradient update (warm-up)."""
    train_freq: int = Field(ge=1)
    """Vector-environment steps between training calls."""
    gradient_steps: int = Field(ge=1)
    """Gradient updates per training call."""
    num_envs: int = Field(ge=1)
    """Copies of the environment stepped together; one forward pass chooses all their actions."""
    exploration: Literal["exponential", "linear"]
    """'exponential': epsilon *= decay per finished episode (the spec); 'linear': per env step."""
    epsilon_start: float = Field(ge=0.0, le=1.0)
    """Initial exploration rate."""
    epsilon_end: float = Field(ge=0.0, le=1.0)
    """Final exploration rate."""
    epsilon_decay: float = Field(gt=0.0, le=1.0)
    """Per-episode multiplicative decay ('exponential' schedule)."""
    exploration_fraction: float = Field(gt=0.0, le=1.0)
    """Fraction of the step budget over which epsilon falls linearly ('linear' schedule)."""
    max_episodes: int | None = Field(ge=1)
    """Episode budget (null: no episode budget)."""
    max_steps_per_episode: int | None = Field(ge=1)
    """Gymnasium envs' episodes are truncated after this many steps (or the env's own limit, if
    lower; null: the env's own limit). A task type's episodes end at its stage's time limit (time_limit / tasks.dt steps),
    which this does not cut: set the stage's time_limit to shorten them."""
    total_timesteps: int | None = Field(ge=1)
    """Environment-step budget (null: no step budget). Training stops at the first budget reached."""
    checkpoint_frequency: int = Field(ge=1)
    """Episodes between periodic checkpoints (when the trainer has a run directory)."""
    save_buffer: bool
    """Include the replay buffer in checkpoints, so that a resumed run continues exactly."""
    log_interval: int = Field(ge=1)
    """Environment steps between aggregated metric writes (losses, throughput, system and Memory
    service readings, per-layer gradient norms)."""
    histogram_interval: int = Field(ge=0)
    """Gradient updates between weight and gradient histograms of every layer (TensorBoard);
    0 disables them."""
    eval_frequency: int = Field(ge=0)
    """Environment steps between greedy evaluations during training (0: none)."""
    eval_episodes: int = Field(ge=1)
    """Episodes per evaluation during training."""
    final_model: Literal["last", "best"]
    """The weights a run ends with: the last ones, or those of the best evaluation during training."""
    lr_schedule: Literal["constant", "linear"]
    """'linear': the learning rate falls with the step budget's progress to ``learning_rate x
    lr_final_fraction`` (needs ``total_timesteps``); late updates then move the weights less, so
    the last weights are not a lucky snapshot of an oscillating policy."""
    lr_final_fraction: float = Field(ge=0.0, le=1.0)
    """The linear schedule's last learning rate, as a fraction of ``learning_rate``."""
    reward_scale: float = Field(gt=0.0)
    """Rewards are multiplied by this in every update (local, memory and similar rows alike;
    what is stored stays as the environment gave it): large returns make large TD errors."""
    reward_clip: float | None = Field(gt=0.0)
    """After scaling, rewards are clipped to [-reward_clip, reward_clip] in every update (DQN's
    Atari clipping at 1; with n-step returns the clip applies to the n-step sum). null: none."""
    stop_at_reward: float | None
    """End the run at the first evaluation during training whose mean greedy reward reaches this
    (SB3's ``StopTrainingOnRewardThreshold``): a solved task stops spending its budget. null: never."""

    @model_validator(mode="after")
    def _stop_needs_evaluations(self) -> "TrainConfig":
        if self.stop_at_reward is not None and not self.eval_frequency:
            raise ValueError("train.stop_at_reward needs evaluations during training: set train.eval_frequency > 0")
        return self


class EvaluateConfig(Section):
    episodes: int = Field(ge=1)
    """Greedy evaluation episodes."""
    num_envs: int = Field(ge=1)
    """Environment copies used to run them."""
    seed_offset: int = Field(ge=0)
    """Evaluation environments are seeded with run.seed + seed_offset, apart from training."""
    epsilon: float = Field(ge=0.0, le=1.0)
    """Exploration during evaluation: a little (0.05, as in the DQN papers) frees a greedy policy
    stuck repeating a blocked move; 0 is purely greedy."""


class MemoryConfig(Section):
    enabled: bool
    """Use the Memory service (store, replay, similar-state search) during training."""
    base_url: str
    """Where the Memory service listens."""
    timeout: float = Field(gt=0.0)
    """Seconds a request may take in total."""
    connect_timeout: float = Field(gt=0.0)
    """Seconds to wait for a connection: short, so that a down service costs almost nothing."""
    collection: str | None
    """Where a run's transitions go and replay comes from. 'auto' (or null): a new collection for
    every run, so that no run replays another's experience and one seed gives one result; a name:
    that collection, shared by every run that names it (knowledge transfer: a run replays what
    earlier runs stored there)."""
    capacity: int | None = Field(ge=1)
    """Transitions the collection keeps (oldest evicted first) if this run creates it; null: the
    service's default (1M)."""
    prioritized: bool
    """Draw memory batches in proportion to priority (|TD error|) and send new priorities back."""
    priority_beta: float = Field(ge=0.0, le=1.0)
    """Importance-weight exponent of prioritized memory batches (1 corrects the bias fully)."""
    max_outbox_mb: float = Field(gt=0.0)
    """Disk the client may fill with writes while the service is down; past it, rows are dropped
    (and counted in memory/dropped)."""
    flush_timeout: float = Field(ge=0.0)
    """Seconds a run waits at its end for queued writes to reach the service; what is left stays in
    the outbox and is delivered by the next client that opens it."""
    autostart: bool
    """Start ``python -m memory`` on loopback when nothing answers at a loopback ``base_url``
    (CLI and flows; stopped again when the run ends)."""
    data_dir: str = Field(min_length=1)
    """Durable log directory of a service started that way (relative to the working directory)."""

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str | None) -> str:
        if value is None or value == AUTO_COLLECTION:
            return AUTO_COLLECTION
        if not wire.is_collection_name(value):
            raise ValueError(
                f"{value!r} is not a collection name: use 'auto' (a new collection for every run) "
                f"or a name of {wire.COLLECTION_NAME_RULE} (one collection shared by every run "
                "that names it)"
            )
        return value


class DistributedConfig(Section):
    """Training on Ray (Ape-X): actors collect into the Memory service, one learner samples it."""

    actors: int = Field(ge=0, le=4096)
    """Collector actors (lagent train --actors N); 0 trains in this process."""
    ray_address: str | None
    """A running Ray cluster to join ('auto', 'ray://HOST:PORT'); null starts a local instance."""
    num_cpus: int | None = Field(ge=1)
    """CPUs of a local Ray instance; null: the machine's."""
    learner_device: str
    """Where the learner actor runs: auto (a GPU when the cluster has one), cpu, cuda."""
    actor_cpus: float | None = Field(gt=0.0)
    """CPUs each actor reserves; null: the cluster's CPUs beside the learner's, shared out (at
    most 1), so that the actors and the learner all fit at once."""
    rollout_steps: int = Field(ge=1)
    """Vector-env steps an actor takes per call, between picking up newer weights."""
    publish_interval: int = Field(ge=1)
    """Learner updates between weight publications through Ray's object store (Ape-X's K)."""
    epsilon: float = Field(ge=0.0, le=1.0)
    """Ape-X's per-actor exploration: actor i of N explores with epsilon^(1 + alpha * i / (N-1))."""
    epsilon_alpha: float = Field(ge=0.0)
    """The alpha above: how fast the actors' exploration rates fall from the first to the last."""


class Config(Section):
    """The whole resolved configuration, one field per ``params.yaml`` section a run uses.

    Built once at the edge (:func:`load_config`, :func:`config_from_dict`; :func:`default_config`
    for a library call given none) and passed down: the task world reads ``rewards``, ``tasks``
    and ``curriculum`` from it, meta-learning ``meta``. Saved whole with every run.
    """

    run: RunConfig
    network: NetworkConfig
    replay: ReplayConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    memory: MemoryConfig
    meta: MetaConfig
    rewards: RewardSection
    curriculum: CurriculumSection
    tasks: TasksSection
    distributed: DistributedConfig

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_buffer(cls, data: Any) -> Any:
        """``replay.local_buffer_size: auto`` holds the whole step budget (at most 1M): what an
        off-policy learner should see on a short run, and a bounded memory on a long one."""
        if not isinstance(data, Mapping):
            return data
        replay = data.get("replay")
        if isinstance(replay, Mapping) and replay.get("local_buffer_size") == "auto":
            train = data.get("train")
            budget = train.get("total_timesteps") if isinstance(train, Mapping) else getattr(train, "total_timesteps", None)
            size = min(int(budget), AUTO_BUFFER_MAX) if isinstance(budget, int) and budget > 0 else AUTO_BUFFER_MAX
            data = {**data, "replay": {**replay, "local_buffer_size": size}}
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Sections the pipeline edge (flows/) owns are registered here so that one params.yaml validates
# as a whole; see :func:`register_section`. Sections of :class:`Config` are validated as its fields.
_EXTRA_SECTIONS: dict[str, type[BaseModel]] = {}


def register_section(name: str, model: type[BaseModel]) -> None:
    """Let another module own a params.yaml section (validated with ``model``).

    A section :class:`Config` holds is validated as part of it; registering it again is a no-op."""
    if name not in Config.model_fields:
        _EXTRA_SECTIONS[name] = model


# Mappings whose keys are open (any metric name), even where a profile or a loaded config has
# filled some: an empty mapping in the defaults is open too (see _check_keys).
OPEN_MAPPINGS = ("curriculum.stages.*.completion_criteria",)


class _StrictLoader(yaml.SafeLoader):
    """YAML for params files: no anchors or aliases, no duplicate keys.

    An alias lets a few lines expand into gigabytes (a "billion laughs" file takes minutes and
    GBs before any check runs), and a duplicate key silently drops one of two values: both are
    refused before anything is built from the document.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "anchors and aliases (*name) are not allowed in params files", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}'", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file (a params file is YAML text)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror or exc}") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}{where}: not valid YAML for a params file: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _known_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, Mapping):
            keys.extend(_known_keys(value, dotted + "."))
    return keys


def _check_keys(update: Mapping[str, Any], known: Mapping[str, Any], source: str, prefix="") -> None:
    """Reject keys the defaults do not have, suggesting the closest known one."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            candidates = _known_keys(known, prefix)
            close = difflib.get_close_matches(dotted, candidates, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")
        if isinstance(known[key], Mapping) and value is not None and not isinstance(value, Mapping):
            raise ConfigError(
                f"{source}: '{dotted}' is a section of settings: give it a mapping (key: value), "
                f"not a {type(value).__name__}"
            )
        # An empty mapping in the defaults (a stage's completion_criteria) is open: any key goes.
        if isinstance(value, Mapping) and isinstance(known[key], Mapping) and known[key] and not _is_open(dotted):
            _check_keys(value, known[key], source, dotted + ".")


def _is_open(dotted: str) -> bool:
    return any(fnmatch.fnmatchcase(dotted, pattern) for pattern in OPEN_MAPPINGS)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested dict; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}' must name a section and a key, like train.gamma=0.9")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def default_params_path() -> Path:
    env = os.environ.get("LAGENT_PARAMS")
    return Path(env) if env else DEFAULT_PARAMS_PATH


def load_raw(
    params_files: Iterable[str | Path] = (),
    overrides: Iterable[str | Mapping[str, Any]] = (),
    *,
    gym_env: bool = False,
    gym_tuned: bool = True,
) -> dict[str, Any]:
    """Merge the layers into one plain dict, checking every key against the defaults.

    ``gym_env``: ``train.task`` is a Gymnasium env id and the caller is an edge that trains it as
    a user would (the CLI, the pipeline): :func:`gym_profile` goes under the task's profile;
    ``gym_tuned=False`` leaves out the env's tuned entry (what an env nobody tuned gets).
    """
    base_path = default_params_path()
    if not base_path.is_file():
        raise ConfigError(
            f"default params file {base_path} not found: run from a checkout of the project "
            "or set LAGENT_PARAMS"
        )
    base = _read_yaml(base_path)
    _check_profiles(base.get(PROFILES), base, str(base_path))
    _check_profiles(base.get(GYM_PROFILES), base, str(base_path), GYM_PROFILES)
    layers: list[dict[str, Any]] = []
    data = base
    for file in params_files:
        layer = _read_yaml(Path(file))
        _check_layer(layer, data, str(file))
        layers.append(layer)
        data = _deep_merge(data, layer)
    for override in overrides:
        layer = parse_override(override) if isinstance(override, str) else dict(override)
        source = f"override '{override}'" if isinstance(override, str) else "keyword arguments"
        _check_layer(layer, data, source)
        layers.append(layer)
        data = _deep_merge(data, layer)
    profile = task_profile(data)
    gym = gym_profile(data)[1] if gym_env else []
    if not gym_tuned:
        gym = gym[:1]
    if profile or gym:  # profiles sit between the defaults and every other layer
        data = base
        for layer in [*gym, profile, *layers]:
            data = _deep_merge(data, layer)
    return data


def gym_profile(data: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """What ``gym_profiles`` gives the Gymnasium env ``data`` trains on: a description and the
    layers (the robust ``default`` for any env, then the env's own tuned entry, if any).

    These apply where a user trains an env as such (``lagent train --task ENV``, the pipeline);
    the spec's Python API keeps the spec's values (``LearningAgent(...)`` with params.yaml's).
    """
    profiles = data.get(GYM_PROFILES) or {}
    task = str(data.get("train", {}).get("task", ""))
    layers = [dict(profiles.get("default") or {})]
    for name, profile in profiles.items():
        if name != "default" and str(name).lower() == task.lower():
            layers.append(dict(profile or {}))
            return f"the tuned profile for {name} (gym_profiles.{name} in params.yaml)", layers
    return "the defaults for Gymnasium envs (gym_profiles.default in params.yaml)", layers


def task_profile(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``profiles`` entry of the task ``data`` trains on (``train.task``), or {} if none.

    A profile holds the settings a task needs that differ from the project-wide defaults (for
    example the navigation curriculum's completion criteria); it is applied on top of
    ``params.yaml`` when that task is chosen, and under ``--params`` files and ``--set``.
    Keys are task names as ``train.task`` gives them (case-insensitive).
    """
    profiles = data.get(PROFILES) or {}
    task = str(data.get("train", {}).get("task", "")).lower()
    for name, profile in profiles.items():
        if str(name).lower() == task:
            return dict(profile or {})
    return {}


def _check_profiles(profiles: Any, known: Mapping[str, Any], source: str, key: str = PROFILES) -> None:
    """Every profile must be a mapping of known keys; it may not choose the task or nest profiles."""
    if profiles is None:
        return
    if not isinstance(profiles, Mapping):
        raise ConfigError(f"{source}: '{key}' must map task names to settings, got {type(profiles).__name__}")
    sections = {k: v for k, v in known.items() if k not in (PROFILES, GYM_PROFILES)}
    for task, profile in profiles.items():
        where = f"{source}: {key}.{task}"
        if profile is None:
            continue
        if not isinstance(profile, Mapping):
            raise ConfigError(f"{where} must be a mapping of sections, got {type(profile).__name__}")
        if PROFILES in profile or GYM_PROFILES in profile or "task" in (profile.get("train") or {}):
            raise ConfigError(
                f"{where} may not set '{PROFILES}', '{GYM_PROFILES}' or 'train.task' (it is chosen by the task)"
            )
        _check_keys(profile, sections, where)


def _check_layer(layer: Mapping[str, Any], known: Mapping[str, Any], source: str) -> None:
    """Check a layer's keys; its ``profiles`` may add tasks, each checked like a layer."""
    _check_keys({k: v for k, v in layer.items() if k not in (PROFILES, GYM_PROFILES)}, known, source)
    _check_profiles(layer.get(PROFILES), known, source)
    _check_profiles(layer.get(GYM_PROFILES), known, source, GYM_PROFILES)


def collect_overrides(
    params_files: Iterable[str | Path] = (), overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Just the keys named by files and ``--set`` overrides (no defaults), checked against them.

    Used to change a few settings of a saved run without resetting the rest to the defaults.
    """
    known = load_raw()
    named: dict[str, Any] = {}
    for file in params_files:
        layer = _read_yaml(Path(file))
        _check_layer(layer, known, str(file))
        named = _deep_merge(named, layer)
    for text in overrides:
        layer = parse_override(text)
        _check_layer(layer, known, f"override '{text}'")
        named = _deep_merge(named, layer)
    return named


def format_validation_error(exc: ValidationError, source: str, prefix: str | None = None) -> str:
    """One line for a pydantic error: where, what, the value given, and how many more there are."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in ([prefix] if prefix else []) + list(first["loc"]))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    given = first.get("input")
    # a rule across a section's keys gets the whole section as its input: its message says it all
    got = "" if isinstance(given, Mapping) and first["type"] == "value_error" else f" (got {given!r})"
    message = first["msg"].removeprefix("Value error, ") if not got else first["msg"]
    return f"{source}: {where}: {message}{got}{more}"


def load_config(
    params_files: Iterable[str | Path] | str | Path | None = None,
    overrides: Iterable[str | Mapping[str, Any]] = (),
    *,
    gym_env: bool = False,
    gym_tuned: bool = True,
) -> Config:
    """Load and validate the configuration; see the module docstring for the layers
    (``gym_env``, ``gym_tuned``: see :func:`load_raw`)."""
    if isinstance(params_files, (str, Path)):
        params_files = [params_files]
    data = load_raw(params_files or (), overrides, gym_env=gym_env, gym_tuned=gym_tuned)
    core = {name: data[name] for name in Config.model_fields if name in data}
    try:
        config = Config.model_validate(core)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "configuration")) from None
    for name, model in _EXTRA_SECTIONS.items():
        if name in data:
            try:
                model.model_validate(data[name])
            except ValidationError as exc:  # name the section: "configuration: pipeline.task: ..."
                raise ConfigError(format_validation_error(exc, "configuration", prefix=name)) from None
    return config


def _params_stamp() -> tuple[str, int | None, int | None]:
    """The default params file and its modification time and size: a cache key that changes
    when the file (or ``$LAGENT_PARAMS``) does."""
    path = default_params_path()
    try:
        stat = path.stat()
    except OSError:
        return str(path), None, None
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=16)
def _default_config(stamp: tuple[str, int | None, int | None], task: str | None) -> Config:
    return load_config(overrides=[{"train": {"task": task}}] if task is not None else ())


def default_config(task: str | None = None) -> Config:
    """The configuration ``params.yaml`` alone gives (no files, no overrides): the one fallback
    of a library call that was given no config. With ``task``, as loaded for that task (its
    ``profiles`` entry applied, ``train.task`` set to it), as ``lagent train --task`` would.

    Cached per params file and its modification time: environments are rebuilt at every
    curriculum stage, and re-reading YAML each time would be wasted work. Code that has a
    resolved config passes it down instead of calling this.
    """
    return _default_config(_params_stamp(), None if task is None else str(task))


def load_section(name: str, model: type[BaseModel], data: Mapping[str, Any]) -> BaseModel:
    """Validate one registered section of a raw params dict."""
    try:
        return model.model_validate(data[name])
    except KeyError:
        raise ConfigError(f"params have no '{name}' section") from None
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"section '{name}'")) from None


def with_overrides(config: Config, **sections: Mapping[str, Any] | None) -> Config:
    """Return a copy of ``config`` with some keys of some sections replaced (validated)."""
    data = config.to_dict()
    update = {name: dict(values) for name, values in sections.items() if values}
    _check_keys(update, data, "keyword arguments")
    try:
        return Config.model_validate(_deep_merge(data, update))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "keyword arguments")) from None


_ABSENT = object()


def _retarget(value: Any, old: Any, new: Any) -> Any:
    """``value`` (loaded for one task, perhaps changed since) as loaded for another: where it
    equals what loading for the old task gives (``old``) it takes the new task's (``new``);
    what differs was chosen and stays. Nested sections are compared key by key."""
    if not (isinstance(value, dict) and isinstance(old, dict) and isinstance(new, dict)):
        return new if value == old else value
    out: dict[str, Any] = {}
    for key, item in value.items():
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before is _ABSENT:
            out[key] = item  # not loaded for the old task: chosen (a key of an open mapping)
        elif after is _ABSENT:
            if item != before:  # the old task's profile added it; keep it only if changed since
                out[key] = item
        else:
            out[key] = _retarget(item, before, after)
    for key, after in new.items():
        if key not in value and key not in old:  # the new task's profile adds it
            out[key] = after
    return out


def config_for_task(
    config: Config, task: str, keep: Mapping[str, Mapping[str, Any]] | None = None
) -> Config:
    """``config`` moved to ``task`` as if it had been loaded for it (its ``profiles`` entry applied).

    A config is loaded for one task (``train.task``, with that task's profile); handed to a
    trainer of another task (the spec's ``TrainingManager(learning_agent=LearningAgent(...),
    task_type=TaskType.EXPLORATION)``), it must give what ``lagent train --task`` gives. So every
    setting still at the value loading for the old task gives takes the value loading for the new
    task gives (the new profile's, else the default); a setting that differs was chosen by the
    user (``--set``, a params file, a keyword argument) and stays, as does every key of ``keep``
    (``{section: {key: ...}}``: values chosen explicitly, even if they equal a default). Nested
    settings (``curriculum.stages.<stage>.<key>``, ``tasks.<task>.<key>``) are compared one by one.
    """
    if str(task).lower() == config.train.task.lower():
        return config if task == config.train.task else with_overrides(config, train={"task": task})
    old = default_config(config.train.task).to_dict()
    new = default_config(task).to_dict()
    data = config.to_dict()
    keep = keep or {}
    for section, values in data.items():
        kept = keep.get(section) or {}
        data[section] = {
            key: value if key in kept else _retarget(value, old[section][key], new[section][key])
            for key, value in values.items()
        }
    data["train"]["task"] = task
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"configuration for task '{task}'")) from None


def run_collection_name(prefix: str) -> str:
    """A new Memory-service collection name: ``{prefix}-{YYYYmmdd-HHMMSS}-{6 hex}``."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix).strip("-.")[:40] or "run"
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def with_run_collection(config: Config, prefix: str) -> Config:
    """``config`` with ``memory.collection: auto`` replaced by a new name of this run's own (see
    :func:`run_collection_name`); a named collection is kept. Resolve at the run's edge, before
    the config is saved with the run, so that a resumed run replays its own collection."""
    if config.memory.collection != AUTO_COLLECTION:
        return config
    memory = config.memory.model_copy(update={"collection": run_collection_name(prefix)})
    return config.model_copy(update={"memory": memory})


def _fill(base: Mapping[str, Any], saved: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``saved`` with the keys it lacks taken from ``base``; an open mapping it has (a stage's
    completion criteria) is taken whole, so that no criterion the run did not have appears."""
    merged = dict(base)
    for key, value in saved.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and not _is_open(dotted):
            merged[key] = _fill(merged[key], value, dotted + ".")
        else:
            merged[key] = value
    return merged


def config_from_dict(data: Mapping[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config saved with a run, filling keys and sections added since from the defaults
    as loaded for the run's task (a checkpoint from before ``rewards``, ``tasks``, ``curriculum``
    and ``meta`` were saved gets what params.yaml gives its task, as it did then)."""
    base = load_raw()
    _check_keys(data, base, source)
    train = data.get("train")
    task = train.get("task") if isinstance(train, Mapping) else None
    if isinstance(task, str) and task:
        base = load_raw(overrides=[{"train": {"task": task}}])
    merged = _fill(base, data)
    core = {name: merged[name] for name in Config.model_fields}
    try:
        return Config.model_validate(core)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def resolve_device(name: str):
    """'auto' picks CUDA when it is present; nothing else assumes a GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine")
    return device
