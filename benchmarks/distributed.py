"""Ape-X on Ray (agent/distributed/) against one process, on CartPole-v1, and the Memory service
under the Ape-X traffic mix; ends with a projection to 16 and 64 actors on a cluster.

    python benchmarks/distributed.py                      # everything, full budgets
    python benchmarks/distributed.py --quick              # tiny budgets: checks that every part runs
    python benchmarks/distributed.py [--actors 1,2,4] [--steps 20000] [--solve-steps 50000]
        [--service-seconds 15] [--writers 4] [--parts throughput,solve,service] [--set K=V ...]
        [--json PATH]

Parts:

- ``throughput``: env steps/s collected, learner updates/s and learner idle fraction (1 - update
  seconds / wall) of a distributed run with each of ``--actors`` actors over ``--steps`` env
  steps, and the same for one process with the same config and budget (local replay; its idle
  fraction is 1 - the share of wall time spent in ``agent.learn``, which includes local sampling,
  measured by wrapping that call).
- ``solve``: wall seconds (from the start of ``run``, so Ray actor start-up counts for the
  distributed run) until a greedy evaluation of 20 episodes reaches 475, with 2 actors against
  one process, within ``--solve-steps``; evaluations every ``--eval-every`` env steps (their own
  time counts). A run stops at its first solving evaluation.
- ``service``: a Memory service of its own; ``--writers`` processes post 64-row CartPole-sized
  binary batches (with an initial ``priorities`` column, idempotency keys) while one process
  samples prioritized batches (batch_size 256, 16 a request, binary) and posts priority updates
  as the learner does (one request per 8 batches), for ``--service-seconds``. Rows/s in, batches/s out, priority
  updates/s, client-side latency p50/p99 per route.

The learning settings are the CartPole gym profile plus train.learning_rate=0.001,
train.gradient_steps=256, train.target_update_interval=256; ``--set`` goes on top. One local Ray
instance (all of the machine's CPUs) and one Memory service serve the throughput and solve parts.
On one machine the actors share its cores with the learner, so the figures for several actors say
more about contention than about scaling; the projection uses them as per-actor figures of a
cluster. Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.distributed.learner import PRIORITY_BATCHES  # noqa: E402
from memory import wire  # noqa: E402

TASK = "CartPole-v1"
SOLVED = 475.0
SOLVE_ACTORS = 2
EVAL_EPISODES = 20
LEARNING = ["train.learning_rate=0.001", "train.gradient_steps=256", "train.target_update_interval=256"]
OBS_DIM = 4
WRITE_ROWS = 64
SAMPLE_BATCH = 256
SAMPLE_BATCHES = 16
PROJECT_ACTORS = (16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_headers() -> dict[str, str]:
    token = os.environ.get("MEMORY_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------- configs and runs


def make_config(sets: list[str], steps: int, actors: int, url: str | None, eval_every: int = 0) -> Any:
    """The CartPole gym profile, this benchmark's learning settings, ``--set``, then what the
    part decides (budget, actors, the service, evaluations)."""
    from agent.config import load_config, with_run_collection

    overrides = [
        f"train.task={TASK}",
        *LEARNING,
        *sets,
        f"train.total_timesteps={steps}",
        "train.max_episodes=null",
        f"train.eval_frequency={eval_every}",
        f"train.eval_episodes={EVAL_EPISODES}",
        f"distributed.actors={actors}",
    ]
    if url is not None:
        overrides += ["memory.enabled=true", f"memory.base_url={url}", "memory.autostart=false"]
    else:
        overrides += ["memory.enabled=false"]
    config = load_config(overrides=overrides, gym_env=True)
    return with_run_collection(config, f"bench-{TASK}-a{actors}") if url is not None else config


class EvalClock:
    """A metrics sink that stamps each evaluation with the wall seconds since ``start()``; the
    first one that reaches ``target`` is the solve (``train.stop_at_reward`` ends the run there)."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.started = time.perf_counter()
        self.evaluations: list[tuple[int, float, float]] = []
        self.solved: tuple[int, float] | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def log_metrics(self, metrics: Any, step: int) -> None:
        if "eval/mean_reward" not in metrics:
            return
        seconds = time.perf_counter() - self.started
        mean = float(metrics["eval/mean_reward"])
        self.evaluations.append((int(step), mean, seconds))
        if self.solved is None and mean >= self.target:
            self.solved = (int(step), seconds)

    def close(self) -> None:
        pass


