"""An Ape-X actor: a Collector with its own exploration rate, writing prioritized rows to the
Memory service.

Ape-X's two ideas on the acting side live here. Each actor explores at a fixed rate of its own
(:func:`apex_epsilons`): a few nearly greedy actors show the learner where the policy goes, a
few noisy ones keep discovering. And each actor computes its rows' initial priorities (|TD error|
under its copy of the network) before sending them, so the service's prioritized sampler sees
new experience at its real worth instead of at the running maximum.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agent.collector import Collector
from agent.config import Config, config_from_dict
from agent.memory_client import MemoryClient
from agent.network import LearningNetwork, NetworkArchitecture
from agent.policy import EpsilonGreedy

_DELIVERY_WAIT = 1.0
"""Seconds a rollout's end waits for the service to acknowledge its rows (they are spooled to
disk either way)."""
PRIORITY_EPS = 1e-6
"""Added to |TD error| so that every row can be drawn."""


def apex_epsilons(actors: int, epsilon: float = 0.4, alpha: float = 7.0) -> list[float]:
    """Ape-X's exploration rates: actor i of N gets epsilon^(1 + alpha * i / (N - 1)).

    One actor gets ``epsilon`` itself."""
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if actors == 1:
        return [float(epsilon)]
    return [float(epsilon ** (1.0 + alpha * i / (actors - 1))) for i in range(actors)]


class PrioritizingSink:
    """Holds one rollout's rows, then sends them to the Memory service in one batch with their
    initial priorities: |R + gamma^n * (1 - done) * max_a Q(s', a) - Q(s, a)| under the actor's
    network, computed in one forward pass over the whole rollout.

    With n > 1 it takes the collector's n-step rows (Ape-X's actors send n-step transitions), and
    keeps the ones the service can store as they are: full windows (done 0) and windows that end
    at termination (done 1); the learner then discounts every row by gamma^n. A window cut short
    by a time limit would need its own discount: it is dropped (at most n - 1 rows per truncated
    episode) and counted in ``rows_cut``."""

    def __init__(self, client: Any, policy: EpsilonGreedy, gamma: float, n_step: int = 1) -> None:
        self.client = client
        self.policy = policy
        self.n_step_rows = n_step > 1
        self.gamma = float(gamma) ** n_step
        self.rows_cut = 0
        self._rows: list[tuple[np.ndarray, ...]] = []

    def add(self, obs: Any, actions: Any, rewards: Any, next_obs: Any, dones: Any) -> None:
        if self.n_step_rows:
            whole = np.isin(np.asarray(dones), (0.0, 1.0))
            if not whole.all():
                self.rows_cut += int(np.count_nonzero(~whole))
                obs, actions, rewards, next_obs, dones = (
                    np.asarray(column)[whole] for column in (obs, actions, rewards, next_obs, dones)
                )
                if not len(dones):
                    return
        obs = np.asarray(obs, dtype=np.float32)
        self._rows.append(
            (
                obs.copy(),
                np.atleast_1d(np.asarray(actions, dtype=np.int64)).copy(),
                np.atleast_1d(np.asarray(rewards, dtype=np.float32)).copy(),
                np.asarray(next_obs, dtype=np.float32).reshape(obs.shape).copy(),
                np.atleast_1d(np.asarray(dones, dtype=np.float32)).copy(),
            )
        )

    def priorities(
        self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray, dones: np.ndarray
    ) -> np.ndarray:
        q = self.policy.q_values(np.concatenate([obs, next_obs])).cpu().numpy()
        q_taken = q[np.arange(len(obs)), actions]
        target = rewards + self.gamma * (1.0 - dones) * q[len(obs) :].max(axis=1)
        return np.abs(target - q_taken).astype(np.float32) + PRIORITY_EPS

    def flush(self) -> int:
        """Send the held rows (one batch); returns how many."""
        if not self._rows:
            return 0
        columns = [np.concatenate(column) for column in zip(*self._rows)]
        self._rows = []
        self.client.write_transitions(*columns, priorities=self.priorities(*columns))
        return len(columns[1])


class ApexActor:
    """One actor's whole life: its collector, its Memory-service client and its exploration rate.

    Built from plain data (the run's config as a dict, the network's architecture), so that Ray can
    start it on any machine and start it again after a crash with the same arguments.
    ``outbox_dir`` keeps writes the service has not acknowledged on disk: a restarted actor given
    the same directory delivers what its predecessor left.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any],
        index: int,
        epsilon: float,
        architecture: Mapping[str, Any],
        *,
        outbox_dir: str | None = None,
    ) -> None:
        if not isinstance(config, Config):
            config = config_from_dict(config, source="actor config")
        torch.set_num_threads(1)  # many actors share a machine's cores
        self.config = config
        self.index = index
        self.epsilon = float(epsilon)
        seed = config.run.seed + 1_000 * (index + 1)
        # Its weights come with its first rollout (and again after a restart): only plain
        # settings are passed to the constructor, so that Ray can always start it again.
        network = LearningNetwork.from_architecture(NetworkArchitecture.from_dict(dict(architecture)))
        network.requires_grad_(False)
        network.eval()
        self.policy = EpsilonGreedy(network, np.random.default_rng(seed))
        self.client = MemoryClient.from_config(
            config, outbox_dir=outbox_dir, seed=None, prefetch=False
        )
        self.sink = PrioritizingSink(self.client, self.policy, config.train.gamma, config.replay.n_step)
        self.collector = Collector(config, self.policy, sinks=[self.sink])
        self.collector.reset(seed)
        self.weights_version = -1

    def pid(self) -> int:
        """The worker process's id (a test kills it; the driver counts restarts by it)."""
        return os.getpid()

    def rollout(
        self, steps: int, weights: Mapping[str, torch.Tensor] | None, version: int, warmup: bool
    ) -> dict[str, Any]:
        """``steps`` vector steps at this actor's rate (1 while ``warmup``), after adopting
        ``weights`` of ``version`` if they are newer; the rows go to the service."""
        if weights is not None and version > self.weights_version:
            self.policy.load_weights(weights)
            self.weights_version = version
        started = time.perf_counter()
        before = self.collector.actions_taken
        episodes = self.collector.rollout(steps, 1.0 if warmup else self.epsilon)
        rows = self.sink.flush()
        # The rows are on disk in the outbox before the driver counts them, and usually stored:
        # a restarted actor delivers what its predecessor spooled, so counted rows are never lost.
        stored = self.client.deliver(_DELIVERY_WAIT)
        return {
            "actor": self.index,
            "pid": os.getpid(),
            "steps": self.collector.actions_taken - before,
            "rows": rows,
            "stored": stored,
            "rows_cut": self.sink.rows_cut,
            "seconds": time.perf_counter() - started,
            "episodes": [(e.reward, e.length) for e in episodes],
            "weights_version": self.weights_version,
            "memory": self.client.metrics(),
        }

    def state(self) -> dict[str, Any]:
        """The actor's part of a run's checkpoint: its collector (policy, RNG, environments)."""
        return {"index": self.index, "epsilon": self.epsilon, "collector": self.collector.full_state()}

    def close(self, timeout: float | None = None) -> dict[str, float]:
        """Deliver what is queued (up to ``timeout`` s), stop the client; its final counters."""
        self.sink.flush()
        self.client.shutdown(timeout if timeout is not None else self.config.memory.flush_timeout)
        self.collector.close()
        return self.client.metrics()
