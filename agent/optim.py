"""Adam for small networks: the optimizer's own state, stepped through torch's functional API.

For an MLP of a few hundred thousand weights, ``Optimizer.step()``'s per-call bookkeeping (hooks,
state checks, grouping) costs about as much as the fused update itself. Here gradients come from
``torch.autograd.grad`` (no ``.grad`` accumulation, so no ``zero_grad``), are clipped with foreach
kernels, and go straight to the fused Adam kernel. The state lives in a regular
``torch.optim.Adam``, so ``state_dict``/``load_state_dict`` and learning-rate changes work as usual.

That kernel, ``torch._fused_adam_``, is private. :func:`make_adam` checks once that it is there
and takes the arguments passed here, and otherwise falls back to :class:`PublicAdam`, the same
clipping stepped through ``torch.optim.Adam(fused=True).step()``: bitwise the same weights, about
75 us more per update (``benchmarks/optimizer_step.py``), which is why it is not the default.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch


class FastAdam:
    """``torch.optim.Adam`` state, stepped with one fused kernel per update."""

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, fused=True)
        self._state_lists: tuple[list[torch.Tensor], ...] | None = None
        self.last_norms: torch.Tensor | None = None  # per-parameter gradient norms of the last update

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = float(value)

    def _state(self) -> tuple[list[torch.Tensor], ...]:
        if self._state_lists is None:
            for p in self.params:
                state = self.optimizer.state[p]
                if not state:  # the same layout Adam creates on its first step
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.optimizer.state[p] for p in self.params]
            self._state_lists = (
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
            )
        return self._state_lists

    def step(self, loss: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
        """Backpropagate ``loss``, clip, update; returns the gradient norm before clipping."""
        return self.apply(list(torch.autograd.grad(loss, self.params)), max_grad_norm)

    def apply(self, grads: list[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
        """Clip ``grads`` (one per parameter, in order) and update; returns their norm before clipping.

        The per-parameter norms (before clipping) stay in ``last_norms``: the per-layer gradient
        norms the trainer logs, at no extra cost.
        """
        norm = self._clip(grads, max_grad_norm)
        exp_avgs, exp_avg_sqs, steps = self._state()
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        # What torch.optim.adam._fused_adam does for one device and dtype, minus its regrouping.
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            self.params, grads, exp_avgs, exp_avg_sqs, [], steps,
            amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False, grad_scale=None, found_inf=None,
        )
        return norm

    def _clip(self, grads: list[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
        """Scale ``grads`` in place to a global norm of at most ``max_grad_norm``; returns the
        norm before clipping (and keeps the per-parameter ones in ``last_norms``)."""
        self.last_norms = torch.stack(torch._foreach_norm(grads))
        norm = torch.linalg.vector_norm(self.last_norms)
        if max_grad_norm is not None:
            torch._foreach_mul_(grads, torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))
        return norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        # Adam keeps the tensors it is given when dtype and device already match: copy them, or
        # two optimizers loaded from one in-memory state would share (and both update) moments.
        self.optimizer.load_state_dict(copy.deepcopy(state))
        self._state_lists = None  # the state tensors were replaced


class PublicAdam(FastAdam):
    """The same clipping and state, stepped through ``torch.optim.Adam.step()`` (fused or foreach):
    torch's public API only, at the cost of the optimizer's per-call bookkeeping (see
    ``benchmarks/optimizer_step.py``)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float, fused: bool = True) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, fused=fused, foreach=None if fused else True)
        self._state_lists = None
        self.last_norms = None

    def apply(self, grads: list[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
        norm = self._clip(grads, max_grad_norm)
        for param, grad in zip(self.params, grads):
            param.grad = grad
        self.optimizer.step()
        for param in self.params:
            param.grad = None
        return norm


@functools.cache
def private_kernel_available() -> bool:
    """Whether this torch has the fused Adam kernel FastAdam calls, with the arguments it passes
    (it is private: checked once, on a one-element tensor, rather than trusted by version)."""
    kernel = getattr(torch, "_fused_adam_", None)
    if kernel is None:
        return False
    try:
        param, grad = torch.zeros(1), torch.ones(1)
        kernel(
            [param], [grad], [torch.zeros(1)], [torch.zeros(1)], [], [torch.ones(())],
            amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
            maximize=False, grad_scale=None, found_inf=None,
        )
    except (RuntimeError, TypeError):
        return False
    return bool(param.item() < 0)


def make_adam(params: Sequence[torch.nn.Parameter], lr: float) -> FastAdam:
    """FastAdam where torch still has its kernel (about 75 us per update less on CPU, measured in
    benchmarks/optimizer_step.py; bitwise the same weights), torch's public Adam otherwise."""
    if private_kernel_available():
        return FastAdam(params, lr)
    return PublicAdam(params, lr, fused=True)
