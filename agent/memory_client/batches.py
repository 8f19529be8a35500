"""What the Memory client hands the learner: transitions as numpy arrays, never wire bytes.

Kept apart from the I/O so that code which only consumes batches (the agent, tests, fakes of the
client) can import these types without pulling in httpx or the threads. ``as_numpy`` and
``batch_from`` are the two conversions the read and write paths share.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

# The arrays of a replay batch on the wire, in ReplayBatch order (a search answer has all but
# ``weights``).
BATCH_FIELDS: tuple[str, ...] = (
    "ids",
    "obs",
    "actions",
    "rewards",
    "next_obs",
    "dones",
    "weights",
)


class ReplayBatch(NamedTuple):
    """Transitions as numpy arrays, ready for ``torch.as_tensor``."""

    ids: np.ndarray  # int64 [B]
    obs: np.ndarray  # float32 [B, D]
    actions: np.ndarray  # int64 [B]
    rewards: np.ndarray  # float32 [B]
    next_obs: np.ndarray  # float32 [B, D]
    dones: np.ndarray  # float32 [B] (1.0 = terminated)
    weights: np.ndarray  # float32 [B] importance weights (all 1.0 for uniform sampling)
    # float32 [B]: the return of each row's episode, as its writer stored it (NaN: unknown);
    # None from a service that does not keep it.
    episode_returns: np.ndarray | None = None


class SimilarExperiences(NamedTuple):
    """The k nearest stored transitions per query, flattened to Q*k rows."""

    batch: ReplayBatch
    distances: np.ndarray  # float32 [Q*k], Euclidean
    query_index: np.ndarray  # int64 [Q*k], which query each row answers


class Experience(NamedTuple):
    """One stored transition a similarity search found, and how far its state lies from the query."""

    state: np.ndarray  # float32 [D]
    action: int
    reward: float
    next_state: np.ndarray  # float32 [D]
    done: bool  # the episode terminated (not merely truncated) after this step
    distance: float  # Euclidean, between the query and ``state``
    id: int  # the row's id in the collection
    query: int  # which query it answers (always 0 for one state)


class NearestExperiences(tuple[Experience, ...]):
    """The spec's ``similar_experiences``: the k nearest stored experiences, nearest first.

    A sequence of :class:`Experience` (``len(similar) == k`` once the collection holds k rows,
    ``similar[0].state``, ...), as the spec's ``get_similar_experiences`` is read. It keeps the
    columnar arrays of :class:`SimilarExperiences` too (``batch``, ``distances``,
    ``query_index``), for code that feeds them to torch in one piece.
    """

    batch: ReplayBatch
    distances: np.ndarray
    query_index: np.ndarray

    def __new__(cls, found: SimilarExperiences) -> NearestExperiences:
        batch = found.batch
        rows = (
            Experience(
                state=batch.obs[i],
                action=int(batch.actions[i]),
                reward=float(batch.rewards[i]),
                next_state=batch.next_obs[i],
                done=bool(batch.dones[i]),
                distance=float(found.distances[i]),
                id=int(batch.ids[i]),
                query=int(found.query_index[i]),
            )
            for i in range(len(batch.ids))
        )
        self = super().__new__(cls, rows)
        self.batch, self.distances, self.query_index = found
        return self


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array from numpy, lists or a torch tensor (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def batch_from(arrays: dict[str, np.ndarray]) -> ReplayBatch:
    """A :class:`ReplayBatch` from decoded wire arrays; weights default to 1 (uniform)."""
    weights = arrays.get("weights")
    if weights is None:
        weights = np.ones(len(arrays["ids"]), dtype=np.float32)
    return ReplayBatch(
        ids=arrays["ids"],
        obs=arrays["obs"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        next_obs=arrays["next_obs"],
        dones=arrays["dones"],
        weights=weights,
        episode_returns=arrays.get("episode_returns"),
    )
