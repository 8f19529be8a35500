"""TrainingManager: budgets, exploration schedules, transitions, checkpoints, resume, evaluation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from agent import CheckpointError, InMemorySink, LearningAgent, TrainingManager


def make_trainer(config, task="CartPole-v1", run_dir=None, **kwargs):
    from agent.tasks import task_spaces

    obs_dim, n_actions = task_spaces(task)
    agent = LearningAgent(obs_dim, n_actions, config=config)
    return TrainingManager(agent, task_type=task, run_dir=run_dir, **kwargs)


def weights(trainer: TrainingManager) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.agent.q_network.parameters()])


def test_episode_budget_and_spec_epsilon_schedule(small_config):
    trainer = make_trainer(small_config(), training_config={"max_episodes": 12, "epsilon_decay": 0.9})
    summary = asyncio.run(trainer.train())
    assert trainer.episodes_done == 12 == len(trainer.episode_rewards) == summary["episodes"]
    assert trainer.epsilon == pytest.approx(max(0.01, 0.9**12))
    assert trainer.best_reward == max(trainer.episode_rewards)
    assert sum(trainer.episode_lengths) == trainer.global_step  # every real step is counted once


def test_step_budget_and_linear_schedule(small_config):
    config = small_config("train.exploration=linear", "train.exploration_fraction=0.5", "train.epsilon_end=0.05")
    trainer = make_trainer(config)
    asyncio.run(trainer.train(total_timesteps=600))
    assert trainer.global_step == 600
    assert trainer.epsilon == pytest.approx(0.05)
    assert trainer.agent.training_steps > 0


def test_learning_starts_and_gradient_steps_per_call(small_config):
    config = small_config("train.learning_starts=300", "train.train_freq=50", "train.gradient_steps=3")
    trainer = make_trainer(config)
    asyncio.run(trainer.train(total_timesteps=299))
    assert trainer.agent.training_steps == 0
    asyncio.run(trainer.train(total_timesteps=1000))
    assert trainer.agent.training_steps % 3 == 0 and trainer.agent.training_steps >= 30


@pytest.fixture(scope="module")
def same_step_cartpole() -> str:
    """CartPole without its vector entry point: built by SyncVectorEnv with same-step autoreset."""
    import gymnasium as gym

    env_id = "CartPoleSameStep-v1"
    if env_id not in gym.envs.registration.registry:
        gym.register(env_id, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv", max_episode_steps=500)
    return env_id


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_stored_transitions_never_cross_an_episode_boundary(small_config, same_step_cartpole, mode):
    from agent.tasks import autoreset_mode

    task = "CartPole-v1" if mode == "NextStep" else same_step_cartpole
    config = small_config("train.num_envs=4", "train.learning_starts=100000", "replay.local_buffer_size=5000")
    trainer = make_trainer(config, task=task)
    assert autoreset_mode(trainer.envs).value == mode
    asyncio.run(trainer.train(total_timesteps=2000))
    assert 2000 <= trainer.global_step < 2004
    data = trainer.agent.buffer.state_dict()["data"]
    assert len(data["dones"]) == trainer.global_step == sum(trainer.episode_lengths) + int(trainer.collector.ep_length.sum())

    def fallen(obs: torch.Tensor) -> torch.Tensor:  # CartPole's termination condition
        return (obs[:, 0].abs() > 2.4) | (obs[:, 2].abs() > 12 * 2 * np.pi / 360)

    terminal = data["dones"] == 1
    assert terminal.sum() == trainer.episodes_done > 20
    # A terminal transition ends in the state that ended the episode, not in a fresh reset state;
    # and no transition starts from a terminal state (the ignored action of a reset step).
    assert fallen(data["next_obs"][terminal]).all()
    assert not fallen(data["obs"]).any()
    assert not fallen(data["next_obs"][~terminal]).any()


def test_evaluate_returns_mean_and_std_without_touching_training(small_config):
    trainer = make_trainer(small_config())
    asyncio.run(trainer.train(total_timesteps=300))
    rng_state = trainer.agent.rng.bit_generator.state
    torch_state = torch.get_rng_state()
    mean, std = asyncio.run(trainer.evaluate(num_episodes=7))
    assert trainer.last_evaluation["episodes"] == 7
    assert mean == pytest.approx(np.mean(trainer.last_evaluation["rewards"]))
    assert std == pytest.approx(np.std(trainer.last_evaluation["rewards"]))
    assert trainer.agent.rng.bit_generator.state == rng_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_metrics_reach_the_sink(small_config):
    sink = InMemorySink()
    trainer = make_trainer(small_config("train.log_interval=100"), metrics_sink=sink)
    asyncio.run(trainer.train(total_timesteps=500))
    names = {name for _, row in sink.rows for name in row}
    assert {"episode/reward", "episode/length", "train/epsilon", "train/loss", "train/loss_local",
            "train/q_mean", "train/grad_norm", "train/learning_rate", "time/steps_per_second"} <= names
    steps = [step for step, row in sink.rows if "time/steps_per_second" in row]
    assert steps == sorted(steps) and len(steps) >= 5


def test_run_dir_gets_checkpoints_episode_log_and_tensorboard(small_config, tmp_path):
    trainer = make_trainer(small_config("train.checkpoint_frequency=5"), run_dir=tmp_path)
    asyncio.run(trainer.train(n_episodes=11))
    trainer.close()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "best_model.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    lines = (tmp_path / "episodes.csv").read_text().splitlines()
    assert lines[0] == "episode,reward,length" and len(lines) == 12
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_checkpoint_round_trip_restores_everything(small_config, tmp_path):
    trainer = make_trainer(small_config())
    asyncio.run(trainer.train(total_timesteps=700))
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    restored = TrainingManager.from_checkpoint(path)
    assert torch.equal(weights(restored), weights(trainer))
    assert (restored.global_step, restored.episodes_done, restored.epsilon) == (trainer.global_step, trainer.episodes_done, trainer.epsilon)
    assert restored.episode_rewards == trainer.episode_rewards
    assert restored.agent.training_steps == trainer.agent.training_steps
    assert len(restored.agent.buffer) == len(trainer.agent.buffer)
    opt_a, opt_b = trainer.agent.optimizer.state_dict(), restored.agent.optimizer.state_dict()
    assert all(torch.equal(opt_a["state"][0][k], opt_b["state"][0][k]) for k in ("exp_avg", "exp_avg_sq"))


def test_resume_continues_the_same_run(small_config, tmp_path):
    config = small_config("train.num_envs=2", "train.learning_starts=100")
    straight = make_trainer(config)
    asyncio.run(straight.train(total_timesteps=1600))

    first = make_trainer(config)
    asyncio.run(first.train(total_timesteps=800))
    path = first.save_checkpoint(tmp_path / "half.pt")
    resumed = TrainingManager.from_checkpoint(path)
    asyncio.run(resumed.train(total_timesteps=1600))
    assert resumed.global_step == straight.global_step
    assert resumed.episode_rewards == straight.episode_rewards
    assert resumed.epsilon == straight.epsilon
    assert torch.equal(weights(resumed), weights(straight))


def test_same_seed_same_run_different_seed_different_run(small_config):
    runs = []
    for seed in (4, 4, 5):
        trainer = make_trainer(small_config(f"run.seed={seed}"))
        asyncio.run(trainer.train(total_timesteps=500))
        runs.append(weights(trainer))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_bad_checkpoints_name_the_file(small_config, tmp_path):
    trainer = make_trainer(small_config())
    asyncio.run(trainer.train(total_timesteps=200))
    good = trainer.save_checkpoint(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path, message in [
        (truncated, "not a readable checkpoint"),
        (foreign, "not a lagent checkpoint"),
        (text, "not a readable checkpoint"),
        (tmp_path / "missing.pt", "not found"),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            trainer.load_checkpoint(path)
        assert str(path) in str(info.value)


def test_checkpoints_are_written_atomically(small_config, tmp_path, monkeypatch):
    trainer = make_trainer(small_config())
    asyncio.run(trainer.train(total_timesteps=200))
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left behind


def test_agent_and_task_must_agree(small_config):
    agent = LearningAgent(3, 2, config=small_config())
    with pytest.raises(ValueError, match="4 observation features and 2 actions"):
        TrainingManager(agent, task_type="CartPole-v1")


def test_periodic_evaluation_leaves_training_unchanged(small_config):
    plain = make_trainer(small_config())
    asyncio.run(plain.train(total_timesteps=900))
    evaluated = make_trainer(small_config("train.eval_frequency=300", "train.eval_episodes=3"))
    asyncio.run(evaluated.train(total_timesteps=900))
    assert [step for step, _ in evaluated.evaluations] == [300, 600, 900]
    assert torch.equal(weights(plain), weights(evaluated))
    assert plain.episode_rewards == evaluated.episode_rewards


def test_final_model_best_ends_with_the_best_evaluated_weights(small_config, tmp_path):
    config = small_config("train.eval_frequency=250", "train.eval_episodes=3", "train.final_model=best")
    trainer = make_trainer(config, run_dir=tmp_path)
    seen = []
    original = trainer._periodic_evaluation

    def spy():
        original()
        seen.append((trainer.evaluations[-1][1], weights(trainer).clone()))

    trainer._periodic_evaluation = spy
    asyncio.run(trainer.train(total_timesteps=1500))
    best_reward = max(reward for reward, _ in seen)
    best_weights = [w for reward, w in seen if reward == best_reward][-1]
    assert trainer.best_eval_reward == best_reward
    assert torch.equal(weights(trainer), best_weights)
    saved = torch.load(tmp_path / "checkpoints" / "best_model.pt", weights_only=True)["agent"]["q_network"]
    assert torch.equal(torch.cat([t.flatten() for t in saved.values()]), best_weights)
    # the full checkpoint keeps the run's own last weights, so resuming continues the run
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["agent"]["q_network"]
    assert torch.equal(torch.cat([t.flatten() for t in last.values()]), seen[-1][1])


def test_stop_at_reward_ends_the_run_at_the_first_evaluation_that_reaches_it(small_config):
    settings = ("train.eval_frequency=300", "train.eval_episodes=3")
    full = make_trainer(small_config(*settings))
    asyncio.run(full.train(total_timesteps=1500))
    # the first evaluation above the first one's: the run stops there, before its budget
    first = next(i for i, (_, reward) in enumerate(full.evaluations) if reward > full.evaluations[0][1])
    target = full.evaluations[first][1]
    assert full.evaluations[first][0] < 1500

    stopped = make_trainer(small_config(*settings, f"train.stop_at_reward={target}"))
    summary = asyncio.run(stopped.train(total_timesteps=1500))
    stop_step = full.evaluations[first][0]
    assert stopped.evaluations == full.evaluations[: first + 1]
    assert summary["reached_reward"] == stop_step == stopped.global_step
    assert stopped.episode_rewards == full.episode_rewards[: len(stopped.episode_rewards)]
    # unreachable: the whole budget is spent
    never = make_trainer(small_config(*settings, "train.stop_at_reward=1e9"))
    assert asyncio.run(never.train(total_timesteps=900))["reached_reward"] is None
    assert never.global_step == 900


def test_stop_at_reward_needs_evaluations(small_config):
    from agent.config import ConfigError

    with pytest.raises(ConfigError) as error:
        small_config("train.stop_at_reward=100")
    # one line that says what to do, without the whole section echoed back
    assert str(error.value) == (
        "configuration: train: train.stop_at_reward needs evaluations during training: "
        "set train.eval_frequency > 0"
    )
