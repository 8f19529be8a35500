"""Optional compiled step of the navigation task (numba), for a million env steps per second.

A numpy call on a small array costs about a microsecond here, and a navigation step needs some
80 of them, so the numpy step of 64 copies takes ~150 us. This kernel does the same arithmetic
in one compiled loop over the copies (a few us). It is used when numba is installed (and
``LAGENT_NUMBA`` is not 0); otherwise navigation.py's numpy step runs, and a test checks that
both give bit-identical trajectories. Compiling both kernels takes ~0.6 s once; numba caches
the machine code in __pycache__, and later processes load it in ~10 ms. Layouts, resets and metrics stay in numpy: they run once per
episode, not once per step.
"""

from __future__ import annotations

import os
from typing import Any

numba: Any = None
if os.environ.get("LAGENT_NUMBA", "1") != "0":
    try:  # pragma: no cover - depends on the environment
        import numba
    except ImportError:  # pragma: no cover
        numba = None
ENABLED = numba is not None


def _navigation_step(
    actions, slots, reals, disp, limited, pos, centres, radii, clear, near_vec, last_disp, jerk,
    blocked, goal, dist, inv_d0, t, obs, progress, success, collisions, episode_collisions, flags,
):  # pragma: no cover - compiled
    """One navigation step of every copy, then its observation: the loop form of
    NavigationEnv._advance_numpy followed by _observe_numpy (all slots but the range sensors).

    Few arguments on purpose: numba checks the type of every argument on each call, so the
    scalars travel in two arrays. ``slots``: table size, then the first column of position,
    velocity, collided, obstacle, time_left, goal, goal_distance. ``reals``: goal radius, safety
    distance, workspace centre x, y, inner half-size x, y, position scale x, y, 1 / step length,
    1 / sensor range, 1 / step limit, 1 / size x, y, 1 / diagonal. ``flags`` [2, copies] gets the
    invalid and clipped masks."""
    n_table = slots[0]
    goal_radius, safety, centre_x, centre_y, half_x, half_y = reals[0], reals[1], reals[2], reals[3], reals[4], reals[5]
    for c in range(actions.shape[0]):
        action = actions[c]
        bad = action < 0 or action >= n_table
        index = n_table - 1 if bad else action
        if clear[c, 0] < safety:
            index += n_table
        step = disp[index]
        flags[0, c] = bad
        flags[1, c] = limited[index] or bad
        new = pos[c, 0] + step
        wall = abs(new.real - centre_x) > half_x or abs(new.imag - centre_y) > half_y
        best = 1.0e300
        nearest = 0
        for m in range(centres.shape[2]):
            gap = abs(centres[c, 0, m] - new) - radii[c, 0, m]
            if gap < best:
                best = gap
                nearest = m
        hit = wall or best < 0.0
        jerk[c, 0] += abs(step - last_disp[c, 0])
        last_disp[c, 0] = step
        blocked[c, 0] = 1.0 if hit else 0.0
        if not hit:
            pos[c, 0] = new
            clear[c, 0] = best
            near_vec[c, 0] = centres[c, 0, nearest] - new
        distance = abs(goal[c] - pos[c, 0])
        progress[c] = (dist[c] - distance) * inv_d0[c]
        dist[c] = distance
        success[c] = 1.0 if distance < goal_radius else 0.0
        collisions[c] = 1.0 if hit else 0.0
        episode_collisions[c] += 1 if hit else 0
        _observe_copy(c, slots, reals, obs, pos, last_disp, blocked, clear, near_vec, t, goal, dist)


def _navigation_observe(slots, reals, obs, pos, last_disp, blocked, clear, near_vec, t, goal, dist):  # pragma: no cover
    """The observation of every copy (after a reset), as the step writes it."""
    for c in range(obs.shape[0]):
        _observe_copy(c, slots, reals, obs, pos, last_disp, blocked, clear, near_vec, t, goal, dist)


def _observe_copy(c, slots, reals, obs, pos, last_disp, blocked, clear, near_vec, t, goal, dist):  # pragma: no cover
    position, velocity, collided, obstacle = slots[1], slots[2], slots[3], slots[4]
    p = pos[c, 0]
    obs[c, position] = (p.real - reals[2]) * reals[6]
    obs[c, position + 1] = (p.imag - reals[3]) * reals[7]
    v = last_disp[c, 0]
    obs[c, velocity] = v.real * reals[8]
    obs[c, velocity + 1] = v.imag * reals[8]
    obs[c, collided] = blocked[c, 0]
    proximity = max(1.0 - clear[c, 0] * reals[9], 0.0)
    vector = near_vec[c, 0]
    pointer = vector * (proximity / max(abs(vector), 1e-9))
    obs[c, obstacle] = pointer.real
    obs[c, obstacle + 1] = pointer.imag
    obs[c, slots[5]] = t[c] * -reals[10] + 1.0
    g = goal[c] - p
    obs[c, slots[6]] = g.real * reals[11]
    obs[c, slots[6] + 1] = g.imag * reals[12]
    obs[c, slots[7]] = dist[c] * reals[13]


navigation_step: Any = None
navigation_observe: Any = None
if ENABLED:  # pragma: no cover - depends on the environment
    # compiled on first call and cached on disk (__pycache__), so later processes load it
    _observe_copy = numba.njit(cache=True, nogil=True, inline="always")(_observe_copy)
    navigation_step = numba.njit(cache=True, nogil=True)(_navigation_step)
    navigation_observe = numba.njit(cache=True, nogil=True)(_navigation_observe)
