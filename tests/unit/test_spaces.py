"""Action spaces: bounds, the three gates (validation, clipping, safety), normalisation, tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tasks import (
    ActionBounds,
    ActionSpace,
    ActionSpaceError,
    ActionSpaceFactory,
    ActionType,
    CooperativeActionSpace,
    ManipulationActionSpace,
    NavigationActionSpace,
)

SPACES = {
    "navigation": lambda: NavigationActionSpace(),
    "exploration": lambda: NavigationActionSpace(tool=True),
    "manipulation": lambda: ManipulationActionSpace(gripper=True),
    "cooperative": lambda: CooperativeActionSpace(3),
}


@st.composite
def space_and_action(draw):
    space = SPACES[draw(st.sampled_from(sorted(SPACES)))]()
    values = []
    for low, high, whole in zip(space.bounds.low, space.bounds.high, space.integer_dims):
        if whole:
            values.append(float(draw(st.integers(int(low), int(high)))))
        else:
            values.append(draw(st.floats(low, high, allow_nan=False)))
    return space, np.array(values)


@settings(max_examples=200, deadline=None)
@given(space_and_action())
def test_normalise_then_denormalise_returns_the_action(case):
    space, action = case
    normalized = space.normalize_action(action)
    assert np.all(normalized >= -1.0 - 1e-12) and np.all(normalized <= 1.0 + 1e-12)
    np.testing.assert_allclose(space.denormalize_action(normalized), action, rtol=0, atol=1e-9)
    assert space.validate_action(action)


def test_bounds_validate_single_and_batch():
    bounds = ActionBounds([-1.0, 0.0], [1.0, 2.0])
    assert bounds.validate([0.5, 1.0]) is True
    assert bounds.validate([1.5, 1.0]) is False
    np.testing.assert_array_equal(bounds.validate([[0, 0], [0, 3], [np.nan, 1]]), [True, False, False])
    np.testing.assert_array_equal(bounds.clip([[5.0, -1.0], [np.nan, 1.0]]), [[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    "low, high, message",
    [([0.0], [0.0], "low < high"), ([0.0, 1.0], [1.0], "dimensions"), ([np.inf], [1.0], "finite"), ([], [], "non-empty")],
)
def test_inconsistent_bounds_are_rejected(low, high, message):
    with pytest.raises(ActionSpaceError, match=message):
        ActionBounds(low, high)


def test_action_type_must_match_the_channels():
    bounds = ActionBounds([0.0, 0.0], [1.0, 3.0])
    with pytest.raises(ActionSpaceError, match="continuous space cannot have integer"):
        ActionSpace(bounds, ActionType.CONTINUOUS, integer_dims=[1])
    with pytest.raises(ActionSpaceError, match="hybrid"):
        ActionSpace(bounds, ActionType.HYBRID)
    assert ActionSpace(bounds, ActionType.DISCRETE, integer_dims=[0, 1]).action_type is ActionType.DISCRETE
    with pytest.raises(ActionSpaceError, match="ActionType"):
        ActionSpace(bounds, "continuous")  # type: ignore[arg-type]


def test_invalid_actions_are_detected_clipped_and_counted():
    space = NavigationActionSpace()
    batch = np.array([[0.2, 0.3], [1.7, 0.0], [np.nan, 0.0], [-0.5, -3.0]])
    np.testing.assert_array_equal(space.validate_action(batch), [True, False, False, False])
    result = space.process(batch)
    np.testing.assert_array_equal(result.invalid, [False, True, True, True])
    np.testing.assert_array_equal(result.clipped, [False, True, True, True])
    np.testing.assert_allclose(result.action, [[0.2, 0.3], [1.0, 0.0], [0.0, 0.0], [-0.5, -1.0]])
    metrics = space.get_metrics()
    assert metrics["invalid_action_count"] == 3 and metrics["actions_processed"] == 4
    assert metrics["invalid_action_rate"] == pytest.approx(0.75)
    assert space.validate_action([0.1]) is False  # wrong shape: invalid, not an exception
    with pytest.raises(ActionSpaceError, match="shape"):
        space.process([0.1, 0.2, 0.3])


def test_discrete_channels_must_be_whole():
    space = NavigationActionSpace(tool=True)
    assert space.action_type is ActionType.HYBRID
    assert not space.validate_action([0.0, 0.0, 0.5])
    np.testing.assert_array_equal(space.clip_action([0.0, 0.0, 0.7]), [0.0, 0.0, 1.0])


def test_navigation_speed_is_limited_near_obstacles():
    space = NavigationActionSpace(max_velocity_near_obstacle=0.5, safety_distance=0.5)
    actions = np.array([[1.0, 0.0], [0.6, 0.8], [0.3, 0.0]])
    near = space.apply_safety_constraints(actions, {"obstacle_distance": np.array([0.2, 0.2, 0.2])})
    np.testing.assert_allclose(np.hypot(near[:, 0], near[:, 1]), [0.5, 0.5, 0.3])
    np.testing.assert_allclose(near[1] / np.linalg.norm(near[1]), [0.6, 0.8])  # direction kept
    far = space.apply_safety_constraints(actions, {"obstacle_distance": 2.0})
    np.testing.assert_allclose(far, actions)
    result = space.process(actions, {"obstacle_distance": np.array([0.1, 3.0, 0.1])})
    np.testing.assert_array_equal(result.clipped, [True, False, False])
    np.testing.assert_array_equal(result.invalid, [False, False, False])
    assert space.safety_count == 1


def test_acceleration_bounds_make_velocity_change_gradually():
    space = ActionSpaceFactory.create_action_space(
        "navigation", action_bounds={"velocity": [-1.0, 1.0], "acceleration": [-0.5, 0.5]}
    )
    safe = space.apply_safety_constraints([1.0, -1.0], {"previous_action": [0.0, 0.0], "dt": 1.0})
    np.testing.assert_allclose(safe, [0.5, -0.5])


def test_manipulation_joint_limits_are_validated_and_enforced():
    space = ManipulationActionSpace(3, velocity_limit=0.4, joint_limits=(-1.0, 1.0))
    q = np.array([[0.9, 0.0, -0.95], [0.0, 0.0, 0.0]])
    command = np.array([[0.4, 0.4, -0.4], [0.4, 0.0, 0.0]])
    context = {"joint_positions": q, "dt": 0.5}
    np.testing.assert_array_equal(space.validate_action(command, context), [False, True])
    safe = space.apply_safety_constraints(command, context)
    np.testing.assert_allclose(q + safe * 0.5, [[1.0, 0.2, -1.0], [0.2, 0.0, 0.0]])
    assert not space.validate_action([0.5, 0.0, 0.0])  # over the velocity limit


def test_tool_use_is_invalid_when_tools_are_disabled():
    space = ManipulationActionSpace(gripper=True)
    grasp = space.discrete_actions()[-2]
    assert grasp[-1] == 1.0
    assert space.validate_action(grasp, {"tools_enabled": True})
    assert not space.validate_action(grasp, {"tools_enabled": False})
    assert space.apply_safety_constraints(grasp, {"tools_enabled": False})[-1] == 0.0


def test_cooperative_space_decomposes_per_agent_and_keeps_distance():
    space = CooperativeActionSpace(2, comm_levels=3, min_agent_distance=1.0, max_velocity_near_obstacle=0.5)
    assert space.action_type is ActionType.HYBRID and space.dim == 6
    flat = np.array([1.0, 0.0, 2.0, 0.0, -1.0, 0.0])
    np.testing.assert_array_equal(space.decompose(flat), [[1.0, 0.0, 2.0], [0.0, -1.0, 0.0]])
    np.testing.assert_array_equal(space.compose(space.decompose(flat)), flat)
    assert not space.validate_action([1.0, 0.0, 3.0, 0.0, 0.0, 0.0])  # signal out of bounds
    safe = space.apply_safety_constraints(flat, {"teammate_distance": np.array([0.5, 2.0])})
    np.testing.assert_allclose(space.decompose(safe)[:, :2], [[0.5, 0.0], [0.0, -1.0]])


@pytest.mark.parametrize(
    "space, size",
    [
        (NavigationActionSpace(), 9),
        (NavigationActionSpace(tool=True), 10),
        (ManipulationActionSpace(), 15),
        (ManipulationActionSpace(gripper=True), 16),
        (CooperativeActionSpace(3), 18),
    ],
)
def test_discretisations_are_documented_valid_tables_ending_in_stop(space, size):
    table = space.discrete_actions()
    assert table.shape[0] == size == len(space.action_labels())
    per_agent = table.shape[1]
    bounds = ActionBounds(space.bounds.low[:per_agent], space.bounds.high[:per_agent])
    assert np.all(bounds.validate(table))
    assert not np.any(table[-1])  # stop: no motion, no tool, silent
    assert space.action_labels()[-1].startswith("stop")
    with pytest.raises(ActionSpaceError):
        space.from_discrete(size)


def test_factory_honours_the_spec_config():
    space = ActionSpaceFactory.create_action_space(
        task_type="navigation",
        num_agents=2,
        action_bounds={"velocity": [-0.8, 0.8]},
        safety_constraints={"max_velocity_near_obstacle": 0.3, "min_agent_distance": 1.5},
    )
    assert isinstance(space, CooperativeActionSpace) and space.num_agents == 2
    assert space.min_agent_distance == 1.5 and space.movement.max_velocity_near_obstacle == 0.3
    assert space.bounds.high[0] == 0.8
    assert isinstance(ActionSpaceFactory.create_action_space("navigation"), NavigationActionSpace)
    assert isinstance(ActionSpaceFactory.create_action_space("manipulation"), ManipulationActionSpace)
    assert ActionSpaceFactory.create_action_space("exploration").tool
    with pytest.raises(ActionSpaceError, match="unknown task type"):
        ActionSpaceFactory.create_action_space("flying")
    with pytest.raises(ActionSpaceError, match="unknown safety_constraints"):
        ActionSpaceFactory.create_action_space("navigation", safety_constraints={"speed": 1})
    with pytest.raises(ActionSpaceError, match="low < high"):
        ActionSpaceFactory.create_action_space("navigation", action_bounds={"velocity": [1, -1]})


def test_sampling_is_seeded_and_state_round_trips():
    space = ManipulationActionSpace(gripper=True, seed=3)
    samples = space.sample(50)
    assert np.all(space.validate_action(samples))
    space.process(samples)
    state = space.state_dict()
    expected = space.sample(4)
    other = ManipulationActionSpace(gripper=True)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.sample(4), expected)
    assert other.get_metrics() == space.get_metrics()
