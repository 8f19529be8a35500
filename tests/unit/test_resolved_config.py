"""One resolved Config holds every section and is passed down: what it says is what the tasks use.

``--set rewards.*``, ``--set tasks.*``, ``--set curriculum.*`` and a task profile's entries for
those sections were once validated and then lost (the task world read params.yaml itself); here
each of them reaches the environment, its reward manager or the curriculum through ``config=``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.config import (
    DEFAULT_PARAMS_PATH,
    Config,
    ConfigError,
    MetaConfig,
    config_for_task,
    config_from_dict,
    default_config,
    load_config,
    with_overrides,
)
from agent.tasks import (
    ActionSpaceFactory,
    CurriculumManager,
    RewardComponent,
    RewardConfig,
    TaskParameters,
    TaskRewardManager,
    create_task,
    make_vector_env,
    task_spaces,
)

SECTIONS = {
    "run", "network", "replay", "train", "evaluate", "memory", "meta", "rewards", "curriculum", "tasks", "distributed",
}


def _weight(manager: TaskRewardManager, component: RewardComponent) -> float:
    return float(manager.weights[manager.order.index(component)])


# --------------------------------------------------------------------------- rewards


def test_a_rewards_override_reaches_the_env_and_its_collision_reward():
    config = load_config(overrides=["rewards.collision_penalty=-3.0"])
    assert config.rewards.collision_penalty == -3.0
    envs = make_vector_env("navigation", 2, config=config)
    try:
        assert envs.rewards.config.collision_penalty == -3.0
        assert _weight(envs.rewards, RewardComponent.COLLISION_PENALTY) == -3.0
        # a step whose only event is a collision pays the time penalty and the collision penalty
        reward, parts = envs.rewards.calculate_reward(info={"collisions": 1.0})
        assert parts["collision_penalty"] == -3.0
        assert reward == pytest.approx(config.rewards.time_penalty - 3.0)
    finally:
        envs.close()
    plain = make_vector_env("navigation", 2)  # no config: params.yaml's -0.5, as before
    try:
        assert _weight(plain.rewards, RewardComponent.COLLISION_PENALTY) == default_config().rewards.collision_penalty
        assert default_config().rewards.collision_penalty != -3.0
    finally:
        plain.close()


def test_a_partial_reward_mapping_takes_the_rest_from_the_config():
    config = load_config(overrides=["rewards.collision_penalty=-3.0"])
    envs = make_vector_env("exploration", 1, reward_config={"time_penalty": -0.02}, config=config)
    try:
        assert (envs.rewards.config.time_penalty, envs.rewards.config.collision_penalty) == (-0.02, -3.0)
    finally:
        envs.close()
    assert RewardConfig.from_config(config).collision_penalty == -3.0
    assert RewardConfig.from_config(config, completion_bonus=5.0).completion_bonus == 5.0
    assert RewardConfig() == RewardConfig.from_config(default_config())


def test_the_reward_manager_takes_a_resolved_config():
    config = load_config(overrides=["rewards.collision_penalty=-3.0", "tasks.exploration.resource_value=7.0"])
    manager = TaskRewardManager("exploration", config)
    assert _weight(manager, RewardComponent.COLLISION_PENALTY) == -3.0
    assert manager.resource_value == 7.0
    envs = make_vector_env("exploration", 1, config=config)
    try:
        assert envs.rewards.resource_value == 7.0
    finally:
        envs.close()


# --------------------------------------------------------------------------- tasks


def test_a_tasks_dt_override_changes_the_step_and_the_episode_limit():
    default = make_vector_env("navigation", 1)
    config = load_config(overrides=["tasks.dt=0.25"])
    envs = make_vector_env("navigation", 1, config=config)
    try:
        assert envs.dt == 0.25 and default.dt == default_config().tasks.dt != 0.25
        time_limit = envs.params.time_limit
        assert envs.max_steps == math.ceil(time_limit / 0.25) == 2 * default.max_steps
        assert envs.describe()["dt"] == 0.25
    finally:
        envs.close()
        default.close()
    single = create_task("navigation", config=config)
    assert single.batch.max_steps == math.ceil(single.batch.params.time_limit / 0.25)


def test_task_settings_decide_the_spaces_and_the_team():
    base_obs, base_actions = task_spaces("navigation")
    config = load_config(overrides=["tasks.range_sensors=4", "tasks.multi_agent.num_agents=4"])
    obs, actions = task_spaces("navigation", config=config)
    assert (obs, actions) == (base_obs - 4, base_actions)
    team = make_vector_env("multi_agent", 2, config=config)
    try:
        assert (team.agents, team.num_envs) == (4, 8)
    finally:
        team.close()


def test_the_action_space_factory_takes_the_config_or_its_tasks_section():
    config = load_config(overrides=["tasks.max_velocity_near_obstacle=0.25", "tasks.safety_distance=0.75"])
    for given in (config, config.tasks):
        space = ActionSpaceFactory.create_action_space("navigation", config=given)
        assert (space.max_velocity_near_obstacle, space.safety_distance) == (0.25, 0.75)
    default = ActionSpaceFactory.create_action_space("navigation")
    assert default.max_velocity_near_obstacle == default_config().tasks.max_velocity_near_obstacle


def test_a_stage_override_is_the_default_task_params():
    config = load_config(overrides=["curriculum.stages.beginner.time_limit=100"])
    assert TaskParameters.default(config=config).time_limit == 100.0
    envs = make_vector_env("navigation", 1, config=config)
    try:
        assert envs.params.time_limit == 100.0
        assert envs.max_steps == math.ceil(100.0 / config.tasks.dt)
    finally:
        envs.close()


def test_a_config_that_is_not_one_is_refused():
    with pytest.raises(TypeError, match="agent.config.Config"):
        make_vector_env("navigation", 1, config={"tasks": {"dt": 0.1}})


# --------------------------------------------------------------------------- curriculum


def test_a_curriculum_window_override_reaches_for_task():
    config = load_config(overrides=["curriculum.window=7", "curriculum.history_limit=20"])
    for manager in (
        CurriculumManager.for_task("navigation", config=config),
        CurriculumManager.for_task("exploration", config=config),
        CurriculumManager(config=config),
        CurriculumManager.from_params(config),
    ):
        assert {(s.window, s.history_limit) for s in manager.stages} == {(7, 20)}
    assert {s.window for s in CurriculumManager.for_task("navigation").stages} == {default_config().curriculum.window}


def test_for_task_applies_the_tasks_profile_to_the_config():
    config = load_config(overrides=["curriculum.window=7"])  # loaded for CartPole: no profile
    navigation = CurriculumManager.for_task("navigation", config=config)
    assert all("completion_time" in s.completion_criteria for s in navigation.stages)  # the profile's
    assert navigation.stages[0].window == 7  # and the user's window
    assert [s.completion_criteria for s in navigation.stages] == [
        s.completion_criteria for s in CurriculumManager.for_task("navigation").stages
    ]


# --------------------------------------------------------------------------- profiles


@pytest.fixture
def profiled(tmp_path, monkeypatch):
    """params.yaml with a navigation profile that sets rewards, tasks and curriculum entries."""
    data = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())
    data["profiles"] = {
        "navigation": {
            "rewards": {"collision_penalty": -2.0},
            "tasks": {"dt": 0.25, "navigation": {"goal_radius": 0.6}},
            "curriculum": {"window": 10, "stages": {"beginner": {"completion_criteria": {"completion_time": 99}}}},
        }
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("LAGENT_PARAMS", str(path))
    return path


def test_a_profiles_rewards_tasks_and_curriculum_take_effect(profiled):
    loaded = load_config(overrides=["train.task=navigation"])
    moved = config_for_task(load_config(), "navigation")
    assert moved == loaded
    for config in (loaded, moved):
        assert config.rewards.collision_penalty == -2.0
        assert (config.tasks.dt, config.tasks.navigation.goal_radius) == (0.25, 0.6)
        assert config.curriculum.window == 10
        assert config.curriculum.stages["beginner"].completion_criteria == {"completion_time": 99.0}
    envs = make_vector_env("navigation", 1, config=moved)
    try:
        assert _weight(envs.rewards, RewardComponent.COLLISION_PENALTY) == -2.0
        assert envs.dt == 0.25 and envs._goal_radius == 0.6
    finally:
        envs.close()
    curriculum = CurriculumManager.for_task("navigation", config=load_config())
    assert curriculum.stages[0].window == 10
    assert curriculum.stages[0].completion_criteria == {"completion_time": 99.0}
    assert CurriculumManager.for_task("navigation").stages[0].window == 10  # no config: the profile too
    # Another task: the navigation profile's values go, back to the defaults.
    back = config_for_task(moved, "exploration")
    assert back.rewards == load_config().rewards and back.tasks == load_config().tasks
    assert back.curriculum == load_config().curriculum


def test_settings_chosen_by_the_user_survive_the_profile(profiled):
    chosen = load_config(overrides=["rewards.collision_penalty=-1.0", "curriculum.stages.beginner.min_episodes=5"])
    moved = config_for_task(chosen, "navigation")
    assert moved.rewards.collision_penalty == -1.0  # the user's, not the profile's -2.0
    assert moved.tasks.dt == 0.25  # the profile's (the user did not choose dt)
    beginner = moved.curriculum.stages["beginner"]
    assert beginner.min_episodes == 5 and beginner.completion_criteria == {"completion_time": 99.0}
    assert load_config(overrides=["train.task=navigation", "rewards.collision_penalty=-1.0"]).rewards.collision_penalty == -1.0


# --------------------------------------------------------------------------- the config itself


def test_to_dict_holds_every_section_and_round_trips():
    config = load_config(
        overrides=[
            "rewards.collision_penalty=-3.0",
            "tasks.dt=0.25",
            "tasks.exploration.grid_cells=6",
            "curriculum.window=7",
            "curriculum.stages.expert.completion_criteria.collision_rate=0.1",
            "meta.n_trials=3",
            "train.gamma=0.9",
        ]
    )
    data = config.to_dict()
    assert set(data) == SECTIONS == set(Config.model_fields)
    assert data["rewards"]["collision_penalty"] == -3.0 and data["meta"]["n_trials"] == 3
    assert isinstance(config.meta, MetaConfig)
    again = config_from_dict(data)
    assert again == config
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == config  # as config.yaml saves it


def test_an_old_checkpoints_config_without_the_new_sections_loads():
    saved = load_config(overrides=["train.task=navigation", "train.gamma=0.9"]).to_dict()
    old = {name: values for name, values in saved.items() if name not in {"meta", "rewards", "curriculum", "tasks"}}
    restored = config_from_dict(old)
    assert restored.train.gamma == 0.9
    assert restored == load_config(overrides=["train.task=navigation", "train.gamma=0.9"])
    # filled as loaded for the run's task: the navigation profile's criteria, as for_task gave them
    assert all("completion_time" in s.completion_criteria for s in restored.curriculum.stages.values())
    partial = {**old, "rewards": {"collision_penalty": -3.0}}
    assert config_from_dict(partial).rewards.collision_penalty == -3.0
    assert config_from_dict(partial).rewards.time_penalty == default_config().rewards.time_penalty


def test_a_saved_open_mapping_is_not_merged_with_todays_profile():
    """A navigation run saved with criteria the user chose keeps exactly those."""
    saved = load_config(overrides=["train.task=navigation"]).to_dict()
    saved["curriculum"]["stages"]["beginner"]["completion_criteria"] = {"collision_rate": 0.2}
    restored = config_from_dict(saved)
    assert restored.curriculum.stages["beginner"].completion_criteria == {"collision_rate": 0.2}


def test_with_overrides_reaches_the_new_sections():
    config = default_config("navigation")
    changed = with_overrides(
        config,
        rewards={"collision_penalty": -3.0},
        tasks={"navigation": {"goal_radius": 0.5}},
        curriculum={"stages": {"beginner": {"completion_criteria": {"collision_rate": 0.1}}}},
    )
    assert changed.rewards.collision_penalty == -3.0 and changed.tasks.navigation.goal_radius == 0.5
    assert changed.tasks.navigation.min_goal_distance == config.tasks.navigation.min_goal_distance
    assert changed.curriculum.stages["beginner"].completion_criteria == {"completion_time": 140.0, "collision_rate": 0.1}
    with pytest.raises(ConfigError, match="unknown key 'rewards.colision_penalty'"):
        with_overrides(config, rewards={"colision_penalty": -3.0})
    with pytest.raises(ConfigError, match="collision_penalty"):
        with_overrides(config, rewards={"collision_penalty": 1.0})  # a penalty is <= 0


def test_bad_values_in_the_new_sections_are_clear_errors():
    with pytest.raises(ConfigError, match=r"configuration: tasks.dt: Input should be greater than 0"):
        load_config(overrides=["tasks.dt=0"])
    with pytest.raises(ConfigError, match=r"configuration: meta.pruner"):
        load_config(overrides=["meta.pruner=never"])
    with pytest.raises(ConfigError, match=r"unknown key 'curriculum.windw'"):
        load_config(overrides=["curriculum.windw=3"])


def test_default_config_is_cached_and_follows_the_params_file(tmp_path, monkeypatch):
    assert default_config() is default_config()
    assert default_config("navigation") == load_config(overrides=["train.task=navigation"])
    data = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())
    data["rewards"]["collision_penalty"] = -4.0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("LAGENT_PARAMS", str(path))
    assert default_config().rewards.collision_penalty == -4.0
    envs = make_vector_env("navigation", 1)
    try:
        assert _weight(envs.rewards, RewardComponent.COLLISION_PENALTY) == -4.0
    finally:
        envs.close()


def test_no_module_of_the_task_world_reads_params_yaml():
    root = Path(__file__).resolve().parents[2] / "agent" / "tasks"
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        assert not re.search(r"\b(load_raw|read_yaml|_read_yaml|default_params_path|DEFAULT_PARAMS_PATH)\b", text), path.name


def test_default_behaviour_is_unchanged_without_a_config():
    """No config and the defaults passed explicitly give the same env, step for step."""
    a = make_vector_env("exploration", 2)
    b = make_vector_env("exploration", 2, config=default_config())
    try:
        obs_a, _ = a.reset(seed=3)
        obs_b, _ = b.reset(seed=3)
        rng = np.random.default_rng(0)
        for _ in range(20):
            actions = rng.integers(0, a.single_action_space.n, a.num_envs)
            out_a, out_b = a.step(actions), b.step(actions)
            for x, y in zip(out_a[:4], out_b[:4]):
                np.testing.assert_array_equal(x, y)
        assert np.array_equal(a.rewards.weights, b.rewards.weights) and a.max_steps == b.max_steps
    finally:
        a.close()
        b.close()
