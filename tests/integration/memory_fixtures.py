"""The real Memory service in a subprocess, for integration tests.

Import the fixtures into a test module (``from tests.integration.memory_fixtures import
memory_server``) or use :class:`MemoryServer` directly. The server binds 127.0.0.1 on a free port
and keeps its data in a temporary directory; ``kill()`` is ``kill -9``, ``restart()`` starts it
again on the same port and data, so durability can be tested as a crash would test it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MemoryServer:
    """``python -m memory`` on 127.0.0.1; its output goes to ``<data>/server.log``."""

    def __init__(
        self, data_dir: Path, *, token: str | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.token = token
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs: object) -> httpx.Client:
        """A synchronous httpx client for this server (with the token, if any)."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 30.0) -> None:
        command = [
            sys.executable,
            "-m",
            "memory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data",
            str(self.data_dir),
            "--log-level",
            "warning",
            *self.args,
        ]
        if self.token:
            command += ["--token", self.token]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"memory service exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if (
                    httpx.get(f"{self.url}/v1/health", headers=self.headers, timeout=1).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"memory service not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """A graceful stop (SIGTERM), as a deployment would do it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, crash: bool = False) -> None:
        self.kill() if crash else self.stop()
        self.start()


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[MemoryServer]:
    """A fresh service for one test (its own data directory)."""
    server = MemoryServer(tmp_path / "memory-data")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def shared_memory_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemoryServer]:
    """One service for a whole module; tests keep apart by using their own collection names."""
    server = MemoryServer(tmp_path_factory.mktemp("memory") / "memory-data")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def transitions(n: int, dim: int, seed: int = 0, start: int = 0) -> dict[str, np.ndarray]:
    """Rows whose obs[:, 0] is their position in the stream, so order and identity are checkable."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, dim)).astype(np.float32)
    obs[:, 0] = np.arange(start, start + n)
    return {
        "obs": obs,
        "actions": rng.integers(0, 3, n),
        "rewards": rng.standard_normal(n).astype(np.float32),
        "next_obs": obs + 0.5,
        "dones": (rng.random(n) < 0.2).astype(np.float32),
    }
