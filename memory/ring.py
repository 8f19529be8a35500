"""The in-memory copy of one collection: a FIFO ring of numpy arrays that sampling reads from.

Ids increase by one per stored transition and are never reused, so the slot of id i is
``(i - base) % capacity`` and an id is live iff it is among the last ``size`` issued. Arrays start
small and double until they reach the capacity, so an empty collection with a capacity of ten
million costs almost nothing; they never wrap before reaching it.
"""

from __future__ import annotations

import numpy as np

from memory.transitions import Transitions

_INITIAL_ROWS = 64


class Ring:
    """The newest ``capacity`` transitions of a collection; the oldest are overwritten first."""

    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    ids: np.ndarray
    episode_returns: np.ndarray  # NaN where unknown
    embeddings: np.ndarray | None

    def __init__(
        self, capacity: int, dim: int, embedding_dim: int | None, first_id: int = 0
    ) -> None:
        self.capacity = capacity
        self.dim = dim
        self.embedding_dim = embedding_dim
        self.base = first_id
        self.next_id = first_id
        self.size = 0
        self._allocate(min(capacity, _INITIAL_ROWS))

    @property
    def oldest_id(self) -> int:
        return self.next_id - self.size

    @property
    def allocated(self) -> int:
        return len(self.actions)

    @staticmethod
    def layout(dim: int, embedding_dim: int | None) -> dict[str, tuple[tuple[int, ...], type]]:
        """Each array's shape after the row axis, and its dtype."""
        layout: dict[str, tuple[tuple[int, ...], type]] = {
            "obs": ((dim,), np.float32),
            "next_obs": ((dim,), np.float32),
            "actions": ((), np.int64),
            "rewards": ((), np.float32),
            "dones": ((), np.float32),
            "ids": ((), np.int64),
            "episode_returns": ((), np.float32),
        }
        if embedding_dim:
            layout["embeddings"] = ((embedding_dim,), np.float32)
        return layout

    @staticmethod
    def row_bytes(dim: int, embedding_dim: int | None) -> int:
        """Bytes one row takes in the ring's arrays."""
        return sum(
            int(np.prod(tail, dtype=np.int64)) * np.dtype(dtype).itemsize
            for tail, dtype in Ring.layout(dim, embedding_dim).values()
        )

    def _allocate(self, rows: int) -> None:
        """(Re)allocate every array with ``rows`` rows, keeping the stored ones."""
        layout = self.layout(self.dim, self.embedding_dim)
        if not self.embedding_dim:
            self.embeddings = None
        for name, (tail, dtype) in layout.items():
            new: np.ndarray = np.zeros((rows, *tail), dtype=dtype)
            old = getattr(self, name, None)
            if old is not None:
                new[: self.size] = old[: self.size]
            setattr(self, name, new)

    def append(self, batch: Transitions) -> tuple[int, np.ndarray]:
        """Store a batch; returns its first id and the slots written (in id order)."""
        first_id = self.next_id
        rows = batch.rows
        keep = min(rows, self.capacity)
        if keep < rows:
            batch = batch.tail(rows - keep)
        if self.size + keep > self.allocated and self.allocated < self.capacity:
            target = self.allocated
            while target < self.size + keep:
                target *= 2
            self._allocate(min(target, self.capacity))
        ids = np.arange(first_id + rows - keep, first_id + rows, dtype=np.int64)
        slots = (ids - self.base) % self.capacity
        # At most two contiguous runs (before and after the wrap): slices beat fancy indexing.
        start = int(slots[0])
        split = min(keep, self.capacity - start)
        for src, dst in (
            (slice(0, split), slice(start, start + split)),
            (slice(split, keep), slice(0, keep - split)),
        ):
            if src.start == src.stop:
                continue
            self.obs[dst] = batch.obs[src]
            self.next_obs[dst] = batch.next_obs[src]
            self.actions[dst] = batch.actions[src]
            self.rewards[dst] = batch.rewards[src]
            self.dones[dst] = batch.dones[src]
            self.ids[dst] = ids[src]
            self.episode_returns[dst] = (
                np.nan if batch.episode_returns is None else batch.episode_returns[src]
            )
            if self.embeddings is not None and batch.embeddings is not None:
                self.embeddings[dst] = batch.embeddings[src]
        self.next_id = first_id + rows
        self.size = min(self.size + rows, self.capacity)
        return first_id, slots

    def live(self, ids: np.ndarray) -> np.ndarray:
        """Which ids are still stored (not evicted, already issued)."""
        return (ids >= self.oldest_id) & (ids < self.next_id)

    def slots(self, ids: np.ndarray) -> np.ndarray:
        return (ids - self.base) % self.capacity

    def vectors(self) -> np.ndarray:
        """What similarity search compares: embeddings if the collection has them, else obs."""
        source = self.embeddings if self.embeddings is not None else self.obs
        return source[: self.size]

    def gather(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        # np.take is several times faster than fancy indexing for row gathers.
        return {
            "ids": self.ids.take(slots),
            "obs": self.obs.take(slots, axis=0),
            "actions": self.actions.take(slots),
            "rewards": self.rewards.take(slots),
            "next_obs": self.next_obs.take(slots, axis=0),
            "dones": self.dones.take(slots),
            "episode_returns": self.episode_returns.take(slots),
        }
