"""Knowledge transfer's choice of neighbours (issue 11, item 10): the network's penultimate layer
as the embedding (``replay.similar_embedding``), neighbours from successful episodes
(``replay.similar_prefer_success``), and the episode returns those rely on, from the trainer
(``replay.tag_episode_returns``) through the service's validation, log and search."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from agent import LearningAgent, TrainingManager, load_config
from agent.memory_client import ReplayBatch, SimilarExperiences
from memory.app import create_app
from memory.errors import InvalidInput
from memory.service import MemoryService
from memory.settings import Settings

K = 5


class Candidates:
    """A fake client whose search answers, for every query, the same ``n`` stored rows in a
    fixed order (the service's state distance), each with its episode return."""

    def __init__(self, obs: np.ndarray, returns: np.ndarray) -> None:
        self.obs, self.returns = obs.astype(np.float32), returns.astype(np.float32)
        self.searches: list[tuple[int, int]] = []

    def find_similar(self, states: Any, k: int = 5) -> SimilarExperiences:
        queries = np.asarray(states, dtype=np.float32)
        self.searches.append((len(queries), k))
        n = min(k, len(self.obs))
        rows = np.tile(np.arange(n), len(queries))
        batch = ReplayBatch(
            ids=rows.astype(np.int64),
            obs=self.obs[rows],
            actions=np.zeros(len(rows), np.int64),
            rewards=np.ones(len(rows), np.float32),
            next_obs=self.obs[rows],
            dones=np.zeros(len(rows), np.float32),
            weights=np.ones(len(rows), np.float32),
            episode_returns=self.returns[rows],
        )
        distances = np.tile(np.arange(n, dtype=np.float32), len(queries))  # row i: distance i
        return SimilarExperiences(batch, distances, np.repeat(np.arange(len(queries)), n))


def agent_with_one_query(*overrides: str) -> tuple[LearningAgent, np.ndarray]:
    """An agent whose every local sample is one state, so each search has one known query."""
    config = load_config(
        overrides=[
            "network.hidden_size=16",
            "train.batch_size=4",
            f"replay.similar_batch_size={K}",
            "replay.memory_batch_size=0",
            *overrides,
        ]
    )
    agent = LearningAgent(4, 2, config=config)
    state = np.array([0.3, -0.2, 0.1, 0.5], np.float32)
    obs = np.tile(state, (8, 1))
    asyncio.run(agent.store_experience(obs, np.zeros(8), np.zeros(8), obs, np.zeros(8)))
    return agent, state


def kept_ids(agent: LearningAgent, memory: Candidates) -> list[int]:
    local = agent.buffer.sample(4, num_batches=1)
    (batch,) = agent.replay_sources(memory).similar.sample_near(local)
    assert batch is not None
    return [int(np.flatnonzero((memory.obs == row).all(axis=1))[0]) for row in batch.obs.numpy()]


def test_network_embedding_keeps_the_nearest_in_the_penultimate_layer() -> None:
    agent, state = agent_with_one_query("replay.similar_embedding=network", "replay.similar_candidates=4")
    rng = np.random.default_rng(0)
    memory = Candidates(rng.normal(size=(20, 4)) * 2, np.full(20, np.nan))
    ids = kept_ids(agent, memory)
    assert memory.searches == [(1, 4 * K)]  # k * similar_candidates fetched, k kept
    with torch.no_grad():
        features = agent.q_network.features(torch.as_tensor(memory.obs))
        query = agent.q_network.features(torch.as_tensor(state[None]))
    expected = torch.linalg.vector_norm(features - query, dim=1).argsort()[:K].tolist()
    assert sorted(ids) == sorted(expected)
    assert sorted(ids) != list(range(K))  # not simply the service's nearest states


def test_state_embedding_keeps_the_services_nearest_and_fetches_only_k() -> None:
    agent, _ = agent_with_one_query()
    memory = Candidates(np.random.default_rng(0).normal(size=(20, 4)), np.arange(20.0))
    assert kept_ids(agent, memory) == list(range(K))
    assert memory.searches == [(1, K)]


def test_success_preference_keeps_the_highest_returns_unknown_last() -> None:
    agent, _ = agent_with_one_query("replay.similar_prefer_success=true", "replay.similar_candidates=2")
    returns = np.array([5, np.nan, 200, 9, 200, 1, np.nan, 150, 3, 500], np.float32)
    memory = Candidates(np.random.default_rng(0).normal(size=(10, 4)), returns)
    ids = kept_ids(agent, memory)
    assert memory.searches == [(1, 2 * K)]
    assert ids == [9, 2, 4, 7, 3]  # returns 500, 200, 200 (nearer first), 150, 9
    without = agent_with_one_query()[0]
    assert kept_ids(without, Candidates(memory.obs, returns)) == [0, 1, 2, 3, 4]


def test_unknown_returns_rank_last_but_still_fill_the_batch() -> None:
    agent, _ = agent_with_one_query("replay.similar_prefer_success=true", "replay.similar_candidates=2")
    returns = np.array([np.nan] * 7 + [10, 20, 30], np.float32)
    memory = Candidates(np.random.default_rng(0).normal(size=(10, 4)), returns)
    assert kept_ids(agent, memory) == [9, 8, 7, 0, 1]


def test_the_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="similar_embedding"):
        load_config(overrides=["replay.similar_embedding=pixels"])
    with pytest.raises(ValueError, match="similar_candidates"):
        load_config(overrides=["replay.similar_candidates=0"])


