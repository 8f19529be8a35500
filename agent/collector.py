"""The Collector: acting, apart from learning.

It steps N copies of an environment as one batch with a policy (a live network or a snapshot of
one) and an exploration rate, and writes every transition to its sinks: the local ring, the
Memory-service client, or anything with ``add(obs, actions, rewards, next_obs, dones)``. It hands
finished episodes (team return, length, task metrics) back to whoever runs it, and knows nothing
of gradients, optimizers or budgets.

n-step returns (``replay.n_step``) are built here, per environment copy: the collector is the
one part that sees which copy a row came from, whether its episode terminated or was truncated,
and when episodes are cut from outside (a curriculum stage, a restart), and a remote actor sends
finished n-step rows as Ape-X's do. Sinks that set ``n_step_rows`` (the local buffer) get the
n-step rows of :mod:`agent.nstep`; every other sink (the Memory service's) gets the 1-step rows,
as before. The open windows are part of the collector's state, so a resumed run is the same run.

It is also the unit a distributed run places on remote actors, so it can be built from a config
and a state dict alone (:meth:`Collector.from_state`) and pickles to exactly that: the
environments, and the sinks (which hold connections), are rebuilt or reattached on the far side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import gymnasium as gym
import numpy as np
import torch

from agent.config import Config, config_from_dict
from agent.nstep import NStepWindows
from agent.policy import EpsilonGreedy
from agent.tasks import (
    TaskParameters,
    TaskType,
    autoreset_mode,
    capture_env_state,
    make_vector_env,
    restore_env_state,
)


class TransitionSink(Protocol):
    """Where a step's transitions go (the local buffer has this method already).

    A sink gets 1-step rows unless it has ``n_step_rows = True``: then, with ``replay.n_step``
    above 1, it gets n-step rows whose ``dones`` column is a bootstrap mask (see
    :mod:`agent.nstep`)."""

    def add(self, obs: Any, actions: Any, rewards: Any, next_obs: Any, dones: Any) -> None: ...


class MemorySink:
    """Transitions to the Memory service, through the client's outbox (returns at once)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def add(self, obs: Any, actions: Any, rewards: Any, next_obs: Any, dones: Any) -> None:
        obs = np.asarray(obs, dtype=np.float32)
        self.client.write_transitions(
            obs,
            np.atleast_1d(np.asarray(actions, dtype=np.int64)),
            np.atleast_1d(np.asarray(rewards, dtype=np.float32)),
            np.asarray(next_obs, dtype=np.float32).reshape(obs.shape),
            np.atleast_1d(np.asarray(dones, dtype=np.float32)),
        )


class EpisodeRows:
    """The transitions of each environment's running episode, held back from the Memory service
    until the episode ends, then stored tagged with its return (``replay.tag_episode_returns``),
    so that similar-state search can prefer neighbours from successful episodes."""

    def __init__(self, client: Any, num_envs: int) -> None:
        self.client = client
        self._rows: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(num_envs)]

    def add(
        self,
        valid: np.ndarray | None,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        dones: np.ndarray,
    ) -> None:
        """One vector step's transitions (``valid``: which rows are real; None: all)."""
        for env in range(len(obs)) if valid is None else np.flatnonzero(valid):
            self._rows[env].append(
                (obs[env].copy(), actions[env], rewards[env], next_obs[env].copy(), dones[env])
            )

    def store(self, envs: np.ndarray | None, returns: np.ndarray | None) -> None:
        """Store the held rows of ``envs`` (None: all, untagged) tagged with ``returns``, one
        value per env, in one batch; those envs start a new episode."""
        chosen = range(len(self._rows)) if envs is None else envs
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for i, env in enumerate(chosen):
            rows, self._rows[env] = self._rows[env], []
            for row in rows:
                for column, value in zip(columns, row):
                    column.append(value)
            columns[5].extend([np.nan if returns is None else float(returns[i])] * len(rows))
        if columns[0]:
            self.client.write_transitions(*(np.asarray(column) for column in columns))


class FinishedEpisode(NamedTuple):
    """One finished episode (for the multi-agent task, a team's: the mean of its agents' returns)."""

    reward: float
    length: int
    metrics: dict[str, float]


class StepResult(NamedTuple):
    steps: int
    """transitions this vector step produced (rows that were resetting produce none)"""
    episodes: list[FinishedEpisode]


