"""Open-loop evaluation on preprocessed windows: a model against the baselines, on the same agents and cells.

Sources (``evaluate(...)["models"]``):

* ``model``: the checkpoint of ``run`` (only with a run), forecasting from the sensors alone, as a planner gets
  it: agents tracked from its own detections (``Forecaster(agents="tracked")``), the fused occupancy
  (``agent_occupancy.fuse``; IoU and VPQ on the map thresholded at ``threshold``, VPQ instances its connected
  components, ``metrics.connected_instances``). Its trajectories are scored on the annotated agents a track
  stands for (``metrics.match_agents``: same class, within 2 m at t0), with the detection recall (annotated
  agents matched / annotated agents at t0 whose centre lies inside the grid, the only ones a track can reach)
  and precision (tracks matched / tracks) beside them, so a missed agent shows.
* ``model_annotated`` (only with a run): the same model forecasting the annotated agents from their annotated
  pasts (the nuScenes prediction-challenge protocol): trajectories on every scored agent; occupancy the agents'
  t0 boxes moved along the modes (VPQ instances are the agents, ``agent_occupancy.mode_occupancy_instances``).
* ``model_latent`` (only with a run): the latent occupancy head's map alone (``latent_occupancy``): what the
  world model decodes from its sensors, without any agent; occupancy only.
* ``direct`` (only with ``direct_run``): the direct baseline's map (``ModelConfig.world_model = False``: the LiDAR
  alone, every horizon decoded at once from z_t0, no predictor), scored as ``model_latent`` is, on the same windows.
* ``constant_velocity``: the ground-truth t0 boxes moved at their annotated velocity (oracle input; on nuScenes
  the devkit's centred ``box_velocity``, which looks 0.5 s ahead).
* ``constant_velocity_past``: the same boxes moved at the velocity of their last past step (causal: the input the
  model has; the speed the devkit's ``ConstantVelocityHeading`` takes).
* ``constant_velocity_anchor``: the same boxes moved at their t0 velocity estimated from the last three past
  positions (causal, ``baselines.anchor_velocities``): the path of the model's anchor mode, so the model against
  it is what its learnt modes and probabilities add.
* ``constant_velocity_tracked`` (only with a run): the model's own tracked agents moved at their regressed
  velocity: the like-for-like baseline of ``model`` (same agents, same matching, no learnt motion).
* ``tracked_true_velocity`` (only with a run; needs annotations): the same tracked boxes moved at the annotated
  velocity of the agent each stands for (a track no annotated agent matched keeps its own): a diagnostic that
  splits the gap between ``constant_velocity_tracked`` and ``constant_velocity`` into what the tracks'
  velocities cost and what their t0 boxes cost.
* ``ctrv``: constant turn rate and velocity (``baselines.yaw_rate_from_past``).
* ``persistence``: everything stays where it is at t0 (trajectories: the agent stands still).

Trajectories are scored on the agents whose whole future over the scored horizon is annotated (as the nuScenes
prediction challenge does; the horizon is the windows' T steps, 6 s, unless ``trajectory_seconds`` is given), with
``metrics.min_ade_fde`` and ``metrics.miss_rate``, which agree with the devkit's ``MinADEK``, ``MinFDEK`` and
``MissRateTopK``. Occupancy counts are summed over the split before dividing. Baselines' Brier score and ECE are
those of their 0/1 maps.

A window that cannot be loaded (a missing or corrupt file) or forecast by the model or the direct baseline (an
agent with a non-finite box, see ``forecaster.check_agent_inputs``) is left out and recorded in ``failed_windows``;
the others are scored. A window with no agent at all is scored: its occupancy counts, and it adds no agent to the
trajectory metrics.

Returned structure (every number a float; NaN where nothing was scored):

    {
      "split": str,
      "windows": int,                       windows scored
      "windows_failed": int,                windows left out
      "failed_windows": [{"index", "scene", "sample_token", "file", "stage": "load" | "forecast", "error"}],
      "agents": int,                        agents scored for trajectories (all classes)
      "agents_per_class": {class: int},
      "trajectory_steps": int,              steps of the scored horizon (0.5 s each)
      "settings": {"threshold", "ece_bins", "detection_threshold", "trajectory_seconds",
                   "occupancy_thresholds": {"model" | "direct": {class: probability}},  the run's chosen thresholds
                                            (``bevjepa thresholds``) that ``threshold`` stands for; 0.5: none
                   "forecast_bars": {"model" | "direct": {class: [per step 0..F]}}},  the bars of ``iou_at_bars``
      "models": {name: {
          "minADE_k", "minFDE_k", "MissRate_2_k"    for k in 1, 5, 10 (trajectory sources only),
          "per_class": {class: {"agents": int, "minADE_k", "minFDE_k", "MissRate_2_k"}},
          "iou": {class: [per step 0..F]},          IoU of the (thresholded) occupancy over the whole grid
          "iou_at_bars": {class: [per step 0..F]},  (``model`` and ``direct``, where the run has
                                                    ``forecast_bars.json``) the same at the run's bars, each step
                                                    and class its own
          "iou_short": {class: [per step 0..F]},    the same over the central 30 × 30 m (FIERY's short range)
          "iou_2s_mean": float,                     mean over classes of the IoU at the last step (NaN skipped)
          "vpq": {class: [per step 0..F]},          FIERY's VPQ_t (``metrics.VpqCounts.vpq``)
          "vpq_all_steps": {class: float},          FIERY's normalised VPQ over steps 0..F
          "vpq_2s_mean": float,                     mean over classes of VPQ at the last step (NaN skipped)
          "brier": {class: [per step 0..F]},        mean squared error of the occupancy probability per cell
          "brier_mean": float,                      over all steps and classes
          "ece": {class: float},                    expected calibration error, ``ece_bins`` equal bins, all steps
          "ece_all": float,                         the same with all classes' cells pooled
          "agents_matched", "detection_recall", "detection_precision",
          "detection_annotated", "detection_found", "detection_matched"   (``model`` and the tracks at constant
                                                    velocity: annotated agents at t0 inside the grid, tracks, pairs)
          "track_velocity_error_mps", "track_heading_error_deg": {class: float}   (``model``: over the pairs, the
                                                    mean distance of the track's velocity from the annotated one and
                                                    of its t0 heading from the annotated heading, as the devkit's
                                                    AVE and AOE; NaN without a pair)
      }}
    }
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, geometry, torch_dataset
from bevjepa.evaluation import baselines, metrics
from bevjepa.prediction import agent_occupancy, checkpoint, forecaster, tracking, train

CACHE_FRAMES = 64
"""Keyframes the model's frame cache keeps while scoring (its two forecasts of a batch encode each one once)."""
TOP_K = (1, 5, 10)
"""The k of minADE_k, minFDE_k and MissRate_2_k."""
TRAJECTORY_SOURCES = (
    "model",
    "model_annotated",
    "constant_velocity_tracked",
    "tracked_true_velocity",
    "constant_velocity",
    "constant_velocity_past",
    "constant_velocity_anchor",
    "ctrv",
    "persistence",
)
OCCUPANCY_SOURCES = ("model_latent", "direct")
"""The sources scored on occupancy only (their maps carry no agent identity to score trajectories against)."""
RUN_SOURCES = ("model", "model_annotated", "model_latent", "constant_velocity_tracked", "tracked_true_velocity")
"""The sources scored only with a run (the model's own)."""
MATCHED_SOURCES = ("model", "constant_velocity_tracked", "tracked_true_velocity")
"""The sources whose agents are tracked from the model's detections: trajectories on the matched annotated agents."""


