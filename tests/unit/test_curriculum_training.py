"""The trainer walks the curriculum: it advances, rebuilds the task, and keeps the stage on resume.

Thresholds are made small with --set / stage configs (one success in the last few episodes), so
that a stage is passed within seconds; the real thresholds are measured in benchmarks/.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from agent import LearningAgent, TrainingManager
from agent.tasks import CurriculumManager, DifficultyLevel, task_spaces
from flows.cli import main

# Beginner and intermediate are easy to pass; advanced never within the budget.
EASY = [
    "--set", "curriculum.window=5",
    "--set", "curriculum.stages.beginner.min_episodes=5",
    "--set", "curriculum.stages.beginner.success_rate_threshold=0.2",
    "--set", "curriculum.stages.beginner.completion_criteria.completion_time=1000",
    "--set", "curriculum.stages.intermediate.min_episodes=5",
    "--set", "curriculum.stages.intermediate.success_rate_threshold=0.2",
    "--set", "curriculum.stages.intermediate.completion_criteria.completion_time=1000",
    "--set", "curriculum.stages.advanced.min_episodes=100000",
]
SMALL = [
    "--set", "network.hidden_size=32",
    "--set", "train.learning_starts=64",
    "--set", "train.max_steps_per_episode=100",
    "--eval-episodes", "4", "--no-progress",
]


def _stage_params(difficulty: str):
    return CurriculumManager().parameters_for(difficulty)


def test_cli_advances_reports_per_stage_and_resumes_at_the_stage(tmp_path, capsys):
    run_dir = tmp_path / "nav"
    argv = ["train", "--task", "navigation", "--curriculum", "--seed", "3", "--run-dir", str(run_dir)]
    assert main([*argv, "--episodes", "40", *EASY, *SMALL, "--json"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "curriculum: beginner -> intermediate after" in captured.err  # printed as it happens
    assert "curriculum: intermediate -> advanced after" in captured.err  # (stderr: --json owns stdout)
    assert "eval success" in captured.err  # the final per-stage table
    result = json.loads(out.strip().splitlines()[-1])
    report = json.loads((run_dir / "curriculum.json").read_text())
    assert result["curriculum"]["final_stage"] == report["final_stage"] == "advanced"
    assert [t["to"] for t in report["transitions"]] == ["intermediate", "advanced"]
    assert report["stages"]["intermediate"]["reached"]["training_episode"] >= 5
    assert report["stages"]["expert"]["reached"] is None
    # The final report: the agent evaluated at every stage.
    assert set(report["evaluation"]) == {"beginner", "intermediate", "advanced", "expert"}
    for stage in report["evaluation"].values():
        assert 0.0 <= stage["success_rate"] <= 1.0 and stage["episodes"] == 4
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert set(evaluation["stages"]) == set(report["evaluation"])
    # A model is kept per passed stage.
    assert (run_dir / "checkpoints" / "stage_beginner.pt").is_file()
    assert (run_dir / "checkpoints" / "stage_intermediate.pt").is_file()

    # Resume: same stage, same thresholds (the run's, not params.yaml's), more episodes.
    assert main(["train", "--resume", str(run_dir), "--episodes", "50", "--eval-episodes", "0",
                 "--no-progress", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["train"]["episodes"] == 50
    assert resumed["train"]["curriculum_stage"] == "advanced"
    report = json.loads((run_dir / "curriculum.json").read_text())
    assert report["stages"]["advanced"]["training_episodes"] == 50 - report["transitions"][-1]["training_episode"]
    assert report["stages"]["advanced"]["criteria"]["min_episodes"]["threshold"] == 100000


def test_trainer_rebuilds_the_task_at_the_new_stage(small_config, tmp_path):
    stages = [
        {"difficulty": "beginner", "task_params": {**_stage_params("beginner").to_dict(),
                                                   "min_episodes": 3, "success_rate_threshold": 0.01}},
        {"difficulty": "intermediate", "task_params": _stage_params("intermediate").to_dict()},
    ]
    curriculum = CurriculumManager(stages, window=3)
    obs_dim, n_actions = task_spaces("navigation")
    agent = LearningAgent(obs_dim, n_actions, config=small_config("train.max_steps_per_episode=60", "train.num_envs=2"))
    trainer = TrainingManager(agent, task_type="navigation", curriculum=curriculum, run_dir=tmp_path, tensorboard=False)
    seen = []
    trainer.on_stage_transition = seen.append
    first_envs = trainer.envs
    assert trainer.config.train.use_curriculum
    assert first_envs.params.workspace_size == (5.0, 5.0, 3.0) and not first_envs.params.vision_required

    asyncio.run(trainer.train(n_episodes=30))
    assert curriculum.current_difficulty is DifficultyLevel.INTERMEDIATE
    assert [t["to"] for t in seen] == ["intermediate"] and seen[0]["wall_seconds"] > 0
    assert trainer.envs is not first_envs
    assert trainer.envs.params == _stage_params("intermediate")
    vision = trainer.envs.layout.slices["vision"]
    assert np.all(trainer.collector.obs[:, vision] == 1.0)  # intermediate observations carry range sensors
    assert trainer.summary()["stage_transitions"][0]["from"] == "beginner"

    # The checkpoint holds the stage; a trainer built from it starts at that stage, not at beginner.
    restored = TrainingManager.from_checkpoint(tmp_path / "checkpoints" / "last.pt", tensorboard=False)
    assert restored.curriculum.current_difficulty is DifficultyLevel.INTERMEDIATE
    assert restored.envs.params == _stage_params("intermediate")
    assert [s.difficulty.value for s in restored.curriculum.stages] == ["beginner", "intermediate"]
    assert restored.curriculum.stages[0].task_params.min_episodes == 3  # the run's thresholds
    assert restored.episodes_done == trainer.episodes_done
    assert restored.elapsed_seconds() == pytest.approx(trainer.train_seconds)
    # ...and it continues exactly as the original would have.
    asyncio.run(trainer.train(n_episodes=40))
    asyncio.run(restored.train(n_episodes=40))
    assert trainer.episode_rewards == restored.episode_rewards
    for a, b in zip(trainer.agent.q_network.parameters(), restored.agent.q_network.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "CartPole-v1", "--curriculum"], "--curriculum needs a task type"),
        (["--task", "navigation", "--curriculum", "--set", "curriculum.window=0"], "window"),
    ],
)
def test_curriculum_user_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["train", *argv, "--run-dir", str(tmp_path / "r"), "--episodes", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("task", ["navigation", "exploration", "multi_agent"])
def test_vision_slots_say_what_is_sensed_at_every_stage(task):
    """Blind rays read 1 (nothing sensed) and the vision flag is 0; with vision the flag is 1.
    (0 would read as an obstacle touching on every side: a policy trained with vision then fails
    at the blind first stage.)"""
    from agent.tasks import make_vector_env

    for difficulty, vision in (("beginner", False), ("intermediate", True)):
        envs = make_vector_env(task, 2, task_params=_stage_params(difficulty))
        obs, _ = envs.reset(seed=0)
        for _ in range(3):
            obs, *_ = envs.step(np.zeros(envs.num_envs, dtype=np.int64))
        slots = envs.layout.slices
        assert np.all(obs[:, slots["vision"]] == float(vision))
        if not vision:
            assert np.all(obs[:, slots["ranges"]] == 1.0)
        else:
            assert np.all(obs[:, slots["ranges"]] <= 1.0) and np.any(obs[:, slots["ranges"]] < 1.0)
