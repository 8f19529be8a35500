"""This agent on classic Gymnasium envs it was not written for, next to SB3's DQN with the zoo's
tuned settings: does `lagent train --task ENV` learn without tuning?

For each env, at rl-baselines3-zoo's budget, and each seed, three agents train and are scored the
same way, by a greedy evaluation of the *final* weights over 20 episodes (seeded apart from
training):

- ``defaults``: this agent with ``gym_profiles.default`` only (what an env nobody tuned gets);
- ``profile``: this agent with the env's tuned profile (``lagent train --task ENV`` for these envs);
- ``sb3``: Stable-Baselines3's DQN with the zoo's published hyperparameters (hyperparams/dqn.yml).

Rows are appended to a JSON file as each run ends, so a long suite can run one env at a time,
in the background, and be summarised at any point (``--summary``). Run nothing else alongside
when the wall times matter; the returns do not depend on the machine's load.

    pip install -e ".[bench]"          # stable-baselines3, box2d (LunarLander)
    python benchmarks/gym_suite.py --envs Acrobot-v1 --seeds 0-4
    python benchmarks/gym_suite.py --summary
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gym_suite.json"
EVAL_EPISODES = 20
EVAL_SEED = 10_000

# rl-baselines3-zoo's budgets and the return at which an env counts as solved.
ENVS: dict[str, dict[str, Any]] = {
    "CartPole-v1": {"budget": 50_000, "solved": 475.0},
    "Acrobot-v1": {"budget": 100_000, "solved": -100.0},
    "MountainCar-v0": {"budget": 120_000, "solved": -110.0},
    "LunarLander-v3": {"budget": 100_000, "solved": 200.0},
}

# hyperparams/dqn.yml of rl-baselines3-zoo (LunarLander's entry is for v2; v3 fixed bugs only).
ZOO: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000,
                        gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                        exploration_fraction=0.16, exploration_final_eps=0.04),
    "MountainCar-v0": dict(learning_rate=4e-3, batch_size=128, buffer_size=10_000, learning_starts=1000,
                           gamma=0.98, target_update_interval=600, train_freq=16, gradient_steps=8,
                           exploration_fraction=0.2, exploration_final_eps=0.07),
    "LunarLander-v3": dict(learning_rate=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=0,
                           gamma=0.99, target_update_interval=250, train_freq=4, gradient_steps=-1,
                           exploration_fraction=0.12, exploration_final_eps=0.1),
    "Acrobot-v1": dict(learning_rate=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=0,
                       gamma=0.99, target_update_interval=250, train_freq=4, gradient_steps=-1,
                       exploration_fraction=0.12, exploration_final_eps=0.1),
}


def run_ours(env_id: str, seed: int, budget: int, tuned: bool,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """As ``lagent train --task ENV --seed S --timesteps N`` configures it (tuned=False: as if
    params.yaml had no entry for this env); ``overrides`` (``--set``) go on top of all that."""
    from agent import LearningAgent, TrainingManager
    from agent.config import load_config
    from agent.tasks import task_spaces

    config = load_config(
        overrides=[f"train.task={env_id}", f"run.seed={seed}", f"train.total_timesteps={budget}",
                   "train.max_episodes=null", "train.final_model=last", *(overrides or [])],
        gym_env=True, gym_tuned=tuned,
    )
    agent = LearningAgent(*task_spaces(env_id, config=config), config=config)
    trainer = TrainingManager(agent, task_type=env_id, tensorboard=False)
    start = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - start
    rewards = _evaluate(env_id, agent.greedy_actions)
    trainer.close()
    return {"wall": wall, "updates": agent.training_steps, "rewards": rewards}


def run_sb3(env_id: str, seed: int, budget: int) -> dict[str, Any]:
    from stable_baselines3 import DQN

    model = DQN("MlpPolicy", env_id, policy_kwargs={"net_arch": [256, 256]}, seed=seed, device="cpu",
                verbose=0, **ZOO[env_id])
    start = time.perf_counter()
    model.learn(budget)
    wall = time.perf_counter() - start
    rewards = _evaluate(env_id, lambda obs: model.predict(obs, deterministic=True)[0])
    return {"wall": wall, "updates": int(model._n_updates), "rewards": rewards}


def _evaluate(env_id: str, act: Any) -> list[float]:
    """The same greedy episodes for every agent: one env, reset with EVAL_SEED, then unseeded."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    obs, _ = env.reset(seed=EVAL_SEED)
    for _ in range(EVAL_EPISODES):
        total, done = 0.0, False
        while not done:
            action = act(np.asarray(obs, dtype=np.float32)[None])
            obs, reward, terminated, truncated, _ = env.step(int(np.asarray(action).reshape(-1)[0]))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        obs, _ = env.reset()
    env.close()
    return returns


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def label(row: dict[str, Any]) -> str:
    """The agent and its ``--set`` overrides, e.g. ``defaults+replay.n_step=3``."""
    return "+".join([row["agent"], ",".join(row["set"])]) if row.get("set") else row["agent"]


def summarise(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| env | agent | seeds | median | min | max | solved | median wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"defaults": 0, "profile": 1, "sb3": 2}
    labels = sorted({label(r) for r in rows}, key=lambda name: (order.get(name.split("+")[0], 3), name))
    for env_id, spec in ENVS.items():
        for agent in labels:
            mine = [r for r in rows if r["env"] == env_id and label(r) == agent]
            if not mine:
                continue
            means = [r["mean_reward"] for r in mine]
            solved = sum(m >= spec["solved"] for m in means)
            lines.append(
                f"| {env_id} | {agent} | {len(mine)} | {statistics.median(means):.1f} | {min(means):.1f} "
                f"| {max(means):.1f} | {solved}/{len(mine)} | {statistics.median(r['wall'] for r in mine):.0f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default=",".join(ENVS), help="comma-separated env ids")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--agents", default="defaults,profile,sb3")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file the rows are appended to")
    parser.add_argument("--summary", action="store_true", help="only print the table of --out")
    parser.add_argument("--timesteps", type=int, help="replace the zoo's budget (a quick smoke run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one of our agent's settings (defaults and profile; repeatable)")
    args = parser.parse_args()
    if args.summary:
        print(summarise(load_rows(args.out)))
        return 0
    torch.set_num_threads(1)
    rows = load_rows(args.out)
    for env_id in args.envs.split(","):
        if env_id not in ENVS:
            parser.error(f"unknown env {env_id!r}: one of {', '.join(ENVS)}")
        budget = args.timesteps or ENVS[env_id]["budget"]
        for seed in parse_seeds(args.seeds):
            for agent in args.agents.split(","):
                if agent == "sb3":
                    result = run_sb3(env_id, seed, budget)
                else:
                    result = run_ours(env_id, seed, budget, tuned=agent == "profile", overrides=args.overrides)
                row = {"env": env_id, "agent": agent, "seed": seed, "budget": budget,
                       "mean_reward": float(np.mean(result["rewards"])), **result}
                if args.overrides and agent != "sb3":
                    row["set"] = list(args.overrides)
                key = (env_id, label(row), seed)
                rows = [r for r in rows if (r["env"], label(r), r["seed"]) != key] + [row]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"rows": rows}, indent=1))
                print(f"{env_id} {label(row):8s} seed {seed}: {row['mean_reward']:8.1f} "
                      f"in {result['wall']:.0f} s ({result['updates']} updates)", flush=True)
    print()
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
