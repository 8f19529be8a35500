"""Meta-learning with real Optuna studies on real storages (SQLite, journal files) and real training.

Budgets are tiny (a few hundred to 1,500 CartPole steps per trial), yet every test checks a
behaviour that could fail: a study resumes, a lagging trial is pruned, a diverging one is pruned
rather than crashing, two processes share a study, searched architectures train, policies move
between tasks of different sizes, periodic optimisation applies what it finds.
"""

from __future__ import annotations

import asyncio
import json
import math
import warnings

import optuna
import pytest
import torch

from agent import (
    LearningAgent,
    LearningNetwork,
    MetaLearningError,
    MetaLearningManager,
    NetworkArchitecture,
    OptimizationConfig,
    OptimizationType,
    TrainingManager,
)
from agent.checkpoint import load_checkpoint_file
from agent.config import MetaConfig, load_config
from agent.meta import apply_live_hyperparameters, match_features, resolve_task, transfer_weights
from agent.tasks import CurriculumManager, DifficultyLevel, task_spaces

Trial = optuna.trial.TrialState

# A CartPole setup that learns within ~1,000 steps (so that good and bad settings separate).
LEARNS_FAST = [
    "network.hidden_size=64",
    "train.learning_starts=200",
    "train.batch_size=32",
    "train.exploration=linear",
    "train.exploration_fraction=0.3",
    "train.epsilon_end=0.05",
    "train.target_update_interval=100",
    "train.train_freq=1",
    "train.log_interval=1000",
    "evaluate.episodes=3",
]
GOOD = {
    "learning_rate": 1e-3, "batch_size": 32, "gamma": 0.99, "target_update_interval": 100,
    "train_freq": 1, "local_buffer_size": 10_000, "hidden_size": 64, "num_hidden_layers": 2,
}
TINY = OptimizationConfig(trials=2, trial_timesteps=300, eval_interval=150, eval_episodes=2, n_startup_trials=1)


def manager(tmp_path, storage: str | None = None, study: str = "test", config=None, **meta) -> MetaLearningManager:
    return MetaLearningManager(
        {"storage_url": storage or f"sqlite:///{tmp_path / 'studies.db'}", **meta},
        study_name=study,
        config=config or load_config(overrides=["network.hidden_size=32", "train.learning_starts=64"]),
    )


# --------------------------------------------------------------------------- config and names


def test_the_spec_constructor_and_options_read_params_yaml():
    meta = MetaLearningManager(
        base_config={"optimization_metric": "mean_reward", "storage_url": "sqlite:///meta_learning.db"},
        study_name="navigation_optimization",
    )
    assert meta.meta.study_name == "navigation_optimization" and meta.meta.storage_url == "sqlite:///meta_learning.db"
    options = OptimizationConfig(trials=7, timeout=30, metric="mean_reward", direction="maximize", pruner="median")
    assert options.n_trials == options.trials == 7 and options.timeout == 30
    assert options.trial_timesteps == meta.meta.trial_timesteps  # the rest from params.yaml
    assert options.evaluation_steps()[-1] == options.trial_timesteps
    with pytest.raises(MetaLearningError, match="did you mean 'optimization_metric'"):
        MetaLearningManager(base_config={"optimisation_metric": "mean_reward"})
    with pytest.raises(MetaLearningError, match="pruner"):
        MetaLearningManager(base_config={"pruner": "sometimes"})


def test_search_options_are_defined_once_by_the_meta_section():
    """OptimizationConfig takes each field's type, bounds and description from the ``meta`` key of
    the same name, and its defaults from the section's values."""
    meta_fields = MetaConfig.model_fields
    for option, field in OptimizationConfig.model_fields.items():
        source = meta_fields["optimization_metric" if option == "metric" else option]
        assert (field.annotation, field.metadata, field.description) == (
            source.annotation, source.metadata, source.description
        ), option
    meta = load_config().meta
    assert OptimizationConfig(trials=3) == OptimizationConfig.from_meta(meta, n_trials=3)
    with pytest.raises(MetaLearningError, match="n_jobs"):
        OptimizationConfig.from_meta(meta, n_jobs=0)  # the section's bound
    with pytest.raises(ValueError, match="not both"):
        OptimizationConfig(trials=3, n_trials=4)


