"""Where replayed experience comes from: one protocol, several sources.

A source hands out batches of tensors on the learner's device and takes TD errors back as
priorities (the local ring's too, when it is a prioritized buffer: ``replay.prioritized``).
The learner never knows which source fed it, so the same update runs on the local
ring, on the Memory service, on the spec's mix of both (a local batch and a memory batch per
update, their losses reported apart), and, for knowledge transfer, on the stored neighbours of
the states being learned from.

Sources are synchronous: the Memory-service client does its network I/O on its own threads and
prefetches, so asking it for a batch usually returns one that is already here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from agent.config import MemoryConfig, ReplayConfig
from agent.replay import ExperienceBuffer, PrioritizedBuffer, Transitions

log = logging.getLogger(__name__)


class SampledBatch(NamedTuple):
    """One batch and what its source needs back: importance weights and row ids (prioritized)."""

    transitions: Transitions
    weights: torch.Tensor | None = None
    ids: np.ndarray | None = None


class ReplaySource(Protocol):
    """``sample(n)`` batches of experience; ``update_priorities`` takes their TD errors back."""

    def sample(self, batch_size: int, num_batches: int = 1) -> list[SampledBatch | None]:
        """``num_batches`` batches (None where the source has nothing to give)."""
        ...

    def update_priorities(self, ids: np.ndarray, td_errors: torch.Tensor) -> None:
        """New priorities (|TD error|) for rows this source handed out."""
        ...


def transitions_from_numpy(batch: Any, device: torch.device) -> Transitions:
    """Tensors from a Memory-service batch (numpy arrays with the same field names)."""
    return Transitions(
        obs=torch.as_tensor(batch.obs, dtype=torch.float32, device=device),
        actions=torch.as_tensor(batch.actions, dtype=torch.int64, device=device),
        rewards=torch.as_tensor(batch.rewards, dtype=torch.float32, device=device),
        next_obs=torch.as_tensor(batch.next_obs, dtype=torch.float32, device=device),
        dones=torch.as_tensor(batch.dones, dtype=torch.float32, device=device),
    )


class RowShapeGuard:
    """Refuses (and logs once) rows of another observation size: a collection shared by mistake
    with another task must not crash training, nor poison it."""

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size
        self._warned = False

    def fits(self, obs: np.ndarray, what: str) -> bool:
        if obs.ndim == 2 and obs.shape[1] == self.input_size:
            return True
        if not self._warned:
            self._warned = True
            log.error(
                "Memory service %s rows have %s features, this agent %d: ignoring them "
                "(is memory.collection shared with another task?)",
                what, obs.shape[1:] or "no", self.input_size,
            )
        return False


class LocalReplay:
    """The local circular buffer, sampled uniformly or, a :class:`PrioritizedBuffer`, by
    priority (``replay.prioritized``); all of a call's batches in one draw."""

    def __init__(self, buffer: ExperienceBuffer) -> None:
        self.buffer = buffer
        self.prioritized = isinstance(buffer, PrioritizedBuffer)

    def __len__(self) -> int:
        return len(self.buffer)

    def sample_stacked(self, batch_size: int, num_batches: int) -> Transitions:
        """[G, B, ...] tensors: the form similar-state search takes its queries from."""
        return self.buffer.sample(batch_size, num_batches=num_batches)

    def draw(self, batch_size: int, num_batches: int) -> SampledBatch:
        """[G, B, ...] tensors, with [G, B] importance weights and buffer slots when prioritized."""
        if self.prioritized:
            assert isinstance(self.buffer, PrioritizedBuffer)
            drawn = self.buffer.sample_weighted(batch_size, num_batches)
            return SampledBatch(drawn.transitions, drawn.weights, drawn.slots)
        return SampledBatch(self.sample_stacked(batch_size, num_batches))

    def sample(self, batch_size: int, num_batches: int = 1) -> list[SampledBatch | None]:
        if len(self.buffer) < batch_size:
            return [None] * num_batches
        stacked, weights, ids = self.draw(batch_size, num_batches)
        return [
            SampledBatch(
                Transitions(*(t[step] for t in stacked)),
                None if weights is None else weights[step],
                None if ids is None else ids[step],
            )
            for step in range(num_batches)
        ]

    def update_priorities(self, ids: np.ndarray, td_errors: torch.Tensor) -> None:
        """New priorities for a prioritized buffer's rows; uniform sampling: nothing to do."""
        if self.prioritized:
            assert isinstance(self.buffer, PrioritizedBuffer)
            self.buffer.update_priorities(ids, td_errors)


