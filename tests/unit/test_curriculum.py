"""The curriculum: the spec's stages, when to advance, and state that survives a checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

from agent.tasks import (
    CurriculumError,
    CurriculumManager,
    CurriculumStage,
    DifficultyLevel,
    TaskParameters,
)


def test_the_four_stages_are_the_specs():
    manager = CurriculumManager()
    table = [
        (s.difficulty, s.task_params.workspace_size, s.task_params.num_obstacles, s.task_params.time_limit,
         s.task_params.vision_required, s.task_params.tool_use_enabled, s.task_params.cooperation_required,
         s.task_params.success_rate_threshold)
        for s in manager.stages
    ]
    assert table == [
        (DifficultyLevel.BEGINNER, (5.0, 5.0, 3.0), 3, 300.0, False, False, False, 0.7),
        (DifficultyLevel.INTERMEDIATE, (8.0, 8.0, 4.0), 5, 250.0, True, False, False, 0.6),
        (DifficultyLevel.ADVANCED, (10.0, 10.0, 5.0), 8, 200.0, True, True, False, 0.5),
        (DifficultyLevel.EXPERT, (15.0, 15.0, 6.0), 12, 180.0, True, True, True, 0.4),
    ]
    assert all(s.task_params.min_episodes >= 1 for s in manager.stages)
    assert manager.get_current_parameters() == TaskParameters.default()
    assert manager.current_difficulty is DifficultyLevel.BEGINNER


@pytest.mark.parametrize(
    "change, message",
    [
        ({"workspace_size": (5.0, 0.0, 3.0)}, "workspace_size"),
        ({"workspace_size": (5.0, 5.0)}, "workspace_size"),
        ({"num_obstacles": -1}, "num_obstacles"),
        ({"num_obstacles": 2.5}, "num_obstacles"),
        ({"time_limit": 0}, "time_limit"),
        ({"vision_required": "yes"}, "vision_required"),
        ({"success_rate_threshold": 1.5}, "success_rate_threshold"),
        ({"min_episodes": 0}, "min_episodes"),
        ({"colour": "red"}, "unknown task parameters"),
    ],
)
def test_invalid_parameters_are_rejected(change, message):
    with pytest.raises(CurriculumError, match=message):
        TaskParameters.from_mapping(change)


def test_time_limit_maps_to_steps():
    params = TaskParameters.default()
    assert params.max_steps(0.5) == 600
    assert TaskParameters.from_mapping({"time_limit": 1.2}).max_steps(0.5) == 3


def two_stages(min_episodes: int = 3, threshold: float = 0.5, criteria=None) -> CurriculumManager:
    base = {"workspace_size": (5, 5, 3), "num_obstacles": 1, "time_limit": 10.0,
            "min_episodes": min_episodes, "success_rate_threshold": threshold}
    return CurriculumManager(
        [
            {"difficulty": DifficultyLevel.BEGINNER, "task_params": base, "completion_criteria": criteria or {}},
            {"difficulty": "expert", "task_params": {**base, "num_obstacles": 4}},
        ],
        window=4,
    )


def test_advances_only_when_success_rate_and_minimum_episodes_are_met():
    manager = two_stages(min_episodes=3, threshold=0.5)
    assert manager.update_progress({"task_success": 1}) is False  # 1 episode < 3
    assert manager.update_progress({"task_success": 1}) is False  # 2 episodes < 3
    assert manager.update_progress({"task_success": 1}) is True
    assert manager.current_difficulty is DifficultyLevel.EXPERT
    assert manager.get_current_parameters().num_obstacles == 4
    assert manager.transitions[0]["from"] == "beginner" and manager.transitions[0]["episode"] == 3

    slow = two_stages(min_episodes=2, threshold=0.75)
    results = [slow.update_progress({"task_success": s}) for s in (0, 0, 1, 1, 1)]
    assert results == [False, False, False, False, True]  # window of 4: 0,1,1,1 -> 0.75


def test_completion_criteria_must_hold_too():
    manager = two_stages(min_episodes=1, criteria={"collision_rate": 0.2, "average_reward": 5.0})
    assert not manager.update_progress({"task_success": 1, "collision_rate": 0.5, "average_reward": 9.0})
    progress = manager.current_stage.criteria_progress()
    assert progress["success_rate"]["met"] and not progress["collision_rate"]["met"]
    assert not manager.update_progress({"task_success": 1, "collision_rate": 0.0})  # mean 0.25 > 0.2
    assert manager.update_progress({"task_success": 1, "collision_rate": 0.0, "average_reward": 1.0})


def test_the_last_stage_never_advances_but_completes():
    manager = two_stages(min_episodes=1)
    manager.update_progress({"task_success": 1})
    assert manager.is_final_stage and not manager.is_complete
    assert manager.update_progress({"task_success": 1}) is False
    assert manager.is_complete
    summary = manager.get_metrics()
    assert summary["stages"]["beginner"]["episodes"] == 1 and summary["total_episodes"] == 2


@pytest.mark.parametrize(
    "metrics, message",
    [({"average_reward": 1.0}, "task_success"), ({"task_success": 0.5}, "0 or 1"),
     ({"task_success": 1, "collision_rate": "many"}, "number"), ([1], "mapping")],
)
def test_bad_episode_metrics_are_rejected(metrics, message):
    with pytest.raises(CurriculumError, match=message):
        two_stages().update_progress(metrics)


def test_stage_order_is_checked():
    with pytest.raises(CurriculumError, match="increasing difficulty"):
        CurriculumManager([CurriculumStage("expert", TaskParameters.default()), CurriculumStage("beginner", TaskParameters.default())])
    with pytest.raises(CurriculumError, match="at least one stage"):
        CurriculumManager([])
    with pytest.raises(CurriculumError, match="unknown difficulty"):
        CurriculumStage("godlike", TaskParameters.default())


def test_state_round_trips_through_a_torch_checkpoint():
    manager = CurriculumManager()
    for i in range(150):
        manager.update_progress({"task_success": int(i % 5 != 0), "collision_rate": 0.1, "average_reward": 3.0})
    assert manager.current_difficulty is DifficultyLevel.INTERMEDIATE
    buffer = io.BytesIO()
    torch.save({"curriculum_state": manager.save_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["curriculum_state"]
    restored = CurriculumManager()
    restored.load_state(state)
    assert restored.get_metrics() == manager.get_metrics()
    for i in range(30):  # both continue identically
        metrics = {"task_success": i % 2}
        assert restored.update_progress(metrics) == manager.update_progress(metrics)
    assert restored.save_state() == manager.save_state()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.update(version=99), "version"),
        (lambda s: s.update(current_index=7), "current_index"),
        (lambda s: s.update(total_episodes=1), "total_episodes"),
        (lambda s: s["stages"][0].update(successes=10**6), "inconsistent counters"),
        (lambda s: s["stages"].pop(), "stages"),
        (lambda s: s["stages"][2].update(episodes=5), "total_episodes|after the current"),
    ],
)
def test_inconsistent_state_is_rejected(corrupt, message):
    manager = CurriculumManager()
    for _ in range(120):
        manager.update_progress({"task_success": 1})
    state = manager.save_state()
    corrupt(state)
    with pytest.raises(CurriculumError, match=message):
        CurriculumManager().load_state(state)


def test_stage_from_the_spec_config_example():
    stage = CurriculumStage.from_config(
        {
            "difficulty": DifficultyLevel.INTERMEDIATE,
            "task_params": {"workspace_size": (8.0, 8.0, 4.0), "num_obstacles": 5, "time_limit": 250, "vision_required": True},
            "completion_criteria": {"average_reward": 75.0, "exploration_coverage": 0.7, "collision_rate": 0.15},
        }
    )
    assert stage.task_params.vision_required and stage.task_params.time_limit == 250.0
    assert stage.completion_criteria == {"average_reward": 75.0, "exploration_coverage": 0.7, "collision_rate": 0.15}
