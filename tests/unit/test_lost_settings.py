"""Settings that once entered and were lost on the way (issue 12, item 1), now taking effect
where a user sets them: the CLI, a resumed run, the spec's TrainingManager keywords, a run's own
config.yaml, and a change made during a run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from agent import LearningAgent, TrainingManager, load_config
from agent.replay import Transitions
from flows.cli import main

FAST = ["--set", "network.hidden_size=16", "--set", "train.learning_starts=50", "--no-progress",
        "--eval-episodes", "0",
        # CartPole's profile lowers the rate over the budget: a constant one, to read it back
        "--set", "train.lr_schedule=constant"]
SECTIONS = {
    "run", "network", "replay", "train", "evaluate", "memory", "meta", "rewards", "curriculum", "tasks", "distributed",
}


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def _weights_digest(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(_checkpoint(run_dir)["agent"]["q_network"].items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def test_a_resumed_run_takes_the_learning_rate_it_is_given(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "CartPole-v1", "--timesteps", "400", "--run-dir", str(run), *FAST]) == 0
    before = _checkpoint(run)
    first_rate = before["config"]["train"]["learning_rate"]
    assert before["agent"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(first_rate) != 0.0005
    assert main(["train", "--resume", str(run), "--timesteps", "800", "--no-progress", "--eval-episodes", "0",
                 "--set", "train.learning_rate=0.0005"]) == 0
    document = _checkpoint(run)
    # Adam's saved state carried the old rate; the one asked for must win, and be recorded.
    assert document["agent"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    assert document["config"]["train"]["learning_rate"] == pytest.approx(0.0005)
    assert document["trainer"]["global_step"] == 800


def _expected_loss(agent: LearningAgent, batch: Transitions, gamma: float, loss: str, double: bool) -> float:
    """The TD loss written out from the networks, independently of the learner's code paths."""
    with torch.no_grad():
        q = agent.q_network(batch.obs).gather(1, batch.actions[:, None]).squeeze(1)
        next_target = agent.target_network(batch.next_obs)
        if double:
            best = agent.q_network(batch.next_obs).argmax(dim=1, keepdim=True)
            next_value = next_target.gather(1, best).squeeze(1)
        else:
            next_value = next_target.max(dim=1).values
        target = batch.rewards + gamma * (1 - batch.dones) * next_value
        fn = F.mse_loss if loss == "mse" else F.smooth_l1_loss
        return float(fn(q, target))


def _batch(seed: int) -> Transitions:
    rng = torch.Generator().manual_seed(seed)
    obs, next_obs = torch.randn(16, 4, generator=rng) * 3, torch.randn(16, 4, generator=rng) * 3
    return Transitions(obs, torch.randint(0, 2, (16,), generator=rng), 5 * torch.randn(16, generator=rng),
                       next_obs, (torch.rand(16, generator=rng) < 0.2).float())


@pytest.mark.parametrize("closed_form", [True, False])
def test_training_config_loss_and_targets_reach_the_update(closed_form: bool) -> None:
    agent = LearningAgent(4, 2, hidden_size=8, train_overrides={"closed_form_update": closed_form})
    with torch.no_grad():  # targets that differ from the online network, so double DQN matters
        for p in agent.target_network.parameters():
            p.add_(torch.randn_like(p))
    trainer = TrainingManager(agent, task_type="CartPole-v1", tensorboard=False,
                              training_config={"loss": "mse", "double_dqn": False, "closed_form_update": closed_form})
    batch = _batch(0)
    expected = _expected_loss(agent, batch, 0.99, "mse", double=False)
    assert expected != pytest.approx(_expected_loss(agent, batch, 0.99, "huber", double=True), rel=1e-3)
    stats = agent.learner.update(batch)
    assert float(stats.loss) == pytest.approx(expected, rel=1e-5)

    # Changed during a run: through the one method that rebuilds what depends on it.
    trainer.reconfigure(train={"loss": "huber", "double_dqn": True, "learning_rate": 0.01})
    batch = _batch(1)
    expected = _expected_loss(agent, batch, 0.99, "huber", double=True)
    assert float(agent.learner.update(batch).loss) == pytest.approx(expected, rel=1e-5)
    assert agent.learning_rate == pytest.approx(0.01) and trainer.config.train.loss == "huber"
    trainer.close()


def test_settings_of_the_task_world_reach_the_trainers_environments() -> None:
    config = load_config(overrides=["train.task=navigation", "rewards.collision_penalty=-3.0", "tasks.dt=0.25"])
    agent = LearningAgent(*_navigation_sizes(config), config=config)
    trainer = TrainingManager(agent, task_type="navigation", tensorboard=False)
    try:
        assert trainer.reward_manager.config.collision_penalty == -3.0
        env = trainer.envs
        assert float(env.dt) == 0.25
    finally:
        trainer.close()


def _navigation_sizes(config) -> tuple[int, int]:
    from agent.tasks import task_spaces

    return task_spaces("navigation", config=config)


def test_a_runs_config_yaml_holds_every_section_and_repeats_the_run(tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["train", "--task", "CartPole-v1", "--timesteps", "600", "--seed", "5", *FAST,
            "--set", "train.learning_rate=0.002", "--set", "train.target_update_interval=50"]
    assert main([*argv, "--run-dir", str(first)]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert SECTIONS <= set(saved)
    assert saved["train"]["learning_rate"] == 0.002
    assert main(["train", "--params", str(first / "config.yaml"), "--timesteps", "600", "--no-progress",
                 "--eval-episodes", "0", "--run-dir", str(again)]) == 0
    assert _weights_digest(again) == _weights_digest(first)
    assert np.array_equal(
        np.loadtxt(first / "episodes.csv", delimiter=",", skiprows=1),
        np.loadtxt(again / "episodes.csv", delimiter=",", skiprows=1),
    )
