"""A counterfactual test of the world model: do agents that follow the ego respond to its action.

The world model is rolled out twice from the same observed past, once under a braking and once under an
accelerating ego action. An agent that follows the ego in its lane (behind it, heading the same way, moving)
should, if the model has learnt that agents react to the ego, end up further back under braking than under
accelerating. The score is the fraction of such followers whose forecast moves the right way, comparing the
probability-weighted mean position of their modes at the end of the rollout (2 s).

Notation:
    F  rollout steps (0.5 s each)      A  agents      K  modes      T  trajectory steps
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import torch_dataset
from bevjepa.prediction import forecaster, train

STEP_S = 0.5


def speed_profile_actions(speed_mps: float, accel_mps2: float, steps: int) -> np.ndarray:
    """[F, 3] ego actions (dx, dy in m, dyaw in rad per 0.5 s step) driving straight from ``speed_mps``.

    The speed changes by ``accel_mps2`` and never goes below 0; dx is the distance covered in each step.
    """
    edges = np.maximum(speed_mps + accel_mps2 * STEP_S * np.arange(steps + 1), 0.0)  # [F + 1] speeds at step edges
    actions = np.zeros((steps, 3), dtype=np.float32)
    actions[:, 0] = (edges[:-1] + edges[1:]) / 2 * STEP_S
    return actions


def followers(sample: torch_dataset.WindowSample, lane_half_width_m: float = 1.8, reach_m: float = 30.0) -> np.ndarray:
    """[A] bool: agents behind the ego in its lane, heading its way and moving (at least 1 m/s)."""
    box = sample.agent_box.numpy()  # [A, 7]
    velocity = np.nan_to_num(sample.agent_velocity.numpy())  # [A, 2]
    return (
        (box[:, 0] < -3.0)
        & (box[:, 0] > -reach_m)
        & (np.abs(box[:, 1]) < lane_half_width_m)
        & (np.abs(np.arctan2(np.sin(box[:, 6]), np.cos(box[:, 6]))) < 0.3)
        & (velocity[:, 0] > 1.0)
    )


def ego_speed_mps(sample: torch_dataset.WindowSample) -> float:
    """The ego's speed at t0 (m/s) from its last past action (the step that ends at t0)."""
    p = sample.t0_from_ego.shape[0]
    return float(np.hypot(*sample.actions[p - 2, :2].numpy()) / STEP_S) if p >= 2 else 0.0


def expected_position(forecast: forecaster.OccupancyForecast, step: int) -> np.ndarray:
    """[A, 2] each agent's probability-weighted mean position (m) at trajectory step ``step`` (0-based)."""
    weights = forecast.mode_probabilities[:, :, None]  # [A, K, 1]
    return (forecast.trajectories[:, :, step] * weights).sum(axis=1)  # [A, 2]


def follower_response(
    run: Path,
    data: Path,
    split: str = "mini_val",
    brake_mps2: float = -3.0,
    accelerate_mps2: float = 2.0,
) -> dict:
    """Roll the model of ``run`` out under braking and under accelerating on every window of ``split``.

    Returns:
        ``{"windows": n, "followers": n, "right_way": n, "fraction": right_way / followers (NaN if none),
        "median_shift_m": median over followers of x(accelerate) - x(brake) at the end of the rollout}``.
    """
    model = forecaster.Forecaster.from_checkpoint(run, agents="annotated")  # the followers are annotated agents
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    steps = model.net.config.occupancy_steps
    shifts: list[np.ndarray] = []
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            follows = followers(sample)
            if not follows.any():
                continue
            speed = ego_speed_mps(sample)
            braking = model.forecast(sample, speed_profile_actions(speed, brake_mps2, steps))
            accelerating = model.forecast(sample, speed_profile_actions(speed, accelerate_mps2, steps))
            shift = expected_position(accelerating, steps - 1)[:, 0] - expected_position(braking, steps - 1)[:, 0]
            shifts.append(shift[follows])
    shift = np.concatenate(shifts) if shifts else np.zeros(0)
    right = int((shift > 0).sum())
    return {
        "windows": len(dataset),
        "followers": int(len(shift)),
        "right_way": right,
        "fraction": right / len(shift) if len(shift) else float("nan"),
        "median_shift_m": float(np.median(shift)) if len(shift) else float("nan"),
    }
