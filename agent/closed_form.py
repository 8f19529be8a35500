"""The TD update of a plain MLP Q-network, with its backward pass written out.

At DQN's sizes (batch 64, two hidden layers of 256, one CPU core) autograd's engine and the
per-operator bookkeeping around it cost about as much as the matrix products themselves. The
backward pass of Linear + ReLU/tanh layers is a handful of matmuls, so this module computes the
per-sample TD loss and the gradients directly, under ``no_grad``: the same arithmetic as
``torch.autograd`` (``tests/unit/test_closed_form.py`` checks the gradients against it), in about
half the time per update.

Only plain MLPs take this path (no dueling head, no dropout, an activation whose derivative is
read off its output); anything else goes through autograd in ``agent.learner.Learner``.

A network that normalises observations has them standardised once, with the online network's
statistics (which the target network shares), before both networks' forward passes: the inputs
are constants of the update, the gradients are those of the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from agent.network import TORCH_LINEAR, Layer, LearningNetwork, normalize_obs, q_forward
from agent.replay import Transitions

_aten = torch.ops.aten

# Activation, and its backward pass written in terms of the activation's *output*.
_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "relu": (torch.relu, lambda grad, out: _aten.threshold_backward(grad, out, 0)),
    "tanh": (torch.tanh, lambda grad, out: _aten.tanh_backward(grad, out)),
}


def _layers(network: LearningNetwork) -> list[Layer]:
    return network.hidden_layers() + network.head_layers()


class ClosedFormTD:
    """Per-sample TD loss and its gradients for an MLP Q-network, without autograd."""

    def __init__(self, online: LearningNetwork, target: LearningNetwork, double_dqn: bool, loss: str) -> None:
        if not self.supports(online):
            raise ValueError(f"no closed-form update for {online.architecture}")
        self._online = _layers(online)
        self._target = _layers(target)
        self._activation, self._activation_backward = _ACTIVATIONS[online.architecture.activation]
        self._normalization = online.normalization()  # live buffers: updated in place
        self._double = double_dqn
        self._huber = loss == "huber"
        # Gradients come back as weight, bias per layer: that must be ``parameters()``'s order,
        # the optimizer's.
        flat = [p for layer in self._online for p in layer]
        if [id(p) for p in online.parameters()] != [id(p) for p in flat]:
            raise ValueError("the network's parameters are not its linear layers in order")

    @staticmethod
    def supports(network: LearningNetwork) -> bool:
        arch = network.architecture
        return not arch.dueling and arch.dropout == 0 and arch.activation in _ACTIVATIONS

    def _forward(self, layers: list[Layer], x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        return q_forward(layers[:-1], layers[-1:], x, TORCH_LINEAR, self._activation, keep=keep)

    @torch.no_grad()
    def step(
        self, batch: Transitions, gamma: float, sample_scale: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Per-sample loss, Q(s, a), TD error and the gradients of ``sum(loss * sample_scale)``.

        ``sample_scale`` is ``1 / batch`` for a plain mean, or per-row weights (local rows and
        importance-weighted memory rows averaged apart).
        """
        n = batch.obs.shape[0]
        activations: list[torch.Tensor] = []
        if self._normalization is None:
            obs, next_obs = batch.obs, batch.next_obs
            both = torch.cat([obs, next_obs]) if self._double else None
        else:  # once, before every forward pass; the online network's statistics are the target's
            both = normalize_obs(torch.cat([batch.obs, batch.next_obs]), *self._normalization)
            obs, next_obs = both[:n], both[n:]
        if both is not None and self._double:
            # One pass over states and next states: the next-state half picks the target's action.
            q_both = self._forward(self._online, both, activations)
            q_all, best = q_both[:n], q_both[n:].argmax(dim=1, keepdim=True)
            next_value = self._forward(self._target, next_obs).gather(1, best).squeeze(1)
        else:
            q_all = self._forward(self._online, obs, activations)
            next_value = self._forward(self._target, next_obs).max(dim=1).values
        target = torch.addcmul(batch.rewards, 1.0 - batch.dones, next_value, value=gamma)
        index = batch.actions.unsqueeze(1)
        q_taken = q_all.gather(1, index).squeeze(1)
        td = q_taken - target
        if self._huber:
            per_sample = torch.nn.functional.smooth_l1_loss(q_taken, target, reduction="none")
            d_loss = td.clamp(-1.0, 1.0)
        else:
            per_sample = td.square()
            d_loss = 2.0 * td
        grad_q = torch.zeros_like(q_all).scatter_(1, index, (d_loss * sample_scale).unsqueeze(1))

        grads: list[torch.Tensor] = []
        inputs = [obs] + [a[:n] for a in activations]
        grad_out = grad_q
        for depth in range(len(self._online) - 1, -1, -1):
            weight, _ = self._online[depth]
            grads.append(grad_out.sum(dim=0))  # bias
            grads.append(grad_out.t().mm(inputs[depth]))  # weight
            if depth > 0:
                grad_out = self._activation_backward(grad_out.mm(weight), inputs[depth])
        grads.reverse()  # weight, bias of the first layer ... of the head
        return per_sample, q_taken, td, grads
