"""Schemathesis against the service's own OpenAPI schema: requests generated from it (fitting the
schema, and deliberately not fitting it; JSON and binary bodies) go to a real service, and every
answer must pass all of schemathesis' checks: no 5xx, status codes, content types, headers and
bodies as documented, schema-valid requests accepted, schema-invalid ones refused, 405 with
``Allow`` for a method a path does not have.

The schema is read from the app object (it does not depend on stored data), so pytest can list
one test per operation; the requests go to the running process. Schemathesis' own pytest plugin
is not used: with pytest 9 it fails before running anything.

Two checks are narrowed, each for one documented reason:

- ``not_a_server_error`` lets 507 through where the schema documents it: a collection refused
  because it would exceed the memory budget (the refusal depends on the machine, not the request).
- ``positive_data_acceptance`` lets a schema-valid request be refused (400/422) only for what a
  static JSON Schema cannot say, checked here case by case (:func:`beyond_the_schema`): the bytes of
  the binary format, arrays whose lengths must agree with each other, row widths set by the
  collection (D = 2 here), ids that must have been issued, and batch_size x batches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from memory import wire
from memory.app import create_app
from memory.settings import Settings
from tests.integration.memory_fixtures import MemoryServer

pytestmark = pytest.mark.integration

BODY_LIMIT_MB = 1
BINARY = {"content-type": wire.CONTENT_TYPE}
DIM = 2  # of the collection every request names
STORED = 50  # rows stored in it: ids 0..49
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


load_all_checks()
BUILTIN = {check.__name__: check for check in CHECKS.get_all()}
assert len(BUILTIN) >= 14, sorted(BUILTIN)  # schemathesis 4's "all"


def not_a_server_error(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """No 5xx, but the documented 507 of a collection beyond the memory budget."""
    documented = str(response.status_code) in case.operation.definition.raw.get("responses", {})
    if response.status_code == 507 and documented and "memory budget" in response.text:
        return None
    return BUILTIN["not_a_server_error"](ctx, response, case)


def positive_data_acceptance(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """Schema-valid requests are accepted, unless refused for what the schema cannot say."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and response.status_code in (400, 422) and beyond_the_schema(case):
        return None
    if positive and response.status_code == 422 and not _headers_fit(case):
        return None  # schemathesis' coverage phase sends Idempotency-Key "0" as "valid"
    return BUILTIN["positive_data_acceptance"](ctx, response, case)


def _headers_fit(case: schemathesis.Case) -> bool:
    """Whether every header the case sends matches its declared pattern."""
    for parameter in case.operation.definition.raw.get("parameters", []):
        pattern = parameter.get("schema", {}).get("pattern")
        value = (case.headers or {}).get(parameter["name"])
        if parameter["in"] == "header" and pattern and isinstance(value, str):
            if re.search(pattern, value) is None:
                return False
    return True


def _rows(value: Any, width: int) -> bool:
    return isinstance(value, list) and all(isinstance(r, list) and len(r) == width for r in value)


def _too_big(values: Any) -> bool:
    """Any number in ``values`` (nested lists) beyond float32's range."""
    if isinstance(values, list):
        return any(_too_big(v) for v in values)
    return isinstance(values, float | int) and not isinstance(values, bool) and abs(values) > 3e38


def beyond_the_schema(case: schemathesis.Case) -> bool:
    """Whether a schema-valid request breaks a rule that JSON Schema cannot express."""
    if case.media_type == wire.CONTENT_TYPE:
        return True  # any bytes are a "binary string"; only the wire format is a body
    body, path = case.body, case.operation.path
    if path.endswith("/sample"):
        query = case.query or {}
        return query.get("batch_size", 32) * query.get("batches", 1) > 65_536
    if not isinstance(body, dict):
        return False
    if path.endswith("/transitions"):
        rows = len(body["actions"])
        return (
            any(len(body[name]) != rows for name in ("obs", "rewards", "next_obs", "dones"))
            or len(body.get("episode_returns") or [0] * rows) != rows
            or not (_rows(body["obs"], DIM) and _rows(body["next_obs"], DIM))
            or body.get("embeddings") is not None  # the collection has no embedding_dim
            or any(d not in (0, 1) for d in body["dones"])
            or _too_big([body[name] for name in ("obs", "rewards", "next_obs")])
        )
    if path.endswith("/priorities"):
        ids, priorities = body["ids"], body["priorities"]
        return len(ids) != len(priorities) or any(i >= STORED for i in ids)
    if path.endswith("/search"):
        states = body["states"]
        flat = all(not isinstance(s, list) for s in states)
        return not (len(states) == DIM if flat else _rows(states, DIM)) or _too_big(states)
    return False


