"""Closed-loop evaluation: episodes of the simulator driven by a forecast and a sampling planner, run on Ray.

An episode (``run_episode``) steps the world of one scenario and seed. Every planning step of 0.5 s:

1. the forecast source gives an ``OccupancyForecast`` in the current ego frame (or none);
2. the planner (``planner.SamplingPlanner``) picks a candidate speed profile along the ego's path;
3. the ego applies the candidate's accelerations for 0.5 s, simulated in 0.1 s sub-steps
   (``world.step(..., ego_accel_mps2=...)``), the agents reacting to the ego through their IDM.

Forecast sources (``make_source``):

- ``model``: the world model of a checkpoint. At every sub-step a LiDAR sweep is rendered from the ego's actual
  pose; at every planning step the six cameras are rendered at the checkpoint's image size (``image_width_px``,
  256 for the ``small`` preset) and the last ``lidar_sweeps`` sweeps (default 5, one per 0.1 s sub-step, i.e.
  0.4 s; the dataset aggregates 10 sweeps at 20 Hz over 0.45 s) are aggregated into the keyframe's ego frame.
  The keyframe becomes a ``windows.Frame`` (``windows.build_frame``, as preprocessing does), the last P frames a
  ``WindowSample`` (``window_sample_from_frames``) with the current ground-truth agents as the trajectory head's
  queries, zero targets, and the previous plan's motion as the rollout's actions; before P keyframes exist, the
  oldest one is repeated. With ``rollout_candidates`` the model is rolled out under each candidate's actions (one
  batched forward pass; each keyframe is still encoded once, through the ``Forecaster``'s latent cache) and each
  candidate is scored against its own forecast. It is off by default: with the 8 default candidates a planning
  step's forecast took 0.94 s instead of 0.25 s (``small`` preset, one torch thread, the shared 2-core machine).
- ``cv``: the ground-truth boxes of now moved at constant velocity and rasterized (probabilities 0 or 1).
- ``oracle``: the simulator's own future: a copy of the state stepped 2 s ahead with the ego following its
  previous plan (the agents reacting to it), the true boxes rasterized every 0.5 s.
- ``none``: no forecast; the planner drives at its cruise speed.

Only ``model`` renders sensors.

Metrics per episode (``EpisodeResult``), over every 0.1 s sub-step:

- ``collision``: the ego's box overlaps an agent's box (oriented-box separating-axis test), whoever is at fault;
  the episode goes on after a collision. ``collision_rate`` is its mean over episodes.
- ``progress_m``: distance driven along the route; ``progress_ratio`` = progress / expected progress, capped at
  1, where the expected progress is the cruise speed times the duration, or what is left of the route if shorter.
- ``min_ttc_s``: the smallest time to collision over the episode: ego and agents projected at constant velocity
  from every sub-step, up to ``TTC_CAP_S``; ``ttc`` = 1 if it is above ``TTC_THRESHOLD_S`` (as NAVSIM), else 0.
- ``drivable_compliance``: the share of sub-steps whose ego footprint (corners and edge midpoints) lies wholly on
  the layout's drivable raster; ``dac`` = 1 if every sub-step does.
- ``comfort``: 1 if the ego's longitudinal acceleration, longitudinal jerk, lateral acceleration and yaw rate stay
  within NAVSIM's limits (``COMFORT_LIMITS``) at every sub-step (raw 0.1 s differences, not NAVSIM's filtered
  signals), else 0.
- ``score``: in the spirit of NAVSIM's PDMS, ``PDMS_FORMULA``: NC × DAC × (5·TTC + 2·C + 5·EP) / 12, with NC = 1 -
  collision, DAC = dac, TTC = ttc, C = comfort and EP = progress_ratio.

``run_suite`` runs one task per episode on a worker pool (Ray, or this process), records a crashed episode with
its traceback and goes on, and writes ``OUT/metrics.json`` atomically.

Notation:
    A  actors (index 0 is the ego)     K  sub-steps of an episode (0.1 s)     J  TTC projection times
    P  past keyframes of a model window     F  forecast steps (0.5 s)     S  occupancy times
"""

from __future__ import annotations

import functools
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bevjepa.datasets import categories, geometry, nuscenes_source, rasterize, windows
from bevjepa.datasets import io as bevio
from bevjepa.datasets import workers as worker_pools
from bevjepa.evaluation import baselines, planner, scenarios
from bevjepa.prediction import forecaster as forecaster_api
from bevjepa.sim import materials, scenario, sensors, world

