from __future__ import annotations

import numpy as np
import pytest
import torch

from agent import ExperienceBuffer


def fill(buffer: ExperienceBuffer, start: int, count: int) -> None:
    ids = np.arange(start, start + count, dtype=np.float32)
    obs = np.stack([ids, -ids], axis=1)
    buffer.add(obs, ids.astype(np.int64) % 3, ids, obs + 0.5, (ids % 2 == 0).astype(np.float32))


def stored_ids(buffer: ExperienceBuffer) -> set[int]:
    state = buffer.state_dict()
    return {int(v) for v in state["data"]["rewards"].tolist()}


def test_capacity_and_wrap_around_keep_the_newest():
    buffer = ExperienceBuffer(capacity=10, obs_dim=2)
    fill(buffer, 0, 7)
    assert len(buffer) == 7 and buffer.position == 7
    fill(buffer, 7, 6)  # wraps: 13 written, 10 kept
    assert len(buffer) == 10 and buffer.position == 3
    assert stored_ids(buffer) == set(range(3, 13))


def test_a_batch_larger_than_capacity_keeps_its_tail():
    buffer = ExperienceBuffer(capacity=4, obs_dim=2)
    fill(buffer, 0, 9)
    assert len(buffer) == 4
    assert stored_ids(buffer) == {5, 6, 7, 8}


def test_single_transitions_and_lazy_allocation():
    buffer = ExperienceBuffer(capacity=5)
    buffer.add([1.0, 2.0, 3.0], 1, 0.5, [1.0, 2.0, 4.0], True)
    assert buffer.obs_dim == 3 and len(buffer) == 1
    with pytest.raises(ValueError, match="observation has 2 features"):
        buffer.add([1.0, 2.0], 0, 0.0, [0.0, 0.0], False)


def test_sampling_shapes_types_and_consistency():
    buffer = ExperienceBuffer(capacity=100, obs_dim=2, seed=3)
    fill(buffer, 0, 50)
    batch = buffer.sample(8)
    assert batch.obs.shape == (8, 2) and batch.next_obs.shape == (8, 2)
    assert batch.actions.dtype == torch.int64 and batch.rewards.dtype == torch.float32
    # each row is one transition: obs[0] is the id, reward is the id
    assert torch.equal(batch.obs[:, 0], batch.rewards)
    assert torch.equal(batch.actions, batch.rewards.long() % 3)
    many = buffer.sample(16, num_batches=5)
    assert many.obs.shape == (5, 16, 2) and many.dones.shape == (5, 16)
    assert set(many.rewards.flatten().long().tolist()) <= set(range(50))


def test_sampling_is_seeded_and_empty_buffer_refuses():
    a, b = ExperienceBuffer(50, 2, seed=7), ExperienceBuffer(50, 2, seed=7)
    fill(a, 0, 30)
    fill(b, 0, 30)
    assert torch.equal(a.sample(10).rewards, b.sample(10).rewards)
    with pytest.raises(ValueError, match="empty"):
        ExperienceBuffer(5, 2).sample(1)


def test_state_round_trip_continues_identically():
    buffer = ExperienceBuffer(capacity=20, obs_dim=2, seed=1)
    fill(buffer, 0, 27)
    state = buffer.state_dict()
    copy = ExperienceBuffer(capacity=20, obs_dim=2, seed=99)
    copy.load_state_dict(state)
    assert (copy.size, copy.position) == (buffer.size, buffer.position)
    assert torch.equal(copy.sample(12).rewards, buffer.sample(12).rewards)
    with pytest.raises(ValueError, match="capacity"):
        ExperienceBuffer(capacity=21, obs_dim=2).load_state_dict(state)
