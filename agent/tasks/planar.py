"""Discs moving on the workspace floor among cylindrical obstacles: the planar tasks' physics.

Positions are complex numbers (x + iy, metres, origin at a workspace corner): one numpy call
then moves, measures or rotates both coordinates at once, which roughly halves the calls per
step. Arrays are [copies, bodies] (bodies = 1 for a single agent); obstacles are
[copies, 1, obstacles], so the two broadcast.

The z extent of the workspace is the obstacles' height: they are full-height cylinders and the
agents move in the plane, so z does not enter the planar tasks.

One step moves each body by its action's displacement (velocity x dt): the safety constraint of
the action space is precomputed per discrete action (the near-obstacle variant of the table),
so applying it is a lookup. A move that would leave the walls or enter an obstacle is a
collision: the body stays where it was. Collisions are checked at the end of the move; with
displacements of at most 0.5 m and obstacles at least 0.9 m across (body included) a move
cannot jump over an obstacle, though it may cut a sliver of its edge.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.tasks.base import BatchTaskEnv

FAR = 1.0e6  # where unused obstacle slots live: never near, never hit, never seen
CANDIDATES = 16  # candidate points drawn per placed point (first free one wins)


def nearest_obstacle(
    points: np.ndarray, centres: np.ndarray, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Clearance to the nearest obstacle surface and the vector to its centre, per point.

    ``points`` [C, K] complex, ``centres``/``radii`` [C, 1, M]; returns ([C, K], [C, K]).
    """
    rel = centres - points[..., None]
    surface = norm(rel)
    surface -= radii
    nearest = surface.argmin(axis=-1).reshape(-1)
    rows = row_indices(nearest.size)
    width = surface.shape[-1]
    clearance = surface.reshape(-1, width)[rows, nearest].reshape(points.shape)
    vector = rel.reshape(-1, width)[rows, nearest].reshape(points.shape)
    return clearance, vector


def norm(z: np.ndarray) -> np.ndarray:
    """|z| of complex vectors as hypot(x, y): the compiled kernels compute it the same way,
    so both step implementations agree to the bit (numpy's complex abs rounds differently)."""
    return np.hypot(z.real, z.imag)


_ARANGES: dict[int, np.ndarray] = {}


def row_indices(n: int) -> np.ndarray:
    """A cached ``np.arange(n)``: row indices for gathers, without an allocation per step."""
    rows = _ARANGES.get(n)
    if rows is None:
        rows = _ARANGES[n] = np.arange(n)
        rows.flags.writeable = False
    return rows