PLANNING_STEP_S = scenarios.PLANNING_STEP_S
"""The planner runs every keyframe interval (0.5 s; suites are checked against the same constant)."""
SUB_STEP_S = 0.1
"""The world is simulated in steps of this length (s)."""
SUB_STEPS = round(PLANNING_STEP_S / SUB_STEP_S)
FORECAST_STEPS = 4
"""cv and oracle forecasts: 0.5 s steps after t0 (2 s, as the model's occupancy)."""
ANNOTATION_RANGE_M = 60.0
"""Agents within this distance of the ego are the model's trajectory queries (as the dataset writer annotates)."""
TTC_CAP_S = 5.0
"""Time-to-collision projections reach this far (s); ``min_ttc_s`` never exceeds it."""
TTC_THRESHOLD_S = 1.0
"""The TTC sub-score is 1 when the minimum time to collision stays above this (s), as NAVSIM."""
COMFORT_LIMITS = {
    "min_lon_accel_mps2": -4.05,
    "max_lon_accel_mps2": 2.40,
    "max_abs_lon_jerk_mps3": 4.13,
    "max_abs_lat_accel_mps2": 4.89,
    "max_abs_yaw_rate_radps": 0.95,
}
"""NAVSIM's comfort thresholds that apply to a longitudinally controlled ego."""
PDMS_FORMULA = "score = NC * DAC * (5 * TTC + 2 * C + 5 * EP) / 12"
METRIC_DEFINITIONS = {
    "collision_rate": "share of episodes in which the ego box overlapped an agent box at any 0.1 s sub-step",
    "progress_m": "mean distance driven along the route (m)",
    "progress_ratio": "EP: progress / (cruise speed x duration, or the rest of the route if shorter), capped at 1",
    "min_ttc_s": f"mean over episodes of the minimum constant-velocity time to collision, capped at {TTC_CAP_S} s",
    "ttc": f"TTC: share of episodes whose minimum time to collision stays above {TTC_THRESHOLD_S} s",
    "drivable_compliance": "mean share of sub-steps with the ego footprint wholly on the drivable area",
    "dac": "DAC: share of episodes with the ego footprint on the drivable area at every sub-step",
    "comfort": "C: share of episodes within NAVSIM's accel/jerk/lateral/yaw-rate limits at every sub-step",
    "score": f"mean PDMS-style composite, {PDMS_FORMULA}, NC = 1 - collision",
    "max_abs_lon_accel_mps2": "the largest |longitudinal acceleration| of any episode (m/s^2)",
    "max_abs_lon_jerk_mps3": "the largest |longitudinal jerk| of any episode (m/s^3)",
    "episodes": "episodes that finished",
    "failed": "episodes that raised (see failed)",
}
FORECASTS = ("model", "cv", "oracle", "none")
_DRIVABLE = np.array(
    [materials.Surface.ROAD, materials.Surface.CROSSWALK, materials.Surface.LANE_MARKING, materials.Surface.PARKING]
)


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class EpisodeResult:
    """What one episode measured (see the module docstring for each metric's definition).

    Attributes:
        episode_id: ``scenario/seed``.
        suite: the suite's name.
        scenario: the scenario's name.
        seed: the episode's seed.
        forecast: the forecast source.
        duration_s: simulated time (s).
        planning_steps: planner calls.
        collision: the ego hit an agent.
        collision_time_s: the first collision's time (s); NaN without one.
        collided_with: the first agent hit (its instance id); empty without one.
        progress_m: distance driven along the route (m).
        expected_progress_m: the distance the ratio is taken against (m).
        progress_ratio: EP in [0, 1].
        min_ttc_s: minimum time to collision (s), at most ``TTC_CAP_S``.
        ttc: 1.0 if ``min_ttc_s`` > ``TTC_THRESHOLD_S``, else 0.0.
        drivable_compliance: share of sub-steps with the footprint on the drivable area.
        dac: 1.0 if every sub-step is compliant, else 0.0.
        comfort: 1.0 if every sub-step is within ``COMFORT_LIMITS``, else 0.0.
        max_abs_lon_accel_mps2: the largest |longitudinal acceleration| (m/s²).
        max_abs_lon_jerk_mps3: the largest |longitudinal jerk| (m/s³).
        score: the PDMS-style composite.
        mean_speed_mps: mean ego speed (m/s).
        wall_time_s: the episode's wall time (s).
        forecast_time_s: wall time spent in the forecast source (rendering included) (s).
    """

    episode_id: str
    suite: str
    scenario: str
    seed: int
    forecast: str
    duration_s: float
    planning_steps: int
    collision: bool
    collision_time_s: float
    collided_with: str
    progress_m: float
    expected_progress_m: float
    progress_ratio: float
    min_ttc_s: float
    ttc: float
    drivable_compliance: float
    dac: float
    comfort: float
    max_abs_lon_accel_mps2: float
    max_abs_lon_jerk_mps3: float
    score: float
    mean_speed_mps: float
    wall_time_s: float
    forecast_time_s: float

    def to_dict(self) -> dict:
        """JSON-ready values (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------- box geometry


def boxes_overlap(
    center_a: np.ndarray,
    size_wl_a: np.ndarray,
    yaw_a: np.ndarray,
    center_b: np.ndarray,
    size_wl_b: np.ndarray,
    yaw_b: np.ndarray,
) -> np.ndarray:
    """Whether oriented boxes overlap (separating-axis test; touching counts as overlap), broadcast over ``...``.

    Args:
        center_a: [..., 2] float — centres x, y (m) of the first boxes.
        size_wl_a: [..., 2] float — width (across the heading) and length (along it) (m).
        yaw_a: [...] float — headings (rad).
        center_b, size_wl_b, yaw_b: the second boxes, broadcastable against the first.

    Returns:
        [...] bool.
    """
    center_a, center_b = np.asarray(center_a, np.float64), np.asarray(center_b, np.float64)
    yaw_a, yaw_b = np.asarray(yaw_a, np.float64), np.asarray(yaw_b, np.float64)
    along_a = np.stack([np.cos(yaw_a), np.sin(yaw_a)], axis=-1)  # [..., 2]
    left_a = np.stack([-np.sin(yaw_a), np.cos(yaw_a)], axis=-1)
    along_b = np.stack([np.cos(yaw_b), np.sin(yaw_b)], axis=-1)
    left_b = np.stack([-np.sin(yaw_b), np.cos(yaw_b)], axis=-1)
    half_a, half_b = np.asarray(size_wl_a, np.float64) / 2, np.asarray(size_wl_b, np.float64) / 2
    delta = center_b - center_a  # [..., 2]
    separated = np.zeros(np.broadcast_shapes(delta.shape[:-1], yaw_a.shape, yaw_b.shape), dtype=bool)
    for axis in (along_a, left_a, along_b, left_b):  # the four candidate separating axes
        radius_a = half_a[..., 1] * np.abs(np.sum(along_a * axis, -1)) + half_a[..., 0] * np.abs(
            np.sum(left_a * axis, -1)
        )
        radius_b = half_b[..., 1] * np.abs(np.sum(along_b * axis, -1)) + half_b[..., 0] * np.abs(
            np.sum(left_b * axis, -1)
        )
        separated |= np.abs(np.sum(delta * axis, -1)) > radius_a + radius_b
    return ~separated


def time_to_collision(
    ego_xy: np.ndarray,
    ego_yaw: np.ndarray,
    ego_speed: np.ndarray,
    ego_size_wl: np.ndarray,
    agent_xy: np.ndarray,
    agent_yaw: np.ndarray,
    agent_speed: np.ndarray,
    agent_size_wl: np.ndarray,
    agent_mask: np.ndarray,
    cap_s: float = TTC_CAP_S,
    dt_s: float = SUB_STEP_S,
) -> np.ndarray:
    """Time to collision from each instant, ego and agents moving on at constant velocity along their headings.

    Args:
        ego_xy: [K, 2] float — ego box centres (m). ego_yaw: [K] (rad). ego_speed: [K] (m/s).
        ego_size_wl: [2] float — the ego's width and length (m).
        agent_xy: [K, A, 2] float — agent box centres (m). agent_yaw: [K, A] (rad). agent_speed: [K, A] (m/s).
        agent_size_wl: [A, 2] float — width and length (m).
        agent_mask: [K, A] bool — which agents exist at each instant.
        cap_s: the projection's reach (s). dt_s: its time step (s).

    Returns:
        [K] float64 — the first projected time (s) at which the ego overlaps some agent; ``cap_s`` if none does
        (0 where they overlap already).
    """
    times = np.arange(0.0, cap_s + 1e-9, dt_s)  # [J]
    ego_dir = np.stack([np.cos(ego_yaw), np.sin(ego_yaw)], axis=-1)  # [K, 2]
    agent_dir = np.stack([np.cos(agent_yaw), np.sin(agent_yaw)], axis=-1)  # [K, A, 2]
    ego_future = (
        ego_xy[:, None, None, :] + (ego_speed[:, None] * times[None, :])[:, None, :, None] * ego_dir[:, None, None, :]
    )  # [K, 1, J, 2]
    agent_future = agent_xy[:, :, None, :] + (agent_speed[:, :, None] * times)[..., None] * agent_dir[:, :, None, :]
    hit = boxes_overlap(
        ego_future,
        np.asarray(ego_size_wl)[None, None, None, :],
        ego_yaw[:, None, None],
        agent_future,  # [K, A, J, 2]
        np.asarray(agent_size_wl)[None, :, None, :],
        agent_yaw[:, :, None],
    )  # [K, A, J]
    hit &= agent_mask[:, :, None]
    any_hit = hit.any(axis=1)  # [K, J]
    first = np.where(any_hit.any(axis=1), any_hit.argmax(axis=1), -1)  # [K]
    return np.where(first >= 0, times[np.maximum(first, 0)], cap_s)


def footprint_on_drivable(
    surface_raster, center_xy: np.ndarray, yaw: np.ndarray, size_wl: tuple[float, float]
) -> np.ndarray:
    """Whether a box's footprint (its corners and edge midpoints) lies on drivable surface, at every instant.

    Args:
        surface_raster: the layout's ``layouts.SurfaceRaster``.
        center_xy: [K, 2] float — box centres (m, global). yaw: [K] float (rad).
        size_wl: the box's width and length (m).

    Returns:
        [K] bool.
    """
    corners = rasterize.box_footprints(
        np.asarray(center_xy, np.float64), np.tile(np.asarray(size_wl, np.float64), (len(center_xy), 1)), yaw
    )  # [K, 4, 2]
    midpoints = (corners + np.roll(corners, -1, axis=1)) / 2  # [K, 4, 2]
    points = np.concatenate([corners, midpoints], axis=1)  # [K, 8, 2]
    classes = surface_raster.lookup(points.reshape(-1, 2)).reshape(len(center_xy), -1)
    return np.isin(classes, _DRIVABLE).all(axis=1)


# ---------------------------------------------------------------------------------------- agents as arrays


@dataclass(frozen=True)
class AgentArrays:
    """The agents that exist now (the ego excluded), as arrays in one frame.

    Attributes:
        index: [A] int64 — actor index in ``world.actors``.
        ids: [A] str — instance ids.
        classes: [A] int64 — class index (``categories.CLASSES``).
        xy: [A, 2] float64 — box centres (m).
        yaw: [A] float64 — headings (rad).
        size_wlh: [A, 3] float64 — width, length, height (m).
        velocity: [A, 2] float64 — vx, vy (m/s).
    """

    index: np.ndarray
    ids: np.ndarray
    classes: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray
    size_wlh: np.ndarray
    velocity: np.ndarray

    def boxes7(self) -> np.ndarray:
        """[A, 7] float32 x, y, z, width, length, height (m), yaw (rad), as ``WindowSample.agent_box``."""
        z = world.BOX_BOTTOM_Z_M + self.size_wlh[:, 2] / 2
        return np.concatenate([self.xy, z[:, None], self.size_wlh, self.yaw[:, None]], axis=1).astype(np.float32)


def _actor_classes(built: world.World) -> np.ndarray:
    """[A] int64 the class index of every actor (the ego's too)."""
    return np.array([categories.class_index(a.category) for a in built.actors], dtype=np.int64)


def agents_in_frame(
    built: world.World, state: world.WorldState, frame_from_global: geometry.RigidTransform
) -> AgentArrays:
    """The agents that exist in ``state`` (the ego excluded), moved into a frame (usually the ego frame of now)."""
    xy, yaw = world.actor_poses(built, state)
    index = np.flatnonzero(state.active(built))
    index = index[index != 0]
    rotation = frame_from_global.rotation[:2, :2]
    local = xy[index] @ rotation.T + frame_from_global.translation[:2]  # [A, 2]
    heading = geometry.wrap_angle(yaw[index] + frame_from_global.yaw_rad)
    velocity = state.speed_mps[index, None] * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return AgentArrays(
        index=index,
        ids=np.array([built.actors[i].instance_id for i in index], dtype=str).reshape(-1),
        classes=_actor_classes(built)[index],
        xy=local,
        yaw=np.asarray(heading, dtype=np.float64).reshape(-1),
        size_wlh=built.table.sizes_wlh_m[index],
        velocity=velocity,
    )


def _rasterize(grid: geometry.GridSpec, agents: AgentArrays) -> np.ndarray:
    """[C, H, W] float32 occupancy (0 or 1) of the agents' boxes."""
    occupancy, _ = rasterize.rasterize_boxes(
        grid, agents.xy, agents.size_wlh[:, :2], agents.yaw, agents.classes, len(categories.CLASSES)
    )
    return occupancy.astype(np.float32)


# ------------------------------------------------------------------------------------------ forecast sources


class ForecastSource(Protocol):
    """Gives the planner a forecast in the current ego frame; sees the world after every sub-step."""

    name: str

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Called at the start and after every sub-step (only the model source renders sensors here)."""
        ...

    def forecast(
        self,
        built: world.World,
        state: world.WorldState,
        previous: planner.Plan | None,
        candidates: Sequence[planner.Plan],
    ) -> forecaster_api.OccupancyForecast | list[forecaster_api.OccupancyForecast] | None:
        """One forecast for every candidate, one per candidate, or None (the planner then ignores collisions)."""
        ...


class NoForecast:
    """The ``none`` source: the planner ignores everything and drives at its cruise speed."""

    name = "none"

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Nothing to see."""

    def forecast(self, built, state, previous, candidates) -> None:
        """No forecast."""
        return None


class ConstantVelocitySource:
    """The ``cv`` source: today's true boxes moved at constant velocity, rasterized (probabilities 0 or 1)."""

    name = "cv"

    def __init__(self, grid: geometry.GridSpec | None = None) -> None:
        self.grid = geometry.GridSpec() if grid is None else grid

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Nothing to render."""

    def forecast(self, built, state, previous, candidates) -> forecaster_api.OccupancyForecast:
        """The constant-velocity forecast of the agents that exist now."""
        ego_from_global = world.ego_pose(built, state).inverse()
        agents = agents_in_frame(built, state, ego_from_global)
        occupancy = baselines.constant_velocity_occupancy(
            agents.boxes7(), agents.classes, agents.velocity, self.grid, len(categories.CLASSES), FORECAST_STEPS
        ).astype(np.float32)  # [S, C, H, W]
        trajectories = baselines.constant_velocity_trajectories(agents.xy, agents.velocity, 12)  # [A, 1, T, 2]
        return _forecast(state, self.grid, occupancy, agents, trajectories.astype(np.float32))


class OracleSource:
    """The ``oracle`` source: the simulator's own future under the ego's previous plan, rasterized."""

    name = "oracle"

    def __init__(self, grid: geometry.GridSpec | None = None) -> None:
        self.grid = geometry.GridSpec() if grid is None else grid

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Nothing to render."""

    def forecast(self, built, state, previous, candidates) -> forecaster_api.OccupancyForecast:
        """Step a copy of the world 2 s ahead (the ego following ``previous``, shifted by 0.5 s) and rasterize."""
        ego_from_global = world.ego_pose(built, state).inverse()
        steps = FORECAST_STEPS * SUB_STEPS
        if previous is None:
            accel = np.zeros(steps)  # hold the current speed
        else:
            accel = previous.accel_profile(SUB_STEP_S, steps + SUB_STEPS)[SUB_STEPS:]
        now = agents_in_frame(built, state, ego_from_global)
        maps = [_rasterize(self.grid, now)]
        positions = {i: np.zeros((FORECAST_STEPS, 2)) for i in now.index}
        future = state
        for k in range(steps):
            future = world.step(built, future, SUB_STEP_S, ego_accel_mps2=float(accel[k]))
            if (k + 1) % SUB_STEPS == 0:
                agents = agents_in_frame(built, future, ego_from_global)
                maps.append(_rasterize(self.grid, agents))
                step = (k + 1) // SUB_STEPS - 1
                for i, xy in zip(agents.index, agents.xy, strict=True):  # agents, not points or cells
                    if i in positions:
                        positions[i][step:] = xy
        trajectories = np.stack([positions[i] for i in now.index])[:, None] if len(now.index) else None
        return _forecast(state, self.grid, np.stack(maps), now, trajectories)


def _forecast(
    state: world.WorldState,
    grid: geometry.GridSpec,
    occupancy: np.ndarray,
    agents: AgentArrays,
    trajectories: np.ndarray | None,
) -> forecaster_api.OccupancyForecast:
    """An ``OccupancyForecast`` from occupancy [S, C, H, W] and one trajectory mode [A, 1, T, 2] per agent."""
    count = len(agents.index)
    if trajectories is None:
        trajectories = np.zeros((count, 1, FORECAST_STEPS, 2), dtype=np.float32)
    steps = trajectories.shape[2]
    return forecaster_api.OccupancyForecast(
        timestamp_us=_timestamp_us(state),
        grid=grid,
        classes=categories.CLASSES,
        times_s=np.arange(len(occupancy), dtype=np.float32) * np.float32(PLANNING_STEP_S),
        occupancy=occupancy.astype(np.float32),
        agent_ids=agents.ids,
        agent_classes=agents.classes,
        trajectory_times_s=np.arange(1, steps + 1, dtype=np.float32) * np.float32(PLANNING_STEP_S),
        trajectories=trajectories.astype(np.float32),
        mode_probabilities=np.ones((count, 1), dtype=np.float32),
    )


def _timestamp_us(state: world.WorldState) -> int:
    return int(round(state.time_s * 1e6))


# ---------------------------------------------------------------------------------------------- the model


def window_sample_from_frames(
    frames: Sequence[windows.Frame],
    agent_box: np.ndarray,
    agent_class: np.ndarray,
    agent_velocity: np.ndarray,
    agent_past: np.ndarray,
    agent_past_mask: np.ndarray,
    agent_ids: Sequence[str],
    config: windows.WindowConfig,
    image_hw: tuple[int, int],
    future_actions: np.ndarray | None = None,
):
    """A ``WindowSample`` from in-memory frames, for inference: inputs assembled in t0's frame, zero targets.

    Args:
        frames: the P input frames, oldest first, t0 last (``windows.build_frame`` of each keyframe).
        agent_box: [A, 7] float — x, y, z, width, length, height (m), yaw (rad) of the agents at t0 (t0 ego frame).
        agent_class: [A] int — class index.
        agent_velocity: [A, 2] float — vx, vy (m/s, t0 frame).
        agent_past: [A, P, 2] float — xy (m, t0 frame) at each input keyframe.
        agent_past_mask: [A, P] bool.
        agent_ids: [A] instance ids.
        config: the window layout (P, T, F and the grid) the model was trained on.
        image_hw: (H, W) of the frames' camera images (pixels).
        future_actions: [F, 3] float — the ego motion (dx, dy, dyaw per 0.5 s step) to roll out under; None: 0.

    Returns:
        ``torch_dataset.WindowSample``; its targets (futures, occupancy, instances, observed) are zero.
    """
    from bevjepa.datasets import torch_dataset

    p_count, t_count, f_count = len(frames), config.trajectory_steps, config.occupancy_steps
    if p_count != config.past_keyframes:
        raise ValueError(f"window_sample_from_frames: {p_count} frames, the config wants {config.past_keyframes}")
    global_from = np.stack([np.asarray(f.global_from_ego, dtype=np.float64) for f in frames])  # [P, 4, 4]
    t0_from_ego = np.linalg.inv(global_from[-1])[None] @ global_from  # [P, 4, 4]
    yaw = np.arctan2(t0_from_ego[:, 1, 0], t0_from_ego[:, 0, 0])  # [P]
    pose = np.stack([t0_from_ego[:, 0, 3], t0_from_ego[:, 1, 3], yaw], 1)  # [P, 3] x, y, yaw in t0
    dx, dy = pose[1:, 0] - pose[:-1, 0], pose[1:, 1] - pose[:-1, 1]
    cos, sin = np.cos(pose[:-1, 2]), np.sin(pose[:-1, 2])
    past_actions = np.stack([cos * dx + sin * dy, -sin * dx + cos * dy, geometry.wrap_angle(np.diff(pose[:, 2]))], 1)
    actions = np.zeros((p_count - 1 + t_count, 3), dtype=np.float32)  # [P - 1 + T, 3]
    actions[: p_count - 1] = past_actions
    action_mask = np.zeros(p_count - 1 + t_count, dtype=bool)
    action_mask[: p_count - 1] = True
    if future_actions is not None:
        future_actions = np.asarray(future_actions, dtype=np.float32)[:f_count]
        actions[p_count - 1 : p_count - 1 + len(future_actions)] = future_actions
        action_mask[p_count - 1 : p_count - 1 + len(future_actions)] = True
    count = len(agent_ids)
    h, w = config.grid.shape
    tokens = np.array([f.sample_token for f in frames])
    window = windows.Window(
        sample_token=frames[-1].sample_token,
        scene_name=frames[-1].scene_name,
        timestamp_us=int(frames[-1].timestamp_us),
        keyframe_tokens=tokens,
        t0_from_ego=t0_from_ego,
        future_keyframe_tokens=np.array([], dtype=str),
        t0_from_future_ego=np.zeros((0, 4, 4)),
        ego_future=np.zeros((t_count, 3), dtype=np.float32),
        ego_future_mask=np.zeros(t_count, dtype=bool),
        actions=actions,
        action_mask=action_mask,
        agent_ids=np.array(list(agent_ids), dtype="U64").reshape(-1),
        agent_class=np.asarray(agent_class, dtype=np.int8).reshape(-1),
        agent_box=np.asarray(agent_box, dtype=np.float32).reshape(-1, 7),
        agent_velocity=np.asarray(agent_velocity, dtype=np.float32).reshape(-1, 2),
        agent_past=np.asarray(agent_past, dtype=np.float32).reshape(count, p_count, 2),
        agent_past_mask=np.asarray(agent_past_mask, dtype=bool).reshape(count, p_count),
        agent_future=np.zeros((count, t_count, 2), dtype=np.float32),
        agent_future_mask=np.zeros((count, t_count), dtype=bool),
        occupancy=np.zeros((f_count + 1, len(categories.CLASSES), h, w), dtype=bool),
        instance_ids=np.array(list(agent_ids), dtype="U64").reshape(-1),
        instances=np.zeros((f_count + 1, h, w), dtype=np.int32),
        observed=np.zeros((h, w), dtype=bool),
    )
    return torch_dataset.sample_from_window(window, list(frames), image_hw)


FRAME_CACHE = 8
"""Encoded keyframes the model source's ``Forecaster`` keeps: each planning step encodes one new keyframe."""
_FORECASTERS: dict[str, tuple] = {}
"""Loaded checkpoints of this process (a Ray worker runs many episodes): run folder -> (config, Forecaster)."""


def load_forecaster(run: Path | str):
    """The ``Forecaster`` and ``ExperimentConfig`` of a run folder, loaded once per process."""
    from bevjepa.prediction import checkpoint

    key = str(Path(run).resolve())
    if key not in _FORECASTERS:
        config, net = checkpoint.load_model(Path(run))
        _FORECASTERS[key] = (config, forecaster_api.Forecaster(net, cache_frames=FRAME_CACHE))
    return _FORECASTERS[key]


class ModelSource:
    """The ``model`` source: sensors rendered from the ego's pose, the world model's forecast (module docstring).

    Args:
        built: the episode's world.
        run: the checkpoint's run folder.
        image_width_px: camera width the model was trained on (height keeps the nuScenes 16:9 aspect).
        lidar_sweeps: sweeps aggregated per keyframe, one per 0.1 s sub-step.
        rollout_candidates: roll the model out under every candidate's actions (one batched forward pass).
        torch_threads: torch's intra-op threads during a forecast (restored after). One: on the shared two-core
            machine a forecast took 0.25 s with one thread and 2.4 s with two (the other core was busy).
        seed: seeds the LiDAR's drops and noise.
        name_prefix: the keyframes' scene name and token prefix (a random suffix keeps runs apart).
    """

    name = "model"

    def __init__(
        self,
        built: world.World,
        run: Path | str,
        image_width_px: int = 256,
        lidar_sweeps: int = 5,
        rollout_candidates: bool = False,
        torch_threads: int = 1,
        seed: int = 0,
        name_prefix: str = "closed-loop",
    ) -> None:
        config, self.forecaster = load_forecaster(run)
        model_config = config.model
        self.window_config = windows.WindowConfig(
            past_keyframes=model_config.fuser.past_frames,
            occupancy_steps=model_config.occupancy_steps,
            trajectory_steps=model_config.trajectory_steps,
            grid=model_config.grid,
        )
        height = round(image_width_px * sensors.NATIVE_HEIGHT_PX / sensors.NATIVE_WIDTH_PX)
        self.image_hw = (height, image_width_px)
        self.renderer = sensors.SensorRenderer(
            built.layout, sensors.LidarConfig(), sensors.CameraConfig(width_px=image_width_px, height_px=height)
        )
        self.rollout_candidates = rollout_candidates
        self.torch_threads = torch_threads
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC105ED]))
        # A fresh scene name per run: the forecaster's latent cache must never mix two runs' frames.
        self.name_prefix = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        self.sweeps: deque[tuple[int, np.ndarray, geometry.RigidTransform]] = deque(maxlen=lidar_sweeps)
        self.frames: deque[windows.Frame] = deque(maxlen=self.window_config.past_keyframes)
        self.history: deque[tuple[geometry.RigidTransform, dict[int, np.ndarray]]] = deque(
            maxlen=self.window_config.past_keyframes
        )

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Render one LiDAR sweep from the ego's pose now."""
        boxes, _ = world.agent_boxes(built, state)
        global_from_ego = world.ego_pose(built, state)
        sweep, _ = self.renderer.lidar_sweep(boxes, global_from_ego, _timestamp_us(state), self.rng)
        self.sweeps.append((sweep.timestamp_us, sweep.points, global_from_ego))

    def _keyframe(self, built: world.World, state: world.WorldState) -> nuscenes_source.Keyframe:
        """The keyframe of now: the last sweeps aggregated into the ego frame, the six cameras, the agents."""
        timestamp = _timestamp_us(state)
        global_from_ego = world.ego_pose(built, state)
        ego_from_global = global_from_ego.inverse()
        ego_from_sensor = self.renderer.lidar.ego_from_sensor
        parts = []
        for sweep_time, points, sweep_pose in self.sweeps:  # a few sweeps, each vectorized
            close = (np.abs(points[:, 0]) < 1.0) & (np.abs(points[:, 1]) < 1.0)  # the devkit's remove_close
            points = points[~close]
            part = np.empty((len(points), 5), dtype=np.float32)
            part[:, :3] = (ego_from_global @ sweep_pose @ ego_from_sensor).apply(points[:, :3])
            part[:, 3] = points[:, 3]
            part[:, 4] = (timestamp - sweep_time) * 1e-6
            parts.append(part)
        boxes, _ = world.agent_boxes(built, state)
        images, _ = self.renderer.camera_images(boxes, global_from_ego, timestamp)
        near = [
            b.transformed(ego_from_global)
            for b in boxes
            if np.linalg.norm(b.center_m[:2] - global_from_ego.translation[:2]) <= ANNOTATION_RANGE_M
        ]
        return nuscenes_source.Keyframe(
            sample_token=f"{self.name_prefix}-{timestamp}",
            scene_name=self.name_prefix,
            timestamp_us=timestamp,
            global_from_ego=global_from_ego,
            lidar_points=np.concatenate(parts) if parts else np.zeros((0, 5), np.float32),
            cameras=tuple(images),
            boxes=tuple(near),
            bad_inputs=(),
        )

    def sample(self, built: world.World, state: world.WorldState, future_actions: np.ndarray | None):
        """The ``WindowSample`` of now (renders the cameras; keeps the last P frames)."""
        self.frames.append(windows.build_frame(self._keyframe(built, state), self.window_config))
        global_from_ego = world.ego_pose(built, state)
        ego_from_global = global_from_ego.inverse()
        xy_all, _ = world.actor_poses(built, state)
        agents = agents_in_frame(built, state, ego_from_global)
        near = np.linalg.norm(agents.xy, axis=1) <= ANNOTATION_RANGE_M
        agents = AgentArrays(*(getattr(agents, f)[near] for f in AgentArrays.__dataclass_fields__))
        self.history.append((global_from_ego, {int(i): xy_all[i] for i in agents.index}))
        p_count = self.window_config.past_keyframes
        frames = [self.frames[0]] * (p_count - len(self.frames)) + list(self.frames)  # repeat the oldest
        history = [self.history[0]] * (p_count - len(self.history)) + list(self.history)
        past = np.zeros((len(agents.index), p_count, 2))
        past_mask = np.zeros((len(agents.index), p_count), dtype=bool)
        for p, (_, positions) in enumerate(history):  # P keyframes × A agents
            for a, i in enumerate(agents.index):
                if int(i) in positions:
                    past[a, p] = ego_from_global.apply(np.array([*positions[int(i)], 0.0]))[:2]
                    past_mask[a, p] = True
        return window_sample_from_frames(
            frames,
            agents.boxes7(),
            agents.classes,
            agents.velocity,
            past,
            past_mask,
            list(agents.ids),
            self.window_config,
            self.image_hw,
            future_actions,
        )

    def forecast(self, built, state, previous, candidates):
        """The model's forecast (one per candidate with ``rollout_candidates``)."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            return self._forecast(built, state, previous, candidates)
        finally:
            torch.set_num_threads(threads)

    def _forecast(self, built, state, previous, candidates):
        steps = self.window_config.occupancy_steps
        previous_actions = None if previous is None else _shifted_actions(previous, steps)
        sample = self.sample(built, state, previous_actions)
        if not self.rollout_candidates or not candidates:
            return self.forecaster.forecast(sample)
        import torch

        from bevjepa.datasets import torch_dataset

        batch = torch_dataset.collate([sample] * len(candidates))
        actions = torch.from_numpy(np.stack([c.actions(steps) for c in candidates]))  # [N, F, 3]
        return self.forecaster.forecast_batch(batch, actions)


def _shifted_actions(plan: planner.Plan, steps: int) -> np.ndarray:
    """[F, 3] the previous plan's actions from 0.5 s on (its last one repeated): the motion the ego will continue."""
    actions = plan.actions(steps)
    return np.concatenate([actions[1:], actions[-1:]], axis=0)


