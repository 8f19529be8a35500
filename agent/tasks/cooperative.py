"""Multi-agent: a team keeps a formation while moving it to a goal, and finishes jointly.

Each copy is a team of ``num_agents`` agents (rows c*K .. c*K+K-1 of the batch; one shared
network acts for all of them). The formation is a regular polygon of ``formation_radius`` around
the team centroid, agent k in slot k. The team starts in formation (with a little jitter) and
must bring every agent to its slot around the goal (within ``formation_tolerance``). Each agent
also broadcasts a communication level; the top level means 'ready'. Finishing with every agent
ready is a joint action: it earns the cooperation bonus, and from the EXPERT stage
(``cooperation_required``) the task needs it.

Observation per agent (36 floats with 3 agents):
  the planar slots (17): own position, velocity, collided, nearest obstacle, time_left, ranges,
                     vision (see navigation.py)
  agent (K)          one-hot agent index
  goal_slot (2), goal_slot_distance (1)   own slot at the goal, relative; distance / diagonal
  formation_slot (2) own slot around the current centroid, relative (formation keeping)
  teammates (2(K-1)) teammates' positions relative to self, next index first
  teammate_signals (K-1)   their last communication level / (levels - 1)
  formation_error (1)      team formation error / formation radius (capped at 1)
  team_to_goal (2)         (goal - centroid) / workspace size
  signal (1), cooperation (1)   own last level; 1 when the stage requires the joint finish
Actions (18 per agent): (8 headings, stop) x (signal levels 0, 1), 'stop, silent' last.
Speed is limited near obstacles and near teammates (``min_agent_distance``).
Reward per agent: base = progress towards its own goal slot; cooperation = improvement of the
team's formation error (/ radius) + 1 for a joint finish; collisions (obstacles, walls,
teammates) are penalised; completion and efficiency as everywhere; the team shares termination.
Extra episode metrics: agent_index, formation_error, formation_maintenance_rate, joint_action.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.tasks.base import SIGNAL_ROW, ObservationLayout
from agent.tasks.planar import CANDIDATES, PlanarTaskEnv
from agent.tasks.rewards import RewardComponent, cooperation_signal
from agent.tasks.spaces import ActionSpace, ActionSpaceFactory
from agent.tasks.types import TaskType


class CooperativeEnv(PlanarTaskEnv):
    task_type = TaskType.MULTI_AGENT
    extra_metrics = ("agent_index", "formation_error", "formation_maintenance_rate", "joint_action")
    state_arrays = PlanarTaskEnv.state_arrays + (
        "_goal", "_slot_dist", "_inv_d0", "_signal", "_error", "_error_sum", "_in_formation", "_team_formed"
    )
    episode_arrays = PlanarTaskEnv.episode_arrays + ("_signal", "_error_sum", "_in_formation", "_team_formed")

    def __init__(self, num_envs: int, **kwargs: Any) -> None:
        team = kwargs.pop("agents", None) or self._team_size(kwargs.get("config"))
        super().__init__(num_envs, agents=team, **kwargs)
        settings = self.settings.multi_agent
        k = self.agents
        self.radius = settings.formation_radius
        self.tolerance = settings.formation_tolerance
        self.levels = settings.comm_levels
        self._offsets = self.radius * np.exp(2j * np.pi * np.arange(k) / k)
        self._others = (np.arange(k)[:, None] + np.arange(1, k)[None, :]) % k  # [K, K-1]
        self._self_mask = np.where(np.eye(k, dtype=bool), np.inf, 0.0)
        self._goal = np.zeros(self.copies, dtype=np.complex128)
        self._slot_dist = np.zeros((self.copies, k))
        self._inv_d0 = np.ones((self.copies, k))
        self._signal = np.zeros((self.copies, k))
        self._error = np.zeros(self.copies)
        self._error_sum = np.zeros(self.copies)
        self._in_formation = np.zeros((self.copies, k))
        self._team_formed = np.zeros(self.copies)
        self._teammate_near = self.settings.min_agent_distance
        self._contact = 2.0 * self.settings.agent_radius
        self._min_start_distance = min(self.settings.navigation.min_goal_distance, 0.5 * float(self.size.min()))
        table = self.model.agent_discrete_actions()
        self._signal_table = table[:, 2] / (self.levels - 1)
        slots = self.layout.slices
        self._obs[:, slots["agent"]] = np.tile(np.eye(k, dtype=np.float32), (self.copies, 1))
        if self.params.cooperation_required:
            self._obs[:, slots["cooperation"]] = 1.0

    @staticmethod
    def _team_size(config: Any = None) -> int:
        from agent.tasks.params import task_settings

        return task_settings(config).multi_agent.num_agents

    def _build_action_space(self) -> ActionSpace:
        return ActionSpaceFactory.create_action_space(TaskType.MULTI_AGENT, num_agents=self.agents, config=self.settings)

    def _velocity_tables(self) -> tuple[np.ndarray, np.ndarray]:
        table = self.model.agent_discrete_actions()
        movement = self.model.movement
        near = movement.apply_safety_constraints(table[:, :2], {"obstacle_distance": 0.0})
        return table[:, :2], near

    def _n_actions(self) -> int:
        return int(self.model.agent_discrete_actions().shape[0])

    def _build_layout(self) -> ObservationLayout:
        k = self.agents
        return ObservationLayout(
            self.common_slots(self.settings.range_sensors)
            + [
                ("agent", k, 0.0, 1.0),
                ("goal_slot", 2, -1.0, 1.0),
                ("goal_slot_distance", 1, 0.0, 1.0),
                ("formation_slot", 2, -2.0, 2.0),
                ("teammates", 2 * (k - 1), -1.0, 1.0),
                ("teammate_signals", k - 1, 0.0, 1.0),
                ("formation_error", 1, 0.0, 1.0),
                ("team_to_goal", 2, -1.0, 1.0),
                ("signal", 1, 0.0, 1.0),
                ("cooperation", 1, 0.0, 1.0),
            ]
        )

    # ------------------------------------------------------------------ episodes

    def _team_points(self, centroids: np.ndarray) -> np.ndarray:
        """Formation slots [..., K] around centroids [...]."""
        return centroids[..., None] + self._offsets

    def _formation_error(self) -> tuple[np.ndarray, np.ndarray]:
        """Per agent, distance from its slot around the current centroid; per team, the mean."""
        centroid = self._pos.mean(axis=1, keepdims=True)
        slot_error = np.abs(self._pos - centroid - self._offsets)
        return slot_error, slot_error.mean(axis=1)

    def _draws(self) -> int:
        return 3 * self._centres.shape[-1] + 4 * CANDIDATES + 2 * self.agents

    def _layout(self, copies: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        split, count, k = 3 * self._centres.shape[-1], len(copies), self.agents
        centres, radii = self._obstacles(u[:, :split])
        draws = u[:, split:]
        starts = self._candidates(draws[:, : 2 * CANDIDATES])  # team centroids [R, C]
        goals = self._candidates(draws[:, 2 * CANDIDATES : 4 * CANDIDATES])
        start_slots, goal_slots = self._team_points(starts), self._team_points(goals)
        margin = 0.1 + self.tolerance
        start_ok = (self._free(centres, radii, start_slots, margin) & self._inside(start_slots)).all(axis=-1)
        start, found = self.first_free(starts, start_ok)
        width, depth = self.size
        start = np.where(found, start, complex(width / 4, depth / 2))  # rare: a fixed spot, cleared
        centres, radii = self._clear_around(centres, radii, self._team_points(start), margin, ~found)
        goal_ok = (self._free(centres, radii, goal_slots, 0.0) & self._inside(goal_slots)).all(axis=-1)
        goal_ok &= np.abs(goals - start[:, None]) >= self._min_start_distance
        goal, found = self.first_free(goals, goal_ok)
        goal = np.where(found, goal, complex(3 * width / 4, depth / 2))
        centres, radii = self._clear_around(centres, radii, self._team_points(goal), 0.0, ~found)
        jitter = draws[:, 4 * CANDIDATES :].reshape(count, k, 2)
        shake = 0.5 * self.tolerance * jitter[..., 0] * np.exp(2j * np.pi * jitter[..., 1])
        positions = self._team_points(start) + shake
        positions = np.where(self._inside(positions), positions, self._team_points(start))
        return {"centres": centres, "radii": radii, "positions": positions, "goal": goal}

    def _begin(self, copies: np.ndarray, layout: dict[str, np.ndarray]) -> None:
        self._begin_planar(copies, layout, layout["positions"])
        self._goal[copies] = layout["goal"]
        distance = np.abs(self._team_points(layout["goal"]) - layout["positions"])
        self._slot_dist[copies] = distance
        self._inv_d0[copies] = 1.0 / np.maximum(distance, 1e-6)
        self._error[copies] = self._formation_error()[1][copies]

    # ------------------------------------------------------------------ step

    def _teammate_gaps(self, positions: np.ndarray) -> np.ndarray:
        """Distance from each agent to its nearest teammate [C, K]."""
        gaps = np.abs(positions[:, :, None] - positions[:, None, :]) + self._self_mask
        return gaps.min(axis=2)

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index, invalid = self._lookup(actions)
        team_index = index.reshape(self.copies, self.agents)
        near = (self._clear < self._safety) | (self._teammate_gaps(self._pos) < self._teammate_near)
        new, clipped, hit, clearance, vector = self._move(team_index, near)
        bumped = self._teammate_gaps(new) < self._contact
        hit = hit | bumped
        self._settle(new, hit, clearance, vector)
        self._signal = self._signal_table[team_index]

        events = self.events
        slot_distance = np.abs(self._team_points(self._goal) - self._pos)
        progress = (self._slot_dist - slot_distance) * self._inv_d0
        events["progress"][:] = progress.reshape(-1)
        self._slot_dist = slot_distance
        slot_error, error = self._formation_error()
        formation_progress = (self._error - error) * (1.0 / self.radius)
        self._error = error
        self._error_sum += error
        self._in_formation += slot_error < self.tolerance
        self._team_formed += error < self.tolerance
        arrived = (slot_distance < self.tolerance).all(axis=1)
        ready = (self._signal >= 1.0).all(axis=1)
        success = arrived & ready if self.params.cooperation_required else arrived
        joint = (success & ready).astype(np.float64)
        events["formation_progress"][:] = self._rows(formation_progress)
        events["joint_finish"][:] = self._rows(joint)
        cooperation_signal(
            events["formation_progress"], events["joint_finish"],
            out=self._signals[SIGNAL_ROW[RewardComponent.COOPERATION_BONUS]],
        )
        events["success"][:] = self._rows(success)
        collided = hit.reshape(-1)
        events["collisions"][:] = collided
        self._episode_collisions += collided
        return invalid, clipped.reshape(-1) | invalid

    def _observe(self) -> None:
        obs, slots = self._obs, self.layout.slices
        rows, k = self.num_envs, self.agents
        self._write_common(obs, slots)

        goal_slots = self._team_points(self._goal)
        self._write_vectors(obs, slots["goal_slot"], goal_slots - self._pos)
        obs[:, slots["goal_slot_distance"].start] = self._slot_dist.reshape(-1) * (1.0 / self.diagonal)
        centroid = self._pos.mean(axis=1, keepdims=True)
        self._write_vectors(obs, slots["formation_slot"], centroid + self._offsets - self._pos)
        self._write_vectors(obs, slots["teammates"], self._pos[:, self._others] - self._pos[:, :, None])
        obs[:, slots["teammate_signals"]] = self._signal[:, self._others].reshape(rows, k - 1)
        obs[:, slots["formation_error"].start] = self._rows(np.minimum(self._error / self.radius, 1.0))
        self._write_vectors(obs, slots["team_to_goal"], np.repeat(self._goal[:, None] - centroid, k, axis=1))
        obs[:, slots["signal"].start] = self._signal.reshape(-1)

    def _episode_metrics(self, copies: np.ndarray) -> dict[str, np.ndarray]:
        steps = np.maximum(self._t[copies], 1).astype(np.float64)
        per_agent = self._in_formation[copies] / steps[:, None]
        ready = (self._signal[copies] >= 1.0).all(axis=1) & (self._slot_dist[copies] < self.tolerance).all(axis=1)
        team = self._rows
        return {
            "agent_index": np.tile(np.arange(self.agents, dtype=np.float64), len(copies)),
            "cooperation_score": per_agent.reshape(-1),
            "formation_error": team(self._error_sum[copies] / steps),
            "formation_maintenance_rate": team(self._team_formed[copies] / steps),
            "joint_action": team(ready.astype(np.float64)),
        }
