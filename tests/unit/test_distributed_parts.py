"""The Ape-X parts without Ray: per-actor exploration, initial priorities, the learner's calls."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from agent.distributed import PrioritizingSink, apex_epsilons
from agent.network import LearningNetwork, NetworkArchitecture
from agent.policy import EpsilonGreedy


def test_apex_epsilons_fall_from_epsilon_to_epsilon_to_the_one_plus_alpha() -> None:
    assert apex_epsilons(1) == [0.4]
    eps = apex_epsilons(8, 0.4, 7.0)
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4**8)
    assert eps[3] == pytest.approx(0.4 ** (1 + 7 * 3 / 7))
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert apex_epsilons(4, 0.3, 0.0) == [0.3] * 4
    with pytest.raises(ValueError, match="actors must be >= 1"):
        apex_epsilons(0)


class Recorder:
    """A Memory client that keeps what it is asked to write."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[np.ndarray, ...], dict[str, Any]]] = []

    def write_transitions(self, *columns: np.ndarray, **kwargs: Any) -> None:
        self.calls.append((columns, kwargs))


def test_an_actor_sends_a_rollout_in_one_batch_with_its_td_errors_as_priorities() -> None:
    torch.manual_seed(0)
    network = LearningNetwork.from_architecture(NetworkArchitecture(4, 2, (8,)))
    policy = EpsilonGreedy(network, np.random.default_rng(0))
    client = Recorder()
    sink = PrioritizingSink(client, policy, gamma=0.9)
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(3):  # three vector steps of 2 envs
        step = (
            rng.normal(size=(2, 4)).astype(np.float32),
            rng.integers(0, 2, 2),
            rng.normal(size=2).astype(np.float32),
            rng.normal(size=(2, 4)).astype(np.float32),
            np.array([0.0, 1.0], np.float32),
        )
        steps.append(step)
        sink.add(*step)
    assert client.calls == []  # held until the rollout ends
    assert sink.flush() == 6 and sink.flush() == 0
    (columns, kwargs), = client.calls
    obs, actions, rewards, next_obs, dones = (np.concatenate(c) for c in zip(*steps))
    np.testing.assert_array_equal(columns[0], obs)
    with torch.no_grad():
        q = network(torch.from_numpy(obs)).numpy()
        q_next = network(torch.from_numpy(next_obs)).numpy()
    td = rewards + 0.9 * (1 - dones) * q_next.max(axis=1) - q[np.arange(6), actions]
    np.testing.assert_allclose(kwargs["priorities"], np.abs(td) + 1e-6, rtol=1e-5, atol=1e-6)
    assert (kwargs["priorities"] > 0).all()


def test_trials_are_shared_out_evenly_over_at_most_as_many_workers_as_trials() -> None:
    from agent.meta.ray_trials import shares

    assert shares(8, 3) == [3, 3, 2]
    assert shares(2, 5) == [1, 1]
    assert shares(5, 1) == [5]
    assert sum(shares(17, 4)) == 17
