"""Environment steps per second of the task environments, against Gymnasium's vectorised CartPole.

One core (OMP/MKL threads 1), random actions drawn before timing, same process. Each figure is
the median of ``--repeats`` timed windows of ``--seconds`` each, with the peer (CartPole in
Gymnasium's own vector form, ``gym.make_vec(..., vectorization_mode="vector_entry_point")``)
measured between them, so drift in the machine's speed hits both alike. Episodes end and
autoreset during the timing as they do in training (each task's first stage, random actions).

    python benchmarks/tasks.py [--batch 64 1024] [--seconds 1.0] [--repeats 3] [--vision]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gymnasium as gym  # noqa: E402

from agent.tasks import TaskType, kernels, make_vector_env  # noqa: E402


def steps_per_second(make: Callable[[], gym.vector.VectorEnv], seconds: float) -> float:
    """Row-steps per second over one timed window (after a short warm-up)."""
    envs = make()
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, envs.single_action_space.n, envs.num_envs) for _ in range(256)]
    for i in range(20):
        envs.step(actions[i])
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for i in range(32):
            envs.step(actions[(steps + i) & 255])
        steps += 32
    envs.close()
    return steps * envs.num_envs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vision", action="store_true", help="also time the INTERMEDIATE stage (range sensors on)")
    parser.add_argument("--tasks", nargs="+", default=[t.value for t in TaskType])
    args = parser.parse_args()

    probe = make_vector_env("navigation", 2)
    probe.reset(seed=0)
    started = time.perf_counter()
    probe.step(np.zeros(2, dtype=np.int64))
    how = "numba kernel" if kernels.ENABLED else "numpy (numba not installed or LAGENT_NUMBA=0)"
    print(f"navigation step: {how}; first step (compile, or load from numba's cache) {time.perf_counter() - started:.2f} s")
    stages = [("beginner", None)] + ([("vision", {"vision_required": True, "workspace_size": (8.0, 8.0, 4.0), "num_obstacles": 5})] if args.vision else [])
    print(f"{'env':<28}{'batch':>7}{'rows':>7}{'steps/s':>14}{'CartPole':>14}{'ratio':>8}")
    for batch in args.batch:
        peer = lambda: gym.make_vec("CartPole-v1", num_envs=batch, vectorization_mode="vector_entry_point")  # noqa: E731
        for task in args.tasks:
            for stage, params in stages:
                make = lambda: make_vector_env(task, batch, task_params=params)  # noqa: E731
                ours, theirs = [], []
                for _ in range(args.repeats):
                    ours.append(steps_per_second(make, args.seconds))
                    theirs.append(steps_per_second(peer, args.seconds))
                rows = make().num_envs
                mine, peer_rate = statistics.median(ours), statistics.median(theirs)
                name = task if stage == "beginner" else f"{task} ({stage})"
                print(f"{name:<28}{batch:>7}{rows:>7}{mine:>14,.0f}{peer_rate:>14,.0f}{mine / peer_rate:>8.2f}")


if __name__ == "__main__":
    main()
