"""params.yaml is the single source of defaults; every layer is validated with clear errors."""

from __future__ import annotations

import pytest

from agent.config import (
    ConfigError,
    collect_overrides,
    config_from_dict,
    load_config,
    parse_override,
    with_overrides,
)


def test_defaults_are_the_specs():
    config = load_config()
    assert config.network.hidden_size == 256
    assert config.train.learning_rate == pytest.approx(0.001)
    assert config.train.gamma == pytest.approx(0.99)
    assert config.replay.local_buffer_size == 1000
    assert config.replay.memory_batch_size == 32
    assert config.train.batch_size == 32
    assert (config.train.epsilon_start, config.train.epsilon_end, config.train.epsilon_decay) == (1.0, 0.01, 0.995)
    assert config.train.max_episodes == 1000
    assert config.train.max_steps_per_episode == 500
    assert config.train.checkpoint_frequency == 100
    assert config.memory.base_url == "http://localhost:8401"
    assert config.memory.timeout == 30


def test_layers_apply_in_order(tmp_path):
    layer = tmp_path / "layer.yaml"
    layer.write_text("train:\n  gamma: 0.9\n  batch_size: 8\n")
    config = load_config(layer, ["train.gamma=0.95"])
    assert config.train.gamma == pytest.approx(0.95)  # --set beats the file
    assert config.train.batch_size == 8  # the file beats the defaults
    assert config.train.learning_rate == pytest.approx(0.001)  # untouched keys keep defaults


def test_unknown_key_names_the_source_and_suggests(tmp_path):
    layer = tmp_path / "typo.yaml"
    layer.write_text("train:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'train.learnig_rate' \(did you mean 'train.learning_rate'\?\)"):
        load_config(layer)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.gamma=abc", "train.gamma"),
        ("train.gamma=1.5", "less than or equal to 1"),
        ("train.batch_size=0", "greater than or equal to 1"),
        ("train.loss=l1", "huber"),
        ("nosection.key=1", "unknown key 'nosection'"),
        ("gamma", "section.key=value"),
    ],
)
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_override_values_are_yaml():
    assert parse_override("train.max_episodes=null") == {"train": {"max_episodes": None}}
    assert parse_override("train.double_dqn=false") == {"train": {"double_dqn": False}}
    assert parse_override("train.task=CartPole-v1") == {"train": {"task": "CartPole-v1"}}


def test_config_is_frozen_and_with_overrides_validates():
    config = load_config()
    with pytest.raises(Exception):
        config.train.gamma = 0.5  # type: ignore[misc]
    changed = with_overrides(config, train={"gamma": 0.5})
    assert changed.train.gamma == 0.5 and config.train.gamma == pytest.approx(0.99)
    with pytest.raises(ConfigError, match="unknown key 'train.gama'"):
        with_overrides(config, train={"gama": 0.5})


def test_collect_overrides_keeps_only_named_keys():
    named = collect_overrides([], ["train.total_timesteps=500", "run.seed=3"])
    assert named == {"train": {"total_timesteps": 500}, "run": {"seed": 3}}


def test_saved_config_round_trips():
    config = load_config(overrides=["train.gamma=0.9", "network.dueling=true"])
    assert config_from_dict(config.to_dict()) == config


def test_memory_collection_is_per_run_unless_named():
    from agent.config import with_run_collection

    config = load_config()
    assert config.memory.collection == "auto"
    assert load_config(overrides=["memory.collection=null"]).memory.collection == "auto"
    first, second = (with_run_collection(config, "ALE/Pong-v5").memory.collection for _ in range(2))
    assert first != second and first.startswith("ALE-Pong-v5-")
    assert with_run_collection(config, "x").train == config.train
    shared = load_config(overrides=["memory.collection=navigation-shared"])
    assert with_run_collection(shared, "x").memory.collection == "navigation-shared"
    with pytest.raises(ConfigError, match=r"memory.collection: .*'no spaces' is not a collection name: use 'auto'"):
        load_config(overrides=["memory.collection=no spaces"])