def make_source(
    forecast: str,
    built: world.World,
    checkpoint: Path | str | None = None,
    seed: int = 0,
    name_prefix: str = "closed-loop",
    **model_options,
) -> ForecastSource:
    """The named forecast source for one episode's world.

    Raises:
        ValueError: an unknown name, or ``model`` without a checkpoint.
    """
    if forecast == "none":
        return NoForecast()
    if forecast == "cv":
        return ConstantVelocitySource()
    if forecast == "oracle":
        return OracleSource()
    if forecast == "model":
        if checkpoint is None:
            raise ValueError("the model forecast needs a checkpoint: pass --checkpoint RUN (a `bevjepa train` folder)")
        return ModelSource(built, checkpoint, seed=seed, name_prefix=name_prefix, **model_options)
    raise ValueError(f"unknown forecast source {forecast!r}; choose one of {list(FORECASTS)}")


# ------------------------------------------------------------------------------------------------ episodes


def run_episode(
    episode: scenarios.Episode,
    forecast_source: str,
    checkpoint: Path | str | None = None,
    planner_config: planner.PlannerConfig | None = None,
    **model_options,
) -> EpisodeResult:
    """Run one episode closed loop and measure it (see the module docstring).

    Args:
        episode: the scenario and seed.
        forecast_source: ``model``, ``cv``, ``oracle`` or ``none``.
        checkpoint: the run folder for ``model``.
        planner_config: the planner; default ``PlannerConfig()``.
        **model_options: ``ModelSource`` options (``image_width_px``, ``lidar_sweeps``, ``rollout_candidates``).
    """
    start = time.perf_counter()
    built, state = scenario.build_world(episode.scenario_config())
    ego = built.actors[0]
    source = make_source(
        forecast_source,
        built,
        checkpoint,
        seed=episode.seed,
        name_prefix=f"{episode.suite}-{episode.scenario}-{episode.seed}",
        **model_options,
    )
    sampler = planner.SamplingPlanner(planner_config)
    steps = round(episode.duration_s / PLANNING_STEP_S)  # >= 1: checked when the episode was made
    trace_s, trace_speed, trace_accel = [state.s_m.copy()], [state.speed_mps.copy()], [state.accel_mps2.copy()]
    trace_active = [state.active(built)]
    forecast_time = 0.0
    source.observe(built, state)
    previous: planner.Plan | None = None
    for _ in range(steps):
        global_from_ego = world.ego_pose(built, state)
        plans = sampler.candidates(
            ego.path,
            float(state.s_m[0]),
            float(state.speed_mps[0]),
            ego.desired_speed_mps,
            global_from_ego.inverse(),
            float(state.accel_mps2[0]),
        )
        tick = time.perf_counter()
        forecast = source.forecast(built, state, previous, plans)
        forecast_time += time.perf_counter() - tick
        choice = sampler.choose(plans, forecast, float(state.accel_mps2[0]))
        accel = choice.plan.accel_profile(SUB_STEP_S, SUB_STEPS)
        for k in range(SUB_STEPS):
            state = world.step(built, state, SUB_STEP_S, ego_accel_mps2=float(accel[k]))
            trace_s.append(state.s_m.copy())
            trace_speed.append(state.speed_mps.copy())
            trace_accel.append(state.accel_mps2.copy())
            trace_active.append(state.active(built))
            tick = time.perf_counter()
            source.observe(built, state)
            forecast_time += time.perf_counter() - tick
        previous = choice.plan
    s = np.stack(trace_s)  # [K, A]
    speed, accel_trace, active = np.stack(trace_speed), np.stack(trace_accel), np.stack(trace_active)
    metrics = episode_metrics(built, s, speed, accel_trace, active, episode.duration_s)
    return EpisodeResult(
        episode_id=episode.episode_id,
        suite=episode.suite,
        scenario=episode.scenario,
        seed=episode.seed,
        forecast=forecast_source,
        duration_s=steps * PLANNING_STEP_S,
        planning_steps=steps,
        wall_time_s=time.perf_counter() - start,
        forecast_time_s=forecast_time,
        **metrics,
    )


