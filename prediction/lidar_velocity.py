"""A track's velocity from its own LiDAR points: the motion that stacks them sharpest at t0.

A window's points carry their time lag behind t0 (``WindowSample.points``: each input keyframe aggregates its
sweeps, ten over 0.45 s in nuScenes, all in the t0 ego frame, the ego's own motion compensated). A rigid object
moving at velocity v left a return at p with lag τ where its surface now lies at p + v τ. Moved forward by the right
v, the returns of every sweep stack onto the object's t0 surface; moved by a wrong one, they smear along the error,
further the older they are. So a track's velocity is the candidate under which its warped points are sharpest:
``Σ_points (points sharing its cell)``, which is ``Σ_cells count²`` (the contrast of motion-compensated points),
summed over four grids half a cell apart (``GRID_SHIFTS``: one grid's count jumps where a point crosses a cell
border, and motions a few centimetres apart over the sweeps then score by where the borders fall). The search runs
coarse to fine around the tracker's own velocity (``SEARCH``: ±3 m/s in 0.5 m/s steps on 0.4 m cells, then ±0.5 in
0.1 and ±0.1 in 0.02 on 0.2 m cells, the windows' voxel size), the candidate nearest the previous stage's best
first among equals, so that points of one sweep alone (every candidate ties) leave the tracker's velocity as it was.

That velocity is the mean motion over the points' 1.45 s, and a car that brakes or pulls away moves at t0 slower or
faster than that (by about 0.5 s × its acceleration). So a moving vehicle's track is searched once more, coarse to
fine, for the velocity at t0 and the acceleration along it under which its points stack sharpest, a point with lag
τ then lying at ``p + v τ - a τ² / 2`` (``sharpest_accelerating``, ``ACCELERATION_SEARCH``). A track's points are
thinned evenly to ``MAX_POINTS``: the cost is candidates × points × grids, about 46 ms a streaming forecast of the
recipe's seed-0 run (4.5 tracks; ``bevjepa bench model``, ``velocity_from_points_cost`` 1.31).

Which points: those of the height band ``HEIGHT_BAND_M`` (above the ground, below the tallest vehicle) that the
tracker's velocity moves into the track's t0 box grown by ``MARGIN_M`` on every side: one set for all candidates,
for a set that changed with the candidate would reward pulling a neighbour's points into the box. Which tracks:
the moving ones (``tracking.standing_still`` leaves them a velocity), and the pedestrians and cyclists that stand
still (``SEARCHED_STANDING``: searched from a standstill, moved only by a clearly sharper stack, ``STANDING_GAIN``);
a vehicle that stands still stays so, and a track whose sharpest velocity is slower than its class's velocity error
stops (``standing_still`` again).

Why not the detections alone: the tracker fits its velocity to three detected centres 0.5 s apart and the head's
regression (``tracking.fit_velocity``); the centres scatter by decimetres and the regression shrinks towards
zero, so a moving car's speed came out slow. The points are where the object really was, every
50 ms. Why hand-written: open3d's registration aligns two clouds; here every point carries its own time, and the
contrast of every candidate is one ``np.bincount``.

The acceleration and the four grids were chosen on the tuning worlds (seeds 4 and 5, all their windows, the recipe's
seed-0 run of 1200 steps and a `wide` run; docs/forecaster.md): the synthetic vehicles accelerate by 0.5 m/s² on
average at t0, which put 0.35 m/s into a mean velocity; searched for cyclists too (world 4, on one grid), their
velocity error rose. The four grids for every class's search, against the vehicles' alone, gave the pedestrians and
cyclists a better IoU at 2 s on both worlds with both runs. Acceleration stays out of the track itself: the
trajectory head reads a track's past (``TrackedAgents.motion_past``) and given the acceleration there too it
forecast world 4's occupancy to within 0.001 at every step.

How the rest was chosen (the recipe's seed-0 run, its seed-1 run too for the static points; the tuning worlds of
seeds 4 and 5, never scored in the docs' tables): the tracked vehicles' velocity error fell for the moving ones and
did not rise for the parked ones; a set of points chosen per candidate instead of one fixed set, or the LiDAR
velocity for parked tracks too, scattered the parked ones'. For pedestrians and cyclists that stand still, searching
too (the seed-0 and seed-1 runs, worlds 4 and 5) lowered their velocity error and the minADE₅ in all four pairs.
Leaving out the points of static structure lost on the tuning worlds: it also drops the object's own points where
its earlier and later returns overlap (a car's flank, a slow pedestrian). The price: a pedestrian right beside a
wall stacks the wall best and stops (on the real scene-0916, docs/forecaster.md).

Notation:
    N  points    n  points of one track    K  candidate velocities    A  agents
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bevjepa.datasets import categories
from bevjepa.perception import lidar
from bevjepa.prediction import tracking

HEIGHT_BAND_M = (lidar.OBSTACLE_HEIGHT_M, 3.0)
"""Points between these heights (m, ego frame: z = 0 on the ground) may belong to an agent: above what the LiDAR
encoder counts as an obstacle's (``lidar.OBSTACLE_HEIGHT_M``), below the tallest vehicle."""
MARGIN_M = 1.0
"""A track's points are those its velocity moves to within this distance (m) of its t0 box."""
SEARCH = ((3.0, 0.5, 0.4), (0.5, 0.1, 0.2), (0.1, 0.02, 0.2))
"""Coarse to fine, each stage's (half-width, step) of its square of candidate velocities (m/s) around the best so
far, and the cell (m) whose shared points make the sharpness (a coarse step on coarse cells)."""
MIN_POINTS = 5
"""A track with fewer points keeps the tracker's velocity."""
MAX_POINTS = 400
"""A track's points are thinned evenly to this many."""
SEARCHED_STANDING = ("pedestrian", "cyclist")
"""The classes whose tracks are searched even when they stand still. ``tracking.standing_still`` stops a track
slower than its class's velocity error (pedestrian 0.4, cyclist 1.5 m/s), which also freezes a person walking at
1 m/s whose detections scatter: a person's few points stack sharply only at their own motion. A vehicle that stands
still is left so: searched, the parked ones scattered (likely their long flanks, which stack nearly as well slid
along themselves)."""
STANDING_GAIN = 1.6
"""A track that stands still moves only where its sharpest velocity stacks its points this many times sharper
(``sharpness`` on the last stage's cells) than standing still. A standing person's few returns, seen from a moving
ego, shift a little from sweep to sweep, and some velocity stacks them a little sharper than zero, under this bar
for every person standing in four windows of the real scene-0916 (keyframes alone;
``tests/prediction/test_lidar_velocity.py``); nearly all the walkers that the tracker had stopped on the tuning
worlds stacked far sharper at their walk."""


