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

A suite run is a ``SuiteResult``: its finished episodes (``EpisodeResult``), their ``SuiteAggregate``
(``METRIC_DEFINITIONS``) and the episodes that raised (``FailedEpisode``). ``SuiteResult.to_dict`` is the content of
``metrics.json``; ``SuiteResult.load`` reads one back.

Notation:
    A  actors (index 0 is the ego)     K  sub-steps of an episode (0.1 s)     J  TTC projection times
    P  past keyframes of a model window     F  forecast steps (0.5 s)     S  occupancy times
    E  finished episodes of a suite     X  failed episodes of a suite
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from bevjepa.datasets import io as bevio
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
        forecast: the forecast source (one of ``sources.FORECASTS``).
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
        """JSON-ready values (NaN becomes None): one entry of ``metrics.json``'s ``episodes``."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: object, where: str = "episode") -> EpisodeResult:
        """Inverse of ``to_dict`` (None becomes NaN); a ``ValueError`` naming ``where`` and the field otherwise."""
        return _from_record(cls, data, where)


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


def aggregate(results: Sequence[EpisodeResult], failed: int = 0) -> SuiteAggregate:
    """The suite's metrics (``METRIC_DEFINITIONS``) over its finished episodes.

    Means over the finished episodes, the largest longitudinal acceleration and jerk of any episode, and the
    counts of finished and failed episodes; the means and maxima are NaN when no episode finished.
    """

    def mean(name: str) -> float:
        values = [float(getattr(r, name)) for r in results]
        return float(np.mean(values)) if values else math.nan

    def worst(name: str) -> float:
        return max(float(getattr(r, name)) for r in results) if results else math.nan

    return SuiteAggregate(
        collision_rate=mean("collision"),
        progress_m=mean("progress_m"),
        progress_ratio=mean("progress_ratio"),
        min_ttc_s=mean("min_ttc_s"),
        ttc=mean("ttc"),
        drivable_compliance=mean("drivable_compliance"),
        dac=mean("dac"),
        comfort=mean("comfort"),
        score=mean("score"),
        max_abs_lon_accel_mps2=worst("max_abs_lon_accel_mps2"),
        max_abs_lon_jerk_mps3=worst("max_abs_lon_jerk_mps3"),
        episodes=len(results),
        failed=failed,
    )


# ---------------------------------------------------------------------------------------------------------------
# A suite run and its metrics.json.


@dataclass(frozen=True)
class SuiteAggregate:
    """A suite's metrics over its finished episodes: one field per ``METRIC_DEFINITIONS`` entry, in its order.

    Means are over the finished episodes; every mean and maximum is NaN when no episode finished.

    Attributes:
        collision_rate: share of episodes with a collision, in [0, 1].
        progress_m: mean distance driven along the route (m).
        progress_ratio: mean EP, in [0, 1].
        min_ttc_s: mean of the episodes' minimum time to collision (s), each at most ``TTC_CAP_S``.
        ttc: mean TTC sub-score, in [0, 1].
        drivable_compliance: mean share of sub-steps with the footprint on the drivable area, in [0, 1].
        dac: mean DAC sub-score, in [0, 1].
        comfort: mean comfort sub-score, in [0, 1].
        score: mean PDMS-style composite, in [0, 1].
        max_abs_lon_accel_mps2: the largest |longitudinal acceleration| of any episode (m/s²).
        max_abs_lon_jerk_mps3: the largest |longitudinal jerk| of any episode (m/s³).
        episodes: episodes that finished (>= 0).
        failed: episodes that raised (>= 0).
    """

    collision_rate: float
    progress_m: float
    progress_ratio: float
    min_ttc_s: float
    ttc: float
    drivable_compliance: float
    dac: float
    comfort: float
    score: float
    max_abs_lon_accel_mps2: float
    max_abs_lon_jerk_mps3: float
    episodes: int
    failed: int

    def __post_init__(self) -> None:
        for name in ("episodes", "failed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SuiteAggregate.{name} must be a count (an int >= 0), got {value!r}")

    def metrics(self) -> dict[str, float]:
        """``{metric: value}`` in ``METRIC_DEFINITIONS`` order, the counts as floats, NaN where undefined."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    def to_dict(self) -> dict[str, float | None]:
        """``metrics.json``'s ``aggregate``: ``metrics()`` with NaN as None."""
        return {name: (value if math.isfinite(value) else None) for name, value in self.metrics().items()}

    @classmethod
    def from_dict(cls, data: object, where: str = "aggregate") -> SuiteAggregate:
        """Inverse of ``to_dict`` (None becomes NaN); a ``ValueError`` naming ``where`` and the metric otherwise."""
        return _from_record(cls, data, where)


