"""Knowledge transfer through the Memory service: steps to a reward threshold, with and without it.

    python benchmarks/knowledge_transfer.py            # 5 seeds, the full budget
    python benchmarks/knowledge_transfer.py --quick    # one short seed, to check that it runs
    python benchmarks/knowledge_transfer.py --variants state,network,success  # how to choose neighbours

A source agent first trains on CartPole-v1 (the tuned profile, configs/cartpole.yaml), storing its
experience in the Memory service. Then, for each seed, three agents learn the target task, a
related one: CartPole with a shorter, lighter pole (faster dynamics), all with the same settings
(params.yaml's defaults, or ``--params``), all replaying through the service
(``replay.memory_batch_size`` rows per update) and adding the stored neighbours of their current
states to each batch (``replay.similar_batch_size``, knowledge transfer). They differ only in
what they start with:

- cold: new weights, an empty collection (memory holds only what it sees itself);
- memory: new weights, a copy of the source run's experience in its collection, so whatever it
  gains comes through the service alone;
- trained: the source agent itself (its weights) with its experience in the service: "an agent
  that trained on a task before".

``--variants`` repeats the three arms with each way of choosing the neighbours (item 10 of
issue 11): ``state`` (the default: the nearest raw states), ``network`` (the Q-network's
penultimate layer, ``replay.similar_embedding=network``) and ``success`` (neighbours from the
highest-return episodes, ``replay.similar_prefer_success``, with the target run's own rows tagged
too). The source run always tags its rows with their episode's return
(``replay.tag_episode_returns``), so every variant finds the same stored experience.

Each run evaluates greedily every ``--eval-every`` steps and stops at the first evaluation whose
mean reaches ``--threshold``; the figure is the environment steps taken by then (a run that never
reaches it counts as its budget, shown as ">N"). Prints steps per seed and arm, the medians and
the ratios cold / memory and cold / trained (above 1: fewer steps than cold). Run by hand, never
in CI; it starts its own service on loopback with a temporary data directory.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import asyncio
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import httpx
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import LearningAgent, MemoryClient, TrainingManager, load_config  # noqa: E402
from flows.memory_service import ensure_memory_service  # noqa: E402
from memory import wire  # noqa: E402

SOURCE_TASK = "CartPole-v1"
TARGET_TASK = "CartPoleShortPole-v1"


class ShortPoleCartPole(CartPoleEnv):
    """CartPole with a pole of 60% the length and mass: it falls faster, so balancing differs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.length = 0.3  # half the pole's length (CartPole-v1: 0.5)
        self.masspole = 0.06  # (CartPole-v1: 0.1)
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length


if TARGET_TASK not in gym.envs.registration.registry:
    gym.register(TARGET_TASK, entry_point=ShortPoleCartPole, max_episode_steps=500)


class StopAtThreshold:
    """A metrics sink that stops training at the first greedy evaluation reaching a threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.trainer: TrainingManager | None = None
        self.reached_at: int | None = None
        self.evaluations: list[tuple[int, float]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mean = metrics.get("eval/mean_reward")
        if mean is None:
            return
        self.evaluations.append((step, mean))
        if mean >= self.threshold and self.reached_at is None:
            self.reached_at = step
            assert self.trainer is not None
            self.trainer.request_stop()

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(
    args: argparse.Namespace, seed: int, params: str | None, budget: int, extra: list[str]
) -> Any:
    """A params overlay (None: the defaults of params.yaml), replaying through the service and
    evaluating greedily every ``--eval-every`` steps."""
    return load_config(
        [params] if params else [],
        [
            *extra,
            f"run.seed={seed}",
            f"replay.memory_batch_size={args.memory_batch_size}",
            f"replay.similar_batch_size={args.similar_batch_size}",
            f"train.total_timesteps={budget}",
            "train.max_episodes=null",
            f"train.eval_frequency={args.eval_every}",
            f"train.eval_episodes={args.eval_episodes}",
            "train.final_model=last",
        ],
    )


def train(
    args: argparse.Namespace,
    url: str,
    collection: str,
    task: str,
    seed: int,
    budget: int,
    threshold: float | None,
    params: str | None,
    *,
    extra: list[str] = (),  # type: ignore[assignment]
    weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run through the service, from ``weights`` if given; stops early at the threshold."""
    config = make_config(args, seed, params, budget, list(extra))
    sink = StopAtThreshold(threshold if threshold is not None else float("inf"))
    agent = LearningAgent(4, 2, config=config)
    if weights is not None:
        agent.q_network.load_state_dict(weights)
        agent.update_target_network()
    client = MemoryClient(url, collection=collection, batch_rows=512)
    trainer = TrainingManager(agent, client, task_type=task, metrics_sink=sink, tensorboard=False)
    sink.trainer = trainer
    started = time.perf_counter()
    try:
        asyncio.run(trainer.train(total_timesteps=budget))
        delivered = asyncio.run(client.flush(60))
    finally:
        asyncio.run(client.close())
        trainer.close()
    metrics = client.metrics()
    return {
        "reached_at": sink.reached_at,
        "steps": trainer.global_step,
        "wall": time.perf_counter() - started,
        "evaluations": sink.evaluations,
        "stored": metrics["delivered"] - metrics["duplicates"],
        "all_stored": delivered and metrics["dropped"] == 0,
        "weights": {k: v.detach().clone() for k, v in agent.q_network.state_dict().items()},
    }