def test_task_names_resolve_to_concrete_tasks():
    stages = CurriculumManager()
    simple, complex_ = resolve_task("navigation_simple"), resolve_task("navigation_complex")
    assert simple.task == complex_.task == "navigation"
    assert simple.task_params == stages.parameters_for(DifficultyLevel.BEGINNER)
    assert complex_.task_params == stages.parameters_for(DifficultyLevel.ADVANCED)
    assert resolve_task("multi_agent_expert").label == "multi_agent@expert"
    assert resolve_task("navigation").same_task(simple)  # a task type starts at its first stage
    assert resolve_task("CartPole-v1").task_params is None
    with pytest.raises(MetaLearningError, match="unknown task 'navigation_sideways'"):
        resolve_task("navigation_sideways")


@pytest.mark.parametrize(
    "url, message",
    [("nonsense", "is not a URL"), ("bogus://x/y", "cannot use storage"), ("journal:", "names no journal file")],
)
def test_bad_storage_urls_are_clear_errors(tmp_path, url, message):
    with pytest.raises(MetaLearningError, match=message):
        manager(tmp_path, storage=url).create_study(OptimizationType.HYPERPARAMETERS)


# --------------------------------------------------------------------------- searches


def test_a_study_resumes_from_its_storage(tmp_path):
    first = manager(tmp_path).search_hyperparameters("CartPole-v1", TINY)
    assert (first.trials_run, first.trials_total) == (2, 2)

    again = manager(tmp_path)  # a new process would do exactly this
    second = again.search_hyperparameters("CartPole-v1", TINY)
    assert second.study_name == first.study_name == "test/CartPole-v1/hyperparameters"
    assert (second.trials_run, second.trials_total) == (2, 4)
    trials = again.load_study(OptimizationType.HYPERPARAMETERS).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    # The resumed sampler is seeded past the trials it found: it does not replay them.
    assert trials[2].params != trials[0].params and trials[3].params != trials[1].params
    assert second.best_value == max(t.value for t in trials if t.state == Trial.COMPLETE)
    # A study made for another direction is not silently reused.
    with pytest.raises(MetaLearningError, match="set to maximize"):
        again.create_study(OptimizationType.HYPERPARAMETERS, TINY.model_copy(update={"direction": "minimize"}), "CartPole-v1")


def test_pruning_stops_a_trial_that_falls_behind(tmp_path):
    meta = manager(tmp_path, config=load_config(overrides=LEARNS_FAST))
    options = OptimizationConfig(trials=3, trial_timesteps=1500, eval_interval=500, eval_episodes=3, n_startup_trials=2)
    study = meta.create_study(OptimizationType.HYPERPARAMETERS, options, "CartPole-v1")
    study.enqueue_trial(GOOD)
    study.enqueue_trial(GOOD)
    study.enqueue_trial({**GOOD, "learning_rate": 1e-5})  # learns nothing in 1,500 steps
    result = meta.search_hyperparameters("CartPole-v1", options)

    good, _, bad = meta.load_study(OptimizationType.HYPERPARAMETERS).trials
    assert good.state == Trial.COMPLETE and bad.state == Trial.PRUNED
    assert bad.user_attrs["steps_trained"] < 1500
    assert (result.trials_complete, result.trials_pruned) == (2, 1)
    assert result.steps_saved == 1500 - bad.user_attrs["steps_trained"] > 0
    assert result.steps_unpruned == 3 * 1500


def test_a_diverging_trial_is_pruned_and_the_search_goes_on(tmp_path):
    meta = manager(tmp_path)
    study = meta.create_study(OptimizationType.HYPERPARAMETERS, TINY, "CartPole-v1")
    study.enqueue_trial({**GOOD, "learning_rate": 1e20, "train_freq": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns that 1e20 is outside the searched range
        result = meta.search_hyperparameters("CartPole-v1", TINY)
    diverged, normal = meta.load_study(OptimizationType.HYPERPARAMETERS).trials
    assert diverged.state == Trial.PRUNED and "nan" in diverged.user_attrs["diverged"]
    assert normal.state == Trial.COMPLETE and math.isfinite(normal.value)
    assert (result.trials_diverged, result.trials_failed, result.best_value) == (1, 0, normal.value)


def test_parallel_threads_run_every_trial(tmp_path):
    result = manager(tmp_path).search_architecture(
        "CartPole-v1", options=TINY.model_copy(update={"n_jobs": 2, "n_trials": 3})
    )
    assert result.trials_total == 3 and result.trials_complete + result.trials_pruned == 3


def test_architecture_search_yields_a_network_of_that_shape_that_trains(tmp_path):
    config = load_config(overrides=["train.learning_starts=64", "train.batch_size=16"])
    agent = LearningAgent(4, 2, config=config)
    trainer = TrainingManager(
        agent, task_type="CartPole-v1", tensorboard=False,
        meta_config={"storage_url": f"sqlite:///{tmp_path / 'arch.db'}", "study_name": "arch"},
    )
    best = asyncio.run(trainer.optimize_architecture(input_dim=4, output_dim=2, options=TINY))
    assert isinstance(best, NetworkArchitecture) and (best.input_dim, best.output_dim) == (4, 2)
    study = trainer.meta.load_study(OptimizationType.ARCHITECTURE)
    assert best.hidden_layers == tuple(study.best_params[f"units_{i}"] for i in range(study.best_params["n_layers"]))

    searched = LearningAgent(4, 2, config=config, architecture=best)
    widths = [m.out_features for m in searched.q_network.body if isinstance(m, torch.nn.Linear)]
    assert widths == list(best.hidden_layers) and LearningNetwork.from_architecture(best).architecture == best
    before = [p.detach().clone() for p in searched.q_network.parameters()]
    child = TrainingManager(searched, task_type="CartPole-v1", tensorboard=False)
    asyncio.run(child.train(total_timesteps=300))
    assert searched.training_steps > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, searched.q_network.parameters()))

    # The search's results travel with the trainer's checkpoint.
    path = trainer.save_checkpoint(tmp_path / "trainer.pt")
    saved = load_checkpoint_file(path)["meta"]
    assert saved["best_architecture"] == best.to_dict() and saved["history"][0]["kind"] == "architecture"
    restored = TrainingManager.from_checkpoint(path, tensorboard=False)
    assert restored.meta.best_architecture == best
    with pytest.raises(MetaLearningError, match="4 observation features"):
        asyncio.run(trainer.optimize_architecture(input_dim=5, output_dim=2, options=TINY))