@dataclass
class _Scores:
    """What one source accumulates over the windows."""

    steps: int
    classes: int
    bins: int
    modes: list[np.ndarray] = field(default_factory=list)  # [N_i, K, T, 2] per window
    probabilities: list[np.ndarray] = field(default_factory=list)  # [N_i, K]
    intersection: np.ndarray | None = None  # [S, C]
    union: np.ndarray | None = None
    squared_error: np.ndarray | None = None  # [S, C]
    cells: np.ndarray | None = None
    calibration: np.ndarray | None = None  # [C, B, 3]
    vpq: metrics.VpqCounts | None = None
    matched: bool = False  # trajectories on the annotated agents that tracks stand for, with their own truth
    truths: list[np.ndarray] = field(default_factory=list)  # [N_i, T, 2] per window (matched sources)
    truth_classes: list[np.ndarray] = field(default_factory=list)  # [N_i]
    detection_counts: np.ndarray | None = None  # annotated agents, found agents, matched pairs
    track_errors: list[np.ndarray] = field(default_factory=list)  # [M_i, 3] class, velocity (m/s), heading (rad)
    short: tuple[slice, slice] = (slice(None), slice(None))  # the short-range rows and columns (``short_range``)
    intersection_short: np.ndarray | None = None  # [S, C]
    union_short: np.ndarray | None = None
    intersection_bars: np.ndarray | None = None  # [S, C] at the run's forecast bars (``model``, ``direct``)
    union_bars: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = (self.steps, self.classes)
        self.intersection, self.union = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        self.intersection_short, self.union_short = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        self.squared_error, self.cells = np.zeros(shape), np.zeros(shape, np.int64)
        self.calibration = np.zeros((self.classes, self.bins, 3))
        self.vpq = metrics.empty_vpq_counts(*shape)
        self.detection_counts = np.zeros(3, dtype=np.int64)

    def add_occupancy(
        self,
        probability: np.ndarray,
        labels: np.ndarray,
        threshold: float,
        target: np.ndarray,
        target_labels: np.ndarray,
        bars: np.ndarray | None = None,
    ) -> None:
        """One window: probability [S, C, H, W] (or 0/1), its labels, the truth; with ``bars`` [S, C] the IoU there."""
        predicted = probability >= threshold
        intersection, union = metrics.iou_counts(predicted, target)
        self.intersection += intersection
        self.union += union
        rows, columns = self.short
        intersection, union = metrics.iou_counts(predicted[..., rows, columns], target[..., rows, columns])
        self.intersection_short += intersection
        self.union_short += union
        if bars is not None:  # [S, C] each step's and class's own bar
            intersection, union = metrics.iou_counts(probability >= bars[:, :, None, None], target)
            self.intersection_bars = intersection + (0 if self.intersection_bars is None else self.intersection_bars)
            self.union_bars = union + (0 if self.union_bars is None else self.union_bars)
        squared_error, cells = metrics.brier_counts(probability, target)
        self.squared_error += squared_error
        self.cells += cells
        self.calibration += metrics.calibration_counts(probability, target, self.bins)
        self.vpq = self.vpq + metrics.vpq_counts(labels, target_labels)

    def add_trajectories(
        self,
        modes: np.ndarray,
        probabilities: np.ndarray,
        truth: np.ndarray | None = None,
        truth_class: np.ndarray | None = None,
    ) -> None:
        """One window's modes [N, K, T, 2] and probabilities [N, K]; a matched source gives their truth too."""
        self.modes.append(np.asarray(modes, dtype=np.float64))
        self.probabilities.append(np.asarray(probabilities, dtype=np.float64))
        if self.matched:
            assert truth is not None and truth_class is not None
            self.truths.append(np.asarray(truth, dtype=np.float64))
            self.truth_classes.append(np.asarray(truth_class, dtype=np.int64))

    def add_detections(self, annotated: int, found: int, matched: int) -> None:
        """One window's annotated agents at t0 inside the grid, agents found by the model, and pairs matched."""
        self.detection_counts += np.array([annotated, found, matched], dtype=np.int64)

    def add_track_errors(self, classes: np.ndarray, velocity_error: np.ndarray, heading_error: np.ndarray) -> None:
        """Add one window's matched pairs.

        Args:
            classes: [M] int — the annotated agent's class.
            velocity_error: [M] float — the track's velocity error (m/s; NaN where the annotated one is unknown).
            heading_error: [M] float — the track's heading error (rad, in [0, π]).
        """
        self.track_errors.append(np.stack([classes, velocity_error, heading_error], axis=1).astype(np.float64))

    def summary(self, truth: np.ndarray, truth_class: np.ndarray) -> dict:
        """The JSON scores (see the module docstring); ``truth`` [N, T, 2], ``truth_class`` [N] of every agent."""
        scores: dict = {}
        if self.matched:
            steps = truth.shape[1]
            truth = np.concatenate(self.truths) if self.truths else np.zeros((0, steps, 2))
            truth_class = np.concatenate(self.truth_classes) if self.truth_classes else np.zeros(0, dtype=np.int64)
            annotated, found, matched = (int(v) for v in self.detection_counts)
            scores["agents_matched"] = int(len(truth))
            scores.update(detection_annotated=annotated, detection_found=found, detection_matched=matched)
            scores["detection_recall"] = matched / annotated if annotated else float("nan")
            scores["detection_precision"] = matched / found if found else float("nan")
        if self.track_errors:
            errors = np.concatenate(self.track_errors)  # [M, 3]
            of_class = [errors[errors[:, 0] == c] for c in range(len(categories.CLASSES))]
            scores["track_velocity_error_mps"] = {
                name: _nanmean(of_class[c][:, 1]) for c, name in enumerate(categories.CLASSES)
            }
            scores["track_heading_error_deg"] = {
                name: _nanmean(np.degrees(of_class[c][:, 2])) for c, name in enumerate(categories.CLASSES)
            }
        if self.modes:
            modes, probabilities = np.concatenate(self.modes), np.concatenate(self.probabilities)
            scores.update(_trajectory_scores(modes, probabilities, truth))
            scores["per_class"] = {
                name: {
                    "agents": int((truth_class == c).sum()),
                    **_trajectory_scores(
                        modes[truth_class == c], probabilities[truth_class == c], truth[truth_class == c]
                    ),
                }
                for c, name in enumerate(categories.CLASSES)
            }
        per_step = metrics.iou(self.intersection, self.union)  # [S, C]
        vpq_step, vpq_all = self.vpq.vpq()
        brier = self.squared_error / np.maximum(self.cells, 1)
        names = categories.CLASSES
        scores["iou"] = {name: per_step[:, c].tolist() for c, name in enumerate(names)}
        if self.intersection_bars is not None:
            at_bars = metrics.iou(self.intersection_bars, self.union_bars)
            scores["iou_at_bars"] = {name: at_bars[:, c].tolist() for c, name in enumerate(names)}
        scores["iou_2s_mean"] = _nanmean(per_step[-1])
        short = metrics.iou(self.intersection_short, self.union_short)  # [S, C]
        scores["iou_short"] = {name: short[:, c].tolist() for c, name in enumerate(names)}
        scores["vpq"] = {name: vpq_step[:, c].tolist() for c, name in enumerate(names)}
        scores["vpq_all_steps"] = {name: float(vpq_all[c]) for c, name in enumerate(names)}
        scores["vpq_2s_mean"] = _nanmean(vpq_step[-1])
        scores["brier"] = {name: brier[:, c].tolist() for c, name in enumerate(names)}
        scores["brier_mean"] = float(self.squared_error.sum() / max(int(self.cells.sum()), 1))
        ece = metrics.expected_calibration_error(self.calibration)  # [C]
        scores["ece"] = {name: float(ece[c]) for c, name in enumerate(names)}
        scores["ece_all"] = float(metrics.expected_calibration_error(self.calibration.sum(axis=0)))
        return scores


