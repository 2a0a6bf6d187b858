"""Detections in the nuScenes submission format, scored by the devkit's own ``DetectionEval``.

The model detects three classes (``categories.CLASSES``) in the ego frame of t0. A submission names the
devkit's detection classes, in the global frame, one list of boxes per sample. This module converts
(``detection_records``), writes the submission JSON (``write_submission``), runs
``nuscenes.eval.detection.evaluate.DetectionEval`` on it (``score_submission``) and does all three for a
checkpoint over the windows of a split (``evaluate_model_detections``).

Class mapping (model class → devkit detection name):

=========== ============ ===========================================================================
model       devkit       attribute (by speed ``hypot(vx, vy)`` against ``MOVING_SPEED_MPS``)
=========== ============ ===========================================================================
vehicle     car          ``vehicle.moving`` above, else ``vehicle.parked`` (nuScenes' most common)
pedestrian  pedestrian   ``pedestrian.moving`` above, else ``pedestrian.standing``
cyclist     bicycle      ``cycle.with_rider`` above, else ``cycle.without_rider`` (parked bicycles)
=========== ============ ===========================================================================

Our ``vehicle`` also holds trucks, buses, trailers and construction vehicles and ``cyclist`` also holds
motorcycles (``categories.CATEGORY_TO_CLASS``); the devkit keeps those apart, so a detected truck counts as a
false ``car``. By default the evaluation is restricted to the three devkit classes the model predicts
(``EVALUATED_CLASSES``); ground truth of the other classes is loaded but never matched.

Devkit behaviour this module handles:

- ``DetectionEval`` asserts that the submission's samples are exactly the split's samples *present in the
  dataroot's tables* (``load_gt`` walks ``nusc.sample``): a dataroot holding one scene of ``mini_val`` is
  evaluated on that scene's samples alone. Windows cover only keyframes with enough past and future, so
  ``write_submission`` pads the other samples of the split with empty lists; ``score_submission`` names the
  samples that are missing or foreign before the devkit's bare assertion can fire.
- ``DetectionConfig`` insists that ``class_range`` holds all ten classes, and ``filter_eval_boxes`` looks every
  ground-truth box's class up in it; so the class restriction is made on ``class_names`` (what ``evaluate`` loops
  over and ``DetectionMetrics`` averages over), leaving the devkit's ``class_range`` and every threshold as
  ``config_factory('detection_cvpr_2019')`` gives them.
- ``filter_eval_boxes`` cannot handle a submission without a single box (it fails to tell the box type). Such a
  submission is scored with one placeholder box a million metres from the ego, which the devkit's own
  distance filter drops before matching: the metrics are exactly those of no detections.

Notation:
    N  detections     B  samples (windows) of a batch
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bevjepa.datasets import categories, geometry, nuscenes_source, torch_dataset
from bevjepa.datasets import io as bevio
from bevjepa.prediction import forecaster, heads, tracking, train

DETECTION_NAME_OF_CLASS: dict[str, str] = {"vehicle": "car", "pedestrian": "pedestrian", "cyclist": "bicycle"}
"""The devkit's detection name of each model class (see the module docstring)."""

EVALUATED_CLASSES: tuple[str, ...] = tuple(DETECTION_NAME_OF_CLASS[c] for c in categories.CLASSES)
"""The devkit classes scored by default: those the model predicts (car, pedestrian, bicycle)."""

MOVING_SPEED_MPS = 0.2
"""Speed (m/s) above which a detection gets the moving attribute (as CenterPoint's nuScenes export)."""

_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "car": ("vehicle.moving", "vehicle.parked"),
    "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
}
"""(moving, still) attribute of each detection name the model emits."""

VELOCITY_SOURCES = ("tracks", "head")
"""Where an exported detection's velocity comes from (``evaluate_model_detections``): the agent tracked from it,
or the detection head's regression."""

SUBMISSION_FILE = "detection_submission.json"
METRICS_FILE = "detection_metrics.json"
CONFIG_NAME = "detection_cvpr_2019"
_VERSION_OF_SPLIT = {
    "train": "trainval",
    "val": "trainval",
    "train_detect": "trainval",
    "train_track": "trainval",
    "mini_train": "mini",
    "mini_val": "mini",
    "test": "test",
}
"""The dataset version suffix each predefined split needs (the devkit's ``load_gt`` asserts the same)."""
_PLACEHOLDER_DISTANCE_M = 1.0e6
_TP_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}


