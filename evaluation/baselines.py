"""Baselines on the same interfaces as the model: constant velocity, constant turn rate and velocity, persistence.

* ``constant_velocity``: the ground-truth t0 boxes moved at their annotated velocity (oracle input: it sees the
  annotations, not the sensors; on nuScenes the annotated velocity is the devkit's ``box_velocity``, a centred
  difference over the neighbouring annotations, so it looks 0.5 s ahead).
* ``constant_velocity_past``: the same boxes moved at the velocity of their last past step (``past_velocities``;
  causal, the speed the devkit's baseline takes). ``constant_velocity_heading`` is constant velocity configured as
  the devkit's ``nuscenes.prediction.models.physics.ConstantVelocityHeading`` (the speed of the last past step
  along the box heading).
* ``constant_velocity_anchor``: the same boxes moved at their velocity at t0 estimated from the last three past
  positions (``anchor_velocities``; causal): the model's trajectory head with its mode 0 alone.
* ``constant_velocity_tracked``: the model's own tracked agents moved at their track's velocity; it sees exactly
  the model's sensor input, the like-for-like comparison for the forecast from the sensors.
* ``tracked_true_velocity``: the same tracked boxes, each moved at the annotated velocity of the agent it stands
  for (``true_track_velocities``; a diagnostic that needs annotations). Beside the two above it splits what the
  forecast from the sensors loses against the annotated boxes: ``constant_velocity_tracked`` to it is what the
  tracks' velocities cost, it to ``constant_velocity`` what their t0 boxes cost.
* ``ctrv``: constant turn rate and velocity; the yaw rate comes from the agent's past positions
  (``yaw_rate_from_past``).
* ``persistence``: the world stays as it is at t0.

Occupancy baselines return 0/1 maps and an instance map (the ids of the boxes they move), so VPQ needs no
connected components for them.

Notation:
    A  agents     P  past keyframes     T  trajectory steps (0.5 s)     S  occupancy steps (t0 and F more)
    C  classes    H, W  the target grid    D  detections
"""

from __future__ import annotations

import numpy as np
import torch

from bevjepa.datasets import geometry, rasterize
from bevjepa.prediction import heads, tracking

STEP_S = 0.5
MIN_TURN_SPEED_MPS = 0.5
"""Below this speed over a past step, the step's direction is too noisy to give a yaw rate (CTRV uses 0)."""
MAX_YAW_RATE_RADPS = 1.0
"""CTRV clips the estimated yaw rate to this magnitude (rad/s)."""


def agent_velocities(agent_velocity: np.ndarray, agent_past: np.ndarray, agent_past_mask: np.ndarray) -> np.ndarray:
    """Each agent's velocity (m/s, t0 frame): its annotated velocity, else the last past displacement, else 0.

    Args:
        agent_velocity: [A, 2] vx, vy (NaN where unknown).
        agent_past: [A, P, 2] xy at the past keyframes (t0 last).
        agent_past_mask: [A, P].

    Returns:
        [A, 2] float64.
    """
    velocity = np.asarray(agent_velocity, dtype=np.float64).copy()
    from_past = (agent_past[:, -1] - agent_past[:, -2]) / STEP_S if agent_past.shape[1] >= 2 else velocity * 0
    past_ok = (
        agent_past_mask[:, -1] & agent_past_mask[:, -2] if agent_past.shape[1] >= 2 else np.zeros(len(velocity), bool)
    )
    unknown = ~np.isfinite(velocity).all(axis=1)
    velocity[unknown] = np.where(past_ok[unknown, None], from_past[unknown], 0.0)
    return velocity


def past_velocities(agent_past: np.ndarray, agent_past_mask: np.ndarray) -> np.ndarray:
    """[A, 2] float64: each agent's last past displacement / 0.5 s (m/s, t0 frame), 0 without two past positions.

    Causal, and the speed the devkit's ``ConstantVelocityHeading`` takes (``PredictHelper.get_velocity_for_agent``).
    """
    count = len(agent_past)
    return agent_velocities(np.full((count, 2), np.nan), agent_past, agent_past_mask)


def anchor_velocities(agent_past: np.ndarray, agent_past_mask: np.ndarray) -> np.ndarray:
    """[A, 2] float64: each agent's velocity at t0 as the trajectory head estimates it (``heads.past_motion``).

    Causal: the second-order backward difference of the last three past positions (the last displacement with
    two, 0 with fewer), the velocity the head's constant-velocity anchor (its mode 0) moves at.
    """
    past = torch.as_tensor(np.asarray(agent_past, dtype=np.float64))
    mask = torch.as_tensor(np.asarray(agent_past_mask, dtype=bool))
    return heads.past_motion(past, mask, STEP_S)[0].numpy()