def episode_metrics(
    built: world.World,
    s_m: np.ndarray,
    speed_mps: np.ndarray,
    accel_mps2: np.ndarray,
    active: np.ndarray,
    duration_s: float,
) -> dict:
    """The metrics of a recorded episode (module docstring), from its sub-step trace.

    Args:
        built: the episode's world.
        s_m: [K, A] float — every actor's arc length along its path at each sub-step (m).
        speed_mps: [K, A] float — speeds (m/s).
        accel_mps2: [K, A] float — accelerations (m/s²).
        active: [K, A] bool — which actors exist.
        duration_s: the planned duration (s), for the expected progress.

    Returns:
        The ``EpisodeResult`` fields from ``collision`` to ``mean_speed_mps``.
    """
    k_count = s_m.shape[0]
    xy, yaw, curvature = built.paths.lookup(s_m.T)  # [A, K, 2], [A, K], [A, K]
    xy, yaw, curvature = xy.transpose(1, 0, 2), yaw.T, curvature.T  # [K, A, ...]
    sizes_wl = built.table.sizes_wlh_m[:, :2]  # [A, 2]
    agent_mask = active.copy()
    agent_mask[:, 0] = False
    ego_xy, ego_yaw, ego_speed = xy[:, 0], yaw[:, 0], speed_mps[:, 0]

    ttc = time_to_collision(ego_xy, ego_yaw, ego_speed, sizes_wl[0], xy, yaw, speed_mps, sizes_wl, agent_mask)  # [K]
    overlap = boxes_overlap(ego_xy[:, None], sizes_wl[0], ego_yaw[:, None], xy, sizes_wl, yaw) & agent_mask  # [K, A]
    hit_steps = np.flatnonzero(overlap.any(axis=1))
    collision = bool(hit_steps.size)
    first = int(hit_steps[0]) if collision else -1
    collided_with = built.actors[int(np.argmax(overlap[first]))].instance_id if collision else ""

    ego = built.actors[0]
    progress = float(s_m[-1, 0] - s_m[0, 0])
    expected = max(min(ego.desired_speed_mps * duration_s, ego.path.length_m - float(s_m[0, 0])), 1e-6)
    progress_ratio = float(np.clip(progress / expected, 0.0, 1.0))

    on_drivable = footprint_on_drivable(built.layout.surface, ego_xy, ego_yaw, tuple(sizes_wl[0]))
    lon_accel = accel_mps2[:, 0]
    jerk = np.diff(lon_accel) / SUB_STEP_S if k_count > 1 else np.zeros(1)
    lat_accel = ego_speed**2 * curvature[:, 0]
    yaw_rate = ego_speed * curvature[:, 0]
    limits = COMFORT_LIMITS
    comfortable = (
        (lon_accel >= limits["min_lon_accel_mps2"] - 1e-9).all()
        and (lon_accel <= limits["max_lon_accel_mps2"] + 1e-9).all()
        and (np.abs(jerk) <= limits["max_abs_lon_jerk_mps3"] + 1e-9).all()
        and (np.abs(lat_accel) <= limits["max_abs_lat_accel_mps2"]).all()
        and (np.abs(yaw_rate) <= limits["max_abs_yaw_rate_radps"]).all()
    )
    min_ttc = float(ttc.min())
    ttc_ok = float(min_ttc > TTC_THRESHOLD_S)
    dac = float(on_drivable.all())
    comfort = float(comfortable)
    score = (0.0 if collision else 1.0) * dac * (5 * ttc_ok + 2 * comfort + 5 * progress_ratio) / 12
    return {
        "collision": collision,
        "collision_time_s": first * SUB_STEP_S if collision else float("nan"),
        "collided_with": collided_with,
        "progress_m": progress,
        "expected_progress_m": float(expected),
        "progress_ratio": progress_ratio,
        "min_ttc_s": min_ttc,
        "ttc": ttc_ok,
        "drivable_compliance": float(on_drivable.mean()),
        "dac": dac,
        "comfort": comfort,
        "max_abs_lon_accel_mps2": float(np.abs(lon_accel).max()),
        "max_abs_lon_jerk_mps3": float(np.abs(jerk).max()),
        "score": float(score),
        "mean_speed_mps": float(ego_speed.mean()),
    }


