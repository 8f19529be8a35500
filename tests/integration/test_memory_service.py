"""The Memory service as a real process on 127.0.0.1: every endpoint, durability, bad input,
and the MemoryClient riding out an outage."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.memory_client import MemoryClient, ReplayBatch, SimilarExperiences
from memory import wire
from tests.integration import memory_fixtures
from tests.integration.memory_fixtures import REPO, MemoryServer, free_port, transitions

memory_server = memory_fixtures.memory_server  # a fresh service per test, for crash tests

pytestmark = pytest.mark.integration

BINARY = {"content-type": wire.CONTENT_TYPE}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One service for the module, with a 1 MiB body limit so that 'oversized' is cheap to send."""
    instance = MemoryServer(tmp_path_factory.mktemp("memory") / "data", args=("--max-body-mb", "1"))
    instance.start()
    yield instance
    instance.kill()


@pytest.fixture(scope="module")
def http(server: MemoryServer) -> Any:
    with server.client() as client:
        yield client


def create(http: httpx.Client, name: str, dim: int, **options: Any) -> dict[str, Any]:
    response = http.post("/v1/collections", json={"name": name, "dim": dim, **options})
    assert response.status_code in (200, 201), response.text
    return response.json()


def store(
    http: httpx.Client, name: str, arrays: dict[str, np.ndarray], key: str | None = None
) -> dict[str, Any]:
    headers = {**BINARY, **({"idempotency-key": key} if key else {})}
    response = http.post(
        f"/v1/collections/{name}/transitions", content=wire.encode(arrays), headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def read_all(http: httpx.Client, name: str) -> dict[str, np.ndarray]:
    response = http.get(
        f"/v1/collections/{name}/transitions",
        params={"limit": 65536},
        headers={"accept": wire.CONTENT_TYPE},
    )
    assert response.status_code == 200, response.text
    return wire.decode(response.content)[0]


def search_binary(
    http: httpx.Client, name: str, states: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    response = http.post(
        f"/v1/collections/{name}/search",
        params={"k": k},
        content=wire.encode({"states": states}),
        headers={"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE},
    )
    assert response.status_code == 200, response.text
    return wire.decode(response.content)[0]


def describe(http: httpx.Client, name: str) -> dict[str, Any]:
    response = http.get(f"/v1/collections/{name}")
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------ endpoints
def test_health_docs_and_schema(http: httpx.Client) -> None:
    assert http.get("/v1/health").json()["status"] == "ok"
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/health",
        "/v1/stats",
        "/v1/collections",
        "/v1/collections/{name}",
        "/v1/collections/{name}/transitions",
        "/v1/collections/{name}/sample",
        "/v1/collections/{name}/priorities",
        "/v1/collections/{name}/search",
        "/v1/collections/{name}/stats",
    ):
        assert path in paths
    store_body = paths["/v1/collections/{name}/transitions"]["post"]["requestBody"]["content"]
    assert set(store_body) == {"application/json", wire.CONTENT_TYPE}


def test_collections_are_created_once_listed_and_described(http: httpx.Client) -> None:
    first = http.post("/v1/collections", json={"name": "coll-a", "dim": 3, "capacity": 50})
    assert first.status_code == 201
    again = http.post("/v1/collections", json={"name": "coll-a", "dim": 3, "capacity": 50})
    assert again.status_code == 200
    clash = http.post("/v1/collections", json={"name": "coll-a", "dim": 4, "capacity": 50})
    assert clash.status_code == 409 and "dim=3" in clash.json()["detail"]
    names = [c["name"] for c in http.get("/v1/collections").json()["collections"]]
    assert "coll-a" in names
    info = describe(http, "coll-a")
    assert (info["dim"], info["capacity"], info["size"]) == (3, 50, 0)
    assert info["eviction"].startswith("fifo")
    assert http.get("/v1/collections/nope").status_code == 404


def test_json_store_read_and_sample(http: httpx.Client) -> None:
    create(http, "json-rt", 2)
    body = {
        "obs": [[0, 1], [1, 2], [2, 3]],
        "actions": [0, 1, 2],
        "rewards": [0.5, -1, 2],
        "next_obs": [[1, 1], [2, 2], [3, 3]],
        "dones": [False, True, 0],
    }
    result = http.post("/v1/collections/json-rt/transitions", json=body).json()
    assert result == {"collection": "json-rt", "first_id": 0, "count": 3, "duplicate": False}
    rows = http.get(
        "/v1/collections/json-rt/transitions", params={"first_id": 1, "limit": 5}
    ).json()
    assert rows["ids"] == [1, 2]
    assert rows["obs"] == [[1, 2], [2, 3]] and rows["dones"] == [1.0, 0.0]
    batch = http.get("/v1/collections/json-rt/sample", params={"batch_size": 16}).json()
    assert len(batch["ids"]) == 16 and set(batch["ids"]) <= {0, 1, 2}
    for i, row_id in enumerate(batch["ids"]):
        assert batch["obs"][i] == body["obs"][row_id]
        assert batch["actions"][i] == body["actions"][row_id]
    assert batch["weights"] == [1.0] * 16


def test_binary_store_read_and_sample(http: httpx.Client) -> None:
    create(http, "bin-rt", 5)
    data = transitions(300, 5)
    assert store(http, "bin-rt", data)["first_id"] == 0
    stored = read_all(http, "bin-rt")
    assert stored["ids"].tolist() == list(range(300))
    for name in ("obs", "actions", "rewards", "next_obs", "dones"):
        np.testing.assert_array_equal(stored[name], data[name])
    response = http.get(
        "/v1/collections/bin-rt/sample",
        params={"batch_size": 64, "batches": 3},
        headers={"accept": wire.CONTENT_TYPE},
    )
    batch, _ = wire.decode(response.content)
    assert batch["obs"].dtype == np.float32 and batch["obs"].shape == (192, 5)
    assert batch["actions"].dtype == np.int64 and batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["obs"], data["obs"][batch["ids"]])
    np.testing.assert_array_equal(batch["next_obs"], data["next_obs"][batch["ids"]])


def test_prioritized_sampling_follows_priority_updates(http: httpx.Client) -> None:
    create(http, "prio", 2, priority_alpha=1.0)
    store(http, "prio", transitions(100, 2))
    update = {"ids": list(range(100)), "priorities": [1.0] * 100}
    update["priorities"][7] = 99.0  # id 7 holds half of the total priority
    response = http.post("/v1/collections/prio/priorities", json=update)
    assert response.json() == {"updated": 100, "evicted": 0}
    batch = http.get(
        "/v1/collections/prio/sample", params={"batch_size": 64, "prioritized": True, "beta": 1.0}
    ).json()
    assert 24 <= batch["ids"].count(7) <= 40
    for row_id, weight in zip(batch["ids"], batch["weights"]):
        # w = (N * P)^-beta, divided by the batch's largest: P(7) = 1/2, P(other) = 1/198.
        assert weight == pytest.approx(1 / 99 if row_id == 7 else 1.0, rel=1e-3)
    # The binary form of the same update, moving all the weight to id 3.
    body = wire.encode(
        {"ids": np.arange(100), "priorities": np.where(np.arange(100) == 3, 1e3, 0.0)}
    )
    assert (
        http.post("/v1/collections/prio/priorities", content=body, headers=BINARY).status_code
        == 200
    )
    ids = http.get(
        "/v1/collections/prio/sample", params={"batch_size": 64, "prioritized": True}
    ).json()["ids"]
    assert ids.count(3) >= 60


def test_fifo_eviction_keeps_the_newest_and_skips_evicted_priorities(http: httpx.Client) -> None:
    create(http, "fifo", 3, capacity=100)
    for start in range(0, 250, 50):
        store(http, "fifo", transitions(50, 3, seed=start, start=start))
    info = describe(http, "fifo")
    assert (info["size"], info["next_id"], info["oldest_id"]) == (100, 250, 150)
    stored = read_all(http, "fifo")
    assert stored["ids"].tolist() == list(range(150, 250))
    assert stored["obs"][:, 0].tolist() == list(range(150, 250))
    ids = http.get("/v1/collections/fifo/sample", params={"batch_size": 256}).json()["ids"]
    assert min(ids) >= 150
    result = http.post(
        "/v1/collections/fifo/priorities", json={"ids": [10, 200], "priorities": [1, 1]}
    )
    assert result.json() == {"updated": 1, "evicted": 1}


def test_search_finds_the_nearest_states(http: httpx.Client) -> None:
    create(http, "near", 3)
    grid = np.array([[x, y, 0] for x in range(10) for y in range(10)], dtype=np.float32)
    data = transitions(100, 3)
    data["obs"] = grid
    store(http, "near", data)
    # JSON, one state: the nearest grid point first, distances ascending.
    found = http.post(
        "/v1/collections/near/search", params={"k": 3}, json={"states": [2.1, 6.9, 0]}
    ).json()
    assert found["ids"][0] == 27 and found["obs"][0] == [2, 7, 0]
    assert found["distances"] == sorted(found["distances"]) and found["query_index"] == [0, 0, 0]
    # Binary, two states: k rows for each, tagged with the query they answer.
    queries = np.array([[0, 0, 0.1], [9, 9, 0]], dtype=np.float32)
    result = search_binary(http, "near", queries, k=4)
    assert result["query_index"].tolist() == [0] * 4 + [1] * 4
    assert result["ids"][0] == 0 and result["ids"][4] == 99
    np.testing.assert_allclose(result["distances"][0], 0.1, rtol=1e-5)
    np.testing.assert_array_equal(result["obs"], grid[result["ids"]])


def test_search_with_k_beyond_size_returns_what_there_is(http: httpx.Client) -> None:
    create(http, "tiny", 2)
    store(http, "tiny", transitions(3, 2))
    found = http.post(
        "/v1/collections/tiny/search", params={"k": 10}, json={"states": [[0, 0], [1, 1]]}
    ).json()
    assert found["query_index"] == [0, 0, 0, 1, 1, 1]


def test_embedding_collections_search_embeddings(http: httpx.Client) -> None:
    create(http, "embedded", 4, embedding_dim=2)
    data = transitions(10, 4)
    data["embeddings"] = np.stack([np.arange(10), np.zeros(10)], axis=1).astype(np.float32)
    store(http, "embedded", data)
    found = http.post(
        "/v1/collections/embedded/search", params={"k": 1}, json={"states": [6.2, 0]}
    ).json()
    assert found["ids"] == [6]
    without = {k: v for k, v in data.items() if k != "embeddings"}
    response = http.post(
        "/v1/collections/embedded/transitions", content=wire.encode(without), headers=BINARY
    )
    assert response.status_code == 422 and "embeddings" in response.json()["detail"]


def test_stats_count_the_work_done(http: httpx.Client) -> None:
    create(http, "counted", 2)
    store(http, "counted", transitions(40, 2))
    http.get("/v1/collections/counted/sample", params={"batch_size": 4, "batches": 2})
    http.post("/v1/collections/counted/search", json={"states": [[0, 0], [1, 1], [2, 2]]})
    stats = http.get("/v1/collections/counted/stats").json()
    assert (stats["stored"], stats["sampled"], stats["searched"]) == (40, 2, 3)
    assert stats["index"]["kind"] == "exact"
    service = http.get("/v1/stats").json()
    assert service["collections"]["counted"]["size"] == 40 and service["log"]["segments"] >= 1


def test_idempotency_keys_store_a_batch_once(http: httpx.Client) -> None:
    create(http, "idem", 2)
    first = store(http, "idem", transitions(5, 2), key="writer-1:0")
    assert first == {"collection": "idem", "first_id": 0, "count": 5, "duplicate": False}
    retry = store(http, "idem", transitions(5, 2), key="writer-1:0")
    assert retry == {**first, "duplicate": True}
    assert store(http, "idem", transitions(5, 2, seed=1), key="writer-1:1")["first_id"] == 5
    older = http.post(  # not a retry (that re-sends the latest batch): refused, not dropped
        "/v1/collections/idem/transitions",
        content=wire.encode(transitions(5, 2)),
        headers={**BINARY, "idempotency-key": "writer-1:0"},
    )
    assert older.status_code == 409 and "cannot be a retry" in older.json()["detail"]
    assert store(http, "idem", transitions(5, 2), key="writer-2:0")["duplicate"] is False
    assert describe(http, "idem")["size"] == 15


# ------------------------------------------------------------------------------------ bad input
def _binary_with_header(arrays_meta: list[dict[str, Any]], payload: bytes) -> bytes:
    header = json.dumps({"arrays": arrays_meta, "meta": {}}).encode()
    header += b" " * ((-(8 + len(header))) % 8)
    return wire.MAGIC + struct.pack("<I", len(header)) + header + payload


def _bad_binaries() -> list[tuple[str, bytes]]:
    good = transitions(4, 3)
    valid = wire.encode(good)
    nan = {**good, "obs": good["obs"].copy()}
    nan["obs"][1, 2] = np.nan
    return [
        ("garbage", b"\x00\x01 not an array body at all"),
        ("truncated", valid[: len(valid) - 9]),
        ("trailing bytes", valid + b"\0" * 16),
        ("bad magic", b"XXXX" + valid[4:]),
        ("header length lies", valid[:4] + struct.pack("<I", 10**6) + valid[8:]),
        ("header not JSON", _binary_with_header([], b"")[:8] + b"{not json}      "),
        ("integer obs", wire.encode({**good, "obs": good["obs"].astype(np.int32)})),
        ("float actions", wire.encode({**good, "actions": good["actions"].astype(np.float32)})),
        (
            "big-endian dtype",
            _binary_with_header([{"name": "obs", "dtype": ">f4", "shape": [1, 3]}], b"\0" * 16),
        ),
        (
            "object dtype",
            _binary_with_header([{"name": "obs", "dtype": "|O", "shape": [1]}], b"\0" * 8),
        ),
        (
            "negative shape",
            _binary_with_header([{"name": "obs", "dtype": "<f4", "shape": [-1, 3]}], b""),
        ),
        ("NaN in obs", wire.encode(nan)),
        ("inf reward", wire.encode({**good, "rewards": np.array([0, np.inf, 0, 0], np.float32)})),
        ("wrong obs width", wire.encode({**good, "obs": np.zeros((4, 2), np.float32)})),
        ("rows disagree", wire.encode({**good, "rewards": np.zeros(3, np.float32)})),
        ("missing array", wire.encode({k: v for k, v in good.items() if k != "dones"})),
        ("unknown array", wire.encode({**good, "extra": np.zeros(4, np.float32)})),
        ("dones not 0/1", wire.encode({**good, "dones": np.full(4, 0.5, np.float32)})),
        ("empty batch", wire.encode({k: v[:0] for k, v in good.items()})),
    ]


def _bad_json() -> list[tuple[str, str]]:
    good = {
        "obs": [[0, 1, 2]],
        "actions": [1],
        "rewards": [0.5],
        "next_obs": [[1, 2, 3]],
        "dones": [0],
    }

    def with_(**changes: Any) -> str:
        return json.dumps({**good, **changes})

    return [
        ("malformed", '{"obs": [[0, 1, 2]], '),
        ("not an object", "[1, 2, 3]"),
        ("NaN", with_(obs=[[0, float("nan"), 2]])),
        ("Infinity", with_(rewards=[float("inf")])),
        ("too large for float32", with_(obs=[[0, 1e39, 2]])),
        ("wrong width", with_(obs=[[0, 1]])),
        (
            "ragged",
            with_(
                obs=[[0, 1, 2], [1]],
                actions=[0, 1],
                rewards=[0, 0],
                next_obs=[[0, 1, 2]] * 2,
                dones=[0, 0],
            ),
        ),
        ("string value", with_(rewards=["high"])),
        ("fractional action", with_(actions=[1.5])),
        ("action beyond int64", with_(actions=[2**70])),
        ("dones = 2", with_(dones=[2])),
        ("missing field", json.dumps({k: v for k, v in good.items() if k != "rewards"})),
        ("extra field", with_(note="hi")),
        ("empty batch", with_(obs=[], actions=[], rewards=[], next_obs=[], dones=[])),
    ]


def test_bad_input_gets_4xx_and_leaves_the_store_alone(http: httpx.Client) -> None:
    create(http, "guarded", 3, capacity=1000)
    good = transitions(20, 3)
    store(http, "guarded", good)
    before = read_all(http, "guarded")

    def refused(response: httpx.Response, label: str, status: int | None = None) -> None:
        assert 400 <= response.status_code < 500, (label, response.status_code, response.text)
        assert status is None or response.status_code == status, (
            label,
            response.status_code,
            response.text,
        )
        detail = response.json()["detail"]
        assert detail, label  # says what was wrong

    for label, body in _bad_binaries():
        refused(
            http.post("/v1/collections/guarded/transitions", content=body, headers=BINARY), label
        )
    for label, text in _bad_json():
        response = http.post(
            "/v1/collections/guarded/transitions",
            content=text,
            headers={"content-type": "application/json"},
        )
        refused(response, label, 422)
    detail = http.post(
        "/v1/collections/guarded/transitions", content=wire.encode(_nan_obs(good)), headers=BINARY
    ).json()["detail"]
    assert "obs" in detail and "NaN" in detail
    refused(
        http.post(
            "/v1/collections/guarded/transitions",
            content=b"obs=1",
            headers={"content-type": "text/plain"},
        ),
        "text body",
        415,
    )
    big = wire.encode(transitions(30_000, 3))  # about 1.5 MiB: over this server's 1 MiB limit
    refused(
        http.post("/v1/collections/guarded/transitions", content=big, headers=BINARY),
        "oversized",
        413,
    )
    refused(
        http.post(
            "/v1/collections/guarded/transitions",
            content=iter([big[:600_000], big[600_000:]]),
            headers=BINARY,
        ),
        "oversized, chunked",
        413,
    )
    refused(
        http.post("/v1/collections/nowhere/transitions", content=wire.encode(good), headers=BINARY),
        "unknown collection",
        404,
    )
    refused(
        http.post(
            "/v1/collections/guarded/transitions",
            content=wire.encode(good),
            headers={**BINARY, "idempotency-key": "no sequence"},
        ),
        "bad key",
        422,
    )
    # Reads with bad arguments.
    for params in (
        {"batch_size": 0},
        {"batch_size": 10**6},
        {"beta": 2},
        {"beta": "nan"},
        {"batch_size": 65536, "batches": 2},
        {"batches": 0},
        {"prioritized": "maybe"},
        {"seed": -1},
        {"seed": 2**63},
        {"end_id": 0},
        {"end_id": "soon"},
    ):
        refused(http.get("/v1/collections/guarded/sample", params=params), f"sample {params}", 422)
    refused(
        http.get("/v1/collections/guarded/sample", params={"end_id": 10**9}),
        "end_id beyond the stored ids",
        409,
    )
    for k in (0, -1, 100_000):
        refused(
            http.post(
                "/v1/collections/guarded/search", params={"k": k}, json={"states": [[0, 0, 0]]}
            ),
            f"k={k}",
            422,
        )
    for label, states in (
        ("wrong width", [[0, 0]]),
        ("NaN", [[0, float("nan"), 0]]),
        ("no queries", []),
        ("3-d", [[[0, 0, 0]]]),
    ):
        refused(
            http.post(
                "/v1/collections/guarded/search",
                content=json.dumps({"states": states}),
                headers={"content-type": "application/json"},
            ),
            f"search {label}",
            422,
        )
    refused(
        http.post(
            "/v1/collections/guarded/search",
            content=wire.encode({"states": np.zeros((1, 3), np.int64)}),
            headers=BINARY,
        ),
        "integer query",
        422,
    )
    for label, update in (
        ("lengths differ", {"ids": [0, 1], "priorities": [1.0]}),
        ("negative", {"ids": [0], "priorities": [-1.0]}),
        ("never issued", {"ids": [10**6], "priorities": [1.0]}),
        ("NaN", {"ids": [0], "priorities": [float("nan")]}),
    ):
        refused(
            http.post(
                "/v1/collections/guarded/priorities",
                content=json.dumps(update),
                headers={"content-type": "application/json"},
            ),
            f"priorities {label}",
            422,
        )
    for label, spec in (
        ("dim 0", {"name": "x1", "dim": 0}),
        ("bad name", {"name": "a/b", "dim": 2}),
        ("huge capacity", {"name": "x2", "dim": 2, "capacity": 10**12}),
        ("alpha > 1", {"name": "x3", "dim": 2, "priority_alpha": 2}),
    ):
        refused(http.post("/v1/collections", json=spec), f"create {label}", 422)
    refused(http.get("/v1/collections/bad name!"), "bad path name", 422)
    create(http, "still-empty", 2)
    refused(http.get("/v1/collections/still-empty/sample"), "empty", 409)

    assert http.get("/v1/health").json()["status"] == "ok"
    after = read_all(http, "guarded")
    assert after["ids"].tolist() == before["ids"].tolist()
    np.testing.assert_array_equal(after["obs"], before["obs"])
    assert describe(http, "guarded")["next_id"] == 20
    assert "x1" not in [c["name"] for c in http.get("/v1/collections").json()["collections"]]


def _nan_obs(good: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    obs = good["obs"].copy()
    obs[0, 0] = np.nan
    return {**good, "obs": obs}


# ------------------------------------------------------------------------------------ durability
def test_restart_and_kill_9_lose_nothing_acknowledged(memory_server: MemoryServer) -> None:
    with memory_server.client() as http:
        create(http, "durable", 4, capacity=1000)
        create(http, "small", 2, capacity=30)
        sent = [transitions(100, 4, seed=i, start=100 * i) for i in range(6)]
        for batch in sent[:3]:
            store(http, "durable", batch)
        for i in range(5):
            store(http, "small", transitions(20, 2, seed=i, start=20 * i), key=f"w:{i}")
    memory_server.restart()  # graceful
    with memory_server.client() as http:
        assert describe(http, "durable")["size"] == 300
        for batch in sent[3:]:
            store(http, "durable", batch)
    memory_server.kill()  # as a crash: no shutdown code runs
    memory_server.start()
    with memory_server.client() as http:
        info = describe(http, "durable")
        assert (info["size"], info["next_id"]) == (600, 600)
        stored = read_all(http, "durable")
        for name in ("obs", "actions", "rewards", "next_obs", "dones"):
            np.testing.assert_array_equal(stored[name], np.concatenate([b[name] for b in sent]))
        small = describe(http, "small")
        assert (small["size"], small["oldest_id"], small["next_id"]) == (30, 70, 100)
        assert read_all(http, "small")["obs"][:, 0].tolist() == list(range(70, 100))
        assert (
            store(http, "small", transitions(20, 2), key="w:4")["duplicate"] is True
        )  # keys survive too
        assert store(http, "durable", transitions(1, 4))["first_id"] == 600  # ids go on
        assert http.post(
            "/v1/collections/durable/search", json={"states": [[250, 0, 0, 0]]}
        ).json()["ids"]


def test_search_switches_to_ivf_and_keeps_recall(tmp_path: Path) -> None:
    server = MemoryServer(tmp_path / "data", args=("--exact-max", "3000", "--seed", "1"))
    server.start()
    try:
        with server.client() as http:
            create(http, "walks", 8, capacity=6000)
            rng = np.random.default_rng(0)
            walks = rng.standard_normal((40, 1, 8)) * 3 + np.cumsum(
                rng.standard_normal((40, 200, 8)) * 0.1, axis=1
            )
            states = walks.reshape(-1, 8).astype(np.float32)  # 8000 states in trajectory order
            for start in range(0, 8000, 1000):
                chunk = transitions(1000, 8)
                chunk["obs"] = states[start : start + 1000]
                store(http, "walks", chunk)
            deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
            stats = http.get("/v1/collections/walks/stats").json()
            while (
                stats["index"]["building"] or stats["index"]["kind"] != "ivf"
            ) and time.monotonic() < deadline:
                time.sleep(0.05)
                stats = http.get("/v1/collections/walks/stats").json()
            assert stats["index"]["kind"] == "ivf" and stats["size"] == 6000
            live = states[2000:]  # ids 2000..7999 are stored; the rest evicted
            queries = (
                live[rng.integers(0, 6000, 100)]
                + rng.standard_normal((100, 8)).astype(np.float32) * 0.05
            )
            found = search_binary(http, "walks", queries, k=5)
            assert found["ids"].min() >= 2000 and len(found["ids"]) == 500
            exact = (
                np.argsort(((live[None, :, :] - queries[:, None, :]) ** 2).sum(-1), axis=1)[:, :5]
                + 2000
            )
            recall = np.mean(
                [len(set(found["ids"][5 * i : 5 * i + 5]) & set(exact[i])) / 5 for i in range(100)]
            )
            assert recall >= 0.9
        server.restart(crash=True)  # the index is rebuilt from the log
        with server.client() as http:
            assert search_binary(http, "walks", queries, k=5)["ids"].min() >= 2000
    finally:
        server.kill()


# ------------------------------------------------------------------------------------ security
def test_a_token_guards_every_request(tmp_path: Path) -> None:
    server = MemoryServer(tmp_path / "data", token="s3cret")
    server.start()
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            for path in ("/v1/health", "/v1/collections", "/openapi.json"):
                response = httpx.get(server.url + path, headers=headers)
                assert response.status_code == 401 and "token" in response.json()["detail"]
        assert httpx.get(server.url + "/v1/health", headers=server.headers).status_code == 200

        async def use() -> ReplayBatch | None:
            async with MemoryClient(server.url, collection="guarded", token="s3cret") as client:
                await client.store_transitions(**transitions(10, 2))
                assert await client.flush(10)
                return await client.get_replay_batch(4)

        assert asyncio.run(use()) is not None
    finally:
        server.kill()


def test_refuses_to_bind_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "memory",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in __import__("os").environ.items() if k != "MEMORY_TOKEN"},
    )
    assert result.returncode == 2
    assert "token" in result.stderr


