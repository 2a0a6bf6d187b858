"""Tracks in the nuScenes tracking submission format, scored by the devkit's own TrackingEval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes

from bevjepa.datasets import geometry
from bevjepa.evaluation import detection_eval, tracking_eval
from bevjepa.prediction import tracking

META = detection_eval.SubmissionMeta(use_camera=False, use_lidar=True)


def _ground_truth_tracks(nusc: NuScenes, split: str, swap_every: int = 0) -> list[dict]:
    """The split's annotations of the tracked classes as score-1 tracks, their instance tokens as ids.

    ``swap_every`` > 0 swaps the ids of the first two boxes of a class in every that many-th sample (ID switches).
    """
    records = []
    for index, token in enumerate(detection_eval.split_sample_tokens(nusc, split)):
        sample_records = []
        for annotation_token in nusc.get("sample", token)["anns"]:
            annotation = nusc.get("sample_annotation", annotation_token)
            name = category_to_detection_name(annotation["category_name"])
            if name not in tracking_eval.EVALUATED_CLASSES or annotation["num_lidar_pts"] == 0:
                continue
            sample_records.append(
                {
                    "sample_token": token,
                    "translation": annotation["translation"],
                    "size": annotation["size"],
                    "rotation": annotation["rotation"],
                    "velocity": list(np.nan_to_num(nusc.box_velocity(annotation_token)[:2])),
                    "tracking_id": annotation["instance_token"],
                    "tracking_name": name,
                    "tracking_score": 1.0,
                }
            )
        cars = [r for r in sample_records if r["tracking_name"] == "car"]
        if swap_every and index % swap_every == 0 and len(cars) >= 2:
            cars[0]["tracking_id"], cars[1]["tracking_id"] = cars[1]["tracking_id"], cars[0]["tracking_id"]
        records += sample_records
    return records


def _score(nusc: NuScenes, records: list[dict], tmp_path: Path, name: str) -> dict:
    tokens = detection_eval.split_sample_tokens(nusc, "mini_val")
    path = tracking_eval.write_submission(records, tmp_path / name / "submission.json", META, tokens)
    return tracking_eval.score_submission(Path(nusc.dataroot), nusc.version, "mini_val", path, tmp_path / name)


def test_ground_truth_of_real_scene_0916_tracks_perfectly_and_id_switches_count(real_scene_nusc, tmp_path):
    perfect = _score(real_scene_nusc, _ground_truth_tracks(real_scene_nusc, "mini_val"), tmp_path, "perfect")
    assert perfect["classes"] == ["bicycle", "car", "pedestrian"]
    for cls in ("car", "pedestrian"):  # not exactly 1: the devkit's recall thresholds step in 1/40
        assert perfect["per_class"][cls]["amota"] > 0.95 and perfect["per_class"][cls]["recall"] > 0.99, cls
        assert perfect["per_class"][cls]["ids"] == 0 and perfect["per_class"][cls]["gt"] > 50
    assert json.loads((tmp_path / "perfect" / tracking_eval.METRICS_FILE).read_text()) == perfect
    swapped = _score(real_scene_nusc, _ground_truth_tracks(real_scene_nusc, "mini_val", 5), tmp_path, "swapped")
    assert swapped["per_class"]["car"]["ids"] > 0
    assert swapped["per_class"]["car"]["amota"] < perfect["per_class"]["car"]["amota"]
    assert swapped["per_class"]["pedestrian"] == perfect["per_class"]["pedestrian"]


def test_the_tracking_ceiling_is_the_devkit_score_of_the_tracks_a_grid_can_hold(
    real_scene_nusc, real_scene_val_poses, tmp_path
):
    def ceiling(grid: geometry.GridSpec, name: str) -> dict:
        dataroot, poses = Path(real_scene_nusc.dataroot), real_scene_val_poses
        return tracking_eval.grid_ceiling(
            real_scene_nusc, dataroot, "v1.0-mini", "mini_val", poses, grid, tmp_path / name
        )

    # A grid beyond every class range holds every scored track: the ceiling is the devkit's perfect score.
    wide = ceiling(geometry.GridSpec(-60.0, 60.0, -60.0, 60.0, 0.5), "wide")
    for cls in ("car", "pedestrian"):
        assert wide["per_class"][cls]["amota"] > 0.95 and wide["per_class"][cls]["ids"] == 0, cls
    # The small preset's ±32 m grid misses the cars between 32 and 50 m: their recall, and so AMOTA, falls.
    small = ceiling(geometry.GridSpec(), "small")
    assert 0.05 < small["per_class"]["car"]["amota"] < wide["per_class"]["car"]["amota"] - 0.05
    assert small["per_class"]["car"]["recall"] < wide["per_class"]["car"]["recall"]
    assert small["per_class"]["car"]["ids"] == 0


def test_tracks_go_to_the_global_frame_with_their_ids():
    agents = tracking.TrackedAgents(
        ids=np.array(["7", "9"]),
        classes=np.array([0, 1]),
        boxes=np.array([[10.0, 0.0, 0.8, 1.9, 4.5, 1.6, 0.0], [0.0, 5.0, 0.9, 0.7, 0.7, 1.8, 0.0]]),
        velocity=np.array([[3.0, 0.0], [0.0, 0.0]]),
        scores=np.array([0.9, 0.4]),
        past=np.zeros((2, 3, 2)),
        past_mask=np.ones((2, 3), dtype=bool),
        detected_velocity=np.array([[3.0, 0.0], [0.0, 0.0]]),
    )
    pose = np.eye(4)
    pose[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]  # the ego faces global +y
    pose[:3, 3] = [100.0, 200.0, 0.0]
    records = tracking_eval.tracking_records(agents, "s", pose)
    assert [r["tracking_id"] for r in records] == ["7", "9"]
    assert [r["tracking_name"] for r in records] == ["car", "pedestrian"]
    np.testing.assert_allclose(records[0]["translation"], [100.0, 210.0, 0.8])
    np.testing.assert_allclose(records[0]["velocity"], [0.0, 3.0], atol=1e-9)
    assert records[1]["tracking_score"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="not a sample of the split"):
        tracking_eval.write_submission(records, Path("/nonexistent/x.json"), META, ["other"])


def test_a_checkpoint_is_tracked_exported_and_scored(tiny_checkpoint, synthetic_windows, synthetic_mini, tmp_path):
    result = tracking_eval.evaluate_model_tracking(
        tiny_checkpoint, synthetic_windows, synthetic_mini, "v1.0-mini", "mini_val", tmp_path / "tracking"
    )
    submission = json.loads((tmp_path / "tracking" / tracking_eval.SUBMISSION_FILE).read_text())
    assert len(submission["results"]) == 8  # every mini_val sample, those without a window empty
    assert 0.0 <= result["amota"] <= 1.0 and result["windows"] == 2
    assert set(result["per_class"]) == {"bicycle", "car", "pedestrian"}
    # No tracker of the model's detections beats the annotated tracks its grid and windows could hold.
    assert set(result["grid_ceiling_per_class_amota"]) == set(result["per_class"])
    for cls, scores in result["per_class"].items():
        if scores["amota"] is not None:
            assert result["grid_ceiling_per_class_amota"][cls] >= scores["amota"], cls
