"""TrainingManager: runs the agent in N environment copies, learns, evaluates, checkpoints.

The loop follows the spec (select epsilon-greedy actions, step, store, learn, update metrics,
decay exploration, checkpoint) over a *vector* environment, so one forward pass picks the actions
of every copy. A checkpoint holds everything the next step depends on (weights, optimizer,
buffer, counters, epsilon, the environments' state and every RNG), so a resumed run continues
exactly where it stopped.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

from agent.checkpoint import CheckpointError, check_buffer_size, load_checkpoint_file, save_checkpoint_file
from agent.config import Config, config_for_task, config_from_dict, with_overrides
from agent.dqn import LearningAgent
from agent.network import NetworkArchitecture
from agent.metrics import MetricsSink, MultiSink, NullSink, TensorBoardSink, log_histogram
from agent.monitoring import SystemMonitor
from agent.tasks import (
    CurriculumManager,
    TaskParameters,
    TaskType,
    autoreset_mode,
    capture_env_state,
    make_vector_env,
    restore_env_state,
    task_name,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Mapping[str, float]], None]
_RECENT = 100  # episodes in the rolling reward mean


def _team_metrics(task_metrics: Mapping[str, np.ndarray], team: slice) -> dict[str, float]:
    """A finished team's episode metrics: the mean over its agents' rows (one row if alone)."""
    return {key: float(np.mean(values[team])) for key, values in task_metrics.items() if key != "agent_index"}


class EpisodeRows:
    """The transitions of each environment's running episode, held back from the Memory service
    until the episode ends, then stored tagged with its return (``replay.tag_episode_returns``),
    so that similar-state search can prefer neighbours from successful episodes."""

    def __init__(self, num_envs: int) -> None:
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

    async def store(self, client: Any, envs: np.ndarray | None, returns: np.ndarray | None) -> None:
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
            await client.store_transitions(*(np.asarray(column) for column in columns))


class TrainingManager:
    """Orchestrates the interaction between a LearningAgent and its environments.

    ``task_type`` is a task type or any registered Gymnasium env id (default: ``train.task``).
    ``training_config`` overrides keys of the ``train`` section (the spec's ``max_episodes``,
    ``max_steps_per_episode``, ``epsilon_start/end/decay``, ``checkpoint_frequency``, ...).
    ``use_curriculum`` walks a task type through the curriculum's stages, rebuilding the
    environments when a stage is passed; ``reward_config`` customises the task's rewards.
    With a ``run_dir`` the trainer writes checkpoints, TensorBoard events and an episode log.
    Every ``train.log_interval`` steps the sinks get the window's losses, throughput (``time/``),
    process memory and CPU use, GPU memory and utilisation on CUDA (``system/``), per-layer
    gradient norms (``grad_norm/``) and the Memory service's round-trip latency (``memory/``);
    weight and gradient histograms go to TensorBoard every ``train.histogram_interval`` updates.
    For the multi-agent task an episode is a team's: its reward is the mean of its agents' returns.
    """

    def __init__(
        self,
        learning_agent: LearningAgent,
        memory_client: Any = None,
        task_type: Any = None,
        training_config: Mapping[str, Any] | None = None,
        reward_config: Any = None,
        *,
        run_dir: str | Path | None = None,
        metrics_sink: MetricsSink | None = None,
        task_params: Any = None,
        tensorboard: bool = True,
        use_curriculum: bool = False,
        curriculum: CurriculumManager | None = None,
        use_meta_learning: bool = False,
        meta_config: Any = None,
    ) -> None:
        self.agent = learning_agent
        self.memory_client = memory_client
        overrides = dict(training_config or {})
        if task_type is not None:
            overrides["task"] = task_name(task_type)
        if use_curriculum or curriculum is not None:
            overrides["use_curriculum"] = True  # recorded in the run's config and checkpoints
        base = learning_agent.config
        if "task" in overrides:
            # The spec's TrainingManager(learning_agent=LearningAgent(...), task_type=...) must train
            # as `lagent train --task` does: apply the task's profile to whatever the agent's config
            # was loaded for, except what the caller chose (agent keywords; training_config after).
            base = config_for_task(base, overrides["task"], keep=learning_agent.explicit_settings)
        self.config: Config = with_overrides(base, train=overrides)
        self.agent.use_config(self.config)  # the agent reads gamma, targets, clipping from it
        self.task = self.config.train.task
        self.reward_config = reward_config
        self.task_params = task_params
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.curriculum: CurriculumManager | None = None
        if self.config.train.use_curriculum:
            if TaskType.parse(self.task) is None:
                raise ValueError(
                    f"curriculum learning needs a task type ({', '.join(t.value for t in TaskType)}), "
                    f"not '{self.task}'"
                )
            self.curriculum = curriculum or CurriculumManager.for_task(self.task)
            self.task_params = self.curriculum.get_current_parameters()
        self.stage_transitions: list[dict[str, Any]] = []
        # Called with each stage transition (from, to, step, episode, wall_seconds): the CLI prints it.
        self.on_stage_transition: Callable[[Mapping[str, Any]], None] | None = None
        self.train_seconds = 0.0  # wall time spent in train(), over every call and resume
        self._train_started: float | None = None
        self.meta = None
        if use_meta_learning or meta_config is not None:
            self.meta = self._make_meta(meta_config)

        sinks: list[MetricsSink] = [metrics_sink] if metrics_sink is not None else []
        if self.run_dir is not None and tensorboard:
            sinks.append(TensorBoardSink(self.run_dir / "tb"))
        self.metrics: MetricsSink = MultiSink(sinks) if sinks else NullSink()

        self.envs = self._make_envs(self.config.train.num_envs)
        self._check_dimensions(self.envs)
        self._mode = autoreset_mode(self.envs)
        self.rows_per_copy = int(getattr(self.envs, "agents", 1))  # agents per team

        # Run state: everything below goes into checkpoints.
        self.global_step = 0
        self.episodes_done = 0
        self.epsilon = self.config.train.epsilon_start
        self.episode_rewards: list[float] = []
        self.episode_lengths: list[int] = []
        self.best_reward = -math.inf
        self.best_recent_mean = -math.inf
        self.invalid_actions = 0
        self.clipped_actions = 0
        self.actions_taken = 0
        self._exploration_steps: int | None = None
        self._steps_since_train = 0
        self._obs: np.ndarray | None = None
        self._ep_return = np.zeros(self.envs.num_envs, dtype=np.float64)
        self._ep_length = np.zeros(self.envs.num_envs, dtype=np.int64)
        self._pending_reset = np.zeros(self.envs.num_envs, dtype=bool)
        self._stop_requested = False
        self.last_evaluation: dict[str, Any] = {}
        self.best_eval_reward = -math.inf
        self.evaluations: list[tuple[int, float]] = []  # (global step, mean greedy reward)
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._next_eval = self.config.train.eval_frequency
        self._window: dict[str, list[float]] = {}
        self._task_window: dict[str, list[float]] = {}
        self._window_start = (time.perf_counter(), 0)
        self._window_updates = 0  # agent.training_steps when the logging window began
        self._system = SystemMonitor(self.agent.device)  # read once per logging window
        # replay.tag_episode_returns: each episode's rows wait here until it ends.
        self._episode_rows = (
            EpisodeRows(self.envs.num_envs)
            if self.config.replay.tag_episode_returns and memory_client is not None
            else None
        )

    # ------------------------------------------------------------------ setup

    def _episode_step_cap(self) -> int | None:
        """``train.max_steps_per_episode`` for a Gymnasium env; None for a task type.

        A task type's episode ends at its stage's time limit (``time_limit / tasks.dt`` steps):
        the spec's beginner stage has 300 s (600 steps) and its training_config 500 steps, and
        the stage's limit must hold, so the step cap does not apply there. Shorten a task's
        episodes through the stage's ``time_limit`` instead.
        """
        return None if TaskType.parse(self.task) is not None else self.config.train.max_steps_per_episode

    def _make_envs(self, num_envs: int) -> gym.vector.VectorEnv:
        return make_vector_env(
            self.task,
            num_envs,
            max_episode_steps=self._episode_step_cap(),
            task_params=self.task_params,
            reward_config=self.reward_config,
        )

    @property
    def reward_manager(self) -> Any:
        """The task's TaskRewardManager (None for Gymnasium envs): reward components, task metrics."""
        return getattr(self.envs, "rewards", None)

    def _make_meta(self, meta_config: Any) -> Any:
        from agent.meta import MetaLearningManager

        if isinstance(meta_config, MetaLearningManager):
            return meta_config
        return MetaLearningManager(base_config=meta_config, config=self.config)

    def _meta_manager(self) -> Any:
        """The trainer's MetaLearningManager, created on first use."""
        if self.meta is None:
            self.meta = self._make_meta(None)
        return self.meta

    # ------------------------------------------------------------------ meta-learning

    async def optimize_hyperparameters(self, options: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Search this task's learning hyperparameters with Optuna, starting from this config.

        Returns the best values as a params.yaml-shaped overlay (``{"train": {...}, ...}``); they
        are kept, with the search's record, in this trainer's checkpoints. The live agent is not
        changed (a new buffer size or network needs a new agent).
        """
        return await self._meta_manager().optimize_hyperparameters(
            self.task, options=options, config=self.config, task_params=self.task_params, **kwargs
        )

    async def optimize_architecture(
        self, input_dim: int | None = None, output_dim: int | None = None, options: Any = None, **kwargs: Any
    ) -> NetworkArchitecture | None:
        """Search network shapes for this task; returns the best ``NetworkArchitecture``."""
        return await self._meta_manager().optimize_architecture(
            self.task, input_dim, output_dim, options=options, config=self.config,
            task_params=self.task_params, **kwargs,
        )

    async def adapt_to_new_task(
        self, source_task: Any, target_task: Any, timesteps: int | None = None, **kwargs: Any
    ) -> Any:
        """Move a policy to ``target_task``: transfer the layers that fit, fine-tune, validate.

        ``source_task`` is this trainer's task (its agent is the source policy; named variants such
        as ``navigation_simple`` work), a run directory or a checkpoint. Returns an
        ``AdaptationResult`` with the adapted policy's target reward next to a from-scratch one.
        """
        return await self._meta_manager().adapt_to_new_task(
            source_task, target_task, timesteps=timesteps, trainer=self, **kwargs
        )

    def _check_dimensions(self, envs: gym.vector.VectorEnv) -> None:
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        n_actions = int(envs.single_action_space.n)
        if (obs_dim, n_actions) != (self.agent.input_size, self.agent.output_size):
            raise ValueError(
                f"task '{self.task}' has {obs_dim} observation features and {n_actions} actions, "
                f"the agent was built for {self.agent.input_size} and {self.agent.output_size}"
            )

    def request_stop(self) -> None:
        """Ask the loop to stop at the next step boundary (signal handlers call this)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ exploration

    def _linear_epsilon(self) -> float:
        train = self.config.train
        fraction = min(1.0, self.global_step / max(1, self._exploration_steps or 1))
        return train.epsilon_start + fraction * (train.epsilon_end - train.epsilon_start)

    def _plan_exploration(self, total_timesteps: int | None, max_episodes: int | None) -> None:
        """Fix the linear schedule's horizon once per run, so resuming keeps the same schedule."""
        if self._exploration_steps is not None:
            return
        train = self.config.train
        episode_steps = int(getattr(self.envs, "max_steps", 0)) or train.max_steps_per_episode
        horizon = total_timesteps or (max_episodes or 1) * episode_steps
        self._exploration_steps = max(1, int(train.exploration_fraction * horizon))

    # ------------------------------------------------------------------ training loop

    async def train(
        self,
        n_episodes: int | None = None,
        total_timesteps: int | None = None,
        *,
        progress: ProgressCallback | None = None,
        optimize_interval: int | None = None,
    ) -> dict[str, Any]:
        """Train until the episode or step budget is reached; returns a summary.

        With neither argument the budgets come from the config (``train.max_episodes`` and
        ``train.total_timesteps``, whichever is reached first); an argument replaces both.
        Budgets count from the start of the run, so a resumed run finishes the same budget.
        ``optimize_interval=N`` runs a short search every N episodes on copies of the live agent
        and applies the best learning settings it finds (see ``MetaLearningManager.optimize_online``).
        """
        train = self.config.train
        if n_episodes is None and total_timesteps is None:
            max_episodes, max_steps = train.max_episodes, train.total_timesteps
        else:
            max_episodes, max_steps = n_episodes, total_timesteps
        if max_episodes is None and max_steps is None:
            raise ValueError("no training budget: set train.max_episodes or train.total_timesteps")
        self._plan_exploration(max_steps, max_episodes)
        if self._obs is None:
            self._obs, _ = self.envs.reset(seed=self.config.run.seed)
            torch.manual_seed(self.config.run.seed)  # dropout and anything else using torch's RNG

        def budget_left() -> bool:
            return (max_steps is None or self.global_step < max_steps) and (
                max_episodes is None or self.episodes_done < max_episodes
            )

        self._stop_requested = False
        self._window_start = (time.perf_counter(), self.global_step)
        self._window_updates = self.agent.training_steps
        self._system.start()
        start_step, started = self.global_step, time.perf_counter()
        self._train_started, seconds_before = started, self.train_seconds
        yield_to_loop = self.memory_client is not None
        meta = self._meta_manager() if optimize_interval else None
        while budget_left() and not self._stop_requested:
            await self._step()
            if self._steps_since_train >= train.train_freq and self.global_step >= train.learning_starts:
                self._steps_since_train = 0
                stats = await self.agent.learn_from_experiences(
                    self.memory_client, gradient_steps=train.gradient_steps
                )
                if stats is not None:
                    for key, value in stats.items():
                        self._window.setdefault(key, []).append(value)
                if self.agent.histograms:  # every train.histogram_interval updates
                    self._log_histograms()
            if self.global_step - self._window_start[1] >= train.log_interval:
                self._log_window(progress, max_steps, max_episodes)
            if train.eval_frequency and self.global_step >= self._next_eval:
                await self._periodic_evaluation()
            if meta is not None and meta.online_due(self.episodes_done, optimize_interval):
                await meta.optimize_online(self)
            if yield_to_loop:
                await asyncio.sleep(0)  # let the memory client's I/O make progress
        if self._episode_rows is not None:  # episodes still running: their rows go untagged
            await self._episode_rows.store(self.memory_client, None, None)
        self._log_window(progress, max_steps, max_episodes)
        elapsed = time.perf_counter() - started
        self.train_seconds, self._train_started = seconds_before + elapsed, None
        if self.run_dir is not None:
            self.save_checkpoint(self.run_dir / "checkpoints" / "last.pt")
            self.write_episode_log(self.run_dir / "episodes.csv")
        if not self._stop_requested and train.final_model == "best":
            # last.pt above keeps the run's own state, so resuming still continues exactly.
            self.restore_best_weights()
        return self.summary(elapsed=elapsed, steps=self.global_step - start_step)

    async def _periodic_evaluation(self) -> None:
        """Greedy evaluation on separate envs and RNGs: training goes on exactly as without it."""
        train, evaluate = self.config.train, self.config.evaluate
        self._next_eval = (self.global_step // train.eval_frequency + 1) * train.eval_frequency
        seed = self.config.run.seed + evaluate.seed_offset + 1000
        mean, std = await self.evaluate(num_episodes=train.eval_episodes, seed=seed)
        self.evaluations.append((self.global_step, mean))
        self.metrics.log_metrics({"eval/mean_reward": mean, "eval/std_reward": std}, self.global_step)
        if mean >= self.best_eval_reward:  # ties go to the later, more trained weights
            self.best_eval_reward = mean
            self._best_weights = {k: v.detach().clone() for k, v in self.agent.q_network.state_dict().items()}
            if self.run_dir is not None:
                self.save_checkpoint(self.run_dir / "checkpoints" / "best_model.pt", include_run_state=False)

    def restore_best_weights(self) -> bool:
        """Load the weights of the best evaluation during training (False if there was none)."""
        if self._best_weights is None:
            return False
        self.agent.q_network.load_state_dict(self._best_weights)
        self.agent.update_target_network()
        return True

    async def _step(self) -> None:
        """One vector step: act, step, store, account for finished episodes."""
        obs = self._obs
        assert obs is not None
        if self.config.train.exploration == "linear":
            self.epsilon = self._linear_epsilon()
        actions = self.agent.act(obs, self.epsilon)
        next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
        done = terminated | truncated

        if self._mode == gym.vector.AutoresetMode.NEXT_STEP:
            # Rows that just reset produced no transition: their action was ignored.
            valid = ~self._pending_reset
            self._pending_reset = done
            real_next = next_obs
        else:
            valid = None
            real_next = next_obs
            if "_final_obs" in info and info["_final_obs"].any():
                real_next = next_obs.copy()
                mask = info["_final_obs"]
                final = info["final_obs"]
                real_next[mask] = np.stack(final[mask]) if final.dtype == object else final[mask]

        held = self._episode_rows
        client = None if held is not None else self.memory_client
        if held is not None:
            held.add(valid, obs, actions, rewards, real_next, terminated)
        if valid is None or valid.all():
            await self.agent.store_experience(
                obs, actions, rewards, real_next, terminated, memory_client=client
            )
            n_valid = len(actions)
            self._ep_return += rewards
            self._ep_length += 1
        else:
            n_valid = int(valid.sum())
            if n_valid:
                await self.agent.store_experience(
                    obs[valid], actions[valid], rewards[valid], real_next[valid], terminated[valid],
                    memory_client=client,
                )
            self._ep_return[valid] += rewards[valid]
            self._ep_length[valid] += 1
            done = done & valid
        if n_valid:
            self._steps_since_train += 1
        self.global_step += n_valid
        self.actions_taken += n_valid
        if "action_invalid" in info:
            self.invalid_actions += int(np.count_nonzero(info["action_invalid"]))
            self.clipped_actions += int(np.count_nonzero(info["action_clipped"]))
        self._obs = next_obs
        if done.any():
            rows = np.flatnonzero(done)
            envs = self.envs
            if held is not None:  # tagged with the episode's return as _finish_episodes counts it
                k = self.rows_per_copy
                team_returns = np.repeat(self._ep_return.reshape(-1, k).mean(axis=1), k)
                await held.store(self.memory_client, rows, team_returns[rows])
            self._finish_episodes(rows, info)
            if held is not None and self.envs is not envs:  # a new stage: running episodes are gone
                await held.store(self.memory_client, None, None)

    def _finish_episodes(self, rows: np.ndarray, info: Mapping[str, Any]) -> None:
        k = self.rows_per_copy
        has_metrics = "_task_metrics" in info
        for copy in np.unique(rows // k):
            team = slice(copy * k, copy * k + k)
            metrics: dict[str, float] = {}
            if has_metrics and info["_task_metrics"][copy * k]:
                metrics = _team_metrics(info["task_metrics"], team)
            reward = float(self._ep_return[team].mean())
            self._record_episode(reward, int(self._ep_length[copy * k]), metrics)
            self._ep_return[team] = 0.0
            self._ep_length[team] = 0
            if self.curriculum is not None and self.curriculum.update_progress({**metrics, "average_reward": reward}):
                self._advance_stage()
                return  # new environments: the other episodes in progress are gone

    def _record_episode(self, reward: float, length: int, metrics: Mapping[str, float]) -> None:
        train = self.config.train
        self.episode_rewards.append(reward)
        self.episode_lengths.append(length)
        self.best_reward = max(self.best_reward, reward)
        self.episodes_done += 1
        if train.exploration == "exponential":
            self.epsilon = max(train.epsilon_end, self.epsilon * train.epsilon_decay)
        for key, value in metrics.items():
            self._task_window.setdefault(key, []).append(value)
        self.metrics.log_metrics(
            {"episode/reward": reward, "episode/length": float(length), "train/epsilon": self.epsilon},
            self.global_step,
        )
        if self.run_dir is not None and self.episodes_done % train.checkpoint_frequency == 0:
            self._periodic_checkpoint()

    def _advance_stage(self) -> None:
        """The curriculum moved on: rebuild the environments at the new stage's parameters."""
        assert self.curriculum is not None
        transition = dict(self.curriculum.transitions[-1])
        transition.update(
            global_step=self.global_step, training_episode=self.episodes_done, wall_seconds=self.elapsed_seconds()
        )
        self.stage_transitions.append(transition)
        log.info("curriculum: %s -> %s at step %d", transition.get("from"), transition.get("to"), self.global_step)
        if self.run_dir is not None:
            previous = str(transition.get("from", "stage")).lower()
            self.save_checkpoint(self.run_dir / "checkpoints" / f"stage_{previous}.pt", include_run_state=False)
        self.task_params = self.curriculum.get_current_parameters()
        self._rebuild_envs()
        self._obs, _ = self.envs.reset(seed=self.config.run.seed + 7919 * self.curriculum.current_index)
        self.metrics.log_metrics({"curriculum/stage": float(self.curriculum.current_index)}, self.global_step)
        if self.on_stage_transition is not None:
            self.on_stage_transition(transition)

    def _rebuild_envs(self) -> None:
        """New environments for ``self.task_params``; the reward manager and its metrics carry over."""
        rewards = self.reward_manager
        self.envs.close()
        self.envs = self._make_envs(self.config.train.num_envs)
        if rewards is not None:
            self.envs.use_reward_manager(rewards)
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._pending_reset[:] = False

    def _periodic_checkpoint(self) -> None:
        assert self.run_dir is not None
        self.save_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        recent = self.recent_mean_reward()
        if not self.config.train.eval_frequency and recent > self.best_recent_mean:
            self.best_recent_mean = recent
            self.save_checkpoint(self.run_dir / "checkpoints" / "best_model.pt", include_run_state=False)

    def elapsed_seconds(self) -> float:
        """Wall time spent training so far, this call included (resumed runs add up)."""
        running = time.perf_counter() - self._train_started if self._train_started is not None else 0.0
        return self.train_seconds + running

    def recent_mean_reward(self, window: int = _RECENT) -> float:
        recent = self.episode_rewards[-window:]
        return float(np.mean(recent)) if recent else float("nan")

    def _log_histograms(self) -> None:
        """The agent's weight and gradient snapshots, as histograms at the current step."""
        while self.agent.histograms:
            _, snapshot = self.agent.histograms.popleft()
            for name, values in snapshot.items():
                log_histogram(self.metrics, name, values, self.global_step)

    def _log_window(
        self, progress: ProgressCallback | None, max_steps: int | None, max_episodes: int | None
    ) -> None:
        now = time.perf_counter()
        started, start_step = self._window_start
        seconds = max(now - started, 1e-9)
        scalars = {f"train/{k}": float(np.mean(v)) for k, v in self._window.items() if v}
        scalars.update(
            {
                "train/epsilon": self.epsilon,
                "train/training_steps": float(self.agent.training_steps),
                "train/learning_rate": self.agent.learning_rate,
            }
        )
        if self.global_step > start_step:  # not the empty window a run ends with on a boundary
            scalars["time/steps_per_second"] = (self.global_step - start_step) / seconds
            scalars["time/updates_per_second"] = (self.agent.training_steps - self._window_updates) / seconds
            scalars.update(self._system.read())
        scalars.update({f"grad_norm/{k}": v for k, v in self.agent.layer_gradient_norms().items()})
        if self.episode_rewards:
            scalars["rollout/reward_mean"] = self.recent_mean_reward()
        if self.actions_taken:
            scalars["actions/invalid_rate"] = self.invalid_actions / self.actions_taken
            scalars["actions/clipped_rate"] = self.clipped_actions / self.actions_taken
        scalars.update({f"task/{k}": float(np.mean(v)) for k, v in self._task_window.items() if v})
        self._task_window = {}
        if self.reward_manager is not None:
            for name, value in self.reward_manager.get_metrics()["reward_components"].items():
                scalars[f"reward/{name}"] = float(value)
        if self.curriculum is not None:
            scalars["curriculum/stage"] = float(self.curriculum.current_index)
            scalars["curriculum/success_rate"] = float(self.curriculum.current_stage.success_rate)
        if self.memory_client is not None and hasattr(self.memory_client, "metrics"):
            for key, value in self.memory_client.metrics().items():
                scalars[f"memory/{key}"] = float(value)
            if hasattr(self.memory_client, "new_latency_window"):
                self.memory_client.new_latency_window()  # latency percentiles per logging window
        self.metrics.log_metrics(scalars, self.global_step)
        self._window = {}
        self._window_start = (now, self.global_step)
        self._window_updates = self.agent.training_steps
        if progress is not None:
            progress(
                {
                    "step": float(self.global_step),
                    "total_steps": float(max_steps or 0),
                    "episodes": float(self.episodes_done),
                    "total_episodes": float(max_episodes or 0),
                    "reward_mean": scalars.get("rollout/reward_mean", float("nan")),
                    "epsilon": self.epsilon,
                }
            )

    def summary(self, elapsed: float | None = None, steps: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {
            "task": self.task,
            "global_step": self.global_step,
            "episodes": self.episodes_done,
            "training_steps": self.agent.training_steps,
            "epsilon": self.epsilon,
            "best_reward": self.best_reward if self.episode_rewards else None,
            "recent_mean_reward": self.recent_mean_reward() if self.episode_rewards else None,
            "best_eval_reward": self.best_eval_reward if self.evaluations else None,
            "final_model": self.config.train.final_model if self._best_weights is not None else "last",
            "invalid_actions": self.invalid_actions,
            "invalid_action_rate": self.invalid_actions / max(self.actions_taken, 1),
            "clipped_actions": self.clipped_actions,
            "clipped_action_rate": self.clipped_actions / max(self.actions_taken, 1),
        }
        if self.curriculum is not None:
            result["curriculum_stage"] = self.curriculum.current_difficulty.value
            result["stage_transitions"] = self.stage_transitions
        if self.reward_manager is not None:
            metrics = self.reward_manager.get_metrics()
            result["reward_components"] = metrics["reward_components"]
            result["task_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if elapsed is not None:
            result["wall_seconds"] = elapsed
            result["steps_per_second"] = (steps or 0) / max(elapsed, 1e-9)
        return result

    def write_episode_log(self, path: str | Path) -> None:
        """Episode rewards as CSV: DVC plots and spreadsheets read it directly."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["episode", "reward", "length"])
            for i, (reward, length) in enumerate(zip(self.episode_rewards, self.episode_lengths), 1):
                writer.writerow([i, f"{reward:.6g}", length])

    # ------------------------------------------------------------------ evaluation

    async def evaluate(
        self,
        num_episodes: int | None = None,
        seed: int | None = None,
        epsilon: float | None = None,
        task_params: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[float, float]:
        """Mean and standard deviation of the return over (epsilon-)greedy episodes.

        Runs in fresh environments seeded apart from training and never touches the training
        RNGs, so evaluating does not change what training does next. ``task_params`` evaluates
        at another difficulty than the current one. ``progress(done, total)`` is called as
        episodes finish (a progress bar's feed).
        """
        n_episodes = num_episodes or self.config.evaluate.episodes
        epsilon = self.config.evaluate.epsilon if epsilon is None else epsilon
        n_copies = min(n_episodes, self.config.evaluate.num_envs)
        envs = make_vector_env(
            self.task,
            n_copies,
            max_episode_steps=self._episode_step_cap(),
            task_params=task_params if task_params is not None else self.task_params,
            reward_config=self.reward_config,
        )
        k = int(getattr(envs, "agents", 1))
        seed = self.config.run.seed + self.config.evaluate.seed_offset if seed is None else seed
        rng = np.random.default_rng(seed)
        # Each copy runs a fixed number of episodes, so short episodes are not over-represented.
        targets = np.array([(n_episodes + i) // n_copies for i in range(n_copies)])
        counts = np.zeros(n_copies, dtype=np.int64)
        returns = np.zeros(envs.num_envs)
        lengths = np.zeros(envs.num_envs, dtype=np.int64)
        pending_reset = np.zeros(envs.num_envs, dtype=bool)
        episode_returns: list[float] = []
        episode_lengths: list[int] = []
        task_metrics: dict[str, list[float]] = {}
        next_step_reset = autoreset_mode(envs) == gym.vector.AutoresetMode.NEXT_STEP
        obs, _ = envs.reset(seed=seed)
        while (counts < targets).any():
            actions = self.agent.greedy_actions(obs)
            if epsilon > 0:
                explore = rng.random(len(actions)) < epsilon
                actions = np.where(explore, rng.integers(0, self.agent.output_size, len(actions)), actions)
            obs, rewards, terminated, truncated, info = envs.step(actions)
            active = np.repeat(counts < targets, k)
            if next_step_reset:
                active &= ~pending_reset
                pending_reset = terminated | truncated
            returns[active] += rewards[active]
            lengths[active] += 1
            finished = (terminated | truncated) & active
            for copy in np.unique(np.flatnonzero(finished) // k):
                team = slice(copy * k, copy * k + k)
                episode_returns.append(float(returns[team].mean()))
                episode_lengths.append(int(lengths[copy * k]))
                if "_task_metrics" in info and info["_task_metrics"][copy * k]:
                    for key, value in _team_metrics(info["task_metrics"], team).items():
                        task_metrics.setdefault(key, []).append(value)
                counts[copy] += 1
                returns[team] = 0.0
                lengths[team] = 0
            if progress is not None and finished.any():
                progress(len(episode_returns), n_episodes)
        envs.close()
        mean, std = float(np.mean(episode_returns)), float(np.std(episode_returns))
        self.last_evaluation = {
            "task": self.task,
            "episodes": len(episode_returns),
            "epsilon": epsilon,
            "mean_reward": mean,
            "std_reward": std,
            "min_reward": float(np.min(episode_returns)),
            "max_reward": float(np.max(episode_returns)),
            "mean_length": float(np.mean(episode_lengths)),
            "rewards": episode_returns,
            "task_metrics": {k: float(np.mean(v)) for k, v in task_metrics.items()},
            "global_step": self.global_step,
        }
        if "task_success" in task_metrics:
            self.last_evaluation["success_rate"] = float(np.mean(task_metrics["task_success"]))
        return mean, std

    async def evaluate_curriculum(self, num_episodes: int | None = None) -> dict[str, dict[str, Any]]:
        """The agent at every curriculum stage: success rate and reward per stage."""
        manager = self.curriculum or CurriculumManager()
        report: dict[str, dict[str, Any]] = {}
        for stage in manager.stages:
            await self.evaluate(num_episodes=num_episodes, task_params=stage.task_params)
            evaluation = self.last_evaluation
            report[stage.difficulty.value] = {
                "success_rate": evaluation.get("success_rate"),
                "mean_reward": evaluation["mean_reward"],
                "std_reward": evaluation["std_reward"],
                "episodes": evaluation["episodes"],
                "task_metrics": evaluation["task_metrics"],
            }
        return report

    # ------------------------------------------------------------------ checkpoints

    def _run_state(self) -> dict[str, Any]:
        assert self._obs is not None
        return {
            "global_step": self.global_step,
            "episodes_done": self.episodes_done,
            "epsilon": self.epsilon,
            "exploration_steps": self._exploration_steps,
            "steps_since_train": self._steps_since_train,
            "episode_rewards": torch.tensor(self.episode_rewards, dtype=torch.float64),
            "episode_lengths": torch.tensor(self.episode_lengths, dtype=torch.int64),
            "best_reward": self.best_reward,
            "best_recent_mean": self.best_recent_mean,
            "best_eval_reward": self.best_eval_reward,
            "next_eval": self._next_eval,
            "evaluations": torch.tensor(self.evaluations, dtype=torch.float64).reshape(-1, 2),
            "best_weights": self._best_weights,
            "invalid_actions": self.invalid_actions,
            "clipped_actions": self.clipped_actions,
            "actions_taken": self.actions_taken,
            "obs": torch.from_numpy(np.array(self._obs, dtype=np.float32)),
            "ep_return": torch.from_numpy(self._ep_return.copy()),
            "ep_length": torch.from_numpy(self._ep_length.copy()),
            "pending_reset": torch.from_numpy(self._pending_reset.copy()),
            "torch_rng": torch.get_rng_state(),
            "stage_transitions": self.stage_transitions,
            "train_seconds": self.elapsed_seconds(),
            "env": capture_env_state(self.envs),
        }

    def save_checkpoint(self, path: str | Path, include_run_state: bool = True) -> Path:
        """Write a checkpoint atomically. ``include_run_state=False`` keeps only the model."""
        payload: dict[str, Any] = {
            "config": self.config.to_dict(),
            "task": self.task,
            "agent": self.agent.state_dict(include_buffer=include_run_state and self.config.train.save_buffer),
        }
        if isinstance(self.task_params, TaskParameters):
            payload["task_params"] = self.task_params.to_dict()
        if self.curriculum is not None:
            payload["curriculum"] = self.curriculum.save_state()
        if self.meta is not None:
            payload["meta"] = self.meta.state_dict()
        if include_run_state and self._obs is not None:
            payload["trainer"] = self._run_state()
        path = save_checkpoint_file(payload, path)
        if self.run_dir is not None and not (self.run_dir / "config.yaml").exists():
            self.write_config(self.run_dir / "config.yaml")
        return path

    def write_config(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint: the model always, the whole run state when the file has it."""
        document = load_checkpoint_file(path, map_location=self.agent.device, device=self.agent.device)
        try:
            self.agent.load_state_dict(document["agent"])
            if self.meta is not None and "meta" in document:
                self.meta.load_state_dict(document["meta"])
            state = document.get("trainer")
            if state is not None:
                if self.curriculum is not None and "curriculum" in document:
                    self.curriculum.load_state(document["curriculum"])
                    if self.curriculum.get_current_parameters() != self.task_params:
                        self.task_params = self.curriculum.get_current_parameters()
                        self._rebuild_envs()
                self._restore_run_state(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: checkpoint does not fit this trainer: {reason}") from None

    def _restore_run_state(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.episodes_done = int(state["episodes_done"])
        self.epsilon = float(state["epsilon"])
        self._exploration_steps = state["exploration_steps"]
        self._steps_since_train = int(state["steps_since_train"])
        self.episode_rewards = state["episode_rewards"].tolist()
        self.episode_lengths = state["episode_lengths"].tolist()
        self.best_reward = float(state["best_reward"])
        self.best_recent_mean = float(state["best_recent_mean"])
        self.best_eval_reward = float(state["best_eval_reward"])
        self._next_eval = int(state["next_eval"])
        self.evaluations = [(int(step), float(reward)) for step, reward in state["evaluations"].tolist()]
        self._best_weights = state["best_weights"]
        self.invalid_actions = int(state["invalid_actions"])
        self.clipped_actions = int(state["clipped_actions"])
        self.actions_taken = int(state["actions_taken"])
        torch.set_rng_state(state["torch_rng"])
        self.stage_transitions = list(state.get("stage_transitions", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        try:
            restored = len(state["ep_return"]) == self.envs.num_envs and restore_env_state(self.envs, state["env"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"trainer.env: not an environment state of '{self.task}' ({reason})") from None
        if restored:
            self._obs = state["obs"].numpy().copy()
            self._ep_return = state["ep_return"].numpy().copy()
            self._ep_length = state["ep_length"].numpy().copy()
            self._pending_reset = state["pending_reset"].numpy().copy()
        else:
            log.warning(
                "the environment state of '%s' cannot be restored exactly; "
                "the resumed run starts new episodes",
                self.task,
            )
            self._obs, _ = self.envs.reset(seed=self.config.run.seed + self.global_step)
            self._ep_return[:] = 0.0
            self._ep_length[:] = 0
            self._pending_reset[:] = False

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        **trainer_kwargs: Any,
    ) -> TrainingManager:
        """Rebuild the agent and trainer a checkpoint was made with, and load it.

        ``overrides`` replaces config keys by section (for example a larger step budget).
        """
        document = load_checkpoint_file(path)
        try:
            config = config_from_dict(document["config"], source=str(path))
            architecture = NetworkArchitecture.from_dict(document["agent"]["architecture"])
            task = str(document["task"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: checkpoint lacks or garbles {exc}") from None
        # The task decides the network's input and output sizes: check before building anything.
        envs = make_vector_env(task, 1)
        try:  # sizes as _check_dimensions reads them
            obs_dim = int(np.prod(envs.single_observation_space.shape))
            n_actions = int(envs.single_action_space.n)
        finally:
            envs.close()
        if (architecture.input_dim, architecture.output_dim) != (obs_dim, n_actions):
            field = "input_dim" if architecture.input_dim != obs_dim else "output_dim"
            raise CheckpointError(
                f"{path}: agent.architecture.{field}: a {architecture.input_dim}->{architecture.output_dim} "
                f"network, task '{task}' has {obs_dim} observation features and {n_actions} actions"
            )
        config = with_overrides(config, **dict(overrides or {}))
        check_buffer_size(config.replay.local_buffer_size, architecture.input_dim, path)
        agent = LearningAgent(
            architecture.input_dim, architecture.output_dim, config=config, architecture=architecture
        )
        trainer_kwargs.setdefault("use_curriculum", "curriculum" in document)
        if trainer_kwargs["use_curriculum"] and "curriculum" in document and "curriculum" not in trainer_kwargs:
            # The run's own stages and thresholds, not today's params.yaml.
            try:
                trainer_kwargs["curriculum"] = CurriculumManager.from_state(document["curriculum"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise CheckpointError(f"{path}: curriculum: {exc}") from None
        if "task_params" in document and not trainer_kwargs["use_curriculum"] and "task_params" not in trainer_kwargs:
            try:
                trainer_kwargs["task_params"] = TaskParameters.coerce(document["task_params"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: task_params: {exc}") from None
        if "meta" in document:
            trainer_kwargs.setdefault("use_meta_learning", True)
        trainer = cls(agent, task_type=task, **trainer_kwargs)
        trainer.load_checkpoint(path)
        return trainer

    def close(self) -> None:
        self.envs.close()
        self.metrics.close()
