"""Memory service throughput and search quality, against a service started here on loopback.

    python benchmarks/memory_service.py            # full run: search at 100k and 1M states
    python benchmarks/memory_service.py --quick    # tiny sizes: checks that every part runs

Measures stored transitions/s (batched binary bodies, durable before the answer), replay batches/s
at B=32 and B=256, and k=5 search latency p50/p99 with recall@5 against exact search, on 32-d
states that arrive in trajectory order (random walks), the order that defeats incremental HNSW.
Prints one table beside DeepMind Reverb: measured side by side in this process if ``dm-reverb``
(with TensorFlow) imports, else its figures measured on this machine class (dm-reverb 0.14 needs
TensorFlow 2.15 and an older numpy, so it does not install beside this project). ``--quick`` uses
20k search states and an exact-search limit of 5k, so the IVF path runs too; its figures mean
nothing. Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.memory_client import MemoryClient  # noqa: E402
from memory import wire  # noqa: E402

REVERB = {"insert": 6_000.0, "sample32": 1_453.0, "sample256": 118.0}  # inserts: 5-7k/s
TARGETS = {"insert": 140_000.0, "sample256": 600.0, "search_p50_ms_1m": 2.0, "recall_1m": 0.95}
OBS_DIM = 4  # CartPole-sized transitions for the insert and replay figures
SEARCH_DIM = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(data: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memory",
            "--port",
            str(port),
            "--data",
            str(data),
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the service did not start")


def transitions(rng: np.random.Generator, rows: int, dim: int) -> dict[str, np.ndarray]:
    return {
        "obs": rng.standard_normal((rows, dim), dtype=np.float32),
        "actions": rng.integers(0, 4, rows),
        "rewards": rng.standard_normal(rows, dtype=np.float32),
        "next_obs": rng.standard_normal((rows, dim), dtype=np.float32),
        "dones": (rng.random(rows) < 0.01).astype(np.float32),
    }


def random_walks(rng: np.random.Generator, rows: int, dim: int, length: int = 200) -> np.ndarray:
    """States in trajectory order: each episode a random walk from a random start."""
    episodes = -(-rows // length)
    starts = rng.standard_normal((episodes, 1, dim), dtype=np.float32) * 3
    steps = rng.standard_normal((episodes, length, dim), dtype=np.float32) * 0.1
    return (starts + np.cumsum(steps, axis=1)).reshape(-1, dim)[:rows]


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of ``fn`` per second over about ``seconds`` (after a short warm-up)."""
    for _ in range(20):
        fn()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        fn()
        count += 1
    return count / elapsed


def bench_insert(http: httpx.Client, capacity: int, batch: int, seconds: float) -> float:
    """Rows/s of raw binary POSTs; the capacity is below the exact-search limit, so no IVF build
    competes for the two cores, and FIFO eviction runs throughout."""
    http.post(
        "/v1/collections", json={"name": "bench-insert", "dim": OBS_DIM, "capacity": capacity}
    )
    body = wire.encode(transitions(np.random.default_rng(0), batch, OBS_DIM))
    headers = {"content-type": wire.CONTENT_TYPE}

    def post() -> None:
        http.post(
            "/v1/collections/bench-insert/transitions", content=body, headers=headers
        ).raise_for_status()

    return rate(post, seconds) * batch


async def bench_client_insert(url: str, rows: int) -> float:
    """Rows/s through MemoryClient: store_transitions calls until flush() reports them stored."""
    data = transitions(np.random.default_rng(1), rows, OBS_DIM)
    async with MemoryClient(
        url, collection="bench-client", batch_rows=4096, capacity=100_000
    ) as client:
        await client.store_transitions(**{k: v[:10] for k, v in data.items()})
        await client.flush()
        started = time.perf_counter()
        for start in range(0, rows, 256):  # a vectorised env's step at a time
            await client.store_transitions(**{k: v[start : start + 256] for k, v in data.items()})
        assert await client.flush(60)
        return rows / (time.perf_counter() - started)


def bench_sample(http: httpx.Client, batch: int, seconds: float) -> float:
    headers = {"accept": wire.CONTENT_TYPE}
    params = {"batch_size": batch}

    def sample() -> None:
        wire.decode(
            http.get("/v1/collections/bench-insert/sample", params=params, headers=headers).content
        )

    return rate(sample, seconds)