ACCELERATING = ("vehicle",)
"""The classes whose moving tracks are searched for an acceleration as well (``sharpest_accelerating``)."""
ACCELERATION_SEARCH = (
    ((3.0, 0.5), (0.6, 0.2), (0.0, 0.0)),
    ((0.5, 0.25), (0.2, 0.05), (0.1, 0.05)),
    ((0.125, 0.125), (0.04, 0.02), (0.04, 0.02)),
)
"""Coarse to fine, each stage's (half-width, step) of the acceleration along the motion (m/s²), of the velocity's
offset along it and of its offset across it (m/s), around the best so far (``sharpest_accelerating``)."""
GRID_SHIFTS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))
"""The offsets (in cells) of the grids whose counts ``sharpness`` sums."""


def _offsets(half_width: float, step: float) -> np.ndarray:
    """[n] float64 — multiples of ``step`` within ±``half_width`` (0 alone for a zero half-width)."""
    count = round(half_width / step) if half_width > 0 else 0
    return np.arange(-count, count + 1) * step


def _candidates(centre: np.ndarray, half_width: float, step: float) -> np.ndarray:
    """[K, 2] float64 — a square of velocities around ``centre`` (m/s), the nearest first."""
    offsets = _offsets(half_width, step)
    grid = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 2)
    return centre + grid[np.argsort(np.hypot(grid[:, 0], grid[:, 1]), kind="stable")]


