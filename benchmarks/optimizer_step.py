"""Adam's step for DQN's network (4 -> 256 -> 256 -> 2 by default, one CPU thread): the
project's FastAdam against torch's public optimizer, fused and foreach, in one process.

Each variant applies the same precomputed gradients; the figure is microseconds per step, the
median of several rounds, and each variant's ratio to the fastest. Run it on a quiet machine:

    python benchmarks/optimizer_step.py [--steps 3000] [--rounds 5] [--hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agent.network import LearningNetwork
from agent.optim import FastAdam, PublicAdam


def _variants(hidden: int) -> dict[str, tuple[object, list[torch.nn.Parameter]]]:
    out = {}
    for name in ("FastAdam (private fused kernel)", "Adam(fused=True).step", "Adam(foreach=True).step"):
        torch.manual_seed(0)
        net = LearningNetwork(4, 2, hidden_layers=(hidden, hidden))
        params = list(net.parameters())
        if name.startswith("FastAdam"):
            out[name] = (FastAdam(params, lr=1e-3), params)
        else:
            out[name] = (PublicAdam(params, lr=1e-3, fused="fused" in name), params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = _variants(args.hidden)
    grads = [[torch.randn_like(p) for p in next(iter(variants.values()))[1]] for _ in range(16)]
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # rounds interleave the variants: drift hits all alike
        for name, (optimizer, _) in variants.items():
            start = time.perf_counter()
            for step in range(args.steps):
                optimizer.apply([g.clone() for g in grads[step % 16]], 10.0)
            timings[name].append((time.perf_counter() - start) / args.steps * 1e6)
    medians = {name: statistics.median(t) for name, t in timings.items()}
    fastest = min(medians.values())
    print(f"Adam step, MLP 4->{args.hidden}->{args.hidden}->2, {args.steps} steps x {args.rounds} rounds, 1 thread")
    for name, value in medians.items():
        print(f"  {name:34s} {value:8.1f} us/step   x{value / fastest:.2f}")
    same = all(
        torch.equal(a, b)
        for a, b in zip(variants["FastAdam (private fused kernel)"][1], variants["Adam(fused=True).step"][1])
    )
    print(f"FastAdam and Adam(fused=True) end on bitwise equal weights: {same}")


if __name__ == "__main__":
    main()