# --------------------------------------------------------------------------------------------------- suites


def _episode_task(
    episode: scenarios.Episode, forecast: str, checkpoint: str | None, model_options: dict | None = None
) -> dict:
    """Run one episode; a crash becomes a record with its traceback instead of an exception."""
    try:
        result = run_episode(episode, forecast, checkpoint, **(model_options or {}))
        return {"ok": True, "result": result.to_dict()}
    except Exception as error:  # noqa: BLE001 - a failed episode is recorded, the suite goes on
        return {
            "ok": False,
            "episode_id": episode.episode_id,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }


AGGREGATE_KEYS = (
    "collision_rate",
    "progress_m",
    "progress_ratio",
    "min_ttc_s",
    "ttc",
    "drivable_compliance",
    "dac",
    "comfort",
    "score",
)


def aggregate(results: Sequence[dict], failed: int = 0) -> dict[str, float]:
    """The suite's flat {metric: value} (``METRIC_DEFINITIONS``).

    Means over the finished episodes, the largest longitudinal acceleration and jerk of any episode, and the
    counts of finished and failed episodes.
    """
    out: dict[str, float] = {}
    for key in AGGREGATE_KEYS:
        field_name = "collision" if key == "collision_rate" else key
        values = [float(r[field_name]) for r in results]
        out[key] = float(np.mean(values)) if values else float("nan")
    for key in ("max_abs_lon_accel_mps2", "max_abs_lon_jerk_mps3"):  # the worst episode
        out[key] = float(max(float(r[key]) for r in results)) if results else float("nan")
    out["episodes"] = float(len(results))
    out["failed"] = float(failed)
    return out


