"""The local replay buffer: a circular buffer of preallocated tensors on the agent's device.

Preallocation and index arithmetic keep the hot path free of per-transition Python objects:
storing N transitions is five slice copies, sampling G batches at once is one ``randint`` and five
gathers. On the CPU the storage is numpy arrays that the tensors view (``torch.from_numpy``), so
storing from the environment's numpy output is a plain array assignment; on a GPU the storage is
device tensors and a sampled batch never leaves the device.

:class:`PrioritizedBuffer` is the same ring sampled in proportion to priority (Schaul et al.
2016, proportional variant) over a sum tree (:class:`memory.sumtree.SumTree`, the Memory
service's): new rows get the highest priority seen so far, TD errors come back as new
priorities, and importance weights correct the bias by an exponent beta that rises to 1 over the
run. Its sampler draws from the buffer's own generator, so a checkpoint resumes it exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from memory.sumtree import SumTree


class Transitions(NamedTuple):
    """A batch of transitions as tensors (leading dims may be [B] or [G, B])."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    dones: torch.Tensor


class WeightedSample(NamedTuple):
    """A prioritized draw: the rows, their importance weights and the slots they came from."""

    transitions: Transitions
    weights: torch.Tensor
    """(N * P(i))^-beta over each batch's largest, float32, shaped like the batch ([B] or [G, B])"""
    slots: np.ndarray
    """the rows' slots in the buffer (what :meth:`PrioritizedBuffer.update_priorities` takes)"""