# ------------------------------------------------------------------------------------ client
def test_client_round_trip(http: httpx.Client, server: MemoryServer, tmp_path: Path) -> None:
    async def run() -> None:
        async with MemoryClient(
            server.url, collection="client-rt", outbox_dir=tmp_path / "outbox"
        ) as client:
            assert await client.health_check()
            assert await client.get_replay_batch(8) is None  # no collection yet
            data = transitions(250, 3)
            await client.store_transitions(
                data["obs"][:200],
                data["actions"][:200],
                data["rewards"][:200],
                data["next_obs"][:200],
                data["dones"][:200],
            )
            for i in range(200, 250):
                await client.store_experience(
                    data["obs"][i],
                    int(data["actions"][i]),
                    float(data["rewards"][i]),
                    data["next_obs"][i],
                    bool(data["dones"][i]),
                )
            assert await client.flush(10)
            batch = await client.get_replay_batch(32)
            assert isinstance(batch, ReplayBatch) and batch.obs.shape == (32, 3)
            assert (
                batch.obs.dtype == np.float32
                and batch.actions.dtype == np.int64
                and batch.ids.dtype == np.int64
            )
            assert batch.dones.dtype == np.float32 and batch.obs.flags.writeable
            np.testing.assert_array_equal(batch.obs, data["obs"][batch.ids])
            assert (batch.weights == 1.0).all()
            for _ in range(10):  # served from prefetched batches, same arguments
                assert (await client.get_replay_batch(32)).obs.shape == (32, 3)
            prioritized = await client.get_replay_batch(16, prioritized=True, beta=0.5)
            assert prioritized is not None and prioritized.weights.max() == pytest.approx(1.0)
            await client.update_priorities(prioritized.ids, np.abs(prioritized.rewards))
            similar = await client.search_similar(data["obs"][17], k=3)
            assert isinstance(similar, SimilarExperiences)
            assert similar.batch.ids[0] == 17 and similar.distances[0] == 0.0
            assert similar.query_index.tolist() == [0, 0, 0]
            many = await client.search_similar(data["obs"][:4], k=2)
            assert many.query_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
            metrics = client.metrics()
            assert (
                metrics["healthy"] == 1.0
                and metrics["delivered"] == 250
                and metrics["dropped"] == 0
            )
            assert metrics["queued_writes"] == 0 and metrics["prefetch_hits"] > 0

    asyncio.run(run())
    stored = read_all(http, "client-rt")
    assert stored["obs"][:, 0].tolist() == list(range(250))
    assert describe(http, "client-rt")["capacity"] > 0


