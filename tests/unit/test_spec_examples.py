"""The spec's examples, written as the spec writes them, work as it says.

(The Memory System Integration example needs the real service: it is in
``tests/integration/test_spec_examples.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from agent import (
    ActionSpaceFactory,
    CooperativeActionSpace,
    CurriculumManager,
    LearningAgent,
    LearningNetwork,
    MetaLearningManager,
    NavigationActionSpace,
    OptimizationConfig,
    OptimizationType,
    TaskType,
    TrainingManager,
)
from agent.config import load_config
from agent.meta import transfer_policy
from agent.tasks import task_spaces
from agent.tasks.params import task_settings
from agent.tasks.spaces import ActionSpaceError
from flows.cli import main

# The spec's "Training Process / Configuration".
training_config = {
    "max_episodes": 1000,
    "max_steps_per_episode": 500,
    "epsilon_start": 1.0,
    "epsilon_end": 0.01,
    "epsilon_decay": 0.995,
    "checkpoint_frequency": 100,
}


# --------------------------------------------------------------------------- action spaces


@pytest.mark.parametrize("name", ["cooperative", "Cooperative", "multi_agent", "multi-agent", "MULTI_AGENT",
                                  TaskType.MULTI_AGENT])
def test_the_cooperative_action_space_by_the_specs_names(name):
    action_space = ActionSpaceFactory.create_action_space(task_type=name, num_agents=2)
    assert isinstance(action_space, CooperativeActionSpace) and action_space.num_agents == 2

    # The spec's usage example, on the team space.
    action = action_space.sample()
    is_valid = action_space.validate_action(action)
    normalized_action = action_space.normalize_action(action)
    original_action = action_space.denormalize_action(normalized_action)
    assert is_valid and np.allclose(original_action, action)


def test_the_specs_action_space_examples():
    # "Usage Example"
    action_space = ActionSpaceFactory.create_action_space(task_type="navigation", num_agents=1)
    action = action_space.sample()
    assert isinstance(action_space, NavigationActionSpace) and action_space.validate_action(action)

    # "Configuration": navigation with two agents is a team navigating together, explicitly.
    config = {
        "task_type": "navigation",
        "num_agents": 2,
        "action_bounds": {"velocity": [-1.0, 1.0], "acceleration": [-0.5, 0.5]},
        "safety_constraints": {"max_velocity_near_obstacle": 0.5, "min_agent_distance": 1.0},
    }
    team = ActionSpaceFactory.create_action_space(**config)
    assert isinstance(team, CooperativeActionSpace) and team.num_agents == 2 and team.min_agent_distance == 1.0


def test_unknown_action_spaces_and_teams_without_a_team_space_are_one_line_errors():
    with pytest.raises(ActionSpaceError) as error:
        ActionSpaceFactory.create_action_space(task_type="flying")
    message = str(error.value)
    assert "\n" not in message and message.startswith("unknown task type 'flying'; valid: ")
    for valid in ("navigation", "exploration", "manipulation", "multi_agent", "cooperative"):
        assert valid in message
    for task in ("exploration", "manipulation"):
        with pytest.raises(ActionSpaceError, match="ask for task_type='cooperative'"):
            ActionSpaceFactory.create_action_space(task_type=task, num_agents=2)


# --------------------------------------------------------------------------- TrainingManager


def test_the_specs_training_manager_trains_as_lagent_train_does(tmp_path, capsys):
    state_dim, action_dim = task_spaces("exploration")
    agent = LearningAgent(input_size=state_dim, output_size=action_dim)
    trainer = TrainingManager(learning_agent=agent, memory_client=None, task_type=TaskType.EXPLORATION)

    run_dir = tmp_path / "cli"
    assert main(["train", "--task", "exploration", "--timesteps", "16", "--eval-episodes", "0",
                 "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    cli = yaml.safe_load((run_dir / "config.yaml").read_text())
    ours = trainer.config.to_dict()
    for budget in ("total_timesteps", "max_episodes"):  # set by --timesteps
        cli["train"].pop(budget), ours["train"].pop(budget)
    # memory.collection "auto": the CLI names the run's own collection before saving its config.
    assert ours["memory"].pop("collection") == "auto" and cli["memory"].pop("collection").startswith("exploration-")
    assert ours == cli
    # ...and the agent runs with them: the profile's step size (0.001 fails on exploration).
    assert agent.learning_rate == cli["train"]["learning_rate"] != load_config().train.learning_rate
    assert agent.buffer.capacity == cli["replay"]["local_buffer_size"]
    assert trainer.envs.num_envs == cli["train"]["num_envs"]
    trainer.close()


def test_what_the_user_chose_survives_the_task_profile():
    state_dim, action_dim = task_spaces("exploration")
    profile = load_config(overrides=["train.task=exploration"])
    agent = LearningAgent(input_size=state_dim, output_size=action_dim, learning_rate=0.001, hidden_size=32)
    trainer = TrainingManager(
        learning_agent=agent, task_type=TaskType.EXPLORATION, training_config={"gradient_steps": 1}
    )
    train = trainer.config.train
    assert train.learning_rate == agent.learning_rate == 0.001  # a keyword, though it is the default
    assert train.gradient_steps == 1  # training_config
    assert train.num_envs == profile.train.num_envs  # the rest: the profile
    assert trainer.config.network.hidden_size == 32
    trainer.close()


# --------------------------------------------------------------------------- curriculum


def test_a_stages_time_limit_holds_under_the_specs_training_config():
    state_dim, action_dim = task_spaces("navigation")
    agent = LearningAgent(input_size=state_dim, output_size=action_dim, hidden_size=32)
    trainer = TrainingManager(
        learning_agent=agent, task_type=TaskType.NAVIGATION, training_config=training_config, use_curriculum=True
    )
    dt = task_settings().dt
    beginner = trainer.curriculum.get_current_parameters()
    assert beginner.time_limit == 300.0 and trainer.config.train.max_steps_per_episode == 500

    # Standing still ('stop', the last action) neither reaches the goal nor collides: the episode
    # ends when the stage's time runs out, at 300 s, not at 500 steps (250 s).
    envs = trainer.envs
    envs.reset(seed=0)
    stop = np.full(envs.num_envs, envs.single_action_space.n - 1)
    steps = 0
    while True:
        _, _, terminated, truncated, _ = envs.step(stop)
        steps += 1
        if terminated.any() or truncated.any():
            break
    assert truncated.all() and not terminated.any()
    assert steps * dt == pytest.approx(300.0)
    trainer.close()

    for stage in CurriculumManager().stages:
        params = stage.task_params
        agent = LearningAgent(input_size=state_dim, output_size=action_dim, hidden_size=32)
        trainer = TrainingManager(
            learning_agent=agent, task_type=TaskType.NAVIGATION, training_config=training_config, task_params=params
        )
        assert trainer.envs.max_steps * dt == pytest.approx(params.time_limit), stage.difficulty
        trainer.close()


# --------------------------------------------------------------------------- network


def test_the_specs_network_config_builds_a_network_and_an_agent():
    state_dim, action_dim = 6, 3
    network_config = {
        "input_size": state_dim,
        "hidden_size": 256,
        "output_size": action_dim,
        "learning_rate": 0.001,
    }
    network = LearningNetwork(**network_config)
    assert network(torch.zeros(5, state_dim)).shape == (5, action_dim)
    assert network.architecture.hidden_layers == (256, 256) and network.learning_rate == 0.001
    agent = LearningAgent(**network_config)
    assert agent.learning_rate == 0.001 and agent.architecture == network.architecture
    with pytest.raises(ValueError, match="learning_rate"):
        LearningNetwork(**{**network_config, "learning_rate": 0.0})


# --------------------------------------------------------------------------- meta-learning


TINY = OptimizationConfig(trials=2, trial_timesteps=200, eval_interval=100, eval_episodes=2, n_startup_trials=1)
SMALL = ["network.hidden_size=32", "train.learning_starts=64", "evaluate.episodes=2"]


@pytest.mark.parametrize("kind", [OptimizationType.POLICY, OptimizationType.TRANSFER])
def test_policy_and_transfer_are_searches_from_a_source_policy(tmp_path, kind):
    config = load_config(overrides=SMALL)
    source = LearningAgent(4, 2, config=config)
    meta_manager = MetaLearningManager(
        {"optimization_metric": "mean_reward", "storage_url": f"sqlite:///{tmp_path / 'meta.db'}"},
        study_name="navigation_optimization",
        config=config,
    )
    with pytest.raises(ValueError, match="source policy"):
        meta_manager.search(kind, "CartPole-v1", options=TINY)
    result = meta_manager.search(kind, "CartPole-v1", source=source, options=TINY)
    assert result.kind is kind and result.trials_complete == 2
    assert result.study_name == f"navigation_optimization/agent->CartPole-v1/{kind.value}"
    searched = {"learning_rate", "learning_starts", "adapt_epsilon_start"} if kind is OptimizationType.POLICY else {
        "adapt_transfer_layers"}
    assert searched <= set(result.best_params)
    # The best trial is a params overlay that the configuration and `lagent adapt` accept.
    path = meta_manager.write_results(result, tmp_path / "out", plots=False)["best_params"]
    load_config(path)
    assert "lagent adapt" in open(path).read()


def test_transfer_hands_over_all_the_body_or_nothing():
    config = load_config(overrides=SMALL)
    source = LearningAgent(4, 2, config=config, seed=1)  # initialised apart from the targets
    _, everything, _, _ = transfer_policy(source, "CartPole-v1", config, layers="all")
    body, body_layers, fresh, _ = transfer_policy(source, "CartPole-v1", config, layers="body")
    _, nothing, _, _ = transfer_policy(source, "CartPole-v1", config, layers="none")
    assert everything == ["body.0", "body.2", "head"]
    assert body_layers == ["body.0", "body.2"] and fresh == ["head"] and nothing == []
    assert torch.equal(body.q_network.body[0].weight, source.q_network.body[0].weight)
    assert not torch.equal(body.q_network.head.weight, source.q_network.head.weight)


def test_lagent_optimize_searches_policy_adaptation_from_a_run(tmp_path, capsys):
    source = tmp_path / "source"
    small = [arg for key in SMALL for arg in ("--set", key)]
    assert main(["train", "--task", "CartPole-v1", "--timesteps", "100", "--eval-episodes", "0",
                 "--run-dir", str(source), "--no-progress", *small]) == 0
    out = tmp_path / "search"
    argv = ["optimize", "--kind", "policy", "--task", "CartPole-v1", "--trials", "2", "--timesteps", "200",
            "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(out), "--no-plots", "--no-progress",
            "--set", "meta.eval_interval=100", "--set", "meta.eval_episodes=2", "--set", "meta.n_startup_trials=1"]
    assert main([*argv, "--source", str(source)]) == 0
    assert f"lagent adapt --source {source}" in capsys.readouterr().out
    assert load_config(out / "best_params.yaml").train.learning_rate > 0
    # ...and `lagent adapt` applies it (a params file with a meta section).
    assert main(["adapt", "--source", str(source), "--task", "CartPole-v1", "--params", str(out / "best_params.yaml"),
                 "--timesteps", "100", "--eval-episodes", "2", "--run-dir", str(tmp_path / "adapted"),
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    adapted = yaml.safe_load((tmp_path / "adapted" / "config.yaml").read_text())
    assert adapted["train"]["learning_rate"] == best["train"]["learning_rate"]
    assert adapted["train"]["epsilon_start"] == best["meta"]["adapt_epsilon_start"]
    assert main(argv) == 2
    assert "--source" in capsys.readouterr().err
    hyperparameters = ["optimize", "--kind", "hyperparameters", "--source", str(source)]
    assert main(hyperparameters) == 2
    assert "--source is for --kind policy or transfer" in capsys.readouterr().err
