"""Detection export in the nuScenes submission format, scored by the devkit's own DetectionEval."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.common.loaders import load_prediction
from nuscenes.eval.detection.constants import DETECTION_NAMES
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from bevjepa.datasets import geometry
from bevjepa.evaluation import detection_eval
from bevjepa.prediction import heads, tracking

META = detection_eval.SubmissionMeta(use_camera=True, use_lidar=True)


@pytest.fixture(scope="module")
def synthetic_nusc(synthetic_mini: Path) -> NuScenes:
    return NuScenes(version="v1.0-mini", dataroot=str(synthetic_mini), verbose=False)


def _ground_truth_records(nusc: NuScenes, split: str) -> list[detection_eval.DetectionRecord]:
    """The split's annotations of the scored classes as score-1 detections (those the devkit keeps: with points)."""
    attributes = {a["token"]: a["name"] for a in nusc.attribute}
    records = []
    for token in detection_eval.split_sample_tokens(nusc, split):
        for annotation_token in nusc.get("sample", token)["anns"]:
            annotation = nusc.get("sample_annotation", annotation_token)
            name = category_to_detection_name(annotation["category_name"])
            if name not in detection_eval.EVALUATED_CLASSES:
                continue
            if annotation["num_lidar_pts"] + annotation["num_radar_pts"] == 0:
                continue
            velocity = np.nan_to_num(nusc.box_velocity(annotation_token)[:2])
            attribute = attributes[annotation["attribute_tokens"][0]] if annotation["attribute_tokens"] else ""
            records.append(
                detection_eval.DetectionRecord(
                    sample_token=token,
                    translation=tuple(annotation["translation"]),
                    size=tuple(annotation["size"]),
                    rotation=tuple(annotation["rotation"]),
                    velocity=tuple(velocity),
                    detection_name=name,
                    detection_score=1.0,
                    attribute_name=attribute,
                )
            )
    return records


def _score(nusc: NuScenes, records, tmp_path: Path, name: str, split: str = "mini_val", **kwargs) -> dict:
    path = detection_eval.write_submission(
        records, tmp_path / name / "submission.json", META, detection_eval.split_sample_tokens(nusc, split)
    )
    return detection_eval.score_submission(
        Path(nusc.dataroot), nusc.version, split, path, tmp_path / name, nusc=nusc, **kwargs
    )