def test_client_splits_a_search_beyond_the_services_query_limit(
    server: MemoryServer, tmp_path: Path
) -> None:
    async def run() -> SimilarExperiences | None:
        async with MemoryClient(
            server.url, collection="many-queries", outbox_dir=tmp_path / "outbox"
        ) as client:
            await client.store_transitions(**transitions(50, 3))
            assert await client.flush(10)
            queries = np.repeat(transitions(50, 3)["obs"], 100, axis=0)  # 5,000 > 4,096
            return await client.search_similar(queries, k=2)

    found = asyncio.run(run())
    assert found is not None and len(found.query_index) == 10_000
    assert found.query_index.tolist() == np.repeat(np.arange(5000), 2).tolist()
    assert found.batch.ids[::2].tolist() == np.repeat(np.arange(50), 100).tolist()  # each itself


def test_client_rides_out_a_crash_and_stores_everything_once_in_order(
    memory_server: MemoryServer, tmp_path: Path
) -> None:
    async def run() -> dict[str, float]:
        client = MemoryClient(
            memory_server.url,
            collection="outage",
            outbox_dir=tmp_path / "outbox",
            batch_rows=64,
            breaker_reset=0.05,
            breaker_max_reset=0.2,
        )
        async with client:
            await client.store_transitions(**transitions(100, 2, start=0))
            assert await client.flush(10)
            assert await client.get_replay_batch(8) is not None
            memory_server.kill()
            for step in range(1, 6):  # the learner keeps going while the service is down
                await client.store_transitions(**transitions(100, 2, seed=step, start=100 * step))
                await client.get_replay_batch(8)
            assert not await client.flush(0.5)
            down = client.metrics()
            assert down["breaker_open"] == 1.0 and down["healthy"] == 0.0
            assert (
                await client.get_replay_batch(8) is None
                and await client.search_similar([0, 0]) is None
            )
            assert client.metrics()["reads_skipped"] > down["reads_skipped"]
            assert (
                down["queued_writes"] == 500 and down["outbox_bytes"] > 0 and down["dropped"] == 0
            )
            memory_server.start()
            assert await client.flush(30)
            assert await client.get_replay_batch(8) is not None
            return client.metrics()

    metrics = asyncio.run(run())
    assert metrics["delivered"] == 600 and metrics["dropped"] == 0 and metrics["queued_writes"] == 0
    assert metrics["retries"] > 0 and metrics["breaker_trips"] >= 1
    with memory_server.client() as http:
        stored = read_all(http, "outage")
    assert stored["obs"][:, 0].tolist() == list(range(600))  # all of it, once, in order