async def bench_client_sample(url: str, batch: int, seconds: float) -> float:
    async with MemoryClient(url, collection="bench-insert") as client:
        for _ in range(20):
            await client.get_replay_batch(batch)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            assert await client.get_replay_batch(batch) is not None
            count += 1
        return count / (time.perf_counter() - started)


def bench_search(http: httpx.Client, size: int, queries: int) -> dict[str, float]:
    """Store ``size`` trajectory-ordered states, then time k=5 searches and measure recall@5."""
    rng = np.random.default_rng(size)
    name = f"bench-search-{size}"
    states = random_walks(rng, size, SEARCH_DIM)
    http.post("/v1/collections", json={"name": name, "dim": SEARCH_DIM, "capacity": size})
    started = time.perf_counter()
    for start in range(0, size, 8192):
        chunk = states[start : start + 8192]
        rows = len(chunk)
        body = wire.encode(
            {
                "obs": chunk,
                "actions": np.zeros(rows, np.int64),
                "rewards": np.zeros(rows, np.float32),
                "next_obs": chunk,
                "dones": np.zeros(rows, np.float32),
            }
        )
        http.post(
            f"/v1/collections/{name}/transitions",
            content=body,
            headers={"content-type": wire.CONTENT_TYPE},
        ).raise_for_status()
    fill = time.perf_counter() - started
    while (index := http.get(f"/v1/collections/{name}/stats").json()["index"])["building"]:
        time.sleep(0.2)
    # Queries near visited states, as an agent revisiting a region asks: a stored state plus a step.
    picks = rng.integers(0, size, queries)
    query_states = (
        states[picks] + rng.standard_normal((queries, SEARCH_DIM), dtype=np.float32) * 0.1
    )
    _, exact = faiss.knn(query_states, states, 5)  # row i of states has id i
    latencies, hits = [], 0
    headers = {"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE}
    for i, query in enumerate(query_states):
        body = wire.encode({"states": query[None]})
        t = time.perf_counter()
        response = http.post(
            f"/v1/collections/{name}/search", params={"k": 5}, content=body, headers=headers
        )
        arrays, _ = wire.decode(response.content)
        latencies.append(time.perf_counter() - t)
        hits += len(set(arrays["ids"].tolist()) & set(exact[i].tolist()))
    ms = np.array(latencies) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "recall": hits / (5 * queries),
        "fill_rows_per_s": size / fill,
        "index": index["kind"],
        "build_s": index["last_build_seconds"],
    }