def copy_collection(http: httpx.Client, source: str, target: str) -> int:
    """Copy every stored row of ``source`` into a new collection ``target``; returns the rows."""
    info = http.get(f"/v1/collections/{source}").raise_for_status().json()
    http.post(
        "/v1/collections", json={"name": target, "dim": info["dim"], "capacity": info["capacity"]}
    ).raise_for_status()
    first, copied = 0, 0
    while True:
        response = http.get(
            f"/v1/collections/{source}/transitions",
            params={"first_id": first, "limit": 65536},
            headers={"accept": wire.CONTENT_TYPE},
        ).raise_for_status()
        arrays, _ = wire.decode(response.content)
        if not len(arrays["ids"]):
            return copied
        first = int(arrays["ids"][-1]) + 1
        rows = {k: v for k, v in arrays.items() if k != "ids"}
        http.post(
            f"/v1/collections/{target}/transitions",
            content=wire.encode(rows),
            headers={"content-type": wire.CONTENT_TYPE},
        ).raise_for_status()
        copied += len(arrays["ids"])


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = (int(part) for part in text.split("-", 1))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",")]


ARMS = ("cold", "memory", "trained")
VARIANTS: dict[str, list[str]] = {
    "state": [],
    "network": ["replay.similar_embedding=network"],
    "success": ["replay.similar_prefer_success=true", "replay.tag_episode_returns=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short seed: checks that it runs")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 1,3,5")
    parser.add_argument("--source-steps", type=int, default=30_000)
    parser.add_argument("--budget", type=int, default=30_000, help="target-task steps at most")
    parser.add_argument("--threshold", type=float, default=195.0, help="greedy mean reward")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--memory-batch-size", type=int, default=32)
    parser.add_argument("--similar-batch-size", type=int, default=32)
    parser.add_argument(
        "--learning-starts",
        type=int,
        default=100,
        help="target runs: steps before the first update (same for every arm)",
    )
    parser.add_argument(
        "--source-params",
        default=str(ROOT / "configs" / "cartpole.yaml"),
        help="params overlay of the source run (default: the tuned CartPole profile)",
    )
    parser.add_argument(
        "--params", default=None, help="params overlay of the target runs (default: params.yaml)"
    )
    parser.add_argument(
        "--target",
        default=TARGET_TASK,
        help=f"target env id (default {TARGET_TASK}; {SOURCE_TASK} measures a task seen before)",
    )
    parser.add_argument(
        "--variants",
        default="state",
        help=f"comma-separated neighbour choices to measure, of {', '.join(VARIANTS)}",
    )
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.seeds, args.source_steps, args.budget = "0", 3_000, 2_000
        args.eval_every, args.eval_episodes, args.threshold = 500, 3, 100.0
    seeds = parse_seeds(args.seeds)
    target_extra = [f"train.learning_starts={args.learning_starts}"]

    data = Path(tempfile.mkdtemp(prefix="knowledge-transfer-"))
    url = f"http://127.0.0.1:{free_port()}"
    rows: dict[str, list[tuple[int, dict[str, dict[str, Any]]]]] = {v: [] for v in variants}
    with ensure_memory_service(url, data), httpx.Client(base_url=url, timeout=60) as http:
        source = train(
            args,
            url,
            "source",
            SOURCE_TASK,
            1000,
            args.source_steps,
            None,
            args.source_params,
            extra=["replay.tag_episode_returns=true"],
        )
        last_eval = source["evaluations"][-1][1] if source["evaluations"] else float("nan")
        sampled = http.get("/v1/collections/source/sample", params={"batch_size": 1000})
        tagged = [r for r in sampled.raise_for_status().json()["episode_returns"] if r is not None]
        print(
            f"source rows tagged with their episode's return: {len(tagged) / 10:.0f}% of 1,000 "
            f"sampled (median return {statistics.median(tagged) if tagged else float('nan'):.0f})",
            flush=True,
        )
        print(
            f"source: {SOURCE_TASK}, {source['steps']:,} steps in {source['wall']:.0f} s, "
            f"{source['stored']:,.0f} transitions stored, last greedy eval {last_eval:.0f}",
            flush=True,
        )
        for seed in seeds:
            for variant in variants:
                runs: dict[str, dict[str, Any]] = {}
                # Rotate the order per seed, so drift in the machine's speed hits every arm alike.
                shift = seed % len(ARMS)
                for arm in ARMS[shift:] + ARMS[:shift]:
                    collection = f"{variant}-{arm}-{seed}"
                    if arm != "cold":
                        copy_collection(http, "source", collection)
                    runs[arm] = train(
                        args,
                        url,
                        collection,
                        args.target,
                        seed,
                        args.budget,
                        args.threshold,
                        args.params,
                        extra=[*target_extra, *VARIANTS[variant]],
                        weights=source["weights"] if arm == "trained" else None,
                    )
                    if not runs[arm]["all_stored"]:
                        print(f"  warning: {arm} seed {seed} did not store everything", flush=True)
                rows[variant].append((seed, runs))
                shown = ", ".join(f"{arm} {show(runs[arm], args.budget)}" for arm in ARMS)
                print(f"seed {seed} [{variant}]: {shown} steps", flush=True)
    shutil.rmtree(data, ignore_errors=True)
    for variant in variants:
        print(f"\n== neighbours by {variant}: {' '.join(VARIANTS[variant]) or 'the defaults'}")
        report(rows[variant], args)
    if len(variants) > 1:
        summary(rows, args)


def show(run: dict[str, Any], budget: int) -> str:
    return f"{run['reached_at']:,}" if run["reached_at"] is not None else f">{budget:,}"


def report(rows: list[tuple[int, dict[str, dict[str, Any]]]], args: argparse.Namespace) -> None:
    def steps(run: dict[str, Any]) -> int:
        return run["reached_at"] if run["reached_at"] is not None else args.budget

    print(
        f"\nsteps to a greedy mean reward of {args.threshold:g} on {args.target} "
        f"({args.eval_episodes} episodes every {args.eval_every:,} steps; budget {args.budget:,}; "
        f"{len(rows)} seeds)"
    )
    header = ["seed", *ARMS, "cold/memory", "cold/trained", *(f"wall {arm}" for arm in ARMS)]
    print("  ".join(f"{h:>12}" for h in header))
    for seed, runs in rows:
        cells = [str(seed), *(show(runs[arm], args.budget) for arm in ARMS)]
        cells += [f"{steps(runs['cold']) / max(steps(runs[arm]), 1):.2f}" for arm in ARMS[1:]]
        cells += [f"{runs[arm]['wall']:.1f}s" for arm in ARMS]
        print("  ".join(f"{c:>12}" for c in cells))
    medians = {arm: statistics.median(steps(runs[arm]) for _, runs in rows) for arm in ARMS}
    cells = ["median", *(f"{medians[arm]:,.0f}" for arm in ARMS)]
    cells += [f"{medians['cold'] / max(medians[arm], 1):.2f}" for arm in ARMS[1:]]
    print("  ".join(f"{c:>12}" for c in cells))
    reached = {arm: sum(runs[arm]["reached_at"] is not None for _, runs in rows) for arm in ARMS}
    print(
        "reached the threshold: "
        + ", ".join(f"{arm} {reached[arm]}/{len(rows)}" for arm in ARMS)
        + "\nratio above 1: fewer steps than the cold agent. memory = transfer through the service "
        "alone (new weights); trained = the source agent with its experience in the service"
    )
    if len(rows) > 1:
        for arm in ARMS[1:]:
            ratios = np.array([steps(r["cold"]) / max(steps(r[arm]), 1) for _, r in rows])
            print(
                f"per-seed cold/{arm}: min {ratios.min():.2f}, median {np.median(ratios):.2f}, "
                f"max {ratios.max():.2f}"
            )


def summary(
    rows: dict[str, list[tuple[int, dict[str, dict[str, Any]]]]], args: argparse.Namespace
) -> None:
    """Median steps of every variant and arm side by side, and each variant against ``state``."""
    def steps(run: dict[str, Any]) -> int:
        return run["reached_at"] if run["reached_at"] is not None else args.budget

    print("\nmedian steps to the threshold (reached / seeds)")
    print("  ".join(f"{h:>16}" for h in ["variant", *ARMS]))
    for variant, found in rows.items():
        cells = [variant]
        for arm in ARMS:
            median = statistics.median(steps(runs[arm]) for _, runs in found)
            reached = sum(runs[arm]["reached_at"] is not None for _, runs in found)
            cells.append(f"{median:,.0f} ({reached}/{len(found)})")
        print("  ".join(f"{c:>16}" for c in cells))
    if "state" in rows:
        base = {seed: runs for seed, runs in rows["state"]}
        for variant, found in rows.items():
            if variant == "state":
                continue
            for arm in ARMS:
                ratios = [steps(base[seed][arm]) / max(steps(runs[arm]), 1) for seed, runs in found]
                print(
                    f"state/{variant} per seed, {arm}: "
                    + ", ".join(f"{r:.2f}" for r in ratios)
                    + f" (median {statistics.median(ratios):.2f}; above 1: {variant} is faster)"
                )


if __name__ == "__main__":
    main()
