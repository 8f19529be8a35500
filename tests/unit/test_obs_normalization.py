"""Observation normalisation (``network.normalize_obs``): running statistics kept in the network,
applied by every route that evaluates it, saved with it, and updated only while training."""

from __future__ import annotations

import pickle
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from agent import LearningAgent, NetworkArchitecture, TrainingManager
from agent.checkpoint import load_checkpoint_file
from agent.closed_form import ClosedFormTD
from agent.config import load_config
from agent.network import (
    OBS_CLIP,
    OBS_EPSILON,
    LearningNetwork,
    NumpyPolicy,
    ObsNormalizer,
    combine_moments,
    normalize_obs,
)
from agent.policy import EpsilonGreedy
from agent.replay import Transitions


def _observations(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Observations far from standard: offsets and scales over five orders of magnitude."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-50, 50, size=dim)
    spread = 10.0 ** rng.uniform(-2, 2, size=dim)
    return (offset + spread * rng.normal(size=(n, dim))).astype(np.float32)


def _fed(network: LearningNetwork, obs: np.ndarray, *sharing: LearningNetwork) -> LearningNetwork:
    for rows in np.array_split(obs, 7):
        network.update_obs_stats(rows, *sharing)
    return network


def test_running_statistics_equal_numpy_over_the_same_stream() -> None:
    net = LearningNetwork(5, 2, hidden_size=8, normalize_obs=True)
    stream = _observations(1000, 5)
    sizes = [1, 2, 3, 50, 0, 7, 300, 1]
    start = 0
    for size in sizes:
        net.update_obs_stats(stream[start:start + size])
        start += size
    net.update_obs_stats(stream[start])  # one observation, unbatched
    start += 1
    net.update_obs_stats(torch.from_numpy(stream[start:]))  # and the rest as a tensor
    stats = net.obs_norm
    assert stats is not None and stats.count.item() == len(stream)
    seen = stream.astype(np.float64)
    np.testing.assert_allclose(stats.mean.numpy(), seen.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), seen.var(axis=0), rtol=1e-10)
    assert stats.mean.dtype == stats.var.dtype == torch.float64
    np.testing.assert_array_equal(stats.shift.numpy(), seen.mean(axis=0).astype(np.float32))
    np.testing.assert_allclose(stats.scale.numpy(), 1 / np.sqrt(seen.var(axis=0) + OBS_EPSILON), rtol=1e-6)


def test_the_parallel_update_is_the_same_for_torch_tensors() -> None:
    """What a network on an accelerator runs: the same combination, in torch."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(3, 2, size=(40, 4)), rng.normal(-1, 5, size=(9, 4))
    numpy_result = combine_moments(a.mean(0), a.var(0), 40.0, b.mean(0), b.var(0), 9)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_result = combine_moments(
        ta.mean(0), ta.var(0, correction=0), torch.tensor(40.0, dtype=torch.float64),
        tb.mean(0), tb.var(0, correction=0), 9,
    )
    both = np.concatenate([a, b])
    for got in (numpy_result, tuple(t.numpy() for t in torch_result)):
        np.testing.assert_allclose(got[0], both.mean(0), rtol=1e-12)
        np.testing.assert_allclose(got[1], both.var(0), rtol=1e-12)
        assert float(got[2]) == 49


def test_the_torch_route_gives_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route a network off the CPU takes (torch ops on the device), run here on the CPU."""
    stream = _observations(500, 6)
    numpy_route = _fed(LearningNetwork(6, 3, hidden_size=8, normalize_obs=True), stream)
    monkeypatch.setattr(ObsNormalizer, "_numpy_views", lambda self: None)
    torch_route = _fed(LearningNetwork(6, 3, hidden_size=8, normalize_obs=True), stream)
    for name, value in numpy_route.obs_norm.state_dict().items():
        tolerance = 1e-12 if value.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(torch_route.obs_norm.state_dict()[name], value, rtol=tolerance, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_statistics_on_a_gpu_equal_those_on_the_cpu() -> None:
    stream = _observations(500, 6)
    cpu = _fed(LearningNetwork(6, 3, hidden_size=8, normalize_obs=True), stream)
    gpu = _fed(LearningNetwork(6, 3, hidden_size=8, normalize_obs=True).cuda(), stream)
    for name, value in cpu.obs_norm.state_dict().items():  # float64 statistics, float32 shift/scale
        tolerance = 1e-12 if value.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(gpu.obs_norm.state_dict()[name].cpu(), value, rtol=tolerance, atol=0)
    x = torch.from_numpy(stream[:20])
    gpu.load_state_dict(cpu.state_dict())
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-5, atol=1e-5)


