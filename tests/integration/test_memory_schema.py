"""Schemathesis against the service's own OpenAPI schema: requests generated from it (fitting the
schema, and deliberately not fitting it; JSON and binary bodies) go to a real service, and not one
answer may be a 5xx.

The schema is read from the app object (it does not depend on stored data), so pytest can list
one test per operation; the requests go to the running process. Schemathesis' own pytest plugin
is not used: with pytest 9 it fails before running anything. The one 5xx allowed is 507, where
the schema documents it: a collection refused because it would exceed the memory budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from memory import wire
from memory.app import create_app
from memory.settings import Settings
from tests.integration.memory_fixtures import MemoryServer

pytestmark = pytest.mark.integration

BODY_LIMIT_MB = 1
SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(data_dir=Path("unused"), max_body_bytes=BODY_LIMIT_MB * 2**20)).openapi()
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Negative cases need something to break: operations with only a (fixed) path name have none.
CASES = [
    pytest.param(operation, mode, id=f"{operation.label} {mode}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or list(operation.query) or operation.body
]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemoryServer]:
    server = MemoryServer(
        tmp_path_factory.mktemp("memory") / "data", args=("--max-body-mb", str(BODY_LIMIT_MB))
    )
    server.start()
    rng = np.random.default_rng(0)
    with server.client() as http:
        # Every generated path names this collection, so requests get past the 404.
        http.post("/v1/collections", json={"name": "fuzz", "dim": 2}).raise_for_status()
        body = wire.encode(
            {
                "obs": rng.standard_normal((50, 2)).astype(np.float32),
                "actions": np.zeros(50, np.int64),
                "rewards": np.zeros(50, np.float32),
                "next_obs": np.zeros((50, 2), np.float32),
                "dones": np.zeros(50, np.float32),
            }
        )
        http.post(
            "/v1/collections/fuzz/transitions",
            content=body,
            headers={"content-type": wire.CONTENT_TYPE},
        ).raise_for_status()
    yield server
    server.kill()
    assert "Traceback" not in server.output()


def test_every_operation_is_covered() -> None:
    labels = {operation.label for operation in OPERATIONS}
    assert len(labels) == 11 and "POST /v1/collections/{name}/search" in labels


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_no_request_gets_a_server_error(
    operation: schemathesis.schemas.APIOperation, mode: GenerationMode, fuzzed_server: MemoryServer
) -> None:
    path_parameters = {"name": "fuzz"} if operation.path_parameters else None

    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    @settings(
        max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzzed_server.url, timeout=30)
        # 507 is no fault: the documented refusal of a collection beyond the memory budget.
        documented = str(response.status_code) in operation.definition.raw.get("responses", {})
        refused = response.status_code == 507 and documented and "memory budget" in response.text
        assert response.status_code < 500 or refused, (
            f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
        )

    check()
