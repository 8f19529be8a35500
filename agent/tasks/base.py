"""What every task environment shares: a Gymnasium vector env stepping all copies as one batch.

A subclass holds its world as arrays with one entry per copy and implements: ``_layout`` (episode
layouts from uniforms, vectorised), ``_begin`` (start episodes from layouts), ``_advance`` (one
step of physics for every copy: fills the reward events and says which actions were
invalid/clipped), ``_observe`` (every row's observation into the persistent buffer),
``_episode_smoothness`` and ``_episode_metrics``.
This class does the rest the same way for every task: seeding, the time limit, the reward
manager, same-step autoreset with ``final_obs``, episode metrics, and exact state capture.

Rows and copies: a copy is one independent world (one episode at a time); a row is one acting
agent. Single-agent tasks have one row per copy; the multi-agent task has ``agents`` rows per
copy (copy c owns rows c*agents .. c*agents + agents - 1), all ending their episode together.
``num_envs`` (Gymnasium's name) is the number of rows: the batch the network sees.

Reward events live in preallocated arrays (``self.events``, one entry per row): the subclass
writes them in place every step; they are the ``info`` the reward manager's general path reads,
and the fast path turns them into the signal matrix without allocating.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from agent.config import Config
from agent.tasks.curriculum import TaskParameters
from agent.tasks.params import TasksSection, resolve
from agent.tasks.rewards import RewardComponent, RewardConfig, TaskRewardManager, efficiency_signal
from agent.tasks.spaces import ActionSpace
from agent.tasks.types import TaskType


# Episode metrics every task reports (the curriculum and the reward manager read them).
COMMON_METRICS = (
    "task_success",
    "collision_rate",
    "exploration_coverage",
    "cooperation_score",
    "tool_use_efficiency",
    "completion_time",
    "invalid_action_rate",
    "clipped_action_rate",
)
# Row of each built-in component in the signal matrix.
SIGNAL_ROW = {c: i for i, c in enumerate(RewardComponent)}
_EFFICIENCY = SIGNAL_ROW[RewardComponent.EFFICIENCY_BONUS]
LAYOUT_QUEUE = 8  # episode layouts drawn ahead per copy


class TaskStateError(ValueError):
    """A saved environment state does not fit this environment."""


class ObservationLayout:
    """Named slices of the flat observation, with the bounds of each slot."""

    def __init__(self, slots: Sequence[tuple[str, int, float, float]]) -> None:
        self.slices: dict[str, slice] = {}
        low, high, start = [], [], 0
        for name, size, lo, hi in slots:
            self.slices[name] = slice(start, start + size)
            low += [lo] * size
            high += [hi] * size
            start += size
        self.dim = start
        self.low = np.array(low, dtype=np.float32)
        self.high = np.array(high, dtype=np.float32)

    def describe(self) -> list[tuple[str, int, int]]:
        return [(name, s.start, s.stop) for name, s in self.slices.items()]


class BatchTaskEnv(gym.vector.VectorEnv):
    """Base of the task environments: ``num_envs`` copies (times ``agents`` rows) in one batch."""

    metadata: dict[str, Any] = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP, "render_modes": []}
    task_type: ClassVar[TaskType]
    extra_metrics: ClassVar[tuple[str, ...]] = ()
    # Names of per-copy (or per-row) state arrays a subclass adds; get_state/set_state carry them.
    state_arrays: ClassVar[tuple[str, ...]] = ()
    # Those of them that every new episode starts at zero.
    episode_arrays: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        num_envs: int,
        *,
        task_params: Any = None,
        reward_config: RewardConfig | None = None,
        max_episode_steps: int | None = None,
        agents: int = 1,
        config: Config | None = None,
    ) -> None:
        """``config``: the resolved configuration whose ``tasks`` (physics, sensors, per-task
        settings), ``rewards`` (weights, unless ``reward_config`` is given) and ``curriculum``
        (the first stage, when ``task_params`` is None) this env uses; None: params.yaml's."""
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.config: Config = resolve(config)
        self.settings: TasksSection = self.config.tasks
        self.params = TaskParameters.coerce(task_params, config=self.config)
        self.copies = int(num_envs)
        self.agents = int(agents)
        self.num_envs = self.copies * self.agents
        self.dt = self.settings.dt
        limit = self.params.max_steps(self.dt)
        self.max_steps = min(limit, max_episode_steps) if max_episode_steps is not None else limit
        self.rewards = TaskRewardManager(
            self.task_type,
            reward_config if reward_config is not None else RewardConfig.from_config(self.config),
            resource_value=self.settings.exploration.resource_value,
        )
        self._fast_rewards = self.rewards.builtin_only

        self.model: ActionSpace = self._build_action_space()
        self.layout = self._build_layout()
        self.single_observation_space = gym.spaces.Box(self.layout.low, self.layout.high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(self._n_actions())
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        rows = self.num_envs
        self._obs = np.zeros((rows, self.layout.dim), dtype=np.float32)
        self._signals = np.zeros((len(self.rewards.order), rows))
        self._signals[SIGNAL_ROW[RewardComponent.TIME_PENALTY]] = 1.0
        self.events: dict[str, np.ndarray] = {
            "progress": self._signals[SIGNAL_ROW[RewardComponent.BASE_REWARD]],
            "collisions": self._signals[SIGNAL_ROW[RewardComponent.COLLISION_PENALTY]],
            "success": self._signals[SIGNAL_ROW[RewardComponent.COMPLETION_BONUS]],
            "new_cells": np.zeros(rows),
            "new_resources": np.zeros(rows),
            "formation_progress": np.zeros(rows),
            "joint_finish": np.zeros(rows),
            "smoothness": np.zeros(rows),
        }
        self._success = self.events["success"]
        self._t = np.zeros(self.copies, dtype=np.int64)
        self._episode_invalid = np.zeros(rows, dtype=np.int64)
        self._episode_clipped = np.zeros(rows, dtype=np.int64)
        self._episode_collisions = np.zeros(rows, dtype=np.int64)
        self._rngs: list[np.random.Generator] = [np.random.default_rng() for _ in range(self.copies)]
        self._next: dict[str, np.ndarray] = {}  # every copy's coming episode layouts
        self._cursor = np.full(self.copies, LAYOUT_QUEUE)  # next unused layout of each copy
        self._component_names = list(self.rewards.names)
        self._metric_names = COMMON_METRICS + self.extra_metrics
        self._reset_done = False
        self._efficiency_set = False
        self._action_shape = (self.num_envs,)

    # ------------------------------------------------------------------ subclass interface

    def _build_action_space(self) -> ActionSpace:
        raise NotImplementedError

    def _build_layout(self) -> ObservationLayout:
        raise NotImplementedError

    def _n_actions(self) -> int:
        return int(self.model.discrete_actions().shape[0])

    def _draws(self) -> int:
        """Uniforms one episode's layout takes from its copy's generator."""
        raise NotImplementedError

    def _layout(self, copies: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        """Episode layouts (obstacles, start, goal, ...) for ``copies`` from uniforms ``u``
        [len(copies), draws]: arrays with one leading entry per copy. A pure function."""
        raise NotImplementedError

    def _begin(self, copies: np.ndarray, layout: dict[str, np.ndarray]) -> None:
        """Start the episodes of ``copies`` from their layouts (episode arrays are zeroed)."""
        raise NotImplementedError

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step of every copy. Writes the reward events (``self.events``, in place) except
        ``smoothness``; returns (invalid, clipped) bool masks over rows."""
        raise NotImplementedError

    def _observe(self) -> None:
        """Write every row's observation into ``self._obs``."""
        raise NotImplementedError

    def _episode_smoothness(self) -> np.ndarray:
        """Mean action smoothness of each row's episode so far, in [0, 1]."""
        raise NotImplementedError

    def _episode_metrics(self, copies: np.ndarray) -> dict[str, np.ndarray]:
        """Task metrics of the episodes ending in ``copies``: one value per row of those copies."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _rows(self, per_copy: np.ndarray) -> np.ndarray:
        """A per-copy array as one entry per row."""
        return per_copy if self.agents == 1 else np.repeat(per_copy, self.agents, axis=0)

    def _copy_rows(self, copies: np.ndarray) -> np.ndarray:
        if self.agents == 1:
            return copies
        return (copies[:, None] * self.agents + np.arange(self.agents)).reshape(-1)

    def _uniforms(self, copies: np.ndarray, count: int) -> np.ndarray:
        """``count`` uniforms per copy from each copy's own generator: per-copy reproducibility."""
        return np.stack([self._rngs[c].random(count) for c in copies])

    def _reset_copies(self, copies: np.ndarray) -> None:
        """New episodes in ``copies``. Layouts are drawn ahead of time, ``LAYOUT_QUEUE`` per copy,
        for every copy whose queue ran out in one vectorised pass, so a reset is a copy of
        arrays. Copy c's n-th episode still comes from its generator's n-th draw, whenever the
        pass happens: seeding stays per copy."""
        if (self._cursor[copies] >= LAYOUT_QUEUE).any():
            todo = np.flatnonzero(self._cursor >= LAYOUT_QUEUE)
            draws = self._uniforms(todo, LAYOUT_QUEUE * self._draws())
            fresh = self._layout(np.repeat(todo, LAYOUT_QUEUE), draws.reshape(len(todo) * LAYOUT_QUEUE, -1))
            for name, values in fresh.items():
                queued = values.reshape((len(todo), LAYOUT_QUEUE) + values.shape[1:])
                if name not in self._next:
                    self._next[name] = np.zeros((self.copies,) + queued.shape[1:], dtype=values.dtype)
                self._next[name][todo] = queued
            self._cursor[todo] = 0
        for name in self.episode_arrays:
            getattr(self, name)[copies] = 0
        rows = self._copy_rows(copies)
        for counter in (self._episode_invalid, self._episode_clipped, self._episode_collisions):
            counter[rows] = 0
        slot = self._cursor[copies]
        self._begin(copies, {name: values[copies, slot] for name, values in self._next.items()})
        self._cursor[copies] += 1

    # ------------------------------------------------------------------ Gymnasium API

    def reset(
        self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """All copies start new episodes; with ``seed``, copy i draws from ``default_rng(seed + i)``."""
        if seed is not None:
            seeds = [int(seed) + i for i in range(self.copies)] if np.isscalar(seed) else [int(s) for s in seed]
            if len(seeds) != self.copies:
                raise ValueError(f"{len(seeds)} seeds for {self.copies} copies")
            self._rngs = [np.random.default_rng(s) for s in seeds]
            self._cursor[:] = LAYOUT_QUEUE
        self._t[:] = 0
        self._reset_copies(np.arange(self.copies))
        self._observe()
        self._reset_done = True
        return self._obs.copy(), {}

    def step(
        self, actions: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._reset_done:
            raise RuntimeError("call reset() before step()")
        if not (type(actions) is np.ndarray and actions.dtype == np.int64 and actions.flags.c_contiguous):
            actions = self._as_actions(actions)
        if actions.shape != self._action_shape:
            raise ValueError(f"expected {self.num_envs} actions, got shape {actions.shape}")

        self._t += 1
        invalid, clipped = self._advance(actions)
        success = self._success
        terminated = success > 0.5
        truncated = self._rows(self._t >= self.max_steps)
        done = terminated | truncated
        any_done = np.count_nonzero(done) > 0
        if any_done:
            smooth = self.events["smoothness"]
            np.multiply(self._episode_smoothness(), success, out=smooth)
            efficiency_signal(success, smooth, out=self._signals[_EFFICIENCY])
            self._efficiency_set = True
        elif self._efficiency_set:  # only finishing rows carry the efficiency signal
            self._signals[_EFFICIENCY] = 0.0
            self.events["smoothness"][:] = 0.0
            self._efficiency_set = False
        if self._fast_rewards:
            reward, components = self.rewards.weigh(self._signals)
        else:
            reward, parts = self.rewards.calculate_reward(None, actions, None, self.events)
            components = np.stack([parts[name] for name in self._component_names])
        self._episode_invalid += invalid
        self._episode_clipped += clipped
        self._observe()
        info: dict[str, Any] = {
            "action_invalid": invalid,
            "action_clipped": clipped,
            "reward_components": dict(zip(self._component_names, components)),
        }
        if any_done:
            self._finish(done, info)
        return self._obs.copy(), reward, terminated, truncated, info

    @staticmethod
    def _as_actions(actions: Any) -> np.ndarray:
        array = np.asarray(actions)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"actions must be integers, got dtype {array.dtype}")
        return np.ascontiguousarray(array, dtype=np.int64)

    def _finish(self, done: np.ndarray, info: dict[str, Any]) -> None:
        """Report the finished episodes and start new ones in the same call (same-step autoreset)."""
        info["final_obs"] = self._obs.copy()
        info["_final_obs"] = done
        copies = np.flatnonzero(done[:: self.agents]) if self.agents > 1 else np.flatnonzero(done)
        rows = self._copy_rows(copies)
        steps = self._rows(self._t)[rows].astype(np.float64)
        values = self._episode_metrics(copies)
        values["task_success"] = self.events["success"][rows]
        values["completion_time"] = steps
        values["collision_rate"] = self._episode_collisions[rows] / steps
        values["invalid_action_rate"] = self._episode_invalid[rows] / steps
        values["clipped_action_rate"] = self._episode_clipped[rows] / steps
        names = self._metric_names
        finished = np.zeros((len(names), len(rows)))
        for i, name in enumerate(names):
            if name in values:
                finished[i] = values[name]
        table = np.zeros((len(names), self.num_envs), dtype=np.float32)
        table[:, rows] = finished
        info["task_metrics"] = dict(zip(names, table))
        info["_task_metrics"] = done
        self.rewards.end_episodes(rows, names, finished)
        self.model.record(int(self._episode_invalid[rows].sum()), int(self._episode_clipped[rows].sum()), int(steps.sum()))
        self._t[copies] = 0
        self._reset_copies(copies)
        self._observe()

    # ------------------------------------------------------------------ state

    def _state_names(self) -> tuple[str, ...]:
        return ("_obs", "_t", "_episode_invalid", "_episode_clipped", "_episode_collisions", "_cursor") + self.state_arrays

    def get_state(self) -> dict[str, Any]:
        """Everything the next step depends on, as plain data (arrays, numbers, Generators)."""
        return {
            "task": self.task_type.value,
            "copies": self.copies,
            "agents": self.agents,
            "max_steps": self.max_steps,
            "params": self.params.to_dict(),
            "arrays": {name: np.array(getattr(self, name), copy=True) for name in self._state_names()},
            "rngs": [_clone(rng) for rng in self._rngs],
            "next": {name: values.copy() for name, values in self._next.items()},
            "rewards": self.rewards.state_dict(),
            "action_space": self.model.state_dict(),
            "reset_done": self._reset_done,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where :meth:`get_state` was taken."""
        expected = {"task": self.task_type.value, "copies": self.copies, "agents": self.agents, "max_steps": self.max_steps}
        for key, value in expected.items():
            if state.get(key) != value:
                raise TaskStateError(f"saved environment state has {key}={state.get(key)!r}, this one {value!r}")
        if TaskParameters.coerce(state.get("params"), config=self.config) != self.params:
            raise TaskStateError("saved environment state was taken under different task parameters")
        arrays = state["arrays"]
        for name in self._state_names():
            current = getattr(self, name)
            saved = np.asarray(arrays.get(name))
            if saved.shape != current.shape or saved.dtype != current.dtype:
                raise TaskStateError(
                    f"saved array {name} has shape {saved.shape} {saved.dtype}, expected {current.shape} {current.dtype}"
                )
        if len(state["rngs"]) != self.copies:
            raise TaskStateError(f"saved state has {len(state['rngs'])} generators for {self.copies} copies")
        for name in self._state_names():
            current = getattr(self, name)
            current[...] = arrays[name]  # in place: views into these arrays stay valid
        self._rngs = [_clone(rng) for rng in state["rngs"]]
        self._next = {name: np.array(values, copy=True) for name, values in state["next"].items()}
        self.rewards.load_state_dict(state["rewards"])
        self.model.load_state_dict(state["action_space"])
        self._reset_done = bool(state["reset_done"])
        self._after_set_state()

    def _after_set_state(self) -> None:
        """Recompute caches derived from the state arrays (nothing by default)."""

    def use_reward_manager(self, manager: TaskRewardManager) -> None:
        """Reward with a customised manager (one with extra components, see rewards.py)."""
        if not isinstance(manager, TaskRewardManager):
            raise TypeError(f"expected a TaskRewardManager, got {type(manager).__name__}")
        self.rewards = manager
        self._fast_rewards = manager.builtin_only
        self._component_names = list(manager.names)

    # ------------------------------------------------------------------ reporting

    def action_metrics(self) -> dict[str, Any]:
        """Invalid and clipped action counts and rates, including episodes in progress."""
        metrics = self.model.get_metrics()
        invalid = metrics["invalid_action_count"] + int(self._episode_invalid.sum())
        clipped = metrics["clipped_action_count"] + int(self._episode_clipped.sum())
        total = metrics["actions_processed"] + int(self._rows(self._t).sum())
        return {
            "invalid_action_count": invalid,
            "invalid_action_rate": invalid / max(total, 1),
            "clipped_action_count": clipped,
            "clipped_action_rate": clipped / max(total, 1),
            "actions": total,
        }

    def describe(self) -> dict[str, Any]:
        """Observation layout and action meanings: what a person needs to read a policy."""
        return {
            "task": self.task_type.value,
            "rows_per_copy": self.agents,
            "observation": self.layout.describe(),
            "actions": self.model.action_labels(),
            "max_steps": self.max_steps,
            "dt": self.dt,
        }


def _clone(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator in the same state (a saved state must not move with the env)."""
    copy = np.random.Generator(type(rng.bit_generator)())
    copy.bit_generator.state = rng.bit_generator.state
    return copy