def _check_ground_truth_scores(nusc: NuScenes, tmp_path: Path) -> dict:
    """Ground truth as detections is perfect; shifted by 1 m it loses mATE and AP; thinned out it loses AP."""
    records = _ground_truth_records(nusc, "mini_val")
    default = _score(nusc, records, tmp_path, "default")
    assert default["classes"] == ["car", "pedestrian", "bicycle"]
    # A class whose ground truth the devkit filters away entirely (e.g. all beyond its range) scores AP 0.
    present = [c for c, count in default["per_class_ground_truth_boxes"].items() if count > 0]
    assert present, "the split should hold objects of the scored classes"
    assert default["per_class_ap"] == {c: pytest.approx(1.0 if c in present else 0.0) for c in default["classes"]}
    assert default["mAP"] == pytest.approx(len(present) / 3)
    perfect = _score(nusc, records, tmp_path, "perfect", classes=present)
    assert perfect["mAP"] == pytest.approx(1.0, abs=1e-9)
    for error in ("mATE", "mASE", "mAOE", "mAVE"):
        assert perfect[error] == pytest.approx(0.0, abs=1e-6), error
    assert perfect["mAAE"] in (None, pytest.approx(0.0, abs=1e-9))
    assert perfect["NDS"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["samples"] == len(detection_eval.split_sample_tokens(nusc, "mini_val"))
    assert perfect["predicted_boxes"] == perfect["ground_truth_boxes"] > 0
    assert json.loads((tmp_path / "perfect" / detection_eval.METRICS_FILE).read_text()) == perfect

    shifted = [dataclasses.replace(r, translation=(r.translation[0] + 1.0, *r.translation[1:])) for r in records]
    moved = _score(nusc, shifted, tmp_path, "shifted", classes=present)
    assert moved["mATE"] == pytest.approx(1.0, abs=1e-6)
    # At 0.5 m a shifted box can only match a neighbour (pedestrians walk in groups): AP is (almost) gone.
    assert all(moved["per_class_ap_by_distance"][c]["0.5"] < 0.1 for c in present)
    assert moved["mAP"] < 0.6 and moved["NDS"] < perfect["NDS"] - 0.2

    thinned = _score(nusc, records[::2], tmp_path, "thinned", classes=present)
    assert 0.0 < thinned["mAP"] < 0.8
    assert thinned["mATE"] == pytest.approx(0.0, abs=1e-6)
    return perfect


def test_ground_truth_of_synthetic_mini_val_scores_perfectly_and_degrades(synthetic_nusc, tmp_path):
    perfect = _check_ground_truth_scores(synthetic_nusc, tmp_path)
    assert perfect["samples"] == 8


def test_ground_truth_of_real_scene_0916_scores_perfectly_and_degrades(real_scene_nusc, tmp_path):
    # The dataroot holds scene-0916 alone: the devkit's mini_val ground truth is its 41 keyframes, the other
    # mini_val scene (scene-0103) is absent from the tables and so from the evaluation.
    assert len(detection_eval.split_sample_tokens(real_scene_nusc, "mini_val")) == 41
    perfect = _check_ground_truth_scores(real_scene_nusc, tmp_path)
    assert perfect["classes"] == ["car", "pedestrian", "bicycle"]
    assert perfect["samples"] == 41
    assert perfect["ground_truth_boxes"] > 1000


def test_all_classes_and_a_subset_of_samples(synthetic_nusc, tmp_path):
    records = _ground_truth_records(synthetic_nusc, "mini_val")
    every = _score(synthetic_nusc, records, tmp_path, "all", classes=DETECTION_NAMES)
    # The records hold the evaluated classes only; every other class (without ground truth, or a truck nobody
    # predicted) gets AP 0 from the devkit, so mAP is the share of evaluated classes present.
    counts = every["per_class_ground_truth_boxes"]
    present = [c for c in detection_eval.EVALUATED_CLASSES if counts[c] > 0]
    assert every["mAP"] == pytest.approx(len(present) / 10, abs=1e-9)
    first = detection_eval.split_sample_tokens(synthetic_nusc, "mini_val")[:3]
    subset = _score(synthetic_nusc, records, tmp_path, "subset", classes=present, sample_tokens=first)
    assert subset["samples"] == 3 and subset["mAP"] == pytest.approx(1.0)
    assert subset["ground_truth_boxes"] == subset["predicted_boxes"] < every["ground_truth_boxes"]


def test_an_empty_submission_scores_zero(synthetic_nusc, tmp_path):
    empty = _score(synthetic_nusc, [], tmp_path, "empty")
    assert empty["mAP"] == 0.0 and empty["NDS"] == 0.0 and empty["predicted_boxes"] == 0
    assert empty["mATE"] == 1.0
    saved = json.loads((tmp_path / "empty" / "submission.json").read_text())
    assert not any(saved["results"].values()), "the placeholder must not reach the user's submission"


def test_bad_inputs_are_named(synthetic_nusc, synthetic_mini, tmp_path):
    tokens = detection_eval.split_sample_tokens(synthetic_nusc, "mini_val")
    short = detection_eval.write_submission([], tmp_path / "short.json", META, tokens[1:])
    with pytest.raises(ValueError, match=f"lacks 1 of the 8 samples.*{tokens[0]}"):
        detection_eval.score_submission(synthetic_mini, "v1.0-mini", "mini_val", short, tmp_path, nusc=synthetic_nusc)
    train_tokens = detection_eval.split_sample_tokens(synthetic_nusc, "mini_train")
    wrong = detection_eval.write_submission([], tmp_path / "wrong.json", META, tokens + train_tokens[:1])
    with pytest.raises(ValueError, match=f"not in split 'mini_val'.*{train_tokens[0]}"):
        detection_eval.score_submission(synthetic_mini, "v1.0-mini", "mini_val", wrong, tmp_path, nusc=synthetic_nusc)
    full = detection_eval.write_submission([], tmp_path / "full.json", META, tokens)
    with pytest.raises(ValueError, match="belongs to a v1.0-trainval dataset"):
        detection_eval.score_submission(synthetic_mini, "v1.0-mini", "val", full, tmp_path)
    with pytest.raises(ValueError, match="not a devkit detection split"):
        detection_eval.score_submission(synthetic_mini, "v1.0-mini", "mini_test", full, tmp_path)
    with pytest.raises(FileNotFoundError, match="v1.0-trainval tables"):
        detection_eval.score_submission(synthetic_mini, "v1.0-trainval", "val", full, tmp_path)
    with pytest.raises(FileNotFoundError, match="write_submission"):
        detection_eval.score_submission(synthetic_mini, "v1.0-mini", "mini_val", tmp_path / "none.json", tmp_path)
    with pytest.raises(ValueError, match="non-empty subset"):
        detection_eval.score_submission(
            synthetic_mini, "v1.0-mini", "mini_val", full, tmp_path, classes=["vehicle"], nusc=synthetic_nusc
        )
    record = _ground_truth_records(synthetic_nusc, "mini_val")[0]
    with pytest.raises(ValueError, match="not among the 7 samples"):
        detection_eval.write_submission(
            [record], tmp_path / "x.json", META, [t for t in tokens if t != record.sample_token]
        )
    with pytest.raises(ValueError, match="allows 1 per sample"):
        detection_eval.write_submission([record, record], tmp_path / "x.json", META, tokens, max_boxes_per_sample=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["full.json", "short.json", "wrong.json"]


def _random_detections(rng: np.random.Generator, n: int, samples: int) -> heads.Detections:
    boxes = np.concatenate(
        [
            rng.uniform(-30, 30, (n, 2)),
            rng.uniform(-1, 2, (n, 1)),
            rng.uniform(0.4, 6.0, (n, 3)),
            rng.uniform(-np.pi, np.pi, (n, 1)),
        ],
        axis=1,
    ).astype(np.float32)
    velocity = rng.normal(0, 3, (n, 2)).astype(np.float32)
    velocity[: n // 4] *= 0.01  # some standing still
    return heads.Detections(
        boxes=boxes,
        velocity=velocity,
        scores=rng.uniform(0, 1, n).astype(np.float32),
        classes=rng.integers(0, 3, n),
        batch_index=rng.integers(0, samples, n),
    )


def _check_round_trip(poses: np.ndarray, tokens: list[str]) -> None:
    """Random ego-frame detections → records equal the devkit's Box moved by the pose, and come back."""
    rng = np.random.default_rng(0)
    detections = _random_detections(rng, 40, len(tokens))
    records = detection_eval.detection_records(detections, tokens, poses)
    assert len(records) == 40
    for n, record in enumerate(records):
        x, y, z, w, length, h, yaw = detections.boxes[n].astype(np.float64)
        vx, vy = detections.velocity[n].astype(np.float64)
        pose = poses[detections.batch_index[n]]
        pose_q = Quaternion(matrix=pose[:3, :3])
        box = Box([x, y, z], [w, length, h], Quaternion(axis=[0, 0, 1], angle=yaw), velocity=(vx, vy, 0.0))
        box.rotate(pose_q)
        box.translate(pose[:3, 3])
        assert record.sample_token == tokens[detections.batch_index[n]]
        np.testing.assert_allclose(record.translation, box.center, atol=1e-4)
        np.testing.assert_allclose(record.size, box.wlh, rtol=1e-6)
        sign = 1.0 if np.dot(record.rotation, box.orientation.elements) > 0 else -1.0
        np.testing.assert_allclose(record.rotation, sign * box.orientation.elements, atol=1e-9)
        np.testing.assert_allclose(record.velocity, box.velocity[:2], atol=1e-5)
        name = detection_eval.DETECTION_NAME_OF_CLASS[("vehicle", "pedestrian", "cyclist")[detections.classes[n]]]
        assert record.detection_name == name
        moving = np.hypot(vx, vy) > detection_eval.MOVING_SPEED_MPS
        expected = {
            "car": ("vehicle.moving", "vehicle.parked"),
            "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
            "bicycle": ("cycle.with_rider", "cycle.without_rider"),
        }[name][0 if moving else 1]
        assert record.attribute_name == expected
        assert record.detection_score == pytest.approx(float(detections.scores[n]))

        # And back: the record as a devkit Box, moved into the ego frame, is the detection again.
        back = Box(record.translation, record.size, Quaternion(record.rotation), velocity=(*record.velocity, 0.0))
        back.translate(-pose[:3, 3])
        back.rotate(pose_q.inverse)
        np.testing.assert_allclose(back.center, [x, y, z], atol=1e-4)
        assert geometry.wrap_angle(geometry.quaternion_yaw(back.orientation.elements) - yaw) == pytest.approx(
            0.0, abs=1e-6
        )


def test_records_round_trip_through_the_devkit_box():
    poses = np.stack([np.eye(4)] * 2)
    # Tilted poses (roll and pitch as well as yaw) far from the origin.
    poses[0, :3, :3] = Quaternion(axis=[0.05, -0.08, 1.0], angle=2.3).rotation_matrix
    poses[0, :3, 3] = [612.5, 1643.0, 1.2]
    poses[1, :3, :3] = Quaternion(axis=[-0.02, 0.03, -1.0], angle=0.7).rotation_matrix
    poses[1, :3, 3] = [-1530.0, 88.25, -0.4]
    _check_round_trip(poses, ["first", "second"])


def test_records_round_trip_with_a_real_ego_pose(real_scene_nusc):
    sample = real_scene_nusc.sample[0]
    lidar = real_scene_nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    pose = real_scene_nusc.get("ego_pose", lidar["ego_pose_token"])
    real = geometry.RigidTransform.from_quaternion(pose["rotation"], pose["translation"]).matrix
    _check_round_trip(real[None], [sample["token"]])


def test_records_refuse_inconsistent_inputs():
    rng = np.random.default_rng(1)
    detections = _random_detections(rng, 5, 2)
    with pytest.raises(ValueError, match=r"expected finite \[3, 4, 4\]"):
        detection_eval.detection_records(detections, ["a", "b", "c"], np.stack([np.eye(4)] * 2))
    with pytest.raises(ValueError, match="batch_index spans"):
        detection_eval.detection_records(detections, ["a"], np.eye(4)[None])
    with pytest.raises(ValueError, match="no devkit detection name"):
        detection_eval.detection_records(detections, ["a", "b"], np.stack([np.eye(4)] * 2), class_names=["truck"])
    assert (
        detection_eval.detection_records(
            dataclasses.replace(detections, **{k: v[:0] for k, v in dataclasses.asdict(detections).items()}),
            ["a", "b"],
            np.stack([np.eye(4)] * 2),
        )
        == []
    )


def test_the_grid_ceiling_is_the_devkit_score_of_the_boxes_a_grid_can_hold(
    real_scene_nusc, real_scene_val_poses, tmp_path
):
    dataroot = Path(real_scene_nusc.dataroot)
    pose_of = real_scene_val_poses

    def ceiling(grid: geometry.GridSpec, name: str, poses=pose_of) -> dict:
        return detection_eval.grid_ceiling(
            real_scene_nusc, dataroot, "v1.0-mini", "mini_val", poses, grid, tmp_path / name
        )

    # A grid beyond every class range holds every scored box: the ceiling is the devkit's perfect score.
    wide = ceiling(geometry.GridSpec(-60.0, 60.0, -60.0, 60.0, 0.5), "wide")
    present = [c for c, n in wide["per_class_ground_truth_boxes"].items() if n > 0]
    assert present and all(wide["per_class_ap"][c] == pytest.approx(1.0) for c in present)
    # The small preset's ±32 m grid misses the cars between 32 and 50 m: the ceiling falls, and no further than that.
    small = ceiling(geometry.GridSpec(), "small")
    assert 0.1 < small["per_class_ap"]["car"] < 0.95
    assert small["predicted_boxes"] < wide["predicted_boxes"]
    # Samples without a window have no detections: fewer windows, a lower ceiling.
    half = ceiling(geometry.GridSpec(), "half", dict(list(pose_of.items())[::2]))
    assert half["per_class_ap"]["car"] < small["per_class_ap"]["car"]


@pytest.fixture
def tiny_run(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def test_a_tiny_checkpoint_is_exported_and_scored(
    tiny_run, synthetic_windows, synthetic_mini, synthetic_nusc, tmp_path
):
    out = tmp_path / "eval"
    result = detection_eval.evaluate_model_detections(
        tiny_run, synthetic_windows, synthetic_mini, "v1.0-mini", "mini_val", out, batch_size=2
    )
    split_tokens = detection_eval.split_sample_tokens(synthetic_nusc, "mini_val")
    assert result["samples"] == len(split_tokens) == 8 and result["windows"] == 2
    scores = [result["mAP"], result["NDS"], *result["per_class_ap"].values()]
    assert all(value is not None and 0.0 <= value <= 1.0 for value in scores), scores
    assert all(result[e] is not None and np.isfinite(result[e]) and result[e] >= 0 for e in ("mATE", "mASE", "mAOE"))
    boxes, meta = load_prediction(str(out / detection_eval.SUBMISSION_FILE), 500, DetectionBox)
    assert set(boxes.sample_tokens) == set(split_tokens)
    assert meta == {"use_camera": True, "use_lidar": True, "use_radar": False, "use_map": False, "use_external": False}
    assert json.loads((out / detection_eval.METRICS_FILE).read_text()) == result
    # No detector on the model's grid and windows beats the annotated boxes it could hold.
    assert set(result["grid_ceiling_ap"]) == set(result["per_class_ap"])
    assert all(result["grid_ceiling_ap"][c] >= ap for c, ap in result["per_class_ap"].items())
    assert 0.0 < result["grid_ceiling_mAP"] <= 1.0 and result["grid_ceiling_NDS"] >= result["NDS"]

    assert result["velocity_source"] == "tracks"

    # Every peak exported (threshold 0): boxes on the two windowed samples only, scored on those alone.
    every = detection_eval.evaluate_model_detections(
        tiny_run,
        synthetic_windows,
        synthetic_mini,
        "v1.0-mini",
        "mini_val",
        tmp_path / "every",
        score_threshold=0.0,
        covered_samples_only=True,
    )
    boxes, _ = load_prediction(str(tmp_path / "every" / detection_eval.SUBMISSION_FILE), 500, DetectionBox)
    with_boxes = [t for t in boxes.sample_tokens if boxes[t]]
    assert len(with_boxes) == 2 and all(0 < len(boxes[t]) <= 100 for t in with_boxes)  # top_k: at most 100 peaks
    assert every["samples"] == 2 and every["predicted_boxes"] > 0
    assert 0.0 <= every["mAP"] <= 1.0 and 0.0 <= every["NDS"] <= 1.0
    # The head's velocities instead of the tracks': the same boxes and scores (this model tracks no agent, its
    # peaks all below the tracks' score floor, so the velocities are the same too).
    detection_eval.evaluate_model_detections(
        tiny_run,
        synthetic_windows,
        synthetic_mini,
        "v1.0-mini",
        "mini_val",
        tmp_path / "head",
        score_threshold=0.0,
        covered_samples_only=True,
        velocity="head",
    )
    head, _ = load_prediction(str(tmp_path / "head" / detection_eval.SUBMISSION_FILE), 500, DetectionBox)
    assert all(b.detection_score < tracking.MIN_SCORE for t in with_boxes for b in boxes[t])
    for token in with_boxes:
        assert [b.serialize() for b in head[token]] == [b.serialize() for b in boxes[token]]
    with pytest.raises(ValueError, match="velocity must be one of"):
        detection_eval.evaluate_model_detections(
            tiny_run, synthetic_windows, synthetic_mini, "v1.0-mini", "mini_val", tmp_path / "bad", velocity="lidar"
        )


def test_windows_of_another_dataroot_are_refused(tiny_run, synthetic_windows, real_scene_nusc, tmp_path):
    with pytest.raises(ValueError, match="were the windows made from another dataroot"):
        detection_eval.evaluate_model_detections(
            tiny_run, synthetic_windows, Path(real_scene_nusc.dataroot), "v1.0-mini", "mini_val", tmp_path
        )
