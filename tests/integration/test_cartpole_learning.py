"""The learning core, end to end through the CLI: it learns (on CartPole, with its profile, and on an
env nobody tuned, with the defaults), and a resumed run is the same run."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main

pytestmark = pytest.mark.slow


def test_cartpole_learns_from_the_cli(tmp_path, capsys):
    # The tuned profile (3-step returns) with under a third of its step budget: enough to balance the pole.
    run_dir = tmp_path / "cartpole"
    code = main(["train", "--params", "configs/cartpole.yaml", "--timesteps", "15000", "--seed", "1",
                 "--run-dir", str(run_dir), "--eval-episodes", "10", "--json", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train"]["global_step"] == 15_000
    assert result["evaluation"]["mean_reward"] >= 195.0
    assert (run_dir / "checkpoints" / "best_model.pt").is_file()


@pytest.fixture()
def acrobot_nobody_tuned() -> str:
    """Acrobot under an id params.yaml has no profile for: what an env the project never saw gets."""
    import gymnasium as gym

    env_id = "AcrobotNobodyTuned-v1"
    if env_id not in gym.envs.registration.registry:
        gym.register(env_id, entry_point="gymnasium.envs.classic_control.acrobot:AcrobotEnv", max_episode_steps=500)
    return env_id


def test_an_env_nobody_tuned_learns_with_the_defaults(acrobot_nobody_tuned, tmp_path, capsys):
    # gym_profiles.default (3-step returns, a linearly falling rate), stopping at the first
    # 10-episode evaluation at -90: seeds 0-3 stopped at 10k-12.5k of the 15k budget and a fresh
    # 20-episode evaluation gave -107.5, -94.4, -81.6 and -77.0 (stopping at -100 instead left
    # seed 2 at -122.6). The earlier defaults (1-step returns, a constant rate) never reached -90
    # and ended at -500 on seed 2, a random policy's score (-100 is Acrobot's "solved").
    run_dir = tmp_path / "acrobot"
    code = main(["train", "--task", acrobot_nobody_tuned, "--timesteps", "15000", "--seed", "2",
                 "--set", "train.eval_frequency=2500", "--set", "train.stop_at_reward=-90",
                 "--run-dir", str(run_dir), "--eval-episodes", "20", "--json", "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert "using the defaults for Gymnasium envs" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["train"]["reached_reward"] is not None, result["train"]
    assert result["evaluation"]["mean_reward"] >= -120.0  # 20 other episodes than the run's evaluations


def _weights(path):
    state = torch.load(path, weights_only=True)["agent"]
    return state["q_network"], state["optimizer"]["state"], state["training_steps"]


def test_resume_equals_a_straight_run(tmp_path):
    # A lighter network than the defaults keeps this quick; the resume logic is what is tested.
    common = ["--task", "CartPole-v1", "--seed", "7", "--eval-episodes", "0", "--no-progress",
              "--set", "network.hidden_size=64", "--set", "train.train_freq=8", "--set", "train.gradient_steps=1",
              # CartPole's tuned profile explores linearly over the budget the first run names (6k
              # here, 12k straight): per-episode exploration keeps both runs on one schedule.
              "--set", "train.exploration=exponential",
              # and lowers its learning rate over that budget: a constant one for the same reason
              "--set", "train.lr_schedule=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--timesteps", "12000", "--run-dir", str(straight), *common]) == 0
    assert main(["train", "--timesteps", "6000", "--run-dir", str(split), *common]) == 0
    assert main(["train", "--resume", str(split), "--timesteps", "12000", "--eval-episodes", "0", "--no-progress"]) == 0

    a_net, a_opt, a_steps = _weights(straight / "checkpoints" / "last.pt")
    b_net, b_opt, b_steps = _weights(split / "checkpoints" / "last.pt")
    assert a_steps == b_steps > 0
    for name in a_net:
        assert torch.equal(a_net[name], b_net[name]), name
    for index in a_opt:
        assert torch.equal(a_opt[index]["exp_avg_sq"], b_opt[index]["exp_avg_sq"])
    a_log = (straight / "episodes.csv").read_text()
    b_log = (split / "episodes.csv").read_text()
    assert a_log == b_log
