"""Any registered Gymnasium environment as a vector environment, and env state capture.

The trainer steps N copies of an environment as one batch. For an env id this is Gymnasium's own
vector form when the env ships one (CartPole does: one numpy call steps every copy), else
``SyncVectorEnv``. Discrete actions fit a DQN; observations reach it as one flat vector (Discrete
ones one-hot, Dict and Tuple ones flattened). Anything else (images, continuous actions) is refused
with a clear error at construction time, not deep inside training.

Exact resume needs the environments' state too (positions, step counters, RNGs). Gymnasium has no
state API, so :func:`capture_env_state` records the plain-data attributes of the vector env, each
sub-env and every wrapper (numbers, arrays, strings, numpy Generators). Environments whose state
lives in foreign objects (a Box2D world, a MuJoCo simulation) are reported as not capturable and a
resumed run resets them instead. Task environments implement ``get_state``/``set_state``.
"""

from __future__ import annotations

import enum
from typing import Any

import gymnasium as gym
import numpy as np
import torch

# Attributes that are configuration or caches, never episode state.
_SKIPPED_ATTRIBUTES = frozenset(
    {"_saved_kwargs", "spec", "metadata", "env_fns", "_previous_data", "render_mode", "_cached_spec"}
)
_CONFIG_TYPES: tuple[type, ...] = (gym.Space, gym.envs.registration.EnvSpec, enum.Enum, type)


_MIN_COPIES_FOR_VECTOR_FORM = 4


class UnsupportedEnvironmentError(ValueError):
    """The environment cannot be learned by a DQN (observation or action space)."""


def is_gym_id(name: str) -> bool:
    return name in gym.envs.registration.registry


def make_gym_vector_env(
    env_id: str, num_envs: int, max_episode_steps: int | None = None
) -> gym.vector.VectorEnv:
    """Build ``num_envs`` copies of a registered env, vectorised the fastest way available."""
    if not is_gym_id(env_id):
        raise UnsupportedEnvironmentError(f"'{env_id}' is not a registered Gymnasium environment")
    spec = gym.spec(env_id)
    limit = max_episode_steps
    if spec.max_episode_steps is not None and limit is not None:
        limit = min(limit, spec.max_episode_steps)
    kwargs: dict[str, Any] = {}
    if limit is not None:
        kwargs["max_episode_steps"] = limit
    # An env's own vector form steps every copy in one numpy call but costs more per call than one
    # plain env; below a few copies the plain envs in SyncVectorEnv are faster.
    if spec.vector_entry_point is not None and num_envs >= _MIN_COPIES_FOR_VECTOR_FORM:
        envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    else:
        envs = _sync_vector_env(env_id, num_envs, kwargs)
    if _needs_flattening(envs.single_observation_space, env_id):
        envs.close()
        envs = _sync_vector_env(env_id, num_envs, kwargs, wrappers=[gym.wrappers.FlattenObservation])
    check_dqn_compatible(envs, env_id)
    return envs


def _sync_vector_env(
    env_id: str, num_envs: int, kwargs: dict[str, Any], wrappers: list[Any] | None = None
) -> gym.vector.VectorEnv:
    return gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        wrappers=wrappers,
        **kwargs,
    )


def _is_image(space: gym.Space[Any]) -> bool:
    """Pixels (H x W x C, or a 2-D uint8 frame): they need a convolutional network."""
    return isinstance(space, gym.spaces.Box) and (
        len(space.shape) == 3 or (len(space.shape) == 2 and space.dtype == np.uint8)
    )


def _needs_flattening(space: gym.Space[Any], name: str) -> bool:
    """Whether the observations reach the network through ``FlattenObservation``: a Discrete
    observation becomes a one-hot vector (Taxi, FrozenLake, CliffWalking), Dict, Tuple,
    MultiDiscrete and multi-dimensional Box observations one flat vector."""
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return False
    if _is_image(space) or any(_is_image(s) for s in _subspaces(space)):
        raise UnsupportedEnvironmentError(
            f"{name}: image observations ({space}) need a convolutional network, which this agent "
            "does not have yet: use an env with vector observations"
        )
    try:
        gym.spaces.flatten_space(space)
    except NotImplementedError:
        raise UnsupportedEnvironmentError(
            f"{name}: observations of type {type(space).__name__} cannot be flattened into a vector"
        ) from None
    return True