NARROWED = {
    "not_a_server_error": not_a_server_error,
    "positive_data_acceptance": positive_data_acceptance,
}
CHECKS_ALL = [NARROWED.get(name, check) for name, check in BUILTIN.items()]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemoryServer]:
    server = MemoryServer(
        tmp_path_factory.mktemp("memory") / "data", args=("--max-body-mb", str(BODY_LIMIT_MB))
    )
    server.start()
    rng = np.random.default_rng(0)
    with server.client() as http:
        # Every generated path names this collection, so requests get past the 404.
        http.post("/v1/collections", json={"name": "fuzz", "dim": DIM}).raise_for_status()
        body = wire.encode(
            {
                "obs": rng.standard_normal((STORED, DIM)).astype(np.float32),
                "actions": np.zeros(STORED, np.int64),
                "rewards": np.zeros(STORED, np.float32),
                "next_obs": np.zeros((STORED, DIM), np.float32),
                "dones": np.zeros(STORED, np.float32),
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
def test_every_answer_passes_all_checks(
    operation: schemathesis.schemas.APIOperation, mode: GenerationMode, fuzzed_server: MemoryServer
) -> None:
    path_parameters = {"name": "fuzz"} if operation.path_parameters else None

    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    @settings(
        max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzzed_server.url, checks=CHECKS_ALL, timeout=30)

    check()


@pytest.mark.parametrize("operation", OPERATIONS, ids=[operation.label for operation in OPERATIONS])
def test_coverage_cases_pass_all_checks(
    operation: schemathesis.schemas.APIOperation, fuzzed_server: MemoryServer
) -> None:
    """Schemathesis' coverage phase: boundary values of every parameter and body field, missing
    required parts, and every method the path does not have (405 with a complete ``Allow``)."""
    cases = SCHEMA.iter_coverage_cases(
        operation,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=SCHEMA.config.generation_for(operation=operation),
    )
    checked = 0
    for case in cases:
        if operation.path_parameters:
            name = (case.path_parameters or {}).get("name")
            if not isinstance(name, str):
                continue  # a case that drops the path parameter cannot be sent
            if wire.is_collection_name(name):  # a valid name: this one, to get past the 404
                case.path_parameters = {**case.path_parameters, "name": "fuzz"}
        case.call_and_validate(base_url=fuzzed_server.url, checks=CHECKS_ALL, timeout=30)
        checked += 1
    assert checked


def test_the_cases_schemathesis_found_agree_with_the_schema(fuzzed_server: MemoryServer) -> None:
    """Issue 13, defect 8, case by case: what the schema allows is accepted, what it forbids is
    refused, and a 405 lists every method of its path."""
    paths = SCHEMA.raw_schema["paths"]
    transitions = paths["/v1/collections/{name}/transitions"]["post"]["requestBody"]["content"]
    assert transitions[wire.CONTENT_TYPE]["schema"]["minLength"] == 8
    batch = transitions["application/json"]["schema"]
    assert all(batch["properties"][name]["minItems"] == 1 for name in ("obs", "actions", "dones"))
    with fuzzed_server.client() as http:
        empty = http.post("/v1/collections/fuzz/priorities", json={"ids": [], "priorities": []})
        assert (empty.status_code, empty.json()) == (200, {"updated": 0, "evicted": 0})
        empty_batch = {name: [] for name in ("obs", "actions", "rewards", "next_obs", "dones")}
        assert http.post("/v1/collections/fuzz/transitions", json=empty_batch).status_code == 422
        for route in ("transitions", "priorities"):
            answer = http.post(f"/v1/collections/fuzz/{route}", content=b"", headers=BINARY)
            assert answer.status_code == 400 and "prefix" in answer.text
        for method, path, allowed in [
            ("OPTIONS", "/v1/collections", "GET, POST"),
            ("DELETE", "/v1/collections/fuzz/transitions", "GET, POST"),
            ("PUT", "/v1/collections/fuzz/sample", "GET"),
        ]:
            answer = http.request(method, path)
            assert (answer.status_code, answer.headers["allow"]) == (405, allowed), method + path
        assert http.post("/v1/collections", json={"name": "b", "dim": True}).status_code == 422
        assert http.post("/v1/collections", json={"name": "b", "dim": "2"}).status_code == 422
