"""Open-loop evaluation with a tiny trained checkpoint on the synthetic windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nuscenes.eval.prediction import compute_metrics
from nuscenes.eval.prediction import metrics as devkit
from nuscenes.eval.prediction.config import PredictionConfig
from nuscenes.nuscenes import NuScenes
from nuscenes.prediction import PredictHelper

from bevjepa.datasets import categories, geometry, torch_dataset
from bevjepa.evaluation import baselines, metrics, open_loop, prediction_export
from bevjepa.evaluation.report import eval_report
from bevjepa.prediction import agent_occupancy, checkpoint, forecaster

SOURCES = set(eval_report.MODEL_ORDER)
"""Every source the report knows: ``evaluate`` with a run and a direct run scores each of them."""


@pytest.fixture(scope="module")
def run(light_checkpoint: Path) -> Path:
    return light_checkpoint  # any trained world model: the light LiDAR-only one evaluates fastest


@pytest.fixture(scope="module")
def result(synthetic_windows: Path, run: Path, tiny_direct_checkpoint: Path) -> dict:
    return open_loop.evaluate(
        synthetic_windows, "all", run, batch_size=2, trajectory_seconds=2.0, direct_run=tiny_direct_checkpoint
    )


def test_every_source_reports_every_metric(result):
    assert set(result["models"]) == SOURCES
    assert result["split"] == "all" and result["windows"] == 4 and result["trajectory_steps"] == 4
    assert result["agents"] == sum(result["agents_per_class"].values()) > 0
    json.loads(json.dumps(result))  # plain JSON values
    classes = list(categories.CLASSES)
    for name, scores in result["models"].items():
        for key in ("iou", "vpq", "brier"):
            assert list(scores[key]) == classes and all(len(v) == 5 for v in scores[key].values()), (name, key)
        assert list(scores["vpq_all_steps"]) == list(scores["ece"]) == classes
        for key in ("iou_2s_mean", "vpq_2s_mean", "brier_mean", "ece_all"):
            assert isinstance(scores[key], float), (name, key)
        assert 0 <= scores["brier_mean"] <= 1 and 0 <= scores["ece_all"] <= 1
        if name in open_loop.OCCUPANCY_SOURCES:
            assert "minADE_5" not in scores  # occupancy only: no agent identity
            continue
        for k in (1, 5, 10):
            assert {f"minADE_{k}", f"minFDE_{k}", f"MissRate_2_{k}"} <= set(scores)
        agents = result["agents"]
        if name in open_loop.MATCHED_SOURCES:  # scored on the annotated agents that a track stands for
            agents = scores["agents_matched"]
            assert 0 <= agents <= result["agents"]
            assert 0 <= scores["detection_recall"] <= 1
            assert math.isnan(scores["detection_precision"]) or 0 <= scores["detection_precision"] <= 1
            if agents == 0:
                assert math.isnan(scores["minADE_5"])
                continue
        assert scores["minADE_10"] <= scores["minADE_5"] <= scores["minADE_1"]
        per_class = scores["per_class"]
        assert sum(v["agents"] for v in per_class.values()) == agents
        weighted = sum(v["agents"] * v["minADE_5"] for v in per_class.values() if v["agents"])
        assert weighted / agents == pytest.approx(scores["minADE_5"])


def test_box_baselines_are_exact_at_t0(result):
    for name in set(open_loop.TRAJECTORY_SOURCES) - set(open_loop.MATCHED_SOURCES):
        scores = result["models"][name]
        assert scores["iou"]["vehicle"][0] == 1.0 and scores["vpq"]["vehicle"][0] == 1.0, name
        assert scores["brier"]["vehicle"][0] == 0.0
        for cls in ("pedestrian", "cyclist"):  # NaN where these windows hold none of the class
            assert math.isnan(scores["iou"][cls][0]) or scores["iou"][cls][0] == 1.0, (name, cls)
    assert result["models"]["persistence"]["vpq"]["vehicle"][-1] < 1.0


def test_model_scores_equal_a_direct_computation(synthetic_windows, run, result):
    """Every model row's occupancy scores, recomputed: the forecast of each window stripped of its annotations, its
    latent map, its tracks at constant velocity, and the forecast of the annotated agents."""
    _, net = checkpoint.load_model(run)
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    sensors, annotated = forecaster.Forecaster(net), forecaster.Forecaster(net, agents="annotated")
    counts = {name: [] for name in open_loop.RUN_SOURCES}
    short = []
    vpq = metrics.empty_vpq_counts(5, 3)
    model_vpq = metrics.empty_vpq_counts(5, 3)
    for index in range(len(dataset)):
        sample = dataset[index]
        target = sample.occupancy.numpy()
        truth_labels = metrics.class_labels(target, sample.instances.numpy())
        blind = sample.sensors_only()
        forecast = sensors.forecast(blind)
        counts["model"].append(metrics.iou_counts(forecast.occupancy >= 0.5, target))
        counts["model_latent"].append(metrics.iou_counts(forecast.latent_occupancy >= 0.5, target))
        near = np.s_[..., 34:94, 34:94]  # the ±32 m grid's cells within 15 m of the ego along x and y
        short.append(metrics.iou_counts(forecast.latent_occupancy[near] >= 0.5, target[near]))
        vpq = vpq + metrics.vpq_counts(metrics.connected_instances(forecast.latent_occupancy >= 0.5), truth_labels)
        tracks = sensors.track(torch_dataset.collate([blind]))[0]
        occupancy, _ = baselines.constant_velocity_tracked(tracks, net.config.grid, 3, 4)
        counts["constant_velocity_tracked"].append(metrics.iou_counts(occupancy, target))
        box, cls = sample.agent_box.numpy().astype(np.float64), sample.agent_class.numpy()
        match = metrics.match_agents(tracks.boxes[:, :2], tracks.classes, box[:, :2], cls)
        true_velocity = baselines.agent_velocities(
            sample.agent_velocity.numpy(), sample.agent_past.numpy().astype(np.float64), sample.agent_past_mask.numpy()
        )
        moved = tracks.velocity.copy()
        for agent, track in enumerate(match):  # agents of one window
            if track >= 0:
                moved[track] = true_velocity[agent]
        occupancy, _ = baselines.constant_velocity_occupancy_instances(
            tracks.boxes, tracks.classes, moved, net.config.grid, 3, 4
        )
        counts["tracked_true_velocity"].append(metrics.iou_counts(occupancy, target))
        given = annotated.forecast(sample)
        _, ids = agent_occupancy.mode_occupancy_instances(
            sample.agent_box.numpy(), sample.agent_class.numpy(), given.trajectories, given.mode_probabilities,
            net.config.grid, 3, 4,
        )  # fmt: skip
        counts["model_annotated"].append(metrics.iou_counts(given.occupancy >= 0.5, target))
        labels = metrics.class_labels(given.occupancy >= 0.5, ids, np.r_[-1, sample.agent_class.numpy()])
        model_vpq = model_vpq + metrics.vpq_counts(labels, truth_labels)
    for name, pairs in counts.items():
        per_step = metrics.iou(sum(p[0] for p in pairs), sum(p[1] for p in pairs))
        np.testing.assert_allclose(
            np.array(result["models"][name]["iou"]["vehicle"]), per_step[:, 0], rtol=1e-12, err_msg=name
        )
    per_step = metrics.iou(sum(p[0] for p in short), sum(p[1] for p in short))
    for c, name in enumerate(categories.CLASSES):
        np.testing.assert_allclose(result["models"]["model_latent"]["iou_short"][name], per_step[:, c], rtol=1e-12)
    np.testing.assert_allclose(result["models"]["model_latent"]["vpq"]["vehicle"], vpq.vpq()[0][:, 0], rtol=1e-12)
    np.testing.assert_allclose(
        result["models"]["model_annotated"]["vpq"]["vehicle"], model_vpq.vpq()[0][:, 0], rtol=1e-12
    )


def test_the_devkit_scores_the_exported_model_as_the_open_loop_does(
    synthetic_mini, synthetic_windows, run, result, tmp_path
):
    out = tmp_path / "predictions.json"  # not into the shared run folder
    records = prediction_export.export(synthetic_windows, "all", out, "model", run, trajectory_seconds=2.0)
    assert len(records) == result["agents"] and records[0].number_of_modes == 10
    np.testing.assert_allclose([r.probabilities.sum() for r in records], 1.0, rtol=1e-5)
    helper = PredictHelper(NuScenes("v1.0-mini", dataroot=str(synthetic_mini), verbose=False))
    config = PredictionConfig(
        [devkit.MinADEK([1, 5, 10], [devkit.RowMean()]), devkit.MinFDEK([1, 5, 10], [devkit.RowMean()])], seconds=2
    )
    scored = compute_metrics.compute_metrics(json.loads(out.read_text()), helper, config)
    for i, k in enumerate((1, 5, 10)):
        annotated = result["models"]["model_annotated"]
        assert annotated[f"minADE_{k}"] == pytest.approx(scored["MinADEK"]["RowMean"][i], abs=1e-4)
        assert annotated[f"minFDE_{k}"] == pytest.approx(scored["MinFDEK"]["RowMean"][i], abs=1e-4)


def test_without_a_run_only_the_baselines_and_bad_horizons_are_refused(synthetic_windows):
    baseline_only = open_loop.evaluate(synthetic_windows, "mini_val")
    assert set(baseline_only["models"]) == set(open_loop.TRAJECTORY_SOURCES) - set(open_loop.RUN_SOURCES)
    assert baseline_only["agents"] == 0 and math.isnan(baseline_only["models"]["ctrv"]["minADE_5"])
    with pytest.raises(ValueError, match="hold 12 steps"):
        open_loop.evaluate(synthetic_windows, "all", trajectory_seconds=7.0)


def test_the_direct_row_is_the_direct_models_occupancy_on_the_same_windows(
    synthetic_windows, tiny_direct_checkpoint, result
):
    _, net = checkpoint.load_model(tiny_direct_checkpoint)
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    pairs = []
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = torch_dataset.collate([dataset[index]])
            probability = torch.sigmoid(net(batch).occupancy_logits)[0].numpy()  # [S, C, H, W]
            pairs.append(metrics.iou_counts(probability >= 0.5, batch.occupancy[0].numpy()))
    per_step = metrics.iou(sum(p[0] for p in pairs), sum(p[1] for p in pairs))  # [S, C]
    direct = result["models"]["direct"]
    for c, name in enumerate(categories.CLASSES):
        np.testing.assert_allclose(np.array(direct["iou"][name], dtype=float), per_step[:, c], rtol=1e-12)
    assert result["windows"] == len(dataset) and result["windows_failed"] == 0


def test_a_direct_run_is_scored_without_a_model_and_a_world_model_run_is_refused(
    synthetic_windows, run, tiny_direct_checkpoint
):
    alone = open_loop.evaluate(synthetic_windows, "mini_val", direct_run=tiny_direct_checkpoint)
    assert set(alone["models"]) == set(open_loop.TRAJECTORY_SOURCES) - set(open_loop.RUN_SOURCES) | {"direct"}
    assert all(len(v) == 5 for v in alone["models"]["direct"]["iou"].values())
    with pytest.raises(ValueError, match="has a world model .* `bevjepa train --config direct`"):
        open_loop.evaluate(synthetic_windows, "mini_val", direct_run=run)


def test_detection_recall_counts_only_the_agents_inside_the_grid(result, synthetic_windows: Path, run: Path):
    """Recall is over the annotated agents a track can reach: those whose t0 centre lies inside the model's grid."""
    grid = checkpoint.load_model(run, "cpu")[1].config.grid
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    boxes = [dataset[i].agent_box.numpy() for i in range(len(dataset))]
    total = sum(len(b) for b in boxes)
    inside = sum(int(grid.xy_to_index(b[:, :2])[2].sum()) for b in boxes)
    assert 0 < inside < total  # the world puts agents beyond the grid, so the two counts differ
    for name in open_loop.MATCHED_SOURCES:
        scores = result["models"][name]
        assert scores["detection_annotated"] == inside
        assert scores["detection_recall"] == pytest.approx(scores["detection_matched"] / inside)
        found = scores["detection_found"]
        if found == 0:  # a light model may find nobody: no precision then
            assert math.isnan(scores["detection_precision"])
        else:
            assert scores["detection_precision"] == pytest.approx(scores["detection_matched"] / found)


