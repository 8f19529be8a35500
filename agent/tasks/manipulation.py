"""Manipulation: a 7-joint arm reaches targets under joint and velocity limits; tool use later.

The arm stands at the centre of the workspace floor: joint 0 turns it about the vertical axis
(limits +-pi), joints 1-6 pitch its six links in the vertical plane (limits +-joint_limit). Its
reach is ``reach_fraction`` x half the smaller horizontal side. Obstacles are spheres (radius
``obstacle_radius`` x reach); a move that brings a joint into an obstacle or under the floor is a
collision and does not happen. Every command passes the ManipulationActionSpace: a joint command
that would pass its limit within the step is invalid and is slowed to stop at the limit.

With tools (ADVANCED on) a tool lies somewhere within reach: the arm must grasp it (the gripper
action, with the effector within ``grasp_radius``) and bring it to the target. Without tools the
grasp action is invalid and becomes 'stop'.

Observation (38 floats):
  joints (7)           angles / their limits
  joint_velocity (7)   last executed joint velocities / velocity limit
  collided (1)         1 when the last move was blocked
  effector (3)         (effector - arm base) / reach
  target (3), target_distance (1)   (target - effector) / reach; its length
  tool (3), holding (1), tools (1)  (tool - effector) / reach until grasped; flags
  obstacle (3)         unit vector to the nearest obstacle from the effector x proximity
  obstacles_seen (6)   the same from the elbow (joint 3) and wrist (joint 5), with vision only
  vision (1), time_left (1)
Actions (16): joint j +limit, joint j -limit for j = 0..6, grasp, stop.
Reward: base = progress along the remaining path (effector -> tool -> target while the tool is
not held; effector -> target otherwise) / its length at the start; time, collision, completion,
efficiency (smoothness of joint commands) as everywhere.
Extra episode metrics: final_distance (/ reach), grasped, grasp_attempts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.tasks.base import BatchTaskEnv, ObservationLayout
from agent.tasks.spaces import ActionSpace, ActionSpaceFactory, ManipulationActionSpace
from agent.tasks.types import TaskType

_LINKS = np.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])  # fractions of the reach, shoulder first
_SHOULDER = 0.1  # shoulder height, fraction of the reach
_HOME = np.array([0.0, 0.5, -0.4, -0.3, 0.2, -0.2, 0.1])  # a pose well above the floor
_CANDIDATES = 8
_FAR = 1.0e6


class ManipulationEnv(BatchTaskEnv):
    task_type = TaskType.MANIPULATION
    extra_metrics = ("final_distance", "grasped", "grasp_attempts")
    state_arrays = (
        "_q", "_points", "_target", "_tool", "_holding", "_centres", "_potential", "_inv_p0",
        "_last_velocity", "_jerk", "_attempts", "_grasps", "_clear", "_near", "_blocked",
    )
    episode_arrays = ("_holding", "_last_velocity", "_jerk", "_attempts", "_grasps", "_blocked")

    def __init__(self, num_envs: int, **kwargs: Any) -> None:
        super().__init__(num_envs, **kwargs)
        manip = self.settings.manipulation
        width, depth, height = self.params.workspace_size
        self.reach = manip.reach_fraction * min(width, depth) / 2.0
        self.height = height
        self._base = np.array([width / 2.0, depth / 2.0, 0.0])
        self._links = _LINKS * self.reach
        self._shoulder = _SHOULDER * self.reach
        self._ball = manip.obstacle_radius * self.reach
        self._target_radius = manip.target_radius * self.reach
        self._grasp_radius = manip.grasp_radius * self.reach
        self._tools = self.params.tool_use_enabled
        space: ManipulationActionSpace = self.model  # type: ignore[assignment]
        self._joints = space.num_joints
        self._table = space.discrete_actions()
        self._n_table = np.uint64(len(self._table))
        self._stop = np.uint64(len(self._table) - 1)
        self._limit_high = space.joint_limits.high
        self._vmax = space.velocity_limit
        n, m = self.copies, max(self.params.num_obstacles, 1)
        self._q = np.zeros((n, self._joints))
        self._points = np.zeros((n, len(_LINKS), 3))
        self._target = np.zeros((n, 3))
        self._tool = np.zeros((n, 3))
        self._holding = np.zeros(n)
        self._centres = np.full((n, m, 3), _FAR)
        self._potential = np.zeros(n)
        self._inv_p0 = np.ones(n)
        self._last_velocity = np.zeros((n, self._joints))
        self._jerk = np.zeros(n)
        self._attempts = np.zeros(n)
        self._grasps = np.zeros(n)
        self._clear = np.zeros((n, len(_LINKS)))
        self._near = np.zeros((n, len(_LINKS), 3))
        self._blocked = np.zeros(n)
        self._sense_range = 0.5 * self.reach
        slots = self.layout.slices
        if self.params.vision_required:
            self._obs[:, slots["vision"]] = 1.0
        if self._tools:
            self._obs[:, slots["tools"]] = 1.0

    def _build_action_space(self) -> ActionSpace:
        return ActionSpaceFactory.create_action_space(TaskType.MANIPULATION, tool=True, config=self.settings)

    def _build_layout(self) -> ObservationLayout:
        return ObservationLayout(
            [
                ("joints", 7, -1.0, 1.0),
                ("joint_velocity", 7, -1.0, 1.0),
                ("collided", 1, 0.0, 1.0),
                ("effector", 3, -1.5, 1.5),
                ("target", 3, -3.0, 3.0),
                ("target_distance", 1, 0.0, 3.0),
                ("tool", 3, -3.0, 3.0),
                ("holding", 1, 0.0, 1.0),
                ("tools", 1, 0.0, 1.0),
                ("obstacle", 3, -1.0, 1.0),
                ("obstacles_seen", 6, -1.0, 1.0),
                ("vision", 1, 0.0, 1.0),
                ("time_left", 1, 0.0, 1.0),
            ]
        )

    # ------------------------------------------------------------------ kinematics

    def forward(self, q: np.ndarray) -> np.ndarray:
        """Positions [..., 6, 3] of joints 2..7 (the last is the effector) for angles [..., 7]."""
        pitch = np.cumsum(q[..., 1:], axis=-1)
        radial = np.cumsum(self._links * np.cos(pitch), axis=-1)
        height = self._shoulder + np.cumsum(self._links * np.sin(pitch), axis=-1)
        yaw = q[..., :1]
        return np.stack(
            [self._base[0] + radial * np.cos(yaw), self._base[1] + radial * np.sin(yaw), height], axis=-1
        )

    def _obstacle_gaps(self, points: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """Clearance [..., P, M] between joint points [..., P, 3] and obstacles [..., M, 3]."""
        offset = points[..., :, None, :] - centres[..., None, :, :]
        return np.sqrt((offset * offset).sum(axis=-1)) - self._ball

    def _collides(self, points: np.ndarray, centres: np.ndarray) -> np.ndarray:
        under = (points[..., 2] < 0.0).any(axis=-1)
        return under | (self._obstacle_gaps(points, centres).min(axis=(-1, -2)) < 0.0)

    def _path_length(self, copies: np.ndarray | slice) -> np.ndarray:
        """What is left to do: effector -> (tool ->) target, in metres."""
        effector = self._points[copies, -1]
        direct = np.linalg.norm(self._target[copies] - effector, axis=-1)
        if not self._tools:
            return direct
        via_tool = np.linalg.norm(self._tool[copies] - effector, axis=-1) + np.linalg.norm(
            self._target[copies] - self._tool[copies], axis=-1
        )
        return np.where(self._holding[copies] > 0.5, direct, via_tool)

    # ------------------------------------------------------------------ episodes

    def _random_poses(self, u: np.ndarray) -> np.ndarray:
        """Poses [..., 7] from uniforms [..., 7]: any yaw, pitches within 60% of their limits."""
        q = (2.0 * u - 1.0) * self._limit_high * 0.6
        q[..., 0] = (2.0 * u[..., 0] - 1.0) * np.pi
        return q

    def _draws(self) -> int:
        return 7 + 2 * 7 * _CANDIDATES + 3 * self._centres.shape[1]

    def _layout(self, copies: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        count, m = len(copies), self._centres.shape[1]
        start = _HOME + np.concatenate([np.zeros((count, 1)), 0.4 * u[:, 1:7] - 0.2], axis=1)
        start[:, 0] = (2.0 * u[:, 0] - 1.0) * np.pi
        start_points = self.forward(start)
        effector = start_points[:, -1]
        poses = self._random_poses(u[:, 7 : 7 + 14 * _CANDIDATES].reshape(count, 2, _CANDIDATES, 7))
        points = self.forward(poses)  # [R, 2, C, 6, 3]: candidates for the target and the tool
        ends = points[..., -1, :]
        fits = (points[..., 2] > 0.05 * self.reach).all(axis=-1) & (ends[..., 2] < self.height - 0.05 * self.reach)
        far = np.linalg.norm(ends - effector[:, None, None], axis=-1) > 0.3 * self.reach
        goals = np.argmax(fits & far, axis=-1)  # first suitable candidate (else the first)
        rows = np.arange(count)
        target, tool = ends[rows, 0, goals[:, 0]], ends[rows, 1, goals[:, 1]]
        shell = u[:, 7 + 14 * _CANDIDATES :].reshape(count, m, 3)
        radius = self.reach * (0.3 + 0.7 * shell[..., 0])
        angle = 2.0 * np.pi * shell[..., 1]
        centres = np.stack(
            [self._base[0] + radius * np.cos(angle), self._base[1] + radius * np.sin(angle),
             self.reach * (0.1 + 0.8 * shell[..., 2])], axis=-1
        )
        # obstacles stay clear of the start pose, the target and the tool: every episode is playable
        keep = np.broadcast_to(np.arange(m) < self.params.num_obstacles, (count, m)).copy()
        margin = self._target_radius + 0.05 * self.reach
        keep &= self._obstacle_gaps(start_points, centres).min(axis=1) > 0.05 * self.reach
        keep &= np.linalg.norm(centres - target[:, None], axis=-1) - self._ball > margin
        if self._tools:
            keep &= np.linalg.norm(centres - tool[:, None], axis=-1) - self._ball > margin
        return {
            "centres": np.where(keep[..., None], centres, _FAR), "start": start,
            "points": start_points, "target": target, "tool": tool,
        }

    def _begin(self, copies: np.ndarray, layout: dict[str, np.ndarray]) -> None:
        self._centres[copies] = layout["centres"]
        self._q[copies] = layout["start"]
        self._points[copies] = layout["points"]
        self._target[copies] = layout["target"]
        self._tool[copies] = layout["tool"]
        length = self._path_length(copies)
        self._potential[copies] = length
        self._inv_p0[copies] = 1.0 / np.maximum(length, 1e-6)
        self._sense(copies)

    def _sense(self, copies: np.ndarray | slice) -> None:
        gaps = self._obstacle_gaps(self._points[copies], self._centres[copies])  # [R, 6, M]
        nearest = gaps.argmin(axis=-1)
        self._clear[copies] = np.take_along_axis(gaps, nearest[..., None], -1)[..., 0]
        centres = np.take_along_axis(self._centres[copies][:, None], nearest[..., None, None], 2)[:, :, 0]
        self._near[copies] = centres - self._points[copies]

    # ------------------------------------------------------------------ step

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = actions.view(np.uint64)
        out_of_range = raw >= self._n_table
        command = self._table[np.minimum(raw, self._stop)]
        context = {"joint_positions": self._q, "dt": self.dt, "tools_enabled": self._tools}
        invalid = out_of_range | ~np.asarray(self.model.validate_action(command, context))
        safe = self.model.apply_safety_constraints(command, context)
        clipped = invalid | (safe != command).any(axis=1)
        velocity = safe[:, : self._joints]
        q_new = self._q + velocity * self.dt
        points = self.forward(q_new)
        hit = self._collides(points, self._centres)
        self._blocked = hit.astype(np.float64)
        self._q = np.where(hit[:, None], self._q, q_new)
        self._points = np.where(hit[:, None, None], self._points, points)
        self._jerk += np.abs(velocity - self._last_velocity).sum(axis=1)
        self._last_velocity = velocity
        grasp = safe[:, self._joints] > 0.5
        effector = self._points[:, -1]
        if self._tools:
            self._attempts += grasp
            caught = grasp & (self._holding < 0.5) & (np.linalg.norm(self._tool - effector, axis=1) < self._grasp_radius)
            self._grasps += caught
            self._holding = np.maximum(self._holding, caught)
            self._tool = np.where(self._holding[:, None] > 0.5, effector, self._tool)
        potential = self._path_length(slice(None))
        events = self.events
        np.multiply(self._potential - potential, self._inv_p0, out=events["progress"])
        self._potential = potential
        reached = np.linalg.norm(self._target - effector, axis=1) < self._target_radius
        if self._tools:
            reached &= self._holding > 0.5
        events["success"][:] = reached
        events["collisions"][:] = hit
        self._episode_collisions += hit
        self._sense(slice(None))
        return invalid, clipped

    def _observe(self) -> None:
        obs, slots = self._obs, self.layout.slices
        inv_reach = 1.0 / self.reach
        effector = self._points[:, -1]
        obs[:, slots["joints"]] = self._q / self._limit_high
        obs[:, slots["joint_velocity"]] = self._last_velocity * (1.0 / self._vmax)
        obs[:, slots["collided"].start] = self._blocked
        obs[:, slots["effector"]] = (effector - self._base) * inv_reach
        to_target = (self._target - effector) * inv_reach
        obs[:, slots["target"]] = to_target
        obs[:, slots["target_distance"].start] = np.linalg.norm(to_target, axis=1)
        if self._tools:
            obs[:, slots["tool"]] = (self._tool - effector) * inv_reach * (self._holding < 0.5)[:, None]
            obs[:, slots["holding"].start] = self._holding
        proximity = np.maximum(1.0 - self._clear / self._sense_range, 0.0)
        pointers = self._near * (proximity / np.maximum(np.linalg.norm(self._near, axis=-1), 1e-9))[..., None]
        obs[:, slots["obstacle"]] = pointers[:, -1]
        if self.params.vision_required:
            obs[:, slots["obstacles_seen"]] = pointers[:, [2, 4]].reshape(-1, 6)
        obs[:, slots["time_left"].start] = 1.0 - self._t * (1.0 / self.max_steps)

    def _episode_smoothness(self) -> np.ndarray:
        # one joint at a time: a step changes the command by at most 2 x the velocity limit
        return 1.0 - self._jerk / (np.maximum(self._t, 1) * 2.0 * self._vmax)

    def _episode_metrics(self, copies: np.ndarray) -> dict[str, np.ndarray]:
        attempts = self._attempts[copies]
        effector = self._points[copies, -1]
        return {
            "final_distance": np.linalg.norm(self._target[copies] - effector, axis=1) / self.reach,
            "grasped": self._holding[copies].copy(),
            "grasp_attempts": attempts.copy(),
            "tool_use_efficiency": np.where(attempts > 0, self._grasps[copies] / np.maximum(attempts, 1.0), 0.0),
        }