def test_optimize_hyperparameters_returns_a_params_overlay(tmp_path):
    trainer = TrainingManager(
        LearningAgent(4, 2, config=load_config(overrides=["train.learning_starts=64"])),
        task_type="CartPole-v1", tensorboard=False,
        meta_config={"storage_url": f"sqlite:///{tmp_path / 'hp.db'}"},
    )
    best = asyncio.run(trainer.optimize_hyperparameters(options=TINY))
    assert set(best) == {"train", "replay", "network"} and 1e-5 <= best["train"]["learning_rate"] <= 1e-2
    load_config(overrides=[best])  # a valid overlay of params.yaml
    assert trainer.meta.best_params == best


# --------------------------------------------------------------------------- adaptation


def test_transfer_copies_whole_layers_that_fit():
    source = LearningNetwork(4, 2, hidden_layers=(16, 8))
    target = LearningNetwork(6, 3, hidden_layers=(16, 8))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    transferred, reinitialized, partial = transfer_weights(source, target)
    assert transferred == ["body.2"] and reinitialized == ["body.0", "head"] and partial == {}
    assert torch.equal(target.state_dict()["body.2.weight"], source.state_dict()["body.2.weight"])
    assert torch.equal(target.state_dict()["body.0.bias"], fresh["body.0.bias"])  # bias fits, layer does not


def test_between_task_types_the_shared_inputs_and_actions_transfer_by_name():
    match = match_features("navigation", "exploration")
    assert match is not None and match.shared_inputs[:2] == ["position", "velocity"]
    assert "goal" not in match.shared_inputs and "coverage_map" not in match.shared_inputs
    assert match.inputs[0] == match.inputs[1] == list(range(17))  # the planar slots lead both layouts
    assert len(match.actions[0]) == 9  # 8 headings and stop; exploration's scan is new
    assert match_features("CartPole-v1", "exploration") is None

    source = LearningNetwork(*task_spaces("navigation"), hidden_layers=(16, 8))
    target = LearningNetwork(*task_spaces("exploration"), hidden_layers=(16, 8))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    transferred, reinitialized, partial = transfer_weights(source, target, match)
    assert transferred == ["body.2"] and reinitialized == ["body.0", "head"]
    assert set(partial) == {"body.0", "head"} and partial["head"] == "9 of 10 actions"
    old, new = source.state_dict(), target.state_dict()
    assert torch.equal(new["body.0.weight"][:, :17], old["body.0.weight"][:, :17])
    assert torch.count_nonzero(new["body.0.weight"][:, 17:]) == 0  # new inputs start at zero weight
    assert torch.equal(new["body.0.bias"], old["body.0.bias"])
    rows_src, rows_tgt = match.actions
    assert torch.equal(new["head.weight"][rows_tgt], old["head.weight"][rows_src])
    scan = sorted(set(range(10)) - set(rows_tgt))
    assert torch.equal(new["head.weight"][scan], fresh["head.weight"][scan])  # the new action: fresh init

    # A layout that does not fit the networks (a config naming another task) copies nothing.
    small_source, small_target = LearningNetwork(4, 2, hidden_layers=(8,)), LearningNetwork(6, 3, hidden_layers=(8,))
    assert transfer_weights(small_source, small_target, match)[2] == {}


