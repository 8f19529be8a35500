"""LearningAgent: the spec's agent, composed of a Learner, a local buffer, a policy and replay
sources.

``LearningAgent`` keeps every method and signature of the spec (``store_experience``,
``learn_from_experiences``, ``get_similar_experiences``, ``select_action``, ...) and of the
README; the work happens in parts with one job each: :class:`~agent.learner.Learner` (the TD
update, synchronous, no I/O), :class:`~agent.policy.EpsilonGreedy` (acting),
:class:`~agent.replay.ExperienceBuffer` (the local ring) and the replay sources of
:mod:`agent.replay_sources` (local, Memory service, their mix, similar states). The spec's
methods that talk to the Memory service stay ``async``; callers that are not async use
:meth:`LearningAgent.learn` directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agent.config import Config, load_config, resolve_device, with_overrides
from agent.learner import Learner, UpdateStats
from agent.memory_client import NearestExperiences
from agent.network import LearningNetwork, NetworkArchitecture
from agent.nstep import one_step_dones, one_step_rows
from agent.policy import EpsilonGreedy
from agent.replay import ExperienceBuffer, PrioritizedBuffer, Transitions
from agent.replay_sources import LocalReplay, MemoryReplay, MixedReplay, RowShapeGuard, SimilarReplay

log = logging.getLogger(__name__)


def replay_horizon(config: Config) -> int | None:
    """The run's step budget as the config states it (``train.total_timesteps``, else
    ``max_episodes`` x ``max_steps_per_episode``): the horizon of prioritized replay's beta."""
    train = config.train
    if train.total_timesteps:
        return int(train.total_timesteps)
    if train.max_episodes and train.max_steps_per_episode:
        return int(train.max_episodes) * int(train.max_steps_per_episode)
    return None


class TrainingDivergedError(RuntimeError):
    """The TD loss became NaN or infinite: the configuration diverges."""


