"""n-step returns: each environment copy's last n steps, turned into one transition.

A transition becomes (s_t, a_t, R, s_{t+k}, mask) with R = sum_{i<k} gamma^i r_{t+i}, k = n while
the episode runs. When an episode ends, every window still open is emitted with the steps it
has: a terminated episode bootstraps nothing; a truncated one (a time limit, or a curriculum
stage that replaced the environments) bootstraps from its last state with gamma^k, k < n.

How the discount reaches the learner: the learner takes one gamma per update, and an n-step run
calls it with gamma^n. Each row carries its own correction in the ``dones`` column, as a
*bootstrap mask* m with (1 - m) * gamma^n equal to the row's real bootstrap discount:

    m = 0                       a full window (k = n), episode still running
    m = 1                       the episode terminated inside the window (no bootstrap)
    m = 1 - gamma^(k - n)       a window cut short by truncation after k < n steps (m < 0)

so the learner's target ``r + gamma^n * (1 - m) * V(s')`` is exactly ``R + gamma^k * V(s_{t+k})``.
1-step rows (dones 0 or 1, as the Memory service stores them) learn correctly in the same update
once :func:`one_step_rows` rescales their mask to ``1 - (1 - done) * gamma^(1 - n)``.

With n = 1 none of this runs: rows go to the buffer as they come, and the learner gets gamma.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agent.replay import Transitions

Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(obs, actions, returns, next_obs, bootstrap masks): what a sink's ``add`` takes."""
Settings = tuple[int, float]
"""(n, gamma)"""


def bootstrap_mask(steps: np.ndarray, n: int, gamma: float, terminated: np.ndarray) -> np.ndarray:
    """The ``dones`` column of rows of ``steps`` (k) real steps under an update discounting by
    gamma^n: 1 where the episode terminated, else 1 - gamma^(k - n) (0 for a full window)."""
    steps = np.asarray(steps)
    if gamma == 0.0:  # gamma^k = 0 for every k >= 1: nothing bootstraps
        return np.ones(steps.shape, dtype=np.float32)
    mask = 1.0 - np.power(float(gamma), steps.astype(np.float64) - n)
    return np.where(np.asarray(terminated, dtype=bool), 1.0, mask).astype(np.float32)


def one_step_rows(rows: Transitions, gamma: float, n: int) -> Transitions:
    """1-step rows (dones 0 or 1: the Memory service's, similar-state neighbours, the spec's
    ``store_experience``) for an update that discounts by gamma^n: their bootstrap mask becomes
    1 - (1 - done) * gamma^(1 - n), so that the update bootstraps them with gamma, as it should."""
    if n == 1:
        return rows
    if gamma == 0.0:
        return rows._replace(dones=torch.ones_like(rows.dones))
    return rows._replace(dones=1.0 - (1.0 - rows.dones) * float(gamma) ** (1 - n))


def one_step_dones(dones: Any, gamma: float, n: int) -> np.ndarray | Any:
    """:func:`one_step_rows` for a numpy ``dones`` column (rows stored straight into the buffer)."""
    if n == 1:
        return dones
    done = np.asarray(dones, dtype=np.float32)
    if gamma == 0.0:
        return np.ones_like(done)
    return (1.0 - (1.0 - done.astype(np.float64)) * float(gamma) ** (1 - n)).astype(np.float32)