SHORT_RANGE_M = 15.0
"""Half the side of the square around the ego that ``iou_short`` scores: FIERY's short range, 30 × 30 m."""


def short_range(grid: geometry.GridSpec, half_side_m: float = SHORT_RANGE_M) -> tuple[slice, slice]:
    """The rows and columns of ``grid`` whose cell centres lie within ``half_side_m`` of the ego along x and y."""

    def inside(centres: np.ndarray) -> slice:
        kept = np.flatnonzero(np.abs(centres) < half_side_m)  # contiguous: the centres ascend
        return slice(int(kept[0]), int(kept[-1]) + 1) if kept.size else slice(0, 0)

    rows, columns = grid.shape
    x, y = grid.index_to_center_coords(np.arange(rows), np.arange(columns))
    return inside(x), inside(y)


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def _trajectory_scores(modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray) -> dict:
    """minADE_k, minFDE_k, MissRate_2_k for ``TOP_K`` (NaN without agents)."""
    scores = {}
    for k in TOP_K:
        if len(truth):
            ade, fde = metrics.min_ade_fde(modes, probabilities, truth, k)
            miss = metrics.miss_rate(modes, probabilities, truth, k)
            scores.update({f"minADE_{k}": ade.mean(), f"minFDE_{k}": fde.mean(), f"MissRate_2_{k}": miss.mean()})
        else:
            scores.update({f"minADE_{k}": np.nan, f"minFDE_{k}": np.nan, f"MissRate_2_{k}": np.nan})
    return {key: float(value) for key, value in scores.items()}