@dataclass(frozen=True)
class SubmissionMeta:
    """The ``meta`` block of a nuScenes detection submission: which inputs the method used."""

    use_camera: bool
    use_lidar: bool
    use_radar: bool = False
    use_map: bool = False
    use_external: bool = False

    def as_json(self) -> dict[str, bool]:
        """The devkit's ``meta`` dict."""
        return {
            "use_camera": bool(self.use_camera),
            "use_lidar": bool(self.use_lidar),
            "use_radar": bool(self.use_radar),
            "use_map": bool(self.use_map),
            "use_external": bool(self.use_external),
        }


@dataclass(frozen=True)
class DetectionRecord:
    """One box of a nuScenes detection submission, in the global frame.

    Attributes:
        sample_token: the keyframe.
        translation: box centre x, y, z (m, global frame).
        size: width, length, height (m), all positive.
        rotation: scalar-first quaternion w, x, y, z of the box in the global frame.
        velocity: vx, vy (m/s, global frame).
        detection_name: one of the devkit's ten detection names.
        detection_score: confidence in [0, 1].
        attribute_name: one of the devkit's attribute names, or "" for classes without attributes.
    """

    sample_token: str
    translation: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    velocity: tuple[float, float]
    detection_name: str
    detection_score: float
    attribute_name: str

    def __post_init__(self) -> None:
        from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES, DETECTION_NAMES

        for name, length in (("translation", 3), ("size", 3), ("rotation", 4), ("velocity", 2)):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != length or not all(math.isfinite(v) for v in value):
                raise ValueError(
                    f"DetectionRecord.{name} of sample {self.sample_token}: expected {length} finite numbers, "
                    f"got {getattr(self, name)}"
                )
            object.__setattr__(self, name, value)
        if min(self.size) <= 0:
            raise ValueError(f"DetectionRecord.size of sample {self.sample_token} must be positive, got {self.size}")
        if self.detection_name not in DETECTION_NAMES:
            raise ValueError(f"DetectionRecord.detection_name {self.detection_name!r} is not one of {DETECTION_NAMES}")
        if self.attribute_name not in ATTRIBUTE_NAMES and self.attribute_name != "":
            raise ValueError(f"DetectionRecord.attribute_name {self.attribute_name!r} is not one of {ATTRIBUTE_NAMES}")
        score = float(self.detection_score)
        if not math.isfinite(score):
            raise ValueError(f"DetectionRecord.detection_score of sample {self.sample_token} must be finite")
        object.__setattr__(self, "detection_score", score)

    def as_json(self) -> dict:
        """The devkit's record dict (what ``DetectionBox.deserialize`` reads)."""
        return {
            "sample_token": self.sample_token,
            "translation": list(self.translation),
            "size": list(self.size),
            "rotation": list(self.rotation),
            "velocity": list(self.velocity),
            "detection_name": self.detection_name,
            "detection_score": self.detection_score,
            "attribute_name": self.attribute_name,
        }


