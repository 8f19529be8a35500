"""Crafted checkpoints: one line naming the file and the field, exit status 2, nothing huge built.

Each crafted file is a real checkpoint (a short CartPole run) with one field edited, read through
the real CLI in-process: ``lagent evaluate RUN`` and ``lagent train --resume RUN``.
"""

from __future__ import annotations

import collections
import io
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.checkpoint import MAX_LAYER_WIDTH, MAX_PARAMETERS
from agent.network import LearningNetwork
from flows.cli import main

FAST = ["--set", "network.hidden_size=16", "--set", "train.learning_starts=50", "--no-progress"]
COMMANDS = {
    "evaluate": lambda run: ["evaluate", str(run), "--episodes", "1", "--no-progress"],
    "resume": lambda run: ["train", "--resume", str(run), "--timesteps", "320", "--eval-episodes", "0", "--no-progress"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("crafted") / "run"
    argv = ["train", "--task", "CartPole-v1", "--timesteps", "300", "--seed", "3", "--run-dir", str(run),
            "--eval-episodes", "0", *FAST]
    assert main(argv) == 0
    return run


def _widen_input(d: dict[str, Any]) -> None:
    """A consistent 5-input network (weights, moments, buffer, observations): CartPole has 4."""
    agent = d["agent"]
    agent["architecture"]["input_dim"] = 5
    for net in ("q_network", "target_network"):
        agent[net]["body.0.weight"] = torch.zeros(16, 5)
    agent["optimizer"]["state"][0]["exp_avg"] = torch.zeros(16, 5)
    agent["optimizer"]["state"][0]["exp_avg_sq"] = torch.zeros(16, 5)
    del agent["buffer"]["data"]
    agent["buffer"]["obs_dim"] = 5
    d["trainer"]["obs"] = torch.zeros(1, 5)


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value(d[keys[-1]]) if callable(value) else value

    return edit


CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "input size disagrees with the task": (_widen_input, "agent.architecture.input_dim"),
    "q_network a string": (_set("agent", "q_network", value="weights"), "agent.q_network"),
    "trainer state a string": (_set("trainer", value="state"), "trainer"),
    "a list where an array belongs": (_set("trainer", "obs", value=lambda t: t.tolist()), "trainer.obs"),
    "a list of rewards": (_set("trainer", "episode_rewards", value=lambda t: t.tolist()), "trainer.episode_rewards"),
    "torch RNG state of the wrong shape": (
        _set("trainer", "torch_rng", value=torch.zeros(7, dtype=torch.uint8)), "trainer.torch_rng"
    ),
    "replay RNG state of the wrong shape": (
        _set("agent", "buffer", "generator", value=torch.zeros(3, 3, dtype=torch.uint8)), "agent.buffer.generator"
    ),
    "dropout RNG state a string": (_set("agent", "dropout_rng", value="seed"), "agent.dropout_rng"),
    "numpy RNG state garbled": (_set("agent", "rng", value={"bit_generator": "PCG64"}), "agent.rng"),
    "a billion units": (
        _set("agent", "architecture", "hidden_layers", value=[1_000_000_000]), "agent.architecture.hidden_layers"
    ),
    "too many parameters in allowed widths": (
        _set("agent", "architecture", "hidden_layers", value=[MAX_LAYER_WIDTH] * 3), "agent.architecture.hidden_layers"
    ),
    "wrong architecture": (_set("agent", "architecture", "hidden_layers", value=[32, 32]), "agent.q_network.body.0.weight"),
    "moments of the wrong shape": (
        _set("agent", "optimizer", "state", 2, "exp_avg", value=torch.zeros(3)), "agent.optimizer.state.2.exp_avg"
    ),
    "buffer data of the wrong shape": (
        _set("agent", "buffer", "data", "obs", value=torch.zeros(2, 4)), "agent.buffer.data.obs"
    ),
}


@pytest.fixture
def no_huge_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (instead of exhausting memory) if anything builds a network wider than the bound."""
    build = LearningNetwork.from_architecture.__func__  # type: ignore[attr-defined]

    def guarded(cls: type[LearningNetwork], arch: Any) -> LearningNetwork:
        widths = [arch.input_dim, *arch.hidden_layers, arch.output_dim]
        parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
        assert parameters <= MAX_PARAMETERS, f"built a network of {arch.hidden_layers} units"
        return build(cls, arch)

    monkeypatch.setattr(LearningNetwork, "from_architecture", classmethod(guarded))


def _crafted_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run, run / "checkpoints" / "last.pt"


def _one_line_error(capsys: pytest.CaptureFixture[str], checkpoint: Path, field: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lagent: error: ") and str(checkpoint) in err, err
    assert f": {field}" in err, err
    assert "weights_only" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_checkpoint_is_one_line_and_exit_2(
    case: str, command: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_huge_networks: None
) -> None:
    edit, field = CASES[case]
    run, checkpoint = _crafted_run(trained, tmp_path)
    document = torch.load(checkpoint, weights_only=True)
    edit(document)
    torch.save(document, checkpoint)
    capsys.readouterr()
    assert main(COMMANDS[command](run)) == 2
    _one_line_error(capsys, checkpoint, field)


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "content, says",
    [
        (b'{"agent": {"q_network": {}}}\n', "not a torch file"),
        (_npy_bytes(), "not a torch file"),
        (pickle.dumps(collections.OrderedDict(weights=[1.0, 2.0])), "a pickle file"),
    ],
    ids=["json", "npy", "pickle"],
)
def test_a_non_torch_or_pickle_file_never_quotes_torchs_advice(
    content: bytes, says: str, command: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = _crafted_run(trained, tmp_path)
    checkpoint.write_bytes(content)
    capsys.readouterr()
    assert main(COMMANDS[command](run)) == 2
    err = _one_line_error(capsys, checkpoint, "not a readable checkpoint")
    assert says in err


class Opaque:
    """Not a tensor or plain data: torch's weights-only reader refuses it."""


def test_a_torch_file_holding_objects_is_refused_without_torchs_advice(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = _crafted_run(trained, tmp_path)
    document = torch.load(checkpoint, weights_only=True)
    document["agent"]["rng"] = Opaque()
    torch.save(document, checkpoint)
    capsys.readouterr()
    assert main(COMMANDS["evaluate"](run)) == 2
    err = _one_line_error(capsys, checkpoint, "not a readable checkpoint")
    assert "Opaque" in err


def test_checkpoints_the_current_code_writes_still_load(trained: Path, tmp_path: Path) -> None:
    from agent import TrainingManager

    run, checkpoint = _crafted_run(trained, tmp_path)
    trainer = TrainingManager.from_checkpoint(checkpoint, tensorboard=False)
    assert trainer.global_step == 300 and trainer.agent.architecture.hidden_layers == (16, 16)
    trainer.save_checkpoint(tmp_path / "model_only.pt", include_run_state=False)  # as best_model.pt
    trainer.close()
    TrainingManager.from_checkpoint(tmp_path / "model_only.pt", tensorboard=False).close()
    assert main(COMMANDS["resume"](run)) == 0