def constant_velocity_trajectories(agent_xy: np.ndarray, velocity: np.ndarray, steps: int = 12) -> np.ndarray:
    """[A, 1, T, 2] one mode per agent: its t0 position moved at constant velocity (``velocity`` [A, 2] m/s)."""
    times = np.arange(1, steps + 1) * STEP_S  # [T]
    return (agent_xy[:, None, :] + velocity[:, None, :] * times[None, :, None])[:, None]  # [A, 1, T, 2]


def heading_velocity(speed_mps: np.ndarray, yaw_rad: np.ndarray) -> np.ndarray:
    """[A, 2] velocity (m/s) of speed ``speed_mps`` [A] along heading ``yaw_rad`` [A]; an unknown (NaN) speed is 0."""
    speed = np.nan_to_num(np.asarray(speed_mps, dtype=np.float64), nan=0.0)
    yaw = np.asarray(yaw_rad, dtype=np.float64)
    return np.stack([speed * np.cos(yaw), speed * np.sin(yaw)], axis=-1)


def constant_velocity_heading(
    agent_xy: np.ndarray,
    speed_mps: np.ndarray,
    yaw_rad: np.ndarray,
    seconds: float = 6.0,
    frequency_hz: float = 2.0,
) -> np.ndarray:
    """The constant-velocity baseline configured as the devkit's ``ConstantVelocityHeading``.

    The devkit takes the speed from ``PredictHelper.get_velocity_for_agent`` (NaN → 0) and the heading from the
    annotation's rotation (``quaternion_yaw``), and predicts ``seconds`` ahead at ``frequency_hz``.

    Args:
        agent_xy: [A, 2] float — positions (m), any frame (the devkit's: global).
        speed_mps: [A] float — speeds (m/s); NaN where unknown.
        yaw_rad: [A] float — headings (rad) in the same frame.
        seconds: horizon (s).
        frequency_hz: predictions per second.

    Returns:
        [A, 1, T, 2] float64, T = seconds * frequency_hz.
    """
    steps = round(seconds * frequency_hz)
    times = np.arange(1, steps + 1) / frequency_hz  # [T] s
    velocity = heading_velocity(speed_mps, yaw_rad)  # [A, 2]
    xy = np.asarray(agent_xy, dtype=np.float64)
    return (xy[:, None, :] + times[None, :, None] * velocity[:, None, :])[:, None]  # [A, 1, T, 2]


def devkit_kinematics(helper, instance_tokens: list[str], sample_tokens: list[str]) -> tuple[np.ndarray, ...]:
    """``ConstantVelocityHeading``'s inputs read from the devkit tables, in the global frame.

    Args:
        helper: a ``nuscenes.prediction.PredictHelper``.
        instance_tokens: [A] the agents.
        sample_tokens: [A] the sample of each agent.

    Returns:
        xy [A, 2] (m, global), speed [A] (m/s, NaN where the devkit has none), yaw [A] (rad, global).
    """
    records = [helper.get_sample_annotation(i, s) for i, s in zip(instance_tokens, sample_tokens, strict=True)]
    xy = np.array([r["translation"][:2] for r in records], dtype=np.float64).reshape(-1, 2)
    speed = np.array([helper.get_velocity_for_agent(i, s) for i, s in zip(instance_tokens, sample_tokens, strict=True)])
    yaw = geometry.quaternion_yaw(np.array([r["rotation"] for r in records], dtype=np.float64).reshape(-1, 4))
    return xy, speed.astype(np.float64), yaw


