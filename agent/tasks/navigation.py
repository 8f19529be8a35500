"""Navigation: reach a goal in the workspace around obstacles, within the time limit.

Observation (20 floats, the same at every stage):
  position (2)       agent position, scaled to [-1, 1] by the workspace size
  velocity (2)       last commanded displacement / (top speed x dt)
  collided (1)       1 when the last move was blocked (it did not happen)
  obstacle (2)       unit vector to the nearest obstacle x proximity (1 - clearance / sensor range,
                     0 beyond it): where the nearest obstacle is and how close
  time_left (1)      1 - step / step limit
  ranges (8)         range sensors (fraction of sensor range) when ``vision_required``, else 1
                     (nothing sensed, as with nothing within range)
  vision (1)         1 when the range sensors are on
  goal (2)           (goal - position) / workspace size
  goal_distance (1)  distance to the goal / workspace diagonal
Actions (9): 8 headings at full speed (1 m/s; 0.5 m/s within 0.5 m of an obstacle), then stop.
Reward: base = progress (distance gained / start distance, so the whole way pays base_reward),
time penalty each step, collision penalty on blocked moves, completion bonus on reaching the goal
(within 0.4 m), efficiency bonus on success x smoothness. Terminates on reaching the goal.
Extra episode metric: final_distance (distance to the goal / diagonal).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.tasks import kernels
from agent.tasks.base import ObservationLayout
from agent.tasks.planar import CANDIDATES, PlanarTaskEnv, norm
from agent.tasks.spaces import ActionSpace, ActionSpaceFactory
from agent.tasks.types import TaskType


class NavigationEnv(PlanarTaskEnv):
    task_type = TaskType.NAVIGATION
    extra_metrics = ("final_distance",)
    state_arrays = PlanarTaskEnv.state_arrays + ("_goal", "_dist", "_inv_d0")

    def __init__(self, num_envs: int, **kwargs: Any) -> None:
        super().__init__(num_envs, **kwargs)
        self._goal = np.zeros(self.copies, dtype=np.complex128)
        self._dist = np.zeros(self.copies)
        self._inv_d0 = np.ones(self.copies)
        nav = self.settings.navigation
        self._goal_radius = nav.goal_radius
        self._min_goal = min(nav.min_goal_distance, 0.5 * float(self.size.min()))
        self._inv_diagonal = 1.0 / self.diagonal
        self.compiled = kernels.ENABLED  # the numba step (kernels.py), else the numpy one
        self._observed = False
        slots = self.layout.slices
        self._slots = np.array(
            [int(self._n_table)]
            + [slots[name].start for name in ("position", "velocity", "collided", "obstacle", "time_left", "goal", "goal_distance")],
            dtype=np.int64,
        )
        self._reals = np.array(
            [self._goal_radius, self._safety, *self._centre_xy, *self._half_inner, *self._pos_scale,
             self._inv_step, self._inv_range, 1.0 / self.max_steps, *self._inv_size, self._inv_diagonal]
        )

    def _build_action_space(self) -> ActionSpace:
        return ActionSpaceFactory.create_action_space(TaskType.NAVIGATION, config=self.settings)

    def _velocity_tables(self) -> tuple[np.ndarray, np.ndarray]:
        table = self.model.discrete_actions()
        near = self.model.apply_safety_constraints(table, {"obstacle_distance": 0.0})
        return table[:, :2], near[:, :2]

    def _build_layout(self) -> ObservationLayout:
        return ObservationLayout(
            self.common_slots(self.settings.range_sensors)
            + [("goal", 2, -1.0, 1.0), ("goal_distance", 1, 0.0, 1.0)]
        )

    def _draws(self) -> int:
        return 3 * self._centres.shape[-1] + 4 * CANDIDATES

    def _layout(self, copies: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        split = 3 * self._centres.shape[-1]
        centres, radii = self._obstacles(u[:, :split])
        starts = self._candidates(u[:, split : split + 2 * CANDIDATES])
        start, found = self.first_free(starts, self._free(centres, radii, starts, 0.1))
        centres, radii = self._clear_around(centres, radii, start[:, None], 0.1, ~found)
        goals = self._candidates(u[:, split + 2 * CANDIDATES :])
        far_enough = np.abs(goals - start[:, None]) >= self._min_goal
        goal, found = self.first_free(goals, self._free(centres, radii, goals, 0.0) & far_enough)
        if not found.all():  # no free goal far enough: take the farthest candidate, clear around it
            farthest = np.abs(goals - start[:, None]).argmax(axis=1)
            goal = np.where(found, goal, goals[np.arange(len(goals)), farthest])
            centres, radii = self._clear_around(centres, radii, goal[:, None], 0.0, ~found)
        return {"centres": centres, "radii": radii, "start": start, "goal": goal}

    def _begin(self, copies: np.ndarray, layout: dict[str, np.ndarray]) -> None:
        self._begin_planar(copies, layout, layout["start"][:, None])
        self._goal[copies] = layout["goal"]
        distance = norm(layout["goal"] - layout["start"])
        self._dist[copies] = distance
        self._inv_d0[copies] = 1.0 / np.maximum(distance, 1e-6)

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.compiled:
            return self._advance_numpy(actions)
        events = self.events
        flags = np.empty((2, self.copies), dtype=bool)
        kernels.navigation_step(
            actions, self._slots, self._reals, self._disp, self._limited, self._pos, self._centres,
            self._radii, self._clear, self._near_vec, self._last_disp, self._jerk, self._blocked,
            self._goal, self._dist, self._inv_d0, self._t, self._obs, events["progress"],
            events["success"], events["collisions"], self._episode_collisions, flags,
        )
        self._observed = True  # the kernel wrote the observation too
        return flags[0], flags[1]

    def _observe(self) -> None:
        if not self.compiled:
            return self._observe_numpy()
        if self._observed:
            self._observed = False
        else:
            kernels.navigation_observe(
                self._slots, self._reals, self._obs, self._pos, self._last_disp, self._blocked,
                self._clear, self._near_vec, self._t, self._goal, self._dist,
            )
        if self._vision:
            self._obs[:, self.layout.slices["ranges"]] = self._ranges().reshape(self.num_envs, -1)

    def _advance_numpy(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index, invalid = self._lookup(actions)
        new, clipped, hit, clearance, vector = self._move(index[:, None], self._clear < self._safety)
        self._settle(new, hit, clearance, vector)
        distance = norm(self._goal - self._pos[:, 0])
        progress = self.events["progress"]
        np.subtract(self._dist, distance, out=progress)
        progress *= self._inv_d0
        self._dist = distance
        self.events["success"][:] = distance < self._goal_radius
        collided = hit[:, 0]
        self.events["collisions"][:] = collided
        self._episode_collisions += collided
        return invalid, clipped[:, 0] | invalid

    def _observe_numpy(self) -> None:
        obs, slots = self._obs, self.layout.slices
        self._write_common(obs, slots)
        self._write_vectors(obs, slots["goal"], self._goal - self._pos[:, 0])
        np.multiply(self._dist, self._inv_diagonal, out=obs[:, slots["goal_distance"].start])

    def _episode_metrics(self, copies: np.ndarray) -> dict[str, np.ndarray]:
        return {"final_distance": self._dist[copies] * self._inv_diagonal}