@dataclass(frozen=True)
class FailedEpisode:
    """An episode that raised instead of finishing (the suite went on).

    Attributes:
        episode_id: ``scenario/seed``.
        error: ``ExceptionType: message``.
        traceback: the formatted traceback.
    """

    episode_id: str
    error: str
    traceback: str

    def to_dict(self) -> dict[str, str]:
        """One entry of ``metrics.json``'s ``failed``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "failed episode") -> FailedEpisode:
        """Inverse of ``to_dict``; a ``ValueError`` naming ``where`` and the field otherwise."""
        return _from_record(cls, data, where)


_SUITE_RESULT_KEYS = (
    "suite",
    "forecast",
    "checkpoint",
    "score_formula",
    "metric_definitions",
    "episodes",
    "aggregate",
    "failed",
    "workers",
    "wall_time_s",
)
"""The keys of ``metrics.json``, in the order they are written."""


@dataclass(frozen=True)
class SuiteResult:
    """One run of a closed-loop scenario suite (``runner.run_suite``), as ``metrics.json`` holds it.

    Attributes:
        suite: the suite's name.
        forecast: the forecast source (one of ``sources.FORECASTS``).
        checkpoint: the model's run folder (an absolute path) for the ``model`` forecast; None for the others.
        episodes: [E] the finished episodes, in the suite's order.
        aggregate: the metrics over ``episodes``; its ``episodes`` is E and its ``failed`` is X.
        failed: [X] the episodes that raised, in the suite's order.
        workers: parallel episodes of the run (1: in the calling process).
        wall_time_s: the run's wall time (s), the worker pool's start included.
        score_formula: ``PDMS_FORMULA`` of the code that made the run.
        metric_definitions: ``METRIC_DEFINITIONS`` of the code that made the run.
    """

    suite: str
    forecast: str
    checkpoint: str | None
    episodes: tuple[EpisodeResult, ...]
    aggregate: SuiteAggregate
    failed: tuple[FailedEpisode, ...]
    workers: int
    wall_time_s: float
    score_formula: str = PDMS_FORMULA
    metric_definitions: Mapping[str, str] = field(default_factory=lambda: dict(METRIC_DEFINITIONS))

    def __post_init__(self) -> None:
        for name, kind in (("episodes", EpisodeResult), ("failed", FailedEpisode)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(item, kind) for item in value):
                raise ValueError(f"SuiteResult.{name} must be a tuple of {kind.__name__}, got {value!r:.80}")
        if not isinstance(self.aggregate, SuiteAggregate):
            raise ValueError(f"SuiteResult.aggregate must be a SuiteAggregate, got {type(self.aggregate).__name__}")
        if (self.aggregate.episodes, self.aggregate.failed) != (len(self.episodes), len(self.failed)):
            raise ValueError(
                f"SuiteResult.aggregate counts {self.aggregate.episodes} finished and {self.aggregate.failed} failed "
                f"episodes, but the result lists {len(self.episodes)} and {len(self.failed)}"
            )

    def to_dict(self) -> dict:
        """The content of ``metrics.json`` (strict JSON values: NaN as None), keys in ``_SUITE_RESULT_KEYS`` order."""
        return {
            "suite": self.suite,
            "forecast": self.forecast,
            "checkpoint": self.checkpoint,
            "score_formula": self.score_formula,
            "metric_definitions": dict(self.metric_definitions),
            "episodes": [episode.to_dict() for episode in self.episodes],
            "aggregate": self.aggregate.to_dict(),
            "failed": [failure.to_dict() for failure in self.failed],
            "workers": self.workers,
            "wall_time_s": self.wall_time_s if math.isfinite(self.wall_time_s) else None,
        }

    @classmethod
    def from_dict(cls, data: object) -> SuiteResult:
        """Inverse of ``to_dict``; a ``ValueError`` naming the key that is missing, unknown or of the wrong type."""
        _check_keys(data, _SUITE_RESULT_KEYS, "the file")
        assert isinstance(data, Mapping)
        definitions = data["metric_definitions"]
        if not isinstance(definitions, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in definitions.items()
        ):
            raise ValueError("'metric_definitions' is not an object of strings")
        for name in ("episodes", "failed"):
            if not isinstance(data[name], list):
                raise ValueError(f"{name!r} is a {type(data[name]).__name__}, not a list")
        checkpoint = data["checkpoint"]
        return cls(
            suite=_json_value("str", data["suite"], "suite"),
            forecast=_json_value("str", data["forecast"], "forecast"),
            checkpoint=None if checkpoint is None else _json_value("str", checkpoint, "checkpoint"),
            episodes=tuple(EpisodeResult.from_dict(e, f"episodes[{i}]") for i, e in enumerate(data["episodes"])),
            aggregate=SuiteAggregate.from_dict(data["aggregate"]),
            failed=tuple(FailedEpisode.from_dict(f, f"failed[{i}]") for i, f in enumerate(data["failed"])),
            workers=_json_value("int", data["workers"], "workers"),
            wall_time_s=_json_value("float", data["wall_time_s"], "wall_time_s"),
            score_formula=_json_value("str", data["score_formula"], "score_formula"),
            metric_definitions=dict(definitions),
        )

    def save(self, path: Path) -> Path:
        """Write ``to_dict()`` as strict JSON, atomically (temporary file, then rename)."""
        path = Path(path)
        bevio.atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: Path) -> SuiteResult:
        """Read a ``metrics.json`` written by ``bevjepa closed-loop`` (or ``save``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not such a ``metrics.json``; the message names the file and what is wrong.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"closed-loop metrics {path} not found; write it with `bevjepa closed-loop --out`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"closed-loop metrics {path} is not valid JSON ({error}); rerun `bevjepa closed-loop` to rewrite it"
            ) from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(
                f"closed-loop metrics {path} is not a `bevjepa closed-loop` metrics.json: {error}; rerun "
                "`bevjepa closed-loop` to rewrite it"
            ) from None


