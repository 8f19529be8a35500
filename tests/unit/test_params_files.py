"""Params files a person might hand over by mistake, or on purpose: each is a one-line error that
says what is wrong, before anything is built from the file (issue 13, defects 3 and 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_override
from flows.cli import main


def _bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "x:\n" + "\n".join("  " + line for line in lines) + f"\ntrain:\n  task: *a{levels - 1}\n"


def _cli_error(path: Path, capsys) -> str:
    """``lagent train --params PATH``: exit 2 and one line on stderr, which is returned."""
    assert main(["train", "--params", str(path), "--timesteps", "10", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())  # nine levels: 10^9 strings if expanded
    with pytest.raises(ConfigError, match="anchors and aliases") as caught:
        load_config([path])
    assert "lol" not in str(caught.value)  # never echo the input back
    assert "anchors and aliases" in _cli_error(path, capsys)


def test_duplicate_keys_are_an_error_not_last_wins(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  gamma: 0.9\n  gamma: 0.8\n")
    with pytest.raises(ConfigError, match=r"line 3: .*duplicate key 'gamma'"):
        load_config([path])
    assert "duplicate key 'gamma'" in _cli_error(path, capsys)


def test_a_section_given_as_a_list_says_so(tmp_path: Path, capsys) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="'train' is a section of settings: give it a mapping"):
        load_config([path])
    assert "'train' is a section of settings" in _cli_error(path, capsys)


def test_a_binary_file_through_the_cli_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--params", str(path), "--timesteps", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lagent: error: {path} is not a UTF-8 text file (a params file is YAML text)"


def test_an_alias_in_a_set_value_is_taken_as_text_not_expanded() -> None:
    assert parse_override("train.task=*anything") == {"train": {"task": "*anything"}}
