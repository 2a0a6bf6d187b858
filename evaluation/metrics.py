"""Metrics: displacement errors of multi-modal trajectories, and occupancy IoU, VPQ, Brier score and ECE.

Trajectories follow ``nuscenes.eval.prediction.metrics`` to the letter: modes are ranked by probability the way
its ``rank_metric_over_top_k_modes`` ranks them (``np.flip(np.argsort(p))``: descending, ties in the order that
sort leaves them), minADE_k / minFDE_k are the smallest mean / final L2 error over the first ``min(k, K)`` ranked
modes, and a mode misses when its largest L2 error over the horizon is at least the tolerance (``>=``, as
``miss_max_distances``); MissRate_2_k is 1 when every one of the top-k modes misses by 2 m.

Occupancy is scored per class and step on boolean maps (IoU) and on probabilities (Brier score, expected
calibration error). Video panoptic quality (VPQ) is FIERY's (Hu et al., ICCV 2021): at every step, predicted and
ground-truth instances of a class are matched when their IoU exceeds 0.5 (such a match is unique); a match is a
true positive unless its ground-truth instance was matched to a different predicted instance at an earlier step
of the same window, in which case it counts as one false positive and one false negative (an id switch). Then

    VPQ_t = sum_{TP_t} IoU / (|TP_t| + |FP_t| / 2 + |FN_t| / 2)

with the counts of step t summed over all windows before dividing. The paper's VPQ is the sum of VPQ_t over the
steps; FIERY's code reports the normalised ``sum_t sum_TP IoU / sum_t (|TP_t| + |FP_t| / 2 + |FN_t| / 2)``,
which ``vpq`` also returns.

Instances are per-class label maps ``[S, C, H, W]`` int64: 0 free, a positive id per object, the same id for the
same object at every step (ids are compared within a class only). Ground truth comes from a window's instance
map (``class_labels``); a model's occupancy has no ids, so ``connected_instances`` labels the 4-connected
components of each step's thresholded map (``scipy.ndimage.label``; scipy is a dependency of nuscenes-devkit)
and links each component to the component of the previous step it overlaps most.

Notation:
    N  agents evaluated    K  modes    T  steps    S  occupancy steps    C  classes    H, W  grid
    B  calibration bins
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MISS_TOLERANCE_M = 2.0
"""The nuScenes prediction challenge's miss distance (m)."""
MATCH_DISTANCE_M = 2.0
"""The farthest a tracked agent's t0 centre may lie from an annotated agent's of its class to stand for it (m)."""
VPQ_IOU = 0.5
"""IoU above which a predicted and a ground-truth instance match (FIERY, as panoptic quality)."""
ECE_BINS = 10
"""Equal-width probability bins of the expected calibration error."""


# ---------------------------------------------------------------------------------------------------- trajectories


def rank_modes(probabilities: np.ndarray) -> np.ndarray:
    """Mode indices from most to least probable, in the devkit's order (``np.flip(np.argsort(p))``, ties included).

    Args:
        probabilities: [N, K] float.

    Returns:
        [N, K] int64.
    """
    return np.flip(np.argsort(np.asarray(probabilities), axis=-1), axis=-1)


