"""Checkpoint files: written atomically, read without unpickling code.

A checkpoint is a dict of tensors and plain data saved with ``torch.save``. Writing goes to a
temporary file in the same directory, is fsynced, then renamed over the target, so a crash leaves
either the old checkpoint or the new one, never half of one. Reading uses ``weights_only=True``:
a checkpoint from an untrusted source cannot run code. Before anything is built from a document,
``validate_checkpoint`` checks its shape (a pydantic schema), every tensor's shape and dtype against
the recorded architecture, and the architecture's size against fixed bounds, so a crafted file gives
one line naming the file and the field instead of a traceback or a huge allocation.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.network import LearningNetwork, NetworkArchitecture

FORMAT = "lagent-checkpoint"
VERSION = 1

MAX_HIDDEN_LAYERS = 16
"""The most hidden layers a checkpoint's network may have (as ``network.num_hidden_layers``)."""
MAX_LAYER_WIDTH = 65_536
"""The most units a hidden layer (or the action head) of a checkpoint's network may have."""
MAX_INPUT_DIM = 1 << 24
"""The most observation features a checkpoint's network may take."""
MAX_PARAMETERS = 100_000_000
"""The most parameters a checkpoint's network may have (400 MB of float32 per copy)."""
MAX_BUFFER_BYTES = 32 << 30
"""The most bytes the replay buffer a checkpoint's config asks for may take."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not one of ours."""


def save_checkpoint_file(payload: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(document, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", device: torch.device | str | None = None
) -> dict[str, Any]:
    """Read and validate a checkpoint (see ``validate_checkpoint``); every problem is a CheckpointError.

    ``device`` is where the agent will live: its random generators' states are tried there too.
    """
    document = read_checkpoint_document(path, map_location)
    validate_checkpoint(document, Path(path), device=device)
    return document


def read_checkpoint_document(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A lagent file of another shape than a run's checkpoint (a distributed run's learner or
    actors): tensors and plain data only, our format marker and version checked; the caller
    checks the content it reads."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    document = _read_document(path, map_location)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lagent checkpoint (no '{FORMAT}' marker)")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {document.get('version')}, this code reads {VERSION}"
        )
    return document


