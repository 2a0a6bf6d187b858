"""Baselines on the same interfaces as the model: constant velocity and persistence.

Notation:
    A  agents     P  past keyframes     T  trajectory steps (0.5 s)     S  occupancy steps (t0 and F more)
    C  classes    H, W  the target grid
"""

from __future__ import annotations

import numpy as np

from bevjepa.datasets import geometry, rasterize

STEP_S = 0.5


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


def constant_velocity_trajectories(agent_xy: np.ndarray, velocity: np.ndarray, steps: int = 12) -> np.ndarray:
    """[A, 1, T, 2] one mode per agent: its t0 position moved at constant velocity (``velocity`` [A, 2] m/s)."""
    times = np.arange(1, steps + 1) * STEP_S  # [T]
    return (agent_xy[:, None, :] + velocity[:, None, :] * times[None, :, None])[:, None]  # [A, 1, T, 2]


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
    maps = []
    for k in range(steps + 1):
        centers = agent_box[:, :2] + velocity * (k * STEP_S)
        occupancy, _ = rasterize.rasterize_boxes(
            grid, centers, agent_box[:, [3, 4]], agent_box[:, 6], agent_class.astype(np.int64), classes
        )
        maps.append(occupancy)
    return np.stack(maps)


def persistence_occupancy(occupancy_t0: np.ndarray, steps: int = 4) -> np.ndarray:
    """[S, C, H, W]: the occupancy at t0, unchanged at every step."""
    return np.repeat(np.asarray(occupancy_t0)[None], steps + 1, axis=0)
