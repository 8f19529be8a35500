"""Exploration: cover the workspace and discover hidden resources.

The floor is a fixed grid of ``grid_cells`` x ``grid_cells`` cells whatever the workspace size,
so the coverage map has the same size at every stage. A cell is covered when the agent enters
it; a resource is found when the agent comes within ``detect_radius``, or within
``scan_radius`` of a scan (the tool, enabled at ADVANCED; before that a scan is an invalid
action and becomes 'stop'). Success: coverage >= ``coverage_target`` and every resource found.

Observation (97 floats with the defaults):
  the planar slots (17): position, velocity, collided, obstacle, time_left, ranges (vision),
                     vision (see navigation.py)
  coverage_map (64)  1 for covered cells, row-major from the (0, 0) corner
  neighbourhood (9)  the 3 x 3 cells around the agent's, row-major (off the floor counts as 1)
  frontier (2)       (centre of the nearest uncovered cell - position) / workspace size
  coverage (1), resources_found (1)  fractions
  resource (2)       unit vector x proximity to the nearest unfound resource within sensor range
                     (vision only: resources are seen, not known)
  tools (1)          1 when the scanner works
Actions (10): 8 headings at full speed, scan, stop.
Reward: base = progress of the task fraction (half coverage towards the target, half resources),
exploration bonus per new cell (a resource counts ``resource_value`` cells), time, collision,
completion and efficiency as everywhere.
Extra episode metrics: explored_area (m^2), resources_found, resource_discovery_rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.tasks.base import SIGNAL_ROW, ObservationLayout
from agent.tasks.planar import CANDIDATES, PlanarTaskEnv, row_indices
from agent.tasks.rewards import RewardComponent, exploration_signal
from agent.tasks.spaces import ActionSpace, ActionSpaceFactory
from agent.tasks.types import TaskType


class ExplorationEnv(PlanarTaskEnv):
    task_type = TaskType.EXPLORATION
    extra_metrics = ("explored_area", "resources_found", "resource_discovery_rate")
    state_arrays = PlanarTaskEnv.state_arrays + (
        "_visited", "_covered", "_resources", "_found", "_phase", "_scans", "_scan_finds"
    )
    episode_arrays = PlanarTaskEnv.episode_arrays + ("_visited", "_covered", "_found", "_scans", "_scan_finds")

    def __init__(self, num_envs: int, **kwargs: Any) -> None:
        super().__init__(num_envs, **kwargs)
        settings = self.settings.exploration
        self.grid = settings.grid_cells
        self.cells = self.grid * self.grid
        self.n_resources = settings.num_resources
        self._target = settings.coverage_target
        self._detect = settings.detect_radius
        self._scan = settings.scan_radius
        self._inv_cell = self.grid / self.size
        centres = (np.arange(self.grid) + 0.5) / self.grid
        self._around = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1])).reshape(2, 1, 9)  # columns, rows
        self._cell_centres = (centres[None, :] * self.size[0] + 1j * centres[:, None] * self.size[1]).reshape(-1)
        self._visited = np.zeros((self.copies, self.cells), dtype=np.float32)
        self._covered = np.zeros(self.copies)
        self._resources = np.zeros((self.copies, self.n_resources), dtype=np.complex128)
        self._found = np.zeros((self.copies, self.n_resources), dtype=bool)
        self._phase = np.zeros(self.copies)  # fraction of the task done: the base-reward potential
        self._scans = np.zeros(self.copies)
        self._scan_finds = np.zeros(self.copies)
        table = self.model.discrete_actions()
        tools = {"tools_enabled": self.params.tool_use_enabled}
        self._invalid_table = ~np.asarray(self.model.validate_action(table, tools))
        self._scan_table = self.model.apply_safety_constraints(table, tools)[:, 2] > 0.5
        if self.params.tool_use_enabled:
            self._obs[:, self.layout.slices["tools"]] = 1.0

    def _build_action_space(self) -> ActionSpace:
        return ActionSpaceFactory.create_action_space(TaskType.EXPLORATION, tool=True, config=self.settings)

    def _velocity_tables(self) -> tuple[np.ndarray, np.ndarray]:
        table = self.model.discrete_actions()
        near = self.model.apply_safety_constraints(table, {"obstacle_distance": 0.0})
        return table[:, :2], near[:, :2]

    def _build_layout(self) -> ObservationLayout:
        grid = self.settings.exploration.grid_cells
        return ObservationLayout(
            self.common_slots(self.settings.range_sensors)
            + [
                ("coverage_map", grid * grid, 0.0, 1.0),
                ("neighbourhood", 9, 0.0, 1.0),
                ("frontier", 2, -1.0, 1.0),
                ("coverage", 1, 0.0, 1.0),
                ("resources_found", 1, 0.0, 1.0),
                ("resource", 2, -1.0, 1.0),
                ("tools", 1, 0.0, 1.0),
            ]
        )

    def _draws(self) -> int:
        return 3 * self._centres.shape[-1] + 2 * CANDIDATES * (1 + self.n_resources)

    def _layout(self, copies: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        split, count = 3 * self._centres.shape[-1], len(copies)
        centres, radii = self._obstacles(u[:, :split])
        points = self._candidates(u[:, split:].reshape(count, 1 + self.n_resources, 2 * CANDIDATES))
        chosen, found = self.first_free(points, self._free(centres, radii, points, 0.1))
        centres, radii = self._clear_around(centres, radii, chosen, 0.1, ~found.all(axis=1))
        return {"centres": centres, "radii": radii, "start": chosen[:, 0], "resources": chosen[:, 1:]}

    def _begin(self, copies: np.ndarray, layout: dict[str, np.ndarray]) -> None:
        self._begin_planar(copies, layout, layout["start"][:, None])
        self._resources[copies] = layout["resources"]
        self._cover(copies)
        self._phase[copies] = self._task_fraction(copies)

    def _cell_xy(self, copies: np.ndarray | slice) -> np.ndarray:
        """Grid column and row [R, 2] of the agents of ``copies``."""
        xy = self._pos[copies, 0].view(np.float64).reshape(-1, 2)
        ij = (xy * self._inv_cell).astype(np.int64)
        return np.minimum(ij, self.grid - 1, out=ij)

    def _cell(self, copies: np.ndarray | slice) -> np.ndarray:
        ij = self._cell_xy(copies)
        return ij[:, 1] * self.grid + ij[:, 0]

    def _cover(self, copies: np.ndarray) -> np.ndarray:
        """Mark the cells the agents of ``copies`` stand in; how many were new."""
        cells = self._cell(copies)
        new = 1.0 - self._visited[copies, cells]
        self._visited[copies, cells] = 1.0
        self._covered[copies] += new
        return new

    def _task_fraction(self, copies: np.ndarray | slice) -> np.ndarray:
        coverage = np.minimum(self._covered[copies] / (self.cells * self._target), 1.0)
        return 0.5 * coverage + 0.5 * self._found[copies].mean(axis=1)

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index, invalid = self._lookup(actions)
        invalid |= self._invalid_table[index]
        new, clipped, hit, clearance, vector = self._move(index[:, None], self._clear < self._safety)
        self._settle(new, hit, clearance, vector)
        everyone = row_indices(self.copies)
        new_cells = self._cover(everyone)
        scanning = self._scan_table[index]
        distance = np.abs(self._resources - self._pos)
        reach = np.where(scanning, self._scan, self._detect)[:, None]
        discovered = (distance < reach) & ~self._found
        self._found |= discovered
        new_resources = discovered.sum(axis=1)
        self._scans += scanning
        self._scan_finds += np.where(scanning, new_resources, 0)
        events = self.events
        events["new_cells"][:] = new_cells
        events["new_resources"][:] = new_resources
        exploration_signal(new_cells, new_resources, self.rewards.resource_value, out=self._signals[SIGNAL_ROW[RewardComponent.EXPLORATION_BONUS]])
        phase = self._task_fraction(everyone)
        np.subtract(phase, self._phase, out=events["progress"])
        self._phase = phase
        events["success"][:] = phase >= 1.0 - 1e-9
        collided = hit[:, 0]
        events["collisions"][:] = collided
        self._episode_collisions += collided
        return invalid, clipped[:, 0] | invalid

    def _observe(self) -> None:
        obs, slots = self._obs, self.layout.slices
        self._write_common(obs, slots)
        obs[:, slots["coverage_map"]] = self._visited
        # the 3 x 3 cells around the agent (outside the floor counts as covered: nothing to find)
        ij = self._cell_xy(slice(None))
        column, row = ij[:, :1] + self._around[0], ij[:, 1:] + self._around[1]
        on_floor = (column >= 0) & (column < self.grid) & (row >= 0) & (row < self.grid)
        cells = np.clip(row, 0, self.grid - 1) * self.grid + np.clip(column, 0, self.grid - 1)
        around = np.take_along_axis(self._visited, cells, axis=1)
        obs[:, slots["neighbourhood"]] = np.where(on_floor, around, 1.0)
        # the nearest uncovered cell: following it is a simple, learnable way to cover the floor
        to_cells = self._cell_centres - self._pos
        distance = np.abs(to_cells) + self._visited * 1e6
        nearest = distance.argmin(axis=1)
        frontier = to_cells[row_indices(self.copies), nearest] * (self._visited.min(axis=1) < 1.0)
        self._write_vectors(obs, slots["frontier"], frontier)
        obs[:, slots["coverage"].start] = self._covered * (1.0 / self.cells)
        obs[:, slots["resources_found"].start] = self._found.mean(axis=1)
        if self._vision:
            rel = self._resources - self._pos
            distance = np.where(self._found, np.inf, np.abs(rel))
            nearest = distance.argmin(axis=1)
            rows = row_indices(self.copies)
            closest, vector = distance[rows, nearest], rel[rows, nearest]
            proximity = np.maximum(1.0 - closest * self._inv_range, 0.0)  # 0 when all are found
            pointer = vector * (proximity / np.maximum(np.abs(vector), 1e-9))
            obs[:, slots["resource"]] = pointer.view(np.float64).reshape(-1, 2)

    def _episode_metrics(self, copies: np.ndarray) -> dict[str, np.ndarray]:
        found = self._found[copies].sum(axis=1).astype(np.float64)
        coverage = self._covered[copies] / self.cells
        scans = self._scans[copies]
        return {
            "exploration_coverage": coverage,
            "explored_area": coverage * float(self.size.prod()),
            "resources_found": found,
            "resource_discovery_rate": found / self.n_resources,
            "tool_use_efficiency": np.where(scans > 0, self._scan_finds[copies] / np.maximum(scans, 1.0), 0.0),
        }