def make_trainer(config: Any, sink: Any = None) -> Any:
    from agent.dqn import LearningAgent
    from agent.tasks import task_spaces
    from agent.training import Trainer

    obs_dim, n_actions = task_spaces(TASK, config=config)
    agent = LearningAgent(obs_dim, n_actions, config=config)
    return Trainer(agent, task_type=TASK, metrics_sink=sink, tensorboard=False)


def run_single(config: Any, sink: EvalClock | None = None) -> dict[str, Any]:
    """One process, local replay; the time in ``agent.learn`` is measured by wrapping it."""
    trainer = make_trainer(config, sink)
    agent = trainer.agent
    learn = agent.learn
    spent = [0.0]

    def timed_learn(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return learn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    agent.learn = timed_learn  # an instance attribute: Trainer.run calls self.agent.learn
    if sink is not None:
        sink.start()
    summary = trainer.run()
    wall = summary["wall_seconds"]
    return {
        "mode": "single process",
        "actors": 0,
        "steps": summary["global_step"],
        "wall_seconds": wall,
        "steps_per_second": summary["steps_per_second"],
        "updates": summary["training_steps"],
        "updates_per_second": summary["training_steps"] / max(wall, 1e-9),
        "learner_idle_fraction": 1.0 - min(spent[0] / max(wall, 1e-9), 1.0),
        "learn_seconds": spent[0],
    }


def run_distributed(config: Any, sink: EvalClock | None = None) -> dict[str, Any]:
    from agent.distributed import DistributedTrainer

    trainer = make_trainer(config, sink)
    driver = DistributedTrainer(trainer)
    if sink is not None:
        sink.start()
    summary = driver.run()
    dist = summary["distributed"]
    busy = dist["learner_update_seconds"] + dist["learner_sample_seconds"]
    return {
        "mode": "distributed",
        "actors": dist["actors"],
        "steps": summary["global_step"],
        "wall_seconds": summary["wall_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "updates": dist["updates"],
        "updates_per_second": dist["updates_per_second"],
        "learner_idle_fraction": dist["learner_idle_fraction"],
        "learner_update_seconds": dist["learner_update_seconds"],
        "learner_sample_seconds": dist["learner_sample_seconds"],
        # What the learner does per second of its own work (updates and sampling): its capacity.
        "learner_updates_per_busy_second": dist["updates"] / busy if busy > 0 else float("nan"),
        "rows_delivered": dist["rows_delivered"],
        "actor_restarts": dist["actor_restarts"],
    }


def part_throughput(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    rows = []
    for actors in args.actor_counts:
        print(f"throughput: distributed, {actors} actor(s), {args.steps} steps ...", flush=True)
        rows.append(run_distributed(make_config(args.set, args.steps, actors, url)))
    print(f"throughput: single process, {args.steps} steps ...", flush=True)
    rows.append(run_single(make_config(args.set, args.steps, 0, None)))
    return rows


def part_solve(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    results = []
    for actors in (SOLVE_ACTORS, 0):
        label = f"distributed, {actors} actors" if actors else "single process"
        print(f"solve: {label}, up to {args.solve_steps} steps ...", flush=True)
        sink = EvalClock(SOLVED)
        sets = [*args.set, f"train.stop_at_reward={SOLVED}"]
        if actors:
            run = run_distributed(make_config(sets, args.solve_steps, actors, url, args.eval_every), sink)
        else:
            run = run_single(make_config(sets, args.solve_steps, 0, None, args.eval_every), sink)
        results.append(
            {
                "mode": label,
                "actors": actors,
                "solved_step": sink.solved[0] if sink.solved else None,
                "solved_seconds": sink.solved[1] if sink.solved else None,
                "steps": run["steps"],
                "wall_seconds": run["wall_seconds"],
                "best_eval": max((e[1] for e in sink.evaluations), default=None),
                "evaluations": sink.evaluations,
            }
        )
    return results


# ---------------------------------------------------------------------- the service part


def _rows(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "obs": rng.standard_normal((rows, OBS_DIM), dtype=np.float32),
        "actions": rng.integers(0, 2, rows).astype(np.int64),
        "rewards": np.ones(rows, np.float32),
        "next_obs": rng.standard_normal((rows, OBS_DIM), dtype=np.float32),
        "dones": (rng.random(rows) < 0.02).astype(np.float32),
        "priorities": rng.exponential(1.0, rows).astype(np.float32),
    }


def writer_process(index: int, url: str, collection: str, seconds: float, barrier: Any, out: Any) -> None:
    """Posts 64-row binary batches with initial priorities until the time is up."""
    rng = np.random.default_rng(index)
    bodies = [wire.encode(_rows(rng, WRITE_ROWS)) for _ in range(16)]
    path = f"/v1/collections/{collection}/transitions"
    latencies: list[float] = []
    rows = errors = 0
    with httpx.Client(base_url=url, timeout=30, headers=auth_headers()) as http:
        barrier.wait()
        started = time.perf_counter()
        end = started + seconds
        seq = 0
        while time.perf_counter() < end:
            headers = {"content-type": wire.CONTENT_TYPE, "idempotency-key": f"bench-writer-{index}:{seq}"}
            t = time.perf_counter()
            response = http.post(path, content=bodies[seq % len(bodies)], headers=headers)
            latencies.append(time.perf_counter() - t)
            seq += 1
            if response.status_code == 200:
                rows += WRITE_ROWS
            else:
                errors += 1
        elapsed = time.perf_counter() - started
    out.put({"role": "writer", "rows": rows, "errors": errors, "seconds": elapsed, "store": latencies})


def sampler_process(url: str, collection: str, seconds: float, barrier: Any, out: Any) -> None:
    """Prioritized samples (256 x 16 a request, binary); a priority update per PRIORITY_BATCHES
    batches, as the learner sends them."""
    rng = np.random.default_rng(1234)
    sample_path = f"/v1/collections/{collection}/sample"
    priority_path = f"/v1/collections/{collection}/priorities"
    params = {"batch_size": SAMPLE_BATCH, "prioritized": "true", "beta": 0.4, "batches": SAMPLE_BATCHES}
    sample_lat: list[float] = []
    priority_lat: list[float] = []
    batches = updates = errors = 0
    with httpx.Client(base_url=url, timeout=30, headers=auth_headers()) as http:
        barrier.wait()
        started = time.perf_counter()
        end = started + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            response = http.get(sample_path, params=params, headers={"accept": wire.CONTENT_TYPE})
            if response.status_code != 200:
                errors += 1
                time.sleep(0.01)
                continue
            arrays, _ = wire.decode(response.content)
            sample_lat.append(time.perf_counter() - t)
            ids = arrays["ids"]
            batches += len(ids) // SAMPLE_BATCH
            step = SAMPLE_BATCH * PRIORITY_BATCHES  # the learner sends several batches' priorities at once
            for i in range(0, len(ids), step):
                chunk = np.ascontiguousarray(ids[i : i + step], dtype=np.int64)
                body = wire.encode({"ids": chunk, "priorities": rng.exponential(1.0, len(chunk)).astype(np.float32)})
                t = time.perf_counter()
                reply = http.post(priority_path, content=body, headers={"content-type": wire.CONTENT_TYPE})
                priority_lat.append(time.perf_counter() - t)
                if reply.status_code == 200:
                    updates += 1
                else:
                    errors += 1
        elapsed = time.perf_counter() - started
    out.put(
        {
            "role": "sampler",
            "batches": batches,
            "updates": updates,
            "errors": errors,
            "seconds": elapsed,
            "sample": sample_lat,
            "priorities": priority_lat,
        }
    )


def percentiles_ms(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "count": 0}
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "count": len(ms)}


def part_service(args: argparse.Namespace) -> dict[str, Any]:
    from flows.memory_service import ensure_memory_service

    data = Path(tempfile.mkdtemp(prefix="dist-bench-service-"))
    url = f"http://127.0.0.1:{free_port()}"
    collection = "bench-apex"
    print(f"service: {args.writers} writers + 1 prioritized sampler, {args.service_seconds:g} s ...", flush=True)
    try:
        with ensure_memory_service(url, data, autostart=True):
            with httpx.Client(base_url=url, timeout=30, headers=auth_headers()) as http:
                http.post("/v1/collections", json={"name": collection, "dim": OBS_DIM}).raise_for_status()
                body = wire.encode(_rows(np.random.default_rng(99), 4096))
                for seq in range(5):  # something to sample from at once
                    http.post(
                        f"/v1/collections/{collection}/transitions",
                        content=body,
                        headers={"content-type": wire.CONTENT_TYPE, "idempotency-key": f"bench-prefill:{seq}"},
                    ).raise_for_status()
            ctx = mp.get_context("spawn")
            barrier = ctx.Barrier(args.writers + 1)
            out = ctx.Queue()
            procs = [
                ctx.Process(target=writer_process, args=(i, url, collection, args.service_seconds, barrier, out))
                for i in range(args.writers)
            ]
            procs.append(ctx.Process(target=sampler_process, args=(url, collection, args.service_seconds, barrier, out)))
            for p in procs:
                p.start()
            reports = [out.get(timeout=args.service_seconds + 120) for _ in procs]
            for p in procs:
                p.join(30)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    writers = [r for r in reports if r["role"] == "writer"]
    sampler = next(r for r in reports if r["role"] == "sampler")
    write_seconds = max(r["seconds"] for r in writers)
    return {
        "writers": args.writers,
        "seconds": args.service_seconds,
        "rows_in_per_second": sum(r["rows"] for r in writers) / write_seconds,
        "batches_out_per_second": sampler["batches"] / sampler["seconds"],
        "priority_updates_per_second": sampler["updates"] / sampler["seconds"],
        "errors": sum(r["errors"] for r in reports),
        "latency": {
            "store": percentiles_ms([x for r in writers for x in r["store"]]),
            "sample": percentiles_ms(sampler["sample"]),
            "priorities": percentiles_ms(sampler["priorities"]),
        },
    }


# ---------------------------------------------------------------------- projection


def projection(throughput: list[dict[str, Any]] | None, service: dict[str, Any] | None, config: Any) -> dict[str, Any] | None:
    """Per-actor collection from the 1-actor run (the smallest measured), the service's measured
    rates, the learner's measured capacity: what 16 and 64 actors would need, and what gives first."""
    dist = [r for r in throughput or [] if r["mode"] == "distributed"]
    if not dist or service is None:
        return None
    base = min(dist, key=lambda r: r["actors"])
    per_actor = base["steps_per_second"] / base["actors"]
    ratio = config.train.gradient_steps / config.train.train_freq  # updates per env step
    busiest = max(dist, key=lambda r: r["actors"])
    learner_capacity = busiest["learner_updates_per_busy_second"]
    learner_measured = max(r["updates_per_second"] for r in dist)
    insert = service["rows_in_per_second"]
    sample = service["batches_out_per_second"]
    limits = {  # actors each component can keep up with
        "the service's inserts": insert / per_actor,
        "the service's prioritized sampling": sample / (per_actor * ratio),
        "the learner's updates": learner_capacity / (per_actor * ratio),
    }
    first = min(limits, key=lambda k: limits[k])
    rows = []
    for n in PROJECT_ACTORS:
        need_rows = n * per_actor
        need_updates = need_rows * ratio
        rows.append(
            {
                "actors": n,
                "rows_in_needed": need_rows,
                "insert_covered": insert >= need_rows,
                "updates_needed": need_updates,
                "sample_covered": sample >= need_updates,
                "learner_covered": learner_capacity >= need_updates,
            }
        )
    sentence = (
        f"First bottleneck: {first}, which keeps up with about {limits[first]:.1f} actors "
        f"(then {', '.join(f'{k} ~{v:.1f}' for k, v in sorted(limits.items(), key=lambda kv: kv[1]) if k != first)})"
    )
    return {
        "per_actor_steps_per_second": per_actor,
        "from_actors": base["actors"],
        "replay_ratio_updates_per_step": ratio,
        "batch_size": config.train.batch_size,
        "service_rows_in_per_second": insert,
        "service_batches_out_per_second": sample,
        "learner_updates_per_second_measured": learner_measured,
        "learner_updates_per_busy_second": learner_capacity,
        "actors_supported": limits,
        "first_bottleneck": first,
        "rows": rows,
        "sentence": sentence,
    }


# ---------------------------------------------------------------------- printing


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for line in [headers, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def fmt(value: Any, spec: str = ",.1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def print_results(results: dict[str, Any]) -> None:
    if rows := results.get("throughput"):
        print(f"\nThroughput, {TASK}, {results['steps']} env steps a run, {os.cpu_count()} CPUs, one local Ray instance")
        table(
            ("run", "steps/s", "updates/s", "learner idle", "wall s", "updates"),
            [
                (
                    f"distributed, {r['actors']} actor(s)" if r["actors"] else "single process",
                    fmt(r["steps_per_second"]),
                    fmt(r["updates_per_second"]),
                    fmt(r["learner_idle_fraction"], ".2f"),
                    fmt(r["wall_seconds"]),
                    str(r["updates"]),
                )
                for r in rows
            ],
        )
        print("(single process: idle = 1 - share of wall time in agent.learn, local sampling included;")
        print(" distributed: 1 - learner update seconds / wall, sampling from the service counted as idle)")
    if rows := results.get("solve"):
        print(f"\nTime to solve (greedy {EVAL_EPISODES}-episode evaluation >= {SOLVED:g}), budget {results['solve_steps']} steps, "
              f"evaluations every {results['eval_every']} steps")
        table(
            ("run", "solved at step", "wall s to solve", "best eval", "steps run", "wall s"),
            [
                (
                    r["mode"],
                    str(r["solved_step"]) if r["solved_step"] is not None else "not solved",
                    fmt(r["solved_seconds"]) if r["solved_step"] is not None else "not solved",
                    fmt(r["best_eval"]),
                    str(r["steps"]),
                    fmt(r["wall_seconds"]),
                )
                for r in rows
            ],
        )
    if service := results.get("service"):
        print(f"\nMemory service, Ape-X mix: {service['writers']} writers ({WRITE_ROWS}-row binary batches with priorities) "
              f"+ 1 sampler (B={SAMPLE_BATCH} x {SAMPLE_BATCHES} a request, prioritized, a priority update per {PRIORITY_BATCHES} batches), "
              f"{service['seconds']:g} s, errors {service['errors']}")
        table(
            ("measure", "value"),
            [
                ("rows/s in", fmt(service["rows_in_per_second"])),
                ("batches/s out", fmt(service["batches_out_per_second"])),
                ("priority updates/s", fmt(service["priority_updates_per_second"])),
                *[
                    (f"{route} latency p50 / p99 (ms)", f"{fmt(lat['p50_ms'], '.2f')} / {fmt(lat['p99_ms'], '.2f')}  (n={lat['count']})")
                    for route, lat in service["latency"].items()
                ],
            ],
        )
    if proj := results.get("projection"):
        print(f"\nProjection to a cluster (one actor a core; per-actor rate from the {proj['from_actors']}-actor run: "
              f"{proj['per_actor_steps_per_second']:,.0f} steps/s; replay ratio {proj['replay_ratio_updates_per_step']:g} "
              f"updates/step, B={proj['batch_size']})")
        print(f"service measured: {proj['service_rows_in_per_second']:,.0f} rows/s in, "
              f"{proj['service_batches_out_per_second']:,.0f} batches/s out (B={SAMPLE_BATCH}); learner measured: "
              f"{proj['learner_updates_per_second_measured']:,.0f} updates/s (rate-limited by the ratio), "
              f"{proj['learner_updates_per_busy_second']:,.0f} updates per busy second (its capacity)")
        print(f"(each update samples one batch of B={proj['batch_size']}; the service's batches/s were measured at "
              f"B={SAMPLE_BATCH} by one sequential sampler, so the sampling column is conservative)")
        table(
            ("actors", "rows/s in needed", "insert covered", "updates/s needed", "sampling covered", "learner covered"),
            [
                (
                    str(r["actors"]),
                    fmt(r["rows_in_needed"], ",.0f"),
                    "yes" if r["insert_covered"] else "NO",
                    fmt(r["updates_needed"], ",.0f"),
                    "yes" if r["sample_covered"] else "NO",
                    "yes" if r["learner_covered"] else "NO",
                )
                for r in proj["rows"]
            ],
        )
        print(proj["sentence"])
    elif "projection" in results:
        print("\nProjection: needs the throughput and service parts")


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks that every part runs")
    parser.add_argument("--actors", default=None, help="comma-separated actor counts (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=None, help="env steps per throughput run (default 20000)")
    parser.add_argument("--solve-steps", type=int, default=None, help="env step budget to solve (default 50000)")
    parser.add_argument("--eval-every", type=int, default=None, help="env steps between evaluations (default 2500)")
    parser.add_argument("--service-seconds", type=float, default=None, help="service part length (default 15)")
    parser.add_argument("--writers", type=int, default=4, help="writer processes in the service part")
    parser.add_argument("--parts", default="throughput,solve,service", help="which parts to run")
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="config override (repeatable)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all figures here")
    args = parser.parse_args()
    q = args.quick
    args.actor_counts = [int(a) for a in (args.actors or ("1,2" if q else "1,2,4")).split(",")]
    args.steps = args.steps or (3000 if q else 20000)
    args.solve_steps = args.solve_steps or (3000 if q else 50000)
    args.eval_every = args.eval_every or (1000 if q else 2500)
    args.service_seconds = args.service_seconds or (3.0 if q else 15.0)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"throughput", "solve", "service"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    logging.basicConfig(level=logging.WARNING)
    config = make_config(args.set, args.steps, 1, "http://127.0.0.1:1")  # for the printed settings
    results: dict[str, Any] = {
        "task": TASK,
        "quick": q,
        "cpus": os.cpu_count(),
        "sets": [*LEARNING, *args.set],
        "steps": args.steps,
        "solve_steps": args.solve_steps,
        "eval_every": args.eval_every,
    }
    if parts & {"throughput", "solve"}:
        import ray

        from flows.memory_service import ensure_memory_service

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        data = Path(tempfile.mkdtemp(prefix="dist-bench-"))
        url = f"http://127.0.0.1:{free_port()}"
        try:
            with ensure_memory_service(url, data, autostart=True):
                if "throughput" in parts:
                    results["throughput"] = part_throughput(args, url)
                if "solve" in parts:
                    results["solve"] = part_solve(args, url)
        finally:
            ray.shutdown()
            shutil.rmtree(data, ignore_errors=True)
    if "service" in parts:
        results["service"] = part_service(args)
    if {"throughput", "service"} <= parts:
        results["projection"] = projection(results.get("throughput"), results.get("service"), config)

    print(f"\n{TASK}; settings: CartPole gym profile + {' '.join(results['sets'])}")
    if q:
        print("--quick: tiny budgets, to check that every part runs; the figures mean nothing")
    print_results(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