def test_the_tracks_velocity_and_heading_errors_are_means_over_the_matched_pairs(result):
    scores = result["models"]["model"]
    for key, bound in (("track_velocity_error_mps", 50.0), ("track_heading_error_deg", 180.0)):
        assert list(scores[key]) == list(categories.CLASSES)
        assert all(math.isnan(v) or 0.0 <= v <= bound for v in scores[key].values()), (key, scores[key])
    # Two windows' pairs: per class the mean, an unknown annotated velocity left out, a class without pairs NaN.
    accumulated = open_loop._Scores(steps=5, classes=3, bins=10, matched=True)
    accumulated.add_track_errors(np.array([0, 1]), np.array([1.0, np.nan]), np.array([0.0, np.pi]))
    accumulated.add_track_errors(np.array([0]), np.array([3.0]), np.array([np.pi / 2]))
    accumulated.add_track_errors(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))  # a window without a pair
    summary = accumulated.summary(np.zeros((0, 4, 2)), np.zeros(0, dtype=np.int64))
    velocity, heading = summary["track_velocity_error_mps"], summary["track_heading_error_deg"]
    assert velocity["vehicle"] == pytest.approx(2.0) and math.isnan(velocity["pedestrian"])
    assert heading["vehicle"] == pytest.approx(45.0) and heading["pedestrian"] == pytest.approx(180.0)
    assert math.isnan(velocity["cyclist"]) and math.isnan(heading["cyclist"])


@pytest.mark.parametrize(
    "grid, expected",
    [
        (geometry.GridSpec(), (slice(34, 94), slice(34, 94))),  # ±32 m at 0.5 m
        (geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 0.5), (slice(70, 130), slice(70, 130))),
        (geometry.GridSpec(-10.0, 40.0, -10.0, 10.0, 1.0), (slice(0, 25), slice(0, 20))),  # clipped to the grid
        (geometry.GridSpec(20.0, 40.0, -32.0, 32.0, 0.5), (slice(0, 0), slice(34, 94))),  # wholly beyond: empty
    ],
)
def test_the_short_range_is_the_cells_within_15_m_of_the_ego(grid, expected):
    assert open_loop.short_range(grid) == expected
