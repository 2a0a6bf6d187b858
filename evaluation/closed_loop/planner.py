"""A sampling planner: candidate longitudinal plans along the ego's path, scored against an ``OccupancyForecast``.

The ego drives along a fixed path (its route); the planner only chooses how fast. Every planning step it samples
``len(PlannerConfig.accelerations_mps2)`` candidates, each a commanded acceleration reached from the current one
within the world's jerk limit and held over the horizon (easing onto the cruise speed or into a stop), turns
each into rear-axle poses [K, 3] in the current (t0) ego frame at ``PlannerConfig.pose_dt_s`` intervals, and
picks the one with the lowest cost:

    cost = collision_weight · collision + progress_weight · (1 - progress / best progress) + comfort_weight · comfort

where

- ``collision`` = max over the candidate's poses of ``r_t − min over candidates of r_t``, the risk it adds at
  time ``t`` over the least that any candidate reaches then, where ``r_t = p_t · (1 - 0.5 · t / horizon) ·
  severity_t``, with ``p_t`` the forecast's ``OccupancyForecast.collision_probability`` of the footprint (enlarged
  by ``footprint_margin_m``) at pose ``t``: a collision late in the horizon costs half one that is about to happen;
  and ``severity_t`` = ``standstill_severity + (1 - standstill_severity) · v_t / v_top`` (``v_t`` the candidate's
  speed at the pose, ``v_top`` the fastest speed of any candidate): hitting something at speed costs more than
  touching it almost stopped, so where every candidate runs into the forecast occupancy, the one that brakes
  hardest costs least (without it the collision terms tied and progress chose to drive on into a car standing
  ahead). The risk no candidate can avoid (the footprint now, and a car that close a moment later) is taken off
  at each time: without that, its maximum masked what the candidates changed later, the collision terms tied
  again, and progress chose to drive on into a car that stopped a few metres ahead. Where some candidate is clear
  at every time, the term is the plain maximum of ``r_t``. One more risk joins those of the poses: **whether
  the candidate can still stop** after the horizon. Braking from its last pose at ``stopping_decel_mps2``
  (reached within the jerk limit; harder where it brakes harder already), the footprint sweeps on to a stop;
  ``r_stop = p_stop · 0.5 · severity_K``, with ``p_stop`` the forecast's
  ``OccupancyForecast.standing_collision_probability`` along that sweep (what the forecast holds in place over
  its last ``standing_held_s``; a car driving on ahead does not count). Without it, a car standing beyond the
  horizon stayed out of every candidate's 2 s until the least braking that looked clear could no longer stop
  short of it;
- ``progress`` is the distance the candidate covers over the horizon (m), relative to the farthest candidate;
- ``comfort`` = (a / 4)² + (|a - a_now| / 8)², the commanded acceleration and the change from the current one.

Default weights: collision 10, progress 1, comfort 0.2: no amount of progress or comfort is worth a likely
collision, and among safe candidates progress decides. Without a forecast (the ``none`` source) the collision
term is dropped and the planner drives at its cruise speed.

Notation:
    N  candidate plans     K  poses of a plan (times 0, dt, ..., horizon)     F  0.5 s action steps
    M  poses of a stopping sweep after the horizon
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bevjepa.datasets import geometry
from bevjepa.prediction import forecaster
from bevjepa.sim import paths, world

ACTION_STEP_S = 0.5
"""One world-model action step (a keyframe interval)."""
CRUISE_EASE_S = 1.0
"""A candidate's acceleration is at most (cruise speed - speed) / this: it settles onto the cruise speed."""
STOP_EASE_S = 0.5
"""A candidate's deceleration is at most speed / this: it eases into a stop."""
FINE_DT_S = 0.05
"""The step (s) a candidate's speed profile is integrated at, before it is sampled at the poses."""


