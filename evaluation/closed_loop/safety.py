"""Closed-loop safety metrics of an episode and of a suite.

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

Notation:
    A  actors (index 0 is the ego)     K  sub-steps of an episode (0.1 s)     J  TTC projection times
    P  past keyframes of a model window     F  forecast steps (0.5 s)     S  occupancy times
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from bevjepa.datasets import rasterize
from bevjepa.evaluation.closed_loop import suite_files
from bevjepa.sim import materials, world

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
_DRIVABLE = np.array(
    [materials.Surface.ROAD, materials.Surface.CROSSWALK, materials.Surface.LANE_MARKING, materials.Surface.PARKING]
)


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
    dt_s: float = suite_files.SUB_STEP_S,
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
    jerk = np.diff(lon_accel) / suite_files.SUB_STEP_S if k_count > 1 else np.zeros(1)
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
        "collision_time_s": first * suite_files.SUB_STEP_S if collision else float("nan"),
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