def scored_agents(agent_future_mask: np.ndarray, steps: int) -> np.ndarray:
    """[A] bool: agents whose future is annotated at every one of the first ``steps`` steps ([A, T] mask)."""
    return np.asarray(agent_future_mask, dtype=bool)[:, :steps].all(axis=1)


def evaluate(
    data: Path,
    split: str,
    run: Path | None = None,
    batch_size: int = 4,
    threshold: float = 0.5,
    trajectory_seconds: float | None = None,
    detection_threshold: float = 0.3,
    ece_bins: int = metrics.ECE_BINS,
    direct_run: Path | None = None,
) -> dict:
    """Score the model of ``run`` (if given), the direct baseline (if given) and the baselines on ``split``.

    Args:
        data: a ``bevjepa preprocess`` output.
        split: a devkit split (``mini_val``, ...) or ``all``.
        run: a run folder; None scores the baselines only.
        batch_size: windows per model forward.
        threshold: occupancy probability from which a cell counts as occupied (IoU, VPQ).
        trajectory_seconds: the trajectory horizon scored (s, a multiple of 0.5); None: all T steps.
        detection_threshold: the lowest detection score that makes a tracked agent (``model``,
            ``constant_velocity_tracked``).
        ece_bins: equal-width bins of the ECE.
        direct_run: a run folder of the direct baseline (``bevjepa train --config direct``), scored as ``direct``.

    Returns:
        The scores, structured as the module docstring describes.

    Raises:
        ValueError: a bad horizon, or a ``direct_run`` that has a world model or another grid or horizon.
    """
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    direct = load_direct(direct_run, dataset) if direct_run is not None else None
    model = (
        forecaster.Forecaster.from_checkpoint(run, cache_frames=CACHE_FRAMES, min_score=detection_threshold)
        if run is not None
        else None
    )
    chosen_bars = {
        name: net.bars
        for name, net in (("model", model), ("direct", direct))
        if net is not None and net.bars is not None
    }
    bars = {name: chosen.array() for name, chosen in chosen_bars.items()}  # [S, C] each
    grid = model.net.config.grid if model is not None else geometry.GridSpec()
    window_steps = int(dataset.config["window"]["trajectory_steps"])
    steps = window_steps if trajectory_seconds is None else round(trajectory_seconds / baselines.STEP_S)
    if not 1 <= steps <= window_steps:
        raise ValueError(f"trajectory_seconds={trajectory_seconds}: the windows of {data} hold {window_steps} steps")
    names = ["model", "model_annotated", "model_latent"] if model is not None else []
    names += ["direct"] if direct is not None else []
    names += ["constant_velocity", "constant_velocity_past", "constant_velocity_anchor"]
    names += ["constant_velocity_tracked", "tracked_true_velocity"] if model is not None else []
    names += ["ctrv", "persistence"]
    scores: dict[str, _Scores] = {}
    truths, truth_classes, windows_seen = [], [], 0
    failed: list[dict] = []
    with torch.no_grad():
        for first in range(0, len(dataset), batch_size):
            loaded = load_windows(dataset, range(first, min(first + batch_size, len(dataset))), failed)
            prepared = _prepare_windows(model, direct, loaded, dataset, failed)
            if prepared is None:
                continue
            batch, outputs = prepared
            for b in range(batch.batch_size):
                windows_seen += 1
                window = _window_truth(batch, b, steps)
                if not scores:
                    S, C = window.target.shape[:2]
                    for name, held in bars.items():
                        if held.shape != (S, C):
                            raise ValueError(
                                f"the {name} run's forecast_bars.json holds {list(held.shape)} bars (steps, classes), "
                                f"the windows {[S, C]}: run `bevjepa thresholds` on it again"
                            )
                    short = short_range(geometry.GridSpec(**dataset.config["window"]["grid"]))
                    scores = {
                        name: _Scores(S, C, ece_bins, matched=name in MATCHED_SOURCES, short=short) for name in names
                    }
                truths.append(window.future[window.full])
                truth_classes.append(window.cls[window.full])
                _score_baselines(scores, window, grid, steps, threshold)
                if outputs is not None and outputs[b].forecast is not None:
                    _score_model(scores, window, outputs[b], grid, threshold, bars.get("model"))
                if outputs is not None and outputs[b].direct is not None:
                    _add_map(scores["direct"], outputs[b].direct, window, threshold, bars.get("direct"))
    truth = np.concatenate(truths) if truths else np.zeros((0, steps, 2))
    truth_class = np.concatenate(truth_classes) if truth_classes else np.zeros(0, dtype=np.int64)
    result: dict = {
        "split": split,
        "windows": windows_seen,
        "windows_failed": len(failed),
        "failed_windows": failed,
        "agents": int(len(truth)),
        "agents_per_class": {name: int((truth_class == c).sum()) for c, name in enumerate(categories.CLASSES)},
        "trajectory_steps": steps,
        "settings": {
            "threshold": threshold,
            "ece_bins": ece_bins,
            "detection_threshold": detection_threshold,
            "trajectory_seconds": steps * baselines.STEP_S,
            "occupancy_thresholds": {
                name: _chosen_thresholds(net) for name, net in (("model", model), ("direct", direct)) if net is not None
            },
            "forecast_bars": {
                source: {name: [row[c] for row in chosen.bars] for c, name in enumerate(chosen.classes)}
                for source, chosen in chosen_bars.items()
            },
        },
        "models": {name: scores[name].summary(truth, truth_class) for name in names if name in scores},
    }
    return result


