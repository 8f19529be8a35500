"""The console script as a separate process: a bad input is one line on stderr, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_console_script_never_prints_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: -3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--params", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.batch_size" in proc.stderr
