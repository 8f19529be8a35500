"""The Learner: DQN's gradient update, and nothing else.

It owns the online and target networks and the optimizer, and turns a batch of tensors into one
update. It does no I/O and knows nothing of where a batch came from (local ring, Memory service,
similar-state search) nor of environments: the same object runs in the training loop, in a
meta-learning trial, or as a remote learner fed by many actors. Everything it returns stays a
tensor on its device, so on a GPU nothing inside an update waits for the host.

The update is CleanRL's DQN with the usual stabilisers: a target network (hard copy every
``target_update_interval`` updates, or Polyak with ``tau``), Double-DQN targets, Huber or MSE
loss, gradient clipping. A second, optional batch (replayed from the Memory service) joins the
same forward pass; its loss is weighted by importance weights and reported apart ("memory loss").
Plain MLPs take the closed-form gradient path (``agent.closed_form``), anything else autograd.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agent.closed_form import ClosedFormTD
from agent.config import TrainConfig
from agent.monitoring import parameter_names
from agent.network import LearningNetwork, NetworkArchitecture
from agent.optim import make_adam
from agent.replay import Transitions
from agent.seeding import seeded_torch_rng


class UpdateStats(NamedTuple):
    """What one update measured, as 0-d tensors on the learner's device (no host sync)."""

    loss: torch.Tensor
    """local + memory loss"""
    loss_local: torch.Tensor
    loss_memory: torch.Tensor
    """0 when the update had no memory batch"""
    q_mean: torch.Tensor
    """mean Q(s, a) of the batch's taken actions"""
    grad_norm: torch.Tensor
    """global gradient norm before clipping"""
    td_local: torch.Tensor
    """TD errors of the local rows (priorities for a prioritized local buffer)"""
    td_memory: torch.Tensor | None
    """TD errors of the memory rows, in their order (priorities to send back); None without them"""

    def scalars(self) -> tuple[torch.Tensor, ...]:
        """The five logged scalars, in the order the training loop averages them."""
        return self.loss, self.loss_local, self.loss_memory, self.q_mean, self.grad_norm