def _make_pool(workers_count: int, address: str | None):
    if workers_count == 1 and not address:
        return worker_pools.SequentialPool()
    return worker_pools.RayPool(workers_count, address)


def run_suite(
    suite_path_or_suite: Path | str | scenarios.Suite,
    forecast: str,
    checkpoint: Path | str | None = None,
    workers: int = 1,
    address: str | None = None,
    out: Path | str | None = None,
    progress: bool = True,
    model_options: dict | None = None,
    job: str = "closed-loop",
) -> dict:
    """Run every episode of a suite, one task each, and aggregate.

    Args:
        suite_path_or_suite: a suite file (``scenarios.load_suite``), the name of a shipped suite (``ci``,
            ``smoke``: ``suites/NAME.toml`` of the repository), or a ``Suite``.
        forecast: ``model``, ``cv``, ``oracle`` or ``none``.
        checkpoint: the run folder for ``model``.
        workers: parallel episodes; 1 without ``address`` runs in this process, otherwise one Ray task per episode.
        address: a Ray cluster's address (default: a local Ray with ``workers`` CPUs).
        out: if given, ``out/metrics.json`` is written (atomically); ``out`` must be empty, new, or ``job``'s own
            earlier output (checked before any episode runs).
        progress: show a progress bar.
        model_options: ``ModelSource`` options.
        job: the command that owns ``out`` (``closed-loop``, or ``regress`` when the gate runs the suite).

    Returns:
        ``{"suite", "forecast", "checkpoint", "score_formula", "metric_definitions", "episodes": [...],
        "aggregate": {metric: float}, "failed": [{"episode_id", "error", "traceback"}], "workers", "wall_time_s"}``.
    """
    suite = (
        suite_path_or_suite
        if isinstance(suite_path_or_suite, scenarios.Suite)
        else scenarios.load_suite(scenarios.resolve_suite_path(suite_path_or_suite))
    )
    if out is not None:
        bevio.claim_output_folder(Path(out), job, own_files=lambda folder: (folder / "metrics.json").is_file())
    if forecast not in FORECASTS:
        raise ValueError(f"unknown forecast source {forecast!r}; choose one of {list(FORECASTS)}")
    if forecast == "model":
        if checkpoint is None:
            raise ValueError("the model forecast needs a checkpoint: pass --checkpoint RUN (a `bevjepa train` folder)")
        from bevjepa.prediction import checkpoint as checkpoint_io

        checkpoint_io.load_state(Path(checkpoint))  # a clear error now rather than in every episode
        checkpoint_io.load_config(Path(checkpoint))
    checkpoint_arg = None if checkpoint is None else str(Path(checkpoint).resolve())
    task = functools.partial(_episode_task, forecast=forecast, checkpoint=checkpoint_arg, model_options=model_options)
    start = time.perf_counter()
    outcomes: list[dict | None] = [None] * len(suite.episodes)
    pool = _make_pool(workers, address)
    try:
        from tqdm import tqdm

        with tqdm(total=len(suite.episodes), desc=f"closed-loop {forecast}", disable=not progress) as bar:
            for index, outcome in pool.map_unordered(task, suite.episodes):
                outcomes[index] = outcome
                bar.update(1)
    finally:
        if isinstance(pool, worker_pools.RayPool):
            pool.close()
    finished = [o["result"] for o in outcomes if o is not None and o["ok"]]
    failed = [
        {k: o[k] for k in ("episode_id", "error", "traceback")} for o in outcomes if o is not None and not o["ok"]
    ]
    report = {
        "suite": suite.name,
        "forecast": forecast,
        "checkpoint": checkpoint_arg,
        "score_formula": PDMS_FORMULA,
        "metric_definitions": METRIC_DEFINITIONS,
        "episodes": finished,
        "aggregate": aggregate(finished, len(failed)),
        "failed": failed,
        "workers": workers,
        "wall_time_s": time.perf_counter() - start,
    }
    if out is not None:
        bevio.atomic_write_json(Path(out) / "metrics.json", report)
    return report


