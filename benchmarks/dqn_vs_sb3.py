"""This agent vs Stable-Baselines3's DQN on CartPole-v1, alternating A/B in one process.

Both use rl-baselines3-zoo's tuned CartPole settings (50k steps, lr 2.3e-3, batch 64, buffer 100k,
learning_starts 1000, train_freq 256, gradient_steps 128, target update after every training call,
exploration 1.0 -> 0.04 over the first 16%, MLP 256x256) and one torch thread. For each seed the
order of the two runs alternates, so drift in the machine's speed hits both alike. Prints wall
seconds, env steps/s, gradient updates and the greedy 10-episode reward per seed on two measures,
the same for both agents: the best evaluation's weights (evaluations every 2,500 steps; SB3's
``EvalCallback`` with ``best_model_save_path``) and the last weights; then the ratio of medians.

    pip install -e ".[bench]"        # stable-baselines3, for this script only
    python benchmarks/dqn_vs_sb3.py [--seeds 0-7] [--timesteps 50000] [--only ours|sb3] [--set K=V]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EVAL_EPISODES = 10
EVAL_SEED = 10_000


def run_ours(seed: int, timesteps: int, overrides: list[str] | None = None) -> dict:
    """Trains with configs/cartpole.yaml, which evaluates every 2,500 steps and keeps the best.

    Reports both the model the run produces (the best evaluation's weights) and, for an
    apples-to-apples look at SB3's number, the last weights.
    """
    from agent import LearningAgent, TrainingManager, load_config

    config = load_config(
        ROOT / "configs" / "cartpole.yaml",
        [f"run.seed={seed}", f"train.total_timesteps={timesteps}", "train.final_model=last", *(overrides or [])],
    )
    agent = LearningAgent(4, 2, config=config)
    trainer = TrainingManager(agent, task_type="CartPole-v1")
    start = time.perf_counter()
    asyncio.run(trainer.train())
    wall = time.perf_counter() - start
    last, _ = asyncio.run(trainer.evaluate(num_episodes=EVAL_EPISODES, seed=EVAL_SEED))
    trainer.restore_best_weights()  # what final_model=best (the profile's setting) ends with
    best, _ = asyncio.run(trainer.evaluate(num_episodes=EVAL_EPISODES, seed=EVAL_SEED))
    return {"wall": wall, "steps": trainer.global_step, "updates": agent.training_steps,
            "reward": best, "last_weights_reward": last}


def run_sb3(seed: int, timesteps: int) -> dict:
    """SB3's DQN with the same settings; its ``EvalCallback`` (every 2,500 steps, 10 episodes,
    ``best_model_save_path``) keeps the best evaluation's weights, as configs/cartpole.yaml does
    for ours, so both agents are reported on both measures."""
    import tempfile

    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import EvalCallback
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    model = DQN(
        "MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
        learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
        exploration_fraction=0.16, exploration_final_eps=0.04, policy_kwargs={"net_arch": [256, 256]},
        seed=seed, device="cpu", verbose=0,
    )
    with tempfile.TemporaryDirectory() as best_dir:
        eval_env = Monitor(gym.make("CartPole-v1"))
        eval_env.reset(seed=seed + EVAL_SEED + 1000)  # apart from the final evaluation's episodes
        callback = EvalCallback(eval_env, eval_freq=2500, n_eval_episodes=10, best_model_save_path=best_dir,
                                deterministic=True, verbose=0)
        start = time.perf_counter()
        model.learn(timesteps, callback=callback)
        wall = time.perf_counter() - start
        last = _sb3_greedy(model, evaluate_policy)
        best = _sb3_greedy(DQN.load(Path(best_dir) / "best_model.zip", device="cpu"), evaluate_policy)
    return {"wall": wall, "steps": model.num_timesteps, "updates": model._n_updates, "reward": best,
            "last_weights_reward": last}


def _sb3_greedy(model, evaluate_policy) -> float:
    import gymnasium as gym
    from stable_baselines3.common.monitor import Monitor

    env = Monitor(gym.make("CartPole-v1"))
    env.reset(seed=EVAL_SEED)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=EVAL_EPISODES, deterministic=True)
    return float(mean)


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--timesteps", type=int, default=50_000)
    parser.add_argument("--only", choices=["ours", "sb3"])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one of our agent's settings (e.g. train.lr_schedule=linear)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    runners = {"ours": lambda seed, steps: run_ours(seed, steps, args.overrides), "sb3": run_sb3}
    names = [args.only] if args.only else ["ours", "sb3"]
    rows: list[dict] = []
    for i, seed in enumerate(parse_seeds(args.seeds)):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            result = runners[name](seed, args.timesteps)
            result.update(agent=name, seed=seed, steps_per_s=result["steps"] / result["wall"])
            rows.append(result)
            print(
                f"seed {seed}  {name:4s}  {result['wall']:7.1f} s  {result['steps_per_s']:7.0f} steps/s  "
                f"{result['updates']:6d} updates  best-evaluation weights {result['reward']:6.1f} "
                f"(last weights {result['last_weights_reward']:6.1f})",
                flush=True,
            )

    print("\n| agent | seed | wall s | env steps/s | updates | greedy reward, best evaluation's weights | last weights |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["agent"], r["seed"])):
        print(f"| {row['agent']} | {row['seed']} | {row['wall']:.1f} | {row['steps_per_s']:.0f} | {row['updates']} "
              f"| {row['reward']:.1f} | {row['last_weights_reward']:.1f} |")
    summary = {}
    for name in names:
        mine = [r for r in rows if r["agent"] == name]
        summary[name] = {
            "median_wall": statistics.median(r["wall"] for r in mine),
            "median_steps_per_s": statistics.median(r["steps_per_s"] for r in mine),
            "seeds_at_475": sum(r["reward"] >= 475 for r in mine),
            "seeds_at_475_last_weights": sum(r["last_weights_reward"] >= 475 for r in mine),
            "seeds": len(mine),
            "mean_reward": float(np.mean([r["reward"] for r in mine])),
        }
        s = summary[name]
        print(f"\n{name}: median {s['median_wall']:.1f} s, {s['median_steps_per_s']:.0f} steps/s, "
              f"{s['seeds_at_475']}/{s['seeds']} seeds >= 475 with the best evaluation's weights, "
              f"{s['seeds_at_475_last_weights']}/{s['seeds']} with the last weights, "
              f"mean greedy reward {s['mean_reward']:.1f}")
    if len(names) == 2:
        ratio = summary["ours"]["median_steps_per_s"] / summary["sb3"]["median_steps_per_s"]
        print(f"\nratio of median steps/s (ours / sb3): {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
