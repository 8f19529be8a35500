"""Load on one real service: writer and sampler processes for a bounded time, with a kill -9 and a
restart in the middle, and then every acknowledged row counted in what the service stores.

Each writer sends batches with idempotency keys ``<writer>:<seq>`` and, as the client does, resends
a batch with the same key until it is acknowledged (through the crash, the restart and lost
answers). Every row carries its writer and its position in that writer's stream (obs[:, 0] and
obs[:, 1]), so after the run the stored rows must be exactly the acknowledged ones: none lost, none
twice. Samplers read replay batches throughout and check what they get.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from memory import wire
from tests.integration.memory_fixtures import MemoryServer

pytestmark = pytest.mark.integration

WRITERS = 3
SAMPLERS = 2
ROWS = 32  # per batch
DIM = 4
LOAD_SECONDS = 7.0
KILL_AFTER = 2.5  # seconds into the load
GIVE_UP_AFTER = 20.0  # a writer's last batch must be acknowledged this long after the load ends
BINARY = {"content-type": wire.CONTENT_TYPE}


def _batch(writer: int, seq: int) -> bytes:
    obs = np.zeros((ROWS, DIM), np.float32)
    obs[:, 0] = writer
    obs[:, 1] = seq * ROWS + np.arange(ROWS)  # the row's position in this writer's stream
    return wire.encode(
        {
            "obs": obs,
            "actions": np.full(ROWS, writer, np.int64),
            "rewards": np.ones(ROWS, np.float32),
            "next_obs": obs,
            "dones": np.zeros(ROWS, np.float32),
        }
    )


def write(url: str, writer: int, stop: float, out: str) -> None:
    """Store batches until ``stop``; each is resent with its key until acknowledged."""
    acks = []
    with httpx.Client(base_url=url, timeout=5) as http:
        seq = 0
        while time.time() < stop:
            body, key = _batch(writer, seq), f"w{writer}:{seq}"
            while True:
                if time.time() > stop + GIVE_UP_AFTER:
                    raise RuntimeError(f"writer {writer}: batch {seq} never acknowledged")
                try:
                    answer = http.post(
                        "/v1/collections/load/transitions",
                        content=body,
                        headers={**BINARY, "idempotency-key": key},
                    )
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                if answer.status_code >= 500:
                    time.sleep(0.02)
                    continue
                answer.raise_for_status()  # any 4xx is a bug
                reply = answer.json()
                acks.append(
                    [seq, reply["first_id"], reply["count"], reply["duplicate"], time.time()]
                )
                break
            seq += 1
    Path(out).write_text(json.dumps(acks))


def sample(url: str, stop: float, out: str) -> None:
    """Replay batches until ``stop``: every row one a writer sent, every weight finite."""
    served = refused = 0
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.time() < stop:
            prioritized = served % 2 == 1
            try:
                answer = http.get(
                    "/v1/collections/load/sample",
                    params={"batch_size": 64, "prioritized": prioritized},
                    headers={"accept": wire.CONTENT_TYPE},
                )
            except httpx.TransportError:
                refused += 1
                time.sleep(0.02)
                continue
            if answer.status_code == 409:  # empty: nothing written yet
                continue
            answer.raise_for_status()
            arrays, _ = wire.decode(answer.content)
            assert np.isfinite(arrays["weights"]).all()
            assert set(arrays["obs"][:, 0].tolist()) <= set(range(WRITERS))
            assert (arrays["actions"] == arrays["obs"][:, 0]).all()
            served += 1
    Path(out).write_text(json.dumps({"served": served, "refused": refused}))


def test_writers_and_samplers_through_a_kill_9_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    server = MemoryServer(tmp_path / "data")
    server.start()
    try:
        with server.client() as http:
            http.post(
                "/v1/collections", json={"name": "load", "dim": DIM, "capacity": 1_000_000}
            ).raise_for_status()
        spawn = multiprocessing.get_context("spawn")
        start = time.time() + 2.0  # the processes' imports take a moment
        stop = start + LOAD_SECONDS
        processes = [
            spawn.Process(target=write, args=(server.url, w, stop, str(tmp_path / f"w{w}.json")))
            for w in range(WRITERS)
        ] + [
            spawn.Process(target=sample, args=(server.url, stop, str(tmp_path / f"s{s}.json")))
            for s in range(SAMPLERS)
        ]
        for process in processes:
            process.start()
        time.sleep(max(start + KILL_AFTER - time.time(), 0))
        killed_at = time.time()
        server.kill()  # kill -9 in the middle of the writes
        server.start()
        restarted_at = time.time()
        for process in processes:
            process.join(LOAD_SECONDS + GIVE_UP_AFTER + 10)
            assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"

        with server.client() as http:
            info = http.get("/v1/collections/load").json()
            stored = []
            first_id = 0
            while first_id < info["next_id"]:
                answer = http.get(
                    "/v1/collections/load/transitions",
                    params={"first_id": first_id, "limit": 65_536},
                    headers={"accept": wire.CONTENT_TYPE},
                )
                answer.raise_for_status()
                arrays, _ = wire.decode(answer.content)
                stored.append(arrays)
                first_id = int(arrays["ids"][-1]) + 1
    finally:
        server.kill()
    assert "Traceback" not in server.output()

    ids = np.concatenate([a["ids"] for a in stored])
    obs = np.concatenate([a["obs"] for a in stored])
    assert ids.tolist() == list(range(info["next_id"])) and info["size"] == len(ids)
    rows = {(int(w), int(p)) for w, p in obs[:, :2]}
    assert len(rows) == len(ids), f"{len(ids) - len(rows)} rows stored twice"

    acknowledged: set[tuple[int, int]] = set()
    for w in range(WRITERS):
        acks = json.loads((tmp_path / f"w{w}.json").read_text())
        assert [a[0] for a in acks] == list(range(len(acks)))  # every batch, in order
        # Writes went on both before the crash and after the restart.
        assert any(a[4] < killed_at for a in acks) and any(a[4] > restarted_at for a in acks)
        for seq, first, count, _, _ in acks:
            assert count == ROWS
            # The acknowledged ids hold exactly this batch's rows.
            at = obs[(ids >= first) & (ids < first + count)]
            assert (at[:, 0] == w).all() and at[:, 1].tolist() == list(
                range(seq * ROWS, (seq + 1) * ROWS)
            )
            acknowledged |= {(w, seq * ROWS + i) for i in range(ROWS)}
    lost, extra = acknowledged - rows, rows - acknowledged
    assert not lost and not extra, f"{len(lost)} acknowledged rows lost, {len(extra)} not acked"
    for s in range(SAMPLERS):
        assert json.loads((tmp_path / f"s{s}.json").read_text())["served"] > 0
