"""Every command that draws a bar, run the way a person runs it: in a real (pseudo-)terminal.

Piped output and ``--no-progress`` skip rich's live display, which is how a progress bar that
crashed on its first refresh in a terminal went unnoticed. These tests give each command a pty as
stdin, stdout and stderr, assert it exits 0, and assert that the live display was drawn.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LAGENT = [sys.executable, "-m", "flows"]
LIVE_DISPLAY = "\x1b[?25l"  # rich hides the cursor while a live display is on screen
BAR = "━"


def run_in_terminal(
    args: list[str], cwd: Path, timeout: float = 180, extra_env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run ``lagent ARGS`` on a pseudo-terminal; return its exit status and everything it drew."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40", **(extra_env or {})}
    for key in ("NO_COLOR", "CI"):  # rich draws no live display when told it is not interactive
        env.pop(key, None)
    process = subprocess.Popen([*LAGENT, *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env,
                               close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"lagent {' '.join(args)} ran past {timeout} s:\n{b''.join(chunks).decode(errors='replace')[-3000:]}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal closed: every writer exited
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
    finally:
        os.close(master)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def assert_ran_live(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    """Run in a terminal, check it drew a live display and exited 0; return the text it showed."""
    status, screen = run_in_terminal(args, cwd, extra_env=extra_env)
    assert status == 0, f"lagent {' '.join(args)} exited {status} in a terminal:\n{screen[-3000:]}"
    assert LIVE_DISPLAY in screen and BAR in screen, f"no live display for lagent {' '.join(args)}:\n{screen[-2000:]}"
    assert "Traceback" not in screen, screen[-3000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)  # the text, without colours and cursor moves


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("terminal")


def test_train_by_steps_then_evaluate(workdir: Path) -> None:
    assert_ran_live(["train", "--task", "CartPole-v1", "--timesteps", "1500", "--run-dir", "cartpole",
                     "--eval-episodes", "3"], workdir)
    screen = assert_ran_live(["evaluate", "cartpole", "--episodes", "4"], workdir)
    assert "4/4" in screen  # the evaluation bar counts episodes


def test_train_by_episodes(workdir: Path) -> None:
    assert_ran_live(["train", "--task", "CartPole-v1", "--episodes", "15", "--run-dir", "episodes",
                     "--eval-episodes", "2"], workdir)


def test_curriculum_then_adapt(workdir: Path) -> None:
    screen = assert_ran_live(["train", "--task", "navigation", "--curriculum", "--timesteps", "1500",
                              "--run-dir", "curriculum", "--eval-episodes", "2"], workdir)
    assert "curriculum:" in screen
    assert_ran_live(["adapt", "--source", "curriculum", "--task", "exploration", "--timesteps", "600",
                     "--eval-episodes", "2", "--run-dir", "adapted"], workdir)


def test_optimize(workdir: Path) -> None:
    screen = assert_ran_live(["optimize", "--task", "CartPole-v1", "--trials", "2", "--timesteps", "600",
                              "--storage", f"sqlite:///{workdir / 'study.db'}", "--out", "search", "--no-plots",
                              "--set", "meta.eval_interval=300", "--set", "meta.eval_episodes=2"], workdir)
    assert "2/2" in screen


def test_pipeline_shows_its_stages(workdir: Path, prefect_harness: str) -> None:
    screen = assert_ran_live(
        ["pipeline", "--quick", "--stages", "train_beginner", "search_architecture",
         "--set", "pipeline.stage_timesteps=1000", "--set", "pipeline.search_trials=2",
         "--set", "pipeline.search_timesteps=600", "--set", "pipeline.use_memory=false"],
        workdir,
        extra_env={"PREFECT_API_URL": prefect_harness},  # the session's server: no temporary one to start
    )
    for stage in ("train_beginner", "search_architecture"):
        assert f"✓ {stage}" in screen  # each finished stage is printed above the live rows
    assert "pipeline finished" in screen


def test_pipeline_piped_prints_plain_lines(workdir: Path, prefect_harness: str) -> None:
    done = subprocess.run(
        [*LAGENT, "pipeline", "--quick", "--stages", "search_architecture", "--set", "pipeline.search_trials=2",
         "--set", "pipeline.search_timesteps=600", "--set", "pipeline.use_memory=false"],
        cwd=workdir, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PREFECT_API_URL": prefect_harness},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert LIVE_DISPLAY not in done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[pipeline ")]
    assert any(line.endswith("search_architecture: started") for line in lines), done.stdout
    assert any("search_architecture: done in" in line and "(1/1 stages)" in line for line in lines), done.stdout
