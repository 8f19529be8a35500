"""Per-task profiles in params.yaml: applied for their task only, under --params and --set."""

from __future__ import annotations

import pytest
import yaml

from agent.config import ConfigError, load_config, load_raw, task_profile
from agent.config import DEFAULT_PARAMS_PATH


@pytest.fixture
def params_file(tmp_path, monkeypatch):
    """A copy of the project's params.yaml with a known profile, used as the defaults."""

    def make(profiles):
        data = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())
        data["profiles"] = profiles
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        monkeypatch.setenv("LAGENT_PARAMS", str(path))
        return path

    return make


def test_a_profile_applies_to_its_task_only(params_file):
    params_file({"navigation": {"train": {"num_envs": 8}, "replay": {"local_buffer_size": 5000}}})
    default = load_config()
    assert (default.train.num_envs, default.replay.local_buffer_size) == (1, 1000)
    nav = load_config(overrides=["train.task=navigation"])
    assert (nav.train.num_envs, nav.replay.local_buffer_size) == (8, 5000)
    assert nav.train.learning_rate == default.train.learning_rate  # the rest stays the spec's


def test_params_files_and_set_override_the_profile(params_file, tmp_path):
    params_file({"navigation": {"train": {"num_envs": 8, "gamma": 0.9}}})
    layer = tmp_path / "mine.yaml"
    layer.write_text("train:\n  task: navigation\n  num_envs: 2\n")
    config = load_config([layer], ["train.gamma=0.95"])
    assert (config.train.num_envs, config.train.gamma) == (2, 0.95)


def test_the_task_may_be_chosen_by_any_layer_and_in_any_case(params_file, tmp_path):
    params_file({"navigation": {"train": {"num_envs": 8}}})
    layer = tmp_path / "task.yaml"
    layer.write_text("train:\n  task: NAVIGATION\n")
    assert load_config([layer]).train.num_envs == 8


def test_profiles_may_be_added_for_other_tasks_and_changed_with_set(params_file):
    params_file({"navigation": {"train": {"num_envs": 8}}})
    config = load_config(overrides=["train.task=exploration", "profiles.exploration.train.num_envs=3"])
    assert config.train.num_envs == 3
    config = load_config(overrides=["train.task=navigation", "profiles.navigation.train.num_envs=5"])
    assert config.train.num_envs == 5


@pytest.mark.parametrize(
    "profiles, message",
    [
        ({"navigation": {"train": {"num_env": 8}}}, "profiles.navigation: unknown key 'train.num_env'"),
        ({"navigation": {"train": {"task": "CartPole-v1"}}}, "may not set 'profiles', 'gym_profiles' or 'train.task'"),
        ({"navigation": ["train"]}, "must be a mapping"),
        (["navigation"], "must map task names"),
    ],
)
def test_bad_profiles_are_clear_errors(params_file, profiles, message):
    params_file(profiles)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config()


def test_bad_profile_values_fail_when_the_task_is_chosen(params_file):
    params_file({"navigation": {"train": {"num_envs": 0}}})
    load_config()  # another task: the profile is not used
    with pytest.raises(ConfigError, match="num_envs"):
        load_config(overrides=["train.task=navigation"])


def test_completion_criteria_are_an_open_mapping():
    raw = load_raw(overrides=["curriculum.stages.expert.completion_criteria.collision_rate=0.1"])
    assert raw["curriculum"]["stages"]["expert"]["completion_criteria"]["collision_rate"] == 0.1


def test_the_project_navigation_profile():
    """What params.yaml ships: a bigger buffer and completion-time criteria, for navigation only."""
    profile = task_profile(load_raw(overrides=["train.task=navigation"]))
    assert profile["replay"]["local_buffer_size"] > load_config().replay.local_buffer_size
    from agent.tasks import CurriculumManager

    criteria = [stage.completion_criteria for stage in CurriculumManager.for_task("navigation").stages]
    assert all("completion_time" in c for c in criteria)
    assert all(not stage.completion_criteria for stage in CurriculumManager.for_task("exploration").stages)
    # The spec's numbers are untouched by the profile.
    thresholds = [s.task_params.success_rate_threshold for s in CurriculumManager.for_task("navigation").stages]
    assert thresholds == [0.7, 0.6, 0.5, 0.4]