def _check_keys(data: object, keys: Sequence[str], where: str) -> None:
    """A ``ValueError`` naming ``where`` unless ``data`` is an object with exactly ``keys``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} is a JSON {type(data).__name__}, not an object")
    missing = [k for k in keys if k not in data]
    unknown = [str(k) for k in data if k not in keys]
    if missing or unknown:
        found = ", ".join(
            part for part in (f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else "") if part
        )
        raise ValueError(f"{where}: {found}")


def _json_value(kind: str, value: object, where: str) -> object:
    """A JSON value read as a field of type ``kind`` (``str``, ``int``, ``float``, ``bool``; null is a NaN float)."""
    if kind == "float":
        if value is None:
            return math.nan  # to_dict writes NaN as null
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind == "int":
        if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "str":
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: no JSON reader for fields of type {kind!r}")
    wanted = {"float": "a number or null", "int": "a whole number"}.get(kind, f"a {kind}")
    raise ValueError(f"{where} is {value!r:.60}, not {wanted}")


def _from_record(cls, data: object, where: str):
    """An instance of the dataclass ``cls`` from a JSON object holding exactly its fields (``_json_value``)."""
    names = [f.name for f in fields(cls)]
    _check_keys(data, names, where)
    assert isinstance(data, Mapping)
    return cls(**{f.name: _json_value(str(f.type), data[f.name], f"{where}.{f.name}") for f in fields(cls)})
