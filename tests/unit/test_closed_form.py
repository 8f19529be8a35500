"""The closed-form TD update computes exactly what autograd computes, and trains the same."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from agent import LearningAgent
from agent.closed_form import ClosedFormTD
from agent.config import load_config
from agent.network import LearningNetwork
from agent.replay import Transitions


def _agent(closed_form: bool) -> LearningAgent:
    overrides = {"closed_form_update": closed_form, "target_update_interval": 1000}
    return LearningAgent(5, 3, hidden_size=24, batch_size=16, seed=3, train_overrides=overrides)


def _fill(agent: LearningAgent, n: int = 200) -> None:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 5)).astype(np.float32)
    dones = (rng.random(n) < 0.2).astype(np.float32)
    rewards = (3 * rng.normal(size=n)).astype(np.float32)  # TD errors on both sides of Huber's knee
    asyncio.run(agent.store_experience(obs, rng.integers(0, 3, n), rewards, obs[::-1].copy(), dones))


def _shift_target(agent: LearningAgent) -> None:
    """The same perturbation for every agent: a target network that differs from the online one."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in agent.target_network.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("loss", ["huber", "mse"])
def test_gradients_equal_autograd(activation: str, double_dqn: bool, loss: str) -> None:
    torch.manual_seed(0)
    online = LearningNetwork(6, 4, hidden_layers=(16, 8, 12), activation=activation)
    target = LearningNetwork(6, 4, hidden_layers=(16, 8, 12), activation=activation)
    batch_size = 32
    agent = LearningAgent(6, 4, hidden_size=8, train_overrides={"double_dqn": double_dqn, "loss": loss})
    agent.learner.q_network, agent.learner.target_network = online, target
    obs, next_obs = torch.randn(batch_size, 6), torch.randn(batch_size, 6)
    batch = Transitions(obs, torch.randint(0, 4, (batch_size,)), 3 * torch.randn(batch_size), next_obs,
                        (torch.rand(batch_size) < 0.3).float())
    weights = torch.rand(batch_size)

    expected_loss, expected_q, _ = agent.learner.td_loss(batch, gamma=0.9)
    expected = torch.autograd.grad((expected_loss * weights).sum(), list(online.parameters()))

    closed = ClosedFormTD(online, target, double_dqn=double_dqn, loss=loss)
    per_sample, q_taken, _, grads = closed.step(batch, 0.9, weights)
    assert torch.allclose(per_sample, expected_loss.detach(), atol=1e-6)
    assert torch.allclose(q_taken, expected_q.detach(), atol=1e-6)
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_training_with_either_path_ends_with_the_same_weights() -> None:
    closed, autograd = _agent(True), _agent(False)
    assert closed.learner.uses_closed_form and not autograd.learner.uses_closed_form
    for agent in (closed, autograd):
        _fill(agent)
        _shift_target(agent)
    closed_stats = asyncio.run(closed.learn_from_experiences(gradient_steps=50))
    autograd_stats = asyncio.run(autograd.learn_from_experiences(gradient_steps=50))
    for key in ("loss", "loss_local", "q_mean", "grad_norm"):
        assert closed_stats[key] == pytest.approx(autograd_stats[key], rel=1e-4), key
    for a, b in zip(closed.q_network.parameters(), autograd.q_network.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert closed.training_steps == autograd.training_steps == 50


def test_networks_without_a_closed_form_use_autograd() -> None:
    assert LearningAgent(4, 2, hidden_size=8).learner.uses_closed_form  # the default MLP: fast path
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(64, 4)).astype(np.float32)
    for override in ("network.dueling=true", "network.dropout=0.1", "network.activation=elu"):
        agent = LearningAgent(4, 2, config=load_config(overrides=[override, "network.hidden_size=8"]))
        assert not agent.learner.uses_closed_form, override
        asyncio.run(agent.store_experience(obs, rng.integers(0, 2, 64), rng.normal(size=64), obs, np.zeros(64)))
        assert asyncio.run(agent.learn_from_experiences(gradient_steps=2)) is not None
