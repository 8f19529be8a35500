"""Similar-state search: exact while small, faiss IVF beyond, rebuilt in the background."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import pytest

from memory.index import SimilarityIndex, choose_nlist
from memory.ring import Ring
from memory.transitions import Transitions


class ManualExecutor(Executor):
    """Runs submitted builds only when told to, so a test decides what arrives during a build."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.append((future, fn, args))
        return future

    def run_all(self) -> None:
        while self.jobs:
            future, fn, args = self.jobs.pop(0)
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the future, as a real executor does
                future.set_exception(exc)


def walks(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """States in trajectory order: random walks of 100 steps."""
    rng = np.random.default_rng(seed)
    episodes = -(-n // 100)
    starts = rng.standard_normal((episodes, 1, dim)) * 3
    return (
        (starts + np.cumsum(rng.standard_normal((episodes, 100, dim)) * 0.1, axis=1))
        .reshape(-1, dim)[:n]
        .astype(np.float32)
    )


def append(ring: Ring, index: SimilarityIndex, states: np.ndarray) -> None:
    n = len(states)
    _, slots = ring.append(
        Transitions(
            states, np.zeros(n, np.int64), np.zeros(n, np.float32), states, np.zeros(n, np.float32)
        )
    )
    index.added(ring, ring.ids[slots], states[n - len(slots) :])


def exact_ids(states: np.ndarray, first_id: int, queries: np.ndarray, k: int) -> np.ndarray:
    distances = ((queries[:, None, :] - states[None, :, :]) ** 2).sum(-1)
    return np.argsort(distances, axis=1)[:, :k] + first_id


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_nlist_is_about_the_square_root_and_trainable() -> None:
    assert choose_nlist(1_000_000) == 1024
    assert choose_nlist(100_000) == 256
    assert choose_nlist(3000) * 39 <= 3000


def test_exact_search_while_small() -> None:
    executor = ManualExecutor()
    ring = Ring(10_000, 4, None)
    index = SimilarityIndex(exact_max=5000, nprobe=8, builder=executor)
    states = walks(1000, 4)
    append(ring, index, states)
    queries = states[[3, 500, 999]] + 0.01
    ids, distances = index.search(ring, queries, 5)
    assert index.kind == "exact" and not executor.jobs
    np.testing.assert_array_equal(ids, exact_ids(states, 0, queries, 5))
    assert (np.diff(distances, axis=1) >= 0).all()
    np.testing.assert_allclose(
        distances[:, 0], np.linalg.norm(queries - states[[3, 500, 999]], axis=1), rtol=1e-4
    )
    few, _ = index.search(Ring(10, 4, None), queries, 5)
    assert few.shape == (3, 0)


def test_ivf_beyond_exact_max_includes_rows_that_arrive_during_the_build() -> None:
    executor = ManualExecutor()
    ring = Ring(100_000, 8, None)
    index = SimilarityIndex(exact_max=4000, nprobe=16, builder=executor)
    states = walks(12_000, 8)
    append(ring, index, states[:5000])  # over exact_max: a build is queued
    assert len(executor.jobs) == 1 and index.kind == "exact"
    append(ring, index, states[5000:6000])  # arrives while the build waits: goes to its queue
    executor.run_all()
    append(ring, index, states[6000:7000])  # after the build finished, before the swap
    assert index.kind == "ivf" and index.stats()["indexed"] == 7000
    queries = states[np.random.default_rng(1).integers(0, 7000, 200)] + 0.02
    ids, _ = index.search(ring, queries, 5)
    assert recall(ids, exact_ids(states[:7000], 0, queries, 5)) >= 0.95
    late, _ = index.search(ring, states[6500:6501], 1)
    assert late.tolist() == [[6500]]
    # Once the data has doubled since training, the index is rebuilt.
    append(ring, index, states[7000:12_000])
    assert len(executor.jobs) == 1
    executor.run_all()
    index.poll(ring)
    assert index.builds == 2 and index.stats()["indexed"] == 12_000


def test_evicted_rows_never_come_back_from_the_ivf_index() -> None:
    executor = ManualExecutor()
    ring = Ring(3000, 4, None)
    index = SimilarityIndex(exact_max=2000, nprobe=64, builder=executor)
    states = walks(9000, 4, seed=2)
    append(ring, index, states[:3000])
    executor.run_all()
    for start in range(3000, 9000, 500):
        append(ring, index, states[start : start + 500])
        executor.run_all()
    assert index.kind == "ivf" and ring.oldest_id == 6000
    assert index.stats()["indexed"] < 9000  # evicted ids were removed in bulk along the way
    old = states[:100]  # nearest neighbours of these are evicted rows
    ids, _ = index.search(ring, old, 5)
    assert ids.min() >= 6000 and ids.shape == (100, 5)
    queries = states[6000:9000][::50] + 0.01
    found, _ = index.search(ring, queries, 5)
    assert recall(found, exact_ids(states[6000:], 6000, queries, 5)) >= 0.95


def test_a_failed_build_leaves_search_on_the_exact_scan(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    executor = ManualExecutor()
    ring = Ring(10_000, 2, None)
    index = SimilarityIndex(exact_max=100, nprobe=4, builder=executor)
    monkeypatch.setattr(
        "memory.index.faiss.IndexIVFFlat",
        lambda *args: (_ for _ in ()).throw(MemoryError("no room")),
    )
    states = walks(500, 2)
    append(ring, index, states)
    executor.run_all()
    ids, _ = index.search(ring, states[:2], 1)
    assert index.kind == "exact" and ids[:, 0].tolist() == [0, 1]
    assert "building the IVF index failed" in caplog.text
