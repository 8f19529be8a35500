"""Gymnasium envs trained as a user would (`lagent train --task ENV`) get settings that work
there: the env's tuned profile (rl-baselines3-zoo's) or robust defaults, announced at the start
and overridden by --set; the spec's Python API keeps the spec's values (issue 14, items 1 and 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.config import AUTO_BUFFER_MAX, ConfigError, load_config
from flows.cli import main

QUIET = ["--no-progress", "--eval-episodes", "0"]


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_known_env_trains_with_its_tuned_profile_and_says_so(tmp_path: Path, capsys) -> None:
    run = tmp_path / "acrobot"
    assert main(["train", "--task", "Acrobot-v1", "--timesteps", "600", "--run-dir", str(run), *QUIET]) == 0
    out = capsys.readouterr().out
    assert "using the tuned profile for Acrobot-v1" in out and "--set overrides it" in out
    saved = _config(run)
    assert saved["train"]["learning_rate"] == 0.00063 and saved["replay"]["local_buffer_size"] == 50_000
    assert saved["train"]["exploration"] == "linear" and saved["train"]["gradient_steps"] == 4


def test_an_env_nobody_tuned_gets_the_robust_defaults(tmp_path: Path, capsys) -> None:
    run = tmp_path / "taxi"
    assert main(["train", "--task", "FrozenLake-v1", "--timesteps", "1500", "--run-dir", str(run), *QUIET]) == 0
    assert "using the defaults for Gymnasium envs" in capsys.readouterr().out
    saved = _config(run)
    assert saved["replay"]["local_buffer_size"] == 1500  # auto: the whole step budget
    assert saved["train"]["exploration"] == "linear" and saved["train"]["max_steps_per_episode"] is None


def test_set_wins_over_the_profile(tmp_path: Path) -> None:
    run = tmp_path / "cartpole"
    assert main(["train", "--task", "CartPole-v1", "--timesteps", "300", "--run-dir", str(run),
                 "--set", "train.learning_rate=0.0001", "--set", "replay.local_buffer_size=777", *QUIET]) == 0
    saved = _config(run)
    assert saved["train"]["learning_rate"] == 0.0001 and saved["replay"]["local_buffer_size"] == 777
    assert saved["train"]["train_freq"] == 256  # the rest of CartPole's profile still applies


def test_the_python_api_keeps_the_specs_values() -> None:
    config = load_config(overrides=["train.task=Acrobot-v1"])
    assert config.replay.local_buffer_size == 1000 and config.train.exploration == "exponential"
    tuned = load_config(overrides=["train.task=Acrobot-v1"], gym_env=True)
    untuned = load_config(overrides=["train.task=Acrobot-v1"], gym_env=True, gym_tuned=False)
    assert tuned.replay.local_buffer_size == 50_000
    assert untuned.replay.local_buffer_size == untuned.train.total_timesteps  # the defaults' auto


def test_an_auto_buffer_is_bounded_and_a_bad_profile_is_an_error(tmp_path: Path) -> None:
    config = load_config(overrides=["replay.local_buffer_size=auto", "train.total_timesteps=50000000"])
    assert config.replay.local_buffer_size == AUTO_BUFFER_MAX
    bad = tmp_path / "bad.yaml"
    bad.write_text("gym_profiles:\n  Acrobot-v1:\n    train:\n      learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="gym_profiles.Acrobot-v1.*learning_rat"):
        load_config(bad)


def test_json_output_stays_one_object_after_the_note(tmp_path: Path, capsys) -> None:
    assert main(["train", "--task", "Acrobot-v1", "--timesteps", "300", "--run-dir", str(tmp_path / "r"),
                 "--json", *QUIET]) == 0
    captured = capsys.readouterr()
    assert "using the tuned profile" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["train"]["global_step"] == 300