class MemoryReplay:
    """Batches from the Memory service (uniform or by priority), one request per batch; TD
    errors go back as priorities when sampling is prioritized."""

    def __init__(
        self,
        client: Any,
        memory: MemoryConfig,
        device: torch.device,
        guard: RowShapeGuard,
    ) -> None:
        self.client = client
        self.prioritized = memory.prioritized
        self.beta = memory.priority_beta
        self.device = device
        self._guard = guard

    def sample(self, batch_size: int, num_batches: int = 1) -> list[SampledBatch | None]:
        return [self._one(batch_size) for _ in range(num_batches)]

    def _one(self, batch_size: int) -> SampledBatch | None:
        batch = self.client.sample_replay(batch_size, prioritized=self.prioritized, beta=self.beta)
        if batch is None or len(batch.ids) == 0 or not self._guard.fits(batch.obs, "replay"):
            return None
        weights = torch.as_tensor(batch.weights, dtype=torch.float32, device=self.device)
        return SampledBatch(transitions_from_numpy(batch, self.device), weights, np.asarray(batch.ids))

    def update_priorities(self, ids: np.ndarray, td_errors: torch.Tensor) -> None:
        if self.prioritized:
            self.client.send_priorities(ids, td_errors.abs().cpu().numpy() + 1e-6)