def yaw_rate_from_past(
    agent_past: np.ndarray,
    agent_past_mask: np.ndarray,
    min_speed_mps: float = MIN_TURN_SPEED_MPS,
    max_yaw_rate_radps: float = MAX_YAW_RATE_RADPS,
) -> np.ndarray:
    """Each agent's yaw rate (rad/s) from its last three past positions.

    The direction of the displacement over each of the last two past steps is the heading at the step's middle;
    their wrapped difference over one step (0.5 s) is the yaw rate. It is 0 where a position is missing or a
    step is slower than ``min_speed_mps`` (the direction of a short displacement is noise), and clipped to
    ±``max_yaw_rate_radps``.

    Args:
        agent_past: [A, P, 2] float — xy (m) at the past keyframes, t0 last.
        agent_past_mask: [A, P] bool.
        min_speed_mps: the slowest step that gives a direction (m/s).
        max_yaw_rate_radps: the largest magnitude kept (rad/s).

    Returns:
        [A] float64.
    """
    past = np.asarray(agent_past, dtype=np.float64)
    if past.shape[1] < 3:
        return np.zeros(past.shape[0])
    steps = past[:, -2:] - past[:, -3:-1]  # [A, 2, 2] the last two displacements
    direction = np.arctan2(steps[..., 1], steps[..., 0])  # [A, 2]
    fast = (np.linalg.norm(steps, axis=-1) >= min_speed_mps * STEP_S).all(axis=1)  # [A]
    valid = np.asarray(agent_past_mask, dtype=bool)[:, -3:].all(axis=1) & fast
    rate = geometry.wrap_angle(direction[:, 1] - direction[:, 0]) / STEP_S
    return np.where(valid, np.clip(rate, -max_yaw_rate_radps, max_yaw_rate_radps), 0.0)