def test_forward_and_features_standardise_then_clip() -> None:
    torch.manual_seed(0)
    stream = _observations(400, 5)
    net = _fed(LearningNetwork(5, 3, hidden_layers=(16, 8), normalize_obs=True), stream)
    plain = LearningNetwork(5, 3, hidden_layers=(16, 8))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("obs_norm.")})
    x = torch.from_numpy(np.concatenate([stream[:10], stream[:2] * 100]))  # some far out: clipped
    mean, std = stream.astype(np.float64).mean(0), np.sqrt(stream.astype(np.float64).var(0) + OBS_EPSILON)
    expected = torch.from_numpy(np.clip((x.numpy() - mean) / std, -OBS_CLIP, OBS_CLIP)).float()
    normalised = normalize_obs(x, *net.normalization())
    torch.testing.assert_close(normalised, expected, rtol=1e-5, atol=1e-5)
    assert normalised.abs().max().item() == OBS_CLIP
    with torch.no_grad():
        assert torch.equal(net(x), plain(normalised))
        assert torch.equal(net.features(x), plain.features(normalised))


def test_copies_update_their_own_statistics() -> None:
    """A deep copy or an unpickled network (an MLflow model) keeps counting in its own buffers."""
    stream = _observations(90, 3)
    net = _fed(LearningNetwork(3, 2, hidden_size=8, normalize_obs=True), stream[:30])
    for copy in (deepcopy(net), pickle.loads(pickle.dumps(net))):
        copy.update_obs_stats(stream[30:])
        assert copy.obs_norm.count.item() == 90 and net.obs_norm.count.item() == 30
        np.testing.assert_allclose(copy.obs_norm.mean.numpy(), stream.astype(np.float64).mean(0), rtol=1e-12)
        assert torch.equal(copy.obs_norm.shift, copy.obs_norm.mean.float())


def test_an_unfed_network_is_the_identity_up_to_the_clip() -> None:
    net = LearningNetwork(3, 2, hidden_size=8, normalize_obs=True)
    x = torch.tensor([[0.5, -2.0, 30.0]])
    assert torch.equal(normalize_obs(x, *net.normalization()), torch.tensor([[0.5, -2.0, OBS_CLIP]]))


@pytest.mark.parametrize("activation", ["relu", "tanh", "silu"])
@pytest.mark.parametrize("dueling", [False, True])
def test_numpy_policy_matches_the_network_and_follows_new_statistics(activation: str, dueling: bool) -> None:
    torch.manual_seed(1)
    arch = NetworkArchitecture(4, 3, (16, 8), activation=activation, dueling=dueling, normalize_obs=True)
    net = LearningNetwork.from_architecture(arch)
    policy = NumpyPolicy(net)
    stream = _observations(300, 4, seed=2)
    states = stream[:25]
    for step in range(3):  # fed between calls: the policy reads the live statistics
        _fed(net, stream[100 * step:100 * step + 100])
        with torch.no_grad():
            expected = net(torch.from_numpy(states)).numpy()
        np.testing.assert_allclose(policy(states), expected, rtol=1e-5, atol=1e-5)
    greedy = EpsilonGreedy(net, np.random.default_rng(0))
    np.testing.assert_array_equal(greedy.greedy(states), expected.argmax(axis=1))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("loss", ["huber", "mse"])
