"""Policy adaptation: fine-tune a transferred policy on a new task, beside one trained from scratch.

A transfer is worth something only against the alternative: the from-scratch run here has the
same architecture, seed, configuration and step budget, and both are scored by the same greedy
evaluation episodes, so the difference is what the source policy handed over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from agent.config import Config
from agent.dqn import LearningAgent
from agent.meta.options import MetaConfig
from agent.meta.results import AdaptationResult
from agent.meta.targets import TaskSpec
from agent.meta.transfer import transfer_policy
from agent.seeding import preserved_torch_rng
from agent.training import Trainer

PhaseProgress = Callable[[str, Mapping[str, float]], None]
"""Called with a phase name ('adapted', 'scratch') and the trainer's progress dict."""


def adapt_policy(
    source: LearningAgent,
    spec: TaskSpec,
    config: Config,
    meta: MetaConfig,
    *,
    timesteps: int,
    eval_episodes: int,
    run_dir: str | Path | None = None,
    progress: PhaseProgress | None = None,
    source_label: str = "agent",
) -> AdaptationResult:
    """Move ``source``'s policy to ``spec`` (``meta``'s transfer settings), fine-tune it for
    ``timesteps`` steps with ``config``, and train a fresh agent of the same shape for as long.

    With ``run_dir`` the fine-tuned run is saved there (checkpoints, episode log). The caller's
    torch RNG is left where it was.
    """
    adapted, transferred, reinitialized, partial = transfer_policy(
        source, spec.task, config, match=meta.adapt_match_features, layers=meta.adapt_transfer_layers
    )
    seed = config.run.seed + config.evaluate.seed_offset

    def phase(name: str) -> Callable[[Mapping[str, float]], None] | None:
        return None if progress is None else (lambda info: progress(name, info))

    with preserved_torch_rng():  # leave the caller's torch RNG where it was
        epsilon = meta.adapt_epsilon_start
        tuned = Trainer(
            adapted,
            task_type=spec.task,
            task_params=spec.task_params,
            training_config={"epsilon_start": epsilon} if epsilon is not None else None,
            run_dir=run_dir,
            tensorboard=False,
        )
        fresh = LearningAgent(
            adapted.input_size, adapted.output_size, config=config, architecture=adapted.architecture
        )
        scratch = Trainer(
            fresh,
            task_type=spec.task,
            task_params=spec.task_params,
            tensorboard=False,
        )
        try:
            zero_shot = None
            if not reinitialized:
                zero_shot, _ = tuned.run_evaluation(num_episodes=eval_episodes, seed=seed)
            tuned.run(total_timesteps=timesteps, progress=phase("adapted"))
            adapted_mean, adapted_std = tuned.run_evaluation(num_episodes=eval_episodes, seed=seed)
            adapted_success = tuned.last_evaluation.get("success_rate")
            scratch.run(total_timesteps=timesteps, progress=phase("scratch"))
            scratch_mean, scratch_std = scratch.run_evaluation(num_episodes=eval_episodes, seed=seed)
            scratch_success = scratch.last_evaluation.get("success_rate")
        finally:
            tuned.close()
            scratch.close()
    return AdaptationResult(
        source=source_label,
        target_task=spec.label,
        timesteps=timesteps,
        transferred=transferred,
        reinitialized=reinitialized,
        partially_transferred=partial,
        adapted_reward=adapted_mean,
        adapted_std=adapted_std,
        scratch_reward=scratch_mean,
        scratch_std=scratch_std,
        zero_shot_reward=zero_shot,
        adapted_success_rate=adapted_success,
        scratch_success_rate=scratch_success,
        eval_episodes=eval_episodes,
        run_dir=str(run_dir) if run_dir is not None else None,
        agent=adapted,
    )