def reverb_side_by_side(seconds: float, rows: int) -> dict[str, float] | None:
    """Reverb's insert rate and sampled batches/s on the same transitions, if dm-reverb imports.

    A uniform FIFO table of single-step items (one item per transition, as a DQN replay holds
    them), written with a trajectory writer and sampled through ``TrajectoryDataset``, Reverb's
    own fast path. Not exercised on this machine class: dm-reverb does not install here.
    """
    try:
        import reverb  # type: ignore[import-not-found]
        import tensorflow as tf  # type: ignore[import-not-found]
    except ImportError:
        return None
    data = transitions(np.random.default_rng(2), rows, OBS_DIM)
    signature = {
        name: tf.TensorSpec(value.shape[1:], tf.as_dtype(value.dtype))
        for name, value in data.items()
    }
    server = reverb.Server(
        tables=[
            reverb.Table(
                name="replay",
                sampler=reverb.selectors.Uniform(),
                remover=reverb.selectors.Fifo(),
                max_size=100_000,
                rate_limiter=reverb.rate_limiters.MinSize(1),
                signature=signature,
            )
        ]
    )
    address = f"localhost:{server.port}"
    client = reverb.Client(address)
    results: dict[str, float] = {}
    try:
        started = time.perf_counter()
        with client.trajectory_writer(num_keep_alive_refs=1) as writer:
            for i in range(rows):
                writer.append({name: value[i] for name, value in data.items()})
                writer.create_item(
                    "replay", 1.0, {name: writer.history[name][-1] for name in data}
                )
            writer.flush()
        results["insert"] = rows / (time.perf_counter() - started)
        for batch in (32, 256):
            dataset = reverb.TrajectoryDataset.from_table_signature(
                server_address=address, table="replay", max_in_flight_samples_per_worker=2 * batch
            ).batch(batch, drop_remainder=True)
            iterator = iter(dataset)
            results[f"sample{batch}"] = rate(lambda: next(iterator), seconds)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated search sizes (default 100000,1000000)"
    )
    parser.add_argument(
        "--exact-max", type=int, default=None, help="the service's exact-search limit"
    )
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    seconds = 0.5 if args.quick else 3.0
    sizes = [
        int(s) for s in (args.sizes or ("20000" if args.quick else "100000,1000000")).split(",")
    ]
    exact_max = args.exact_max if args.exact_max is not None else (5000 if args.quick else None)
    data = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start_service(
        data, port, *(("--exact-max", str(exact_max)) if exact_max is not None else ())
    )
    reverb = reverb_side_by_side(seconds, 5_000 if args.quick else 50_000)
    reference = reverb or REVERB
    table = Table()
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            insert = bench_insert(http, 100_000, 4096, seconds)
            table.add(
                "store, raw HTTP, 4096-row binary batches",
                insert,
                "rows/s",
                reference["insert"],
                at_least=TARGETS["insert"],
            )
            client_rows = 50_000 if args.quick else 1_000_000
            client_insert = asyncio.run(bench_client_insert(url, client_rows))
            table.add(
                "store, MemoryClient (256-row calls, acked)",
                client_insert,
                "rows/s",
                reference["insert"],
            )
            for batch in (32, 256):
                peer = reference[f"sample{batch}"]
                raw = bench_sample(http, batch, seconds)
                table.add(
                    f"sample B={batch}, raw HTTP (1 batch a request)", raw, "batches/s", peer
                )
                via_client = asyncio.run(bench_client_sample(url, batch, seconds))
                table.add(
                    f"sample B={batch}, MemoryClient (prefetch, 16 a request)",
                    via_client,
                    "batches/s",
                    peer,
                    at_least=TARGETS["sample256"] if batch == 256 else None,
                )
            for size in sizes:
                result = bench_search(http, size, 100 if args.quick else 1000)
                label = f"{size:,} states ({result['index']})"
                big = size >= 1_000_000
                table.add(
                    f"search k=5 p50, {label}",
                    result["p50"],
                    "ms",
                    at_most=TARGETS["search_p50_ms_1m"] if big else None,
                )
                table.add(f"search k=5 p99, {label}", result["p99"], "ms")
                table.add(
                    f"search recall@5 vs exact, {label}",
                    result["recall"],
                    "",
                    at_least=TARGETS["recall_1m"] if big else None,
                )
                table.add(f"  filling {size:,} 32-d states", result["fill_rows_per_s"], "rows/s")
                if result["index"] == "ivf":
                    table.add(f"  IVF build (background), {size:,} states", result["build_s"], "s")
    finally:
        service.terminate()
        service.wait(10)
        shutil.rmtree(data, ignore_errors=True)
    source = (
        "dm-reverb measured side by side in this process"
        if reverb
        else "dm-reverb is not installed: Reverb 0.14 figures measured on this machine class "
        "(inserts 5-7k/s; 6k used for the ratio)"
    )
    print(f"\nMemory service on loopback, {os.cpu_count()} cores; {source}")
    if args.quick:
        print("--quick: tiny sizes and timings, to check that it runs; the figures mean nothing")
    print()
    table.print()


class Table:
    """Rows of figures with their Reverb ratio and target verdict, printed as aligned columns."""

    HEADERS = ("measure", "Memory service", "Reverb", "ratio", "target")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        reference: float | None = None,
        *,
        at_least: float | None = None,
        at_most: float | None = None,
    ) -> None:
        target = ""
        if at_least is not None:
            target = f">= {at_least:,g}: {'met' if value >= at_least else 'MISSED'}"
        elif at_most is not None:
            target = f"< {at_most:,g}: {'met' if value < at_most else 'MISSED'}"
        self.rows.append(
            (
                name,
                f"{value:,.2f} {unit}".rstrip(),
                f"{reference:,.0f}" if reference else "",
                f"{value / reference:.1f}x" if reference else "",
                target,
            )
        )

    def print(self) -> None:
        widths = [max(len(row[i]) for row in [self.HEADERS, *self.rows]) for i in range(5)]
        for line in [self.HEADERS, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
