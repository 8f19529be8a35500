"""Action spaces: bounds, validation, normalisation, safety constraints and the discrete action set.

A DQN picks one of a fixed set of actions, so every space documents a discretisation (the table
``discrete_actions()`` whose row i is what the network's output i means). Whatever the source of
an action (a table row, a sampled or hand-written one), :meth:`ActionSpace.process` takes it
through the same three gates before anything moves: validation (shape, finiteness, bounds,
integrality of discrete channels, state-dependent limits), clipping to the bounds, and the
safety constraints of the current state. Invalid and altered actions are counted.

Batches are first-class: every method accepts one action ``[D]`` or a batch ``[N, D]``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from agent.tasks.types import TaskType


class ActionSpaceError(ValueError):
    """An action space was configured inconsistently, or an action has the wrong shape."""


class ActionType(enum.Enum):
    CONTINUOUS = "continuous"
    DISCRETE = "discrete"
    HYBRID = "hybrid"


def _as_vector(values: Any, name: str) -> np.ndarray:
    try:
        array = np.atleast_1d(np.asarray(values, dtype=np.float64)).copy()
    except (TypeError, ValueError):
        raise ActionSpaceError(f"{name} must be numbers, got {values!r}") from None
    if array.ndim != 1 or array.size == 0:
        raise ActionSpaceError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ActionSpaceError(f"{name} must be finite, got {array}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class ActionBounds:
    """Valid range of each action dimension (inclusive)."""

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        low, high = _as_vector(self.low, "low"), _as_vector(self.high, "high")
        if low.shape != high.shape:
            raise ActionSpaceError(f"low has {low.size} dimensions, high has {high.size}")
        if np.any(low >= high):
            raise ActionSpaceError(f"bounds need low < high in every dimension: low={low}, high={high}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def symmetric(cls, limit: float, dim: int) -> ActionBounds:
        return cls(np.full(dim, -abs(limit)), np.full(dim, abs(limit)))

    @property
    def dim(self) -> int:
        return int(self.low.size)

    def validate(self, action: Any) -> bool | np.ndarray:
        """True where the action is finite and inside the bounds (one bool per row of a batch)."""
        array = np.asarray(action, dtype=np.float64)
        inside = np.isfinite(array) & (array >= self.low) & (array <= self.high)
        result = inside.all(axis=-1)
        return bool(result) if result.ndim == 0 else result

    def clip(self, action: Any) -> np.ndarray:
        """Into the bounds; non-finite entries become the in-bounds value nearest zero."""
        array = np.asarray(action, dtype=np.float64)
        safe_default = np.clip(0.0, self.low, self.high)
        array = np.where(np.isfinite(array), array, safe_default)
        return np.clip(array, self.low, self.high)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ActionBounds)
            and np.array_equal(self.low, other.low)
            and np.array_equal(self.high, other.high)
        )

    def __hash__(self) -> int:
        return hash((self.low.tobytes(), self.high.tobytes()))


class ProcessedAction(NamedTuple):
    """An action after the gates, and which rows failed validation or were altered."""

    action: np.ndarray
    invalid: np.ndarray
    clipped: np.ndarray


class ActionSpace:
    """Common machinery of every action space; subclasses add meaning, safety and a discretisation.

    ``integer_dims`` are the discrete channels (a hybrid space's communication signal, a tool
    switch): their bounds are integers and valid values are whole numbers.
    """

    def __init__(
        self,
        bounds: ActionBounds,
        action_type: ActionType,
        *,
        integer_dims: Sequence[int] = (),
        labels: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(bounds, ActionBounds):
            raise ActionSpaceError(f"bounds must be ActionBounds, got {type(bounds).__name__}")
        if not isinstance(action_type, ActionType):
            raise ActionSpaceError(f"action_type must be an ActionType, got {action_type!r}")
        integer = np.zeros(bounds.dim, dtype=bool)
        for dim in integer_dims:
            if not 0 <= int(dim) < bounds.dim:
                raise ActionSpaceError(f"integer dimension {dim} outside 0..{bounds.dim - 1}")
            integer[int(dim)] = True
        expected = {
            ActionType.CONTINUOUS: not integer.any(),
            ActionType.DISCRETE: bool(integer.all()),
            ActionType.HYBRID: bool(integer.any() and not integer.all()),
        }
        if not expected[action_type]:
            raise ActionSpaceError(
                f"a {action_type.value} space cannot have integer dimensions {np.flatnonzero(integer).tolist()}"
                f" out of {bounds.dim}"
            )
        for bound in (bounds.low[integer], bounds.high[integer]):
            if np.any(bound != np.round(bound)):
                raise ActionSpaceError(f"bounds of discrete channels must be whole numbers, got {bound}")
        if labels is not None and len(labels) != bounds.dim:
            raise ActionSpaceError(f"{len(labels)} labels for {bounds.dim} dimensions")
        self.bounds = bounds
        self.action_type = action_type
        self.integer_dims = integer
        self.labels = list(labels) if labels is not None else [f"a{i}" for i in range(bounds.dim)]
        self._span = bounds.high - bounds.low
        self._rng = np.random.default_rng(seed)
        self.total_count = 0
        self.invalid_count = 0
        self.clipped_count = 0
        self.safety_count = 0
        self._action_sum = np.zeros(bounds.dim)
        self._action_sq_sum = np.zeros(bounds.dim)
        self._action_rows = 0

    # ------------------------------------------------------------------ basics

    @property
    def dim(self) -> int:
        return self.bounds.dim

    @property
    def shape(self) -> tuple[int]:
        return (self.dim,)

    def seed(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)

    def sample(self, n: int | None = None) -> np.ndarray:
        """Uniform over the bounds (discrete channels uniform over their values)."""
        size = (self.dim,) if n is None else (n, self.dim)
        low, high = self.bounds.low, self.bounds.high
        action = self._rng.uniform(low, high, size=size)
        if self.integer_dims.any():
            whole = self._rng.integers(low.astype(np.int64), high.astype(np.int64) + 1, size=size)
            action = np.where(self.integer_dims, whole, action)
        return action

    def _check_shape(self, action: Any) -> np.ndarray:
        try:
            array = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            raise ActionSpaceError(f"an action must be numbers, got {action!r}") from None
        if array.ndim not in (1, 2) or array.shape[-1] != self.dim:
            raise ActionSpaceError(
                f"{type(self).__name__} takes actions of shape ({self.dim},) or (N, {self.dim}), "
                f"got {array.shape}"
            )
        return array

    # ------------------------------------------------------------------ the gates

    def validate_action(self, action: Any, context: Mapping[str, Any] | None = None) -> bool | np.ndarray:
        """True where the action may be executed as it is (one bool per row of a batch).

        Checks shape, finiteness, bounds, whole-numbered discrete channels and the state-dependent
        limits the subclass knows (``context``: joint positions, whether tools work, ...).
        """
        try:
            array = self._check_shape(action)
        except ActionSpaceError:
            return False
        valid = np.asarray(self.bounds.validate(array))
        if self.integer_dims.any():
            channels = array[..., self.integer_dims]
            valid = valid & np.all(channels == np.round(channels), axis=-1)
        if context:
            valid = valid & self._state_valid(np.nan_to_num(array), context)
        return bool(valid) if valid.ndim == 0 else valid

    def _state_valid(self, action: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        """State-dependent validity; the base space has none."""
        return np.ones(action.shape[:-1], dtype=bool)

    def clip_action(self, action: Any) -> np.ndarray:
        """Into the bounds, discrete channels rounded to whole values."""
        clipped = self.bounds.clip(self._check_shape(action))
        if self.integer_dims.any():
            clipped = np.where(self.integer_dims, np.round(clipped), clipped)
        return clipped

    def apply_safety_constraints(
        self, action: Any, context: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """The action made safe for the state in ``context``; the base space has no constraints."""
        return np.array(self._check_shape(action), dtype=np.float64)

    def process(self, action: Any, context: Mapping[str, Any] | None = None) -> ProcessedAction:
        """Validate, clip and constrain an action (or a batch), and count what had to change."""
        array = self._check_shape(action)
        invalid = ~np.asarray(self.validate_action(array, context))
        clipped_action = self.clip_action(array)
        safe = self.apply_safety_constraints(clipped_action, context)
        bounds_changed = np.any(clipped_action != np.nan_to_num(array), axis=-1)
        safety_changed = np.any(safe != clipped_action, axis=-1)
        altered = invalid | bounds_changed | safety_changed
        self.record(int(np.count_nonzero(invalid)), int(np.count_nonzero(altered)), int(invalid.size))
        self.safety_count += int(np.count_nonzero(safety_changed))
        rows = safe.reshape(-1, self.dim)
        self._action_sum += rows.sum(axis=0)
        self._action_sq_sum += (rows * rows).sum(axis=0)
        self._action_rows += rows.shape[0]
        return ProcessedAction(safe, invalid, altered)

    # ------------------------------------------------------------------ normalisation

    def normalize_action(self, action: Any) -> np.ndarray:
        """Affine map of the bounds onto [-1, 1] (what a network with tanh outputs produces)."""
        return 2.0 * (self._check_shape(action) - self.bounds.low) / self._span - 1.0

    def denormalize_action(self, normalized: Any) -> np.ndarray:
        """Inverse of :meth:`normalize_action`; discrete channels are rounded to whole values."""
        array = self._check_shape(normalized)
        action = self.bounds.low + (array + 1.0) * 0.5 * self._span
        if self.integer_dims.any():
            action = np.where(self.integer_dims, np.round(action), action)
        return action

    # ------------------------------------------------------------------ discretisation

    def discrete_actions(self) -> np.ndarray:
        """The action set a DQN indexes: row i is the action of output i. The last row is 'stop'."""
        raise NotImplementedError(f"{type(self).__name__} has no discretisation")

    def action_labels(self) -> list[str]:
        """One human-readable name per row of :meth:`discrete_actions`."""
        raise NotImplementedError(f"{type(self).__name__} has no discretisation")

    @property
    def n_discrete(self) -> int:
        return int(self.discrete_actions().shape[0])

    def from_discrete(self, index: Any) -> np.ndarray:
        """The action of a network output (or a batch of them); out-of-range indices are refused."""
        table = self.discrete_actions()
        indices = np.asarray(index)
        if not np.issubdtype(indices.dtype, np.integer) or np.any((indices < 0) | (indices >= len(table))):
            raise ActionSpaceError(f"discrete action index must be an integer in [0, {len(table)}), got {index!r}")
        return table[indices]

    def _check_table(self, table: np.ndarray) -> np.ndarray:
        """Every row of a discretisation must pass validation: a table is built once, checked once."""
        valid = np.asarray(self.validate_action(table))
        if not valid.all():
            raise ActionSpaceError(f"discrete actions {np.flatnonzero(~valid).tolist()} violate the bounds")
        table.flags.writeable = False
        return table

    # ------------------------------------------------------------------ metrics and state

    def record(self, invalid: int, clipped: int, total: int) -> None:
        """Add counts of actions processed elsewhere (a batch environment's fast path)."""
        self.invalid_count += invalid
        self.clipped_count += clipped
        self.total_count += total

    def get_metrics(self) -> dict[str, Any]:
        total = max(self.total_count, 1)
        rows = max(self._action_rows, 1)
        mean = self._action_sum / rows
        std = np.sqrt(np.maximum(self._action_sq_sum / rows - mean * mean, 0.0))
        return {
            "invalid_action_count": self.invalid_count,
            "invalid_action_rate": self.invalid_count / total,
            "clipped_action_count": self.clipped_count,
            "clipped_action_rate": self.clipped_count / total,
            "safety_constraint_violations": self.safety_count,
            "actions_processed": self.total_count,
            "action_mean": dict(zip(self.labels, mean.tolist())),
            "action_std": dict(zip(self.labels, std.tolist())),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters and sampler state as plain data (checkpoints)."""
        return {
            "counts": np.array(
                [self.total_count, self.invalid_count, self.clipped_count, self.safety_count, self._action_rows],
                dtype=np.int64,
            ),
            "action_sum": self._action_sum.copy(),
            "action_sq_sum": self._action_sq_sum.copy(),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = np.asarray(state["counts"], dtype=np.int64)
        sums = np.asarray(state["action_sum"], dtype=np.float64)
        if counts.shape != (5,) or sums.shape != (self.dim,) or np.any(counts < 0):
            raise ActionSpaceError(f"action-space state does not fit {type(self).__name__} of {self.dim} dims")
        self.total_count, self.invalid_count, self.clipped_count, self.safety_count, self._action_rows = (
            int(c) for c in counts
        )
        self._action_sum = sums.copy()
        self._action_sq_sum = np.asarray(state["action_sq_sum"], dtype=np.float64).copy()
        self._rng.bit_generator.state = state["rng"]


# ---------------------------------------------------------------------- planar movement


def planar_moves(directions: int, speeds: Sequence[float], max_speed: float) -> tuple[np.ndarray, list[str]]:
    """Velocities of ``directions`` evenly spread headings (0 = +x, counter-clockwise) at each
    speed fraction of ``max_speed``, then 'stop'. Diagonals keep the same speed, so the set fits
    inside the velocity box."""
    if directions < 1 or not speeds or any(not 0.0 < s <= 1.0 for s in speeds):
        raise ActionSpaceError(f"need >= 1 direction and speed fractions in (0, 1], got {directions}, {speeds}")
    angles = 2.0 * np.pi * np.arange(directions) / directions
    rows, labels = [], []
    for speed in speeds:
        for k, angle in enumerate(angles):
            rows.append((speed * max_speed * math.cos(angle), speed * max_speed * math.sin(angle)))
            labels.append(f"move {round(math.degrees(angle))}deg x{speed:g}")
    rows.append((0.0, 0.0))
    labels.append("stop")
    moves = np.round(np.array(rows), 12)
    return moves, labels


def _limit_speed(velocity: np.ndarray, limited: np.ndarray, max_speed: float) -> np.ndarray:
    """Scale the rows flagged ``limited`` down to ``max_speed`` (direction kept)."""
    speed = np.hypot(velocity[..., 0], velocity[..., 1])
    scale = np.where(limited & (speed > max_speed), max_speed / np.maximum(speed, 1e-12), 1.0)
    return velocity * scale[..., None]


def _context_array(context: Mapping[str, Any], key: str, default: Any) -> np.ndarray:
    return np.asarray(context.get(key, default))


class NavigationActionSpace(ActionSpace):
    """2-D velocity command (m/s) in the velocity bounds; slower near obstacles.

    With ``tool=True`` a third, discrete channel fires a tool (the exploration scanner), making
    the space hybrid. Safety (``context``): ``obstacle_distance`` (clearance in m) under
    ``safety_distance`` caps the speed at ``max_velocity_near_obstacle``; ``tools_enabled=False``
    makes tool use invalid and switches it off; ``previous_action`` with ``dt`` and acceleration
    bounds limits the change of velocity per step.

    Discretisation: ``directions`` headings x ``speeds`` (fractions of the top speed), the tool
    (when present), and 'stop' last: 9 actions by default, 10 with the tool.
    """

    def __init__(
        self,
        velocity_bounds: tuple[float, float] = (-1.0, 1.0),
        *,
        max_velocity_near_obstacle: float = 0.5,
        safety_distance: float = 0.5,
        acceleration_bounds: tuple[float, float] | None = None,
        directions: int = 8,
        speeds: Sequence[float] = (1.0,),
        tool: bool = False,
        seed: int | None = None,
    ) -> None:
        low, high = (float(v) for v in velocity_bounds)
        bounds = ActionBounds([low, low] + [0.0] * tool, [high, high] + [1.0] * tool)
        super().__init__(
            bounds,
            ActionType.HYBRID if tool else ActionType.CONTINUOUS,
            integer_dims=(2,) if tool else (),
            labels=["velocity_x", "velocity_y"] + ["tool"] * tool,
            seed=seed,
        )
        if max_velocity_near_obstacle <= 0 or safety_distance < 0:
            raise ActionSpaceError("max_velocity_near_obstacle must be > 0 and safety_distance >= 0")
        if acceleration_bounds is not None and not acceleration_bounds[0] < 0 < acceleration_bounds[1]:
            raise ActionSpaceError(f"acceleration bounds must straddle zero, got {acceleration_bounds}")
        self.max_speed = min(-low, high) if low < 0 < high else 0.0
        if self.max_speed <= 0:
            raise ActionSpaceError(f"velocity bounds must straddle zero, got {velocity_bounds}")
        self.max_velocity_near_obstacle = float(max_velocity_near_obstacle)
        self.safety_distance = float(safety_distance)
        self.acceleration_bounds = acceleration_bounds
        self.tool = tool
        self._directions, self._speeds = directions, tuple(speeds)
        self._table: np.ndarray | None = None
        self._labels: list[str] = []

    def _state_valid(self, action: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        valid = np.ones(action.shape[:-1], dtype=bool)
        if self.tool and not bool(context.get("tools_enabled", True)):
            valid = valid & (action[..., 2] == 0)
        return valid

    def apply_safety_constraints(self, action: Any, context: Mapping[str, Any] | None = None) -> np.ndarray:
        safe = np.array(self._check_shape(action), dtype=np.float64)
        if not context:
            return safe
        velocity = safe[..., :2]
        if "previous_action" in context and self.acceleration_bounds is not None:
            previous = np.asarray(context["previous_action"], dtype=np.float64)[..., :2]
            dt = float(context.get("dt", 1.0))
            low, high = self.acceleration_bounds
            velocity = np.clip(velocity, previous + low * dt, previous + high * dt)
        near = _context_array(context, "obstacle_distance", np.inf) < self.safety_distance
        safe[..., :2] = _limit_speed(velocity, near, self.max_velocity_near_obstacle)
        if self.tool and not bool(context.get("tools_enabled", True)):
            safe[..., 2] = 0.0
        return safe

    def discrete_actions(self) -> np.ndarray:
        if self._table is None:
            moves, labels = planar_moves(self._directions, self._speeds, self.max_speed)
            if self.tool:
                moves = np.hstack([moves, np.zeros((len(moves), 1))])
                moves = np.vstack([moves[:-1], [[0.0, 0.0, 1.0]], moves[-1:]])
                labels = labels[:-1] + ["use tool"] + labels[-1:]
            self._table, self._labels = self._check_table(moves), labels
        return self._table

    def action_labels(self) -> list[str]:
        self.discrete_actions()
        return list(self._labels)


class ManipulationActionSpace(ActionSpace):
    """Joint velocities (rad/s) of a ``num_joints`` arm, bounded by the velocity limit.

    Validation knows the joint limits: with ``joint_positions`` (and ``dt``) in the context, a
    command that would carry a joint past its limit within the step is invalid, and the safety
    constraint slows that joint so that it stops at the limit. ``gripper=True`` adds a discrete
    grasp channel (hybrid space), invalid while ``tools_enabled`` is False.

    Discretisation: one joint at a time, +limit then -limit for joint 0, 1, ...; the grasp
    (when present); 'stop' last: 15 actions for 7 joints, 16 with the gripper.
    """

    def __init__(
        self,
        num_joints: int = 7,
        *,
        velocity_limit: float = 0.4,
        joint_limits: tuple[Any, Any] = (-2.0, 2.0),
        gripper: bool = False,
        seed: int | None = None,
    ) -> None:
        if num_joints < 1:
            raise ActionSpaceError(f"num_joints must be >= 1, got {num_joints}")
        if velocity_limit <= 0:
            raise ActionSpaceError(f"velocity_limit must be > 0, got {velocity_limit}")
        low = np.full(num_joints, -velocity_limit)
        high = np.full(num_joints, velocity_limit)
        bounds = ActionBounds(np.append(low, [0.0] * gripper), np.append(high, [1.0] * gripper))
        super().__init__(
            bounds,
            ActionType.HYBRID if gripper else ActionType.CONTINUOUS,
            integer_dims=(num_joints,) if gripper else (),
            labels=[f"joint_{j}" for j in range(num_joints)] + ["gripper"] * gripper,
            seed=seed,
        )
        self.joint_limits = ActionBounds(
            np.broadcast_to(np.asarray(joint_limits[0], dtype=np.float64), (num_joints,)),
            np.broadcast_to(np.asarray(joint_limits[1], dtype=np.float64), (num_joints,)),
        )
        self.num_joints = num_joints
        self.velocity_limit = float(velocity_limit)
        self.gripper = gripper
        self._table: np.ndarray | None = None

    def _joint_room(self, context: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """Per joint, the velocity range that keeps it inside its limits this step."""
        if "joint_positions" not in context:
            return None
        q = np.asarray(context["joint_positions"], dtype=np.float64)
        dt = float(context.get("dt", 1.0))
        return (self.joint_limits.low - q) / dt, (self.joint_limits.high - q) / dt

    def _state_valid(self, action: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        valid = np.ones(action.shape[:-1], dtype=bool)
        room = self._joint_room(context)
        if room is not None:
            velocity = action[..., : self.num_joints]
            tolerance = 1e-9
            valid &= np.all((velocity >= room[0] - tolerance) & (velocity <= room[1] + tolerance), axis=-1)
        if self.gripper and not bool(context.get("tools_enabled", True)):
            valid &= action[..., self.num_joints] == 0
        return valid

    def apply_safety_constraints(self, action: Any, context: Mapping[str, Any] | None = None) -> np.ndarray:
        safe = np.array(self._check_shape(action), dtype=np.float64)
        if not context:
            return safe
        room = self._joint_room(context)
        if room is not None:
            safe[..., : self.num_joints] = np.clip(safe[..., : self.num_joints], room[0], room[1])
        if self.gripper and not bool(context.get("tools_enabled", True)):
            safe[..., self.num_joints] = 0.0
        return safe

    def discrete_actions(self) -> np.ndarray:
        if self._table is None:
            eye = np.eye(self.num_joints) * self.velocity_limit
            moves = np.stack([eye, -eye], axis=1).reshape(-1, self.num_joints)
            extra = 1 if self.gripper else 0
            table = np.zeros((len(moves) + extra + 1, self.dim))
            table[: len(moves), : self.num_joints] = moves
            if self.gripper:
                table[len(moves), self.num_joints] = 1.0
            self._table = self._check_table(table)
        return self._table

    def action_labels(self) -> list[str]:
        labels = [f"joint {j} {sign}" for j in range(self.num_joints) for sign in ("+", "-")]
        return labels + ["grasp"] * self.gripper + ["stop"]


class CooperativeActionSpace(ActionSpace):
    """Hybrid team action: per agent a 2-D velocity and ``comm_dims`` bounded discrete signals.

    The flat action is ``[agent0 (vx, vy, c...), agent1 (...), ...]``; :meth:`decompose` gives
    one row per agent. Safety (``context``, per agent): ``obstacle_distance`` under
    ``safety_distance`` or ``teammate_distance`` under ``min_agent_distance`` caps the agent's
    speed at ``max_velocity_near_obstacle``.

    Discretisation is per agent (one shared network acts for every agent):
    ``agent_discrete_actions()`` = (``directions`` headings x ``speeds``, then 'stop') x
    communication levels, 18 actions by default.
    """

    def __init__(
        self,
        num_agents: int = 2,
        velocity_bounds: tuple[float, float] = (-1.0, 1.0),
        *,
        comm_dims: int = 1,
        comm_levels: int = 2,
        max_velocity_near_obstacle: float = 0.5,
        safety_distance: float = 0.5,
        min_agent_distance: float = 1.0,
        directions: int = 8,
        speeds: Sequence[float] = (1.0,),
        seed: int | None = None,
    ) -> None:
        if num_agents < 1 or comm_dims < 1 or comm_levels < 2:
            raise ActionSpaceError(
                f"need num_agents >= 1, comm_dims >= 1, comm_levels >= 2; got {num_agents}, {comm_dims}, {comm_levels}"
            )
        low, high = (float(v) for v in velocity_bounds)
        per_agent = 2 + comm_dims
        agent_low = [low, low] + [0.0] * comm_dims
        agent_high = [high, high] + [float(comm_levels - 1)] * comm_dims
        super().__init__(
            ActionBounds(agent_low * num_agents, agent_high * num_agents),
            ActionType.HYBRID,
            integer_dims=[a * per_agent + 2 + c for a in range(num_agents) for c in range(comm_dims)],
            labels=[f"agent{a}_{n}" for a in range(num_agents) for n in ["vx", "vy"] + [f"comm{c}" for c in range(comm_dims)]],
            seed=seed,
        )
        self.num_agents, self.comm_dims, self.comm_levels = num_agents, comm_dims, comm_levels
        self.per_agent = per_agent
        self.movement = NavigationActionSpace(
            velocity_bounds,
            max_velocity_near_obstacle=max_velocity_near_obstacle,
            safety_distance=safety_distance,
            directions=directions,
            speeds=speeds,
        )
        self.min_agent_distance = float(min_agent_distance)
        self._table: np.ndarray | None = None
        self._labels: list[str] = []

    def decompose(self, action: Any) -> np.ndarray:
        """``[..., num_agents * per_agent]`` -> ``[..., num_agents, per_agent]``."""
        array = self._check_shape(action)
        return array.reshape(array.shape[:-1] + (self.num_agents, self.per_agent))

    def compose(self, per_agent: Any) -> np.ndarray:
        array = np.asarray(per_agent, dtype=np.float64)
        if array.shape[-2:] != (self.num_agents, self.per_agent):
            raise ActionSpaceError(f"per-agent actions must end in ({self.num_agents}, {self.per_agent}), got {array.shape}")
        return array.reshape(array.shape[:-2] + (self.dim,))

    def apply_safety_constraints(self, action: Any, context: Mapping[str, Any] | None = None) -> np.ndarray:
        agents = self.decompose(np.array(self._check_shape(action), dtype=np.float64))
        if context:
            obstacle = _context_array(context, "obstacle_distance", np.inf)
            teammate = _context_array(context, "teammate_distance", np.inf)
            near = (obstacle < self.movement.safety_distance) | (teammate < self.min_agent_distance)
            near = np.broadcast_to(near, agents.shape[:-1])
            agents[..., :2] = _limit_speed(agents[..., :2], near, self.movement.max_velocity_near_obstacle)
        return self.compose(agents)

    def agent_discrete_actions(self) -> np.ndarray:
        """One agent's action set: each movement (stop last) with each communication level."""
        if self._table is None:
            moves = self.movement.discrete_actions()
            move_labels = self.movement.action_labels()
            levels = np.arange(self.comm_levels, dtype=np.float64)
            rows, labels = [], []
            for level in levels:
                for move, name in zip(moves, move_labels):
                    rows.append(np.concatenate([move, np.full(self.comm_dims, level)]))
                    labels.append(f"{name}, signal {int(level)}")
            # keep 'stop, silent' last, like every other table
            order = [i for i in range(len(rows)) if i != len(moves) - 1] + [len(moves) - 1]
            table = np.array([rows[i] for i in order])
            self._labels = [labels[i] for i in order]
            bounds = ActionBounds(self.bounds.low[: self.per_agent], self.bounds.high[: self.per_agent])
            if not np.all(bounds.validate(table)):
                raise ActionSpaceError("per-agent discrete actions violate the bounds")
            table.flags.writeable = False
            self._table = table
        return self._table

    def discrete_actions(self) -> np.ndarray:
        return self.agent_discrete_actions()

    def action_labels(self) -> list[str]:
        self.agent_discrete_actions()
        return list(self._labels)


# ---------------------------------------------------------------------- factory

_SAFETY_KEYS = {"max_velocity_near_obstacle", "safety_distance", "min_agent_distance"}
_BOUND_KEYS = {"velocity", "acceleration", "joint_velocity", "joint_position", "communication"}


def _pair(value: Any, key: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ActionSpaceError(f"action_bounds['{key}'] must be [low, high], got {value!r}") from None
    if not low < high:
        raise ActionSpaceError(f"action_bounds['{key}'] needs low < high, got {value!r}")
    return low, high


_SPACE_ALIASES: dict[str, TaskType] = {
    "cooperative": TaskType.MULTI_AGENT,  # the spec's CooperativeActionSpace
    "multi-agent": TaskType.MULTI_AGENT,  # the spec's "Multi-Agent Tasks"
    "multiagent": TaskType.MULTI_AGENT,
}
"""Other names the spec gives an action space, besides each TaskType's value and name."""


def _space_task(task_type: Any) -> TaskType:
    """The task whose action space ``task_type`` names (case-insensitive, '-' or '_')."""
    task = TaskType.parse(task_type)
    if task is not None:
        return task
    text = str(task_type).strip().lower()
    task = TaskType.parse(text.replace("-", "_")) or _SPACE_ALIASES.get(text)
    if task is None:
        valid = [t.value for t in TaskType] + list(_SPACE_ALIASES)
        raise ActionSpaceError(f"unknown task type {task_type!r}; valid: {', '.join(valid)}")
    return task


class ActionSpaceFactory:
    """Builds the action space of a task from the training configuration (the spec's keys)."""

    @staticmethod
    def create_action_space(
        task_type: Any = "navigation", num_agents: int = 1, *, config: Any = None, **options: Any
    ) -> ActionSpace:
        """The action space of ``task_type``: a TaskType or its name; the multi-agent space is
        also ``"cooperative"`` (or ``"multi-agent"``), as the spec calls it.

        ``num_agents`` > 1 asks for a team: ``"navigation"`` with ``num_agents=2`` is the spec's
        own configuration example (a team navigating together, with ``min_agent_distance``), so
        it gives the CooperativeActionSpace of that many agents, as ``"cooperative"`` does.
        Exploration and manipulation have no team form: ``num_agents`` > 1 is an error there.
        ``"cooperative"`` with ``num_agents=1`` gives the multi-agent task's team
        (``tasks.multi_agent.num_agents``).

        ``options`` (the spec's configuration keys): ``action_bounds`` ({velocity, acceleration,
        joint_velocity, joint_position, communication: [low, high]}), ``safety_constraints``
        ({max_velocity_near_obstacle, safety_distance, min_agent_distance}), ``tool`` (bool),
        ``seed``. Unset values come from ``config``: a resolved :class:`agent.config.Config` or
        its ``tasks`` section (None: params.yaml's)."""
        from agent.config import Config
        from agent.tasks.params import TasksSection, task_settings

        task = _space_task(task_type)
        if not isinstance(num_agents, int) or num_agents < 1:
            raise ActionSpaceError(f"num_agents must be a positive integer, got {num_agents!r}")
        if num_agents > 1 and task in (TaskType.EXPLORATION, TaskType.MANIPULATION):
            raise ActionSpaceError(
                f"{task.value} has no multi-agent action space (num_agents={num_agents}): "
                "ask for task_type='cooperative' for a team"
            )
        unknown = set(options) - {"action_bounds", "safety_constraints", "tool", "seed"}
        if unknown:
            raise ActionSpaceError(f"unknown action-space settings {sorted(unknown)}")
        bounds = dict(options.get("action_bounds") or {})
        safety = dict(options.get("safety_constraints") or {})
        for name, allowed, given in (("action_bounds", _BOUND_KEYS, bounds), ("safety_constraints", _SAFETY_KEYS, safety)):
            if set(given) - allowed:
                raise ActionSpaceError(f"unknown {name} keys {sorted(set(given) - allowed)}; known: {sorted(allowed)}")
        if config is None or isinstance(config, Config):
            settings = task_settings(config)
        elif isinstance(config, TasksSection):
            settings = config
        else:
            raise ActionSpaceError(f"config must be a Config or its tasks section, got {type(config).__name__}")
        velocity = _pair(bounds.get("velocity", (-1.0, 1.0)), "velocity")
        near_speed = float(safety.get("max_velocity_near_obstacle", settings.max_velocity_near_obstacle))
        safety_distance = float(safety.get("safety_distance", settings.safety_distance))
        seed = options.get("seed")
        if task is TaskType.MANIPULATION:
            manip = settings.manipulation
            joint_velocity = _pair(bounds.get("joint_velocity", (-manip.joint_velocity_limit, manip.joint_velocity_limit)), "joint_velocity")
            joints = _pair(bounds.get("joint_position", (-manip.joint_limit, manip.joint_limit)), "joint_position")
            # joint 0 turns the arm about the vertical axis (+-pi); the others pitch (config)
            return ManipulationActionSpace(
                velocity_limit=min(-joint_velocity[0], joint_velocity[1]),
                joint_limits=(np.r_[-np.pi, [joints[0]] * 6], np.r_[np.pi, [joints[1]] * 6]),
                gripper=bool(options.get("tool", False)),
                seed=seed,
            )
        if task is TaskType.MULTI_AGENT or num_agents > 1:  # a team (see the docstring)
            agents = num_agents if num_agents > 1 else settings.multi_agent.num_agents
            communication = _pair(bounds.get("communication", (0, settings.multi_agent.comm_levels - 1)), "communication")
            if communication[0] != 0 or communication[1] != round(communication[1]):
                raise ActionSpaceError(f"communication bounds must be [0, levels - 1], got {communication}")
            return CooperativeActionSpace(
                agents,
                velocity,
                comm_levels=int(communication[1]) + 1,
                max_velocity_near_obstacle=near_speed,
                safety_distance=safety_distance,
                min_agent_distance=float(safety.get("min_agent_distance", settings.min_agent_distance)),
                seed=seed,
            )
        acceleration = _pair(bounds["acceleration"], "acceleration") if "acceleration" in bounds else None
        return NavigationActionSpace(
            velocity,
            max_velocity_near_obstacle=near_speed,
            safety_distance=safety_distance,
            acceleration_bounds=acceleration,
            tool=bool(options.get("tool", task is TaskType.EXPLORATION)),
            seed=seed,
        )
