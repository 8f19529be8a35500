"""Task rewards: the spec's defaults, the six-step calculation, metrics, and adding a component."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import pytest

from agent.tasks import (
    RewardComponent,
    RewardConfig,
    RewardError,
    TaskRewardManager,
    TaskType,
    plot_reward_components,
)

SPEC_DEFAULTS = {
    "base_reward": 1.0,
    "time_penalty": -0.01,
    "collision_penalty": -0.5,
    "completion_bonus": 10.0,
    "exploration_bonus": 0.5,
    "cooperation_bonus": 2.0,
    "efficiency_bonus": 1.0,
}


def test_config_defaults_are_the_spec_values():
    assert RewardConfig().to_dict() == SPEC_DEFAULTS
    assert RewardConfig(collision_penalty=-2.0).collision_penalty == -2.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"time_penalty": 0.5}, "penalty and must be <= 0"),
        ({"completion_bonus": -1.0}, "bonus and must be >= 0"),
        ({"base_reward": float("nan")}, "finite number"),
        ({"base_reward": "1"}, "finite number"),
    ],
)
def test_invalid_config_is_rejected(values, message):
    with pytest.raises(RewardError, match=message):
        RewardConfig(**values)


def test_unknown_config_keys_are_rejected():
    with pytest.raises(RewardError, match="unknown reward settings"):
        RewardConfig.from_mapping({"bonus": 1.0})


def test_components_are_in_the_order_of_the_six_steps():
    assert [c.value for c in RewardComponent] == [
        "base_reward", "time_penalty",  # 1. base reward and time penalty
        "collision_penalty",  # 2. collisions
        "exploration_bonus", "cooperation_bonus",  # 3. task-specific
        "completion_bonus",  # 4. completion
        "efficiency_bonus",  # 5. efficiency (6. tracking follows)
    ]


def test_one_step_reward_is_the_weighted_sum_of_its_signals():
    manager = TaskRewardManager(TaskType.EXPLORATION, resource_value=4.0)
    info = {
        "progress": 0.1, "collisions": 1, "new_cells": 2, "new_resources": 1,
        "formation_progress": 0.25, "joint_finish": 1, "success": 1, "smoothness": 0.5,
    }
    reward, components = manager.calculate_reward(state=None, action=3, next_state=None, info=info)
    assert components == pytest.approx({
        "base_reward": 0.1, "time_penalty": -0.01, "collision_penalty": -0.5,
        "exploration_bonus": 0.5 * (2 + 4), "cooperation_bonus": 2.0 * 1.25,
        "completion_bonus": 10.0, "efficiency_bonus": 0.5,
    })
    assert reward == pytest.approx(sum(components.values()))
    assert isinstance(reward, float)
    quiet, parts = manager.calculate_reward(info={})
    assert quiet == pytest.approx(-0.01) and parts["completion_bonus"] == 0.0


def test_batches_are_calculated_at_once_and_tracked():
    manager = TaskRewardManager(TaskType.NAVIGATION)
    reward, components = manager.calculate_reward(
        info={"progress": np.array([0.2, -0.2, 0.0]), "collisions": np.array([0, 0, 1]), "success": np.array([0, 0, 1])}
    )
    np.testing.assert_allclose(reward, [0.19, -0.21, 9.49])
    assert components["collision_penalty"].shape == (3,)
    metrics = manager.get_metrics()
    assert metrics["steps"] == 3
    assert metrics["reward_components"]["completion_bonus"] == pytest.approx(10.0 / 3)
    with pytest.raises(RewardError, match="non-finite"):
        manager.calculate_reward(info={"progress": np.nan})
    with pytest.raises(RewardError, match="incompatible shapes"):
        manager.calculate_reward(info={"progress": np.zeros(2), "collisions": np.zeros(3)})


def test_progress_cannot_be_farmed_by_going_back_and_forth():
    manager = TaskRewardManager()
    there, _ = manager.calculate_reward(info={"progress": 0.3})
    back, _ = manager.calculate_reward(info={"progress": -0.3})
    assert there + back == pytest.approx(2 * RewardConfig().time_penalty)


def test_task_metrics_the_spec_lists():
    manager = TaskRewardManager(TaskType.MULTI_AGENT)
    manager.calculate_reward(info={"progress": np.zeros(4)})
    manager.end_episodes(
        np.array([0, 1, 2, 3]),
        ["task_success", "completion_time", "cooperation_score", "agent_index", "formation_maintenance_rate",
         "exploration_coverage", "resource_discovery_rate"],
        np.array([[1, 1, 0, 0], [10, 20, 50, 50], [0.8, 0.6, 0.4, 0.2], [0, 1, 0, 1],
                  [0.5, 0.5, 0.1, 0.1], [0.3, 0.3, 0.3, 0.3], [1, 1, 0.5, 0.5]]),
    )
    metrics = manager.get_metrics()
    assert metrics["episodes"] == 4
    assert metrics["completion_rate"] == pytest.approx(0.5)
    assert metrics["average_completion_time"] == pytest.approx(15.0)
    assert metrics["average_cooperation"] == pytest.approx(0.5)
    assert metrics["per_agent_cooperation"] == pytest.approx({0: 0.6, 1: 0.4})
    assert metrics["formation_maintenance_rate"] == pytest.approx(0.3)
    assert metrics["exploration_coverage"] == pytest.approx(0.3)
    assert metrics["resource_discovery_rate"] == pytest.approx(0.75)
    assert set(metrics["reward_components"]) == set(SPEC_DEFAULTS)
    assert metrics["reward_component_distributions"]["time_penalty"]["mean"] == pytest.approx(-0.01)


def test_state_round_trips():
    manager = TaskRewardManager()
    manager.calculate_reward(info={"progress": np.array([0.1, 0.2]), "success": np.array([0, 1])})
    manager.end_episodes(np.array([False, True]), ["task_success", "completion_time"], np.array([[1.0], [7.0]]))
    other = TaskRewardManager()
    other.load_state_dict(manager.state_dict())
    assert other.get_metrics() == manager.get_metrics()
    with pytest.raises(RewardError, match="components"):
        other.load_state_dict({**manager.state_dict(), "names": ["base_reward"]})


# --------------------------------------------------------------------------- customisation
# The spec's four steps for a new component, here an energy penalty on large commands.

# 1. Add the component to the enum (a new enum with every built-in member, then the new one).
ExtendedComponent = enum.Enum(
    "ExtendedComponent", [(c.name, c.value) for c in RewardComponent] + [("ENERGY_PENALTY", "energy_penalty")],
    type=str,
)


# 2. Add its configuration parameter (same name as the member's value).
@dataclasses.dataclass(frozen=True)
class EnergyRewardConfig(RewardConfig):
    energy_penalty: float = -0.05


# 3. Implement its calculation in the manager.
class EnergyRewardManager(TaskRewardManager):
    components = ExtendedComponent

    def signal_energy_penalty(self, state, action, next_state, info):
        return np.abs(np.asarray(action, dtype=np.float64)).sum(axis=-1)


def test_adding_a_component_follows_the_four_steps(tmp_path):
    manager = EnergyRewardManager(TaskType.NAVIGATION, EnergyRewardConfig())
    reward, components = manager.calculate_reward(action=np.array([0.6, -0.8]), info={"progress": 0.5})
    assert components["energy_penalty"] == pytest.approx(-0.05 * 1.4)
    assert reward == pytest.approx(0.5 - 0.01 - 0.07)
    # 4. Metrics and the plot pick it up with no further change.
    assert "energy_penalty" in manager.get_metrics()["reward_components"]
    path = plot_reward_components(manager, tmp_path / "components.png")
    assert path.stat().st_size > 1000
    # Each step left out is reported clearly.
    with pytest.raises(RewardError, match="step 2"):
        EnergyRewardManager(TaskType.NAVIGATION, RewardConfig())

    class Unimplemented(TaskRewardManager):
        components = ExtendedComponent

    with pytest.raises(RewardError, match="step 3"):
        Unimplemented(TaskType.NAVIGATION, EnergyRewardConfig())


def test_an_environment_uses_a_customised_manager():
    from agent.tasks import make_vector_env

    envs = make_vector_env("navigation", 4, reward_config=EnergyRewardConfig())
    envs.use_reward_manager(EnergyRewardManager(TaskType.NAVIGATION, EnergyRewardConfig()))
    envs.reset(seed=0)
    _, reward, _, _, info = envs.step(np.array([0, 1, 2, 3]))
    assert "energy_penalty" in info["reward_components"]
    np.testing.assert_allclose(reward, sum(info["reward_components"].values()))