class Recorder:
    """A fake client that keeps every stored batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[np.ndarray, ...]] = []

    def write_transitions(self, *arrays: Any) -> None:
        self.batches.append(tuple(np.asarray(a) for a in arrays))

    def sample_replay(self, *args: Any, **kwargs: Any) -> None:
        return None

    def find_similar(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_the_trainer_stores_each_episode_when_it_ends_tagged_with_its_return() -> None:
    config = load_config(
        overrides=[
            "network.hidden_size=16",
            "replay.tag_episode_returns=true",
            "train.learning_starts=10000",
        ]
    )
    recorder = Recorder()
    trainer = TrainingManager(LearningAgent(4, 2, config=config), recorder, tensorboard=False)
    asyncio.run(trainer.train(total_timesteps=300))
    lengths = trainer.episode_lengths
    tagged = [b for b in recorder.batches if np.isfinite(b[5]).all()]
    # CartPole pays 1 a step: an episode's return is its length, and it is stored in one batch.
    assert [len(b[0]) for b in tagged] == lengths
    assert all((b[5] == len(b[0])).all() for b in tagged)
    assert sum(len(b[0]) for b in recorder.batches) == trainer.global_step  # the rest, untagged


def transitions(n: int, returns: Any = None) -> dict[str, np.ndarray]:
    obs = np.zeros((n, 3), np.float32)
    obs[:, 0] = np.arange(n)
    out = {
        "obs": obs,
        "actions": np.zeros(n, np.int64),
        "rewards": np.ones(n, np.float32),
        "next_obs": obs,
        "dones": np.zeros(n, np.float32),
    }
    if returns is not None:
        out["episode_returns"] = np.asarray(returns)
    return out


def test_the_service_keeps_episode_returns_through_search_and_reload(tmp_path: Path) -> None:
    service = MemoryService(Settings(data_dir=tmp_path, seed=0))
    service.create("r", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    service.store("r", transitions(3, np.array([7.0, np.nan, 9.0], np.float32)), None)
    service.store("r", transitions(2), None)  # untagged rows: unknown
    service.close()
    service = MemoryService(Settings(data_dir=tmp_path, seed=0))
    found = service.get("r").search(np.zeros((1, 3), np.float32), 5, 16)
    by_id = dict(zip(found["ids"].tolist(), found["episode_returns"].tolist()))
    assert by_id[0] == 7.0 and by_id[2] == 9.0
    assert all(np.isnan(by_id[i]) for i in (1, 3, 4))
    service.close()


@pytest.mark.parametrize(
    ("returns", "message"),
    [
        (np.array([1.0, np.inf, 2.0], np.float32), "infinity"),
        (np.array([1.0, 2.0], np.float32), r"expected shape \[3\]"),
        (np.array([1, 2, 3], np.int64), "float"),
    ],
)
def test_bad_episode_returns_are_refused(tmp_path: Path, returns: np.ndarray, message: str) -> None:
    service = MemoryService(Settings(data_dir=tmp_path, seed=0))
    service.create("r", 3, capacity=None, embedding_dim=None, priority_alpha=0.6)
    with pytest.raises(InvalidInput, match=message):
        service.store("r", transitions(3, returns), None)
    assert service.get("r").ring.size == 0
    service.close()


def test_json_answers_unknown_returns_as_null_and_refuses_bad_ones(tmp_path: Path) -> None:
    async def run() -> None:
        app = create_app(Settings(data_dir=tmp_path, seed=0))
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://memory"
        ) as http:
            (await http.post("/v1/collections", json={"name": "j", "dim": 3})).raise_for_status()
            body = {key: value.tolist() for key, value in transitions(2).items()}
            (await http.post("/v1/collections/j/transitions", json=body)).raise_for_status()
            tagged = {**body, "episode_returns": [4.0, 5.0]}
            (await http.post("/v1/collections/j/transitions", json=tagged)).raise_for_status()
            found = await http.post("/v1/collections/j/search?k=4", json={"states": [0, 0, 0]})
            assert found.status_code == 200
            assert sorted(found.json()["episode_returns"], key=str) == [4.0, 5.0, None, None]
            short = {**body, "episode_returns": [1.0]}
            bad = await http.post("/v1/collections/j/transitions", json=short)
            assert bad.status_code == 422 and "episode_returns" in bad.text
            text = {**body, "episode_returns": "x"}
            assert (await http.post("/v1/collections/j/transitions", json=text)).status_code == 422

    asyncio.run(run())
