"""The in-memory sampling structures of the Memory service: the sum tree and the FIFO ring."""

from __future__ import annotations

import numpy as np
import pytest

from memory.ring import Ring
from memory.sumtree import SumTree
from memory.transitions import Transitions


def batch(start: int, n: int, dim: int = 2, embedding_dim: int | None = None) -> Transitions:
    obs = np.tile(np.arange(start, start + n, dtype=np.float32)[:, None], (1, dim))
    return Transitions(
        obs=obs,
        actions=np.arange(start, start + n),
        rewards=np.full(n, 0.5, np.float32),
        next_obs=obs + 1,
        dones=np.zeros(n, np.float32),
        embeddings=None if embedding_dim is None else np.zeros((n, embedding_dim), np.float32),
    )


# -------------------------------------------------------------------------------------- sum tree
def test_sum_tree_totals_and_finds_proportionally() -> None:
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 0.0, 3.0, 0.0, 6.0]))
    assert tree.total == pytest.approx(10.0)
    slots = tree.find(np.array([0.0, 0.99, 1.0, 3.99, 4.0, 9.99]), used=5)
    assert slots.tolist() == [0, 0, 2, 2, 4, 4]
    draws = tree.find(np.random.default_rng(0).random(20_000) * tree.total, used=5)
    counts = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(counts, [0.1, 0.0, 0.3, 0.0, 0.6], atol=0.02)


def test_sum_tree_updates_scattered_repeated_and_contiguous_slots() -> None:
    tree = SumTree(1000)
    tree.set(np.arange(1000), np.ones(1000))  # contiguous: the slice path
    tree.set(np.array([999, 3, 3, 500]), np.array([2.0, 5.0, 7.0, 0.0]))  # scattered, 3 repeated
    expected = np.ones(1000)
    expected[[999, 3, 500]] = [2.0, 7.0, 0.0]
    assert tree.total == pytest.approx(expected.sum())
    np.testing.assert_allclose(tree.get(np.arange(1000)), expected)
    # Every internal node is the sum of its children: a find at each cumulative midpoint is right.
    boundaries = np.cumsum(expected) - 0.5 * expected
    nonzero = expected > 0
    assert (tree.find(boundaries[nonzero], used=1000) == np.arange(1000)[nonzero]).all()


def test_sum_tree_grows_keeping_priorities() -> None:
    tree = SumTree(3)
    tree.set(np.arange(3), np.array([1.0, 2.0, 3.0]))
    tree.grow(100)
    assert tree.size == 100 and tree.total == pytest.approx(6.0)
    tree.set(np.array([50]), np.array([4.0]))
    assert tree.find(np.array([9.5]), used=51).tolist() == [50]


def test_find_never_returns_a_slot_past_the_data() -> None:
    tree = SumTree(8)
    tree.set(np.arange(3), np.array([1e-12, 1e-12, 1.0]))
    assert tree.find(np.array([tree.total * 2]), used=3).tolist() == [2]


# -------------------------------------------------------------------------------------- ring
def test_ring_grows_then_wraps_keeping_the_newest() -> None:
    ring = Ring(capacity=100, dim=2, embedding_dim=None)
    assert ring.allocated < 100
    for start in range(0, 250, 30):
        first_id, _ = ring.append(batch(start, min(30, 250 - start)))
        assert first_id == start
    assert (ring.size, ring.next_id, ring.oldest_id, ring.allocated) == (100, 250, 150, 100)
    live = np.arange(150, 250)
    rows = ring.gather(ring.slots(live))
    assert rows["ids"].tolist() == live.tolist()
    assert rows["obs"][:, 0].tolist() == live.tolist() and rows["actions"].tolist() == live.tolist()
    np.testing.assert_array_equal(rows["next_obs"], rows["obs"] + 1)
    assert ring.live(np.array([149, 150, 249, 250])).tolist() == [False, True, True, False]
    assert sorted(ring.ids[: ring.size].tolist()) == live.tolist()


def test_a_batch_larger_than_the_capacity_keeps_its_tail() -> None:
    ring = Ring(capacity=10, dim=2, embedding_dim=None, first_id=5)
    first_id, slots = ring.append(batch(0, 25))
    assert first_id == 5 and len(slots) == 10
    assert (ring.next_id, ring.oldest_id) == (30, 20)
    assert ring.gather(ring.slots(np.arange(20, 30)))["obs"][:, 0].tolist() == list(range(15, 25))


def test_vectors_are_embeddings_when_the_collection_has_them() -> None:
    ring = Ring(capacity=10, dim=3, embedding_dim=2)
    ring.append(batch(0, 4, dim=3, embedding_dim=2))
    assert ring.vectors().shape == (4, 2)
    plain = Ring(capacity=10, dim=3, embedding_dim=None)
    plain.append(batch(0, 4, dim=3))
    np.testing.assert_array_equal(plain.vectors(), plain.obs[:4])


def test_prefix_sums_cover_the_slots_below() -> None:
    tree = SumTree(6)
    values = np.array([1.0, 2.0, 0.0, 4.0, 8.0, 16.0])
    tree.set(np.arange(6), values)
    expected = np.concatenate(([0.0], np.cumsum(values)))
    np.testing.assert_allclose(tree.prefix(np.arange(7)), expected)
    assert tree.prefix(np.array([100])).tolist() == [tree.total]  # past the leaves: everything
