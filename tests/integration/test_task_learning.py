"""Each task is learnable: a briefly trained agent beats a random policy on it by a clear margin.

The task's own settings (params.yaml and its profile) with a small step budget: a linear
exploration schedule over the first 30% of it (the per-episode default needs ~900 episodes to
get low), episodes capped at 200 steps, first curriculum stage. Trained and random policies play
the same evaluation episodes (same seeds); the trained one with epsilon 0.05, as DQN is
evaluated (a purely greedy policy can repeat a blocked move to the time limit). Fixed seed.
The figures at larger budgets are in benchmarks/results/learning_curves.md.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from agent import LearningAgent, TrainingManager
from agent.config import load_config
from agent.tasks import CurriculumManager, task_spaces
from agent.tasks.params import task_settings

pytestmark = pytest.mark.slow

# task: (env steps -- rows for multi_agent, 3 per team step --, required success-rate margin)
BUDGETS = {
    "navigation": (30_000, 0.25),
    "exploration": (50_000, 0.2),
    "multi_agent": (100_000, 0.25),
    "manipulation": (80_000, 0.15),
}
EPISODES = 100
EPISODE_STEPS = 200


def train_and_compare(task: str, steps: int, seed: int = 0) -> dict[str, dict[str, float]]:
    config = load_config(
        overrides=[
            f"train.task={task}", f"run.seed={seed}",
            "train.exploration=linear", "train.exploration_fraction=0.3",
            "train.max_episodes=null", f"train.total_timesteps={steps}",
        ]
    )
    # Episodes of 200 steps: a task type's episode ends at its stage's time limit.
    first_stage = CurriculumManager().parameters_for("beginner")
    short = dataclasses.replace(first_stage, time_limit=EPISODE_STEPS * task_settings().dt)
    obs_dim, n_actions = task_spaces(task)
    trainer = TrainingManager(
        LearningAgent(obs_dim, n_actions, config=config), task_type=task, tensorboard=False, task_params=short
    )
    asyncio.run(trainer.train())
    results = {}
    for name, epsilon in (("trained", 0.05), ("random", 1.0)):
        asyncio.run(trainer.evaluate(num_episodes=EPISODES, epsilon=epsilon, seed=777))
        results[name] = {
            "success_rate": trainer.last_evaluation["success_rate"],
            "mean_reward": trainer.last_evaluation["mean_reward"],
        }
    trainer.close()
    return results


@pytest.mark.parametrize("task", list(BUDGETS))
def test_a_trained_agent_beats_a_random_policy(task):
    steps, margin = BUDGETS[task]
    results = train_and_compare(task, steps)
    print(task, results)
    trained, random = results["trained"], results["random"]
    assert trained["success_rate"] >= random["success_rate"] + margin, results
    assert trained["mean_reward"] > random["mean_reward"], results