@dataclass(frozen=True)
class PlannerConfig:
    """The sampling planner.

    Attributes:
        horizon_s: how far ahead a candidate is scored (s); the forecasts reach 2 s.
        pose_dt_s: time between a candidate's poses (s).
        accelerations_mps2: the candidates' constant commanded accelerations (m/s²).
        collision_weight: weight of the collision term.
        progress_weight: weight of the progress term.
        comfort_weight: weight of the comfort term.
        footprint_margin_m: added to the ego's length and width when the forecast is queried (m).
        standstill_severity: the share of a collision's cost that remains at standstill (in [0, 1]; 1: a
            collision costs the same at any speed).
        max_jerk_mps3: how fast a candidate's acceleration may change (m/s³); the world's own limit
            (``world.IdmParams.max_jerk_mps3``), so that the ego drives what was planned.
        stopping_decel_mps2: the braking (m/s², positive) that the stopping check assumes after the horizon; firm,
            below the hardest candidate's, to keep a margin for what the forecast places a little wrong.
        stopping_pose_spacing_m: the largest distance between the poses of a stopping sweep (m).
        standing_held_s: what the forecast holds in place over its last this many seconds is what the stopping
            check brakes for (``OccupancyForecast.standing_collision_probability``).
    """

    horizon_s: float = 2.0
    pose_dt_s: float = 0.25
    accelerations_mps2: tuple[float, ...] = (-6.0, -4.0, -2.5, -1.5, -0.5, 0.0, 0.75, 1.5)
    collision_weight: float = 10.0
    progress_weight: float = 1.0
    comfort_weight: float = 0.2
    footprint_margin_m: float = 0.6
    standstill_severity: float = 0.5
    max_jerk_mps3: float = 6.0
    stopping_decel_mps2: float = 4.0
    stopping_pose_spacing_m: float = 1.0
    standing_held_s: float = 0.5

    def __post_init__(self) -> None:
        if not (self.horizon_s > 0 and self.pose_dt_s > 0):
            raise ValueError("PlannerConfig: horizon_s and pose_dt_s must be positive")
        if not self.accelerations_mps2:
            raise ValueError("PlannerConfig.accelerations_mps2 needs at least one candidate")
        if not self.max_jerk_mps3 > 0:
            raise ValueError(f"PlannerConfig.max_jerk_mps3 must be positive, got {self.max_jerk_mps3}")
        if not (self.stopping_decel_mps2 > 0 and self.stopping_pose_spacing_m > 0 and self.standing_held_s >= 0):
            raise ValueError(
                "PlannerConfig: stopping_decel_mps2 and stopping_pose_spacing_m must be positive, standing_held_s "
                "not negative"
            )
        if min(self.collision_weight, self.progress_weight, self.comfort_weight, self.footprint_margin_m) < 0:
            raise ValueError("PlannerConfig: weights and footprint_margin_m must not be negative")
        if not 0 <= self.standstill_severity <= 1:
            raise ValueError(f"PlannerConfig.standstill_severity must lie in [0, 1], got {self.standstill_severity}")


