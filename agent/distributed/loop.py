"""The driver's loop: which Ray call to make next, and what each answer changes.

It keeps three rules (see :mod:`agent.distributed.run` for the shape of a run):

- the budget: actors get no new rollout once the steps collected and in flight reach it;
- the replay ratio: the learner may have done ``(steps - learning_starts) * gradient_steps /
  train_freq`` updates; an actor waits while the learner lags more than two publications;
- the weights: each learner call's weights are one object-store reference, handed to an actor
  with its next rollout only when the actor holds an older version (or a new process).

Restarts are counted by process id: a Ray actor that died comes back as a new process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

ProgressCallback = Callable[[Mapping[str, float]], None]


class ApexLoop:
    """One run's calls and counters, between the placed parts and the run's end."""

    def __init__(
        self,
        ray: Any,
        actor_error: type[BaseException],
        trainer: Any,
        actors: list[Any],
        learner: Any,
        initial_weights: Any,
        *,
        epsilon: float,
        save_learner: bool,
        evaluate: Callable[[Any], None],
        progress: ProgressCallback | None = None,
        on_result: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.ray, self.actor_error = ray, actor_error
        self.trainer, self.actors, self.learner = trainer, actors, learner
        self.config = trainer.config
        self.state = trainer.run_state
        self.epsilon, self.save_learner = epsilon, save_learner
        self.progress, self.on_result = progress, on_result
        dist, train = self.config.distributed, self.config.train
        self.total = int(train.total_timesteps)
        self.rows_per_call = dist.rollout_steps * train.num_envs
        self.ratio = train.gradient_steps / train.train_freq
        self.lag_limit = 2 * dist.publish_interval

        self.pids = ray.get([actor.pid.remote() for actor in actors])
        self.learner_pid = ray.get(learner.pid.remote())
        self.weights_ref = ray.put(initial_weights)  # the learner's start (same config and seed)
        self.version = 0
        self.actor_version = [-1] * len(actors)  # an actor's weights come with its first rollout
        self.rows_cut = [0] * len(actors)  # n-step windows a time limit cut short (PrioritizingSink)
        self.pending: dict[Any, tuple[str, Any]] = {}
        self.waiting: list[int] = []
        self.in_flight_rows = 0

        self.actor_restarts = self.learner_restarts = 0
        self.resumed: list[int] = []  # the update counts a restarted learner came back at
        self.cut_total = 0
        self.updates = self.learner_calls = 0
        self.learner_busy = self.learner_sampling = 0.0
        self.losses: list[float] = []
        self.q_means: list[float] = []
        self.started = time.perf_counter()
        self.window = (self.started, 0, 0)
        self.next_log = train.log_interval
        self.next_eval = train.eval_frequency or math.inf
        self.next_checkpoint = train.checkpoint_frequency
        self.evaluate = evaluate  # the run's evaluation of the newest weights

    # ------------------------------------------------------------------ the rules

    def allowed_updates(self) -> int:
        train = self.config.train
        return int(max(0, self.state.global_step - train.learning_starts) * self.ratio) - self.updates

    def may_collect(self) -> bool:
        if (
            self.state.global_step + self.in_flight_rows >= self.total
            or self.trainer.stop_requested
            or self.trainer.reached_reward
        ):
            return False
        return self.allowed_updates() <= self.lag_limit

    def submit_actor(self, i: int) -> None:
        stale = self.actor_version[i] < self.version
        warmup = self.state.global_step < self.config.train.learning_starts
        ref = self.actors[i].rollout.remote(
            self.config.distributed.rollout_steps, self.weights_ref if stale else None, self.version, warmup
        )
        self.actor_version[i] = self.version
        self.in_flight_rows += self.rows_per_call
        self.pending[ref] = ("actor", i)

    def submit_learner(self) -> None:
        if self.trainer.reached_reward or any(kind == "learner" for kind, _ in self.pending.values()):
            return  # a run that reached train.stop_at_reward keeps the weights that did
        n = min(self.allowed_updates(), self.config.distributed.publish_interval)
        if n > 0:
            progress = min(self.state.global_step / self.total, 1.0)  # the learning-rate schedule's
            report, weights = self.learner.train.options(num_returns=2).remote(n, progress)
            self.pending[report] = ("learner", weights)

    # ------------------------------------------------------------------ the loop

    def run(self) -> float:
        """Until the budget is collected and every call answered; returns the wall seconds."""
        for i in range(len(self.actors)):
            self.submit_actor(i)
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1)
            kind, detail = self.pending.pop(ready[0])
            if kind == "actor":
                self._actor_answered(detail, ready[0])
            else:
                self._learner_answered(ready[0], detail)
            while self.waiting and self.may_collect():
                self.submit_actor(self.waiting.pop(0))
            self.submit_learner()
            self._periodic()
        return time.perf_counter() - self.started

    def _actor_answered(self, i: int, ref: Any) -> None:
        self.in_flight_rows -= self.rows_per_call
        try:
            result = self.ray.get(ref)
        except self.actor_error:  # Ray restarts it; the next call goes to the new process
            self.actor_version[i] = -1
            self.waiting.append(i)
            return
        if result["pid"] != self.pids[i]:  # a new process: Ray restarted the actor
            self.actor_restarts += 1
            self.pids[i] = result["pid"]
            self.actor_version[i] = -1  # it starts without weights: send them with the next call
            self.rows_cut[i] = 0  # its count starts again
        self.cut_total += result["rows_cut"] - self.rows_cut[i]
        self.rows_cut[i] = result["rows_cut"]
        state = self.state
        state.global_step += result["steps"]
        for reward, length in result["episodes"]:
            state.record_episode(reward, length)
            self.trainer.metrics.log_metrics(
                {"episode/reward": reward, "episode/length": float(length)}, state.global_step
            )
        if self.on_result is not None:
            self.on_result(result)
        self.waiting.append(i)

    def _learner_answered(self, ref: Any, weights_ref: Any) -> None:
        try:
            report = self.ray.get(ref)
        except self.actor_error:  # Ray restarts it (from learner.pt); the next call goes there
            return
        if report["pid"] != self.learner_pid:
            self.learner_restarts += 1
            self.learner_pid = report["pid"]
        if report["resumed_from"] is not None:
            self.resumed.append(report["resumed_from"])
        if report["resumed_from"] is not None or report["training_steps"] < self.updates:
            self.updates = report["training_steps"]  # a new learner: its own count rules
        else:
            self.updates += report["updates"]
        self.learner_calls += 1
        self.learner_busy += report["update_seconds"]
        self.learner_sampling += report["sample_seconds"]
        if report["updates"]:
            self.losses.append(report["loss"])
            self.q_means.append(report["q_mean"])
            self.weights_ref = weights_ref
            self.version += 1

    def _periodic(self) -> None:
        state, train = self.state, self.config.train
        if state.global_step >= self.next_eval:
            self.next_eval = (state.global_step // train.eval_frequency + 1) * train.eval_frequency
            self.evaluate(self.ray.get(self.weights_ref))
        if self.save_learner and state.episodes_done >= self.next_checkpoint:
            self.next_checkpoint = (state.episodes_done // train.checkpoint_frequency + 1) * train.checkpoint_frequency
            self.learner.save.remote()  # after the learner's current call: Ray keeps an actor's order
        if state.global_step >= self.next_log or not self.pending:
            self.next_log = (state.global_step // train.log_interval + 1) * train.log_interval
            self._log()

    def idle_fraction(self, seconds: float) -> float:
        """The share of ``seconds`` the learner was not updating (waiting for data or a call)."""
        return 1.0 - min(self.learner_busy / max(seconds, 1e-9), 1.0)

    def _log(self) -> None:
        state, trainer = self.state, self.trainer
        now = time.perf_counter()
        seconds = max(now - self.window[0], 1e-9)
        scalars = {
            "time/steps_per_second": (state.global_step - self.window[1]) / seconds,
            "time/updates_per_second": (self.updates - self.window[2]) / seconds,
            "train/training_steps": float(self.updates),
            "distributed/actor_restarts": float(self.actor_restarts),
            "distributed/learner_restarts": float(self.learner_restarts),
            "distributed/learner_idle_fraction": self.idle_fraction(now - self.started),
            "distributed/weights_version": float(self.version),
        }
        if self.losses:
            scalars["train/loss"] = sum(self.losses) / len(self.losses)
            scalars["train/q_mean"] = sum(self.q_means) / len(self.q_means)
            self.losses, self.q_means = [], []
        if state.episode_rewards:
            scalars["rollout/reward_mean"] = trainer.recent_mean_reward()
        trainer.metrics.log_metrics(scalars, state.global_step)
        self.window = (now, state.global_step, self.updates)
        if self.progress is not None:
            self.progress(
                {
                    "step": float(state.global_step),
                    "total_steps": float(self.total),
                    "episodes": float(state.episodes_done),
                    "total_episodes": 0.0,
                    "reward_mean": scalars.get("rollout/reward_mean", float("nan")),
                    "epsilon": self.epsilon,
                }
            )
