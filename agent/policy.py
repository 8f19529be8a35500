"""Acting: epsilon-greedy actions from a Q-network, by the cheapest route available.

A policy reads a network's weights and never changes them. In one process it reads the
learner's live network; an actor elsewhere holds a snapshot built from a state dict
(:meth:`EpsilonGreedy.from_state`) and loads newer weights into it between rollouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agent.network import LearningNetwork, NetworkArchitecture, NumpyPolicy


class EpsilonGreedy:
    """argmax_a Q(s, a), or a uniformly random action with probability epsilon.

    ``rng`` draws the exploration decisions and random actions; it is part of a run's state
    (a resumed run continues its stream).
    """

    def __init__(self, network: LearningNetwork, rng: np.random.Generator) -> None:
        self.network = network
        self.rng = rng
        self.n_actions = network.output_size
        self.device = next(network.parameters()).device
        self._numpy = NumpyPolicy(network) if NumpyPolicy.supports(network) else None

    @classmethod
    def from_state(
        cls,
        architecture: NetworkArchitecture | Mapping[str, Any],
        weights: Mapping[str, torch.Tensor],
        seed: int,
    ) -> EpsilonGreedy:
        """A policy of its own (CPU network, own RNG) from a network's state dict: an actor's."""
        if not isinstance(architecture, NetworkArchitecture):
            architecture = NetworkArchitecture.from_dict(dict(architecture))
        network = LearningNetwork.from_architecture(architecture)
        network.load_state_dict(dict(weights))
        network.requires_grad_(False)
        network.eval()
        return cls(network, np.random.default_rng(seed))

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Newer weights, copied into the network in place (the numpy views stay valid)."""
        self.network.load_state_dict(dict(weights))

    def q_values(self, states: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Q-values for a batch of states (no gradient)."""
        obs = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            return self.network(obs)

    def greedy(self, states: np.ndarray) -> np.ndarray:
        """argmax_a Q(s, a) for a batch of states."""
        states = np.asarray(states, dtype=np.float32)
        if self._numpy is not None:
            return self._numpy(states).argmax(axis=1)
        return self.q_values(states).argmax(dim=1).cpu().numpy()

    def act(self, states: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
        """Epsilon-greedy actions for a batch of states: one forward pass for all of them."""
        n = len(states)
        explore = self.rng.random(n) < epsilon
        n_explore = int(np.count_nonzero(explore))
        if n_explore == n:
            return self.rng.integers(0, self.n_actions, size=n)
        actions = self.greedy(states).astype(np.int64, copy=False)
        if n_explore:
            actions[explore] = self.rng.integers(0, self.n_actions, size=n_explore)
        return actions
