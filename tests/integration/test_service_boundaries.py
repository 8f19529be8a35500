"""Bad input at the Memory service's boundary, against the real service: each a 4xx that says
what is wrong, never a 500, never a dropped connection (issue 13, defects 4, 7 and 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import MemoryClient
from agent.config import ConfigError, load_config
from tests.integration import memory_fixtures
from tests.integration.memory_fixtures import MemoryServer

pytestmark = pytest.mark.integration

shared_memory_server = memory_fixtures.shared_memory_server


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"name": "nan-dim", "dim": NaN}', "dim"),
        (b'{"name": "nan-alpha", "dim": 4, "priority_alpha": NaN}', "priority_alpha"),
        (b'{"name": "inf-alpha", "dim": 4, "priority_alpha": Infinity}', "priority_alpha"),
    ],
)
def test_nan_in_a_json_body_is_a_422_naming_the_field_and_the_connection_lives_on(
    shared_memory_server: MemoryServer, body: bytes, field: str
) -> None:
    with shared_memory_server.client() as client:  # one keep-alive connection for both requests
        answer = client.post("/v1/collections", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert [e["loc"][-1] for e in answer.json()["detail"]] == [field]
        assert client.get("/v1/health").status_code == 200


@pytest.mark.parametrize("name", [".", "..", ".hidden", "-x"])
def test_names_no_url_can_address_are_refused_by_service_client_and_config(
    shared_memory_server: MemoryServer, name: str
) -> None:
    with shared_memory_server.client() as client:
        answer = client.post("/v1/collections", json={"name": name, "dim": 4})
        assert answer.status_code == 422, answer.text
    with pytest.raises(ValueError, match="starting with a letter, digit or _"):
        MemoryClient(base_url=shared_memory_server.url, collection=name)
    with pytest.raises(ConfigError, match="not a collection name"):
        load_config(overrides=[f"memory.collection='{name}'"])


def test_the_bearer_scheme_is_case_insensitive_and_a_blank_header_is_refused(tmp_path: Path) -> None:
    server = MemoryServer(tmp_path / "data", token="s3cret-token")
    server.start()
    try:
        with server.client() as client:
            for header, status in [
                ("Bearer s3cret-token", 200), ("bearer s3cret-token", 200), ("BEARER s3cret-token", 200),
                ("Bearer", 401), ("Basic s3cret-token", 401), ("Bearer wrong", 401),
            ]:
                assert client.get("/v1/health", headers={"authorization": header}).status_code == status, header
    finally:
        server.stop()


def test_a_blank_token_is_refused_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "memory", "--host", "127.0.0.1", "--port", str(memory_fixtures.free_port()),
         "--data", str(tmp_path), "--token", "   "],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "token must be non-empty and contain no white space" in done.stderr + done.stdout
