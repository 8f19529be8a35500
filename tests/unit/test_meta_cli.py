"""``lagent optimize`` and ``lagent adapt``: results a user can apply, and one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from agent.config import load_config
from flows.cli import main

SMALL = ["--set", "train.learning_starts=64", "--set", "meta.eval_interval=150", "--set", "meta.eval_episodes=2",
         "--set", "meta.n_startup_trials=1", "--no-progress"]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_optimize_writes_params_a_training_run_can_use(tmp_path, capsys):
    out = tmp_path / "search"
    argv = ["optimize", "--task", "CartPole-v1", "--trials", "2", "--timesteps", "300", "--storage",
            f"sqlite:///{tmp_path / 's.db'}", "--study", "cli", "--out", str(out), "--json", *SMALL]
    assert main(argv) == 0
    result = last_json(capsys)
    assert result["study_name"] == "cli/CartPole-v1/hyperparameters" and result["trials_run"] == 2
    assert {"optimization_history", "param_importances", "best_params", "trials"} <= set(result["artifacts"])
    for name in ("best_params.yaml", "result.json", "trials.csv", "optimization_history.html", "plotly.min.js"):
        assert (out / name).is_file(), name
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert best["train"]["learning_rate"] == result["best_params"]["learning_rate"]
    assert load_config(out / "best_params.yaml").train.gamma == result["best_params"]["gamma"]

    run_dir = tmp_path / "run"
    assert main(["train", "--params", str(out / "best_params.yaml"), "--timesteps", "100", "--eval-episodes", "0",
                 "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == result["best_params"]["batch_size"]

    assert main(argv) == 0  # the same study resumes
    assert last_json(capsys)["trials_total"] == 4


def test_optimize_architecture_writes_the_network_shape(tmp_path, capsys):
    out = tmp_path / "arch"
    assert main(["optimize", "--kind", "architecture", "--task", "CartPole-v1", "--trials", "2", "--timesteps", "300",
                 "--storage", f"journal:{tmp_path / 'j.log'}", "--out", str(out), "--no-plots", "--json", *SMALL]) == 0
    result = last_json(capsys)
    layers = result["best_architecture"]["hidden_layers"]
    assert load_config(out / "best_params.yaml").network.hidden_layers == tuple(layers)


def test_adapt_reports_adapted_and_scratch_rewards(tmp_path, capsys):
    source = tmp_path / "nav"
    assert main(["train", "--task", "navigation", "--timesteps", "200", "--eval-episodes", "0", "--run-dir", str(source),
                 "--set", "network.hidden_size=32", "--set", "train.learning_starts=50", "--no-progress"]) == 0
    capsys.readouterr()
    target = tmp_path / "explore"
    assert main(["adapt", "--source", str(source), "--task", "exploration", "--timesteps", "200", "--eval-episodes", "2",
                 "--run-dir", str(target), "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["target_task"] == "exploration@beginner" and report["timesteps"] == 200
    assert report["reinitialized"] == ["body.0", "head"] and report["transferred"] == ["body.2"]
    assert isinstance(report["adapted_reward"], float) and isinstance(report["scratch_reward"], float)
    assert "from scratch" in captured.err  # the table goes to stderr under --json
    assert (target / "checkpoints" / "last.pt").is_file() and (target / "adaptation.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "--kind", "everything"], "invalid choice: 'everything'"),
        (["optimize", "--trials", "0"], "--trials must be at least 1"),
        (["optimize", "--storage", "nonsense"], "is not a URL"),
        (["optimize", "--storage", "bogus://x/y"], "cannot use storage"),
        (["optimize", "--task", "NoSuchEnv-v3"], "unknown task 'NoSuchEnv-v3'"),
        (["optimize", "--set", "meta.pruner=sometimes"], "meta.pruner"),
        (["optimize", "--set", "meta.n_trails=3"], "did you mean 'meta.n_trials'"),
        (["adapt", "--source", "/no/such/run", "--task", "navigation"], "does not exist"),
        (["adapt", "--task", "navigation"], "the following arguments are required: --source"),
        (["adapt", "--source", ".", "--task", "navigation"], "holds no checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lagent: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_adapt_to_an_unknown_task_is_one_line(tmp_path, capsys):
    source = tmp_path / "cart"
    assert main(["train", "--task", "CartPole-v1", "--timesteps", "50", "--eval-episodes", "0", "--run-dir", str(source),
                 "--set", "network.hidden_size=16", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["adapt", "--source", str(source), "--task", "navigation_sideways"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'navigation_sideways'" in err and len(err.splitlines()) == 1
