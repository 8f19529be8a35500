"""The local replay buffer: a circular buffer of preallocated tensors on the agent's device.

Preallocation and index arithmetic keep the hot path free of per-transition Python objects:
storing N transitions is five slice copies, sampling G batches at once is one ``randint`` and five
gathers. On the CPU the storage is numpy arrays that the tensors view (``torch.from_numpy``), so
storing from the environment's numpy output is a plain array assignment; on a GPU the storage is
device tensors and a sampled batch never leaves the device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch


class Transitions(NamedTuple):
    """A batch of transitions as tensors (leading dims may be [B] or [G, B])."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    dones: torch.Tensor


class ExperienceBuffer:
    """Fixed-capacity circular buffer; the oldest transitions are overwritten first."""

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