def ctrv_states(
    agent_xy: np.ndarray, velocity: np.ndarray, yaw_rate: np.ndarray, times_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and heading changes under constant turn rate and velocity.

    The agent moves at its speed ``|velocity|`` along a heading that starts as the velocity's direction and turns
    at ``yaw_rate``: x(t) = x0 + v / w (sin(h0 + w t) - sin h0), y(t) = y0 + v / w (cos h0 - cos(h0 + w t));
    where w is 0 this is constant velocity exactly.

    Args:
        agent_xy: [A, 2] float — t0 positions (m).
        velocity: [A, 2] float — t0 velocities (m/s).
        yaw_rate: [A] float — rad/s.
        times_s: [T] float — seconds after t0.

    Returns:
        xy [A, T, 2] float64, heading change [A, T] (rad) since t0.
    """
    xy0 = np.asarray(agent_xy, dtype=np.float64)[:, None]  # [A, 1, 2]
    v = np.asarray(velocity, dtype=np.float64)
    w = np.asarray(yaw_rate, dtype=np.float64)[:, None]  # [A, 1]
    t = np.asarray(times_s, dtype=np.float64)[None]  # [1, T]
    speed = np.linalg.norm(v, axis=1)[:, None]  # [A, 1]
    h0 = np.arctan2(v[:, 1], v[:, 0])[:, None]
    turning = w != 0
    safe_w = np.where(turning, w, 1.0)
    dx = np.where(turning, speed / safe_w * (np.sin(h0 + w * t) - np.sin(h0)), v[:, :1] * t)  # [A, T]
    dy = np.where(turning, speed / safe_w * (np.cos(h0) - np.cos(h0 + w * t)), v[:, 1:] * t)
    return xy0 + np.stack([dx, dy], axis=-1), w * t


def ctrv_trajectories(agent_xy: np.ndarray, velocity: np.ndarray, yaw_rate: np.ndarray, steps: int = 12) -> np.ndarray:
    """[A, 1, T, 2] one CTRV mode per agent (see ``ctrv_states``); ``velocity`` [A, 2] m/s, ``yaw_rate`` [A] rad/s."""
    xy, _ = ctrv_states(agent_xy, velocity, yaw_rate, np.arange(1, steps + 1) * STEP_S)
    return xy[:, None]


def moving_boxes_occupancy(
    box: np.ndarray,
    box_class: np.ndarray,
    centers: np.ndarray,
    yaws: np.ndarray,
    grid: geometry.GridSpec,
    classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of fixed size rasterized at given poses, one occupancy map and instance map per step.

    Args:
        box: [A, 7] x, y, z, width, length, height (m), yaw (rad); only the sizes are used.
        box_class: [A] int — class index (-1 skips a box).
        centers: [S, A, 2] float — centre at each step (m).
        yaws: [S, A] float — heading at each step (rad).
        grid: the target grid.
        classes: C.

    Returns:
        occupancy [S, C, H, W] bool, instances [S, H, W] int64 (1 + box index, 0 free; the same at every step).
    """
    maps, ids = [], []
    for k in range(centers.shape[0]):  # steps, each vectorized over boxes and cells
        occupancy, instance = rasterize.rasterize_boxes(
            grid, centers[k], box[:, [3, 4]], yaws[k], np.asarray(box_class).astype(np.int64), classes
        )
        maps.append(occupancy)
        ids.append(instance)
    return np.stack(maps), np.stack(ids).astype(np.int64)


def constant_velocity_occupancy(
    agent_box: np.ndarray,
    agent_class: np.ndarray,
    velocity: np.ndarray,
    grid: geometry.GridSpec,
    classes: int,
    steps: int = 4,
) -> np.ndarray:
    """[S, C, H, W] bool: the t0 boxes moved at constant velocity and rasterized at t0 and each of ``steps``.

    Args:
        agent_box: [A, 7] x, y, z, w, l, h, yaw at t0.
        agent_class: [A] class index.
        velocity: [A, 2] m/s.
    """
    return constant_velocity_occupancy_instances(agent_box, agent_class, velocity, grid, classes, steps)[0]


def constant_velocity_occupancy_instances(
    agent_box: np.ndarray,
    agent_class: np.ndarray,
    velocity: np.ndarray,
    grid: geometry.GridSpec,
    classes: int,
    steps: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """``constant_velocity_occupancy`` and its instance map [S, H, W] int64 (1 + agent index, 0 free)."""
    times = np.arange(steps + 1) * STEP_S  # [S]
    box = np.asarray(agent_box, dtype=np.float64).reshape(-1, 7)
    centers = box[None, :, :2] + np.asarray(velocity, dtype=np.float64)[None] * times[:, None, None]  # [S, A, 2]
    yaws = np.broadcast_to(box[None, :, 6], centers.shape[:2])
    return moving_boxes_occupancy(box, agent_class, centers, yaws, grid, classes)


def ctrv_occupancy(
    agent_box: np.ndarray,
    agent_class: np.ndarray,
    velocity: np.ndarray,
    yaw_rate: np.ndarray,
    grid: geometry.GridSpec,
    classes: int,
    steps: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """The t0 boxes moved and turned under CTRV (each box turns with its heading change), rasterized per step.

    Args:
        agent_box: [A, 7] x, y, z, width, length, height (m), yaw (rad) at t0.
        agent_class: [A] class index.
        velocity: [A, 2] m/s.
        yaw_rate: [A] rad/s.

    Returns:
        occupancy [S, C, H, W] bool, instances [S, H, W] int64 (1 + agent index).
    """
    box = np.asarray(agent_box, dtype=np.float64).reshape(-1, 7)
    xy, turned = ctrv_states(box[:, :2], velocity, yaw_rate, np.arange(steps + 1) * STEP_S)  # [A, S, 2], [A, S]
    return moving_boxes_occupancy(box, agent_class, xy.transpose(1, 0, 2), (box[:, 6:7] + turned).T, grid, classes)


def constant_velocity_tracked(
    agents: tracking.TrackedAgents, grid: geometry.GridSpec, classes: int, steps: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """The model's own tracked agents of one window moved at their track's velocity and rasterized.

    The like-for-like baseline of the sensor-only forecast: the same agents, no learnt motion.

    Args:
        agents: A tracked agents (``Forecaster.track``), t0 ego frame.
        grid: the target grid.
        classes: C.
        steps: F.

    Returns:
        occupancy [S, C, H, W] bool, instances [S, H, W] int64 (1 + agent index).
    """
    return constant_velocity_occupancy_instances(agents.boxes, agents.classes, agents.velocity, grid, classes, steps)


def true_track_velocities(track_velocity: np.ndarray, match: np.ndarray, true_velocity: np.ndarray) -> np.ndarray:
    """Each track's velocity replaced by the annotated velocity of the agent it stands for.

    Args:
        track_velocity: [A', 2] float — the tracks' velocities (m/s).
        match: [A] int — the track standing for each annotated agent, -1 where none (``metrics.match_agents``).
        true_velocity: [A, 2] float — the annotated agents' velocities (m/s).

    Returns:
        [A', 2] float64: the matched annotated velocity, the track's own where no annotated agent matched it.
    """
    velocity = np.array(track_velocity, dtype=np.float64).reshape(-1, 2)
    found = np.asarray(match) >= 0
    velocity[np.asarray(match)[found]] = np.asarray(true_velocity, dtype=np.float64)[found]
    return velocity


def persistence_occupancy(occupancy_t0: np.ndarray, steps: int = 4) -> np.ndarray:
    """[S, C, H, W]: the occupancy at t0, unchanged at every step."""
    return np.repeat(np.asarray(occupancy_t0)[None], steps + 1, axis=0)
