"""The spec's Memory System Integration example, as the spec writes it, against the real service."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent import LearningAgent, MemoryClient
from tests.integration import memory_fixtures
from tests.integration.memory_fixtures import MemoryServer

shared_memory_server = memory_fixtures.shared_memory_server

pytestmark = pytest.mark.integration


def test_similar_experiences_include_the_one_just_stored(shared_memory_server: MemoryServer) -> None:
    """store_experience, then at once get_similar_experiences: no flush in between, as in the spec."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(21, 4)).astype(np.float32)
    agent = LearningAgent(input_size=4, output_size=2, hidden_size=16)
    memory_config = {"base_url": shared_memory_server.url, "timeout": 30}

    async def run():
        async with MemoryClient(**memory_config, collection="spec-read-own-writes") as memory_client:
            for i in range(20):
                current_state, next_state = states[i], states[i + 1]
                # Store experience
                await agent.store_experience(
                    state=current_state,
                    action=i % 2,
                    reward=float(i),
                    next_state=next_state,
                    done=i == 19,
                    memory_client=memory_client,
                )
            # Get similar experiences
            similar_experiences = await agent.get_similar_experiences(
                state=current_state, memory_client=memory_client, k=5
            )
            return similar_experiences, memory_client.metrics()

    similar_experiences, metrics = asyncio.run(run())
    assert similar_experiences is not None and len(similar_experiences) == 5
    assert metrics["delivered"] == 20  # the search delivered the queued writes first
    just_stored = similar_experiences[0]  # nearest first: the state itself
    np.testing.assert_array_equal(just_stored.state, states[19])
    np.testing.assert_array_equal(just_stored.next_state, states[20])
    assert just_stored.action == 1 and just_stored.reward == 19.0 and just_stored.done
    assert just_stored.distance == 0.0
    distances = [experience.distance for experience in similar_experiences]
    assert distances == sorted(distances)
    for experience in similar_experiences:
        stored = int(experience.reward)
        np.testing.assert_array_equal(experience.state, states[stored])
        assert experience.distance == pytest.approx(float(np.linalg.norm(states[stored] - states[19])), abs=1e-5)
    # The columnar form is still there for code that feeds torch in one piece.
    assert similar_experiences.batch.obs.shape == (5, 4) and similar_experiences.distances[0] == 0.0