class NStepWindows:
    """The open n-step windows of ``num_rows`` environment rows (copies, or agents of copies).

    :meth:`push` takes one vector step's transitions and returns the n-step rows that step
    completed; between steps each row holds at most n - 1 steps, which are part of a run's state
    (:meth:`state_dict`): a resumed run emits them exactly as an uninterrupted one does.
    """

    def __init__(self, n: int, gamma: float, num_rows: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = int(n)
        self.gamma = float(gamma)
        self.num_rows = int(num_rows)
        self.count = np.zeros(num_rows, dtype=np.int64)
        self._obs: np.ndarray | None = None  # [rows, n, features], oldest step first
        self._actions = np.zeros((num_rows, n), dtype=np.int64)
        self._rewards = np.zeros((num_rows, n), dtype=np.float64)
        self._powers = np.power(self.gamma, np.arange(n, dtype=np.float64))

    @property
    def settings(self) -> Settings:
        return self.n, self.gamma

    @property
    def pending(self) -> int:
        """Steps held in open windows, over every row."""
        return int(self.count.sum())

    def push(
        self,
        rows: np.ndarray | None,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> Rows | None:
        """One step of environment ``rows`` (None: all, in order); the n-step rows it completed
        (grouped by environment row, oldest first), or None."""
        index = np.arange(self.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        obs = np.asarray(obs, dtype=np.float32).reshape(len(index), -1)
        next_obs = np.asarray(next_obs, dtype=np.float32).reshape(len(index), -1)
        if self._obs is None:
            self._obs = np.zeros((self.num_rows, self.n, obs.shape[1]), dtype=np.float32)
        slot = self.count[index]
        self._obs[index, slot] = obs
        self._actions[index, slot] = np.asarray(actions).reshape(-1)
        self._rewards[index, slot] = np.asarray(rewards, dtype=np.float64).reshape(-1)
        self.count[index] += 1
        terminated = np.asarray(terminated, dtype=bool).reshape(-1)
        ended = terminated | np.asarray(truncated, dtype=bool).reshape(-1)
        parts: list[Rows] = []
        for i in np.flatnonzero(ended | (self.count[index] == self.n)):
            row = int(index[i])
            if ended[i]:
                parts.append(self._close(row, next_obs[i], bool(terminated[i])))
            else:
                parts.append(self._emit_oldest(row, next_obs[i]))
        if not parts:
            return None
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def _emit_oldest(self, row: int, next_obs: np.ndarray) -> Rows:
        """The full window of ``row`` (n steps, episode running): emitted, then slid by one."""
        assert self._obs is not None
        out: Rows = (
            self._obs[row, :1].copy(),
            self._actions[row, :1].copy(),
            np.array([self._rewards[row] @ self._powers], dtype=np.float32),
            next_obs[None].copy(),
            np.zeros(1, dtype=np.float32),
        )
        self._obs[row, :-1] = self._obs[row, 1:]
        self._actions[row, :-1] = self._actions[row, 1:]
        self._rewards[row, :-1] = self._rewards[row, 1:]
        self.count[row] -= 1
        return out

    def _close(
        self, row: int, next_obs: np.ndarray, terminated: bool, settings: Settings | None = None
    ) -> Rows:
        """Every open window of ``row`` (its episode ended), each with the steps it has; under
        ``settings`` (n, gamma) rather than this object's, if given."""
        assert self._obs is not None
        n, gamma = settings or self.settings
        powers = self._powers if settings is None else np.power(gamma, np.arange(self.n, dtype=float))
        k = int(self.count[row])
        rewards = self._rewards[row, :k]
        returns = np.array([rewards[i:] @ powers[: k - i] for i in range(k)], dtype=np.float32)
        steps = k - np.arange(k)
        out: Rows = (
            self._obs[row, :k].copy(),
            self._actions[row, :k].copy(),
            returns,
            np.repeat(next_obs[None], k, axis=0),
            bootstrap_mask(steps, n, gamma, np.full(k, terminated)),
        )
        self.count[row] = 0
        return out

    def close_all(self, next_obs: np.ndarray, settings: Settings | None = None) -> Rows | None:
        """Emit every open window as truncated, bootstrapping from ``next_obs`` (one per row: the
        state each row's episode was cut at), and start empty. ``settings`` (n, gamma): the
        returns and masks of the update that will learn from them, if it is not this one's."""
        parts = [
            self._close(row, np.asarray(next_obs[row], dtype=np.float32).ravel(), False, settings)
            for row in np.flatnonzero(self.count)
        ]
        if not parts:
            return None
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]

    def clear(self) -> None:
        self.count[:] = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (a checkpoint loads with ``weights_only=True``)."""
        return {
            "n": self.n,
            "count": torch.from_numpy(self.count.copy()),
            "obs": None if self._obs is None else torch.from_numpy(self._obs.copy()),
            "actions": torch.from_numpy(self._actions.copy()),
            "rewards": torch.from_numpy(self._rewards.copy()),
        }

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`; ValueError if it is another n's or another row count's."""
        count = state["count"].numpy()
        if int(state["n"]) != self.n or count.shape != (self.num_rows,):
            raise ValueError(
                f"n-step windows of n={state['n']} over {count.shape[0]} rows saved, "
                f"n={self.n} over {self.num_rows} rows configured"
            )
        if count.min(initial=0) < 0 or count.max(initial=0) >= self.n:
            raise ValueError(f"n-step window counts must be in [0, {self.n}), got {count.tolist()}")
        obs = state["obs"]
        if obs is None and count.any():
            raise ValueError("n-step windows hold steps but no observations")
        if obs is not None and (obs.dim() != 3 or tuple(obs.shape[:2]) != (self.num_rows, self.n)):
            raise ValueError(
                f"n-step window states of shape {tuple(obs.shape)}, "
                f"expected ({self.num_rows}, {self.n}, features)"
            )
        self.count = count.astype(np.int64).copy()
        self._obs = None if obs is None else obs.numpy().astype(np.float32).copy()
        shape = (self.num_rows, self.n)
        self._actions = state["actions"].numpy().astype(np.int64).reshape(shape).copy()
        self._rewards = state["rewards"].numpy().astype(np.float64).reshape(shape).copy()
