"""The Q-network: an MLP whose shape is described by a ``NetworkArchitecture``.

Architecture search (``agent.meta``) produces ``NetworkArchitecture`` values; keeping the shape in a
plain dataclass means a searched network can be rebuilt from a checkpoint without pickling code.

With ``normalize_obs`` the network also keeps running statistics of the observations it is fed
(:class:`ObsNormalizer`, buffers of the network) and standardises its input with them, wherever it
is evaluated: the module's ``forward`` and ``features``, the closed-form update and the numpy
policy. Being buffers, the statistics travel with the weights: every state dict, checkpoint,
policy snapshot and exported model holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


_FUNCTIONAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


Layer = tuple[Any, Any]
"""(weight, bias) of one linear layer: torch tensors, or numpy arrays (weight transposed)."""


def TORCH_LINEAR(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` (for a 2-D input it is ``addmm(bias, x, weight.t())``)."""
    return F.linear(x, weight, bias)


def _numpy_linear(x: np.ndarray, weight_t: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x @ weight_t + bias


OBS_CLIP = 10.0
"""Normalised observations are clipped to [-OBS_CLIP, OBS_CLIP]."""
OBS_EPSILON = 1e-8
"""Added to the running variance before its square root is taken."""

Normalization = tuple[Any, Any]
"""(shift, scale) of the observation normalisation: torch tensors or numpy arrays, float32."""


def normalize_obs(x: Any, shift: Any, scale: Any) -> Any:
    """``clip((x - shift) * scale, -OBS_CLIP, OBS_CLIP)``, for torch tensors and numpy arrays alike
    (``shift`` is the running mean, ``scale`` is ``1 / sqrt(var + OBS_EPSILON)``)."""
    return ((x - shift) * scale).clip(-OBS_CLIP, OBS_CLIP)


def q_forward(
    hidden: list[Layer],
    heads: list[Layer],
    x: Any,
    linear: Callable[[Any, Any, Any], Any],
    activation: Callable[[Any], Any],
    *,
    dropout: Callable[[Any], Any] | None = None,
    keep: list[Any] | None = None,
    normalization: Normalization | None = None,
) -> Any:
    """The Q-network's forward pass as a function of its layers: the one definition that the
    module's ``forward``, the closed-form update and the numpy acting policy all run.

    ``heads`` is [output] or [value, advantage] (dueling), or [] to stop at the penultimate
    layer (the embedding). ``keep`` collects each hidden activation (the closed-form backward
    pass needs them); ``dropout`` masks hidden activations while training. ``normalization``
    (shift, scale) standardises ``x`` first (:func:`normalize_obs`); None: ``x`` goes in as it is.
    """
    if normalization is not None:
        x = normalize_obs(x, *normalization)
    for weight, bias in hidden:
        x = activation(linear(x, weight, bias))
        if dropout is not None:
            x = dropout(x)
        if keep is not None:
            keep.append(x)
    if not heads:
        return x
    if len(heads) == 2:
        advantage = linear(x, *heads[1])
        return linear(x, *heads[0]) + advantage - advantage.mean(-1, keepdims=True)
    return linear(x, *heads[0])


@dataclass(frozen=True)
class NetworkArchitecture:
    """The shape of a LearningNetwork: what architecture search varies."""

    input_dim: int
    output_dim: int
    hidden_layers: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    dropout: float = 0.0
    dueling: bool = False
    normalize_obs: bool = False
    """Standardise observations with running statistics kept in the network (:class:`ObsNormalizer`)."""

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.output_dim < 1:
            raise ValueError(f"input_dim and output_dim must be >= 1, got {self.input_dim}, {self.output_dim}")
        object.__setattr__(self, "hidden_layers", tuple(int(h) for h in self.hidden_layers))
        if not self.hidden_layers or any(h < 1 for h in self.hidden_layers):
            raise ValueError(f"hidden_layers must be a non-empty list of positive sizes, got {self.hidden_layers}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got '{self.activation}'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; ``normalize_obs`` only when on, so a network without it is
        recorded exactly as before the option existed (and older code still reads the record)."""
        data = asdict(self)
        data["hidden_layers"] = list(self.hidden_layers)
        if not self.normalize_obs:
            del data["normalize_obs"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkArchitecture:
        return cls(**{**data, "hidden_layers": tuple(data["hidden_layers"])})


def combine_moments(
    mean: Any, var: Any, count: Any, batch_mean: Any, batch_var: Any, n: int
) -> tuple[Any, Any, Any]:
    """Mean, (population) variance and count of two samples joined, from each one's: Chan et al.'s
    parallel form of Welford's update. Elementwise only, so numpy arrays and torch tensors alike."""
    total = count + n
    delta = batch_mean - mean
    new_mean = mean + delta * (n / total)
    new_var = (var * count + batch_var * n + delta * delta * (count * n / total)) / total
    return new_mean, new_var, total


class ObsNormalizer(nn.Module):
    """Running mean and variance of observations, and the standardisation they define.

    The statistics (``count``, ``mean``, ``var``) are float64 and updated a batch at a time with
    :func:`combine_moments`, so they equal the mean and variance of every observation seen so far.
    ``shift`` and ``scale`` are what the forward pass applies (float32, derived from the statistics
    at each update): ``clip((x - shift) * scale, -OBS_CLIP, OBS_CLIP)``. All five are buffers, so
    they are saved and loaded with the network's weights, and updated only in place (numpy views of
    them, as the numpy policy holds, never go stale). Before the first update the standardisation
    is the identity, clipped.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float32))
        self._views: tuple[torch.Tensor, tuple[np.ndarray, ...]] | None = None
        self._refresh()

    def update(self, obs: np.ndarray | torch.Tensor) -> None:
        """Add a batch of observations ``[n, dim]`` (or one, ``[dim]``) to the statistics."""
        views = self._numpy_views()
        if views is not None:
            # numpy on views of the buffers: a few microseconds, where torch's per-op dispatch
            # (and numpy's own mean/var for tiny arrays) would cost more than acting does.
            x = np.asarray(obs.cpu() if isinstance(obs, torch.Tensor) else obs, dtype=np.float64)
            x = x.reshape(-1, self.dim)
            n = len(x)
            if n == 0:
                return
            mean, var, count, shift, scale = views
            batch_mean = x.sum(axis=0) / n
            batch_var = 0.0 if n == 1 else np.square(x - batch_mean).sum(axis=0) / n
            new_mean, new_var, total = combine_moments(mean, var, float(count), batch_mean, batch_var, n)
            mean[...], var[...], count[...] = new_mean, new_var, total
            shift[...] = new_mean
            scale[...] = 1.0 / np.sqrt(new_var + OBS_EPSILON)
            return
        # On an accelerator: torch on the device, nothing waits for the host.
        with torch.no_grad():
            x = torch.as_tensor(obs, dtype=torch.float64).to(self.mean.device).reshape(-1, self.dim)
            if x.shape[0] == 0:
                return
            batch_var, batch_mean = torch.var_mean(x, dim=0, correction=0)
            new = combine_moments(self.mean, self.var, self.count, batch_mean, batch_var, x.shape[0])
            for buffer, value in zip((self.mean, self.var, self.count), new):
                buffer.copy_(value)
            self._refresh()

    def __getstate__(self) -> dict[str, Any]:
        # A copy or an unpickled module has buffers of its own: views of these would be stale.
        return {**super().__getstate__(), "_views": None}

    def _numpy_views(self) -> tuple[np.ndarray, ...] | None:
        """mean, var, count, shift and scale as numpy views; None off the CPU. Made again only
        when the buffers were replaced (``.to()`` replaces them all; loading writes into them)."""
        mean = self._buffers["mean"]
        cached = self._views
        if cached is None or cached[0] is not mean:
            if mean is None or mean.device.type != "cpu":
                return None
            buffers = [self._buffers[name] for name in ("mean", "var", "count", "shift", "scale")]
            cached = self._views = (mean, tuple(b.numpy() for b in buffers))  # type: ignore[union-attr]
        return cached[1]

    @torch.no_grad()
    def _refresh(self) -> None:
        self.shift.copy_(self.mean)
        self.scale.copy_(torch.rsqrt(self.var + OBS_EPSILON))

    def normalization(self) -> Normalization:
        """(shift, scale), the live buffers: what :func:`normalize_obs` takes."""
        return self.shift, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_obs(x, self.shift, self.scale)


class LearningNetwork(nn.Module):
    """Maps a state to one Q-value per discrete action.

    ``LearningNetwork(input_size, output_size)`` is the spec's form (hidden layers of 256 units,
    ReLU); ``LearningNetwork(**network_config)`` takes the spec's ``network_config`` dict;
    ``LearningNetwork.from_architecture(arch)`` builds any searched shape.

    ``learning_rate`` is in the spec's ``network_config`` but is the optimiser's step size, not
    part of the network: it is kept as ``self.learning_rate`` for whoever builds the optimiser
    and changes nothing here. (``LearningAgent`` takes its step size from ``train.learning_rate``
    or its own ``learning_rate`` argument, so ``LearningAgent(**network_config)`` works too.)

    ``normalize_obs`` adds ``obs_norm`` (an :class:`ObsNormalizer`; None without the option):
    the input is standardised with its statistics before the first layer. Nothing updates them
    but :meth:`update_obs_stats`, which the trainer calls with the observations the agent acts
    on while training; the target network shares the online network's ``obs_norm``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        dueling: bool = False,
        hidden_layers: tuple[int, ...] | list[int] | None = None,
        learning_rate: float | None = None,
        normalize_obs: bool = False,
    ) -> None:
        super().__init__()
        if learning_rate is not None and not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.learning_rate = learning_rate
        self.architecture = NetworkArchitecture(
            input_dim=input_size,
            output_dim=output_size,
            hidden_layers=tuple(hidden_layers or (hidden_size,) * num_hidden_layers),
            activation=activation,
            dropout=dropout,
            dueling=dueling,
            normalize_obs=normalize_obs,
        )
        arch = self.architecture
        layers: list[nn.Module] = []
        width = arch.input_dim
        for units in arch.hidden_layers:
            layers += [nn.Linear(width, units), ACTIVATIONS[arch.activation]()]
            if arch.dropout > 0:
                layers.append(nn.Dropout(arch.dropout))
            width = units
        self.body = nn.Sequential(*layers)
        if arch.dueling:
            self.value_head = nn.Linear(width, 1)
            self.advantage_head = nn.Linear(width, arch.output_dim)
        else:
            self.head = nn.Linear(width, arch.output_dim)
        self._activation = _FUNCTIONAL_ACTIVATIONS[arch.activation]
        # Dropout masks come from the network's own generator, not torch's global one, so two
        # networks training in two threads (the pipeline's parallel stages) stay reproducible.
        self._dropout_seed = 0
        self._dropout_generator: torch.Generator | None = None
        self.obs_norm: ObsNormalizer | None = ObsNormalizer(arch.input_dim) if arch.normalize_obs else None

    @classmethod
    def from_architecture(cls, arch: NetworkArchitecture) -> LearningNetwork:
        return cls(
            arch.input_dim,
            arch.output_dim,
            activation=arch.activation,
            dropout=arch.dropout,
            dueling=arch.dueling,
            hidden_layers=arch.hidden_layers,
            normalize_obs=arch.normalize_obs,
        )

    @property
    def input_size(self) -> int:
        return self.architecture.input_dim

    @property
    def output_size(self) -> int:
        return self.architecture.output_dim

    def hidden_layers(self) -> list[Layer]:
        """(weight [out, in], bias [out]) of each hidden linear layer, input first."""
        return [(m.weight, m.bias) for m in self.body if isinstance(m, nn.Linear)]

    def head_layers(self) -> list[Layer]:
        """The output layer, or (value, advantage) for a dueling head."""
        heads = [self.value_head, self.advantage_head] if self.architecture.dueling else [self.head]
        return [(m.weight, m.bias) for m in heads]

    def normalization(self) -> Normalization | None:
        """(shift, scale) the input is standardised with (live buffers); None without ``normalize_obs``."""
        return None if self.obs_norm is None else self.obs_norm.normalization()

    def update_obs_stats(self, obs: np.ndarray | torch.Tensor, *sharing: LearningNetwork) -> None:
        """Add observations (``[n, input_size]``) to the running statistics; nothing without
        ``normalize_obs``. Each network of ``sharing`` (the target network) first takes this
        network's statistics as its own (:meth:`share_obs_stats`), so that it stays consistent
        with this one whatever loads or updates them."""
        if self.obs_norm is None:
            return
        for network in sharing:
            network.share_obs_stats(self)
        self.obs_norm.update(obs)

    def share_obs_stats(self, source: LearningNetwork) -> None:
        """Use ``source``'s observation statistics (the same buffers, not a copy) from now on."""
        if source.obs_norm is self.obs_norm:
            return
        if source.obs_norm is None or self.obs_norm is None:
            raise ValueError("only two networks that both normalise observations can share their statistics")
        self.obs_norm = source.obs_norm

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._dropout_mask(x, self.architecture.dropout)

    def features(self, state: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: an optional learned embedding for similar-state search."""
        dropout = self._dropout if self.architecture.dropout > 0 and self.training else None
        return q_forward(
            self.hidden_layers(), [], state, TORCH_LINEAR, self._activation,
            dropout=dropout, normalization=self.normalization(),
        )

    def seed_dropout(self, seed: int) -> None:
        """Start the dropout masks' own random stream at ``seed``."""
        self._dropout_seed, self._dropout_generator = int(seed), None

    def _dropout_mask(self, x: torch.Tensor, p: float) -> torch.Tensor:
        generator = self._dropout_generator
        if generator is None or generator.device != x.device:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self._dropout_seed)
            self._dropout_generator = generator
        return torch.empty_like(x).bernoulli_(1.0 - p, generator=generator) / (1.0 - p)

    def dropout_rng_state(self) -> torch.Tensor | None:
        """The dropout stream's position (None before the first mask): saved with a resumable run."""
        return None if self._dropout_generator is None else self._dropout_generator.get_state()

    def set_dropout_rng_state(self, state: torch.Tensor) -> None:
        generator = torch.Generator(device=next(self.parameters()).device)
        generator.set_state(state)
        self._dropout_generator = generator

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        dropout = self._dropout if self.architecture.dropout > 0 and self.training else None
        return q_forward(
            self.hidden_layers(), self.head_layers(), state, TORCH_LINEAR, self._activation,
            dropout=dropout, normalization=self.normalization(),
        )


_NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0.0, out=x),
    "tanh": lambda x: np.tanh(x, out=x),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


class NumpyPolicy:
    """The network's forward pass in numpy, on views of its live CPU weights.

    Acting picks actions for a handful of states at every environment step; at that size torch's
    per-operator dispatch costs more than the arithmetic, and numpy is about 3x cheaper. The arrays
    share memory with the parameters, which are only ever updated in place (the optimizer, target
    copies and ``load_state_dict`` all write into the existing tensors), so they never go stale.
    Dropout is inactive when acting, so it is skipped. The observation statistics of a
    normalising network are buffers updated in place too, and read through views the same way.
    """

    def __init__(self, network: LearningNetwork) -> None:
        arch = network.architecture
        if arch.activation not in _NUMPY_ACTIVATIONS:
            raise ValueError(f"no numpy form for activation '{arch.activation}'")
        self._activation = _NUMPY_ACTIVATIONS[arch.activation]
        # Transposed views: ``x @ weight`` is numpy's row-major form of ``F.linear``.
        self._hidden = [(w.detach().numpy().T, b.detach().numpy()) for w, b in network.hidden_layers()]
        self._heads = [(w.detach().numpy().T, b.detach().numpy()) for w, b in network.head_layers()]
        norm = network.normalization()
        self._normalization = None if norm is None else (norm[0].numpy(), norm[1].numpy())

    @staticmethod
    def supports(network: LearningNetwork) -> bool:
        on_cpu = all(p.device.type == "cpu" for p in network.parameters())
        return on_cpu and network.architecture.activation in _NUMPY_ACTIVATIONS

    def __call__(self, states: np.ndarray) -> np.ndarray:
        return q_forward(
            self._hidden, self._heads, states, _numpy_linear, self._activation,
            normalization=self._normalization,
        )