def test_a_retried_batch_the_service_already_has_is_not_stored_again(
    memory_server: MemoryServer, tmp_path: Path
) -> None:
    """The service committed a batch but its answer was lost: the client still has the file."""
    outbox = tmp_path / "outbox"

    async def deliver() -> dict[str, float]:
        async with MemoryClient(
            memory_server.url, collection="lost-answer", outbox_dir=outbox
        ) as client:
            await client.store_transitions(**transitions(10, 2, start=10))
            assert await client.flush(10)
            return client.metrics()

    data = transitions(10, 2)
    with memory_server.client() as http:
        create(http, "lost-answer", 2)
        store(http, "lost-answer", data, key="crashed-writer:7")
    # What the crashed client left in its outbox: the same batch, under the same key.
    meta = {
        "client_id": "crashed-writer",
        "seq": 7,
        "collection": "lost-answer",
        "dim": 2,
        "rows": 10,
    }
    outbox.mkdir()
    (outbox / "0000000000000003.mwb").write_bytes(wire.encode(data, meta))
    metrics = asyncio.run(deliver())
    assert metrics["duplicates"] == 10 and metrics["delivered"] == 20
    with memory_server.client() as http:
        assert read_all(http, "lost-answer")["obs"][:, 0].tolist() == list(range(20))


def test_an_outbox_left_behind_is_delivered_by_the_next_client(
    memory_server: MemoryServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    closed = f"http://127.0.0.1:{free_port()}"

    async def offline() -> None:
        async with MemoryClient(closed, collection="left", outbox_dir=outbox) as client:
            await client.store_transitions(**transitions(30, 2))
            await client.close(flush_timeout=0.2)
            assert client.metrics()["queued_writes"] == 30

    async def online() -> dict[str, float]:
        async with MemoryClient(memory_server.url, collection="other", outbox_dir=outbox) as client:
            assert await client.flush(10)
            return client.metrics()

    asyncio.run(offline())
    assert len(list(outbox.glob("*.mwb"))) == 1
    assert asyncio.run(online())["delivered"] == 30
    with memory_server.client() as http:
        assert describe(http, "left")["size"] == 30
    assert not list(outbox.glob("*.mwb"))