def _chosen_thresholds(model: forecaster.Forecaster) -> dict[str, float]:
    """The occupancy threshold per class of a loaded run that 0.5 on its published maps stands for."""
    shift = model.net.occupancy_logit_shift.detach().cpu().double().numpy()
    return {name: float(1.0 / (1.0 + np.exp(-v))) for name, v in zip(categories.CLASSES, shift, strict=True)}


def load_direct(run: Path, dataset: torch_dataset.WindowDataset) -> forecaster.Forecaster:
    """The direct baseline of ``run``, checked to be one and to forecast the windows' grid and horizon.

    Raises:
        ValueError: ``run`` has a world model (it is not the direct baseline), or another grid or horizon.
    """
    config = checkpoint.load_config(run)
    if config.model.world_model:
        raise ValueError(
            f"--direct {run}: this run has a world model (preset {config.preset!r}); give a run of the direct "
            "baseline, trained with `bevjepa train --config direct`"
        )
    try:
        checkpoint.check_windows(run, config.model, dataset)
    except ValueError as error:
        raise ValueError(f"--direct {error}") from None
    return forecaster.Forecaster.from_checkpoint(run)


@dataclass(frozen=True)
class _Predicted:
    """What the models predicted for one window.

    Attributes:
        forecast: the model's forecast from the sensors alone (None without a run).
        tracks: the agents it tracked from its detections (None without a run).
        annotated: the model's forecast of the annotated agents (None without a run).
        direct: [S, C, H, W] float32 the direct baseline's occupancy probabilities (None without a direct run).
    """

    forecast: forecaster.OccupancyForecast | None
    tracks: tracking.TrackedAgents | None
    annotated: forecaster.OccupancyForecast | None
    direct: np.ndarray | None