def detection_records(
    detections: heads.Detections,
    sample_tokens: Sequence[str],
    global_from_ego: np.ndarray,
    class_names: Sequence[str] = categories.CLASSES,
    moving_speed_mps: float = MOVING_SPEED_MPS,
) -> list[DetectionRecord]:
    """Model detections in the t0 ego frame → submission records in the global frame.

    The box centre goes through the pose; its rotation is the pose's rotation times the yaw about the ego's +z
    (as the devkit's ``Box.rotate`` composes them), so a pose with roll or pitch tilts the box with the ego; the
    velocity is rotated (no translation). Names and attributes follow the table in the module docstring.

    Args:
        detections: N detections; ``batch_index`` indexes ``sample_tokens`` and ``global_from_ego``.
        sample_tokens: [B] the t0 keyframe of each batch sample.
        global_from_ego: [B, 4, 4] float — the t0 ego pose of each batch sample (m).
        class_names: the model class of each class index (``categories.CLASSES`` order).
        moving_speed_mps: speed (m/s) above which the moving attribute is given.

    Returns:
        N records, in the detections' order.

    Raises:
        ValueError: shapes that disagree, a batch index or class index out of range, a class without a devkit
            name, non-finite boxes.
    """
    poses = np.asarray(global_from_ego, dtype=np.float64)
    B = len(sample_tokens)
    if poses.shape != (B, 4, 4) or not np.all(np.isfinite(poses)):
        raise ValueError(f"global_from_ego: expected finite [{B}, 4, 4] for {B} sample tokens, got {poses.shape}")
    names = []
    for c in class_names:
        if c not in DETECTION_NAME_OF_CLASS:
            raise ValueError(f"class {c!r} has no devkit detection name (known: {sorted(DETECTION_NAME_OF_CLASS)})")
        names.append(DETECTION_NAME_OF_CLASS[c])
    N = len(detections.scores)
    if N == 0:
        return []
    b = detections.batch_index
    if b.min() < 0 or b.max() >= B:
        raise ValueError(f"Detections.batch_index spans [{b.min()}, {b.max()}] but there are {B} sample tokens")
    cls = detections.classes
    if cls.min() < 0 or cls.max() >= len(names):
        raise ValueError(f"Detections.classes spans [{cls.min()}, {cls.max()}] but there are {len(names)} classes")
    boxes = detections.boxes.astype(np.float64)  # [N, 7]
    velocity = detections.velocity.astype(np.float64)  # [N, 2]
    if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(velocity))):
        raise ValueError("Detections: boxes and velocities must be finite")

    rotation = poses[b, :3, :3]  # [N, 3, 3] global_from_ego
    centre = np.einsum("nij,nj->ni", rotation, boxes[:, :3]) + poses[b, :3, 3]  # [N, 3] (m, global)
    box_rotation = geometry.quaternion_to_matrix(geometry.yaw_to_quaternion(boxes[:, 6]))  # [N, 3, 3] ego_from_box
    quaternion = geometry.matrix_to_quaternion(rotation @ box_rotation)  # [N, 4] global_from_box, w >= 0
    velocity_3d = np.concatenate([velocity, np.zeros((N, 1))], axis=1)  # [N, 3]
    velocity_global = np.einsum("nij,nj->ni", rotation, velocity_3d)[:, :2]  # [N, 2] (m/s, global)
    moving = np.hypot(velocity[:, 0], velocity[:, 1]) > moving_speed_mps  # [N]

    records = []
    for n in range(N):
        name = names[cls[n]]
        records.append(
            DetectionRecord(
                sample_token=str(sample_tokens[b[n]]),
                translation=tuple(centre[n]),
                size=tuple(boxes[n, 3:6]),
                rotation=tuple(quaternion[n]),
                velocity=tuple(velocity_global[n]),
                detection_name=name,
                detection_score=float(detections.scores[n]),
                attribute_name=_ATTRIBUTES[name][0 if moving[n] else 1],
            )
        )
    return records


def write_submission(
    records: Sequence[DetectionRecord],
    path: Path,
    meta: SubmissionMeta,
    sample_tokens: Sequence[str] | None = None,
    max_boxes_per_sample: int = 500,
) -> Path:
    """Write the devkit's submission JSON ``{"meta": {...}, "results": {sample_token: [records]}}`` atomically.

    Args:
        records: the boxes, any order (each sample's list keeps their order).
        path: the JSON file to write (its folder is created).
        meta: the inputs the method used.
        sample_tokens: every sample the submission must list (samples without a record get an empty list, as the
            devkit needs every sample of the split); None: only the samples of ``records``.
        max_boxes_per_sample: the devkit's limit (``detection_cvpr_2019``: 500).

    Returns:
        ``path``.

    Raises:
        ValueError: a record of a sample not in ``sample_tokens``, or a sample with more than
            ``max_boxes_per_sample`` boxes.
    """
    path = Path(path)
    results: dict[str, list[dict]] = {str(t): [] for t in sample_tokens} if sample_tokens is not None else {}
    for record in records:
        if record.sample_token not in results:
            if sample_tokens is not None:
                raise ValueError(
                    f"{path}: a record names sample {record.sample_token}, which is not among the "
                    f"{len(results)} samples to submit (detections of another split or dataroot?)"
                )
            results[record.sample_token] = []
        results[record.sample_token].append(record.as_json())
    for token, boxes in results.items():
        if len(boxes) > max_boxes_per_sample:
            raise ValueError(
                f"{path}: sample {token} has {len(boxes)} boxes; the devkit allows {max_boxes_per_sample} per sample"
            )
    bevio.atomic_write_json(path, {"meta": meta.as_json(), "results": results}, indent=None)
    return path