def team_metrics(task_metrics: Mapping[str, np.ndarray], team: slice) -> dict[str, float]:
    """A finished team's episode metrics: the mean over its agents' rows (one row if alone)."""
    return {key: float(np.mean(values[team])) for key, values in task_metrics.items() if key != "agent_index"}


def episode_step_cap(config: Config) -> int | None:
    """``train.max_steps_per_episode`` for a Gymnasium env; None for a task type.

    A task type's episode ends at its stage's time limit (``time_limit / tasks.dt`` steps):
    the spec's beginner stage has 300 s (600 steps) and its training_config 500 steps, and
    the stage's limit must hold, so the step cap does not apply there. Shorten a task's
    episodes through the stage's ``time_limit`` instead.
    """
    if TaskType.parse(config.train.task) is not None:
        return None
    return config.train.max_steps_per_episode


def make_envs(
    config: Config, num_envs: int, task_params: Any = None, reward_config: Any = None
) -> gym.vector.VectorEnv:
    """The vector environment ``config`` describes (task, step cap), at ``task_params``."""
    return make_vector_env(
        config.train.task,
        num_envs,
        max_episode_steps=episode_step_cap(config),
        task_params=task_params,
        reward_config=reward_config,
        config=config,
    )


class Collector:
    """Steps ``config.train.num_envs`` environment copies with ``policy``, feeding ``sinks``."""

    def __init__(
        self,
        config: Config,
        policy: EpsilonGreedy,
        *,
        task_params: Any = None,
        reward_config: Any = None,
        sinks: Sequence[TransitionSink] = (),
        episode_sink: EpisodeRows | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.task_params = task_params
        self.reward_config = reward_config
        self.sinks = list(sinks)
        self.episode_sink = episode_sink
        self.envs = make_envs(config, config.train.num_envs, task_params, reward_config)
        self._mode = autoreset_mode(self.envs)
        self.rows_per_copy = int(getattr(self.envs, "agents", 1))  # agents per team
        n = self.envs.num_envs
        self.obs: np.ndarray | None = None
        self.ep_return = np.zeros(n, dtype=np.float64)
        self.ep_length = np.zeros(n, dtype=np.int64)
        self.pending_reset = np.zeros(n, dtype=bool)
        self.actions_taken = 0
        self.invalid_actions = 0
        self.clipped_actions = 0
        self.n_step_windows: NStepWindows | None = self._windows_for(config)

    def _windows_for(self, config: Config) -> NStepWindows | None:
        n = config.replay.n_step
        return NStepWindows(n, config.train.gamma, self.envs.num_envs) if n > 1 else None

    def _follow_n_step_settings(self) -> None:
        """``replay.n_step`` or ``train.gamma`` changed during a run (the trainer's reconfigure):
        the open windows are emitted under the new settings as cut short, and new ones begin."""
        config = self.config
        wanted = (config.replay.n_step, config.train.gamma)
        old = self.n_step_windows
        if (old is None and wanted[0] == 1) or (old is not None and old.settings == wanted):
            return
        self.n_step_windows = self._windows_for(config)
        if old is not None and self.obs is not None:
            self._write_n_step(old.close_all(self.obs, settings=wanted))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_state(
        cls,
        config: Config | Mapping[str, Any],
        state: Mapping[str, Any],
        *,
        sinks: Sequence[TransitionSink] = (),
    ) -> Collector:
        """A collector from a config and a state dict (:meth:`state_dict`), nothing else: what a
        remote actor is started with. Its policy is a snapshot of the state's network."""
        if not isinstance(config, Config):
            config = config_from_dict(config, source="collector state")
        policy_state = state["policy"]
        policy = EpsilonGreedy.from_state(
            policy_state["architecture"], policy_state["weights"], seed=config.run.seed
        )
        if policy_state.get("rng") is not None:
            policy.rng.bit_generator.state = policy_state["rng"]
        task_params = state.get("task_params")
        if task_params is not None:
            task_params = TaskParameters.coerce(task_params, config=config)
        collector = cls(config, policy, task_params=task_params, sinks=sinks)
        if state.get("envs") is not None:
            collector.load_state_dict(state["envs"])
        return collector

    def __getstate__(self) -> dict[str, Any]:
        # Environments and sinks do not travel: a collector pickles to its config and state.
        return {"config": self.config.to_dict(), "state": self.full_state()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        twin = Collector.from_state(data["config"], data["state"])
        self.__dict__.update(twin.__dict__)

    def full_state(self) -> dict[str, Any]:
        """The policy snapshot, the task parameters and the environments' state."""
        network = self.policy.network
        return {
            "policy": {
                "architecture": network.architecture.to_dict(),
                "weights": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
                "rng": self.policy.rng.bit_generator.state,
            },
            "task_params": self.task_params.to_dict() if isinstance(self.task_params, TaskParameters) else None,
            "envs": self.state_dict() if self.obs is not None else None,
        }

    # ------------------------------------------------------------------ acting

    @property
    def num_envs(self) -> int:
        return int(self.envs.num_envs)

    @property
    def reward_manager(self) -> Any:
        """The task's TaskRewardManager (None for Gymnasium envs)."""
        return getattr(self.envs, "rewards", None)

    def reset(self, seed: int) -> None:
        """Start every copy's first episode (seeded)."""
        self.obs, _ = self.envs.reset(seed=seed)

    def step(self, epsilon: float) -> StepResult:
        """One vector step: act, step, write the transitions, account for finished episodes."""
        obs = self.obs
        assert obs is not None, "reset() the collector first"
        actions = self.policy.act(obs, epsilon)
        next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
        done = terminated | truncated

        if self._mode == gym.vector.AutoresetMode.NEXT_STEP:
            # Rows that just reset produced no transition: their action was ignored.
            valid = ~self.pending_reset
            self.pending_reset = done
            real_next = next_obs
        else:
            valid = None
            real_next = next_obs
            if "_final_obs" in info and info["_final_obs"].any():
                real_next = next_obs.copy()
                mask = info["_final_obs"]
                final = info["final_obs"]
                real_next[mask] = np.stack(final[mask]) if final.dtype == object else final[mask]

        held = self.episode_sink
        if held is not None:
            held.add(valid, obs, actions, rewards, real_next, terminated)
        self._follow_n_step_settings()
        if valid is None or valid.all():
            self._write(None, obs, actions, rewards, real_next, terminated, truncated)
            n_valid = len(actions)
            self.ep_return += rewards
            self.ep_length += 1
        else:
            n_valid = int(valid.sum())
            if n_valid:
                self._write(
                    valid, obs[valid], actions[valid], rewards[valid], real_next[valid],
                    terminated[valid], truncated[valid],
                )
            self.ep_return[valid] += rewards[valid]
            self.ep_length[valid] += 1
            done = done & valid
        self.actions_taken += n_valid
        if "action_invalid" in info:
            self.invalid_actions += int(np.count_nonzero(info["action_invalid"]))
            self.clipped_actions += int(np.count_nonzero(info["action_clipped"]))
        self.obs = next_obs
        episodes: list[FinishedEpisode] = []
        if done.any():
            rows = np.flatnonzero(done)
            k = self.rows_per_copy
            if held is not None:  # tagged with the episode's return as the episodes below count it
                team_returns = np.repeat(self.ep_return.reshape(-1, k).mean(axis=1), k)
                held.store(rows, team_returns[rows])
            has_metrics = "_task_metrics" in info
            for copy in np.unique(rows // k):
                team = slice(copy * k, copy * k + k)
                metrics: dict[str, float] = {}
                if has_metrics and info["_task_metrics"][copy * k]:
                    metrics = team_metrics(info["task_metrics"], team)
                episodes.append(
                    FinishedEpisode(float(self.ep_return[team].mean()), int(self.ep_length[copy * k]), metrics)
                )
                self.ep_return[team] = 0.0
                self.ep_length[team] = 0
        return StepResult(n_valid, episodes)

    def _write(
        self,
        valid: np.ndarray | None,
        obs: Any,
        actions: Any,
        rewards: Any,
        next_obs: Any,
        terminated: Any,
        truncated: Any,
    ) -> None:
        """The step's rows (of the copies ``valid`` marks; None: all) to every sink: 1-step rows,
        or, with ``replay.n_step`` > 1, the n-step rows they completed to ``n_step_rows`` sinks."""
        windows = self.n_step_windows
        if windows is None:
            for sink in self.sinks:
                sink.add(obs, actions, rewards, next_obs, terminated)
            return
        rows = None if valid is None else np.flatnonzero(valid)
        completed = windows.push(rows, obs, actions, rewards, next_obs, terminated, truncated)
        for sink in self.sinks:
            if getattr(sink, "n_step_rows", False):
                if completed is not None:
                    sink.add(*completed)
            else:
                sink.add(obs, actions, rewards, next_obs, terminated)

    def _write_n_step(self, rows: tuple[np.ndarray, ...] | None) -> None:
        """n-step rows emitted outside a step (episodes cut short) to the ``n_step_rows`` sinks."""
        if rows is None:
            return
        for sink in self.sinks:
            if getattr(sink, "n_step_rows", False):
                sink.add(*rows)

    def rollout(self, steps: int, epsilon: float) -> list[FinishedEpisode]:
        """``steps`` vector steps at a fixed exploration rate (an actor's unit of work)."""
        finished: list[FinishedEpisode] = []
        for _ in range(steps):
            finished.extend(self.step(epsilon).episodes)
        return finished

    def use_task_params(self, task_params: Any, seed: int) -> None:
        """New environments at ``task_params`` (a curriculum stage); running episodes end there.

        The reward manager and its metrics carry over; rows held for tagging go out untagged;
        open n-step windows go out as truncated (bootstrapping from the state they were cut at).
        """
        if self.n_step_windows is not None and self.obs is not None:
            self._write_n_step(self.n_step_windows.close_all(self.obs))
        rewards = self.reward_manager
        self.envs.close()
        self.task_params = task_params
        self.envs = make_envs(self.config, self.config.train.num_envs, task_params, self.reward_config)
        if rewards is not None:
            self.envs.use_reward_manager(rewards)
        self.ep_return[:] = 0.0
        self.ep_length[:] = 0
        self.pending_reset[:] = False
        self.reset(seed)
        if self.episode_sink is not None:
            self.episode_sink.store(None, None)

    def flush(self) -> None:
        """Episodes still running: their held rows go out untagged.

        Open n-step windows stay open: they are part of the run's state (a resumed run continues
        them), and a run that ends learns nothing more from them."""
        if self.episode_sink is not None:
            self.episode_sink.store(None, None)

    def close(self) -> None:
        self.envs.close()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on, besides the policy: observations, running
        episodes, the environments' own state, and the action counters."""
        assert self.obs is not None
        state: dict[str, Any] = {
            "obs": torch.from_numpy(np.array(self.obs, dtype=np.float32)),
            "ep_return": torch.from_numpy(self.ep_return.copy()),
            "ep_length": torch.from_numpy(self.ep_length.copy()),
            "pending_reset": torch.from_numpy(self.pending_reset.copy()),
            "env": capture_env_state(self.envs),
            "invalid_actions": self.invalid_actions,
            "clipped_actions": self.clipped_actions,
            "actions_taken": self.actions_taken,
        }
        if self.n_step_windows is not None:  # steps of running episodes not yet in a transition
            state["n_step_windows"] = self.n_step_windows.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Restore :meth:`state_dict`; False (counters restored, episodes not) when the
        environments cannot be restored exactly: the caller then starts new episodes."""
        self.invalid_actions = int(state["invalid_actions"])
        self.clipped_actions = int(state["clipped_actions"])
        self.actions_taken = int(state["actions_taken"])
        restored = len(state["ep_return"]) == self.num_envs and restore_env_state(self.envs, state["env"])
        if restored:
            self.obs = state["obs"].numpy().copy()
            self.ep_return = state["ep_return"].numpy().copy()
            self.ep_length = state["ep_length"].numpy().copy()
            self.pending_reset = state["pending_reset"].numpy().copy()
        if self.n_step_windows is not None:
            saved = state.get("n_step_windows")
            if restored and saved is not None and int(saved["n"]) == self.n_step_windows.n:
                self.n_step_windows.load_state_dict(saved)
            else:  # new episodes, or windows of another n (a few rows per copy are not learned)
                self.n_step_windows.clear()
        return restored

    def restart_episodes(self, seed: int) -> None:
        """New episodes everywhere (a resumed run whose environments could not be restored)."""
        if self.n_step_windows is not None:
            self.n_step_windows.clear()
        self.reset(seed)
        self.ep_return[:] = 0.0
        self.ep_length[:] = 0
        self.pending_reset[:] = False
