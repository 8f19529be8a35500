"""ensure_memory_service and ``lagent train --memory``: a real service is started when none
answers, reused when one does, stopped only by whoever started it, and failures are clear."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.cli import main
from flows.memory_service import MemoryServiceError, ensure_memory_service
from tests.integration.memory_fixtures import MemoryServer, free_port

pytestmark = pytest.mark.integration


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def other_http_server() -> Iterator[str]:
    """Some other program's HTTP server (404 for everything) holding a port on loopback."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_starts_a_service_when_none_answers_reuses_one_that_does_and_stops_its_own(
    tmp_path: Path,
) -> None:
    url = f"http://localhost:{free_port()}"
    with ensure_memory_service(url, tmp_path / "data") as service:
        assert service.started and service.healthy and service.pid is not None
        assert answers(url)
        with ensure_memory_service(url, tmp_path / "elsewhere") as again:
            assert not again.started and again.healthy  # the one already answering
        assert answers(url)  # the inner block did not stop what it did not start
    assert not answers(url)  # stopped at exit by the block that started it
    assert (tmp_path / "data" / "memory.db").is_file()
    assert not (tmp_path / "elsewhere").exists()


def test_a_service_that_cannot_start_is_a_clear_error_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as holder:  # bound, not listening: connections are refused at once
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(MemoryServiceError) as caught:
            with ensure_memory_service(url, tmp_path / "data"):
                pytest.fail("the block must not run")
    error = caught.value
    assert "exited with status" in error.headline and "address already in use" in error.headline
    assert "\n" not in error.headline and error.log_path == tmp_path / "data" / "memory-service.log"
    assert "-m memory --host 127.0.0.1" in str(error)  # the message carries the log's tail


def test_another_program_on_the_port_is_refused(other_http_server: str, tmp_path: Path) -> None:
    with pytest.raises(MemoryServiceError, match="not as a Memory service"):
        with ensure_memory_service(other_http_server, tmp_path / "data"):
            pass
    assert not (tmp_path / "data").exists()


def test_a_remote_service_that_is_down_is_not_started_here(tmp_path: Path) -> None:
    with ensure_memory_service("http://memory.invalid:8401", tmp_path / "data") as service:
        assert not service.started and not service.healthy
    assert not (tmp_path / "data").exists()


def test_lagent_train_memory_starts_the_service_and_stores_every_transition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    data = tmp_path / "memory-data"
    run_dir = tmp_path / "run"
    argv = [
        "train", "--memory", "--task", "CartPole-v1", "--timesteps", "1200", "--seed", "2",
        "--run-dir", str(run_dir), "--eval-episodes", "0", "--json", "--no-progress",
        "--set", "network.hidden_size=16", "--set", "train.learning_starts=100",
        "--set", f"memory.base_url=http://127.0.0.1:{port}",
        "--set", f"memory.data_dir={data}", "--set", "memory.collection=cli-run",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    memory = result["train"]["memory"]
    assert result["train"]["global_step"] == 1200
    assert memory["delivered"] == 1200 and memory["queued_writes"] == 0 and memory["dropped"] == 0
    assert not answers(f"http://127.0.0.1:{port}")  # the CLI stopped the service it started
    assert not (run_dir / "memory-outbox").exists()  # drained, so tidied away
    assert "enabled: true" in (run_dir / "config.yaml").read_text()  # a resume keeps using it

    server = MemoryServer(data)  # the durable log has the run's transitions
    server.start()
    try:
        with server.client() as http:
            assert http.get("/v1/collections/cli-run").json()["size"] == 1200
    finally:
        server.kill()


def test_lagent_train_memory_fails_in_one_line_when_the_port_is_taken(
    other_http_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train", "--memory", "--timesteps", "10", "--run-dir", str(tmp_path / "run"),
        "--no-progress", "--set", f"memory.base_url={other_http_server}",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lagent: error: ") and "not as a Memory service" in err
    assert len(err.splitlines()) == 1
