"""Transitions as numpy arrays, and the boundary rules that every stored batch must pass.

Both body formats (JSON lists and binary arrays) become a mapping of named arrays and go through
:func:`validate_batch`, so the rules live in one place: exact shapes, allowed dtypes, finite
values, done flags in {0, 1}. Anything else raises :class:`InvalidInput` before the store is
touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from memory.errors import InvalidInput

FIELDS = ("obs", "actions", "rewards", "next_obs", "dones")
OPTIONAL_FIELDS = ("episode_returns", "priorities")


@dataclass(frozen=True, slots=True)
class Transitions:
    """A batch of transitions in storage dtypes (float32 / int64), one row per transition."""

    obs: np.ndarray  # float32 [B, D]
    actions: np.ndarray  # int64 [B]
    rewards: np.ndarray  # float32 [B]
    next_obs: np.ndarray  # float32 [B, D]
    dones: np.ndarray  # float32 [B], 1.0 = terminated
    embeddings: np.ndarray | None = None  # float32 [B, E] when the collection searches embeddings
    # float32 [B]: the return of the episode each row belongs to (NaN: unknown, the default), so
    # that a search can prefer neighbours from successful episodes. Writers that know it hold an
    # episode's rows until it ends (agent: replay.tag_episode_returns).
    episode_returns: np.ndarray | None = None
    # float32 [B]: initial sampling priorities (an Ape-X actor's |TD error| for its own rows); NaN
    # or omitted: the collection's running maximum, as for any new row. Kept in RAM only.
    priorities: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.actions)

    def tail(self, start: int) -> Transitions:
        """Rows from ``start`` on (the rest would be evicted at once by a small capacity)."""
        return Transitions(
            self.obs[start:],
            self.actions[start:],
            self.rewards[start:],
            self.next_obs[start:],
            self.dones[start:],
            None if self.embeddings is None else self.embeddings[start:],
            None if self.episode_returns is None else self.episode_returns[start:],
            None if self.priorities is None else self.priorities[start:],
        )

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name) for name in FIELDS}
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings
        if self.episode_returns is not None:
            out["episode_returns"] = self.episode_returns
        if self.priorities is not None:
            out["priorities"] = self.priorities
        return out


def _shape(array: np.ndarray) -> str:
    return "[" + ", ".join(str(n) for n in array.shape) + "]"


def float_matrix(name: str, value: np.ndarray, rows: int | None, cols: int) -> np.ndarray:
    """A finite float32 [rows, cols] matrix (``rows=None`` accepts any row count)."""
    if value.dtype.kind != "f":
        raise InvalidInput(f"{name}: dtype must be a float type, got {value.dtype}")
    expected = f"[{'B' if rows is None else rows}, {cols}]"
    if value.ndim != 2 or value.shape[1] != cols or (rows is not None and value.shape[0] != rows):
        raise InvalidInput(f"{name}: expected shape {expected}, got {_shape(value)}")
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused just below
        out = value.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidInput(f"{name}: contains NaN or infinity (or values beyond float32 range)")
    return out


def _vector(name: str, value: np.ndarray, rows: int) -> np.ndarray:
    if value.ndim != 1 or value.shape[0] != rows:
        raise InvalidInput(f"{name}: expected shape [{rows}], got {_shape(value)}")
    return value


def validate_batch(
    arrays: Mapping[str, np.ndarray], *, dim: int, embedding_dim: int | None, max_rows: int
) -> Transitions:
    """Storage-ready transitions from untrusted arrays, or :class:`InvalidInput` saying why not."""
    expected = set(FIELDS) | ({"embeddings"} if embedding_dim else set())
    missing = [name for name in (*FIELDS, "embeddings") if name in expected and name not in arrays]
    if missing:
        raise InvalidInput(f"missing arrays: {', '.join(missing)}")
    if unexpected := sorted(set(arrays) - expected - set(OPTIONAL_FIELDS)):
        raise InvalidInput(f"unexpected arrays: {', '.join(unexpected)}")
    actions = arrays["actions"]
    if actions.ndim != 1:
        raise InvalidInput(f"actions: expected shape [B], got {_shape(actions)}")
    rows = actions.shape[0]
    if not 1 <= rows <= max_rows:
        raise InvalidInput(f"a batch holds 1 to {max_rows} transitions, got {rows}")
    if actions.dtype.kind not in "iu":
        raise InvalidInput(f"actions: dtype must be an integer type, got {actions.dtype}")
    if actions.dtype == np.uint64 and (actions > np.iinfo(np.int64).max).any():
        raise InvalidInput("actions: values beyond the int64 range")
    rewards = _vector("rewards", arrays["rewards"], rows)
    if rewards.dtype.kind != "f":
        raise InvalidInput(f"rewards: dtype must be a float type, got {rewards.dtype}")
    with np.errstate(over="ignore"):
        rewards = rewards.astype(np.float32)
    if not np.isfinite(rewards).all():
        raise InvalidInput("rewards: contains NaN or infinity (or values beyond float32 range)")
    dones = _vector("dones", arrays["dones"], rows)
    if dones.dtype.kind not in "biuf":
        raise InvalidInput(f"dones: dtype must be bool, integer or float, got {dones.dtype}")
    dones = dones.astype(np.float32)
    if not np.isin(dones, (0.0, 1.0)).all():
        raise InvalidInput("dones: every value must be 0 or 1 (false or true)")
    embeddings = None
    if embedding_dim:
        embeddings = float_matrix("embeddings", arrays["embeddings"], rows, embedding_dim)
    episode_returns = None
    if "episode_returns" in arrays:
        episode_returns = _vector("episode_returns", arrays["episode_returns"], rows)
        if episode_returns.dtype.kind != "f":
            raise InvalidInput(
                f"episode_returns: dtype must be a float type, got {episode_returns.dtype}"
            )
        with np.errstate(over="ignore"):
            episode_returns = episode_returns.astype(np.float32)
        if np.isinf(episode_returns).any():
            raise InvalidInput(
                "episode_returns: contains infinity (or values beyond float32 range); "
                "NaN means unknown"
            )
    priorities = None
    if "priorities" in arrays:
        priorities = _vector("priorities", arrays["priorities"], rows)
        if priorities.dtype.kind != "f":
            raise InvalidInput(f"priorities: dtype must be a float type, got {priorities.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            priorities = priorities.astype(np.float32)
            if np.isinf(priorities).any() or (priorities < 0).any():
                raise InvalidInput(
                    "priorities: every value must be finite and >= 0 (NaN: the collection's default)"
                )
    return Transitions(
        obs=float_matrix("obs", arrays["obs"], rows, dim),
        actions=actions.astype(np.int64),
        rewards=rewards,
        next_obs=float_matrix("next_obs", arrays["next_obs"], rows, dim),
        dones=dones,
        embeddings=embeddings,
        episode_returns=episode_returns,
        priorities=priorities,
    )
