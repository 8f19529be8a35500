"""FastAdam is torch's Adam with gradient clipping, only cheaper to call."""

from __future__ import annotations

import pytest
import torch

from agent.optim import FastAdam


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_matches_torch_adam_with_clipping(max_norm):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    fast = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    fast.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    fast_opt = FastAdam(list(fast.parameters()), lr=0.01)
    for step in range(20):
        x = torch.randn(8, 5)
        ref_loss = reference(x).pow(2).mean()
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm or float("inf"))
        ref_opt.step()
        fast_norm = fast_opt.step(fast(x).pow(2).mean(), max_norm)
        assert torch.allclose(ref_norm, fast_norm, rtol=1e-5)
    for a, b in zip(reference.parameters(), fast.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_state_dict_is_adams_and_round_trips():
    net = torch.nn.Linear(3, 2)
    opt = FastAdam(list(net.parameters()), lr=0.1)
    opt.step(net(torch.ones(4, 3)).sum(), None)
    state = opt.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and float(state["state"][0]["step"]) == 1.0
    other_net = torch.nn.Linear(3, 2)
    other_net.load_state_dict(net.state_dict())
    other = FastAdam(list(other_net.parameters()), lr=0.5)
    other.load_state_dict(state)
    assert other.lr == 0.1
    x = torch.randn(4, 3)
    opt.step(net(x).sum(), None)
    other.step(other_net(x).sum(), None)
    assert torch.allclose(net.weight, other_net.weight)


def test_the_public_fallback_steps_to_bitwise_the_same_weights():
    from agent.optim import PublicAdam

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fast, public = FastAdam(list(nets[0].parameters()), lr=0.01), PublicAdam(list(nets[1].parameters()), lr=0.01)
    for _ in range(10):
        x = torch.randn(8, 5)
        norms = [opt.step(net(x).pow(2).mean(), 0.05) for opt, net in zip((fast, public), nets)]
        assert torch.equal(norms[0], norms[1])
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in nets[1].parameters())  # no gradients left behind


def test_without_the_private_kernel_the_public_optimizer_is_used(monkeypatch):
    import agent.optim as optim

    params = list(torch.nn.Linear(3, 2).parameters())
    assert type(optim.make_adam(params, 0.01)) is FastAdam  # torch 2.13 has the kernel
    monkeypatch.setattr(optim, "private_kernel_available", lambda: False)
    assert type(optim.make_adam(params, 0.01)) is optim.PublicAdam