def _subspaces(space: gym.Space[Any]) -> list[gym.Space[Any]]:
    if isinstance(space, gym.spaces.Dict):
        return [s for sub in space.spaces.values() for s in [sub, *_subspaces(sub)]]
    if isinstance(space, gym.spaces.Tuple):
        return [s for sub in space.spaces for s in [sub, *_subspaces(sub)]]
    return []


def check_dqn_compatible(envs: gym.vector.VectorEnv, name: str) -> None:
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UnsupportedEnvironmentError(
            f"{name}: a DQN needs a flat Box observation space, got {obs_space}"
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UnsupportedEnvironmentError(
            f"{name}: a DQN needs a Discrete action space, got {act_space}"
        )


def autoreset_mode(envs: gym.vector.VectorEnv) -> gym.vector.AutoresetMode:
    mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
    return gym.vector.AutoresetMode(mode)


# --------------------------------------------------------------------------- state capture


class _NotPlain(Exception):
    pass


def _encode(value: Any) -> Any:
    """Encode plain data so that ``torch.load(weights_only=True)`` can read it back."""
    if isinstance(value, np.generic):  # before the primitives: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.random.Generator):
        return {"__rng__": type(value.bit_generator).__name__, "state": value.bit_generator.state}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise _NotPlain
        if value.dtype.kind in "SU":  # text arrays (FrozenLake's map): their bytes, as torch has no such dtype
            raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy()
            return {"__textarray__": torch.from_numpy(raw), "dtype": value.dtype.str, "shape": list(value.shape)}
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, (list, tuple)):
        items = [_encode(v) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    raise _NotPlain


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        return value["__ndarray__"].numpy().copy()
    if "__textarray__" in value:
        raw = value["__textarray__"].numpy()
        return raw.view(np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__rng__" in value:
        generator = np.random.Generator(getattr(np.random, value["__rng__"])())
        generator.bit_generator.state = value["state"]
        return generator
    raise ValueError(f"unknown encoded value {value!r}")


def _layers(envs: Any) -> list[Any]:
    """The vector env, then every wrapper layer of every sub-env, in a stable order."""
    layers = [envs]
    for sub in getattr(envs, "envs", []) or []:
        layer = sub
        while layer is not None:
            layers.append(layer)
            layer = getattr(layer, "env", None) if isinstance(layer, gym.Wrapper) else None
    return layers


def capture_env_state(envs: Any) -> dict[str, Any]:
    """Snapshot everything needed to continue the environments exactly where they are."""
    if hasattr(envs, "get_state"):
        return {"kind": "native", "state": _encode(envs.get_state()), "complete": True}
    snapshot: list[dict[str, Any]] = []
    complete = True
    for layer in _layers(envs):
        attrs: dict[str, Any] = {}
        for name, value in vars(layer).items():
            if name in _SKIPPED_ATTRIBUTES or name == "envs" or name == "env":
                continue
            if isinstance(value, _CONFIG_TYPES) or callable(value):
                continue
            try:
                attrs[name] = _encode(value)
            except _NotPlain:
                complete = False
        snapshot.append(attrs)
    return {"kind": "attributes", "layers": snapshot, "complete": complete}


def restore_env_state(envs: Any, state: dict[str, Any]) -> bool:
    """Restore a snapshot from :func:`capture_env_state`; False if it cannot be restored exactly."""
    if not state.get("complete", False):
        return False
    if state["kind"] == "native":
        if not hasattr(envs, "set_state"):
            return False
        envs.set_state(_decode(state["state"]))
        return True
    layers = _layers(envs)
    if len(layers) != len(state["layers"]):
        return False
    for layer, attrs in zip(layers, state["layers"]):
        for name, encoded in attrs.items():
            value = _decode(encoded)
            current = getattr(layer, name, None)
            if (
                isinstance(current, np.ndarray)
                and isinstance(value, np.ndarray)
                and current.shape == value.shape
                and current.dtype == value.dtype
            ):
                current[...] = value  # keep buffers that other objects hold references to
            else:
                setattr(layer, name, value)
    return True