class PlanarTaskEnv(BatchTaskEnv):
    """Shared state and physics of the planar tasks; subclasses add goals, coverage or teams."""

    state_arrays: tuple[str, ...] = (
        "_pos", "_centres", "_radii", "_clear", "_near_vec", "_last_disp", "_jerk", "_blocked"
    )
    episode_arrays: tuple[str, ...] = ("_last_disp", "_jerk", "_blocked")

    def __init__(self, num_envs: int, **kwargs: Any) -> None:
        super().__init__(num_envs, **kwargs)
        settings = self.settings
        width, depth, _ = self.params.workspace_size
        self.size = np.array([width, depth])
        self.diagonal = float(np.hypot(width, depth))
        body = settings.agent_radius
        if min(width, depth) <= 4 * body:
            raise ValueError(f"workspace {self.params.workspace_size} is too small for agents of radius {body}")
        self._centre_xy = self.size / 2.0
        self._half_inner = self.size / 2.0 - body
        n_obstacles = max(self.params.num_obstacles, 1)
        copies, bodies = self.copies, self.agents
        self._pos = np.zeros((copies, bodies), dtype=np.complex128)
        self._centres = np.full((copies, 1, n_obstacles), FAR, dtype=np.complex128)
        self._radii = np.zeros((copies, 1, n_obstacles))  # sensed radius + body radius
        self._clear = np.full((copies, bodies), FAR)
        self._near_vec = np.full((copies, bodies), FAR, dtype=np.complex128)
        self._last_disp = np.zeros((copies, bodies), dtype=np.complex128)
        self._jerk = np.zeros((copies, bodies))
        self._blocked = np.zeros((copies, bodies))  # 1 where the last move collided

        velocity, near_velocity = self._velocity_tables()
        disp = (velocity[:, 0] + 1j * velocity[:, 1]) * self.dt
        disp_near = (near_velocity[:, 0] + 1j * near_velocity[:, 1]) * self.dt
        # One table for both cases: row index + near x n picks the safety-limited displacement.
        self._disp = np.concatenate([disp, disp_near])
        self._limited = np.concatenate([np.zeros(len(disp), dtype=bool), disp_near != disp])
        self._n_table = np.uint64(len(disp))
        self._stop = np.uint64(len(disp) - 1)
        self._centre_c = complex(width / 2.0, depth / 2.0)
        self._pos_scale = 2.0 / self.size
        self._inv_size = 1.0 / self.size
        self.max_speed = float(np.abs(velocity[:, 0] + 1j * velocity[:, 1]).max()) or 1.0
        self._inv_step = 1.0 / (self.max_speed * self.dt)
        self._safety = settings.safety_distance
        self._inv_range = 1.0 / settings.sensor_range
        self._vision = self.params.vision_required and settings.range_sensors > 0
        if not self._vision:
            # Blind rays sense nothing: they read 1 (nothing within range), not 0 (an obstacle
            # touching on every side), so that a policy trained with vision still makes sense of
            # a stage without it.
            self._obs[:, self.layout.slices["ranges"]] = 1.0
        else:
            # The flag the layout documents (it was never set). Greedy BEGINNER success after a
            # navigation curriculum: 0.28-0.64 over 3 seeds without it, 0.66-0.80 with it and
            # blind rays at 0, 0.68-0.93 with blind rays at 1 (benchmarks/results/learning_curves.md).
            self._obs[:, self.layout.slices["vision"]] = 1.0
        rays = np.exp(2j * np.pi * np.arange(settings.range_sensors) / max(settings.range_sensors, 1))
        self._ray_conj = np.conj(rays)[:, None]
        self._ray_wall = np.stack(
            [np.where(rays.real > 1e-9, width, np.where(rays.real < -1e-9, 0.0, FAR)),
             np.where(rays.imag > 1e-9, depth, np.where(rays.imag < -1e-9, 0.0, FAR))]
        )
        self._ray_inv = np.stack(
            [np.where(np.abs(rays.real) > 1e-9, 1.0 / np.where(rays.real == 0, 1, rays.real), 1.0),
             np.where(np.abs(rays.imag) > 1e-9, 1.0 / np.where(rays.imag == 0, 1, rays.imag), 1.0)]
        )

    # ------------------------------------------------------------------ subclass hooks

    def _velocity_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(velocity [n, 2], velocity under the near-obstacle constraint [n, 2]) per action."""
        raise NotImplementedError

    # ------------------------------------------------------------------ step

    def _lookup(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Discrete indices, and which were out of range (those become 'stop', the last action)."""
        raw = actions.view(np.uint64)  # negative indices become huge: one comparison finds both
        invalid = raw >= self._n_table
        return np.minimum(raw, self._stop), invalid

    def _move(self, index: np.ndarray, near: np.ndarray) -> tuple[np.ndarray, ...]:
        """Move every body by its action ([copies, bodies] indices); ``near`` selects the
        safety-limited table. Returns the intended new positions, which actions were clipped,
        which moves collide, and the new positions' clearance and nearest-obstacle vector;
        :meth:`_settle` then accepts the moves (a subclass may add collisions in between)."""
        row = index + near * self._n_table
        disp = self._disp[row]
        clipped = self._limited[row]
        new = self._pos + disp
        xy = new.view(np.float64).reshape(new.shape + (2,))
        outside = np.abs(xy - self._centre_xy) > self._half_inner
        wall = outside[..., 0] | outside[..., 1]
        clearance, vector = nearest_obstacle(new, self._centres, self._radii)
        hit = wall | (clearance < 0.0)
        self._jerk += norm(disp - self._last_disp)
        self._last_disp = disp
        return new, clipped, hit, clearance, vector

    def _settle(self, new: np.ndarray, hit: np.ndarray, clearance: np.ndarray, vector: np.ndarray) -> None:
        """Accept the moves that did not collide."""
        self._blocked = hit.astype(np.float64)
        self._pos = np.where(hit, self._pos, new)
        self._clear = np.where(hit, self._clear, clearance)
        self._near_vec = np.where(hit, self._near_vec, vector)

    def _episode_smoothness(self) -> np.ndarray:
        # each step's change of displacement is at most 2 x top speed x dt: the mean stays in [0, 1]
        steps = np.maximum(self._t, 1)[:, None] * (2.0 * self.max_speed * self.dt)
        return (1.0 - self._jerk / steps).reshape(-1)

    # ------------------------------------------------------------------ sensing

    def _sense(self, copies: np.ndarray) -> None:
        """Clearance and nearest obstacle of the bodies of ``copies`` (after they were placed)."""
        clearance, vector = nearest_obstacle(self._pos[copies], self._centres[copies], self._radii[copies])
        self._clear[copies] = clearance
        self._near_vec[copies] = vector

    def _ranges(self) -> np.ndarray:
        """Range-sensor readings [copies, bodies, rays] in [0, 1] (1 = nothing within range)."""
        body = self.settings.agent_radius
        # obstacles first ([M, C, K, R]): reducing over a leading axis is an elementwise minimum,
        # many times faster in numpy than a reduction over a short trailing axis
        rel = np.moveaxis(self._centres - self._pos[..., None], -1, 0)[..., None]
        proj = (rel * self._ray_conj[:, 0]).real
        perp2 = (rel.real**2 + rel.imag**2) - proj * proj
        radius = np.moveaxis(self._radii - body, -1, 0)[..., None]
        disc = radius * radius - perp2
        hit = (disc > 0.0) & (proj > 0.0)
        distance = np.minimum.reduce(np.where(hit, proj - np.sqrt(np.abs(disc)), np.inf), axis=0)
        x, y = self._pos.real[..., None], self._pos.imag[..., None]
        wall_x = (self._ray_wall[0] - x) * self._ray_inv[0]
        wall_y = (self._ray_wall[1] - y) * self._ray_inv[1]
        nearest = np.minimum(np.minimum(distance, wall_x), np.minimum(wall_y, self.settings.sensor_range))
        return np.clip(nearest * self._inv_range, 0.0, 1.0)

    def _write_common(self, obs: np.ndarray, slices: dict[str, slice]) -> None:
        """Slots every planar task has: position, velocity, nearest obstacle, time, ranges."""
        rows = self.num_envs
        centred = (self._pos - self._centre_c).reshape(rows).view(np.float64).reshape(rows, 2)
        np.multiply(centred, self._pos_scale, out=obs[:, slices["position"]])
        last = self._last_disp.reshape(rows).view(np.float64).reshape(rows, 2)
        np.multiply(last, self._inv_step, out=obs[:, slices["velocity"]])
        obs[:, slices["collided"].start] = self._blocked.reshape(rows)
        proximity = np.maximum(1.0 - self._clear * self._inv_range, 0.0)
        pointer = self._near_vec * (proximity / np.maximum(norm(self._near_vec), 1e-9))
        obs[:, slices["obstacle"]] = pointer.reshape(rows).view(np.float64).reshape(rows, 2)
        obs[:, slices["time_left"].start] = self._rows(self._t) * (-1.0 / self.max_steps) + 1.0
        if self._vision:
            obs[:, slices["ranges"]] = self._ranges().reshape(rows, -1)

    def _write_vectors(self, obs: np.ndarray, where: slice, vectors: np.ndarray) -> None:
        """Complex vectors (one or more per row) into obs slots as x, y / workspace size."""
        rows = self.num_envs
        flat = np.ascontiguousarray(vectors).reshape(rows, -1).view(np.float64).reshape(rows, -1, 2)
        np.multiply(flat, self._inv_size, out=obs[:, where].reshape(rows, -1, 2))

    @staticmethod
    def common_slots(range_sensors: int) -> list[tuple[str, int, float, float]]:
        return [
            ("position", 2, -1.0, 1.0),
            ("velocity", 2, -1.0, 1.0),
            ("collided", 1, 0.0, 1.0),
            ("obstacle", 2, -1.0, 1.0),
            ("time_left", 1, 0.0, 1.0),
            ("ranges", range_sensors, 0.0, 1.0),
            ("vision", 1, 0.0, 1.0),
        ]

    # ------------------------------------------------------------------ layouts

    def _obstacles(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Obstacles [R, slots] from uniforms ``u`` [R, 3 * slots]: centre x, y and radius
        (the body radius included); unused slots are parked far away."""
        slots = self._centres.shape[-1]
        u = u.reshape(len(u), slots, 3)
        low, high = self.settings.obstacle_radius
        centres = u[..., 0] * self.size[0] + 1j * u[..., 1] * self.size[1]
        radii = low + u[..., 2] * (high - low) + self.settings.agent_radius
        active = np.arange(slots) < self.params.num_obstacles
        return np.where(active, centres, FAR), np.where(active, radii, 0.0)

    def _candidates(self, u: np.ndarray) -> np.ndarray:
        """Points inside the walls (bodies fit) from uniform pairs in the last axis."""
        body = self.settings.agent_radius
        x = body + u[..., 0::2] * (self.size[0] - 2 * body)
        y = body + u[..., 1::2] * (self.size[1] - 2 * body)
        return x + 1j * y

    @staticmethod
    def _free(centres: np.ndarray, radii: np.ndarray, points: np.ndarray, margin: float) -> np.ndarray:
        """Which points [R, ...] have ``margin`` of clearance from every obstacle [R, M] of their row."""
        shape = (len(points),) + (1,) * (points.ndim - 1) + (-1,)
        gaps = np.abs(centres.reshape(shape) - points[..., None]) - radii.reshape(shape)
        return gaps.min(axis=-1) >= margin

    def _inside(self, points: np.ndarray) -> np.ndarray:
        """Which body positions are inside the walls."""
        dx = np.abs(points.real - self._centre_xy[0]) <= self._half_inner[0] + 1e-9
        return dx & (np.abs(points.imag - self._centre_xy[1]) <= self._half_inner[1] + 1e-9)

    @staticmethod
    def _clear_around(
        centres: np.ndarray, radii: np.ndarray, points: np.ndarray, margin: float, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Park the obstacles crowding ``points`` [R, P] of the flagged rows: the rare layout with
        no free candidate still yields a playable episode."""
        gaps = np.abs(centres[:, None, :] - points[..., None]) - radii[:, None, :]
        crowded = (gaps < margin).any(axis=1) & rows[:, None]
        return np.where(crowded, FAR, centres), np.where(crowded, 0.0, radii)

    def _begin_planar(self, copies: np.ndarray, layout: dict[str, np.ndarray], positions: np.ndarray) -> None:
        """Place the obstacles and bodies of a layout, and sense from there."""
        self._centres[copies, 0] = layout["centres"]
        self._radii[copies, 0] = layout["radii"]
        self._pos[copies] = positions
        self._sense(copies)

    @staticmethod
    def first_free(candidates: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first free candidate along the last axis (else the first one), and whether found."""
        lead = candidates.shape[:-1]
        flat_free = free.reshape(-1, free.shape[-1])
        choice = flat_free.argmax(axis=1)
        rows = row_indices(len(choice))
        chosen = candidates.reshape(flat_free.shape)[rows, choice].reshape(lead)
        return chosen, flat_free[rows, choice].reshape(lead)
