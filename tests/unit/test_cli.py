"""lagent's user-facing behaviour: one-line errors, JSON output, run directories."""

from __future__ import annotations

import json
import sys

import pytest

from flows.cli import main

FAST = ["--set", "network.hidden_size=16", "--set", "train.learning_starts=50", "--no-progress"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--set", "train.gama=1"], "did you mean 'train.gamma'"),
        (["train", "--set", "train.gamma=high"], "train.gamma"),
        (["train", "--params", "/no/such/params.yaml"], "cannot read params file /no/such/params.yaml"),
        (["train", "--task", "Pendulum-v1"], "Discrete action space"),
        (["train", "--task", "NoSuchEnv-v3"], "unknown task 'NoSuchEnv-v3'"),
        (["train", "--timesteps", "many"], "invalid int value"),
        (["evaluate", "/no/such/run"], "does not exist"),
        (["frobnicate"], "invalid choice"),
        (["train", "--actors", "0"], "--actors must be at least 1"),
        (["train", "--actors", "2", "--resume", "runs/x"], "cannot be resumed yet"),
        (["train", "--task", "navigation", "--actors", "2", "--curriculum"], "the curriculum runs in one process"),
        (["train", "--actors", "2", "--learner-device", "tpu"], "invalid choice: 'tpu'"),
        (["train", "--actors", "2", "--set", "distributed.epsilon=2"], "distributed.epsilon"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lagent: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"\x80\x02garbage")
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "not a readable checkpoint" in err


def test_train_then_evaluate_with_json(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--task", "CartPole-v1", "--timesteps", "400", "--seed", "3", "--run-dir", str(run_dir),
                 "--eval-episodes", "2", "--json", *FAST]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["train"]["global_step"] == 400 and result["evaluation"]["episodes"] == 2
    assert (run_dir / "evaluation.json").is_file() and (run_dir / "summary.json").is_file()

    assert main(["evaluate", str(run_dir), "--episodes", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["episodes"] == 3 and report["checkpoint"].endswith("last.pt")

    # a second train into the same run dir must not silently overwrite it
    assert main(["train", "--run-dir", str(run_dir), "--timesteps", "10", *FAST]) == 2
    assert "--resume" in capsys.readouterr().err

    assert main(["train", "--resume", str(run_dir), "--timesteps", "600", "--eval-episodes", "0", "--json", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["train"]["global_step"] == 600
