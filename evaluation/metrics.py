"""Metrics: displacement errors of multi-modal trajectories and occupancy IoU.

Notation:
    N  agents evaluated    K  modes    T  steps    S  occupancy steps    C  classes    H, W  grid
"""

from __future__ import annotations

import numpy as np


def top_k_modes(modes: np.ndarray, probabilities: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most probable modes of each agent: modes [N, K, T, 2], probabilities [N, K] → [N, min(k, K), T, 2]."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # [N, k]
    return np.take_along_axis(modes, order[:, :, None, None], axis=1)


def min_ade_fde(
    modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """minADE_k and minFDE_k per agent, over its ``k`` most probable modes (as the nuScenes prediction metrics).

    Args:
        modes: [N, K, T, 2] predicted xy (m).
        probabilities: [N, K].
        truth: [N, T, 2] the ground-truth future (every step valid).

    Returns:
        ade [N], fde [N] (m).
    """
    chosen = top_k_modes(modes, probabilities, k)  # [N, k, T, 2]
    errors = np.linalg.norm(chosen - truth[:, None], axis=-1)  # [N, k, T]
    return errors.mean(axis=2).min(axis=1), errors[:, :, -1].min(axis=1)


def miss_rate(
    modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray, k: int, tolerance_m: float = 2.0
) -> np.ndarray:
    """[N] bool: no top-``k`` mode stays within ``tolerance_m`` of the truth at every step (MissRate_2_k)."""
    chosen = top_k_modes(modes, probabilities, k)
    worst = np.linalg.norm(chosen - truth[:, None], axis=-1).max(axis=2)  # [N, k]
    return worst.min(axis=1) > tolerance_m


def iou_counts(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union cell counts per step and class: predicted, target [S, C, H, W] bool → [S, C] each."""
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    return (predicted & target).sum(axis=(-2, -1)), (predicted | target).sum(axis=(-2, -1))


def iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU from summed counts; NaN where the union is empty."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
