"""Prediction-challenge export: global frame, JSON round trip, and the devkit's own scoring of the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.prediction import compute_metrics
from nuscenes.eval.prediction import metrics as devkit
from nuscenes.eval.prediction.config import PredictionConfig
from nuscenes.nuscenes import NuScenes
from nuscenes.prediction import PredictHelper

from bevjepa.datasets import geometry, torch_dataset, windows
from bevjepa.evaluation import open_loop, prediction_export


@pytest.fixture(scope="module")
def helper(synthetic_mini: Path) -> PredictHelper:
    return PredictHelper(NuScenes("v1.0-mini", dataroot=str(synthetic_mini), verbose=False))


def test_global_xy_inverts_the_ego_frame():
    pose = geometry.RigidTransform.from_quaternion(
        geometry.matrix_to_quaternion(
            geometry.quaternion_to_matrix(np.array([0.96, 0.02, -0.03, 0.27]))  # yaw with a little roll and pitch
        ),
        np.array([400.0, 1200.0, 1.5]),
    )
    rng = np.random.default_rng(0)
    points = rng.uniform(-50, 50, (7, 3))
    ego = pose.inverse().apply(points)
    np.testing.assert_allclose(
        prediction_export.global_xy(ego[:, :2], pose.matrix, ego[:, 2]), points[:, :2], rtol=0, atol=1e-9
    )
    with pytest.raises(ValueError, match="expected shape"):
        prediction_export.global_xy(ego[:, :2], np.eye(3))


def test_records_round_trip_through_the_json_file(tmp_path):
    trajectories = np.arange(2 * 3 * 4 * 2, dtype=float).reshape(2, 3, 4, 2)
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    pose = geometry.RigidTransform.from_pose_2d(10.0, -5.0, np.pi / 2).matrix
    records = prediction_export.to_predictions(["i0", "i1"], "s0", trajectories, probabilities, pose)
    assert [r.instance for r in records] == ["i0", "i1"] and records[1].sample == "s0"
    # (x, y) in the ego frame of a pose at (10, -5) facing +y is (10 - y, -5 + x) in the global frame.
    np.testing.assert_allclose(records[0].prediction[0, 1], [10.0 - 3.0, -5.0 + 2.0], atol=1e-12)
    path = tmp_path / "sub" / "predictions.json"
    prediction_export.write_predictions(records, path)
    assert [p.name for p in path.parent.iterdir()] == ["predictions.json"]  # no temporary file left
    again = prediction_export.read_predictions(path)
    assert [r.serialize() for r in again] == [r.serialize() for r in records]
    path.write_text(json.dumps({"instance": "i0"}))
    with pytest.raises(ValueError, match="predictions.json: a prediction submission is a JSON list"):
        prediction_export.read_predictions(path)
    path.write_text(json.dumps([{"instance": "i0", "sample": "s0"}]))
    with pytest.raises(ValueError, match="record 0 is not a nuScenes prediction"):
        prediction_export.read_predictions(path)
    with pytest.raises(ValueError, match="sample s0: trajectories"):
        prediction_export.to_predictions(["i0"], "s0", trajectories, probabilities, pose)


def test_window_targets_moved_to_the_global_frame_are_the_devkit_futures(synthetic_windows, helper):
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    checked = 0
    for entry in dataset.entries:
        window = windows.load_window(synthetic_windows / entry["file"])
        pose = dataset.frame(entry["scene"], str(window.sample_token)).global_from_ego
        for a, instance in enumerate(window.agent_ids):
            future = helper.get_future_for_agent(str(instance), str(window.sample_token), 2, in_agent_frame=False)
            steps = len(future)
            moved = prediction_export.global_xy(window.agent_future[a, :steps], pose, window.agent_box[a, 2])
            np.testing.assert_allclose(moved, future, rtol=0, atol=1e-4)  # float32 storage of the targets
            checked += 1
    assert checked >= 4


def test_the_devkit_scores_the_exported_baseline_as_the_open_loop_does(synthetic_windows, helper, tmp_path):
    out = tmp_path / "constant_velocity.json"
    written = prediction_export.export(synthetic_windows, "all", out, "constant_velocity", trajectory_seconds=2.0)
    submission = json.loads(out.read_text())
    assert len(submission) == len(written) > 0
    assert {len(r["prediction"][0]) for r in submission} == {4} and all(r["probabilities"] == [1.0] for r in submission)

    config = PredictionConfig(
        [
            devkit.MinADEK([1, 5, 10], [devkit.RowMean()]),
            devkit.MinFDEK([1, 5, 10], [devkit.RowMean()]),
            devkit.MissRateTopK([1, 5, 10], [devkit.RowMean()], tolerance=2.0),
        ],
        seconds=2,
    )
    scored = compute_metrics.compute_metrics(submission, helper, config)
    ours = open_loop.evaluate(synthetic_windows, "all", trajectory_seconds=2.0)
    assert ours["agents"] == len(submission)
    cv = ours["models"]["constant_velocity"]
    for i, k in enumerate((1, 5, 10)):
        assert cv[f"minADE_{k}"] == pytest.approx(scored["MinADEK"]["RowMean"][i], abs=1e-5)
        assert cv[f"minFDE_{k}"] == pytest.approx(scored["MinFDEK"]["RowMean"][i], abs=1e-5)
        assert cv[f"MissRate_2_{k}"] == pytest.approx(scored["MissRateTopK_2.0"]["RowMean"][i], abs=1e-9)

    # The other sources export too; persistence predicts the t0 position at every step.
    still = prediction_export.export(synthetic_windows, "all", tmp_path / "p.json", "persistence", trajectory_seconds=2)
    first = still[0]
    start = helper.get_sample_annotation(first.instance, first.sample)["translation"][:2]
    np.testing.assert_allclose(first.prediction[0], np.tile(start, (4, 1)), atol=1e-4)
    # Over the challenge's 6 s no agent of the 4 s scenes is scored: an empty submission.
    assert prediction_export.export(synthetic_windows, "all", tmp_path / "c.json", "ctrv") == []
    assert json.loads((tmp_path / "c.json").read_text()) == []
    with pytest.raises(ValueError, match="needs a run folder"):
        prediction_export.export(synthetic_windows, "all", tmp_path / "m.json", "model")