@dataclass(frozen=True)
class _WindowTruth:
    """One window's annotated agents and occupancy, as every source is scored against them.

    Attributes:
        target: [S, C, H, W] the annotated occupancy at t0 and each forecast step.
        truth_labels: [S, H, W] int64 instance labels of ``target`` (0: none).
        box: [A, 7] float64 t0 boxes (x, y, z, length, width, height, yaw; t0 ego frame).
        cls: [A] int64 agent classes.
        future: [A, T', 2] float64 annotated future xy (m, t0 ego frame), T' the scored steps.
        full: [A] bool agents with an annotated position at every scored step.
        past: [A, P, 2] float64 past xy; ``past_mask`` [A, P] bool.
        velocity: [A, 2] float64 the baselines' velocity (m/s).
        box_class: [A + 1] int64 the class of each instance label of a box source (index 0 unused).
    """

    target: np.ndarray
    truth_labels: np.ndarray
    box: np.ndarray
    cls: np.ndarray
    future: np.ndarray
    full: np.ndarray
    past: np.ndarray
    past_mask: np.ndarray
    velocity: np.ndarray
    box_class: np.ndarray

    @property
    def one(self) -> np.ndarray:
        """[A_full, 1] the probability 1 of a single-mode source's one mode."""
        return np.ones((int(self.full.sum()), 1))


def _window_truth(batch: torch_dataset.WindowBatch, b: int, steps: int) -> _WindowTruth:
    """Window ``b`` of ``batch`` with its ``steps`` scored trajectory steps."""
    target = batch.occupancy[b].numpy()  # [S, C, H, W]
    count = int(batch.agent_mask[b].sum())
    cls = batch.agent_class[b, :count].numpy()
    past = batch.agent_past[b, :count].numpy().astype(np.float64)
    past_mask = batch.agent_past_mask[b, :count].numpy()
    return _WindowTruth(
        target=target,
        truth_labels=metrics.class_labels(target, batch.instances[b].numpy()),
        box=batch.agent_box[b, :count].numpy().astype(np.float64),
        cls=cls,
        future=batch.agent_future[b, :count, :steps].numpy().astype(np.float64),  # [A, T', 2]
        full=scored_agents(batch.agent_future_mask[b, :count].numpy(), steps),
        past=past,
        past_mask=past_mask,
        velocity=baselines.agent_velocities(batch.agent_velocity[b, :count].numpy(), past, past_mask),
        box_class=np.r_[-1, cls],
    )


