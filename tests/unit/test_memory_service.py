"""The Memory service without HTTP: validation, the durable log, reloads, idempotency, sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from memory.errors import Conflict, InvalidInput, NotFound
from memory.service import MemoryService
from memory.settings import Settings
from memory.store import WriteKey


def arrays(n: int, dim: int = 3, start: int = 0) -> dict[str, np.ndarray]:
    obs = np.zeros((n, dim), np.float32)
    obs[:, 0] = np.arange(start, start + n)
    return {
        "obs": obs,
        "actions": np.arange(n) % 2,
        "rewards": np.ones(n, np.float32),
        "next_obs": obs + 1,
        "dones": np.zeros(n, bool),
    }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[MemoryService]:
    svc = MemoryService(Settings(data_dir=tmp_path, seed=0))
    yield svc
    svc.close()


def reopen(service: MemoryService) -> MemoryService:
    service.close()
    return MemoryService(service.settings)


def stored_firsts(service: MemoryService, name: str) -> list[int]:
    return service.get(name).read(0, 10**6)["obs"][:, 0].astype(int).tolist()


def test_reload_rebuilds_rings_with_the_eviction_window(service: MemoryService) -> None:
    service.create("a", 3, capacity=25, embedding_dim=None, priority_alpha=0.6)
    service.create("b", 3, capacity=1000, embedding_dim=None, priority_alpha=0.6)
    for start in range(0, 60, 10):
        service.store("a", arrays(10, start=start), None)
    service.store("b", arrays(7), None)
    reloaded = reopen(service)
    try:
        a = reloaded.get("a")
        assert (a.ring.size, a.ring.oldest_id, a.ring.next_id) == (25, 35, 60)
        assert stored_firsts(reloaded, "a") == list(range(35, 60))
        assert stored_firsts(reloaded, "b") == list(range(7))
        assert reloaded.store("a", arrays(5, start=60), None).first_id == 60
        # Fully evicted segments were deleted from the log; the partly evicted one stays.
        assert reloaded.log.stats()["segments"] == 4
    finally:
        reloaded.close()


def test_idempotency_keys_are_remembered_across_restarts(service: MemoryService) -> None:
    service.create("k", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    first = service.store("k", arrays(4), WriteKey("c1", 0))
    assert (first.first_id, first.count, first.duplicate) == (0, 4, False)
    reloaded = reopen(service)
    try:
        again = reloaded.store("k", arrays(4), WriteKey("c1", 0))
        assert (again.first_id, again.count, again.duplicate) == (0, 4, True)
        assert reloaded.store("k", arrays(4), WriteKey("c1", 1)).first_id == 4
        # A lower key cannot be a retry (a retry re-sends the latest batch): refused, not dropped.
        with pytest.raises(Conflict, match="cannot be a retry"):
            reloaded.store("k", arrays(4), WriteKey("c1", 0))
        assert reloaded.get("k").ring.size == 8
    finally:
        reloaded.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"obs": np.zeros((4, 2), np.float32)}, r"obs: expected shape \[4, 3\]"),
        ({"obs": np.zeros((4, 3), np.int64)}, "obs: dtype must be a float"),
        ({"next_obs": np.full((4, 3), np.inf, np.float32)}, "next_obs: contains NaN or infinity"),
        ({"obs": np.full((4, 3), 1e300)}, "beyond float32"),
        ({"actions": np.zeros(4, np.float32)}, "actions: dtype must be an integer"),
        ({"actions": np.full(4, 2**63, np.uint64)}, "int64 range"),
        ({"actions": np.zeros((4, 1), np.int64)}, r"actions: expected shape \[B\]"),
        ({"rewards": np.zeros(3, np.float32)}, r"rewards: expected shape \[4\]"),
        ({"rewards": np.zeros(4, np.int64)}, "rewards: dtype must be a float"),
        ({"dones": np.full(4, 0.5, np.float32)}, "dones: every value must be 0 or 1"),
        ({"dones": np.array(["a"] * 4)}, "dones: dtype"),
        ({"extra": np.zeros(4)}, "unexpected arrays: extra"),
        ({"embeddings": np.zeros((4, 2), np.float32)}, "unexpected arrays: embeddings"),
    ],
)
def test_invalid_batches_are_refused_and_change_nothing(
    service: MemoryService, change: dict[str, np.ndarray], message: str
) -> None:
    service.create("v", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    service.store("v", arrays(4), None)
    with pytest.raises(InvalidInput, match=message):
        service.store("v", {**arrays(4), **change}, WriteKey("c", 5))
    assert service.get("v").ring.next_id == 4 and service.log.stats()["segments"] == 1
    assert not service.store("v", arrays(1), WriteKey("c", 5)).duplicate  # the key was not used up


def test_missing_arrays_and_batch_size_limits(service: MemoryService) -> None:
    service.create("m", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    with pytest.raises(InvalidInput, match="missing arrays: rewards"):
        service.store("m", {k: v for k, v in arrays(2).items() if k != "rewards"}, None)
    with pytest.raises(InvalidInput, match="1 to 65536"):
        service.store("m", arrays(0), None)


def test_unknown_empty_and_conflicting_collections(service: MemoryService) -> None:
    with pytest.raises(NotFound, match="unknown collection 'x'"):
        service.store("x", arrays(1), None)
    service.create("e", 3, capacity=10, embedding_dim=None, priority_alpha=0.6)
    _, created = service.create("e", 3, capacity=10, embedding_dim=None, priority_alpha=0.6)
    assert not created
    with pytest.raises(Conflict, match="exists with dim=3"):
        service.create("e", 4, capacity=10, embedding_dim=None, priority_alpha=0.6)
    with pytest.raises(Conflict, match="empty"):
        service.get("e").sample(4, False, 0.4, service.rng)
    with pytest.raises(InvalidInput, match="capacity"):
        service.create("huge", 3, capacity=10**9, embedding_dim=None, priority_alpha=0.6)


def test_several_batches_per_sample_each_normalised(service: MemoryService) -> None:
    service.create("p", 3, capacity=None, embedding_dim=None, priority_alpha=1.0)
    service.store("p", arrays(10), None)
    collection = service.get("p")
    collection.update_priorities(np.arange(10), np.arange(1, 11, dtype=np.float64))
    drawn = collection.sample(8, True, 1.0, service.rng, batches=3)
    assert drawn["ids"].shape == (24,)
    weights = drawn["weights"].reshape(3, 8)
    np.testing.assert_allclose(weights.max(axis=1), 1.0)
    # w_i is proportional to 1 / p_i within a batch: the smallest priority gets weight 1.
    for ids, w in zip(drawn["ids"].reshape(3, 8), weights):
        np.testing.assert_allclose(w, (ids.min() + 1) / (ids + 1), rtol=1e-4)
    uniform = collection.sample(5, False, 0.4, service.rng, batches=2)
    assert uniform["weights"].tolist() == [1.0] * 10


def test_priority_updates_reject_bad_ids_and_values(service: MemoryService) -> None:
    service.create("q", 3, capacity=5, embedding_dim=None, priority_alpha=0.6)
    service.store("q", arrays(8), None)
    collection = service.get("q")
    assert collection.update_priorities(np.array([0, 7]), np.array([1.0, 2.0])) == {
        "updated": 1,
        "evicted": 1,
    }
    with pytest.raises(InvalidInput, match="ids issued so far"):
        collection.update_priorities(np.array([8]), np.array([1.0]))
    with pytest.raises(InvalidInput, match="finite and >= 0"):
        collection.update_priorities(np.array([7]), np.array([-1.0]))
    with pytest.raises(InvalidInput, match="equal length"):
        collection.update_priorities(np.array([7, 6]), np.array([1.0]))
    with pytest.raises(InvalidInput, match="ids: dtype"):
        collection.update_priorities(np.array([7.0]), np.array([1.0]))
    assert collection.max_priority == pytest.approx(2.0, rel=1e-4)


def test_search_flattens_hits_and_checks_queries(service: MemoryService) -> None:
    service.create("s", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    service.store("s", arrays(6), None)
    found = service.get("s").search(np.array([[0.1, 0, 0], [4.9, 0, 0]]), 2, max_queries=10)
    assert found["query_index"].tolist() == [0, 0, 1, 1]
    assert found["ids"].tolist() == [0, 1, 5, 4]
    np.testing.assert_allclose(found["distances"], [0.1, 0.9, 0.1, 0.9], rtol=1e-5)
    with pytest.raises(InvalidInput, match="1 to 10 query states"):
        service.get("s").search(np.zeros((11, 3)), 2, max_queries=10)
    with pytest.raises(InvalidInput, match=r"states: expected shape \[B, 3\]"):
        service.get("s").search(np.zeros((1, 2)), 2, max_queries=10)


def test_a_seeded_sample_below_end_id_ignores_rows_stored_since(service: MemoryService) -> None:
    """What makes replay through the service reproducible: the same seed and end_id give the same
    rows, uniform or prioritized, however many rows arrived after end_id."""
    service.create("s", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    service.store("s", arrays(40), None)
    collection = service.get("s")
    first = {
        prioritized: collection.sample(8, prioritized, 0.4, np.random.default_rng(7), 2, end_id=30)
        for prioritized in (False, True)
    }
    service.store("s", arrays(50, start=40), None)
    for prioritized, drawn in first.items():
        again = collection.sample(8, prioritized, 0.4, np.random.default_rng(7), 2, end_id=30)
        assert (again["ids"] == drawn["ids"]).all() and (again["weights"] == drawn["weights"]).all()
        assert drawn["ids"].max() < 30
    with pytest.raises(Conflict, match="holds ids below 90"):
        collection.sample(8, False, 0.4, service.rng, end_id=91)


def test_prioritized_draws_below_end_id_follow_priorities_across_the_wrap(
    service: MemoryService,
) -> None:
    service.create("w", 3, capacity=10, embedding_dim=None, priority_alpha=1.0)
    service.store("w", arrays(25), None)  # ids 15..24 live; 15..19 in slots 5..9, 20..24 in 0..4
    collection = service.get("w")
    ids = np.arange(15, 25)
    collection.update_priorities(ids, (ids - 14).astype(np.float64))
    drawn = collection.sample(100, True, 1.0, np.random.default_rng(0), 64, end_id=23)
    assert drawn["ids"].min() >= 15 and drawn["ids"].max() < 23
    window = np.arange(15, 23)
    counts = np.array([(drawn["ids"] == i).sum() for i in window]) / len(drawn["ids"])
    np.testing.assert_allclose(counts, (window - 14) / (window - 14).sum(), atol=0.01)
    uniform = collection.sample(100, False, 0.4, np.random.default_rng(0), 64, end_id=23)
    assert set(uniform["ids"].tolist()) == set(window.tolist())
    with pytest.raises(Conflict, match="evicted"):
        collection.sample(4, False, 0.4, service.rng, end_id=15)


def test_stored_rows_start_at_the_priorities_their_writer_gives(service: MemoryService) -> None:
    service.create("i", 3, capacity=None, embedding_dim=None, priority_alpha=1.0)
    batch = arrays(4)
    batch["priorities"] = np.array([1.0, 3.0, np.nan, 0.0], np.float32)  # NaN: the running max
    service.store("i", batch, None)
    collection = service.get("i")
    assert collection.max_priority == pytest.approx(3.0)
    drawn = collection.sample(1000, True, 1.0, np.random.default_rng(0), batches=40)
    shares = np.bincount(drawn["ids"], minlength=4) / len(drawn["ids"])
    # 1 : 3 : 3 (NaN took the maximum) : 1e-6 (0 is clipped to the smallest priority)
    np.testing.assert_allclose(shares, [1 / 7, 3 / 7, 3 / 7, 0.0], atol=0.01)
    later = arrays(1, start=4)
    service.store("i", later, None)  # no priorities given: the maximum seen so far
    assert collection.priorities.get(collection.ring.slots(np.array([4])))[0] == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("priorities", "message"),
    [
        (np.array([1.0, -1.0]), "finite and >= 0"),
        (np.array([1.0, np.inf]), "finite and >= 0"),
        (np.array([1, 2]), "dtype must be a float"),
        (np.array([1.0]), r"expected shape \[2\]"),
    ],
)
def test_bad_initial_priorities_are_refused_and_store_nothing(
    service: MemoryService, priorities: np.ndarray, message: str
) -> None:
    service.create("j", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    batch = {**arrays(2), "priorities": priorities}
    with pytest.raises(InvalidInput, match=message):
        service.store("j", batch, None)
    assert service.get("j").ring.size == 0