def format_table(report: dict) -> str:
    """The aggregate of a ``run_suite`` report as a small text table."""
    lines = [f"suite {report['suite']}, forecast {report['forecast']}: {PDMS_FORMULA}"]
    for key, value in report["aggregate"].items():
        lines.append(f"  {key:24s} {value:10.3f}")
    for failure in report["failed"]:
        lines.append(f"  FAILED {failure['episode_id']}: {failure['error']}")
    return "\n".join(lines)


def _warm_up(_: int) -> int:
    """A trivial task that makes a Ray worker import the simulator and build a world (for ``throughput``)."""
    scenario.build_world(scenario.ScenarioConfig(layout="straight", duration_s=1.0, vehicles=1, parked=0))
    time.sleep(0.5)
    return os.getpid()


def throughput(
    suite: Path | str | scenarios.Suite,
    workers_list: Sequence[int] = (1, 2),
    forecast: str = "cv",
    checkpoint: Path | str | None = None,
) -> dict:
    """Episodes per second of the same suite on local Ray with each worker count (Ray's start-up excluded).

    Each run starts its own local Ray (so Ray must not be running), warms its workers up with one small task each,
    then times the suite's episodes.

    Returns:
        A flat dict: ``suite``, ``forecast``, ``episodes``, for each worker count W ``workers_W_load_average``
        (the machine's 1-minute load before the run), ``workers_W_wall_s``, ``workers_W_episodes_per_s`` and
        ``workers_W_failed``, and ``ratio``: episodes/s of the last worker count over the first.
    """
    import ray

    if ray.is_initialized():
        raise ValueError("throughput starts its own local Ray for each worker count: call ray.shutdown() first")
    suite = suite if isinstance(suite, scenarios.Suite) else scenarios.load_suite(scenarios.resolve_suite_path(suite))
    checkpoint_arg = None if checkpoint is None else str(Path(checkpoint).resolve())
    task = functools.partial(_episode_task, forecast=forecast, checkpoint=checkpoint_arg)
    result: dict = {"suite": suite.name, "forecast": forecast, "episodes": len(suite.episodes)}
    rates = []
    for count in workers_list:
        result[f"workers_{count}_load_average"] = os.getloadavg()[0]  # other work on the machine skews the ratio
        pool = worker_pools.RayPool(count)
        try:
            list(pool.map_unordered(_warm_up, list(range(count))))
            start = time.perf_counter()
            outcomes = [o for _, o in pool.map_unordered(task, suite.episodes)]
            wall = time.perf_counter() - start
        finally:
            pool.close()
        rates.append(len(suite.episodes) / wall)
        result[f"workers_{count}_wall_s"] = wall
        result[f"workers_{count}_episodes_per_s"] = rates[-1]
        result[f"workers_{count}_failed"] = sum(not o["ok"] for o in outcomes)
    result["ratio"] = rates[-1] / rates[0]
    return result
