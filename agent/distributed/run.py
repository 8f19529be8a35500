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
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import save_checkpoint_file
from agent.distributed.actor import ApexActor, apex_epsilons
from agent.distributed.learner import ApexLearner
from agent.distributed.loop import ApexLoop, ProgressCallback

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
        self.device = "cpu"
        self.actor_cpus = 1.0
        self.loop: ApexLoop | None = None
        """The running loop (its counters and process ids), once a run has started."""

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
        trainer = self.trainer
        learner, actors = self._place(ray)
        initial = {k: v.detach().cpu().clone() for k, v in trainer.agent.q_network.state_dict().items()}
        loop = ApexLoop(
            ray,
            actor_error,
            trainer,
            actors,
            learner,
            initial,
            epsilon=self.epsilons[0],
            save_learner=trainer.run_dir is not None,
            evaluate=self._evaluate,
            progress=progress,
            on_result=on_result,
        )
        trainer.run_state.planned_steps = loop.total
        self.loop = loop
        try:
            wall = loop.run()
        finally:
            self.actor_restarts, self.learner_restarts = loop.actor_restarts, loop.learner_restarts
        return self._finish(ray, loop, wall)

    def _place(self, ray: Any) -> tuple[Any, list[Any]]:
        """The learner and the actors, as restartable Ray actors sized to the cluster."""
        config, agent, run_dir = self.config, self.trainer.agent, self.trainer.run_dir
        resources = ray.cluster_resources()
        self.device = self._learner_device(resources)
        learner_cpus = 1.0
        self.actor_cpus = self._actor_cpus(resources, learner_cpus)
        env_vars = self._env_vars()
        runtime_env = {"env_vars": env_vars} if env_vars else None
        config_dict = config.to_dict()
        learner = (
            ray.remote(ApexLearner)
            .options(
                num_cpus=learner_cpus,
                num_gpus=1 if self.device.startswith("cuda") else 0,
                max_restarts=-1,
                max_task_retries=0,
                runtime_env=runtime_env,
            )
            .remote(
                config_dict,
                agent.input_size,
                agent.output_size,
                device=self.device,
                checkpoint=str(Path(run_dir) / "checkpoints" / "learner.pt") if run_dir is not None else None,
            )
        )
        actor_cls = ray.remote(ApexActor).options(
            num_cpus=self.actor_cpus, max_restarts=-1, max_task_retries=0, runtime_env=runtime_env
        )
        architecture = agent.architecture.to_dict()
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
        return learner, actors

    def _finish(self, ray: Any, loop: ApexLoop, wall: float) -> dict[str, Any]:
        """Collect the parts' final state and counters, stop them, write the run's files."""
        config, trainer = self.config, self.trainer
        state, learner, actors = trainer.run_state, loop.learner, loop.actors
        learner_state = ray.get(learner.state_dict.remote())
        trainer.agent.learner.load_state_dict(learner_state)
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
            "actor_cpus": self.actor_cpus,
            "learner_device": self.device,
            "actor_restarts": loop.actor_restarts,
            "learner_restarts": loop.learner_restarts,
            "learner_resumed_at": loop.resumed,
            "updates": loop.updates,
            "learner_calls": loop.learner_calls,
            "weights_published": loop.version,
            "updates_per_second": loop.updates / max(wall, 1e-9),
            "learner_idle_fraction": loop.idle_fraction(wall),
            "learner_update_seconds": loop.learner_busy,
            "learner_sample_seconds": loop.learner_sampling,
            "rows_delivered": sum(m.get("delivered", 0.0) for m in actor_memory),
            "rows_dropped": sum(m.get("dropped", 0.0) for m in actor_memory),
            "rows_queued": sum(m.get("queued_writes", 0.0) for m in actor_memory),
            "rows_cut": loop.cut_total,
            "priority_updates_skipped": learner_memory.get("priority_updates_skipped", 0.0),
        }
        if trainer.run_dir is not None:
            checkpoints = Path(trainer.run_dir) / "checkpoints"
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
            trainer.write_episode_log(Path(trainer.run_dir) / "episodes.csv")
        if config.train.final_model == "best" and not trainer.stop_requested:
            trainer.restore_best_weights()
        summary = trainer.summary(wall, state.global_step)
        summary["training_steps"] = loop.updates
        summary["epsilon"] = None
        summary["distributed"] = self.report
        return summary

    def _evaluate(self, weights: Mapping[str, torch.Tensor]) -> None:
        """The run's evaluation of the learner's newest ``weights``, on the head."""
        self.trainer.agent.q_network.load_state_dict(dict(weights))
        self.trainer.evaluate_during_training()