def test_adaptation_between_tasks_of_different_sizes_reports_both_rewards(tmp_path):
    config = load_config(overrides=["network.hidden_size=32", "train.learning_starts=64", "evaluate.episodes=2"])
    source = TrainingManager(LearningAgent(*task_spaces("CartPole-v1"), config=config), task_type="CartPole-v1",
                             run_dir=tmp_path / "cartpole", tensorboard=False)
    asyncio.run(source.train(total_timesteps=300))
    source.close()

    meta = manager(tmp_path, config=config)
    result = meta.adapt(tmp_path / "cartpole", "Acrobot-v1", timesteps=300, run_dir=tmp_path / "acrobot")
    assert (result.transferred, result.reinitialized) == (["body.2"], ["body.0", "head"])
    assert (result.agent.input_size, result.agent.output_size) == task_spaces("Acrobot-v1") == (6, 3)
    assert math.isfinite(result.adapted_reward) and math.isfinite(result.scratch_reward)
    assert result.zero_shot_reward is None and result.improvement == result.adapted_reward - result.scratch_reward
    report = json.loads((tmp_path / "acrobot" / "adaptation.json").read_text())
    assert report["adapted_reward"] == result.adapted_reward and report["scratch_reward"] == result.scratch_reward
    resumed = TrainingManager.from_checkpoint(tmp_path / "acrobot" / "checkpoints" / "last.pt", tensorboard=False)
    assert resumed.task == "Acrobot-v1" and resumed.global_step == 300


def test_adapt_to_new_task_from_the_trainers_own_task(tmp_path):
    config = load_config(overrides=["network.hidden_size=32", "train.learning_starts=64", "evaluate.episodes=2"])
    trainer = TrainingManager(LearningAgent(*task_spaces("navigation"), config=config), task_type="navigation",
                              tensorboard=False, meta_config={"adapt_timesteps": 200})
    asyncio.run(trainer.train(total_timesteps=200))
    result = asyncio.run(trainer.adapt_to_new_task(source_task="navigation_simple", target_task="navigation_complex"))
    assert result.source == "navigation@beginner" and result.target_task == "navigation@advanced"
    assert result.reinitialized == [] and result.zero_shot_reward is not None and result.timesteps == 200
    assert result.adapted_success_rate is not None and math.isfinite(result.scratch_reward)
    assert trainer.meta.adaptations[-1]["target_task"] == "navigation@advanced"
    with pytest.raises(MetaLearningError, match="learned navigation@beginner, not navigation@expert"):
        asyncio.run(trainer.adapt_to_new_task(source_task="navigation_expert", target_task="navigation_complex"))


# --------------------------------------------------------------------------- periodic optimisation


def test_periodic_optimisation_during_training_is_recorded_and_checkpointed(tmp_path):
    config = load_config(overrides=["network.hidden_size=32", "train.learning_starts=64", "train.batch_size=16"])
    trainer = TrainingManager(
        LearningAgent(4, 2, config=config), task_type="CartPole-v1", tensorboard=False,
        meta_config={"online_trials": 2, "online_timesteps": 150, "eval_episodes": 2},
    )
    asyncio.run(trainer.train(n_episodes=20, optimize_interval=10))
    history = trainer.meta.online_history
    assert [r["episode"] for r in history] == [10, 20]
    for record in history:
        assert len(record["candidates"]) == 3 and record["candidates"][0]["params"] == record["previous"]
    assert trainer.config.train.learning_rate == history[-1]["params"]["learning_rate"] == trainer.agent.learning_rate
    assert trainer.episodes_done == 20

    path = trainer.save_checkpoint(tmp_path / "online.pt")
    restored = TrainingManager.from_checkpoint(path, tensorboard=False)
    assert len(restored.meta.online_history) == 2
    assert restored.config.train.learning_rate == trainer.config.train.learning_rate


def test_applied_settings_reach_the_live_agent():
    config = load_config(overrides=["network.hidden_size=16"])
    trainer = TrainingManager(LearningAgent(4, 2, config=config), task_type="CartPole-v1", tensorboard=False)
    apply_live_hyperparameters(trainer, {"learning_rate": 0.004, "gamma": 0.9, "batch_size": 8})
    assert trainer.agent.learning_rate == 0.004 and trainer.agent.gamma == 0.9
    assert trainer.agent.config.train.batch_size == 8
    with pytest.raises(MetaLearningError, match="cannot change during training"):
        apply_live_hyperparameters(trainer, {"local_buffer_size": 10})
