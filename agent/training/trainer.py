"""The Trainer: a Collector (acting) and a LearningAgent's Learner (learning) joined in one loop,
with evaluation, metrics, checkpoints and the curriculum.

The loop is the spec's (select epsilon-greedy actions, step, store, learn, update metrics, decay
exploration, checkpoint) over a *vector* environment, so one forward pass picks the actions of
every copy. It is plain synchronous code: :meth:`Trainer.run`; the spec's ``async train`` is a
façade over it. A checkpoint holds everything the next step depends on (weights, optimizer,
buffer, counters, epsilon, the environments' state and every RNG), so a resumed run continues
exactly where it stopped.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import torch
import yaml

from agent.checkpoint import CheckpointError, check_buffer_size, load_checkpoint_file, save_checkpoint_file
from agent.collector import Collector, EpisodeRows, FinishedEpisode, MemorySink, make_envs
from agent.config import Config, config_for_task, config_from_dict, with_overrides
from agent.dqn import LearningAgent
from agent.metrics import MetricsSink, MultiSink, NullSink, TensorBoardSink, log_histogram
from agent.monitoring import SystemMonitor
from agent.network import NetworkArchitecture
from agent.tasks import CurriculumManager, TaskParameters, TaskType, make_vector_env, task_name
from agent.training.evaluation import evaluate_policy
from agent.training.run_state import RunState

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Mapping[str, float]], None]
_RECENT = 100  # episodes in the rolling reward mean


class TrainerCallback(Protocol):
    """Called after every vector step of :meth:`Trainer.run` (periodic optimisation is one)."""

    def on_step(self, trainer: Trainer) -> None: ...


def _state_property(name: str, doc: str) -> property:
    """A trainer attribute that lives in its :class:`RunState` (the spec's names stay)."""

    def get(self: Trainer) -> Any:
        return getattr(self.run_state, name)

    def set(self: Trainer, value: Any) -> None:
        setattr(self.run_state, name, value)

    return property(get, set, doc=doc)


class Trainer:
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
    ) -> None:
        self.agent = learning_agent
        self._memory_client = memory_client
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
        self.agent.use_config(self.config)  # the learner reads gamma, targets, clipping from it
        self.task = self.config.train.task
        self.reward_config = reward_config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.curriculum: CurriculumManager | None = None
        if self.config.train.use_curriculum:
            if TaskType.parse(self.task) is None:
                raise ValueError(
                    f"curriculum learning needs a task type ({', '.join(t.value for t in TaskType)}), "
                    f"not '{self.task}'"
                )
            self.curriculum = curriculum or CurriculumManager.for_task(self.task, config=self.config)
            task_params = self.curriculum.get_current_parameters()
        # Called with each stage transition (from, to, step, episode, wall_seconds): the CLI prints it.
        self.on_stage_transition: Callable[[Mapping[str, Any]], None] | None = None
        self._train_started: float | None = None

        sinks: list[MetricsSink] = [metrics_sink] if metrics_sink is not None else []
        if self.run_dir is not None and tensorboard:
            sinks.append(TensorBoardSink(self.run_dir / "tb"))
        self.metrics: MetricsSink = MultiSink(sinks) if sinks else NullSink()

        self.collector = Collector(self.config, self.agent.policy, task_params=task_params, reward_config=reward_config)
        self._connect_sinks()
        self._check_dimensions()

        self.run_state = RunState(
            epsilon=self.config.train.epsilon_start, next_eval=self.config.train.eval_frequency
        )
        self._stop_requested = False
        self.last_evaluation: dict[str, Any] = {}
        self._window: dict[str, list[float]] = {}
        self._task_window: dict[str, list[float]] = {}
        self._window_start = (time.perf_counter(), 0)
        self._window_updates = 0  # agent.training_steps when the logging window began
        self._system = SystemMonitor(self.agent.device)  # read once per logging window

    global_step = _state_property("global_step", "Environment transitions collected so far.")
    episodes_done = _state_property("episodes_done", "Episodes finished so far.")
    epsilon = _state_property("epsilon", "The exploration rate of the next step.")
    episode_rewards = _state_property("episode_rewards", "Every finished episode's return, in order.")
    episode_lengths = _state_property("episode_lengths", "Every finished episode's length, in order.")
    best_reward = _state_property("best_reward", "The highest episode return so far.")
    best_eval_reward = _state_property("best_eval_reward", "The best evaluation during training.")
    evaluations = _state_property("evaluations", "(global step, mean greedy reward) of each evaluation.")
    stage_transitions = _state_property("stage_transitions", "The curriculum's stage transitions.")
    train_seconds = _state_property("train_seconds", "Wall time spent training, resumes included.")

    # ------------------------------------------------------------------ parts

    @property
    def memory_client(self) -> Any:
        """The Memory-service client transitions go to and replay comes from (None: local only)."""
        return self._memory_client

    @memory_client.setter
    def memory_client(self, client: Any) -> None:
        self._memory_client = client
        self._connect_sinks()

    def _connect_sinks(self) -> None:
        """Where the collector writes: the agent's buffer, and the Memory service if there is one,
        either every step or, with ``replay.tag_episode_returns``, each episode when it ends
        (tagged with its return), held in an :class:`EpisodeRows` meanwhile."""
        client = self._memory_client
        tagging = self.config.replay.tag_episode_returns and client is not None
        self.collector.sinks = [self.agent.buffer]
        if client is not None and not tagging:
            self.collector.sinks.append(MemorySink(client))
        held = self.collector.episode_sink
        if held is not None and not (tagging and held.client is client):
            held.store(None, None)  # rows held so far go out untagged, to the client they were for
            held = None
        if tagging and held is None:
            held = EpisodeRows(client, self.collector.num_envs)
        self.collector.episode_sink = held

    @property
    def envs(self) -> Any:
        """The training environments (the collector's)."""
        return self.collector.envs

    @property
    def task_params(self) -> Any:
        return self.collector.task_params

    @property
    def reward_manager(self) -> Any:
        """The task's TaskRewardManager (None for Gymnasium envs): reward components, task metrics."""
        return self.collector.reward_manager

    @property
    def invalid_actions(self) -> int:
        return self.collector.invalid_actions

    @property
    def clipped_actions(self) -> int:
        return self.collector.clipped_actions

    @property
    def actions_taken(self) -> int:
        return self.collector.actions_taken

    def _check_dimensions(self) -> None:
        envs = self.collector.envs
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        n_actions = int(envs.single_action_space.n)
        if (obs_dim, n_actions) != (self.agent.input_size, self.agent.output_size):
            self.collector.close()
            raise ValueError(
                f"task '{self.task}' has {obs_dim} observation features and {n_actions} actions, "
                f"the agent was built for {self.agent.input_size} and {self.agent.output_size}"
            )

    def reconfigure(self, **sections: Mapping[str, Any]) -> Config:
        """Change settings during a run (``reconfigure(train={"learning_rate": 3e-4})``): the one
        way to do it, so that everything built from a setting (the learner's update, the
        optimizer's step size, the replay sources) follows it. Returns the new config."""
        config = with_overrides(self.config, **sections)
        if config.train.task != self.config.train.task or config.train.num_envs != self.config.train.num_envs:
            raise ValueError("train.task and train.num_envs cannot change during a run")
        self.config = config
        self.agent.use_config(config)
        self.collector.config = config
        self._connect_sinks()
        return config

    def request_stop(self) -> None:
        """Ask the loop to stop at the next step boundary (signal handlers call this)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called (a distributed run's driver polls it)."""
        return self._stop_requested

    @property
    def reached_reward(self) -> bool:
        """Whether the latest evaluation reached ``train.stop_at_reward``: the run is done. Read
        from the run's evaluations, so a run resumed after reaching it stops at once."""
        target = self.config.train.stop_at_reward
        return target is not None and bool(self.evaluations) and self.evaluations[-1][1] >= target

    # ------------------------------------------------------------------ exploration

    def _linear_epsilon(self) -> float:
        train = self.config.train
        fraction = min(1.0, self.global_step / max(1, self.run_state.exploration_steps or 1))
        return train.epsilon_start + fraction * (train.epsilon_end - train.epsilon_start)

    def plan_exploration(self, total_timesteps: int | None, max_episodes: int | None) -> None:
        """Fix the linear schedule's horizon once per run, so resuming keeps the same schedule."""
        if self.run_state.exploration_steps is not None:
            return
        train = self.config.train
        episode_steps = int(getattr(self.envs, "max_steps", 0)) or train.max_steps_per_episode or 1000
        horizon = total_timesteps or (max_episodes or 1) * episode_steps
        self.run_state.exploration_steps = max(1, int(train.exploration_fraction * horizon))
        self.run_state.planned_steps = int(horizon)

    # ------------------------------------------------------------------ training loop

    async def train(
        self,
        n_episodes: int | None = None,
        total_timesteps: int | None = None,
        *,
        progress: ProgressCallback | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> dict[str, Any]:
        """The spec's (async) form of :meth:`run`: the loop runs in a worker thread, so the event
        loop stays free for the caller's other coroutines while training goes on."""
        return await asyncio.to_thread(
            self.run, n_episodes, total_timesteps, progress=progress, callbacks=callbacks
        )

    def run(
        self,
        n_episodes: int | None = None,
        total_timesteps: int | None = None,
        *,
        progress: ProgressCallback | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> dict[str, Any]:
        """Train until the episode or step budget is reached; returns a summary.

        With neither argument the budgets come from the config (``train.max_episodes`` and
        ``train.total_timesteps``, whichever is reached first); an argument replaces both.
        Budgets count from the start of the run, so a resumed run finishes the same budget.
        Each of ``callbacks`` is called after every vector step.
        """
        train = self.config.train
        if n_episodes is None and total_timesteps is None:
            max_episodes, max_steps = train.max_episodes, train.total_timesteps
        else:
            max_episodes, max_steps = n_episodes, total_timesteps
        if max_episodes is None and max_steps is None:
            raise ValueError("no training budget: set train.max_episodes or train.total_timesteps")
        self.plan_exploration(max_steps, max_episodes)
        if self.collector.obs is None:
            self.collector.reset(seed=self.config.run.seed)
            torch.manual_seed(self.config.run.seed)  # anything else using torch's RNG

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
        state = self.run_state
        while budget_left() and not self._stop_requested and not self.reached_reward:
            train = self.config.train  # callbacks may change it
            if train.exploration == "linear":
                state.epsilon = self._linear_epsilon()
            if self.agent.architecture.normalize_obs:  # running statistics of what the agent acts on
                self.agent.q_network.update_obs_stats(self.collector.obs, self.agent.target_network)
            result = self.collector.step(state.epsilon)
            if result.steps:
                state.steps_since_train += 1
            state.global_step += result.steps
            for episode in result.episodes:
                if self._finish_episode(episode):
                    break  # a new stage: the other episodes in progress are gone
            if state.steps_since_train >= train.train_freq and state.global_step >= train.learning_starts:
                state.steps_since_train = 0
                if state.planned_steps:
                    self.agent.learner.set_progress(state.global_step / state.planned_steps)
                stats = self.agent.learn(self.memory_client, gradient_steps=train.gradient_steps)
                if stats is not None:
                    for key, value in stats.items():
                        self._window.setdefault(key, []).append(value)
                if self.agent.histograms:  # every train.histogram_interval updates
                    self._log_histograms()
            if state.global_step - self._window_start[1] >= train.log_interval:
                self._log_window(progress, max_steps, max_episodes)
            if train.eval_frequency and state.global_step >= state.next_eval:
                self._periodic_evaluation()
            for callback in callbacks:
                callback.on_step(self)
        self.collector.flush()  # episodes still running: their held rows go untagged
        self._log_window(progress, max_steps, max_episodes)
        elapsed = time.perf_counter() - started
        self.train_seconds, self._train_started = seconds_before + elapsed, None
        if self.run_dir is not None:
            self.save_checkpoint(self.run_dir / "checkpoints" / "last.pt")
            self.write_episode_log(self.run_dir / "episodes.csv")
        if not self._stop_requested and self.config.train.final_model == "best":
            # last.pt above keeps the run's own state, so resuming still continues exactly.
            self.restore_best_weights()
        return self.summary(elapsed=elapsed, steps=self.global_step - start_step)

    def _finish_episode(self, episode: FinishedEpisode) -> bool:
        """Account for a finished episode; True if it moved the curriculum to a new stage."""
        self._record_episode(episode.reward, episode.length, episode.metrics)
        if self.curriculum is not None and self.curriculum.update_progress(
            {**episode.metrics, "average_reward": episode.reward}
        ):
            self._advance_stage()
            return True
        return False

    def _periodic_evaluation(self) -> None:
        train, state = self.config.train, self.run_state
        state.next_eval = (state.global_step // train.eval_frequency + 1) * train.eval_frequency
        self.evaluate_during_training()

    def evaluate_during_training(self) -> float:
        """One of the run's evaluations (``train.eval_episodes``, on separate envs and RNGs:
        training goes on exactly as without it), recorded with the run; the best one's weights
        are kept (``train.final_model: best``, ``best_model.pt``). Returns its mean reward."""
        train, evaluate = self.config.train, self.config.evaluate
        state = self.run_state
        seed = self.config.run.seed + evaluate.seed_offset + 1000
        mean, std = self.run_evaluation(num_episodes=train.eval_episodes, seed=seed)
        state.evaluations.append((state.global_step, mean))
        self.metrics.log_metrics({"eval/mean_reward": mean, "eval/std_reward": std}, state.global_step)
        if mean >= state.best_eval_reward:  # ties go to the later, more trained weights
            state.best_eval_reward = mean
            state.best_weights = {k: v.detach().clone() for k, v in self.agent.q_network.state_dict().items()}
            if self.run_dir is not None:
                self.save_checkpoint(self.run_dir / "checkpoints" / "best_model.pt", include_run_state=False)
        return mean

    def restore_best_weights(self) -> bool:
        """Load the weights of the best evaluation during training (False if there was none)."""
        if self.run_state.best_weights is None:
            return False
        self.agent.q_network.load_state_dict(self.run_state.best_weights)
        self.agent.update_target_network()
        return True

    def _record_episode(self, reward: float, length: int, metrics: Mapping[str, float]) -> None:
        train = self.config.train
        state = self.run_state
        state.record_episode(reward, length)
        if train.exploration == "exponential":
            state.epsilon = max(train.epsilon_end, state.epsilon * train.epsilon_decay)
        for key, value in metrics.items():
            self._task_window.setdefault(key, []).append(value)
        self.metrics.log_metrics(
            {"episode/reward": reward, "episode/length": float(length), "train/epsilon": state.epsilon},
            state.global_step,
        )
        if self.run_dir is not None and state.episodes_done % train.checkpoint_frequency == 0:
            self._periodic_checkpoint()

    def _advance_stage(self) -> None:
        """The curriculum moved on: new environments at the new stage's parameters."""
        assert self.curriculum is not None
        transition = dict(self.curriculum.transitions[-1])
        transition.update(
            global_step=self.global_step, training_episode=self.episodes_done, wall_seconds=self.elapsed_seconds()
        )
        self.run_state.stage_transitions.append(transition)
        log.info("curriculum: %s -> %s at step %d", transition.get("from"), transition.get("to"), self.global_step)
        if self.run_dir is not None:
            previous = str(transition.get("from", "stage")).lower()
            self.save_checkpoint(self.run_dir / "checkpoints" / f"stage_{previous}.pt", include_run_state=False)
        self.collector.use_task_params(
            self.curriculum.get_current_parameters(),
            seed=self.config.run.seed + 7919 * self.curriculum.current_index,
        )
        self.metrics.log_metrics({"curriculum/stage": float(self.curriculum.current_index)}, self.global_step)
        if self.on_stage_transition is not None:
            self.on_stage_transition(transition)

    def _periodic_checkpoint(self) -> None:
        assert self.run_dir is not None
        self.save_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        recent = self.recent_mean_reward()
        if not self.config.train.eval_frequency and recent > self.run_state.best_recent_mean:
            self.run_state.best_recent_mean = recent
            self.save_checkpoint(self.run_dir / "checkpoints" / "best_model.pt", include_run_state=False)

    def elapsed_seconds(self) -> float:
        """Wall time spent training so far, this call included (resumed runs add up)."""
        running = time.perf_counter() - self._train_started if self._train_started is not None else 0.0
        return self.train_seconds + running

    def recent_mean_reward(self, window: int = _RECENT) -> float:
        recent = self.episode_rewards[-window:]
        return float(np.mean(recent)) if recent else float("nan")

    def _log_histograms(self) -> None:
        """The learner's weight and gradient snapshots, as histograms at the current step."""
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
            "final_model": self.config.train.final_model if self.run_state.best_weights is not None else "last",
            "reached_reward": self.evaluations[-1][0] if self.reached_reward else None,
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
        """The spec's (async) form of :meth:`run_evaluation` (in a worker thread, as :meth:`train`)."""
        return await asyncio.to_thread(self.run_evaluation, num_episodes, seed, epsilon, task_params, progress)

    def run_evaluation(
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
        seed = self.config.run.seed + self.config.evaluate.seed_offset if seed is None else seed
        envs = make_envs(
            self.config,
            min(n_episodes, self.config.evaluate.num_envs),
            task_params if task_params is not None else self.task_params,
            self.reward_config,
        )
        try:
            result = evaluate_policy(
                self.agent.greedy_actions, self.agent.output_size, envs, n_episodes, seed, epsilon, progress
            )
        finally:
            envs.close()
        self.last_evaluation = {"task": self.task, **result, "global_step": self.global_step}
        return result["mean_reward"], result["std_reward"]

    async def evaluate_curriculum(self, num_episodes: int | None = None) -> dict[str, dict[str, Any]]:
        """The spec's (async) form of :meth:`run_curriculum_evaluation` (in a worker thread)."""
        return await asyncio.to_thread(self.run_curriculum_evaluation, num_episodes)

    def run_curriculum_evaluation(self, num_episodes: int | None = None) -> dict[str, dict[str, Any]]:
        """The agent at every curriculum stage: success rate and reward per stage."""
        manager = self.curriculum or CurriculumManager.for_task(self.task, config=self.config)
        report: dict[str, dict[str, Any]] = {}
        for stage in manager.stages:
            self.run_evaluation(num_episodes=num_episodes, task_params=stage.task_params)
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
        return {
            **self.run_state.to_checkpoint(),
            **self.collector.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def _extra_checkpoint_state(self) -> dict[str, Any]:
        """Sections a subclass adds to every checkpoint (the façade's meta-learning record)."""
        return {}

    def _load_extra_checkpoint_state(self, document: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_checkpoint_state` saved."""

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
        payload.update(self._extra_checkpoint_state())
        if include_run_state and self.collector.obs is not None:
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
            self._load_extra_checkpoint_state(document)
            state = document.get("trainer")
            if state is not None:
                if self.curriculum is not None and "curriculum" in document:
                    self.curriculum.load_state(document["curriculum"])
                    if self.curriculum.get_current_parameters() != self.task_params:
                        self.collector.use_task_params(self.curriculum.get_current_parameters(), seed=0)
                self._restore_run_state(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: checkpoint does not fit this trainer: {reason}") from None

    def _restore_run_state(self, state: Mapping[str, Any]) -> None:
        self.run_state = RunState.from_checkpoint(state)
        torch.set_rng_state(state["torch_rng"])
        try:
            restored = self.collector.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"trainer.env: not an environment state of '{self.task}' ({reason})") from None
        if not restored:
            log.warning(
                "the environment state of '%s' cannot be restored exactly; "
                "the resumed run starts new episodes",
                self.task,
            )
            self.collector.restart_episodes(seed=self.config.run.seed + self.global_step)

    @classmethod
    def _checkpoint_kwargs(cls, document: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor keywords a subclass derives from a checkpoint (the façade: meta-learning)."""
        return {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        **trainer_kwargs: Any,
    ) -> Self:
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
        envs = make_vector_env(task, 1, config=config)
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
                trainer_kwargs["task_params"] = TaskParameters.coerce(document["task_params"], config=config)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: task_params: {exc}") from None
        trainer_kwargs.update(cls._checkpoint_kwargs(document, trainer_kwargs))
        trainer = cls(agent, task_type=task, **trainer_kwargs)
        trainer.load_checkpoint(path)
        return trainer

    def close(self) -> None:
        self.collector.close()
        self.metrics.close()
