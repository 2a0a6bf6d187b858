"""The model's tracks in the nuScenes tracking submission format, scored by the devkit's own ``TrackingEval``.

The forecaster tracks its own detections over each window's keyframes and keeps ids over the consecutive windows
of a scene (``prediction.tracking``). Going through a split's windows in time order, each window's t0 tracks
become one sample's boxes with their ``tracking_id``; boxes go to the global frame as detections do
(``detection_eval.detection_records``), classes map as detections do (vehicle → car, pedestrian, cyclist →
bicycle). ``write_submission`` writes the devkit's JSON (every sample of the split; those without a window get an
empty list) and ``score_submission`` runs ``nuscenes.eval.tracking.evaluate.TrackingEval`` (AMOTA, AMOTP, MOTA,
recall, ID switches, ...; the devkit needs ``motmetrics``, installed with the project).

As for detection, the ``tracking_nips_2019`` config keeps its ``class_range`` and thresholds and only its
``class_names`` is reduced to the three classes the model tracks (the devkit averages over ``class_names``).
Beside the model's scores, ``grid_ceiling`` scores the annotated tracks that the model's grid and windows can hold:
what no tracker of its detections can exceed.

Notation:
    A  tracked agents of a window
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bevjepa.datasets import geometry, nuscenes_source, torch_dataset
from bevjepa.datasets import io as bevio
from bevjepa.evaluation import detection_eval
from bevjepa.prediction import forecaster, heads, tracking, train

CONFIG_NAME = "tracking_nips_2019"
SUBMISSION_FILE = "tracking_submission.json"
METRICS_FILE = "tracking_metrics.json"
EVALUATED_CLASSES: tuple[str, ...] = detection_eval.EVALUATED_CLASSES
"""The devkit tracking classes scored: those the model tracks (car, pedestrian, bicycle)."""
PLACEHOLDER_DISTANCE_M = 1e6
"""How far from the ego the placeholder box of an empty submission lies (m)."""
SUMMARY_METRICS = ("amota", "amotp", "recall", "motar", "mota", "motp", "ids", "frag", "tp", "fp", "fn", "gt")
"""The devkit's metrics kept in ``tracking_metrics.json``, overall and per class."""


def tracking_records(agents: tracking.TrackedAgents, sample_token: str, global_from_ego: np.ndarray) -> list[dict]:
    """One window's tracked agents (t0 ego frame) → the devkit's tracking records (global frame).

    Args:
        agents: the window's tracks at t0, with their stream ids.
        sample_token: the window's t0 keyframe.
        global_from_ego: [4, 4] float — its ego pose (m).
    """
    detections = heads.Detections(
        boxes=agents.boxes.astype(np.float32),
        velocity=agents.velocity.astype(np.float32),
        scores=agents.scores.astype(np.float32),
        classes=agents.classes.astype(np.int64),
        batch_index=np.zeros(agents.count, dtype=np.int64),
    )
    records = detection_eval.detection_records(detections, [sample_token], np.asarray(global_from_ego)[None])
    return [
        {
            "sample_token": record.sample_token,
            "translation": list(record.translation),
            "size": list(record.size),
            "rotation": list(record.rotation),
            "velocity": list(record.velocity),
            "tracking_id": str(track_id),
            "tracking_name": record.detection_name,
            "tracking_score": record.detection_score,
        }
        for record, track_id in zip(records, agents.ids, strict=True)
    ]


def write_submission(
    records: Sequence[dict], path: Path, meta: detection_eval.SubmissionMeta, sample_tokens: Sequence[str]
) -> Path:
    """Write ``{"meta": {...}, "results": {sample_token: [records]}}`` for every sample of ``sample_tokens``.

    Raises:
        ValueError: a record of a sample not in ``sample_tokens``.
    """
    results: dict[str, list[dict]] = {str(token): [] for token in sample_tokens}
    for record in records:
        if record["sample_token"] not in results:
            raise ValueError(f"{path}: a record names sample {record['sample_token']}, not a sample of the split")
        results[record["sample_token"]].append(record)
    bevio.atomic_write_json(Path(path), {"meta": meta.as_json(), "results": results}, indent=None)
    return Path(path)


