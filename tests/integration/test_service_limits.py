"""Boundaries of the real Memory service that a probe broke (issue 13, defects 1, 5 and 10):
priorities that overflowed the sum tree, idempotency keys that dropped batches silently, and no
bound on the RAM all collections may take together."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from memory import wire
from memory.service import reserved_bytes
from memory.settings import Settings
from tests.integration import memory_fixtures
from tests.integration.memory_fixtures import MemoryServer

shared_memory_server = memory_fixtures.shared_memory_server

pytestmark = pytest.mark.integration

BINARY = {"content-type": wire.CONTENT_TYPE}


@pytest.fixture(scope="module")
def http(shared_memory_server: MemoryServer) -> Iterator[httpx.Client]:
    with shared_memory_server.client() as client:
        yield client


def transitions(n: int, dim: int, start: int = 0) -> dict[str, np.ndarray]:
    obs = np.zeros((n, dim), np.float32)
    obs[:, 0] = np.arange(start, start + n)  # each row's place in the stream, to tell them apart
    return {
        "obs": obs,
        "actions": np.zeros(n, np.int64),
        "rewards": np.ones(n, np.float32),
        "next_obs": obs + 1,
        "dones": np.zeros(n, np.float32),
    }


def create(http: httpx.Client, name: str, dim: int, **options: Any) -> httpx.Response:
    return http.post("/v1/collections", json={"name": name, "dim": dim, **options})


def post_batch(
    http: httpx.Client, name: str, arrays: dict[str, np.ndarray], key: str
) -> httpx.Response:
    return http.post(
        f"/v1/collections/{name}/transitions",
        content=wire.encode(arrays),
        headers={**BINARY, "idempotency-key": key},
    )


def size(http: httpx.Client, name: str) -> int:
    return int(http.get(f"/v1/collections/{name}").json()["size"])


# ------------------------------------------------------------------ 1. priorities near 1e308
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_huge_priorities_give_finite_weights(http: httpx.Client, alpha: float) -> None:
    name = f"huge-priorities-{int(alpha * 10)}"
    assert create(http, name, 2, capacity=64, priority_alpha=alpha).status_code == 201
    assert post_batch(http, name, transitions(16, 2), f"{name}:0").status_code == 200
    update = {"ids": np.arange(16), "priorities": np.full(16, 1e308)}
    update["priorities"][::4] = 1.7e308  # each near the largest float64: pairs overflowed
    update["priorities"][1] = 0.0
    response = http.post(
        f"/v1/collections/{name}/priorities", content=wire.encode(update), headers=BINARY
    )
    assert response.status_code == 200, response.text
    params = {"batch_size": 8, "prioritized": True, "beta": 1.0, "batches": 4}
    for end_id in (None, 12):  # the whole ring, and the window of a reproducible sample
        query = {**params, **({"end_id": end_id, "seed": 3} if end_id else {})}
        binary = http.get(
            f"/v1/collections/{name}/sample", params=query, headers={"accept": wire.CONTENT_TYPE}
        )
        assert binary.status_code == 200, binary.text
        weights = wire.decode(binary.content)[0]["weights"]
        assert np.isfinite(weights).all() and (weights > 0).all(), weights
        assert np.allclose(weights.reshape(4, 8).max(axis=1), 1.0)
        as_json = http.get(f"/v1/collections/{name}/sample", params=query)
        assert as_json.status_code == 200, as_json.text
        weights = np.array(as_json.json()["weights"], dtype=np.float64)
        assert np.isfinite(weights).all() and (weights > 0).all(), weights
    # Clipped, not refused: the largest priority is the documented bound.
    stats = http.get(f"/v1/collections/{name}/stats").json()
    assert stats["max_priority"] == 1e6


def test_priorities_are_still_refused_when_not_finite_or_negative(http: httpx.Client) -> None:
    assert create(http, "bad-priorities", 2, priority_alpha=1.0).status_code == 201
    assert post_batch(http, "bad-priorities", transitions(4, 2), "bp:0").status_code == 200
    for value in (np.inf, -1.0, np.nan):
        update = {"ids": np.arange(1), "priorities": np.array([value])}
        response = http.post(
            "/v1/collections/bad-priorities/priorities",
            content=wire.encode(update),
            headers=BINARY,
        )
        assert response.status_code == 422 and "finite and >= 0" in response.text


# ------------------------------------------------------------------ 5. idempotency keys
def test_the_genuine_retry_is_a_duplicate(http: httpx.Client) -> None:
    """A batch re-sent after a lost answer, with its key: acknowledged, stored once."""
    assert create(http, "retry", 2).status_code == 201
    first = post_batch(http, "retry", transitions(5, 2), "writer-r:7")
    again = post_batch(http, "retry", transitions(5, 2), "writer-r:7")
    assert first.status_code == again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert size(http, "retry") == 5


def test_a_key_reused_in_another_collection_is_refused(http: httpx.Client) -> None:
    for name in ("keys-a", "keys-b"):
        assert create(http, name, 2).status_code == 201
    assert post_batch(http, "keys-a", transitions(5, 2), "writer-x:3").status_code == 200
    reused = post_batch(http, "keys-b", transitions(5, 2), "writer-x:3")
    assert reused.status_code == 409, reused.text
    detail = reused.json()["detail"]
    assert "writer-x:3" in detail and "'keys-a'" in detail and "cannot be a retry" in detail
    assert size(http, "keys-b") == 0 and size(http, "keys-a") == 5  # refused, not acknowledged
    # Keys are scoped per collection: the same writer's own sequence in keys-b is stored, even
    # below the one it reached in keys-a (the old service dropped these as "duplicates" of keys-a).
    for seq in (0, 1):
        stored = post_batch(http, "keys-b", transitions(5, 2, start=5 * seq), f"writer-x:{seq}")
        assert stored.status_code == 200 and stored.json()["duplicate"] is False
        assert stored.json()["collection"] == "keys-b"
    assert size(http, "keys-b") == 10 and size(http, "keys-a") == 5


def test_a_backwards_gap_is_refused(http: httpx.Client) -> None:
    """A writer restarted with its old client id and a fresh counter: 409, not 200 and nothing."""
    assert create(http, "backwards", 2).status_code == 201
    for seq in range(3):
        stored = post_batch(http, "backwards", transitions(4, 2), f"writer-b:{seq}")
        assert stored.status_code == 200
    for seq in (0, 1):
        older = post_batch(http, "backwards", transitions(4, 2), f"writer-b:{seq}")
        assert older.status_code == 409, older.text
        assert "already stored sequence number 2" in older.json()["detail"]
    assert size(http, "backwards") == 12
    assert post_batch(http, "backwards", transitions(4, 2), "writer-b:2").json()["duplicate"]
    later = post_batch(http, "backwards", transitions(4, 2), "writer-b:9")  # gaps forward are fine
    assert later.status_code == 200 and later.json()["duplicate"] is False
    assert size(http, "backwards") == 16


def test_keys_survive_a_crash(tmp_path: Path) -> None:
    server = MemoryServer(tmp_path / "data")
    server.start()
    try:
        with server.client() as http:
            assert create(http, "crash", 2).status_code == 201
            assert post_batch(http, "crash", transitions(3, 2), "w:0").status_code == 200
            assert post_batch(http, "crash", transitions(3, 2), "w:1").status_code == 200
            server.restart(crash=True)
            assert post_batch(http, "crash", transitions(3, 2), "w:1").json()["duplicate"]
            assert post_batch(http, "crash", transitions(3, 2), "w:0").status_code == 409
            assert size(http, "crash") == 6
    finally:
        server.kill()


# ------------------------------------------------------------------ 10. the memory budget
def test_collections_beyond_the_memory_budget_get_507(tmp_path: Path) -> None:
    exact_max = Settings(data_dir=tmp_path).exact_max
    small = reserved_bytes(1000, 4, None, exact_max)
    big = reserved_bytes(30_000, 4, None, exact_max)
    assert small + big < 4 * 2**20 < small + 2 * big  # the 4 MiB budget fits one big, not two
    server = MemoryServer(tmp_path / "data", args=("--max-memory-mb", "4"))
    server.start()
    try:
        with server.client() as http:
            memory = http.get("/v1/stats").json()["memory"]
            assert memory["budget_bytes"] == 4 * 2**20 and memory["reserved_bytes"] == 0
            assert create(http, "small", 4, capacity=1000).status_code == 201
            assert create(http, "big", 4, capacity=30_000).status_code == 201
            memory = http.get("/v1/stats").json()["memory"]
            assert memory["reserved_bytes"] == small + big
            assert memory["available_bytes"] == 4 * 2**20 - small - big
            assert memory["allocated_bytes"] < small  # arrays grow lazily; the budget does not
            refused = create(http, "bigger", 4, capacity=30_000)
            assert refused.status_code == 507, refused.text
            detail = refused.json()["detail"]
            assert "'bigger'" in detail and "memory budget" in detail
            assert "--max-memory-mb" in detail
            # An implicit create (the client's, when a store meets 404) goes the same way.
            default_capacity = create(http, "implicit", 512)
            assert default_capacity.status_code == 507, default_capacity.text
            names = [c["name"] for c in http.get("/v1/collections").json()["collections"]]
            assert sorted(names) == ["big", "small"]
            # The same request for an existing collection reserves nothing more.
            assert create(http, "big", 4, capacity=30_000).status_code == 200
            stats = http.get("/v1/stats").json()
            assert stats["memory"]["reserved_bytes"] == small + big
            assert stats["collections"]["big"]["reserved_bytes"] == big
        # What the stored collections reserve counts again after a restart.
        server.restart(crash=True)
        with server.client() as http:
            assert http.get("/v1/stats").json()["memory"]["reserved_bytes"] == small + big
            assert create(http, "bigger", 4, capacity=30_000).status_code == 507
    finally:
        server.kill()


def test_a_bad_budget_is_refused_at_start(tmp_path: Path) -> None:
    server = MemoryServer(tmp_path / "data", args=("--max-memory-mb", "0"))
    with pytest.raises(RuntimeError, match="must be positive"):
        server.start(timeout=20)


def test_the_default_budget_comes_from_the_machine(http: httpx.Client) -> None:
    import psutil

    budget = http.get("/v1/stats").json()["memory"]["budget_bytes"]
    assert 0 < budget <= psutil.virtual_memory().total // 2
