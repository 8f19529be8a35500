"""The Ape-X learner: prioritized batches from the Memory service in, priorities and weights out.

It is the single-process run's :class:`~agent.learner.Learner` fed by a
:class:`~agent.replay_sources.MemoryReplay`: the same update, the same importance weights, TD
errors sent back as the sampled rows' new priorities. What is new is its rhythm: it works in
calls of at most ``publish_interval`` updates, each ending with a copy of its weights for the
actors, and it keeps its own checkpoint, so that a learner that dies comes back where it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.checkpoint import CheckpointError, read_checkpoint_document, save_checkpoint_file
from agent.config import Config, config_from_dict, resolve_device, with_overrides
from agent.dqn import LearningAgent
from agent.memory_client import MemoryClient
from agent.replay_sources import MemoryReplay, RowShapeGuard

PRIORITY_BATCHES = 8
"""Batches whose new priorities go to the service in one request: one request per update would
cost the service more than the sampling does."""
_NO_DATA_SLEEP = 0.02
"""Seconds to wait before asking again when the service has no batch to give yet."""


class ApexLearner:
    """Online and target networks and their optimizer, on ``device``, learning from the service.

    ``checkpoint`` is where :meth:`save` writes the learner's state; if the file exists when the
    learner starts (Ray restarting a learner that died), it continues from it. Otherwise its
    networks start as the head's do: built from the same config and seed. (Nothing but plain
    settings is passed to it, so that Ray can always start it again.)
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any],
        obs_dim: int,
        n_actions: int,
        *,
        device: str = "cpu",
        checkpoint: str | None = None,
    ) -> None:
        if not isinstance(config, Config):
            config = config_from_dict(config, source="learner config")
        # Replay is the service's, prioritized: the learner keeps no buffer of its own.
        config = with_overrides(
            config,
            run={"device": device},
            replay={"local_buffer_size": 1, "prioritized": False},
            memory={"prioritized": True},
        )
        self.config = config
        self.agent = LearningAgent(obs_dim, n_actions, config=config)
        self.learner = self.agent.learner
        self.device = resolve_device(device)
        self.client = MemoryClient.from_config(config, seed=None)
        self.source = MemoryReplay(self.client, config.memory, self.device, RowShapeGuard(obs_dim))
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.resumed_from: int | None = None
        if self.checkpoint is not None and self.checkpoint.exists():
            document = read_checkpoint_document(self.checkpoint, map_location=self.device)
            try:
                self.learner.load_state_dict(document["learner"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{self.checkpoint}: not a learner checkpoint of this run ({exc})") from None
            self.resumed_from = self.learner.training_steps
        # the actors' rows are n-step rows (done: terminated within the window): discount by gamma^n
        self.gamma = config.train.gamma**config.replay.n_step
        self.sample_seconds = 0.0
        self.update_seconds = 0.0

    @property
    def training_steps(self) -> int:
        return self.learner.training_steps

    def pid(self) -> int:
        """The worker process's id (the driver counts restarts by it)."""
        return os.getpid()

    def weights(self) -> dict[str, torch.Tensor]:
        """The online network's weights on the CPU: what the actors load."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.learner.q_network.state_dict().items()}

    def train(self, updates: int, progress: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Up to ``updates`` updates on prioritized batches (fewer if the service has none to give
        for a while); ``progress`` (0 to 1) drives the learning-rate schedule. Returns the call's
        report and the weights after it."""
        self.learner.set_progress(progress)
        batch_size = self.config.train.batch_size
        done = misses = 0
        losses: list[torch.Tensor] = []
        q_means: list[torch.Tensor] = []
        sample_seconds = update_seconds = 0.0
        pending_ids: list[Any] = []
        pending_td: list[torch.Tensor] = []
        while done < updates and misses < 50:
            started = time.perf_counter()
            sampled = self.source.sample(batch_size)[0]
            sampled_at = time.perf_counter()
            sample_seconds += sampled_at - started
            if sampled is None:
                misses += 1
                time.sleep(_NO_DATA_SLEEP)
                sample_seconds += _NO_DATA_SLEEP
                continue
            stats = self.learner.update(sampled.transitions, sampled.weights, gamma=self.gamma)
            pending_ids.append(sampled.ids)
            pending_td.append(stats.td_local)
            if len(pending_ids) == PRIORITY_BATCHES:
                self._send_priorities(pending_ids, pending_td)
            losses.append(stats.loss)
            q_means.append(stats.q_mean)
            update_seconds += time.perf_counter() - sampled_at
            done += 1
        self._send_priorities(pending_ids, pending_td)
        self.sample_seconds += sample_seconds
        self.update_seconds += update_seconds
        report = {
            "updates": done,
            "training_steps": self.learner.training_steps,
            "loss": float(torch.stack(losses).mean()) if losses else float("nan"),
            "q_mean": float(torch.stack(q_means).mean()) if q_means else float("nan"),
            "learning_rate": self.learner.learning_rate,
            "sample_seconds": sample_seconds,
            "update_seconds": update_seconds,
            "misses": misses,
            "resumed_from": self.resumed_from,
            "pid": os.getpid(),
        }
        self.resumed_from = None
        return report, self.weights()

    def _send_priorities(self, ids: list[Any], td: list[torch.Tensor]) -> None:
        """The new priorities of several batches in one request (cleared after)."""
        if ids:
            self.source.update_priorities(np.concatenate(ids), torch.cat(td))
            ids.clear()
            td.clear()

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def save(self) -> int:
        """Write the learner's state to its checkpoint (atomically); returns its update count."""
        if self.checkpoint is not None:
            save_checkpoint_file({"learner": self.learner.state_dict()}, self.checkpoint)
        return self.learner.training_steps

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()

    def close(self) -> None:
        self.client.shutdown(0.0)
