"""The export stage of a network that normalises observations: the ONNX model and the MLflow
pytorch model apply the same standardisation as the network, and the stage's numerical check
runs on states at the observations' own scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agent import LearningAgent, NetworkArchitecture, TrainingManager
from agent.config import load_config
from agent.network import LearningNetwork
from flows.settings import Layout, load_settings
from flows.stages import export_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("export")
    config = load_config(overrides=[
        "train.task=CartPole-v1", "run.seed=2", "train.learning_starts=100", "train.batch_size=16",
        "train.max_episodes=null", "train.total_timesteps=600",
    ])
    arch = NetworkArchitecture(4, 2, (32, 32), normalize_obs=True)
    agent = LearningAgent(4, 2, config=config, architecture=arch)
    trainer = TrainingManager(agent, task_type="CartPole-v1", tensorboard=False)
    trainer.run()
    layout = Layout(root)
    layout.final_model.parent.mkdir(parents=True)
    trainer.save_checkpoint(layout.final_model, include_run_state=False)
    trainer.close()
    return root, export_model(load_settings(), layout)


def _network(root: Path) -> LearningNetwork:
    saved = torch.load(root / "models" / "export" / "policy_state.pt", weights_only=True)
    network = LearningNetwork.from_architecture(NetworkArchitecture.from_dict(saved["architecture"]))
    network.load_state_dict(saved["state_dict"])
    return network.eval()


def test_the_onnx_model_standardises_as_the_network_does(exported) -> None:
    import onnxruntime

    root, result = exported
    network = _network(root)
    stats = network.obs_norm
    assert stats is not None and stats.count.item() == 600
    assert result.metrics["onnx_max_abs_diff"] <= load_settings().export.onnx_tolerance
    # The stage checked states at the observations' scale (mostly inside the clip), not N(0, 1).
    example = torch.from_numpy(result.extras["input_example"])
    standardised = ((example - stats.shift) * stats.scale).abs()
    assert (standardised < 10).float().mean() > 0.95
    rng = np.random.default_rng(0)
    spread = np.sqrt(stats.var.numpy())
    states = (stats.mean.numpy() + 3 * spread * rng.normal(size=(37, 4))).astype(np.float32)
    onnx_path = root / "models" / "export" / "policy.onnx"
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_q,) = session.run(None, {"state": states})
    with torch.no_grad():
        torch_q = network(torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(onnx_q, torch_q, atol=1e-5)
    plain = LearningNetwork(4, 2, hidden_layers=(32, 32))
    plain.load_state_dict({k: v for k, v in network.state_dict().items() if not k.startswith("obs_norm.")})
    with torch.no_grad():
        assert not np.allclose(onnx_q, plain(torch.from_numpy(states)).numpy(), atol=1e-3)
    assert "standardises raw observations" in (root / "models" / "export" / "model_card.md").read_text()


def test_the_mlflow_pytorch_model_standardises_as_the_network_does(exported, tmp_path: Path) -> None:
    import mlflow.pytorch

    _, result = exported
    network, example = result.extras["network"], result.extras["input_example"]
    mlflow.pytorch.save_model(network, tmp_path / "policy", input_example=example, pip_requirements=["torch"])
    loaded = mlflow.pytorch.load_model(str(tmp_path / "policy"))
    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(example)), network(torch.from_numpy(example)))
    assert torch.equal(loaded.obs_norm.mean, network.obs_norm.mean)