class ExperienceBuffer:
    """Fixed-capacity circular buffer; the oldest transitions are overwritten first."""

    n_step_rows = True
    """The Collector writes its n-step rows here (``replay.n_step``; 1-step sinks, such as the
    Memory service's, leave this unset)."""

    def __init__(
        self,
        capacity: int = 1000,
        obs_dim: int | None = None,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.obs_dim = obs_dim
        self.position = 0
        self.size = 0
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(0 if seed is None else int(seed))
        self._storage: Transitions | None = None
        self._arrays: Transitions | None = None
        if obs_dim is not None:
            self._allocate(obs_dim)

    def _allocate(self, obs_dim: int) -> None:
        c = self.capacity
        self.obs_dim = obs_dim
        shapes = [(c, obs_dim), (c,), (c,), (c, obs_dim), (c,)]
        dtypes = [np.float32, np.int64, np.float32, np.float32, np.float32]
        if self.device.type == "cpu":
            self._arrays = Transitions(*(np.zeros(sh, dt) for sh, dt in zip(shapes, dtypes)))
            self._storage = Transitions(*(torch.from_numpy(a) for a in self._arrays))
        else:
            self._arrays = None
            self._storage = Transitions(
                *(torch.zeros(sh, dtype=torch.from_numpy(np.zeros(0, dt)).dtype, device=self.device)
                  for sh, dt in zip(shapes, dtypes))
            )

    def __len__(self) -> int:
        return self.size

    def add(self, obs: Any, actions: Any, rewards: Any, next_obs: Any, dones: Any) -> None:
        """Store one transition or a batch of them (leading dimension = batch)."""
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim == 1:
            obs = obs[None]
        n = obs.shape[0]
        if self._storage is None:
            self._allocate(obs.shape[1])
        if obs.shape[1] != self.obs_dim:
            raise ValueError(f"observation has {obs.shape[1]} features, buffer holds {self.obs_dim}")
        rows = [
            obs,
            np.asarray(actions).reshape(n),
            np.asarray(rewards).reshape(n),
            np.asarray(next_obs, dtype=np.float32).reshape(n, self.obs_dim),
            np.asarray(dones).reshape(n),
        ]
        if n >= self.capacity:  # only the newest `capacity` rows survive
            rows = [r[n - self.capacity :] for r in rows]
            n = self.capacity
        start = self.position
        first = min(n, self.capacity - self.position)
        targets = self._arrays if self._arrays is not None else self._storage
        for store, new in zip(targets, rows):
            if self._arrays is None:
                new = torch.as_tensor(new, dtype=store.dtype, device=self.device)
            store[self.position : self.position + first] = new[:first]
            if first < n:
                store[: n - first] = new[first:]
        self.position = (self.position + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._stored(start, n)

    def _stored(self, start: int, n: int) -> None:
        """``n`` rows were just written from slot ``start`` on (wrapping round the end)."""

    def sample(self, batch_size: int, num_batches: int | None = None) -> Transitions:
        """Uniform sample with replacement: [B, ...], or [G, B, ...] when ``num_batches`` is set."""
        if self.size == 0 or self._storage is None:
            raise ValueError("cannot sample from an empty buffer")
        shape = (batch_size,) if num_batches is None else (num_batches, batch_size)
        index = torch.randint(0, self.size, shape, device=self.device, generator=self._generator)
        return Transitions(*(t[index] for t in self._storage))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self, include_data: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {
            "capacity": self.capacity,
            "obs_dim": self.obs_dim,
            "position": self.position,
            "size": self.size,
            "generator": self._generator.get_state(),
        }
        if include_data and self._storage is not None:
            state["data"] = {name: t[: self.size].clone().cpu() for name, t in self._storage._asdict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer capacity {state['capacity']} in checkpoint, {self.capacity} configured")
        self._generator.set_state(state["generator"])
        data = state.get("data")
        if data is None:  # saved without data: start empty, keep the sampler's RNG
            self.position = self.size = 0
            return
        self._allocate(int(state["obs_dim"]))
        size = int(state["size"])
        assert self._storage is not None
        for name, store in self._storage._asdict().items():
            store[:size] = data[name].to(self.device)
        self.size = size
        self.position = int(state["position"])


class PrioritizedBuffer(ExperienceBuffer):
    """The circular buffer, sampled in proportion to priority (``replay.prioritized``).

    Row i is drawn with probability p_i^alpha / sum_j p_j^alpha, where p_i = |TD error| + eps from
    its latest update, or the highest priority so far for a row not yet learned from. Draws are
    stratified within each batch, as the Memory service's are. Each row's importance weight is
    (N * P(i))^-beta over its batch's largest; beta rises linearly from ``beta_start`` to 1 over
    ``beta_horizon`` stored rows (None: stays at ``beta_start``).
    """

    def __init__(
        self,
        capacity: int = 1000,
        obs_dim: int | None = None,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        *,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        beta_horizon: int | None = None,
    ) -> None:
        super().__init__(capacity, obs_dim, device, seed)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.alpha = float(alpha)
        self.beta_start = float(beta)
        self.eps = float(eps)
        self.beta_horizon = beta_horizon
        self.added = 0
        """rows stored so far, overwritten ones included: the beta schedule's clock"""
        self.max_priority = 1.0
        self._priorities = np.zeros(self.capacity, dtype=np.float64)  # p_i, before the alpha power
        self._tree = SumTree(self.capacity)  # p_i^alpha

    def configure(self, alpha: float, beta: float, eps: float) -> None:
        """Adopt new settings during a run; stored priorities are kept (re-powered if alpha moved)."""
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if float(alpha) != self.alpha:
            self.alpha = float(alpha)
            self._tree.set(np.arange(self.size), self._priorities[: self.size] ** self.alpha)
        self.beta_start, self.eps = float(beta), float(eps)

    @property
    def beta(self) -> float:
        """The importance-weight exponent now."""
        if not self.beta_horizon:
            return self.beta_start
        progress = min(1.0, self.added / self.beta_horizon)
        return self.beta_start + (1.0 - self.beta_start) * progress

    def _stored(self, start: int, n: int) -> None:
        slots = (start + np.arange(n)) % self.capacity
        self._priorities[slots] = self.max_priority
        self._tree.set(slots, np.full(n, self.max_priority**self.alpha))
        self.added += n

    def sample(self, batch_size: int, num_batches: int | None = None) -> Transitions:
        """A prioritized draw's rows (see :meth:`sample_weighted` for their weights)."""
        return self.sample_weighted(batch_size, num_batches).transitions

    def sample_weighted(self, batch_size: int, num_batches: int | None = None) -> WeightedSample:
        """``num_batches`` batches (or one, [B]) drawn by priority, with replacement."""
        if self.size == 0 or self._storage is None:
            raise ValueError("cannot sample from an empty buffer")
        batches = 1 if num_batches is None else num_batches
        shape = (batch_size,) if num_batches is None else (num_batches, batch_size)
        uniforms = torch.rand(
            batches * batch_size, generator=self._generator, device=self.device, dtype=torch.float64
        ).cpu().numpy()
        total = self._tree.total
        strata = np.tile(np.arange(batch_size), batches)
        slots = self._tree.find((strata + uniforms) * (total / batch_size), used=self.size)
        probabilities = self._tree.get(slots) / total
        raw = (self.size * probabilities).reshape(batches, batch_size) ** -self.beta
        weights = (raw / raw.max(axis=1, keepdims=True)).astype(np.float32).reshape(shape)
        index = torch.as_tensor(slots.reshape(shape), device=self.device)
        return WeightedSample(
            Transitions(*(t[index] for t in self._storage)),
            torch.as_tensor(weights, device=self.device),
            slots.reshape(shape),
        )

    def update_priorities(self, slots: np.ndarray, td_errors: np.ndarray | torch.Tensor) -> None:
        """New priorities |TD error| + eps for rows drawn before (the last wins for a repeated slot)."""
        if isinstance(td_errors, torch.Tensor):
            td_errors = td_errors.detach().cpu().numpy()
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        priorities = np.abs(np.asarray(td_errors, dtype=np.float64).reshape(-1)) + self.eps
        if len(slots) != len(priorities):
            raise ValueError(f"{len(slots)} slots, {len(priorities)} TD errors")
        if not np.isfinite(priorities).all():
            raise ValueError("TD errors must be finite")
        if len(slots) == 0:
            return
        if slots.min() < 0 or slots.max() >= self.size:
            raise ValueError(f"slots must be in [0, {self.size})")
        self._priorities[slots] = priorities
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self._tree.set(slots, priorities**self.alpha)

    def priorities(self) -> np.ndarray:
        """The stored rows' priorities p_i (before the alpha power), by slot."""
        return self._priorities[: self.size].copy()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self, include_data: bool = True) -> dict[str, Any]:
        state = super().state_dict(include_data)
        state["prioritized"] = {
            "added": self.added,
            "beta_horizon": self.beta_horizon,
            "max_priority": self.max_priority,
            "priorities": torch.from_numpy(self._priorities[: self.size].copy())
            if include_data and "data" in state
            else None,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a uniform buffer's state loads too (every row at the top
        priority, the schedule from the start)."""
        super().load_state_dict(state)
        saved = state.get("prioritized")
        priorities = None
        if saved is not None:
            self.added = int(saved["added"])
            self.beta_horizon = None if saved["beta_horizon"] is None else int(saved["beta_horizon"])
            self.max_priority = float(saved["max_priority"])
            if not (np.isfinite(self.max_priority) and self.max_priority > 0):
                raise ValueError(f"max_priority must be finite and > 0, got {self.max_priority}")
            priorities = saved.get("priorities")
        self._priorities = np.zeros(self.capacity, dtype=np.float64)
        self._tree = SumTree(self.capacity)
        if priorities is None or state.get("data") is None:
            values = np.full(self.size, self.max_priority)
        else:
            values = priorities.numpy().astype(np.float64).reshape(-1)
            if values.shape != (self.size,) or not (np.isfinite(values).all() and (values > 0).all()):
                raise ValueError(f"priorities must be {self.size} finite values > 0")
        self._priorities[: self.size] = values
        self._tree.set(np.arange(self.size), values**self.alpha)