class SimilarReplay:
    """Stored neighbours of the states being learned from: past experience that bears on the
    present (knowledge transfer). Its "sample" takes the local batches as queries.

    The first ceil(similar_batch_size / k) states of each local batch are the queries, all sent
    in one search request (one round trip per training call, not per update), and each update
    gets the ``similar_batch_size`` neighbours of its own queries. With
    ``replay.similar_embedding`` 'network' or ``replay.similar_prefer_success``,
    ``replay.similar_candidates`` times as many are fetched and :meth:`_choose` keeps k per query.
    """

    def __init__(
        self,
        client: Any,
        replay: ReplayConfig,
        device: torch.device,
        guard: RowShapeGuard,
        embed: Any = None,
    ) -> None:
        self.client = client
        self.replay = replay
        self.device = device
        self._guard = guard
        self._embed = embed  # states -> penultimate-layer features (replay.similar_embedding: network)
        self.last_count = 0

    def sample_near(self, local: Transitions) -> list[Transitions | None]:
        """Neighbours for each of the [G, B] local batches (None where there are none)."""
        steps = local.obs.shape[0]
        size = self.replay.similar_batch_size
        if size == 0:
            return [None] * steps
        input_size = self._guard.input_size
        k = min(size, 5)
        per_step = min(-(-size // k), local.obs.shape[1])
        query_rows = local.obs[:, :per_step].reshape(-1, input_size)
        choosing = self.replay.similar_embedding == "network" or self.replay.similar_prefer_success
        fetch = k * self.replay.similar_candidates if choosing else k
        found = self.client.find_similar(query_rows.cpu().numpy(), k=fetch)
        if found is None or len(found.batch.ids) == 0 or not self._guard.fits(found.batch.obs, "similar"):
            return [None] * steps
        rows = transitions_from_numpy(found.batch, self.device)
        query_index = np.asarray(found.query_index)
        if choosing and fetch > k:
            keep = self._choose(query_rows, rows.obs, found, k)
            rows = Transitions(*(t[torch.as_tensor(keep, device=self.device)] for t in rows))
            query_index = query_index[keep]
        # Answers come in query order (k per query, fewer if the collection is tiny).
        counts = np.bincount(query_index // per_step, minlength=steps)
        starts = np.concatenate(([0], np.cumsum(counts)))
        batches: list[Transitions | None] = []
        for step in range(steps):
            first, stop = int(starts[step]), int(min(starts[step + 1], starts[step] + size))
            batches.append(Transitions(*(t[first:stop] for t in rows)) if stop > first else None)
        self.last_count = max((b.obs.shape[0] for b in batches if b is not None), default=0)
        return batches

    def _choose(self, queries: torch.Tensor, candidates: torch.Tensor, found: Any, k: int) -> np.ndarray:
        """Which of the candidates (indices, in query order) to keep: k per query.

        Ranked by distance, in the penultimate layer of the current network when
        ``replay.similar_embedding`` is 'network' (query and candidates embedded now, by the same
        weights), else as the service measured it between states; with
        ``replay.similar_prefer_success``, by the candidate's episode return first (highest
        first, unknown last), distance breaking ties.
        """
        query_index = np.asarray(found.query_index)
        if self.replay.similar_embedding == "network" and self._embed is not None:
            near = self._embed(queries)[torch.as_tensor(query_index, device=self.device)]
            far = self._embed(candidates)
            distance = torch.linalg.vector_norm(near - far, dim=1).cpu().numpy()
        else:
            distance = np.asarray(found.distances)
        keys = [distance]
        returns = found.batch.episode_returns
        if self.replay.similar_prefer_success and returns is not None:
            keys.append(np.where(np.isnan(returns), np.inf, -returns))  # high returns first
        order = np.lexsort((*keys, query_index))  # the last key sorts first: queries stay in order
        sorted_queries = query_index[order]
        first = np.searchsorted(sorted_queries, sorted_queries, side="left")
        rank = np.arange(len(order)) - first
        return order[rank < k]

    def sample(self, batch_size: int, num_batches: int = 1) -> list[SampledBatch | None]:
        """Not sampled on its own: its batches answer queries (see :meth:`sample_near`)."""
        return [None] * num_batches

    def update_priorities(self, ids: np.ndarray, td_errors: torch.Tensor) -> None:
        """Neighbours are not sampled by priority: nothing to send back."""


class MixedBatch(NamedTuple):
    """What one update learns from: the local batch, and the extra rows (memory rows first,
    then similar ones) with their importance weights."""

    local: Transitions
    local_weights: torch.Tensor | None
    extra: Transitions | None
    extra_weights: torch.Tensor | None
    memory_ids: np.ndarray | None
    """service ids of the extra rows that came from prioritized memory replay (the first ones)"""
    similar_rows: int
    local_ids: np.ndarray | None = None
    """buffer slots of the local rows (a prioritized local buffer), for their new priorities"""


class MixedReplay:
    """The spec's replay: a local batch per update, plus a memory batch and similar-state
    neighbours when those sources are present."""

    def __init__(
        self,
        local: LocalReplay,
        memory: MemoryReplay | None = None,
        similar: SimilarReplay | None = None,
        *,
        memory_batch_size: int = 0,
    ) -> None:
        self.local = local
        self.memory = memory
        self.similar = similar
        self.memory_batch_size = memory_batch_size

    def sample(self, batch_size: int, num_batches: int = 1) -> list[MixedBatch] | None:
        """``num_batches`` mixed batches, or None while the local buffer holds fewer than
        ``batch_size`` transitions."""
        stream = self.stream(batch_size, num_batches)
        return None if stream is None else list(stream)

    def stream(self, batch_size: int, num_batches: int = 1) -> Iterator[MixedBatch] | None:
        """As :meth:`sample`, but each memory batch is fetched only when its update is next, so
        priorities sent back after one update reach the next one's sample."""
        if len(self.local) < batch_size:
            return None
        return self._stream(batch_size, num_batches)

    def _stream(self, batch_size: int, num_batches: int) -> Iterator[MixedBatch]:
        stacked, local_weights, local_ids = self.local.draw(batch_size, num_batches)
        near = (
            self.similar.sample_near(stacked) if self.similar is not None else [None] * num_batches
        )
        for step in range(num_batches):
            local = Transitions(*(t[step] for t in stacked))
            extra = weights = ids = None
            if self.memory is not None and self.memory_batch_size > 0:
                sampled = self.memory.sample(self.memory_batch_size)[0]
                if sampled is not None:
                    extra, weights, ids = sampled
            similar = near[step]
            similar_rows = 0
            if similar is not None:
                similar_rows = similar.obs.shape[0]
                ones = torch.ones(similar_rows, device=similar.obs.device)
                if extra is None:
                    extra, weights = similar, ones
                else:
                    extra = Transitions(*(torch.cat([a, b]) for a, b in zip(extra, similar)))
                    weights = torch.cat([weights, ones])  # type: ignore[list-item]
            yield MixedBatch(
                local,
                None if local_weights is None else local_weights[step],
                extra,
                weights,
                ids,
                similar_rows,
                None if local_ids is None else local_ids[step],
            )

    def update_priorities(self, batch: MixedBatch, td_extra: torch.Tensor | None) -> None:
        """Send the memory rows' TD errors back (similar rows follow them and send none). The
        local rows' go back through ``local.update_priorities``, once per call (see
        :meth:`agent.dqn.LearningAgent.learn`)."""
        if self.memory is not None and batch.memory_ids is not None and td_extra is not None:
            self.memory.update_priorities(batch.memory_ids, td_extra[: len(batch.memory_ids)])