def tracking_config(classes: Sequence[str] = EVALUATED_CLASSES):
    """The devkit's ``tracking_nips_2019`` ``TrackingConfig``, scoring only ``classes`` (see the module docstring).

    Raises:
        ValueError: no classes, or a name that is not a devkit tracking class.
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.tracking.data_classes import TrackingConfig

    config = TrackingConfig.deserialize(config_factory(CONFIG_NAME).serialize())
    classes = list(classes)
    unknown = [c for c in classes if c not in config.tracking_names]
    if not classes or unknown:
        raise ValueError(f"classes must be a non-empty subset of {config.tracking_names}, got {classes}")
    config.class_names = sorted(classes)
    return config


def score_submission(
    dataroot: Path, version: str, split: str, submission_path: Path, out_dir: Path, verbose: bool = False
) -> dict:
    """Score a tracking submission with the devkit's ``TrackingEval``; write ``out_dir/tracking_metrics.json``.

    Returns:
        A JSON-safe dict: ``SUMMARY_METRICS`` over the scored classes (the devkit's means), ``per_class``
        {class: {metric: value}}, ``classes``, ``split``, ``version``, ``config``.

    Raises:
        FileNotFoundError: no submission file.
        ValueError: a split that is not the version's.
    """
    from nuscenes.eval.tracking.evaluate import TrackingEval

    detection_eval.check_split(version, split)
    submission_path, out_dir = Path(submission_path), Path(out_dir)
    if not submission_path.is_file():
        raise FileNotFoundError(f"{submission_path} not found: write it with write_submission first")
    config = tracking_config()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tracking-eval-") as scratch:
        result_path = submission_path
        submission = json.loads(submission_path.read_text())
        if not any(submission["results"].values()):  # the devkit cannot type an empty submission's boxes
            result_path = Path(scratch) / "submission_with_placeholder.json"
            bevio.atomic_write_json(result_path, _with_placeholder(submission, dataroot, version), indent=None)
        evaluation = TrackingEval(
            config, str(result_path), split, str(Path(scratch) / "devkit"), version, str(dataroot), verbose=verbose
        )
        metrics, _ = evaluation.evaluate()
    summary = metrics.serialize()
    result = {
        **{name: summary.get(name) for name in SUMMARY_METRICS},
        "per_class": {
            c: {name: summary["label_metrics"][name][c] for name in SUMMARY_METRICS} for c in config.class_names
        },
        "classes": list(config.class_names),
        "split": split,
        "version": version,
        "config": {**config.serialize(), "class_names": list(config.class_names), "name": CONFIG_NAME},
    }
    result = detection_eval.json_safe(result)
    bevio.atomic_write_json(out_dir / METRICS_FILE, result, indent=None)
    return result


def grid_ceiling(
    nusc,
    dataroot: Path,
    version: str,
    split: str,
    pose_of: Mapping[str, np.ndarray],
    grid: geometry.GridSpec,
    out_dir: Path,
) -> dict:
    """The devkit's tracking scores of a perfect tracker that sees only what the model can: the grid, the windows.

    As ``detection_eval.grid_ceiling`` for detection: the annotated boxes the devkit scores (within the class
    range: cars 50 m, people and bicycles 40 m), with their instance as the track id and score 1, on the samples of
    ``pose_of`` where their centre lies inside ``grid``, nothing elsewhere; scored as ``score_submission`` does.
    No tracker of the model's detections can exceed it: the annotated tracks beyond the grid or on samples
    without a window are misses for every tracker.

    Args:
        nusc: the loaded ``NuScenes`` of ``dataroot`` and ``version``.
        dataroot, version, split: as ``score_submission``.
        pose_of: {sample token: [4, 4] its t0 ego pose (global from ego)} of the samples with a window.
        grid: the model's grid, in the ego frame.
        out_dir: where its submission and metrics go (created).

    Returns:
        ``score_submission``'s dict.
    """
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.tracking.data_classes import TrackingBox

    config = tracking_config()  # first: a TrackingConfig sets the devkit's tracking names, which load_gt checks
    scored = filter_eval_boxes(nusc, add_center_dist(nusc, load_gt(nusc, split, TrackingBox)), config.class_range)
    records = [
        {
            "sample_token": token,
            "translation": list(box.translation),
            "size": list(box.size),
            "rotation": list(box.rotation),
            "velocity": np.nan_to_num(box.velocity).tolist(),  # the devkit's own; NaN (seen once) as zero
            "tracking_id": box.tracking_id,
            "tracking_name": box.tracking_name,
            "tracking_score": 1.0,
        }
        for token, box in detection_eval.boxes_the_grid_holds(scored, "tracking_name", pose_of, grid)
    ]
    meta = detection_eval.SubmissionMeta(use_camera=False, use_lidar=True)
    split_tokens = detection_eval.split_sample_tokens(nusc, split)
    submission = write_submission(records, Path(out_dir) / SUBMISSION_FILE, meta, split_tokens)
    return score_submission(dataroot, version, split, submission, out_dir)


def _with_placeholder(submission: dict, dataroot: Path, version: str) -> dict:
    """An empty submission plus one box far beyond every class range, which the devkit drops before matching.

    As ``detection_eval`` does for detections: the metrics are those of no tracks.
    """
    nusc = nuscenes_source.open_nuscenes(dataroot, version)
    token = next(iter(submission["results"]))
    sample = nusc.get("sample", token)
    x, y, z = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])[
        "translation"
    ]
    placeholder = {
        "sample_token": token,
        "translation": [x + PLACEHOLDER_DISTANCE_M, y, z],
        "size": [1.0, 1.0, 1.0],
        "rotation": [1.0, 0.0, 0.0, 0.0],
        "velocity": [0.0, 0.0],
        "tracking_id": "placeholder",
        "tracking_name": EVALUATED_CLASSES[0],
        "tracking_score": 0.0,
    }
    return {"meta": submission["meta"], "results": {**submission["results"], token: [placeholder]}}


@torch.no_grad()
def evaluate_model_tracking(
    run: Path,
    data: Path,
    dataroot: Path,
    version: str,
    split: str,
    out_dir: Path,
    batch_size: int = 4,
    min_score: float = tracking.MIN_SCORE,
    progress: bool = False,
) -> dict:
    """Track with the checkpoint of ``run`` through the split's windows, scene by scene; export and score the tracks.

    A scene's windows are in keyframe order in the manifest (``bevjepa preprocess`` writes them so); consecutive
    windows link their tracks (``Forecaster`` stream ids), a gap starts new ids.

    Writes ``out_dir/tracking_submission.json`` and ``out_dir/tracking_metrics.json``.

    Returns:
        ``score_submission``'s dict, plus ``windows`` and ``submission`` (its path).
    """
    out_dir = Path(out_dir)
    detection_eval.check_split(version, split)
    model = forecaster.Forecaster.from_checkpoint(run, cache_frames=16 * batch_size, min_score=min_score)
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    records: list[dict] = []
    seen: set[str] = set()
    pose_of: dict[str, np.ndarray] = {}  # each exported sample's t0 ego pose [4, 4]
    batches = dataset.scene_batches(batch_size)
    total = math.ceil(len(dataset) / batch_size)
    for samples in tqdm(batches, total=total, desc="tracking", unit="batch", disable=not progress):
        batch = torch_dataset.collate(samples)
        for sample, agents in zip(samples, model.track(batch.to(model.device)), strict=True):
            if sample.sample_token in seen:
                continue
            seen.add(sample.sample_token)
            pose_of[sample.sample_token] = dataset.frame(sample.scene_name, sample.sample_token).global_from_ego
            records += tracking_records(agents, sample.sample_token, pose_of[sample.sample_token])
    nusc = nuscenes_source.open_nuscenes(dataroot, version)
    split_tokens = detection_eval.split_sample_tokens(nusc, split)
    meta = detection_eval.SubmissionMeta(use_camera=model.net.config.use_camera, use_lidar=model.net.config.use_lidar)
    submission = write_submission(records, out_dir / SUBMISSION_FILE, meta, split_tokens)
    result = score_submission(dataroot, version, split, submission, out_dir)
    ceiling = grid_ceiling(nusc, dataroot, version, split, pose_of, model.net.config.grid, out_dir / "grid-ceiling")
    result = {
        **result,
        "windows": len(dataset),
        "submission": str(submission),
        "grid_ceiling_amota": ceiling["amota"],
        "grid_ceiling_recall": ceiling["recall"],
        "grid_ceiling_per_class_amota": {c: ceiling["per_class"][c]["amota"] for c in ceiling["classes"]},
    }
    bevio.atomic_write_json(out_dir / METRICS_FILE, result, indent=None)
    return result