def top_k_modes(modes: np.ndarray, probabilities: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most probable modes of each agent: modes [N, K, T, 2], probabilities [N, K] → [N, min(k, K), T, 2]."""
    order = rank_modes(probabilities)[:, :k]  # [N, k]
    return np.take_along_axis(modes, order[:, :, None, None], axis=1)


def _check_trajectories(modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray) -> None:
    n, k, t = modes.shape[:3]
    if modes.ndim != 4 or modes.shape[3] != 2 or probabilities.shape != (n, k) or truth.shape != (n, t, 2):
        raise ValueError(
            f"modes [N, K, T, 2], probabilities [N, K] and truth [N, T, 2] expected, got {list(modes.shape)}, "
            f"{list(probabilities.shape)} and {list(truth.shape)}"
        )


def mode_errors(modes: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each mode's mean, final and largest L2 error (m).

    Args:
        modes: [N, K, T, 2] predicted xy (m).
        truth: [N, T, 2] the ground-truth future (every step valid).

    Returns:
        ade [N, K], fde [N, K], worst [N, K] float64.
    """
    distances = np.linalg.norm(np.asarray(modes, np.float64) - np.asarray(truth, np.float64)[:, None], axis=-1)
    return distances.mean(axis=-1), distances[..., -1], distances.max(axis=-1)  # [N, K, T] → [N, K] each


def _min_over_top_k(values: np.ndarray, probabilities: np.ndarray, k: int) -> np.ndarray:
    """[N]: the smallest of ``values`` [N, K] over each row's first ``min(k, K)`` ranked modes."""
    ranked = np.take_along_axis(values, rank_modes(probabilities), axis=1)  # [N, K]
    return ranked[:, : max(1, min(k, values.shape[1]))].min(axis=1)


def min_ade_fde(
    modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """minADE_k and minFDE_k per agent, over its ``k`` most probable modes (the devkit's ``MinADEK``, ``MinFDEK``).

    Args:
        modes: [N, K, T, 2] predicted xy (m).
        probabilities: [N, K].
        truth: [N, T, 2] the ground-truth future (every step valid).
        k: modes considered; more than K means all K.

    Returns:
        ade [N], fde [N] float64 (m).
    """
    modes, probabilities, truth = np.asarray(modes), np.asarray(probabilities), np.asarray(truth)
    _check_trajectories(modes, probabilities, truth)
    ade, fde, _ = mode_errors(modes, truth)
    return _min_over_top_k(ade, probabilities, k), _min_over_top_k(fde, probabilities, k)


def miss_rate(
    modes: np.ndarray,
    probabilities: np.ndarray,
    truth: np.ndarray,
    k: int,
    tolerance_m: float = MISS_TOLERANCE_M,
) -> np.ndarray:
    """[N] bool: every one of the top-``k`` modes is ``tolerance_m`` or more off at some step (``MissRateTopK``).

    Args:
        modes: [N, K, T, 2] predicted xy (m).
        probabilities: [N, K].
        truth: [N, T, 2] the ground-truth future (every step valid).
        k: modes considered.
        tolerance_m: the miss distance (m).
    """
    modes, probabilities, truth = np.asarray(modes), np.asarray(probabilities), np.asarray(truth)
    _check_trajectories(modes, probabilities, truth)
    _, _, worst = mode_errors(modes, truth)
    return _min_over_top_k((worst >= tolerance_m).astype(np.float64), probabilities, k) > 0


# ------------------------------------------------------------------------------------------------------ occupancy


def match_agents(
    found_xy: np.ndarray,
    found_class: np.ndarray,
    true_xy: np.ndarray,
    true_class: np.ndarray,
    max_distance_m: float = MATCH_DISTANCE_M,
) -> np.ndarray:
    """Pair annotated agents with the agents a model found, nearest pairs first, one to one, class by class.

    Args:
        found_xy: [M, 2] float — the found agents' t0 centres (m).
        found_class: [M] int.
        true_xy: [N, 2] float — the annotated agents' t0 centres (m).
        true_class: [N] int.
        max_distance_m: pairs farther apart are never matched.

    Returns:
        [N] int64 — the found agent standing for each annotated one, -1 where none (a missed agent).
    """
    match = np.full(len(true_xy), -1, dtype=np.int64)
    if len(true_xy) == 0 or len(found_xy) == 0:
        return match
    distance = np.linalg.norm(np.asarray(true_xy)[:, None] - np.asarray(found_xy)[None], axis=-1)  # [N, M]
    allowed = (np.asarray(true_class)[:, None] == np.asarray(found_class)[None]) & (distance <= max_distance_m)
    rows, cols = np.nonzero(allowed)
    order = np.argsort(distance[rows, cols], kind="stable")
    used = np.zeros(len(found_xy), dtype=bool)
    for r, c in zip(rows[order], cols[order], strict=True):  # candidate pairs, nearest first (agents, not cells)
        if match[r] < 0 and not used[c]:
            match[r], used[c] = c, True
    return match


def iou_counts(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union cell counts per step and class: predicted, target [S, C, H, W] bool → [S, C] each."""
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    return (predicted & target).sum(axis=(-2, -1)), (predicted | target).sum(axis=(-2, -1))


def iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU from summed counts; NaN where the union is empty."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def brier_counts(probabilities: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed squared error of occupancy probabilities, and the cells summed, per step and class.

    Args:
        probabilities: [S, C, H, W] float in [0, 1] (a 0/1 map for a baseline).
        target: [S, C, H, W] bool.

    Returns:
        squared_error [S, C] float64, cells [S, C] int64; the Brier score is their ratio.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    error = np.square(p - np.asarray(target, dtype=np.float64)).sum(axis=(-2, -1))  # [S, C]
    return error, np.full(error.shape, p.shape[-2] * p.shape[-1], dtype=np.int64)


def calibration_counts(probabilities: np.ndarray, target: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Per class and probability bin: cells, summed probability, summed outcome (all steps pooled).

    The bins are ``bins`` equal-width intervals of [0, 1], ``[i / bins, (i + 1) / bins)``, the last one closed.

    Args:
        probabilities: [S, C, H, W] float in [0, 1].
        target: [S, C, H, W] bool.
        bins: B.

    Returns:
        [C, B, 3] float64 — count, sum of probabilities, sum of outcomes.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    S, C = p.shape[:2]
    index = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)  # [S, C, H, W]
    index = index + (np.arange(C) * bins)[None, :, None, None]  # class-major flat bin
    flat, size = index.ravel(), C * bins
    counts = np.bincount(flat, minlength=size)
    sum_p = np.bincount(flat, weights=p.ravel(), minlength=size)
    sum_y = np.bincount(flat, weights=np.asarray(target, dtype=np.float64).ravel(), minlength=size)
    return np.stack([counts, sum_p, sum_y], axis=-1).reshape(C, bins, 3)


def expected_calibration_error(counts: np.ndarray) -> np.ndarray:
    """ECE = sum over bins of (cells in bin / cells) * |mean probability - observed frequency|.

    Args:
        counts: [..., B, 3] from ``calibration_counts`` (summed over windows; sum over classes to pool them).

    Returns:
        [...] float64; NaN where there are no cells.
    """
    n, sum_p, sum_y = counts[..., 0], counts[..., 1], counts[..., 2]
    total = n.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(sum_p - sum_y).sum(axis=-1) / np.maximum(total, 1), np.nan)


# -------------------------------------------------------------------------------------------------- instances, VPQ


def class_labels(occupancy: np.ndarray, instances: np.ndarray, instance_class: np.ndarray | None = None) -> np.ndarray:
    """Per-class instance labels from an instance map and per-class occupancy.

    A cell carries id ``i`` in class ``c`` when ``instances`` is ``i`` there, ``occupancy[c]`` is set and
    instance ``i`` is of class ``c``. Without ``instance_class``, an instance's class is the class whose
    occupancy covers most of its cells over all steps (ties: the lowest class index).

    Args:
        occupancy: [S, C, H, W] bool.
        instances: [S, H, W] int — 0 free, else the instance id (the same at every step).
        instance_class: [I + 1] int — class of each id (entry 0 unused), or None.

    Returns:
        [S, C, H, W] int64.
    """
    occupancy = np.asarray(occupancy, dtype=bool)
    instances = np.asarray(instances, dtype=np.int64)
    S, C, H, W = occupancy.shape
    if instances.shape != (S, H, W):
        raise ValueError(f"instances: expected shape {[S, H, W]}, got {list(instances.shape)}")
    count = int(instances.max(initial=0)) + 1
    if instance_class is None:
        covered = np.stack([np.bincount(instances[occupancy[:, c]], minlength=count) for c in range(C)])  # [C, I+1]
        instance_class = covered.argmax(axis=0)
    instance_class = np.asarray(instance_class, dtype=np.int64)
    owner = instance_class[instances]  # [S, H, W]
    mine = occupancy & (owner[:, None] == np.arange(C)[None, :, None, None]) & (instances[:, None] > 0)
    return np.where(mine, instances[:, None], 0)


_FOUR_CONNECTED_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FOUR_CONNECTED_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def connected_instances(occupied: np.ndarray) -> np.ndarray:
    """Instances of maps without ids: 4-connected components per step and class, linked over time by overlap.

    Each component at step t > 0 takes the id of the component of step t-1 (same class) that shares the most
    cells with it; where several components claim one id, the one sharing most cells keeps it (ties: the lower
    label) and the others get new ids, as does a component that overlaps nothing.

    Args:
        occupied: [S, C, H, W] bool — e.g. occupancy probabilities >= 0.5.

    Returns:
        [S, C, H, W] int64 per-class labels (see the module docstring).
    """
    occupied = np.asarray(occupied, dtype=bool)
    S, C, H, W = occupied.shape
    components, _ = ndimage.label(occupied.reshape(S * C, H, W), structure=_FOUR_CONNECTED_IN_PLANE)
    components = components.reshape(S, C, H, W).astype(np.int64)  # distinct labels across steps and classes
    labels = np.zeros_like(components)
    next_id = 1
    for c in range(C):  # classes and steps, not cells
        previous = None
        for s in range(S):
            current = components[s, c]
            ids = np.unique(current[current > 0])  # [n] this step's components
            track = np.arange(next_id, next_id + len(ids))  # new ids unless linked below
            both = (current > 0) & (previous > 0) if previous is not None else None
            if both is not None and both.any():
                cur = np.searchsorted(ids, current[both])  # [Q] component index of each shared cell
                pairs, overlap = np.unique(np.stack([cur, previous[both]], axis=1), axis=0, return_counts=True)
                # For each current component its best previous id: sort by (component, -overlap, previous id).
                order = np.lexsort((pairs[:, 1], -overlap, pairs[:, 0]))
                pairs, overlap = pairs[order], overlap[order]
                best = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]  # first row of each component
                pairs, overlap = pairs[best], overlap[best]
                # Each previous id goes to the claimant with the most overlap (ties: the lower component).
                order = np.lexsort((pairs[:, 0], -overlap, pairs[:, 1]))
                pairs = pairs[order]
                winner = np.r_[True, pairs[1:, 1] != pairs[:-1, 1]]
                track[pairs[winner, 0]] = pairs[winner, 1]
            fresh = track >= next_id
            track[fresh] = np.arange(next_id, next_id + int(fresh.sum()))
            next_id += int(fresh.sum())
            lookup = np.zeros(int(current.max(initial=0)) + 1, dtype=np.int64)
            lookup[ids] = track
            labels[s, c] = lookup[current]
            previous = labels[s, c]
    return labels


@dataclass(frozen=True)
class VpqCounts:
    """What VPQ sums, per step and class (summed over windows by ``+``).

    Attributes:
        iou: [S, C] float64 — the summed IoU of the true positives.
        true_positives: [S, C] int64.
        false_positives: [S, C] int64 — unmatched predicted instances, plus id switches.
        false_negatives: [S, C] int64 — unmatched ground-truth instances, plus id switches.
    """

    iou: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    false_negatives: np.ndarray

    def __add__(self, other: VpqCounts) -> VpqCounts:
        return VpqCounts(
            self.iou + other.iou,
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )

    def vpq(self) -> tuple[np.ndarray, np.ndarray]:
        """VPQ per step and class [S, C], and over all steps per class [C] (FIERY's code); NaN where nothing."""
        denominator = self.true_positives + 0.5 * (self.false_positives + self.false_negatives)  # [S, C]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_step = np.where(denominator > 0, self.iou / np.maximum(denominator, 1e-12), np.nan)
            total = denominator.sum(axis=0)
            overall = np.where(total > 0, self.iou.sum(axis=0) / np.maximum(total, 1e-12), np.nan)
        return per_step, overall


def vpq_counts(predicted: np.ndarray, truth: np.ndarray, iou_threshold: float = VPQ_IOU) -> VpqCounts:
    """FIERY's panoptic counts of one window (one temporal sequence).

    Args:
        predicted: [S, C, H, W] int — predicted per-class instance labels.
        truth: [S, C, H, W] int — ground-truth per-class instance labels.
        iou_threshold: a pair matches when its IoU exceeds this (0.5 makes matches unique).

    Returns:
        ``VpqCounts`` with [S, C] arrays.
    """
    predicted, truth = np.asarray(predicted, dtype=np.int64), np.asarray(truth, dtype=np.int64)
    if predicted.shape != truth.shape or predicted.ndim != 4:
        raise ValueError(
            f"predicted and truth: expected equal [S, C, H, W] shapes, got {predicted.shape}, {truth.shape}"
        )
    S, C = truth.shape[:2]
    iou_sum = np.zeros((S, C))
    tp, fp, fn = (np.zeros((S, C), dtype=np.int64) for _ in range(3))
    for c in range(C):  # classes and steps, not cells
        matched_to = np.full(int(truth[:, c].max(initial=0)) + 1, -1, dtype=np.int64)  # last predicted id per gt id
        for s in range(S):
            g, p = truth[s, c].ravel(), predicted[s, c].ravel()
            used = (g > 0) | (p > 0)
            g_ids, g_index = np.unique(g[used], return_inverse=True)  # [Ig] (0 first where present)
            p_ids, p_index = np.unique(p[used], return_inverse=True)  # [Ip]
            cells = np.bincount(g_index * len(p_ids) + p_index, minlength=len(g_ids) * len(p_ids))
            intersection = cells.reshape(len(g_ids), len(p_ids))  # [Ig, Ip]
            union = intersection.sum(axis=1)[:, None] + intersection.sum(axis=0)[None, :] - intersection
            pair_iou = intersection / np.maximum(union, 1)
            match = (pair_iou > iou_threshold) & (g_ids[:, None] > 0) & (p_ids[None, :] > 0)
            gi, pj = np.nonzero(match)  # [M] unique matches
            earlier = matched_to[g_ids[gi]]
            consistent = (earlier < 0) | (earlier == p_ids[pj])
            switches = int((~consistent).sum())
            matched_to[g_ids[gi]] = p_ids[pj]
            tp[s, c] = int(consistent.sum())
            iou_sum[s, c] = float(pair_iou[gi, pj][consistent].sum())
            fp[s, c] = int((p_ids > 0).sum()) - len(pj) + switches
            fn[s, c] = int((g_ids > 0).sum()) - len(gi) + switches
    return VpqCounts(iou_sum, tp, fp, fn)


def empty_vpq_counts(steps: int, classes: int) -> VpqCounts:
    """Zero ``VpqCounts`` of [S, C], to sum windows onto."""
    return VpqCounts(np.zeros((steps, classes)), *(np.zeros((steps, classes), dtype=np.int64) for _ in range(3)))
