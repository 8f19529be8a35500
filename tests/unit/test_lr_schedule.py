"""The learning-rate schedule (issue 14's levers): a function of the run's progress, so a resumed
run and a run trained in chunks step with the rates of a straight run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent import LearningAgent, TrainingManager, load_config

SMALL = ["train.task=CartPole-v1", "network.hidden_size=16", "train.learning_starts=100",
         "train.max_episodes=null", "train.total_timesteps=1600", "train.lr_schedule=linear",
         "train.lr_final_fraction=0.1", "train.learning_rate=0.002"]


def _trainer(run_dir: Path | None = None, *extra: str) -> TrainingManager:
    config = load_config(overrides=[*SMALL, *extra])
    return TrainingManager(LearningAgent(4, 2, config=config), task_type="CartPole-v1", run_dir=run_dir,
                           tensorboard=False)


def test_the_rate_falls_linearly_with_progress_and_a_constant_one_does_not() -> None:
    learner = _trainer().agent.learner
    learner.set_progress(0.5)
    assert learner.learning_rate == pytest.approx(0.002 * (1 - 0.5 * 0.9))
    learner.set_progress(1.0)
    assert learner.learning_rate == pytest.approx(0.0002)
    constant = _trainer(None, "train.lr_schedule=constant").agent.learner
    constant.set_progress(0.9)
    assert constant.learning_rate == pytest.approx(0.002)


def test_a_resumed_run_steps_with_the_straight_runs_rates(tmp_path: Path) -> None:
    straight = _trainer(tmp_path / "straight")
    straight.run()
    assert straight.agent.learning_rate == pytest.approx(0.002 * (1 - 0.9 * 1600 / 1600), abs=2e-5)
    half = _trainer(tmp_path / "split")
    half.plan_exploration(1600, None)  # the run's horizon, then a first chunk of it (as trials do)
    half.run(total_timesteps=800)
    half.close()
    resumed = TrainingManager.from_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt", tensorboard=False)
    resumed.run(total_timesteps=1600)
    assert resumed.agent.learning_rate == straight.agent.learning_rate
    for a, b in zip(straight.agent.q_network.parameters(), resumed.agent.q_network.parameters()):
        assert torch.equal(a, b)


def test_a_run_whose_rate_fell_to_zero_can_be_evaluated_and_resumed(tmp_path: Path) -> None:
    from flows.cli import main

    run = tmp_path / "run"
    fast = ["--no-progress", "--eval-episodes", "0", "--set", "network.hidden_size=16", "--set", "train.learning_starts=50",
            "--set", "train.train_freq=4", "--set", "train.gradient_steps=1"]  # an update at the last step
    assert main(["train", "--task", "CartPole-v1", "--timesteps", "600", "--run-dir", str(run),
                 "--set", "train.lr_schedule=linear", "--set", "train.lr_final_fraction=0", *fast]) == 0
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["agent"]["optimizer"]["param_groups"][0]["lr"] < 1e-5  # near the schedule's end
    saved["agent"]["optimizer"]["param_groups"][0]["lr"] = 0.0  # where a run whose last update ends its budget is
    torch.save(saved, run / "checkpoints" / "last.pt")
    assert main(["evaluate", str(run), "--episodes", "2", "--no-progress"]) == 0
    assert main(["train", "--resume", str(run), "--timesteps", "800", "--no-progress", "--eval-episodes", "0"]) == 0
