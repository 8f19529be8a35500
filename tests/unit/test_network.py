from __future__ import annotations

import pytest
import torch

from agent import LearningNetwork, NetworkArchitecture


def test_spec_form_has_256_unit_relu_hidden_layers():
    net = LearningNetwork(input_size=8, output_size=4)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [256, 256, 4]
    assert any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    assert net(torch.zeros(5, 8)).shape == (5, 4)


@pytest.mark.parametrize("dueling", [False, True])
def test_architecture_builds_the_described_network(dueling):
    arch = NetworkArchitecture(6, 3, hidden_layers=(64, 32, 16), activation="tanh", dropout=0.1, dueling=dueling)
    net = LearningNetwork.from_architecture(arch)
    assert net.architecture == arch
    hidden = [m.out_features for m in net.body if isinstance(m, torch.nn.Linear)]
    assert hidden == [64, 32, 16]
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.modules()) == 3
    assert net(torch.randn(7, 6)).shape == (7, 3)
    assert net.features(torch.randn(2, 6)).shape == (2, 16)


def test_dueling_head_centres_advantages():
    net = LearningNetwork(4, 3, hidden_size=8, dueling=True)
    x = torch.randn(10, 4)
    hidden = net.features(x)
    q = net(x)
    value = net.value_head(hidden)
    assert torch.allclose(q.mean(dim=1, keepdim=True), value, atol=1e-6)


def test_architecture_round_trips_through_a_dict():
    arch = NetworkArchitecture(3, 2, hidden_layers=(10, 20), activation="elu")
    assert NetworkArchitecture.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_dim=0, output_dim=2), "input_dim"),
        (dict(input_dim=2, output_dim=2, hidden_layers=()), "hidden_layers"),
        (dict(input_dim=2, output_dim=2, hidden_layers=(8, 0)), "hidden_layers"),
        (dict(input_dim=2, output_dim=2, activation="sigmoidish"), "activation"),
        (dict(input_dim=2, output_dim=2, dropout=1.0), "dropout"),
    ],
)
def test_invalid_architectures_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkArchitecture(**kwargs)


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu", "elu", "silu"])
@pytest.mark.parametrize("dueling", [False, True])
def test_numpy_policy_matches_the_network_and_follows_updates(activation, dueling):
    import numpy as np

    from agent.network import NumpyPolicy

    net = LearningNetwork(5, 3, hidden_layers=(16, 8), activation=activation, dueling=dueling)
    policy = NumpyPolicy(net)
    states = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(states)).numpy()
    assert np.allclose(policy(states), expected, atol=1e-5)
    with torch.no_grad():  # in-place updates (optimizer, load_state_dict) are seen at once
        for p in net.parameters():
            p.mul_(1.5).add_(0.1)
        net.load_state_dict({k: v * 0.9 for k, v in net.state_dict().items()})
        expected = net(torch.from_numpy(states)).numpy()
    assert np.allclose(policy(states), expected, atol=1e-5)