def split_sample_tokens(nusc, split: str) -> list[str]:
    """The samples of a predefined devkit split that ``nusc``'s tables hold, as the devkit's ``load_gt`` finds them.

    Args:
        nusc: a loaded ``nuscenes.nuscenes.NuScenes``.
        split: a predefined split (``mini_val``, ``val``, ...).
    """
    from nuscenes.utils.splits import create_splits_scenes

    scenes = set(create_splits_scenes()[split])
    scene_names = {s["token"]: s["name"] for s in nusc.scene}
    return [s["token"] for s in nusc.sample if scene_names[s["scene_token"]] in scenes]


def detection_config(classes: Sequence[str] = EVALUATED_CLASSES):
    """The devkit's ``detection_cvpr_2019`` ``DetectionConfig``, scoring only ``classes``.

    Built from the devkit's own config dict (``config_factory(...).serialize()``); ``class_range`` and every
    threshold stay as published. Only ``class_names`` is reduced: ``DetectionConfig`` asserts that
    ``class_range`` holds all ten classes and ``filter_eval_boxes`` reads it for every ground-truth box, while
    ``DetectionEval.evaluate`` and ``DetectionMetrics`` (mAP, TP errors, NDS) use ``class_names`` alone.

    Raises:
        ValueError: no classes, or a name that is not a devkit detection class.
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.constants import DETECTION_NAMES
    from nuscenes.eval.detection.data_classes import DetectionConfig

    classes = list(classes)
    unknown = [c for c in classes if c not in DETECTION_NAMES]
    if not classes or unknown:
        raise ValueError(f"classes must be a non-empty subset of {DETECTION_NAMES}, got {classes}")
    config = DetectionConfig.deserialize(config_factory(CONFIG_NAME).serialize())
    config.class_names = [c for c in DETECTION_NAMES if c in classes]  # devkit order
    return config


def check_split(version: str, split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is a predefined devkit split that ``version`` holds."""
    if split not in _VERSION_OF_SPLIT:
        raise ValueError(f"split {split!r} is not a devkit detection split; use one of {sorted(_VERSION_OF_SPLIT)}")
    if not version.endswith(_VERSION_OF_SPLIT[split]):
        raise ValueError(
            f"split {split!r} belongs to a v1.0-{_VERSION_OF_SPLIT[split]} dataset, not {version!r}: "
            "choose a split of this version or point --version/--dataroot at the right dataset"
        )