def test_closed_form_gradients_equal_autograd_on_a_normalising_network(
    activation: str, double_dqn: bool, loss: str
) -> None:
    torch.manual_seed(0)
    arch = NetworkArchitecture(6, 4, hidden_layers=(16, 12), activation=activation, normalize_obs=True)
    train = {"double_dqn": double_dqn, "loss": loss, "closed_form_update": False}
    agent = LearningAgent(6, 4, architecture=arch, train_overrides=train)
    online, target = agent.q_network, agent.target_network
    stream = _observations(600, 6, seed=3)
    _fed(online, stream, target)
    assert target.obs_norm is online.obs_norm
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    n = 32
    batch = Transitions(
        torch.from_numpy(stream[:n]), torch.randint(0, 4, (n,)), 3 * torch.randn(n),
        torch.from_numpy(stream[n:2 * n]), (torch.rand(n) < 0.3).float(),
    )
    weights = torch.rand(n)
    expected_loss, expected_q, expected_td = agent.learner.td_loss(batch, gamma=0.9)
    expected = torch.autograd.grad((expected_loss * weights).sum(), list(online.parameters()))

    per_sample, q_taken, td, grads = ClosedFormTD(online, target, double_dqn, loss).step(batch, 0.9, weights)
    torch.testing.assert_close(per_sample, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_taken, expected_q.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td, expected_td, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The normalisation mattered: a plain network with the same weights computes other gradients.
    plain_online, plain_target = LearningNetwork(6, 4, hidden_layers=(16, 12), activation=activation), \
        LearningNetwork(6, 4, hidden_layers=(16, 12), activation=activation)
    plain_online.load_state_dict({k: v for k, v in online.state_dict().items() if "obs_norm" not in k})
    plain_target.load_state_dict({k: v for k, v in target.state_dict().items() if "obs_norm" not in k})
    plain = ClosedFormTD(plain_online, plain_target, double_dqn, loss).step(batch, 0.9, weights)[3]
    assert not torch.allclose(plain[0], grads[0])


def test_the_target_shares_the_online_statistics() -> None:
    agent = LearningAgent(4, 2, architecture=NetworkArchitecture(4, 2, (8,), normalize_obs=True))
    online, target = agent.q_network, agent.target_network
    online.update_obs_stats(_observations(50, 4), target)
    assert target.obs_norm is online.obs_norm
    assert list(target.parameters())[0] is not list(online.parameters())[0]  # weights stay apart
    before = online.obs_norm.mean.clone()
    snapshot = {k: v.clone() for k, v in online.state_dict().items()}
    online.update_obs_stats(_observations(50, 4, seed=9))
    assert not torch.equal(target.obs_norm.mean, before)
    online.load_state_dict(snapshot)  # restoring the best weights restores the target's view too
    assert torch.equal(target.obs_norm.mean, before)
    with pytest.raises(ValueError, match="both normalise"):
        LearningNetwork(4, 2, hidden_size=8).share_obs_stats(online)


def test_without_the_option_the_network_is_as_before() -> None:
    net = LearningNetwork(4, 2, hidden_size=8)
    assert net.obs_norm is None and net.normalization() is None
    assert all(not k.startswith("obs_norm") for k in net.state_dict())
    assert "normalize_obs" not in net.architecture.to_dict()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.update_obs_stats(_observations(10, 4))  # nothing to update
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    arch = NetworkArchitecture(4, 2, normalize_obs=True)
    assert arch.to_dict()["normalize_obs"] is True
    assert NetworkArchitecture.from_dict(arch.to_dict()) == arch


def test_a_policy_snapshot_and_a_pickled_module_carry_the_statistics() -> None:
    """An actor's snapshot (state dict) and the MLflow model (the pickled module) normalise alike."""
    net = _fed(LearningNetwork(4, 3, hidden_size=16, normalize_obs=True), _observations(200, 4))
    states = _observations(30, 4, seed=5)
    snapshot = EpsilonGreedy.from_state(net.architecture.to_dict(), net.state_dict(), seed=0)
    live = EpsilonGreedy(net, np.random.default_rng(0))
    np.testing.assert_array_equal(snapshot.greedy(states), live.greedy(states))
    copy = pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        assert torch.equal(copy(torch.from_numpy(states)), net(torch.from_numpy(states)))


def test_the_config_key_is_validated() -> None:
    assert load_config().network.normalize_obs is False
    assert load_config(overrides=["network.normalize_obs=true"]).network.normalize_obs is True
    with pytest.raises(ValueError, match="normalize_obs"):
        load_config(overrides=["network.normalize_obs=sometimes"])


def test_the_config_key_builds_a_normalising_agent() -> None:
    agent = LearningAgent(4, 2, config=load_config(overrides=["network.normalize_obs=true"]))
    assert agent.architecture.normalize_obs
    assert agent.q_network.obs_norm is not None


# --------------------------------------------------------------------------- training and checkpoints


def _trainer(run_dir: Path, steps: int, **train: object) -> TrainingManager:
    config = load_config(overrides=[
        "train.task=CartPole-v1", "run.seed=5", "network.hidden_size=32", "train.learning_starts=100",
        "train.batch_size=16", "train.max_episodes=null", f"train.total_timesteps={steps}",
        "train.log_interval=500", "train.train_freq=2", "train.checkpoint_frequency=1000000",
    ])
    arch = NetworkArchitecture(4, 2, hidden_layers=(32, 32), normalize_obs=True)
    agent = LearningAgent(4, 2, config=config, architecture=arch)
    return TrainingManager(
        agent, task_type="CartPole-v1", run_dir=run_dir, tensorboard=False, training_config=train
    )


def test_training_feeds_the_statistics_and_evaluation_does_not(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, 600, num_envs=2)
    trainer.run()
    stats = trainer.agent.q_network.obs_norm
    assert stats is not None and trainer.agent.target_network.obs_norm is stats
    assert stats.count.item() == 600  # 300 vector steps of 2 copies, each acted on once
    assert 0.0 < stats.var.min().item() and stats.scale.max().item() < 1 / OBS_EPSILON
    before = {k: v.clone() for k, v in stats.state_dict().items()}
    trainer.run_evaluation(num_episodes=3)
    assert all(torch.equal(v, before[k]) for k, v in stats.state_dict().items())
    trainer.close()


def test_a_checkpoint_keeps_the_statistics(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, 400)
    trainer.run()
    path = tmp_path / "checkpoints" / "last.pt"
    saved = trainer.agent.q_network.state_dict()
    document = load_checkpoint_file(path)  # the schema checks accept the statistics' buffers
    assert document["agent"]["architecture"]["normalize_obs"] is True
    for name in ("count", "mean", "var", "shift", "scale"):
        key = f"obs_norm.{name}"
        assert torch.equal(document["agent"]["q_network"][key], saved[key])
        assert torch.equal(document["agent"]["target_network"][key], saved[key])
    trainer.close()
    restored = TrainingManager.from_checkpoint(path, tensorboard=False)
    online, target = restored.agent.q_network, restored.agent.target_network
    assert restored.agent.architecture.normalize_obs
    for key, value in saved.items():
        assert torch.equal(online.state_dict()[key], value), key
    assert torch.equal(target.obs_norm.mean, online.obs_norm.mean)
    restored.close()


def test_resume_is_exact_with_normalisation(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = _trainer(straight, 1600)
    first.run()
    first.close()
    half = _trainer(split, 800)
    half.run()
    half.close()
    resumed = TrainingManager.from_checkpoint(
        split / "checkpoints" / "last.pt", run_dir=split, tensorboard=False
    )
    resumed.run(total_timesteps=1600)
    resumed.close()
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["agent"]
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["agent"]
    assert a["training_steps"] == b["training_steps"] > 0
    assert a["q_network"]["obs_norm.count"].item() == 1600
    for network in ("q_network", "target_network"):
        for name, value in a[network].items():
            assert torch.equal(value, b[network][name]), f"{network}.{name}"
    assert (straight / "episodes.csv").read_text() == (split / "episodes.csv").read_text()