def _read_document(path: Path, map_location: Any) -> Any:
    """torch.load with weights_only=True, with torch's errors (and its advice) replaced by one line."""
    unreadable = f"{path}: not a readable checkpoint"
    with path.open("rb") as handle:
        header = handle.read(4)
    if header != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is not ours
        if header[:1] == b"\x80":
            raise CheckpointError(
                f"{unreadable}: a pickle file, not a torch checkpoint (pickle files are never loaded: "
                "loading one could run code)"
            )
        raise CheckpointError(f"{unreadable}: not a torch file (truncated, corrupt or another format)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False: never quoted
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise CheckpointError(f"{unreadable} (truncated or corrupt): unreadable pickled data") from None
        raise CheckpointError(
            f"{unreadable}: it holds Python objects other than tensors and plain data "
            f"({found.group(1)}), which are never loaded (loading them could run code)"
        ) from None
    except Exception as exc:  # torch raises many types for bad files; all mean "unreadable"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0][:200] if lines and "weights_only" not in lines[0] else type(exc).__name__
        raise CheckpointError(f"{unreadable} (truncated or corrupt): {reason}") from None


# --------------------------------------------------------------------------- the document's schema

Tensor = torch.Tensor
Count = Annotated[int, Field(ge=0)]
Width = Annotated[int, Field(ge=1, le=MAX_LAYER_WIDTH)]
Shapes = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # parameter name -> (shape, dtype)


class _Schema(BaseModel):
    """Strict (no coercion: a list is not a tensor, a string not a number); unknown keys allowed."""

    model_config = ConfigDict(strict=True, arbitrary_types_allowed=True, extra="allow")


class ArchitectureSchema(_Schema):
    """Unknown keys pass here; NetworkArchitecture.from_dict then refuses them with their name."""

    input_dim: Annotated[int, Field(ge=1, le=MAX_INPUT_DIM)]
    output_dim: Width
    hidden_layers: Annotated[list[Width], Field(min_length=1, max_length=MAX_HIDDEN_LAYERS)] = [256, 256]
    activation: str = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    dueling: bool = False
    normalize_obs: bool = False


class ParamGroupSchema(_Schema):
    params: list[Count]
    # 0 is a rate a linear schedule ends at (train.lr_final_fraction: 0): such a run's checkpoint loads
    lr: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None


class OptimizerSchema(_Schema):
    state: dict[int, dict[str, Tensor]]
    param_groups: Annotated[list[ParamGroupSchema], Field(min_length=1)]


class BufferSchema(_Schema):
    capacity: Annotated[int, Field(ge=1)]
    obs_dim: Annotated[int, Field(ge=1)] | None
    position: Count
    size: Count
    generator: Tensor
    data: dict[str, Tensor] | None = None


class AgentSchema(_Schema):
    architecture: ArchitectureSchema
    q_network: dict[str, Tensor]
    target_network: dict[str, Tensor]
    optimizer: OptimizerSchema
    training_steps: Count
    rng: dict[str, Any]
    dropout_rng: Tensor | None = None
    buffer: BufferSchema | None = None


class EnvStateSchema(_Schema):
    kind: str
    complete: bool = False


class TrainerSchema(_Schema):
    global_step: Count
    episodes_done: Count
    epsilon: float
    exploration_steps: Count | None
    planned_steps: Count | None = None
    steps_since_train: Count
    episode_rewards: Tensor
    episode_lengths: Tensor
    best_reward: float
    best_recent_mean: float
    best_eval_reward: float
    next_eval: Count
    evaluations: Tensor
    best_weights: dict[str, Tensor] | None
    invalid_actions: Count
    clipped_actions: Count
    actions_taken: Count
    obs: Tensor
    ep_return: Tensor
    ep_length: Tensor
    pending_reset: Tensor
    torch_rng: Tensor
    stage_transitions: list[dict[str, Any]] = []
    train_seconds: float = 0.0
    env: EnvStateSchema


class CheckpointSchema(_Schema):
    config: dict[str, Any]
    task: str
    agent: AgentSchema
    trainer: TrainerSchema | None = None
    task_params: dict[str, Any] | None = None
    curriculum: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None


def validate_checkpoint(
    document: Mapping[str, Any], path: str | Path, device: torch.device | str | None = None
) -> None:
    """Check a checkpoint document before anything is built from it; CheckpointError if it is off.

    The schema checks the document's shape; then the architecture is bounded (layers, widths,
    parameters) and every tensor is checked against the shapes and dtypes it implies, the random
    generators' states are tried on scratch generators (the agent's on ``device`` when given).
    """
    try:
        schema = CheckpointSchema.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        given = error.get("input")
        shown = repr(given) if isinstance(given, (bool, int, float)) else type(given).__name__
        got = "" if error["type"] == "missing" else f" (got {shown[:40]})"
        message = re.sub(r" or instance of \w+Schema", "", error["msg"])
        raise CheckpointError(f"{path}: {field}: {message}{got}") from None
    _Checker(path, device).check(schema)


class _Checker:
    """The checks a schema cannot express: sizes and shapes that depend on other fields."""

    def __init__(self, path: str | Path, device: torch.device | str | None) -> None:
        self.path = path
        self.device = None if device is None else torch.device(device)

    def fail(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {field}: {problem}")

    def check(self, schema: CheckpointSchema) -> None:
        agent = schema.agent
        arch = self.architecture(agent.architecture)
        with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
            network = LearningNetwork.from_architecture(arch)
        expected = {name: (tuple(p.shape), p.dtype) for name, p in network.state_dict().items()}
        self.tensors("agent.q_network", agent.q_network, expected)
        self.tensors("agent.target_network", agent.target_network, expected)
        self.optimizer(agent.optimizer, [tuple(p.shape) for p in network.parameters()])  # not buffers
        self.numpy_rng("agent.rng", agent.rng)
        if agent.dropout_rng is not None:
            self.generator("agent.dropout_rng", agent.dropout_rng, self.device)
        if agent.buffer is not None:
            self.buffer(agent.buffer, arch.input_dim)
        if schema.trainer is not None:
            self.trainer(schema.trainer, arch.input_dim, expected)

    def architecture(self, data: ArchitectureSchema) -> NetworkArchitecture:
        field = "agent.architecture"
        try:
            arch = NetworkArchitecture.from_dict(data.model_dump())
        except (TypeError, ValueError) as exc:
            raise self.fail(field, str(exc)) from None
        widths = [arch.input_dim, *arch.hidden_layers]
        heads = arch.output_dim + (1 if arch.dueling else 0)
        parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:])) + (widths[-1] + 1) * heads
        if parameters > MAX_PARAMETERS:
            raise self.fail(
                f"{field}.hidden_layers",
                f"a network of {parameters:,} parameters, "
                f"more than a checkpoint may hold ({MAX_PARAMETERS:,})",
            )
        return arch

    def tensors(self, field: str, tensors: Mapping[str, Tensor], expected: Shapes) -> None:
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise self.fail(field, f"no '{missing[0]}' (the architecture has {', '.join(expected)})")
        extra = [name for name in tensors if name not in expected]
        if extra:
            raise self.fail(f"{field}.{extra[0]}", "not a parameter of the recorded architecture")
        for name, (shape, dtype) in expected.items():
            self.tensor(f"{field}.{name}", tensors[name], shape, dtype)

    def tensor(
        self, field: str, value: Tensor, shape: tuple[int | None, ...], dtype: torch.dtype | None = None
    ) -> None:
        """``shape`` may hold None for a size any value fits."""
        actual = tuple(value.shape)
        fits = all(want is None or want == got for want, got in zip(shape, actual))
        if len(actual) != len(shape) or not fits:
            sizes = ["N" if size is None else str(size) for size in shape]
            wanted = f"({sizes[0]},)" if len(sizes) == 1 else f"({', '.join(sizes)})"
            raise self.fail(field, f"shape {actual}, the architecture needs {wanted}")
        if dtype is not None and value.dtype != dtype:
            raise self.fail(field, f"dtype {value.dtype}, expected {dtype}")

    def optimizer(self, state: OptimizerSchema, shapes: list[tuple[int, ...]]) -> None:
        grouped = sorted(index for group in state.param_groups for index in group.params)
        if grouped != list(range(len(shapes))):
            raise self.fail(
                "agent.optimizer.param_groups", f"parameters {grouped}, the network has {len(shapes)}"
            )
        for index, moments in state.state.items():
            field = f"agent.optimizer.state.{index}"
            if not 0 <= index < len(shapes):
                raise self.fail(field, f"no such parameter (the network has {len(shapes)})")
            for name, value in moments.items():
                if name == "step":
                    self.tensor(f"{field}.step", value, ())
                elif name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    self.tensor(f"{field}.{name}", value, shapes[index], torch.float32)
                else:
                    raise self.fail(f"{field}.{name}", "not an Adam state entry")

    def numpy_rng(self, field: str, state: dict[str, Any]) -> None:
        try:
            np.random.default_rng().bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise self.fail(field, f"not a numpy PCG64 state ({_first_line(exc)})") from None

    def generator(self, field: str, state: Tensor, device: torch.device | None) -> None:
        """A torch generator's state: 1-D uint8, and accepted by a scratch generator on ``device``."""
        if state.dtype != torch.uint8 or state.dim() != 1:
            raise self.fail(
                field, f"a {state.dtype} tensor of shape {tuple(state.shape)}, not a generator state (1-D uint8)"
            )
        if device is None:
            return
        try:
            torch.Generator(device=device).set_state(state.cpu())
        except (RuntimeError, TypeError, ValueError) as exc:
            raise self.fail(field, f"not a {device.type} generator state ({_first_line(exc)})") from None

    def buffer(self, state: BufferSchema, input_dim: int) -> None:
        field = "agent.buffer"
        if state.obs_dim is not None and state.obs_dim != input_dim:
            raise self.fail(f"{field}.obs_dim", f"{state.obs_dim}, the network takes {input_dim} features")
        if state.size > state.capacity:
            raise self.fail(f"{field}.size", f"{state.size}, more than the capacity {state.capacity}")
        if state.position >= state.capacity:
            raise self.fail(f"{field}.position", f"{state.position}, not below the capacity {state.capacity}")
        self.generator(f"{field}.generator", state.generator, self.device)
        if state.data is None:
            return
        n, d = state.size, input_dim
        layout = {
            "obs": ((n, d), torch.float32),
            "actions": ((n,), torch.int64),
            "rewards": ((n,), torch.float32),
            "next_obs": ((n, d), torch.float32),
            "dones": ((n,), torch.float32),
        }
        for name, (shape, dtype) in layout.items():
            if name not in state.data:
                raise self.fail(f"{field}.data", f"no '{name}'")
            self.tensor(f"{field}.data.{name}", state.data[name], shape, dtype)

    def trainer(self, state: TrainerSchema, input_dim: int, expected: Shapes) -> None:
        self.tensor("trainer.episode_rewards", state.episode_rewards, (None,), torch.float64)
        episodes = len(state.episode_rewards)
        self.tensor("trainer.episode_lengths", state.episode_lengths, (episodes,), torch.int64)
        self.tensor("trainer.evaluations", state.evaluations, (None, 2), torch.float64)
        copies = len(state.ep_return) if state.ep_return.dim() == 1 else None
        self.tensor("trainer.ep_return", state.ep_return, (None,), torch.float64)
        self.tensor("trainer.ep_length", state.ep_length, (copies,), torch.int64)
        self.tensor("trainer.pending_reset", state.pending_reset, (copies,), torch.bool)
        obs = state.obs
        if obs.dim() < 2 or obs.shape[0] != copies or int(np.prod(obs.shape[1:])) != input_dim:
            raise self.fail("trainer.obs", f"shape {tuple(obs.shape)}, expected ({copies}, {input_dim})")
        if obs.dtype != torch.float32:
            raise self.fail("trainer.obs", f"dtype {obs.dtype}, expected torch.float32")
        self.generator("trainer.torch_rng", state.torch_rng, torch.device("cpu"))  # torch's global generator
        if state.best_weights is not None:
            self.tensors("trainer.best_weights", state.best_weights, expected)
        if state.env.kind not in ("native", "attributes"):
            raise self.fail("trainer.env.kind", f"'{state.env.kind[:40]}', expected 'native' or 'attributes'")


def check_buffer_size(capacity: int, obs_dim: int, path: str | Path) -> None:
    """Refuse a replay buffer (``replay.local_buffer_size`` rows) larger than MAX_BUFFER_BYTES."""
    size = capacity * (2 * obs_dim + 3) * 4
    if size > MAX_BUFFER_BYTES:
        raise CheckpointError(
            f"{path}: config.replay.local_buffer_size: {capacity:,} rows of {obs_dim} features take "
            f"{size / 2**30:,.1f} GiB, more than a checkpoint may ask for "
            f"({MAX_BUFFER_BYTES / 2**30:.0f} GiB)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