def _score_baselines(
    scores: dict[str, _Scores], w: _WindowTruth, grid: geometry.GridSpec, steps: int, threshold: float
) -> None:
    """Add one window's trajectories and occupancy of every baseline that reads the annotated boxes."""
    S, C = w.target.shape[:2]
    cv_modes = baselines.constant_velocity_trajectories(w.box[:, :2], w.velocity, steps)
    scores["constant_velocity"].add_trajectories(cv_modes[w.full], w.one)
    occupancy, ids = baselines.constant_velocity_occupancy_instances(w.box, w.cls, w.velocity, grid, C, S - 1)
    _add_boxes(scores["constant_velocity"], occupancy, ids, w.box_class, w.target, w.truth_labels)

    for name, causal in (
        ("constant_velocity_past", baselines.past_velocities(w.past, w.past_mask)),
        ("constant_velocity_anchor", baselines.anchor_velocities(w.past, w.past_mask)),
    ):
        modes = baselines.constant_velocity_trajectories(w.box[:, :2], causal, steps)
        scores[name].add_trajectories(modes[w.full], w.one)
        occupancy, ids = baselines.constant_velocity_occupancy_instances(w.box, w.cls, causal, grid, C, S - 1)
        _add_boxes(scores[name], occupancy, ids, w.box_class, w.target, w.truth_labels)

    yaw_rate = baselines.yaw_rate_from_past(w.past, w.past_mask)
    ctrv = baselines.ctrv_trajectories(w.box[:, :2], w.velocity, yaw_rate, steps)
    scores["ctrv"].add_trajectories(ctrv[w.full], w.one)
    occupancy, ids = baselines.ctrv_occupancy(w.box, w.cls, w.velocity, yaw_rate, grid, C, S - 1)
    _add_boxes(scores["ctrv"], occupancy, ids, w.box_class, w.target, w.truth_labels)

    still = baselines.constant_velocity_trajectories(w.box[:, :2], np.zeros_like(w.velocity), steps)
    scores["persistence"].add_trajectories(still[w.full], w.one)
    persistence = baselines.persistence_occupancy(w.target[0], S - 1)
    labels = np.repeat(w.truth_labels[:1], S, axis=0)
    scores["persistence"].add_occupancy(persistence, labels, threshold, w.target, w.truth_labels)


def _score_model(
    scores: dict[str, _Scores],
    w: _WindowTruth,
    output: _Predicted,
    grid: geometry.GridSpec,
    threshold: float,
    bars: np.ndarray | None = None,
) -> None:
    """Add one window's two forecasts (sensors alone, annotated agents), latent map and tracks at constant speed.

    With ``bars`` [S, C] (the run's ``forecast_bars``) the sensor-only forecast is scored at them too.
    """
    S, C = w.target.shape[:2]
    steps = w.future.shape[1]
    forecast, tracks, annotated = output.forecast, output.tracks, output.annotated
    assert forecast is not None and tracks is not None and annotated is not None
    # From the sensors: trajectories of the tracks that stand for annotated agents.
    match = metrics.match_agents(tracks.boxes[:, :2], tracks.classes, w.box[:, :2], w.cls)  # [A]
    reachable = grid.xy_to_index(w.box[:, :2])[2]  # [A] the annotated agents inside the grid: a track can reach them
    scored = w.full & (match >= 0)
    found = match[scored]
    true_velocity = baselines.true_track_velocities(tracks.velocity, match, w.velocity)  # [A', 2]
    one = np.ones((tracks.count, 1))
    xy = tracks.boxes[:, :2]
    for name, modes, probabilities in (
        ("model", forecast.trajectories[:, :, :steps], forecast.mode_probabilities),
        ("constant_velocity_tracked", baselines.constant_velocity_trajectories(xy, tracks.velocity, steps), one),
        ("tracked_true_velocity", baselines.constant_velocity_trajectories(xy, true_velocity, steps), one),
    ):
        scores[name].add_trajectories(modes[found], probabilities[found], w.future[scored], w.cls[scored])
        scores[name].add_detections(int(reachable.sum()), tracks.count, int((match[reachable] >= 0).sum()))
    _add_map(scores["model"], forecast.occupancy, w, threshold, bars)
    pairs = np.flatnonzero(match >= 0)  # the annotated agents a track stands for
    heading = tracks.boxes[match[pairs], 6] - w.box[pairs, 6]
    scores["model"].add_track_errors(
        w.cls[pairs],
        np.linalg.norm(tracks.velocity[match[pairs]] - w.velocity[pairs], axis=-1),
        np.abs(geometry.wrap_angle(heading)),
    )
    for name, agents in (
        ("constant_velocity_tracked", tracks),
        ("tracked_true_velocity", replace(tracks, velocity=true_velocity)),
    ):
        occupancy, ids = baselines.constant_velocity_tracked(agents, grid, C, S - 1)
        _add_boxes(scores[name], occupancy, ids, np.r_[-1, tracks.classes], w.target, w.truth_labels)
    # The annotated agents (the prediction-challenge protocol): their boxes along the modes; VPQ ids the agents.
    scores["model_annotated"].add_trajectories(
        annotated.trajectories[w.full, :, :steps], annotated.mode_probabilities[w.full]
    )
    _, ids = agent_occupancy.mode_occupancy_instances(
        w.box, w.cls, annotated.trajectories, annotated.mode_probabilities, grid, C, S - 1
    )
    labels = metrics.class_labels(annotated.occupancy >= threshold, ids, w.box_class)
    scores["model_annotated"].add_occupancy(annotated.occupancy, labels, threshold, w.target, w.truth_labels)
    _add_map(scores["model_latent"], forecast.latent_occupancy, w, threshold)