class Learner:
    """Online and target Q-networks, their optimizer, and the TD update.

    ``train`` is the ``train`` section of the resolved config: gamma, loss, Double-DQN, target
    updates, clipping, learning rate. :meth:`configure` adopts a new one during a run and rebuilds
    what depends on it (the closed-form path, the optimizer's step size).
    """

    def __init__(
        self,
        architecture: NetworkArchitecture,
        train: TrainConfig,
        *,
        seed: int,
        device: torch.device,
    ) -> None:
        self.architecture = architecture
        self.device = device
        with seeded_torch_rng(seed):  # both inits: the target's draws would disturb another thread's
            self.q_network = LearningNetwork.from_architecture(architecture).to(device)
            self.target_network = LearningNetwork.from_architecture(architecture).to(device)
        self.q_network.seed_dropout(seed)
        self.target_network.load_state_dict(self.q_network.state_dict())
        self.target_network.requires_grad_(False)
        self.q_network.eval()
        self.target_network.eval()
        self._uses_dropout = architecture.dropout > 0
        self.optimizer = make_adam(self.q_network.parameters(), lr=train.learning_rate)
        self.training_steps = 0
        self._params = list(self.q_network.parameters())
        self._target_params = list(self.target_network.parameters())
        names = parameter_names(self.q_network)
        self._param_names = [names[id(p)] for p in self._params]  # hidden_0.weight, ..., head.bias
        layers = [name.rsplit(".", 1)[0] for name in self._param_names]
        self._layer_names = list(dict.fromkeys(layers))
        self._layer_index = torch.tensor([self._layer_names.index(x) for x in layers], device=device)
        # Weight and gradient snapshots every train.histogram_interval updates, for the trainer to
        # log; bounded, so a learner used without a trainer does not hoard them.
        self.histograms: deque[tuple[int, dict[str, np.ndarray]]] = deque(maxlen=4)
        self._zero = torch.zeros((), device=device)
        self.train = train
        self._closed_form: ClosedFormTD | None = None
        self.configure(train)

    # ------------------------------------------------------------------ settings

    def configure(self, train: TrainConfig) -> None:
        """Adopt the ``train`` section: everything an update reads comes from it from now on."""
        self.train = train
        self.optimizer.set_lr(train.learning_rate)
        self._closed_form = (
            ClosedFormTD(self.q_network, self.target_network, train.double_dqn, train.loss)
            if train.closed_form_update and ClosedFormTD.supports(self.q_network)
            else None
        )

    @property
    def learning_rate(self) -> float:
        return self.optimizer.lr

    def set_progress(self, fraction: float) -> None:
        """Where the run is in its step budget (0 to 1): the learning-rate schedule follows it.

        A function of progress alone, so a resumed run's rate is the one a straight run has.
        """
        if self.train.lr_schedule == "linear":
            final = self.train.lr_final_fraction
            done = min(max(fraction, 0.0), 1.0)
            self.optimizer.set_lr(self.train.learning_rate * (1.0 - done * (1.0 - final)))

    @property
    def uses_closed_form(self) -> bool:
        return self._closed_form is not None

    # ------------------------------------------------------------------ the update

    def td_loss(
        self, batch: Transitions, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, Q(s, a) and the TD error, by autograd's route."""
        q_all = self.q_network(batch.obs)
        q_taken = q_all.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            next_target = self.target_network(batch.next_obs)
            if self.train.double_dqn:
                best = self.q_network(batch.next_obs).argmax(dim=1, keepdim=True)
                next_value = next_target.gather(1, best).squeeze(1)
            else:
                next_value = next_target.max(dim=1).values
            target = torch.addcmul(batch.rewards, 1.0 - batch.dones, next_value, value=gamma)
        if self.train.loss == "huber":
            loss = F.smooth_l1_loss(q_taken, target, reduction="none")
        else:
            loss = F.mse_loss(q_taken, target, reduction="none")
        return loss, q_taken, (q_taken.detach() - target)

    def update(
        self,
        batch: Transitions,
        weights: torch.Tensor | None = None,
        *,
        memory: Transitions | None = None,
        memory_weights: torch.Tensor | None = None,
        gamma: float | None = None,
    ) -> UpdateStats:
        """One gradient update on ``batch`` (and ``memory`` rows, if any); returns its stats.

        ``weights`` are importance weights of ``batch``'s rows (a prioritized local buffer),
        ``memory_weights`` those of the memory rows; both default to ones. The two losses are
        averaged apart and summed: neither batch's size dilutes the other.
        """
        gamma = self.train.gamma if gamma is None else float(gamma)
        n_local = batch.obs.shape[0]
        if memory is None:
            rows = batch
            scale: torch.Tensor | float = 1.0 / n_local if weights is None else weights / n_local
        else:
            # One forward pass over both batches, two losses reported apart.
            n_memory = memory.obs.shape[0]
            if memory_weights is None:
                memory_weights = torch.ones(n_memory, device=self.device)
            rows = Transitions(*(torch.cat([a, b]) for a, b in zip(batch, memory)))
            local_scale = (
                torch.full((n_local,), 1.0 / n_local, device=self.device)
                if weights is None
                else weights / n_local
            )
            scale = torch.cat([local_scale, memory_weights / n_memory])
        rows = self._shaped(rows)
        if self._uses_dropout:
            self.q_network.train()
        try:
            if self._closed_form is not None:
                per_sample, q_taken, td, grads = self._closed_form.step(rows, gamma, scale)
            else:
                per_sample, q_taken, td = self.td_loss(rows, gamma)
            local = per_sample[:n_local]
            local_loss = local.mean() if weights is None else (local * weights).mean()
            if memory is None:
                memory_loss, total = self._zero, local_loss
            else:
                memory_loss = (per_sample[n_local:] * memory_weights).mean()
                total = local_loss + memory_loss
            if self._closed_form is None:
                grads = list(torch.autograd.grad(total, self._params))
        finally:
            if self._uses_dropout:
                self.q_network.eval()
        interval = self.train.histogram_interval
        snapshot = interval > 0 and (self.training_steps + 1) % interval == 0
        if snapshot:  # gradients before clipping changes them in place, weights after the update
            self.histograms.append((self.training_steps + 1, self._copies("gradients", grads)))
        grad_norm = self.optimizer.apply(grads, self.train.max_grad_norm)
        self.training_steps += 1
        if snapshot:
            self.histograms[-1][1].update(self._copies("weights", self._params))
        self._maybe_update_target()
        return UpdateStats(
            loss=total.detach(),
            loss_local=local_loss.detach(),
            loss_memory=memory_loss.detach(),
            q_mean=q_taken.detach().mean(),
            grad_norm=grad_norm,
            td_local=td[:n_local].detach(),
            td_memory=None if memory is None else td[n_local:].detach(),
        )

    def _shaped(self, rows: Transitions) -> Transitions:
        """``rows`` with the rewards scaled and clipped as ``train.reward_scale`` and
        ``train.reward_clip`` say (unchanged by default)."""
        scale, clip = self.train.reward_scale, self.train.reward_clip
        if scale == 1.0 and clip is None:
            return rows
        rewards = rows.rewards * scale
        if clip is not None:
            rewards = rewards.clamp(-clip, clip)
        return rows._replace(rewards=rewards)

    def _maybe_update_target(self) -> None:
        if self.train.target_update == "soft":
            torch._foreach_lerp_(self._target_params, self._params, self.train.tau)
        elif self.training_steps % self.train.target_update_interval == 0:
            self.update_target_network()

    def update_target_network(self) -> None:
        """Copy the online weights into the target network."""
        with torch.no_grad():
            torch._foreach_copy_(self._target_params, self._params)

    # ------------------------------------------------------------------ monitoring

    def _copies(self, kind: str, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """``tensors`` (one per parameter) copied to numpy, named ``{kind}/{layer}.{weight|bias}``."""
        return {
            f"{kind}/{name}": tensor.detach().to("cpu", copy=True).numpy()
            for name, tensor in zip(self._param_names, tensors)
        }

    def layer_gradient_norms(self) -> dict[str, float]:
        """Each linear layer's gradient norm at the latest update (weight and bias together, before
        clipping), keyed ``hidden_0``, ..., ``head``; {} before the first update.

        Read off the per-parameter norms the optimizer computes anyway for clipping, so asking
        once per logging window costs nothing in the update itself.
        """
        norms = self.optimizer.last_norms
        if norms is None:
            return {}
        squares = torch.zeros(len(self._layer_names), dtype=norms.dtype, device=norms.device)
        squares.index_add_(0, self._layer_index, norms.square())
        return dict(zip(self._layer_names, squares.sqrt().tolist()))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, object]:
        return {
            "architecture": self.architecture.to_dict(),
            "q_network": self.q_network.state_dict(),
            "target_network": self.target_network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "training_steps": self.training_steps,
            "dropout_rng": self.q_network.dropout_rng_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore weights, optimizer and counters. The learning rate stays the configured one:
        Adam's saved state carries the old run's rate, and ``--set train.learning_rate`` on a
        resumed run must win over it."""
        arch = NetworkArchitecture.from_dict(state["architecture"])  # type: ignore[arg-type]
        if arch != self.architecture:
            raise ValueError(f"checkpoint network {arch} does not match this agent's {self.architecture}")
        self.q_network.load_state_dict(state["q_network"])  # type: ignore[arg-type]
        self.target_network.load_state_dict(state["target_network"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.optimizer.set_lr(self.train.learning_rate)
        self.training_steps = int(state["training_steps"])  # type: ignore[call-overload]
        if state.get("dropout_rng") is not None:
            self.q_network.set_dropout_rng_state(state["dropout_rng"])  # type: ignore[arg-type]
