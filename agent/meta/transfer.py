"""Moving a trained policy to another task: load it, match what the tasks share, copy what fits.

Layers whose tensors fit the target network are copied whole; between task types the input and
output layers also keep the weights of the observation slots and actions both tasks name alike.
Nothing here trains: :mod:`agent.meta.adaptation` fine-tunes what this module builds.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import CheckpointError, check_buffer_size, load_checkpoint_file
from agent.config import Config, config_from_dict
from agent.dqn import LearningAgent
from agent.meta.options import MetaLearningError, TransferLayers
from agent.meta.targets import resolve_task
from agent.network import NetworkArchitecture
from agent.tasks import make_vector_env, task_spaces
from agent.training import Trainer


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


def source_policy(source: Any, trainer: Trainer | None = None) -> tuple[LearningAgent, str]:
    """The policy ``source`` names, and a label for it.

    ``source`` is a ``LearningAgent``, a run directory or checkpoint file, or a task name whose
    policy is ``trainer``'s agent (the trainer must have learned that task).
    """
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


def source_name(label: str) -> str:
    """A short name of a source policy for study names: a checkpoint's run directory, else the label."""
    path = Path(label)
    if path.suffix == ".pt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run.name or path.stem
    return label


IndexPairs = tuple[list[int], list[int]]
"""(source indices, target indices) of the same meaning."""


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
    groups: dict[str, list[str]] = {}
    for name in target_state:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    first, last = next(iter(groups)), next(reversed(groups))
    transferred: list[str] = []
    reinitialized: list[str] = []
    partial: dict[str, str] = {}
    for layer, names in groups.items():
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
    obs_dim, n_actions = task_spaces(task, config=config)
    architecture = dataclasses.replace(source.architecture, input_dim=obs_dim, output_dim=n_actions)
    adapted = LearningAgent(obs_dim, n_actions, config=config, architecture=architecture)
    shared = match_features(source.config.train.task, task) if match else None
    transferred, reinitialized, partial = transfer_weights(source.q_network, adapted.q_network, shared, layers)
    adapted.update_target_network()
    return adapted, transferred, reinitialized, partial


def clone_agent(agent: LearningAgent, config: Config | None = None) -> LearningAgent:
    """An independent copy of an agent (weights, optimiser, buffer, RNG), optionally with another config."""
    copy = LearningAgent(
        agent.input_size, agent.output_size, config=config or agent.config, architecture=agent.architecture
    )
    copy.load_state_dict(agent.state_dict(include_buffer=True))
    copy.set_learning_rate((config or agent.config).train.learning_rate)
    return copy