@dataclass(frozen=True)
class Plan:
    """One candidate: a speed profile along the ego's path.

    Attributes:
        accel_mps2: the commanded acceleration (m/s²).
        times_s: [K] float64 — seconds after t0 of each pose (0 first).
        s_m: [K] float64 — distance along the path from the ego's current position (m).
        speed_mps: [K] float64 — speed at each pose (m/s).
        poses: [K, 3] float64 — x, y (m), yaw (rad) of the rear axle in the t0 ego frame.
        profile_times_s: [L] float64 — the fine times the speed profile was integrated at (s).
        profile_speed_mps: [L] float64 — the speed at each of them (m/s).
        stopping_poses: [M, 3] float64 — rear-axle poses (t0 ego frame) from the last pose to where the ego stops
            braking at ``PlannerConfig.stopping_decel_mps2`` after the horizon, at most
            ``PlannerConfig.stopping_pose_spacing_m`` apart (M ≥ 1; the last pose alone when it stands).
    """

    accel_mps2: float
    times_s: np.ndarray
    s_m: np.ndarray
    speed_mps: np.ndarray
    poses: np.ndarray
    profile_times_s: np.ndarray
    profile_speed_mps: np.ndarray
    stopping_poses: np.ndarray

    def accel_profile(self, dt_s: float, steps: int) -> np.ndarray:
        """[steps] float64 the accelerations (m/s²) that follow this plan's speed profile over ``dt_s`` sub-steps.

        Beyond the horizon the plan holds its last speed.
        """
        t = np.arange(steps + 1) * dt_s
        speed = np.interp(t, self.profile_times_s, self.profile_speed_mps)
        return np.diff(speed) / dt_s

    def actions(self, steps: int = 4) -> np.ndarray:
        """[F, 3] float32 the ego motion over each 0.5 s step (dx, dy in m, dyaw in rad, in the step's start frame)."""
        t = np.arange(steps + 1) * ACTION_STEP_S
        x = np.interp(t, self.times_s, self.poses[:, 0])
        y = np.interp(t, self.times_s, self.poses[:, 1])
        yaw = np.interp(t, self.times_s, np.unwrap(self.poses[:, 2]))
        poses = np.stack([x, y, yaw], axis=1)  # [F + 1, 3] in the t0 ego frame
        return geometry.ego_motion(poses[:-1], poses[1:]).astype(np.float32)


@dataclass(frozen=True)
class Choice:
    """The planner's decision.

    Attributes:
        plan: the chosen candidate.
        index: its index among ``candidates``.
        candidates: every candidate, in ``PlannerConfig.accelerations_mps2`` order.
        costs: [N, 4] float64 — total, collision, progress and comfort terms of each candidate (unweighted terms;
            the collision term is what the candidate adds over the least any candidate reaches, module docstring).
    """

    plan: Plan
    index: int
    candidates: tuple[Plan, ...]
    costs: np.ndarray = field(repr=False)


def ego_poses_along_path(path: paths.Path, s_m: np.ndarray, ego_from_global: geometry.RigidTransform) -> np.ndarray:
    """Rear-axle poses of the ego at arc lengths of its path, in an ego frame.

    Args:
        path: the ego's path (its box centre moves along it, as ``world.ActorSpec.path``).
        s_m: [K] float — arc lengths (m, from the path's start).
        ego_from_global: the frame to express the poses in (the t0 ego frame).

    Returns:
        [K, 3] float64 x, y (m), yaw (rad) of the rear axle.
    """
    xy, heading = path.pose_at(np.asarray(s_m, dtype=np.float64))  # [K, 2], [K]
    rear = xy - np.stack([np.cos(heading), np.sin(heading)], axis=1) * world.EGO_REAR_AXLE_TO_CENTER_M
    local = ego_from_global.apply(np.concatenate([rear, np.zeros((len(rear), 1))], axis=1))[:, :2]  # [K, 2]
    yaw = geometry.wrap_angle(heading + ego_from_global.yaw_rad)
    return np.concatenate([local, np.asarray(yaw).reshape(-1, 1)], axis=1)


