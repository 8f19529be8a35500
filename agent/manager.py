"""TrainingManager: the spec's training façade, a :class:`~agent.training.Trainer` with
meta-learning attached.

Meta-learning sits above training (its trials run Trainers), so the spec's meta-learning methods
on the trainer (``optimize_hyperparameters``, ``optimize_architecture``, ``adapt_to_new_task``,
``train(optimize_interval=...)``) live here, in the one module that may import both; nothing in
``agent.training`` imports ``agent.meta``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from agent.meta import MetaLearningManager, PeriodicOptimisation
from agent.network import NetworkArchitecture
from agent.training import Trainer, TrainerCallback
from agent.training.trainer import ProgressCallback


class TrainingManager(Trainer):
    """Orchestrates a LearningAgent's training (see :class:`~agent.training.Trainer`), with the
    spec's meta-learning: ``use_meta_learning=True`` or a ``meta_config`` (keys of the ``meta``
    section, or a ``MetaLearningManager``) attaches a manager whose record goes into checkpoints.
    """

    def __init__(
        self,
        *args: Any,
        use_meta_learning: bool = False,
        meta_config: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.meta: MetaLearningManager | None = None
        if use_meta_learning or meta_config is not None:
            self.meta = self._make_meta(meta_config)

    def _make_meta(self, meta_config: Any) -> MetaLearningManager:
        if isinstance(meta_config, MetaLearningManager):
            return meta_config
        return MetaLearningManager(base_config=meta_config, config=self.config)

    def _meta_manager(self) -> MetaLearningManager:
        """The trainer's MetaLearningManager, created on first use."""
        if self.meta is None:
            self.meta = self._make_meta(None)
        return self.meta

    # ------------------------------------------------------------------ training

    async def train(
        self,
        n_episodes: int | None = None,
        total_timesteps: int | None = None,
        *,
        progress: ProgressCallback | None = None,
        optimize_interval: int | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> dict[str, Any]:
        """Train (see :meth:`Trainer.run`). ``optimize_interval=N`` runs a short search every N
        episodes on copies of the live agent and applies the best learning settings it finds
        (see ``MetaLearningManager.optimize_online``)."""
        return await asyncio.to_thread(
            self.run, n_episodes, total_timesteps, progress=progress, callbacks=callbacks,
            optimize_interval=optimize_interval,
        )

    def run(
        self,
        n_episodes: int | None = None,
        total_timesteps: int | None = None,
        *,
        progress: ProgressCallback | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        optimize_interval: int | None = None,
    ) -> dict[str, Any]:
        if optimize_interval:
            callbacks = [*callbacks, PeriodicOptimisation(self._meta_manager(), optimize_interval)]
        return super().run(n_episodes, total_timesteps, progress=progress, callbacks=callbacks)

    # ------------------------------------------------------------------ meta-learning

    async def optimize_hyperparameters(self, options: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Search this task's learning hyperparameters with Optuna, starting from this config.

        Returns the best values as a params.yaml-shaped overlay (``{"train": {...}, ...}``); they
        are kept, with the search's record, in this trainer's checkpoints. The live agent is not
        changed (a new buffer size or network needs a new agent).
        """
        return await self._meta_manager().optimize_hyperparameters(
            self.task, options=options, config=self.config, task_params=self.task_params, **kwargs
        )

    async def optimize_architecture(
        self, input_dim: int | None = None, output_dim: int | None = None, options: Any = None, **kwargs: Any
    ) -> NetworkArchitecture | None:
        """Search network shapes for this task; returns the best ``NetworkArchitecture``."""
        return await self._meta_manager().optimize_architecture(
            self.task, input_dim, output_dim, options=options, config=self.config,
            task_params=self.task_params, **kwargs,
        )

    async def adapt_to_new_task(
        self, source_task: Any, target_task: Any, timesteps: int | None = None, **kwargs: Any
    ) -> Any:
        """Move a policy to ``target_task``: transfer the layers that fit, fine-tune, validate.

        ``source_task`` is this trainer's task (its agent is the source policy; named variants such
        as ``navigation_simple`` work), a run directory or a checkpoint. Returns an
        ``AdaptationResult`` with the adapted policy's target reward next to a from-scratch one.
        """
        return await self._meta_manager().adapt_to_new_task(
            source_task, target_task, timesteps=timesteps, trainer=self, **kwargs
        )

    # ------------------------------------------------------------------ checkpoints

    def _extra_checkpoint_state(self) -> dict[str, Any]:
        return {} if self.meta is None else {"meta": self.meta.state_dict()}

    def _load_extra_checkpoint_state(self, document: Mapping[str, Any]) -> None:
        if self.meta is not None and "meta" in document:
            self.meta.load_state_dict(document["meta"])

    @classmethod
    def _checkpoint_kwargs(cls, document: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
        if "meta" in document and "use_meta_learning" not in given:
            return {"use_meta_learning": True}
        return {}
