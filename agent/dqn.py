"""LearningAgent: a Deep Q-Network that replays from its own buffer and from the Memory service.

The update is CleanRL's DQN with the usual stabilisers: a target network (hard copy or Polyak),
Double-DQN targets, Huber loss and gradient clipping. Learning from the Memory service adds a
second batch whose loss is computed and reported separately ("memory loss") and, optionally,
the nearest stored neighbours of recent states ("knowledge transfer").
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agent.closed_form import ClosedFormTD
from agent.config import Config, load_config, resolve_device, with_overrides
from agent.memory_client import NearestExperiences
from agent.monitoring import parameter_names
from agent.network import LearningNetwork, NetworkArchitecture, NumpyPolicy
from agent.optim import FastAdam
from agent.seeding import seeded_torch_rng
from agent.replay import ExperienceBuffer, Transitions

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The TD loss became NaN or infinite: the configuration diverges."""


def _transitions_from_numpy(batch: Any, device: torch.device) -> Transitions:
    """Tensors from a Memory-service batch (numpy arrays with the same field names)."""
    return Transitions(
        obs=torch.as_tensor(batch.obs, dtype=torch.float32, device=device),
        actions=torch.as_tensor(batch.actions, dtype=torch.int64, device=device),
        rewards=torch.as_tensor(batch.rewards, dtype=torch.float32, device=device),
        next_obs=torch.as_tensor(batch.next_obs, dtype=torch.float32, device=device),
        dones=torch.as_tensor(batch.dones, dtype=torch.float32, device=device),
    )


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
        with seeded_torch_rng(cfg.run.seed):  # both inits: the target's draws would disturb another thread's
            self.q_network = LearningNetwork.from_architecture(self.architecture).to(self.device)
            self.target_network = LearningNetwork.from_architecture(self.architecture).to(self.device)
        self.q_network.seed_dropout(cfg.run.seed)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.target_network.requires_grad_(False)
        self.q_network.eval()
        self.target_network.eval()
        self._uses_dropout = self.architecture.dropout > 0
        self.optimizer = FastAdam(self.q_network.parameters(), lr=cfg.train.learning_rate)
        self.buffer = ExperienceBuffer(
            cfg.replay.local_buffer_size, self.input_size, self.device, seed=cfg.run.seed
        )
        self.rng = np.random.default_rng(cfg.run.seed)
        self.training_steps = 0
        self._params = list(self.q_network.parameters())
        self._target_params = list(self.target_network.parameters())
        names = parameter_names(self.q_network)
        self._param_names = [names[id(p)] for p in self._params]  # hidden_0.weight, ..., head.bias
        layers = [name.rsplit(".", 1)[0] for name in self._param_names]
        self._layer_names = list(dict.fromkeys(layers))
        self._layer_index = torch.tensor([self._layer_names.index(x) for x in layers], device=self.device)
        # Weight and gradient snapshots every train.histogram_interval updates, for the trainer to
        # log; bounded, so an agent trained without a trainer does not hoard them.
        self.histograms: deque[tuple[int, dict[str, np.ndarray]]] = deque(maxlen=4)
        self.last_similar_count = 0
        self._warned_dim = False
        self._zero = torch.zeros((), device=self.device)
        self._closed_form = (
            ClosedFormTD(self.q_network, self.target_network, cfg.train.double_dqn, cfg.train.loss)
            if cfg.train.closed_form_update and ClosedFormTD.supports(self.q_network)
            else None
        )
        self._numpy_policy = (
            NumpyPolicy(self.q_network) if NumpyPolicy.supports(self.q_network) else None
        )

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
        self.set_learning_rate(config.train.learning_rate)
        capacity = config.replay.local_buffer_size
        if capacity != self.buffer.capacity:
            if len(self.buffer) == 0:
                self.buffer = ExperienceBuffer(capacity, self.input_size, self.device, seed=config.run.seed)
            else:
                log.warning(
                    "keeping the local buffer (capacity %d, already holding experience) although "
                    "replay.local_buffer_size is now %d",
                    self.buffer.capacity, capacity,
                )
        self._closed_form = (
            ClosedFormTD(self.q_network, self.target_network, config.train.double_dqn, config.train.loss)
            if config.train.closed_form_update and ClosedFormTD.supports(self.q_network)
            else None
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
        )

    # ------------------------------------------------------------------ acting

    @property
    def gamma(self) -> float:
        return self.config.train.gamma

    @property
    def learning_rate(self) -> float:
        return self.optimizer.lr

    def set_learning_rate(self, value: float) -> None:
        self.optimizer.set_lr(value)

    def q_values(self, states: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Q-values for a batch of states (no gradient)."""
        obs = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            return self.q_network(obs)

    def greedy_actions(self, states: np.ndarray) -> np.ndarray:
        """argmax_a Q(s, a) for a batch of states, by the cheapest route available."""
        states = np.asarray(states, dtype=np.float32)
        if self._numpy_policy is not None:
            return self._numpy_policy(states).argmax(axis=1)
        return self.q_values(states).argmax(dim=1).cpu().numpy()

    def act(self, states: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
        """Epsilon-greedy actions for a batch of states: one forward pass for all of them."""
        n = len(states)
        explore = self.rng.random(n) < epsilon
        n_explore = int(np.count_nonzero(explore))
        if n_explore == n:
            return self.rng.integers(0, self.output_size, size=n)
        actions = self.greedy_actions(states).astype(np.int64, copy=False)
        if n_explore:
            actions[explore] = self.rng.integers(0, self.output_size, size=n_explore)
        return actions

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
        the target bootstraps through truncations.
        """
        self.buffer.add(state, action, reward, next_state, done)
        if memory_client is not None:
            obs = np.asarray(state, dtype=np.float32)
            batched = obs.ndim == 2
            await memory_client.store_transitions(
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

    def _per_sample_loss(self, batch: Transitions, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss, q_taken, _ = self._td_loss(batch, gamma)
        return loss, q_taken

    def _td_loss(self, batch: Transitions, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, Q(s, a) and the TD error (detached: priorities of the memory rows)."""
        q_all = self.q_network(batch.obs)
        q_taken = q_all.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            next_target = self.target_network(batch.next_obs)
            if self.config.train.double_dqn:
                best = self.q_network(batch.next_obs).argmax(dim=1, keepdim=True)
                next_value = next_target.gather(1, best).squeeze(1)
            else:
                next_value = next_target.max(dim=1).values
            target = torch.addcmul(batch.rewards, 1.0 - batch.dones, next_value, value=gamma)
        if self.config.train.loss == "huber":
            loss = F.smooth_l1_loss(q_taken, target, reduction="none")
        else:
            loss = F.mse_loss(q_taken, target, reduction="none")
        return loss, q_taken, (q_taken.detach() - target)

    def _gradient_step(
        self,
        local: Transitions,
        extra: Transitions | None,
        extra_weights: torch.Tensor | None,
        gamma: float,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """One update on the local batch plus an optional memory batch; returns detached stats
        and the TD errors of the memory rows (None without them).

        Gradients come from ``ClosedFormTD`` for plain MLPs, from autograd otherwise; the losses
        are the same either way.
        """
        n_local = local.obs.shape[0]
        weights: torch.Tensor | None = None
        if extra is None:
            batch, scale = local, 1.0 / n_local
        else:
            # One forward pass over both batches, two losses reported apart.
            n_extra = extra.obs.shape[0]
            weights = extra_weights if extra_weights is not None else torch.ones(n_extra, device=self.device)
            batch = Transitions(*(torch.cat([a, b]) for a, b in zip(local, extra)))
            scale = torch.cat([torch.full((n_local,), 1.0 / n_local, device=self.device), weights / n_extra])
        if self._closed_form is not None:
            per_sample, q_taken, td, grads = self._closed_form.step(batch, gamma, scale)
        else:
            per_sample, q_taken, td = self._td_loss(batch, gamma)
        local_loss = per_sample[:n_local].mean()
        if weights is None:
            memory_loss, total = self._zero, local_loss
        else:
            memory_loss = (per_sample[n_local:] * weights).mean()
            total = local_loss + memory_loss
        if self._closed_form is None:
            grads = list(torch.autograd.grad(total, self._params))
        interval = self.config.train.histogram_interval
        snapshot = interval > 0 and (self.training_steps + 1) % interval == 0
        if snapshot:  # gradients before clipping changes them in place, weights after the update
            self.histograms.append((self.training_steps + 1, self._copies("gradients", grads)))
        grad_norm = self.optimizer.apply(grads, self.config.train.max_grad_norm)
        self.training_steps += 1
        if snapshot:
            self.histograms[-1][1].update(self._copies("weights", self._params))
        self._maybe_update_target()
        stats = (total.detach(), local_loss.detach(), memory_loss.detach(), q_taken.detach().mean(), grad_norm)
        return stats, (None if weights is None else td[n_local:])

    def _copies(self, kind: str, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """``tensors`` (one per parameter) copied to numpy, named ``{kind}/{layer}.{weight|bias}``."""
        return {
            f"{kind}/{name}": tensor.detach().to("cpu", copy=True).numpy()
            for name, tensor in zip(self._param_names, tensors)
        }

    def layer_gradient_norms(self) -> dict[str, float]:
        """Each linear layer's gradient norm at the latest update (weight and bias together, before
        clipping), keyed ``hidden_0``, ..., ``head``; {} before the first update.

        Read off the per-parameter norms the optimizer computes anyway for clipping, so asking
        once per logging window costs nothing in the update itself.
        """
        norms = self.optimizer.last_norms
        if norms is None:
            return {}
        squares = torch.zeros(len(self._layer_names), dtype=norms.dtype, device=norms.device)
        squares.index_add_(0, self._layer_index, norms.square())
        return dict(zip(self._layer_names, squares.sqrt().tolist()))

    def _maybe_update_target(self) -> None:
        train = self.config.train
        if train.target_update == "soft":
            torch._foreach_lerp_(self._target_params, self._params, train.tau)
        elif self.training_steps % train.target_update_interval == 0:
            self.update_target_network()

    def update_target_network(self) -> None:
        """Copy the online weights into the target network."""
        with torch.no_grad():
            torch._foreach_copy_(self._target_params, self._params)

    def _fits(self, obs: np.ndarray, what: str) -> bool:
        """False (logged once) for rows of another observation size: a collection shared by
        mistake with another task must not crash training, nor poison it."""
        if obs.ndim == 2 and obs.shape[1] == self.input_size:
            return True
        if not self._warned_dim:
            self._warned_dim = True
            log.error(
                "Memory service %s rows have %s features, this agent %d: ignoring them "
                "(is memory.collection shared with another task?)",
                what, obs.shape[1:] or "no", self.input_size,
            )
        return False

    async def _memory_batch(
        self, memory_client: Any
    ) -> tuple[Transitions | None, torch.Tensor | None, Any]:
        size = self.config.replay.memory_batch_size
        if memory_client is None or size == 0:
            return None, None, None
        memory = self.config.memory
        batch = await memory_client.get_replay_batch(
            size, prioritized=memory.prioritized, beta=memory.priority_beta
        )
        if batch is None or len(batch.ids) == 0 or not self._fits(batch.obs, "replay"):
            return None, None, None
        weights = torch.as_tensor(batch.weights, dtype=torch.float32, device=self.device)
        return _transitions_from_numpy(batch, self.device), weights, batch

    async def _similar_batches(self, memory_client: Any, local: Transitions) -> list[Transitions | None]:
        """Stored neighbours of each step's local states: past experience that bears on the present.

        ``local`` holds the batches of every gradient step ([G, B, ...]); the first
        ceil(similar_batch_size / k) states of each are the queries, all sent in one search
        request (one round trip per training call, not per step), and each step gets the
        ``similar_batch_size`` neighbours of its own queries. With ``replay.similar_embedding``
        'network' or ``replay.similar_prefer_success``, ``replay.similar_candidates`` times as
        many are fetched and :meth:`_choose_neighbours` keeps k per query.
        """
        steps = local.obs.shape[0]
        size = self.config.replay.similar_batch_size
        if memory_client is None or size == 0:
            return [None] * steps
        replay = self.config.replay
        k = min(size, 5)
        per_step = min(-(-size // k), local.obs.shape[1])
        query_rows = local.obs[:, :per_step].reshape(-1, self.input_size)
        choosing = replay.similar_embedding == "network" or replay.similar_prefer_success
        fetch = k * replay.similar_candidates if choosing else k
        found = await memory_client.search_similar(query_rows.cpu().numpy(), k=fetch)
        if found is None or len(found.batch.ids) == 0 or not self._fits(found.batch.obs, "similar"):
            return [None] * steps
        rows = _transitions_from_numpy(found.batch, self.device)
        query_index = np.asarray(found.query_index)
        if choosing and fetch > k:
            keep = self._choose_neighbours(query_rows, rows.obs, found, k)
            rows = Transitions(*(t[torch.as_tensor(keep, device=self.device)] for t in rows))
            query_index = query_index[keep]
        # Answers come in query order (k per query, fewer if the collection is tiny).
        counts = np.bincount(query_index // per_step, minlength=steps)
        starts = np.concatenate(([0], np.cumsum(counts)))
        batches: list[Transitions | None] = []
        for step in range(steps):
            first, stop = int(starts[step]), int(min(starts[step + 1], starts[step] + size))
            batches.append(Transitions(*(t[first:stop] for t in rows)) if stop > first else None)
        self.last_similar_count = max((b.obs.shape[0] for b in batches if b is not None), default=0)
        return batches

    def _choose_neighbours(
        self, queries: torch.Tensor, candidates: torch.Tensor, found: Any, k: int
    ) -> np.ndarray:
        """Which of the candidates (indices, in query order) to keep: k per query.

        Ranked by distance, in the penultimate layer of the current network when
        ``replay.similar_embedding`` is 'network' (query and candidates embedded now, by the same
        weights), else as the service measured it between states; with
        ``replay.similar_prefer_success``, by the candidate's episode return first (highest
        first, unknown last), distance breaking ties.
        """
        query_index = np.asarray(found.query_index)
        if self.config.replay.similar_embedding == "network":
            training = self.q_network.training
            self.q_network.eval()  # no dropout: the embedding of a state is one point
            try:
                with torch.inference_mode():
                    near = self.q_network.features(queries)
                    near = near[torch.as_tensor(query_index, device=self.device)]
                    far = self.q_network.features(candidates)
                    distance = torch.linalg.vector_norm(near - far, dim=1).cpu().numpy()
            finally:
                self.q_network.train(training)
        else:
            distance = np.asarray(found.distances)
        keys = [distance]
        returns = found.batch.episode_returns
        if self.config.replay.similar_prefer_success and returns is not None:
            keys.append(np.where(np.isnan(returns), np.inf, -returns))  # high returns first
        order = np.lexsort((*keys, query_index))  # the last key sorts first: queries stay in order
        sorted_queries = query_index[order]
        first = np.searchsorted(sorted_queries, sorted_queries, side="left")
        rank = np.arange(len(order)) - first
        return order[rank < k]

    async def learn_from_experiences(
        self,
        memory_client: Any = None,
        gamma: float | None = None,
        local_batch_size: int | None = None,
        gradient_steps: int = 1,
    ) -> dict[str, float] | None:
        """Run ``gradient_steps`` updates; returns averaged losses, or None if the buffer is too small.

        Local batches for all steps are sampled at once; memory batches come from the Memory
        service one per step (``memory_client=None`` means local replay only).
        """
        batch_size = local_batch_size or self.config.train.batch_size
        if len(self.buffer) < batch_size:
            return None
        gamma = self.config.train.gamma if gamma is None else float(gamma)
        local = self.buffer.sample(batch_size, num_batches=gradient_steps)
        records: list[torch.Tensor] = []
        memory_steps = similar_rows = 0
        if self._uses_dropout:
            self.q_network.train()
        try:
            similar_batches = await self._similar_batches(memory_client, local)
            for step in range(gradient_steps):
                batch = Transitions(*(t[step] for t in local))
                extra, weights, raw = await self._memory_batch(memory_client)
                similar = similar_batches[step]
                if similar is not None:
                    similar_rows += similar.obs.shape[0]
                    ones = torch.ones(similar.obs.shape[0], device=self.device)
                    if extra is None:
                        extra, weights = similar, ones
                    else:
                        extra = Transitions(*(torch.cat([a, b]) for a, b in zip(extra, similar)))
                        weights = torch.cat([weights, ones])
                memory_steps += extra is not None
                stats, extra_td = self._gradient_step(batch, extra, weights, gamma)
                records.extend(stats)
                if raw is not None and extra_td is not None and self.config.memory.prioritized:
                    # The memory rows come first in ``extra``; similar rows are not sampled by
                    # priority, so they send none back.
                    priorities = extra_td[: len(raw.ids)].abs().cpu().numpy() + 1e-6
                    await memory_client.update_priorities(raw.ids, priorities)
        finally:
            if self._uses_dropout:
                self.q_network.eval()
        means = torch.stack(records).view(gradient_steps, -1).mean(dim=0)
        total, local_loss, memory_loss, q_mean, grad_norm = means.tolist()
        if not np.isfinite(total):
            raise TrainingDivergedError(
                f"TD loss became {total} at update {self.training_steps}: lower the learning rate "
                "or enable gradient clipping"
            )
        return {
            "loss": total,
            "loss_local": local_loss,
            "loss_memory": memory_loss * gradient_steps / max(memory_steps, 1),
            "q_mean": q_mean,
            "grad_norm": grad_norm,
            "memory_batches": float(memory_steps),
            "similar_rows": similar_rows / gradient_steps,
        }

    # ------------------------------------------------------------------ state

    def state_dict(self, include_buffer: bool = True) -> dict[str, Any]:
        return {
            "architecture": self.architecture.to_dict(),
            "q_network": self.q_network.state_dict(),
            "target_network": self.target_network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "training_steps": self.training_steps,
            "rng": self.rng.bit_generator.state,
            "dropout_rng": self.q_network.dropout_rng_state(),
            "buffer": self.buffer.state_dict(include_data=include_buffer),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        arch = NetworkArchitecture.from_dict(state["architecture"])
        if arch != self.architecture:
            raise ValueError(f"checkpoint network {arch} does not match this agent's {self.architecture}")
        self.q_network.load_state_dict(state["q_network"])
        self.target_network.load_state_dict(state["target_network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.training_steps = int(state["training_steps"])
        self.rng.bit_generator.state = state["rng"]
        if state.get("dropout_rng") is not None:
            self.q_network.set_dropout_rng_state(state["dropout_rng"])
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
