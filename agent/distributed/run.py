"""The driver of an Ape-X run on Ray: actors collect, the learner learns, this loop keeps time.

Shape (Horgan et al., 2018, on Ray and the Memory service)::

    ApexActor x N --rows + initial priorities--> Memory service <--prioritized batches-- ApexLearner
          ^                                          ^ new priorities                      |
          +------ newest weights (Ray object store) -+-------------------------------------+

The driver submits actor rollouts and learner calls and waits on whichever finishes first
(``ray.wait``). Two rules keep a distributed run the run its config describes:

- *Replay ratio.* The learner may do ``(steps - learning_starts) * gradient_steps / train_freq``
  updates by the time ``steps`` transitions were collected, as a single-process run does; actors
  wait when the learner lags more than two publications behind (a rate limiter, as Reverb's).
  Whenever the learner has nothing allowed, or the service no batch to give, it is idle: the run
  reports that fraction of its wall time.
- *Weights.* Each learner call ends with a copy of its weights, put in Ray's object store once;
  an actor gets the reference with its next rollout only when it has an older version.

Faults: actors and the learner are restartable Ray actors. An actor whose process dies is
restarted by Ray with its original arguments (the same outbox directory, so its unacknowledged
writes are delivered) and the run goes on; restarts are counted by the actor's process id. A
learner that dies comes back from its last checkpoint. The Memory-service client's outbox absorbs
a service restart, as in a single-process run.

The driver holds a :class:`~agent.training.trainer.Trainer` of its own that never trains: its
run state, metrics sinks (TensorBoard), evaluation and checkpoint files are the single-process
run's, so ``lagent evaluate RUN`` and the run directory work the same.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import save_checkpoint_file
from agent.distributed.actor import ApexActor, apex_epsilons
from agent.distributed.learner import ApexLearner

ProgressCallback = Callable[[Mapping[str, float]], None]


def connect_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join the Ray cluster at ``address``, or start a local instance of ``num_cpus`` CPUs (the
    machine's when None); reuse one already connected. True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's own notices (its token setup, the instance's start) would scribble over a progress
    # bar; errors still show, and a failed task raises in the driver.
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **options)
    return True


class DistributedTrainer:
    """Runs ``trainer``'s config (``distributed.actors`` of them) as an Ape-X run on Ray.

    ``trainer`` is the head's trainer: its config, run directory, metrics and evaluation are the
    run's; its own collector never steps. The Memory service must answer at ``memory.base_url``
    (the CLI starts it on loopback when needed).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.config = trainer.config
        dist = self.config.distributed
        if dist.actors < 1:
            raise ValueError("distributed.actors must be >= 1 for a distributed run")
        if self.config.train.total_timesteps is None:
            raise ValueError("a distributed run needs a step budget (train.total_timesteps, --timesteps)")
        if self.config.train.use_curriculum:
            raise ValueError("the curriculum runs in one process: drop --curriculum or --actors")
        self.epsilons = apex_epsilons(dist.actors, dist.epsilon, dist.epsilon_alpha)
        self.actor_restarts = 0
        self.learner_restarts = 0
        self.report: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Any, run_dir: str | Path | None = None) -> DistributedTrainer:
        """A distributed run of ``config`` (its task, its ``distributed`` section), with a head
        trainer of its own writing to ``run_dir`` (None: no files)."""
        from agent.dqn import LearningAgent
        from agent.tasks import task_spaces
        from agent.training import Trainer

        task = config.train.task
        obs_dim, n_actions = task_spaces(task, config=config)
        agent = LearningAgent(obs_dim, n_actions, config=config)
        return cls(Trainer(agent, task_type=task, run_dir=run_dir))

    # ------------------------------------------------------------------ placement

    def _learner_device(self, resources: Mapping[str, float]) -> str:
        wanted = self.config.distributed.learner_device
        if wanted == "auto":
            return "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
        if wanted.startswith("cuda") and resources.get("GPU", 0) < 1:
            raise ValueError(f"learner_device {wanted!r}: the Ray cluster has no GPU")
        return wanted

    def _actor_cpus(self, resources: Mapping[str, float], learner_cpus: float) -> float:
        """What each actor reserves: ``distributed.actor_cpus``, or the cluster's CPUs beside the
        learner's shared out (at most 1), so that every actor and the learner fit at once."""
        dist = self.config.distributed
        if dist.actor_cpus is not None:
            return dist.actor_cpus
        spare = max(resources.get("CPU", 1.0) - learner_cpus, 0.1)
        return max(min(1.0, spare / dist.actors), 0.01)

    def _env_vars(self) -> dict[str, str]:
        """What a worker must see that a remote machine would not have: the service's token."""
        token = os.environ.get("MEMORY_TOKEN")
        return {"MEMORY_TOKEN": token} if token else {}

    # ------------------------------------------------------------------ the run

    def run(
        self,
        progress: ProgressCallback | None = None,
        *,
        on_result: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Collect ``train.total_timesteps`` transitions with the actors while the learner learns;
        returns the run's summary. ``on_result`` sees every actor's rollout report (tests use it
        to kill an actor mid-run)."""
        import ray
        from ray.exceptions import RayActorError

        started_ray = connect_ray(self.config.distributed.ray_address, self.config.distributed.num_cpus)
        try:
            return self._run(ray, RayActorError, progress, on_result)
        finally:
            if started_ray:
                ray.shutdown()

    def _run(
        self, ray: Any, actor_error: type[BaseException], progress: ProgressCallback | None, on_result: Any
    ) -> dict[str, Any]:
        config, trainer = self.config, self.trainer
        dist, train = config.distributed, config.train
        resources = ray.cluster_resources()
        device = self._learner_device(resources)
        learner_cpus = 1.0
        actor_cpus = self._actor_cpus(resources, learner_cpus)
        run_dir = trainer.run_dir
        checkpoints = Path(run_dir) / "checkpoints" if run_dir is not None else None
        runtime_env = {"env_vars": self._env_vars()} if self._env_vars() else None
        config_dict = config.to_dict()
        agent = trainer.agent
        architecture = agent.architecture.to_dict()
        initial = {k: v.detach().cpu().clone() for k, v in agent.q_network.state_dict().items()}

        learner_cls = ray.remote(ApexLearner).options(
            num_cpus=learner_cpus,
            num_gpus=1 if device.startswith("cuda") else 0,
            max_restarts=-1,
            max_task_retries=0,
            runtime_env=runtime_env,
        )
        learner = learner_cls.remote(
            config_dict,
            agent.input_size,
            agent.output_size,
            device=device,
            checkpoint=str(checkpoints / "learner.pt") if checkpoints is not None else None,
        )
        actor_cls = ray.remote(ApexActor).options(
            num_cpus=actor_cpus, max_restarts=-1, max_task_retries=0, runtime_env=runtime_env
        )
        actors = [
            actor_cls.remote(
                config_dict,
                i,
                epsilon,
                architecture,
                outbox_dir=str(Path(run_dir) / "memory-outbox" / f"actor-{i}") if run_dir is not None else None,
            )
            for i, epsilon in enumerate(self.epsilons)
        ]
        pids = ray.get([actor.pid.remote() for actor in actors])
        learner_pid = ray.get(learner.pid.remote())
        resumed: list[int] = []  # the update counts a restarted learner came back at

        total = int(train.total_timesteps)
        rows_per_call = dist.rollout_steps * train.num_envs
        ratio = train.gradient_steps / train.train_freq
        lag_limit = 2 * dist.publish_interval
        state = trainer.run_state
        state.planned_steps = total
        weights_ref = ray.put(initial)  # the learner starts from the same weights (same config, seed)
        version = 0
        actor_version = [-1] * len(actors)  # an actor's weights come with its first rollout
        rows_cut = [0] * len(actors)  # n-step windows cut short by a time limit (see PrioritizingSink)
        cut_total = 0
        pending: dict[Any, tuple[str, Any]] = {}
        waiting_actors: list[int] = []
        in_flight_rows = 0
        updates = 0
        learner_busy = learner_sampling = 0.0
        learner_calls = 0
        losses: list[float] = []
        q_means: list[float] = []
        next_log = train.log_interval
        next_eval = train.eval_frequency or math.inf
        next_checkpoint = train.checkpoint_frequency
        started = time.perf_counter()
        window = (started, 0, 0)

        def allowed_updates() -> int:
            return int(max(0, state.global_step - train.learning_starts) * ratio) - updates

        def submit_actor(i: int) -> None:
            nonlocal in_flight_rows
            stale = actor_version[i] < version
            ref = actors[i].rollout.remote(
                dist.rollout_steps, weights_ref if stale else None, version, state.global_step < train.learning_starts
            )
            actor_version[i] = version
            in_flight_rows += rows_per_call
            pending[ref] = ("actor", i)

        def may_collect() -> bool:
            if state.global_step + in_flight_rows >= total or trainer.stop_requested:
                return False
            return allowed_updates() <= lag_limit

        def submit_learner() -> bool:
            if any(kind == "learner" for kind, _ in pending.values()):
                return True
            n = min(allowed_updates(), dist.publish_interval)
            if n <= 0:
                return False
            report_ref, new_weights = learner.train.options(num_returns=2).remote(n, min(state.global_step / total, 1.0))
            pending[report_ref] = ("learner", new_weights)
            return True

        for i in range(len(actors)):
            submit_actor(i)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            kind, detail = pending.pop(ref)
            if kind == "actor":
                i = detail
                in_flight_rows -= rows_per_call
                try:
                    result = ray.get(ref)
                except actor_error:
                    actor_version[i] = -1  # a restarted actor has the initial weights again
                    if may_collect():
                        submit_actor(i)
                    else:
                        waiting_actors.append(i)
                    continue
                if result["pid"] != pids[i]:  # a new process: Ray restarted the actor
                    self.actor_restarts += 1
                    pids[i] = result["pid"]
                    actor_version[i] = -1  # it starts without weights: send them with the next call
                    rows_cut[i] = 0  # its count starts again
                cut_total += result["rows_cut"] - rows_cut[i]
                rows_cut[i] = result["rows_cut"]
                state.global_step += result["steps"]
                for reward, length in result["episodes"]:
                    state.record_episode(reward, length)
                    trainer.metrics.log_metrics(
                        {"episode/reward": reward, "episode/length": float(length)}, state.global_step
                    )
                if on_result is not None:
                    on_result(result)
                waiting_actors.append(i)
            else:
                try:
                    report = ray.get(ref)
                except actor_error:  # Ray restarts it; the call goes to the new process
                    submit_learner()
                    continue
                if report["pid"] != learner_pid:  # a new process, back from learner.pt if it was written
                    self.learner_restarts += 1
                    learner_pid = report["pid"]
                if report["resumed_from"] is not None:
                    resumed.append(report["resumed_from"])
                learner_calls += 1
                learner_busy += report["update_seconds"]
                learner_sampling += report["sample_seconds"]
                if report["resumed_from"] is not None or report["training_steps"] < updates:
                    updates = report["training_steps"]
                else:
                    updates += report["updates"]
                if report["updates"]:
                    losses.append(report["loss"])
                    q_means.append(report["q_mean"])
                    weights_ref = detail
                    version += 1
            while waiting_actors and may_collect():
                submit_actor(waiting_actors.pop(0))
            submit_learner()

            if state.global_step >= next_eval:
                next_eval = (state.global_step // train.eval_frequency + 1) * train.eval_frequency
                self._evaluate(ray.get(weights_ref))
            if state.episodes_done >= next_checkpoint and checkpoints is not None:
                next_checkpoint = (state.episodes_done // train.checkpoint_frequency + 1) * train.checkpoint_frequency
                learner.save.remote()  # runs after the learner's current call: Ray keeps an actor's order
            if state.global_step >= next_log or not pending:
                next_log = (state.global_step // train.log_interval + 1) * train.log_interval
                now = time.perf_counter()
                seconds = max(now - window[0], 1e-9)
                scalars = {
                    "time/steps_per_second": (state.global_step - window[1]) / seconds,
                    "time/updates_per_second": (updates - window[2]) / seconds,
                    "train/training_steps": float(updates),
                    "distributed/actor_restarts": float(self.actor_restarts),
                    "distributed/learner_restarts": float(self.learner_restarts),
                    "distributed/learner_idle_fraction": 1.0 - min(learner_busy / max(now - started, 1e-9), 1.0),
                    "distributed/weights_version": float(version),
                }
                if losses:
                    scalars["train/loss"] = sum(losses) / len(losses)
                    scalars["train/q_mean"] = sum(q_means) / len(q_means)
                    losses, q_means = [], []
                if state.episode_rewards:
                    scalars["rollout/reward_mean"] = trainer.recent_mean_reward()
                trainer.metrics.log_metrics(scalars, state.global_step)
                window = (now, state.global_step, updates)
                if progress is not None:
                    progress(
                        {
                            "step": float(state.global_step),
                            "total_steps": float(total),
                            "episodes": float(state.episodes_done),
                            "total_episodes": 0.0,
                            "reward_mean": scalars.get("rollout/reward_mean", float("nan")),
                            "epsilon": self.epsilons[0],
                        }
                    )

        wall = time.perf_counter() - started
        learner_state = ray.get(learner.state_dict.remote())
        agent.learner.load_state_dict(learner_state)
        actor_states = ray.get([actor.state.remote() for actor in actors])
        actor_memory = ray.get([actor.close.remote() for actor in actors])
        learner_memory = ray.get(learner.metrics.remote())
        ray.get(learner.close.remote())
        for handle in (*actors, learner):
            ray.kill(handle)
        state.train_seconds += wall
        self.report = {
            "actors": len(actors),
            "actor_epsilons": self.epsilons,
            "actor_cpus": actor_cpus,
            "learner_device": device,
            "actor_restarts": self.actor_restarts,
            "learner_restarts": self.learner_restarts,
            "learner_resumed_at": resumed,
            "updates": updates,
            "learner_calls": learner_calls,
            "weights_published": version,
            "updates_per_second": updates / max(wall, 1e-9),
            "learner_idle_fraction": 1.0 - min(learner_busy / max(wall, 1e-9), 1.0),
            "learner_update_seconds": learner_busy,
            "learner_sample_seconds": learner_sampling,
            "rows_delivered": sum(m.get("delivered", 0.0) for m in actor_memory),
            "rows_dropped": sum(m.get("dropped", 0.0) for m in actor_memory),
            "rows_queued": sum(m.get("queued_writes", 0.0) for m in actor_memory),
            "rows_cut": cut_total,
            "priority_updates_skipped": learner_memory.get("priority_updates_skipped", 0.0),
        }
        if checkpoints is not None:
            save_checkpoint_file(
                {
                    "learner": learner_state,
                    "actors": actor_states,
                    "collection": config.memory.collection,
                    "memory_url": config.memory.base_url,
                    "run_state": state.to_checkpoint(),
                    "distributed": {k: v for k, v in self.report.items() if k != "actor_epsilons"},
                },
                checkpoints / "distributed.pt",
            )
            trainer.save_checkpoint(checkpoints / "last.pt", include_run_state=False)
            trainer.write_episode_log(Path(run_dir) / "episodes.csv")
        if config.train.final_model == "best" and not trainer.stop_requested:
            trainer.restore_best_weights()
        summary = trainer.summary(wall, state.global_step)
        summary["training_steps"] = updates
        summary["epsilon"] = None
        summary["distributed"] = self.report
        return summary

    def _evaluate(self, weights: Mapping[str, torch.Tensor]) -> None:
        """The run's evaluation of the learner's newest ``weights``, on the head."""
        self.trainer.agent.q_network.load_state_dict(dict(weights))
        self.trainer.evaluate_during_training()