def _add_map(
    scores: _Scores, probability: np.ndarray, w: _WindowTruth, threshold: float, bars: np.ndarray | None = None
) -> None:
    """Score a dense occupancy map [S, C, H, W] (VPQ instances: its connected components above ``threshold``).

    With ``bars`` [S, C] its IoU at them too, each step and class at its own.
    """
    labels = metrics.connected_instances(probability >= threshold)
    scores.add_occupancy(probability, labels, threshold, w.target, w.truth_labels, bars)


def _failure(dataset: torch_dataset.WindowDataset, index: int, stage: str, error: Exception) -> dict:
    """The record of a window that could not be scored (``failed_windows`` of the result)."""
    entry = dataset.entries[index]
    return {
        "index": index,
        "scene": entry["scene"],
        "sample_token": entry["sample_token"],
        "file": entry["file"],
        "stage": stage,
        "error": f"{type(error).__name__}: {error}",
    }


def load_windows(
    dataset: torch_dataset.WindowDataset, indices: range, failed: list[dict]
) -> list[tuple[int, torch_dataset.WindowSample]]:
    """(index, sample) of each window that loads; each one that does not is recorded in ``failed`` (stage load)."""
    loaded = []
    for index in indices:
        try:
            loaded.append((index, dataset[index]))
        except Exception as error:  # noqa: BLE001 — a bad window is recorded, the evaluation goes on
            failed.append(_failure(dataset, index, "load", error))
    return loaded


def _model_outputs(
    model: forecaster.Forecaster | None,
    direct: forecaster.Forecaster | None,
    samples: list[torch_dataset.WindowSample],
) -> tuple[torch_dataset.WindowBatch, list[_Predicted] | None]:
    """The samples' batch and, with a model or the direct baseline, what each predicted.

    The model forecasts twice, from its tracks and from the annotated agents, predicting the scene once for both
    (``Forecaster.scene``).
    """
    batch = torch_dataset.collate(samples)
    if model is None and direct is None:
        return batch, None
    none: list = [None] * batch.batch_size
    forecasts, tracks, annotated = none, none, none
    if model is not None:
        on_device = batch.to(model.device)
        scene = model.scene(on_device)
        tracks = model.track(on_device, scene=scene)
        forecasts = model.forecast_batch(on_device, tracks=tracks, scene=scene)
        annotated = model.using("annotated").forecast_batch(on_device, scene=scene)
    maps: list = none
    if direct is not None:
        maps = [forecast.latent_occupancy for forecast in direct.forecast_batch(batch)]  # [S, C, H, W] each
    return batch, [_Predicted(*predicted) for predicted in zip(forecasts, tracks, annotated, maps, strict=True)]


def _prepare_windows(
    model: forecaster.Forecaster | None,
    direct: forecaster.Forecaster | None,
    loaded: list[tuple[int, torch_dataset.WindowSample]],
    dataset: torch_dataset.WindowDataset,
    failed: list[dict],
) -> tuple[torch_dataset.WindowBatch, list | None] | None:
    """The batch of the loaded windows and the models' outputs, leaving out (and recording) windows that fail.

    One forward pass of each model for the whole batch; if one raises, the windows are retried one at a time, and
    each one that still raises (a bad agent, ``forecaster.check_agent_inputs``) is recorded in ``failed`` (stage
    forecast). None when no window is left.
    """
    if not loaded:
        return None
    try:
        return _model_outputs(model, direct, [sample for _, sample in loaded])
    except Exception:  # noqa: BLE001 — find the windows that fail, below
        pass
    kept: list[torch_dataset.WindowSample] = []
    outputs: list = []
    for index, sample in loaded:
        try:
            _, one = _model_outputs(model, direct, [sample])
        except Exception as error:  # noqa: BLE001 — a bad window is recorded, the evaluation goes on
            failed.append(_failure(dataset, index, "forecast", error))
            continue
        kept.append(sample)
        outputs += one or []
    if not kept:
        return None
    return torch_dataset.collate(kept), (outputs if model is not None or direct is not None else None)


def _add_boxes(
    scores: _Scores,
    occupancy: np.ndarray,
    ids: np.ndarray,
    box_class: np.ndarray,
    target: np.ndarray,
    truth_labels: np.ndarray,
) -> None:
    """Score a box baseline's 0/1 occupancy [S, C, H, W] with its instance map [S, H, W] (ids 1 + box index)."""
    labels = metrics.class_labels(occupancy, ids, box_class.astype(np.int64))
    scores.add_occupancy(occupancy.astype(np.float32), labels, 0.5, target, truth_labels)