def sharpness(
    xy: np.ndarray,
    lag_s: np.ndarray,
    candidates: np.ndarray,
    cell_m: float,
    accelerations: np.ndarray | None = None,
) -> np.ndarray:
    """[K] float64 — for each candidate motion, Σ over the points of how many share its cell at t0, over 4 grids.

    A point with lag τ moves to where the candidate puts its surface at t0: ``p + v τ - a τ² / 2`` (constant
    acceleration a; without ``accelerations``, a = 0). One grid's count jumps where a point crosses a cell border,
    so motions a few centimetres apart over the sweeps score by where the borders fall; four grids half a cell
    apart (``GRID_SHIFTS``) smooth that out. Each point is binned once, on half cells: with ``h = ⌊2 x / cell⌋``
    the grid shifted by half a cell puts it in cell ``⌊(h + 1) / 2⌋`` and the unshifted one in ``⌊h / 2⌋``.

    Args:
        xy: [n, 2] float — the points (m, t0 ego frame).
        lag_s: [n] float — each point's time lag behind t0 (s).
        candidates: [K, 2] float — velocities at t0 (m/s).
        cell_m: the cell's side (m).
        accelerations: [K, 2] float — accelerations (m/s²) that go with the candidates; None: zero.
    """
    k = len(candidates)
    half_cell_m = cell_m / 2
    warped = xy[None] + candidates[:, None] * lag_s[None, :, None]  # [K, n, 2] where each point lies at t0
    if accelerations is not None:
        warped = warped - np.asarray(accelerations)[:, None] * (0.5 * lag_s**2)[None, :, None]
    least, most = _reach(lag_s, candidates, accelerations)
    low = 2 * (np.floor((xy + least).min(axis=0) / cell_m).astype(np.int64) - 1)  # [2] half cells, even: one cell spare
    high = np.floor((xy + most).max(axis=0) / half_cell_m).astype(np.int64) + 2  # [2] half cells
    half = np.floor(warped / half_cell_m).astype(np.int64) - low  # [K, n, 2] each point's half cell, from 0
    rows, cols = (int(side) for side in (high - low) // 2 + 2)
    first = np.arange(k)[:, None] * rows  # [K, 1] one cell grid per candidate
    total = np.zeros(k)
    for shift in GRID_SHIFTS:
        up = (2 * np.asarray(shift)).astype(np.int64)  # a half-cell shift moves the border by one half cell
        key = (first + ((half[..., 0] + up[0]) >> 1)) * cols + ((half[..., 1] + up[1]) >> 1)  # [K, n]
        counts = np.bincount(key.ravel(), minlength=k * rows * cols)
        total += counts[key].sum(axis=1)
    return total


def _reach(
    lag_s: np.ndarray, candidates: np.ndarray, accelerations: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The least and the most each point moves along each axis under any candidate: [n, 2] each (m).

    Each axis apart, a point moves least under the smallest velocity and the largest acceleration, most under the
    opposite: the grid's extent in O(n), where reducing the moved points themselves costs K times more.
    """
    least = candidates.min(axis=0) * lag_s[:, None]
    most = candidates.max(axis=0) * lag_s[:, None]
    if accelerations is not None:
        half_lag_sq = 0.5 * lag_s**2
        least = least - np.asarray(accelerations).max(axis=0) * half_lag_sq[:, None]
        most = most - np.asarray(accelerations).min(axis=0) * half_lag_sq[:, None]
    return least, most


def _thinned(xy: np.ndarray, lag_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points (float64) thinned evenly to ``MAX_POINTS``."""
    xy, lag_s = np.asarray(xy, dtype=np.float64), np.asarray(lag_s, dtype=np.float64)
    if len(xy) > MAX_POINTS:
        keep = np.linspace(0, len(xy) - 1, MAX_POINTS).round().astype(np.int64)
        xy, lag_s = xy[keep], lag_s[keep]
    return xy, lag_s


def sharpest_velocity(xy: np.ndarray, lag_s: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """[2] float64 — the velocity (m/s) under which the points stack sharpest at t0, searched around ``prior``.

    Args:
        xy: [n, 2] float — one object's points (m, t0 ego frame).
        lag_s: [n] float — their time lags behind t0 (s).
        prior: [2] float — where the search starts (m/s), kept where no candidate is sharper.
    """
    best = np.asarray(prior, dtype=np.float64)
    if len(xy) == 0:
        return best
    xy, lag_s = _thinned(xy, lag_s)
    for half_width, step, cell_m in SEARCH:
        candidates = _candidates(best, half_width, step)
        best = candidates[np.argmax(sharpness(xy, lag_s, candidates, cell_m))]  # the first (nearest) of equals
    return best


def sharpest_accelerating(xy: np.ndarray, lag_s: np.ndarray, velocity: np.ndarray) -> tuple[np.ndarray, float]:
    """The velocity at t0 (m/s) and the acceleration along it (m/s²) that stack the points sharpest.

    ``velocity`` is what the constant-velocity search found: the mean motion over the points' lags. An object that
    accelerates at a moves at t0 faster than that by about a·c, c = Σ τ³ / (2 Σ τ²) (the least-squares velocity of
    its points' positions; 0.54 s for lags spread evenly over 1.45 s). So each stage of ``ACCELERATION_SEARCH``
    tries accelerations along ``velocity``, each with the velocity that goes with it (``a·c`` further along) and
    offsets along and across, on the last constant-velocity stage's cells; the smallest change first among equals,
    so points that say nothing of an acceleration leave the motion as it was.

    Args:
        xy: [n, 2] float — one object's points (m, t0 ego frame).
        lag_s: [n] float — their time lags behind t0 (s).
        velocity: [2] float — the constant-velocity search's velocity (m/s), not zero.

    Returns:
        velocity: [2] float64 — at t0 (m/s).
        acceleration: along ``velocity`` (m/s²; negative: braking).
    """
    best = np.asarray(velocity, dtype=np.float64)
    xy, lag_s = _thinned(xy, lag_s)
    squares = float((lag_s**2).sum())
    if not len(xy) or squares == 0:
        return best, 0.0
    along = best / np.hypot(best[0], best[1])
    across = np.array([-along[1], along[0]])
    lead_s = float((lag_s**3).sum()) / (2 * squares)  # c
    acceleration = 0.0
    for stage in ACCELERATION_SEARCH:
        offsets = [_offsets(half_width, step) for half_width, step in stage]
        a, d, e = (grid.ravel() for grid in np.meshgrid(*offsets, indexing="ij"))
        change = sum(np.abs(o) / step for o, (half_width, step) in zip((a, d, e), stage, strict=True) if half_width)
        order = np.argsort(change, kind="stable")
        a, d, e = a[order], d[order], e[order]  # the smallest change first
        candidates = best + (a * lead_s + d)[:, None] * along + e[:, None] * across  # [K, 2]
        accelerations = (acceleration + a)[:, None] * along  # [K, 2]
        chosen = int(np.argmax(sharpness(xy, lag_s, candidates, SEARCH[-1][2], accelerations)))
        best, acceleration = candidates[chosen], acceleration + float(a[chosen])
    return best, acceleration


def in_height_band(points: np.ndarray) -> np.ndarray:
    """[N] bool — the finite points between the heights of ``HEIGHT_BAND_M``.

    Args:
        points: [N, 5] float — x, y, z (m, ego frame), intensity, time lag (s).
    """
    return np.isfinite(points).all(axis=1) & (points[:, 2] >= HEIGHT_BAND_M[0]) & (points[:, 2] <= HEIGHT_BAND_M[1])


def track_points(points: np.ndarray, box: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """[N] bool — the points that ``velocity`` moves to within ``MARGIN_M`` of ``box`` at t0.

    Args:
        points: [N, 5] float — x, y, z (m, t0 ego frame), intensity, time lag (s); those of the height band
            (``in_height_band``: ``refine`` selects them once for every track).
        box: [7] float — x, y, z, width, length, height (m), yaw (rad) at t0.
        velocity: [2] float — vx, vy (m/s).
    """
    at_t0 = points[:, :2] + points[:, 4:5] * np.asarray(velocity)[None]  # [N, 2]
    offset = at_t0 - box[None, :2]
    cos, sin = np.cos(box[6]), np.sin(box[6])
    along, across = offset[:, 0] * cos + offset[:, 1] * sin, -offset[:, 0] * sin + offset[:, 1] * cos
    return (np.abs(along) <= box[4] / 2 + MARGIN_M) & (np.abs(across) <= box[3] / 2 + MARGIN_M)


def refine(agents: tracking.TrackedAgents, points: np.ndarray) -> tracking.TrackedAgents:
    """The agents with each searched track's velocity the sharpest of its points (then ``standing_still``).

    Searched: the moving tracks, and those of ``SEARCHED_STANDING`` that stand still.

    Args:
        agents: tracks in the t0 ego frame.
        points: [N, 5] float — the window's points: x, y, z (m, t0 ego frame), intensity, time lag (s) behind t0.

    Returns:
        The agents with new velocities (the same object when none is searched).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 5:
        raise ValueError(f"lidar_velocity.refine: points [N, 5] expected, got {list(points.shape)}")
    standing_searched = np.isin(agents.classes, categories.class_indices(SEARCHED_STANDING))
    accelerating = np.isin(agents.classes, categories.class_indices(ACCELERATING))
    moving = np.hypot(agents.velocity[:, 0], agents.velocity[:, 1]) > 0
    searched = np.flatnonzero(moving | standing_searched)
    if not len(searched):
        return agents
    points = points[in_height_band(points)]  # once for every track
    velocity = agents.velocity.copy()
    for a in searched:  # a few agents per window
        mine = track_points(points, agents.boxes[a], agents.velocity[a])
        if mine.sum() < MIN_POINTS:
            continue
        xy, lag_s = points[mine, :2], points[mine, 4]
        found = sharpest_velocity(xy, lag_s, agents.velocity[a])
        if not moving[a]:  # from a standstill, only a clearly sharper stack moves a track
            found_sharpness, still_sharpness = sharpness(xy, lag_s, np.stack([found, np.zeros(2)]), SEARCH[-1][2])
            if found_sharpness < STANDING_GAIN * still_sharpness:
                continue
        if accelerating[a] and moving[a] and found.any():
            found, _ = sharpest_accelerating(xy, lag_s, found)
        velocity[a] = found
    return replace(agents, velocity=tracking.standing_still(velocity, agents.classes))