class LearningAgent:
    """Chooses actions epsilon-greedily and learns Q-values from replayed experience.

    Every default comes from ``params.yaml``; the keyword arguments override it. ``config`` is a
    complete :class:`~agent.config.Config` (for example restored from a checkpoint).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_size: int | None = None,
        learning_rate: float | None = None,
        gamma: float | None = None,
        local_buffer_size: int | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        seed: int | None = None,
        *,
        config: Config | None = None,
        architecture: NetworkArchitecture | None = None,
        train_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        base = config if config is not None else load_config()
        explicit: dict[str, dict[str, Any]] = {
            "run": {k: v for k, v in {"device": device, "seed": seed}.items() if v is not None},
            "network": {"hidden_size": hidden_size, "hidden_layers": None} if hidden_size is not None else {},
            "replay": {"local_buffer_size": local_buffer_size} if local_buffer_size is not None else {},
            "train": {
                **{
                    k: v
                    for k, v in {
                        "learning_rate": learning_rate,
                        "gamma": gamma,
                        "batch_size": batch_size,
                    }.items()
                    if v is not None
                },
                **(train_overrides or {}),
            },
        }
        # What the caller chose by keyword: a trainer of another task applies that task's profile
        # to everything else (see use_config and agent.config.config_for_task), never to these.
        self.explicit_settings = {name: values for name, values in explicit.items() if values}
        self.config = with_overrides(base, **explicit)
        cfg = self.config
        if cfg.run.torch_threads > 0:
            torch.set_num_threads(cfg.run.torch_threads)
        self.device = resolve_device(cfg.run.device)
        self.input_size, self.output_size = int(input_size), int(output_size)
        self._architecture_from_config = architecture is None
        self.architecture = architecture or self._config_architecture(cfg)
        if (self.architecture.input_dim, self.architecture.output_dim) != (self.input_size, self.output_size):
            raise ValueError(
                f"architecture is {self.architecture.input_dim}->{self.architecture.output_dim}, "
                f"agent is {self.input_size}->{self.output_size}"
            )
        self.learner = Learner(self.architecture, cfg.train, seed=cfg.run.seed, device=self.device)
        self.buffer = self._new_buffer(cfg)
        self.policy = EpsilonGreedy(self.learner.q_network, np.random.default_rng(cfg.run.seed))
        self.last_similar_count = 0
        self._guard = RowShapeGuard(self.input_size)
        self._replay: tuple[Any, MixedReplay] | None = None  # (memory client, sources built for it)

    def use_config(self, config: Config) -> None:
        """Adopt ``config`` (a trainer's: its task, its ``training_config``) before training.

        What the agent built from its old config follows: the optimiser's step size, the
        closed-form update's settings, and the local buffer's capacity while it is still empty
        (a filled buffer is kept as it is). The network is not rebuilt: if ``config`` describes
        another network than this agent's, that is an error, unless the agent was given its
        ``architecture`` (which then rules, as in ``__init__``).
        """
        if self._architecture_from_config and self._config_architecture(config) != self.architecture:
            raise ValueError(
                f"the configuration for task '{config.train.task}' describes another network than "
                "this agent's: build the agent with that configuration "
                f"(LearningAgent(..., config=load_config(overrides=['train.task={config.train.task}'])))"
            )
        self.config = config
        self.learner.configure(config.train)
        self._replay = None  # sources read replay/memory settings: rebuilt on next use
        replay = config.replay
        capacity = replay.local_buffer_size
        kind_changed = replay.prioritized != isinstance(self.buffer, PrioritizedBuffer)
        if capacity != self.buffer.capacity or kind_changed:
            if len(self.buffer) == 0:
                self.buffer = self._new_buffer(config)
            else:
                log.warning(
                    "keeping the local buffer (capacity %d, %s, already holding experience) although "
                    "replay.local_buffer_size is now %d and replay.prioritized %s",
                    self.buffer.capacity,
                    "prioritized" if isinstance(self.buffer, PrioritizedBuffer) else "uniform",
                    capacity, replay.prioritized,
                )
        if isinstance(self.buffer, PrioritizedBuffer):
            self.buffer.configure(replay.priority_alpha, replay.priority_beta, replay.priority_eps)
            if self.buffer.added == 0:  # the beta schedule's horizon is fixed by the first row
                self.buffer.beta_horizon = replay_horizon(config)

    def plan_replay(self, horizon_steps: int | None) -> None:
        """Fix the horizon (environment steps) over which a prioritized local buffer's beta rises
        to 1: the trainer's step budget for this run. Without this call it is the config's budget
        (:func:`replay_horizon`). A resumed run keeps its checkpoint's. Uniform buffers: no-op."""
        if isinstance(self.buffer, PrioritizedBuffer):
            self.buffer.beta_horizon = horizon_steps

    def _new_buffer(self, cfg: Config) -> ExperienceBuffer:
        """The local buffer ``cfg`` describes: uniform, or prioritized (``replay.prioritized``)."""
        replay = cfg.replay
        if not replay.prioritized:
            return ExperienceBuffer(replay.local_buffer_size, self.input_size, self.device, seed=cfg.run.seed)
        return PrioritizedBuffer(
            replay.local_buffer_size, self.input_size, self.device, seed=cfg.run.seed,
            alpha=replay.priority_alpha, beta=replay.priority_beta, eps=replay.priority_eps,
            beta_horizon=replay_horizon(cfg),
        )

    def _config_architecture(self, cfg: Config) -> NetworkArchitecture:
        """The network ``cfg``'s ``network`` section describes for this agent's sizes."""
        return NetworkArchitecture(
            input_dim=self.input_size,
            output_dim=self.output_size,
            hidden_layers=cfg.network.hidden_layers or (cfg.network.hidden_size,) * cfg.network.num_hidden_layers,
            activation=cfg.network.activation,
            dropout=cfg.network.dropout,
            dueling=cfg.network.dueling,
            normalize_obs=cfg.network.normalize_obs,
        )

    # ------------------------------------------------------------------ parts, by their old names

    @property
    def q_network(self) -> LearningNetwork:
        return self.learner.q_network

    @property
    def target_network(self) -> LearningNetwork:
        return self.learner.target_network

    @property
    def optimizer(self) -> Any:
        return self.learner.optimizer

    @property
    def training_steps(self) -> int:
        return self.learner.training_steps

    @property
    def histograms(self) -> Any:
        return self.learner.histograms

    @property
    def rng(self) -> np.random.Generator:
        """The exploration stream (part of a run's state)."""
        return self.policy.rng

    @property
    def gamma(self) -> float:
        return self.config.train.gamma

    @property
    def learning_rate(self) -> float:
        return self.learner.learning_rate

    def set_learning_rate(self, value: float) -> None:
        self.learner.optimizer.set_lr(value)

    def layer_gradient_norms(self) -> dict[str, float]:
        return self.learner.layer_gradient_norms()

    def update_target_network(self) -> None:
        """Copy the online weights into the target network."""
        self.learner.update_target_network()

    # ------------------------------------------------------------------ acting

    def q_values(self, states: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Q-values for a batch of states (no gradient)."""
        return self.policy.q_values(states)

    def greedy_actions(self, states: np.ndarray) -> np.ndarray:
        """argmax_a Q(s, a) for a batch of states, by the cheapest route available."""
        return self.policy.greedy(states)

    def act(self, states: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
        """Epsilon-greedy actions for a batch of states: one forward pass for all of them."""
        return self.policy.act(states, epsilon)

    def select_action(self, state: np.ndarray, epsilon: float = 0.0) -> int:
        """The spec's single-state form of :meth:`act`."""
        return int(self.act(np.asarray(state, dtype=np.float32)[None, :], epsilon)[0])

    # ------------------------------------------------------------------ experience

    async def store_experience(
        self,
        state: Any,
        action: Any,
        reward: Any,
        next_state: Any,
        done: Any,
        memory_client: Any = None,
    ) -> None:
        """Store one transition or a batch in the local buffer and, if given, the Memory service.

        ``done`` means the episode really ended (terminated), not that a time limit cut it:
        the target bootstraps through truncations. These are 1-step transitions: with
        ``replay.n_step`` > 1 the local buffer stores them with the bootstrap mask that makes the
        n-step update discount them by gamma (see :mod:`agent.nstep`).
        """
        self.buffer.add(
            state, action, reward, next_state,
            one_step_dones(done, self.config.train.gamma, self.config.replay.n_step),
        )
        if memory_client is not None:
            obs = np.asarray(state, dtype=np.float32)
            batched = obs.ndim == 2
            memory_client.write_transitions(
                obs if batched else obs[None],
                np.atleast_1d(np.asarray(action, dtype=np.int64)),
                np.atleast_1d(np.asarray(reward, dtype=np.float32)),
                np.asarray(next_state, dtype=np.float32).reshape(obs.reshape(-1, self.input_size).shape),
                np.atleast_1d(np.asarray(done, dtype=np.float32)),
            )

    async def get_similar_experiences(
        self, state: Any, memory_client: Any, k: int = 5
    ) -> NearestExperiences | None:
        """The k stored experiences nearest to ``state``, nearest first; None when the service is
        unavailable (or holds nothing yet).

        Each has the state, action, reward, next state, done flag and distance. The client's
        queued writes are delivered first, so an experience stored just before is found: the
        spec calls this right after ``store_experience`` and expects to read its own writes.
        """
        if memory_client is None:
            return None
        found = await memory_client.search_similar(
            np.asarray(state, dtype=np.float32), k=k, read_own_writes=True
        )
        return None if found is None else NearestExperiences(found)

    # ------------------------------------------------------------------ learning

    def _embed(self, states: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of the current network (no dropout: one point per state)."""
        network = self.learner.q_network
        training = network.training
        network.eval()
        try:
            with torch.inference_mode():
                return network.features(states)
        finally:
            network.train(training)

    def replay_sources(self, memory_client: Any = None) -> MixedReplay:
        """The replay this agent learns from: its local buffer, plus the Memory service's batches
        and similar states when a client is given and the config asks for them."""
        if self._replay is not None and self._replay[0] is memory_client and self._replay[1].local.buffer is self.buffer:
            return self._replay[1]
        replay = self.config.replay
        memory = similar = None
        if memory_client is not None:
            if replay.memory_batch_size > 0:
                memory = MemoryReplay(memory_client, self.config.memory, self.device, self._guard)
            if replay.similar_batch_size > 0:
                similar = SimilarReplay(memory_client, replay, self.device, self._guard, embed=self._embed)
        sources = MixedReplay(
            LocalReplay(self.buffer), memory, similar, memory_batch_size=replay.memory_batch_size
        )
        self._replay = (memory_client, sources)
        return sources

    def learn(
        self,
        memory_client: Any = None,
        gamma: float | None = None,
        local_batch_size: int | None = None,
        gradient_steps: int = 1,
    ) -> dict[str, float] | None:
        """Run ``gradient_steps`` updates; returns averaged losses, or None if the buffer is too small.

        Local batches for all steps are sampled at once; memory batches come from the Memory
        service one per step (``memory_client=None`` means local replay only).

        With ``replay.n_step`` = n > 1 each update discounts by gamma^n: the local rows carry
        their own correction (a bootstrap mask, see :mod:`agent.nstep`), and the 1-step rows of
        the Memory service get theirs here. With a prioritized local buffer the local rows come
        with importance weights, and their TD errors go back as priorities after the call's
        last update (its batches were all drawn before the first, so nothing drawn changes).
        """
        batch_size = local_batch_size or self.config.train.batch_size
        sources = self.replay_sources(memory_client)
        batches = sources.stream(batch_size, gradient_steps)
        if batches is None:
            return None
        n_step = self.config.replay.n_step
        base_gamma = self.config.train.gamma if gamma is None else float(gamma)
        update_gamma = gamma if n_step == 1 else base_gamma**n_step
        records: list[torch.Tensor] = []
        local_ids: list[np.ndarray] = []
        local_td: list[torch.Tensor] = []
        memory_steps = similar_rows = 0
        for batch in batches:
            similar_rows += batch.similar_rows
            memory_steps += batch.extra is not None
            extra = batch.extra if batch.extra is None else one_step_rows(batch.extra, base_gamma, n_step)
            stats: UpdateStats = self.learner.update(
                batch.local, batch.local_weights, memory=extra, memory_weights=batch.extra_weights,
                gamma=update_gamma,
            )
            records.extend(stats.scalars())
            sources.update_priorities(batch, stats.td_memory)
            if batch.local_ids is not None:
                local_ids.append(batch.local_ids)
                local_td.append(stats.td_local)
        if sources.similar is not None:
            self.last_similar_count = sources.similar.last_count
        means = torch.stack(records).view(gradient_steps, -1).mean(dim=0)
        total, local_loss, memory_loss, q_mean, grad_norm = means.tolist()
        if not np.isfinite(total):
            raise TrainingDivergedError(
                f"TD loss became {total} at update {self.training_steps}: lower the learning rate "
                "or enable gradient clipping"
            )
        stats_out = {
            "loss": total,
            "loss_local": local_loss,
            "loss_memory": memory_loss * gradient_steps / max(memory_steps, 1),
            "q_mean": q_mean,
            "grad_norm": grad_norm,
            "memory_batches": float(memory_steps),
            "similar_rows": similar_rows / gradient_steps,
        }
        if local_ids:  # one transfer to the host per call, in update order (the last wins)
            sources.local.update_priorities(np.concatenate(local_ids), torch.cat(local_td))
            assert isinstance(self.buffer, PrioritizedBuffer)
            stats_out["priority_beta"] = self.buffer.beta
        return stats_out

    async def learn_from_experiences(
        self,
        memory_client: Any = None,
        gamma: float | None = None,
        local_batch_size: int | None = None,
        gradient_steps: int = 1,
    ) -> dict[str, float] | None:
        """The spec's (async) form of :meth:`learn`."""
        return self.learn(memory_client, gamma, local_batch_size, gradient_steps)

    # ------------------------------------------------------------------ state

    def state_dict(self, include_buffer: bool = True) -> dict[str, Any]:
        return {
            **self.learner.state_dict(),
            "rng": self.policy.rng.bit_generator.state,
            "buffer": self.buffer.state_dict(include_data=include_buffer),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.learner.load_state_dict(dict(state))
        self.policy.rng.bit_generator.state = state["rng"]
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