def score_submission(
    dataroot: Path,
    version: str,
    split: str,
    submission_path: Path,
    out_dir: Path,
    classes: Sequence[str] = EVALUATED_CLASSES,
    sample_tokens: Sequence[str] | None = None,
    nusc=None,
    verbose: bool = False,
) -> dict:
    """Score a submission with the devkit's ``DetectionEval`` (no plots) and write ``out_dir/detection_metrics.json``.

    Ground truth, matching, AP, TP errors and NDS are the devkit's, from the ``detection_cvpr_2019`` config
    restricted to ``classes`` as ``detection_config`` explains (so mAP and NDS average over those classes only).

    Args:
        dataroot: the nuScenes folder.
        version: its version, e.g. ``v1.0-mini``.
        split: the predefined split to score (``mini_val``, ``val``, ...); its samples present in the dataroot.
        submission_path: the submission JSON; it must list exactly those samples (``write_submission`` pads).
        out_dir: where ``detection_metrics.json`` goes (created).
        classes: the devkit detection classes to score.
        sample_tokens: score only these samples of the split (ground truth and predictions of the others are
            dropped after the devkit has loaded and filtered them); None: the whole split.
        nusc: an already loaded ``NuScenes`` of ``dataroot`` and ``version``, to save loading it again.
        verbose: let the devkit print its progress.

    Returns:
        A JSON-safe dict (NaN written as None): ``mAP``, ``NDS``, ``mATE``, ``mASE``, ``mAOE``, ``mAVE``,
        ``mAAE`` (the devkit's ``tp_errors``), ``per_class_ap`` {class: AP averaged over the distance
        thresholds}, ``per_class_ap_by_distance`` {class: {threshold m: AP}}, ``per_class_tp_errors``
        {class: {trans_err, scale_err, orient_err, vel_err, attr_err}}, ``tp_scores``, ``classes``,
        ``samples`` (scored), ``predicted_boxes`` and ``ground_truth_boxes`` (after the devkit's filters, of the
        scored classes), ``per_class_predicted_boxes`` and ``per_class_ground_truth_boxes`` (the same per class;
        the devkit gives a class without ground truth AP 0 and TP errors 1, which still count in mAP and NDS),
        ``split``, ``version``, ``config`` (the devkit config with its ``class_names``).

    Raises:
        FileNotFoundError: no tables of ``version`` under ``dataroot``, or no submission file.
        ValueError: a split that is not the version's, a split with no samples or no annotated objects in the
            dataroot, a submission that misses samples of the split or names others, unknown ``sample_tokens``.
    """
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.eval.detection.utils import category_to_detection_name

    submission_path, out_dir = Path(submission_path), Path(out_dir)
    check_split(version, split)
    config = detection_config(classes)
    if not submission_path.is_file():
        raise FileNotFoundError(f"{submission_path} not found: write it with write_submission first")
    if nusc is None:
        nusc = nuscenes_source.open_nuscenes(dataroot, version)
    elif nusc.version != version:
        raise ValueError(f"the NuScenes passed holds {nusc.version!r}, not {version!r}")

    split_tokens = split_sample_tokens(nusc, split)
    if not split_tokens:
        raise ValueError(
            f"{Path(dataroot) / version} holds no sample of split {split!r} (its scenes: "
            f"{sorted(s['name'] for s in nusc.scene)}): choose a split of these scenes"
        )
    annotated = any(
        category_to_detection_name(nusc.get("sample_annotation", a)["category_name"]) is not None
        for token in split_tokens
        for a in nusc.get("sample", token)["anns"]
    )
    if not annotated:
        raise ValueError(f"{Path(dataroot) / version}: split {split!r} has no annotated object of a detection class")

    submission = _read_submission(submission_path)
    _check_samples(submission_path, set(submission["results"]), split_tokens, split, Path(dataroot) / version)
    if sample_tokens is not None:
        unknown = sorted(set(sample_tokens) - set(split_tokens))
        if unknown:
            raise ValueError(f"sample_tokens: {len(unknown)} are not samples of split {split!r}, e.g. {unknown[0]}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="detection-eval-") as scratch:
        result_path = submission_path
        if not any(submission["results"].values()):
            result_path = Path(scratch) / "submission_with_placeholder.json"
            bevio.atomic_write_json(
                result_path, _with_placeholder(submission, nusc, split_tokens[0], config), indent=None
            )
        evaluation = DetectionEval(
            nusc, config, str(result_path), eval_set=split, output_dir=str(Path(scratch) / "devkit"), verbose=verbose
        )
        if sample_tokens is not None:
            keep = list(dict.fromkeys(sample_tokens))
            for attribute in ("gt_boxes", "pred_boxes"):
                boxes, subset = getattr(evaluation, attribute), EvalBoxes()
                for token in keep:
                    subset.add_boxes(token, boxes[token])
                setattr(evaluation, attribute, subset)
            evaluation.sample_tokens = evaluation.gt_boxes.sample_tokens
        metrics, _ = evaluation.evaluate()

    summary = metrics.serialize()
    scored = set(config.class_names)
    result = {
        "mAP": summary["mean_ap"],
        "NDS": summary["nd_score"],
        **{short: summary["tp_errors"][name] for name, short in _TP_NAMES.items()},
        "per_class_ap": dict(summary["mean_dist_aps"]),
        "per_class_ap_by_distance": {c: {str(k): v for k, v in d.items()} for c, d in summary["label_aps"].items()},
        "per_class_tp_errors": {c: dict(d) for c, d in summary["label_tp_errors"].items()},
        "tp_scores": summary["tp_scores"],
        "classes": list(config.class_names),
        "samples": len(evaluation.sample_tokens),
        "predicted_boxes": sum(b.detection_name in scored for b in evaluation.pred_boxes.all),
        "ground_truth_boxes": sum(b.detection_name in scored for b in evaluation.gt_boxes.all),
        "per_class_predicted_boxes": {c: sum(b.detection_name == c for b in evaluation.pred_boxes.all) for c in scored},
        "per_class_ground_truth_boxes": {
            c: sum(b.detection_name == c for b in evaluation.gt_boxes.all) for c in scored
        },
        "split": split,
        "version": version,
        "config": {**config.serialize(), "class_names": list(config.class_names), "name": CONFIG_NAME},
    }
    result = json_safe(result)
    bevio.atomic_write_json(out_dir / METRICS_FILE, result, indent=None)
    return result


@torch.no_grad()
def evaluate_model_detections(
    run: Path,
    data: Path,
    dataroot: Path,
    version: str,
    split: str,
    out_dir: Path,
    batch_size: int = 4,
    score_threshold: float = 0.1,
    top_k: int = 100,
    covered_samples_only: bool = False,
    velocity: str = "tracks",
    progress: bool = False,
) -> dict:
    """Detect with the checkpoint of ``run`` on the windows of ``split``, export them, and score them.

    Writes ``out_dir/detection_submission.json`` (every sample of the split in ``dataroot``; those without a
    window get an empty list) and ``out_dir/detection_metrics.json``.

    The windows go scene by scene in keyframe order, as a forecaster streams them. With ``velocity="tracks"`` each
    detection exports the velocity of the agent tracked from it (``tracking.track_velocity_of``: the track's
    earlier detections and its own LiDAR points, as the forecast uses), where one lies within its class's gate;
    ``"head"`` exports every detection's regressed velocity. Boxes, scores and classes are the head's either way.

    Args:
        run: a training run folder (``Forecaster.from_checkpoint``).
        data: the ``bevjepa preprocess`` output holding the split's windows.
        dataroot: the nuScenes folder the windows were made from (its ground truth is scored against).
        version: its version, e.g. ``v1.0-mini``.
        split: the devkit split.
        out_dir: the output folder.
        batch_size: windows per forward pass.
        score_threshold: the lowest detection score exported.
        top_k: the most detections per sample.
        covered_samples_only: score only the samples that have a window (the devkit's numbers over the whole
            split count the others as missed).
        velocity: ``VELOCITY_SOURCES``: the tracks' velocities, or the head's.
        progress: show a progress bar over the batches.

    Returns:
        ``score_submission``'s dict, plus ``windows`` (windows run), ``submission`` (its path) and
        ``velocity_source``.

    Raises:
        ValueError: windows of samples that the split in ``dataroot`` does not hold (``data`` made from another
            dataroot), an unknown ``velocity``, and everything ``score_submission`` raises.
    """
    if velocity not in VELOCITY_SOURCES:
        raise ValueError(f"velocity must be one of {VELOCITY_SOURCES}, got {velocity!r}")
    out_dir = Path(out_dir)
    check_split(version, split)
    model = forecaster.Forecaster.from_checkpoint(run, cache_frames=16 * batch_size, min_score=tracking.MIN_SCORE)
    net, device = model.net, model.device
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    records: list[DetectionRecord] = []
    seen: set[str] = set()
    pose_of: dict[str, np.ndarray] = {}  # each exported sample's t0 ego pose [4, 4]
    batches = dataset.scene_batches(batch_size)
    total = math.ceil(len(dataset) / batch_size)
    for samples in tqdm(batches, total=total, desc="detection", unit="batch", disable=not progress):
        batch = torch_dataset.collate(samples).to(device)
        with torch.no_grad():
            own = model.encode_frames(batch)
            scene = net.scene(batch, None, own, decode=(0,))
        detections = heads.decode_detections(
            scene.heatmap_logits, scene.regression, grid=net.detection.grid, top_k=top_k, threshold=score_threshold
        )
        if velocity == "tracks":
            detections = _with_track_velocities(detections, model.track(batch, own, scene))
        pairs = zip(batch.scene_names, batch.sample_tokens, strict=True)
        poses = np.stack([dataset.frame(scene, token).global_from_ego for scene, token in pairs])  # [B, 4, 4] t0 poses
        fresh = []  # batch samples whose keyframe has not been exported yet (one sample, one list of boxes)
        for b, token in enumerate(batch.sample_tokens):
            if token not in seen:
                fresh.append(b)
                seen.add(token)
                pose_of[token] = poses[b]
        keep = np.isin(detections.batch_index, fresh)  # [N]
        detections = heads.Detections(
            detections.boxes[keep],
            detections.velocity[keep],
            detections.scores[keep],
            detections.classes[keep],
            detections.batch_index[keep],
        )
        records.extend(detection_records(detections, batch.sample_tokens, poses))

    nusc = nuscenes_source.open_nuscenes(dataroot, version)
    split_tokens = split_sample_tokens(nusc, split)
    foreign = sorted(seen - set(split_tokens))
    if foreign:
        raise ValueError(
            f"{data}: {len(foreign)} windows are of samples that split {split!r} of {Path(dataroot) / version} does "
            f"not hold (e.g. {foreign[0]}): were the windows made from another dataroot?"
        )
    meta = SubmissionMeta(use_camera=net.config.use_camera, use_lidar=net.config.use_lidar)
    submission = write_submission(records, out_dir / SUBMISSION_FILE, meta, sample_tokens=split_tokens)
    result = score_submission(
        dataroot,
        version,
        split,
        submission,
        out_dir,
        sample_tokens=sorted(seen) if covered_samples_only else None,
        nusc=nusc,
    )
    ceiling = grid_ceiling(nusc, dataroot, version, split, pose_of, net.config.grid, out_dir / "grid-ceiling")
    result = {
        **result,
        "windows": len(dataset),
        "submission": str(submission),
        "grid_ceiling_mAP": ceiling["mAP"],
        "grid_ceiling_NDS": ceiling["NDS"],
        "grid_ceiling_ap": ceiling["per_class_ap"],
        "velocity_source": velocity,
    }
    bevio.atomic_write_json(out_dir / METRICS_FILE, result, indent=None)
    return result


def _with_track_velocities(detections: heads.Detections, agents: list[tracking.TrackedAgents]) -> heads.Detections:
    """A batch's detections with each sample's velocities from its tracked agents (``tracking.track_velocity_of``)."""
    velocity = detections.velocity.copy()  # [N, 2]
    for b, window_agents in enumerate(agents):
        rows = np.flatnonzero(detections.batch_index == b)  # ordered by sample, as ``for_sample`` keeps them
        velocity[rows] = tracking.track_velocity_of(detections.for_sample(b), window_agents)
    return dataclasses.replace(detections, velocity=velocity)


def boxes_the_grid_holds(
    scored, class_field: str, pose_of: Mapping[str, np.ndarray], grid: geometry.GridSpec
) -> list[tuple[str, object]]:
    """The devkit's scored boxes that a model on ``grid`` can see, sample by sample.

    Args:
        scored: the devkit's ``EvalBoxes`` of ``DetectionBox`` or ``TrackingBox`` (global frame, m).
        class_field: the boxes' class attribute: ``detection_name`` or ``tracking_name``.
        pose_of: {sample token: [4, 4] its t0 ego pose (global from ego)} of the samples with a window; the
            samples not in it give nothing.
        grid: the model's grid, in the ego frame.

    Returns:
        [(sample token, box)] of the ``EVALUATED_CLASSES`` boxes whose centre lies inside ``grid``.
    """
    held = []
    for token, pose in pose_of.items():
        boxes = [b for b in scored[token] if getattr(b, class_field) in EVALUATED_CLASSES]
        if not boxes:
            continue
        centres = np.array([[*b.translation, 1.0] for b in boxes]) @ np.linalg.inv(pose).T  # [N, 4] in the ego frame
        inside = grid.xy_to_index(centres[:, :2])[2]
        held += [(token, box) for box, keep in zip(boxes, inside, strict=True) if keep]
    return held


def grid_ceiling(
    nusc,
    dataroot: Path,
    version: str,
    split: str,
    pose_of: Mapping[str, np.ndarray],
    grid: geometry.GridSpec,
    out_dir: Path,
) -> dict:
    """The devkit's scores of a perfect detector that sees only what the model can: the grid, the windowed samples.

    The model detects on its BEV grid around the ego and only on keyframes that have a window; the devkit scores
    every annotated box of the split within its class range (cars 50 m, people and bicycles 40 m). This submits the
    boxes the devkit scores themselves (score 1, their own velocity and attribute) on the samples in ``pose_of``
    where their centre lies inside ``grid`` in that sample's ego frame, and nothing elsewhere, and scores them as
    ``score_submission`` does: what no detector on this grid and these windows can exceed.

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
    from nuscenes.eval.detection.data_classes import DetectionBox

    split_tokens = split_sample_tokens(nusc, split)
    scored = filter_eval_boxes(  # the boxes the devkit scores: within range, with points, not in a bike rack
        nusc, add_center_dist(nusc, load_gt(nusc, split, DetectionBox)), detection_config().class_range
    )
    records = [
        DetectionRecord(
            token,
            box.translation,
            box.size,
            box.rotation,
            tuple(np.nan_to_num(box.velocity)),  # the devkit's own; NaN (an object seen once) as zero
            box.detection_name,
            1.0,
            box.attribute_name,
        )
        for token, box in boxes_the_grid_holds(scored, "detection_name", pose_of, grid)
    ]
    submission = write_submission(
        records, Path(out_dir) / SUBMISSION_FILE, SubmissionMeta(use_camera=False, use_lidar=True), split_tokens
    )
    return score_submission(dataroot, version, split, submission, out_dir, nusc=nusc)


def _read_submission(path: Path) -> dict:
    """The submission JSON, checked for the devkit's top-level layout."""
    try:
        submission = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(submission, dict) or not isinstance(submission.get("results"), dict):
        raise ValueError(f'{path}: a detection submission is {{"meta": {{...}}, "results": {{sample_token: [...]}}}}')
    if not isinstance(submission.get("meta"), dict):
        raise ValueError(f'{path}: the submission has no "meta" block (use_camera, use_lidar, ...)')
    return submission


def _check_samples(path: Path, submitted: set[str], split_tokens: list[str], split: str, tables: Path) -> None:
    """Name the samples the devkit's ``DetectionEval`` would reject with a bare assertion."""
    missing = [t for t in split_tokens if t not in submitted]
    extra = sorted(submitted - set(split_tokens))
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} of the {len(split_tokens)} samples of split {split!r} in {tables} (e.g. "
            f"{missing[0]}); the devkit needs every one: write the submission with write_submission(..., "
            "sample_tokens=split_sample_tokens(nusc, split)), which lists samples without detections as empty"
        )
    if extra:
        raise ValueError(
            f"{path} lists {len(extra)} samples that are not in split {split!r} of {tables} (e.g. {extra[0]}): "
            "wrong split, version or dataroot?"
        )


def _with_placeholder(submission: dict, nusc, sample_token: str, config) -> dict:
    """The submission plus one box beyond every class range of the config (see the module docstring)."""
    sample = nusc.get("sample", sample_token)
    pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    x, y, z = pose["translation"]
    name = next(iter(config.class_names))
    placeholder = DetectionRecord(
        sample_token=sample_token,
        translation=(x + _PLACEHOLDER_DISTANCE_M, y, z),
        size=(1.0, 1.0, 1.0),
        rotation=(1.0, 0.0, 0.0, 0.0),
        velocity=(0.0, 0.0),
        detection_name=name,
        detection_score=0.0,
        attribute_name=_ATTRIBUTES.get(name, ("", ""))[1],
    )
    results = {token: list(boxes) for token, boxes in submission["results"].items()}
    results[sample_token] = [*results[sample_token], placeholder.as_json()]
    return {"meta": submission["meta"], "results": results}


def json_safe(value):
    """Plain JSON types, NaN and infinities as None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None