class SamplingPlanner:
    """Samples constant-acceleration candidates along the ego's path and picks the cheapest (module docstring)."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = PlannerConfig() if config is None else config

    def candidates(
        self,
        path: paths.Path,
        s_m: float,
        speed_mps: float,
        cruise_speed_mps: float,
        ego_from_global: geometry.RigidTransform,
        accel_mps2: float = 0.0,
    ) -> list[Plan]:
        """The candidate plans from the ego's current state.

        Each candidate's acceleration moves from the current one towards its own at most ``max_jerk_mps3``, eases
        off as the speed nears the cruise speed (within ``CRUISE_EASE_S``) or zero (``STOP_EASE_S``).

        Args:
            path: the ego's path.
            s_m: the ego's current arc length along it (m).
            speed_mps: its current speed (m/s).
            cruise_speed_mps: the speed it never exceeds (m/s).
            ego_from_global: the current (t0) ego frame.
            accel_mps2: its current acceleration (m/s²).
        """
        config = self.config
        times = np.arange(0.0, config.horizon_s + 1e-9, config.pose_dt_s)  # [K]
        accel = np.asarray(config.accelerations_mps2, dtype=np.float64)  # [N]
        fine_dt = FINE_DT_S
        fine_steps = int(round(config.horizon_s / fine_dt))
        fine_t = np.arange(fine_steps + 1) * fine_dt  # integrate finely, then sample
        cap = max(cruise_speed_mps, speed_mps)
        speed, current = self._speed_profiles(np.full(len(accel), speed_mps), float(accel_mps2), accel, cap, fine_steps)
        distance = _travelled(speed, fine_dt)  # [N, K_fine]
        # After the horizon: braking at stopping_decel_mps2, or harder where a candidate brakes harder already.
        stop_ramp_s = (config.stopping_decel_mps2 + np.abs(current).max(initial=0.0)) / config.max_jerk_mps3
        stop_steps = int(np.ceil((stop_ramp_s + speed[:, -1].max() / config.stopping_decel_mps2 + 1.0) / fine_dt))
        braking = np.minimum(current, -config.stopping_decel_mps2)  # [N]
        stopping = _travelled(self._speed_profiles(speed[:, -1], current, braking, cap, stop_steps)[0], fine_dt)[:, -1]
        plans = []
        for n, a in enumerate(accel):  # a handful of candidates
            s_rel = np.interp(times, fine_t, distance[n])  # [K]
            v = np.interp(times, fine_t, speed[n])
            poses = ego_poses_along_path(path, s_m + s_rel, ego_from_global)
            sweep = int(np.ceil(stopping[n] / config.stopping_pose_spacing_m)) + 1
            stop_s = s_m + s_rel[-1] + np.linspace(0.0, stopping[n], sweep)  # [M]
            stopping_poses = ego_poses_along_path(path, stop_s, ego_from_global)
            plans.append(Plan(float(a), times, s_rel, v, poses, fine_t, speed[n], stopping_poses))
        return plans

    def _speed_profiles(
        self, speed_mps: np.ndarray, accel_mps2: np.ndarray | float, goal_mps2: np.ndarray, cap_mps: float, steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every candidate's speed, integrated at ``FINE_DT_S``.

        Its acceleration moves towards its goal within ``max_jerk_mps3``, easing off near ``cap_mps``
        (``CRUISE_EASE_S``) and near zero (``STOP_EASE_S``).

        Args:
            speed_mps: [N] the starting speeds (m/s).
            accel_mps2: [N] or scalar, the starting accelerations (m/s²).
            goal_mps2: [N] each candidate's commanded acceleration (m/s²).
            cap_mps: the speed none exceeds (m/s).
            steps: fine steps to integrate.

        Returns:
            [N, steps + 1] float64 speeds (m/s, the start first) and [N] the accelerations at the end (m/s²).
        """
        speed = np.empty((len(goal_mps2), steps + 1))
        speed[:, 0] = speed_mps
        current = np.broadcast_to(np.asarray(accel_mps2, dtype=np.float64), speed[:, 0].shape).copy()  # [N]
        max_change = self.config.max_jerk_mps3 * FINE_DT_S
        for k in range(steps):  # time steps, every candidate at once
            goal = np.minimum(goal_mps2, (cap_mps - speed[:, k]) / CRUISE_EASE_S)  # settle onto the cap
            goal = np.maximum(goal, -speed[:, k] / STOP_EASE_S)  # and ease into a stop
            current = current + np.clip(goal - current, -max_change, max_change)
            speed[:, k + 1] = np.maximum(speed[:, k] + current * FINE_DT_S, 0.0)
        return speed, current

    def score(
        self,
        plans: list[Plan],
        forecasts: forecaster.OccupancyForecast | list[forecaster.OccupancyForecast] | None,
        accel_now_mps2: float,
    ) -> np.ndarray:
        """[N, 4] total cost and the collision, progress and comfort terms of each plan.

        Args:
            plans: the candidates.
            forecasts: one forecast for all, one per plan (a world model rolled out under each), or None.
            accel_now_mps2: the ego's current acceleration (m/s²).
        """
        config = self.config
        length_m = world.EGO_SIZE_WLH_M[1] + config.footprint_margin_m
        width_m = world.EGO_SIZE_WLH_M[0] + config.footprint_margin_m
        collision = np.zeros(len(plans))
        if forecasts is not None:
            if any(not np.array_equal(plan.times_s, plans[0].times_s) for plan in plans):
                raise ValueError("SamplingPlanner.score: candidates must share their pose times")
            per_plan = forecasts if isinstance(forecasts, list) else [forecasts] * len(plans)
            top_speed = max(max(float(plan.speed_mps.max()) for plan in plans), 1e-6)
            risk = np.zeros((len(plans), len(plans[0].times_s) + 1))  # [N, K + 1]: the poses, then the stop
            for n, (plan, forecast) in enumerate(zip(plans, per_plan, strict=True)):  # N candidates × K poses
                p = np.array(
                    [
                        forecast.collision_probability(
                            plan.poses[k : k + 1],
                            plan.times_s[k : k + 1],
                            length_m=length_m,
                            width_m=width_m,
                            rear_axle_to_center_m=world.EGO_REAR_AXLE_TO_CENTER_M,
                        )
                        for k in range(len(plan.times_s))
                    ]
                )
                p_stop = forecast.standing_collision_probability(
                    plan.stopping_poses,
                    config.standing_held_s,
                    length_m=length_m,
                    width_m=width_m,
                    rear_axle_to_center_m=world.EGO_REAR_AXLE_TO_CENTER_M,
                )
                severity = config.standstill_severity + (1 - config.standstill_severity) * plan.speed_mps / top_speed
                risk[n, :-1] = p * (1 - 0.5 * plan.times_s / config.horizon_s) * severity
                risk[n, -1] = p_stop * 0.5 * severity[-1]
            collision = (risk - risk.min(axis=0)).max(axis=1)  # what each adds over the least reachable at each time
        reach = np.array([plan.s_m[-1] for plan in plans])
        progress = 1.0 - reach / max(float(reach.max()), 1e-6)
        accel = np.array([plan.accel_mps2 for plan in plans])
        comfort = (accel / 4.0) ** 2 + (np.abs(accel - accel_now_mps2) / 8.0) ** 2
        total = (
            config.collision_weight * collision + config.progress_weight * progress + config.comfort_weight * comfort
        )
        return np.stack([total, collision, progress, comfort], axis=1)

    def choose(
        self,
        plans: list[Plan],
        forecasts: forecaster.OccupancyForecast | list[forecaster.OccupancyForecast] | None,
        accel_now_mps2: float,
    ) -> Choice:
        """The cheapest candidate (ties go to the earlier candidate in ``PlannerConfig.accelerations_mps2``)."""
        costs = self.score(plans, forecasts, accel_now_mps2)
        index = int(np.argmin(costs[:, 0]))
        return Choice(plans[index], index, tuple(plans), costs)


def _travelled(speed_mps: np.ndarray, dt_s: float) -> np.ndarray:
    """[N, L] float64 the distance (m) covered by each of the speed profiles [N, L] (m/s, ``dt_s`` apart), 0 first."""
    steps = np.cumsum((speed_mps[:, 1:] + speed_mps[:, :-1]) / 2 * dt_s, axis=1)
    return np.concatenate([np.zeros((len(speed_mps), 1)), steps], axis=1)
