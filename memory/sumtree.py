"""A sum tree over slot priorities: proportional sampling and updates in O(log n), batched in numpy.

Prioritized replay (Schaul et al. 2016) samples slot i with probability p_i / sum(p). A flat
cumulative sum would cost O(n) per batch at a million slots; the tree keeps every partial sum, so
a batch of B draws walks B paths of depth log2(n) at once.

Leaves must be finite and >= 0 (the service bounds priorities before they get here), so that
every partial sum, and the total, stays finite.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """Priorities of ``size`` slots; slots never set have priority 0 and are never drawn."""

    def __init__(self, size: int) -> None:
        self._leaves = 1
        while self._leaves < max(size, 1):
            self._leaves *= 2
        self.size = size
        # Node 1 is the root; node i has children 2i and 2i+1; leaves start at self._leaves.
        self._tree = np.zeros(2 * self._leaves, dtype=np.float64)

    @property
    def nbytes(self) -> int:
        return self._tree.nbytes

    @property
    def total(self) -> float:
        return float(self._tree[1])

    def grow(self, size: int) -> None:
        """Keep every priority while making room for ``size`` slots (the ring grew)."""
        if size <= self.size:
            return
        values = self.get(np.arange(self.size))
        self.__init__(size)  # type: ignore[misc]
        self._set_range(0, values)

    def get(self, slots: np.ndarray) -> np.ndarray:
        return self._tree[self._leaves + np.asarray(slots, dtype=np.int64)]

    def set(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Set leaf values (the last wins for a repeated slot), then recompute their ancestors."""
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) == 0:
            return
        values = self._checked(values)
        if slots[-1] - slots[0] == len(slots) - 1 and (
            len(slots) == 1 or (np.diff(slots) == 1).all()
        ):
            self._set_range(int(slots[0]), values)
            return
        nodes = self._leaves + slots
        self._tree[nodes] = values
        nodes = np.sort(nodes)
        while nodes[-1] > 1:
            # Sorted, so halving keeps them sorted and duplicates adjacent: cheaper than np.unique.
            nodes = nodes // 2
            nodes = nodes[np.concatenate(([True], nodes[1:] != nodes[:-1]))]
            self._tree[nodes] = self._tree[2 * nodes] + self._tree[2 * nodes + 1]

    @staticmethod
    def _checked(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise ValueError("sum-tree leaves must be finite and >= 0")
        return values

    def _set_range(self, start: int, values: np.ndarray) -> None:
        """Contiguous leaves (a stored batch): each level of ancestors is one slice."""
        low = self._leaves + start
        high = low + len(values)
        self._tree[low:high] = values
        while low > 1:
            low, high = low // 2, (high - 1) // 2 + 1
            self._tree[low:high] = (
                self._tree[2 * low : 2 * high : 2] + self._tree[2 * low + 1 : 2 * high : 2]
            )

    def prefix(self, slots: np.ndarray) -> np.ndarray:
        """Sum of the priorities of the slots below each of ``slots``, in O(log n)."""
        slots = np.asarray(slots, dtype=np.int64)
        full = slots >= self._leaves
        nodes = self._leaves + np.minimum(slots, self._leaves - 1)
        sums = np.zeros(len(nodes), dtype=np.float64)
        width = self._leaves
        while width > 1:  # leaf to root; every leaf is at the same depth
            # A right child's left sibling holds the sum of the leaves just before its subtree.
            sums += np.where(nodes & 1 == 1, self._tree[nodes - 1], 0.0)
            nodes = nodes // 2
            width //= 2
        return np.where(full, self.total, sums)

    def find(self, targets: np.ndarray, used: int) -> np.ndarray:
        """Slots whose cumulative-priority interval holds each target in [0, total).

        ``used`` is the number of slots holding data: rounding in the partial sums can walk one
        leaf too far at the right edge, onto an empty slot, and is stepped back onto data.
        """
        targets = np.minimum(np.asarray(targets, dtype=np.float64), np.nextafter(self.total, 0.0))
        nodes = np.ones(len(targets), dtype=np.int64)
        width = self._leaves
        while width > 1:
            left = 2 * nodes
            left_sum = self._tree[left]
            right = targets >= left_sum
            targets = np.where(right, targets - left_sum, targets)
            nodes = left + right
            width //= 2
        return np.minimum(nodes - self._leaves, used - 1)
