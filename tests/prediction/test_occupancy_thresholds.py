"""Per-class occupancy thresholds: chosen from counted logits, kept in the run folder, applied to every map."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bevjepa.datasets import categories, torch_dataset
from bevjepa.evaluation import open_loop
from bevjepa.prediction import checkpoint, forecaster, occupancy_thresholds
from bevjepa.tools import cli

CLASSES = categories.CLASSES


def _counts(logits: np.ndarray, target: np.ndarray) -> occupancy_thresholds.LogitCounts:
    counts = occupancy_thresholds.LogitCounts(len(CLASSES))
    counts.add(logits, target)
    return counts


def test_the_threshold_of_largest_iou_is_chosen_per_class() -> None:
    rng = np.random.default_rng(0)
    target = np.zeros((2, 3, 3, 40, 40), dtype=np.uint8)  # [B, S, C, H, W]
    target[..., :10, :10] = 1  # 100 occupied cells per map and class
    logits = np.where(target == 1, 3.0, -3.0) + rng.uniform(-0.5, 0.5, target.shape)
    # vehicles: free cells up to logit 1.4 as well, so the bar must rise above them (and above 0.5)
    logits[:, :, 0, 20:30, 20:30] = 1.4
    # pedestrians: every occupied cell near logit -1, the free ones below: the best bar lies under 0.5
    logits[:, :, 1] = np.where(target[:, :, 1] == 1, -1.0, -4.0)
    logits[:, :, 2] = -5.0  # cyclists: nothing counted as occupied
    target[:, :, 2] = 0
    chosen = _counts(logits, target).thresholds(CLASSES, "mini_train", 2)

    vehicle, pedestrian, cyclist = chosen.probability
    assert 1 / (1 + np.exp(-1.4)) < vehicle < 1 / (1 + np.exp(-2.5))
    assert chosen.iou_chosen[0] == pytest.approx(1.0) and chosen.iou_at_half[0] == pytest.approx(0.5)
    assert pedestrian == pytest.approx(0.5)  # never below 0.5
    assert chosen.iou_at_half[1] == 0.0 and chosen.iou_chosen[1] == 0.0
    assert cyclist == pytest.approx(0.5)
    assert chosen.windows == 2 and chosen.split == "mini_train"


def test_counts_reject_mismatched_shapes() -> None:
    counts = occupancy_thresholds.LogitCounts(len(CLASSES))
    with pytest.raises(ValueError, match="LogitCounts.add"):
        counts.add(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 9)))
    with pytest.raises(ValueError, match="LogitCounts.add"):
        counts.add(np.zeros((2, 4, 8, 8)), np.zeros((2, 4, 8, 8)))


def test_thresholds_round_trip_and_bad_files(tmp_path: Path) -> None:
    chosen = occupancy_thresholds.OccupancyThresholds(
        CLASSES, (0.5, 0.9, 0.6), (0.7, 0.4, 0.3), (0.7, 0.45, 0.31), "s", 4
    )
    assert occupancy_thresholds.OccupancyThresholds.load(tmp_path) is None
    chosen.save(tmp_path)
    assert occupancy_thresholds.OccupancyThresholds.load(tmp_path) == chosen
    np.testing.assert_allclose(chosen.logit_shift(), np.log([1.0, 9.0, 1.5]), atol=1e-6)

    (tmp_path / occupancy_thresholds.FILE).write_text('{"classes": ["vehicle"]}')
    with pytest.raises(ValueError, match="not valid occupancy thresholds"):
        occupancy_thresholds.OccupancyThresholds.load(tmp_path)
    (tmp_path / occupancy_thresholds.FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid occupancy thresholds"):
        occupancy_thresholds.OccupancyThresholds.load(tmp_path)
    with pytest.raises(ValueError, match=r"each in \(0, 1\)"):
        occupancy_thresholds.OccupancyThresholds(CLASSES, (0.5, 1.0, 0.5), (0, 0, 0), (0, 0, 0), "s", 1)


def test_a_run_chooses_its_thresholds_and_every_map_reads_them(thresholded_run: Path, synthetic_windows: Path) -> None:
    run = thresholded_run
    chosen = occupancy_thresholds.OccupancyThresholds.load(run)
    assert chosen is not None and chosen.windows == 2 and chosen.split == "mini_train"
    assert all(p >= 0.5 for p in chosen.probability)

    # the forecast publishes sigmoid(logit - logit(threshold)): 0.5 there is the chosen threshold
    probability = np.array([0.5, 0.97, 0.6], dtype=np.float32)
    occupancy_thresholds.OccupancyThresholds(CLASSES, tuple(probability), (0,) * 3, (0,) * 3, "s", 1).save(run)
    dataset = torch_dataset.WindowDataset(synthetic_windows, cameras=False)
    batch = torch_dataset.collate([dataset[0]])
    _, net = checkpoint.load_model(run)
    with torch.no_grad():
        raw = torch.sigmoid(net.scene(batch).occupancy_logits)[0].numpy()  # [S, C, H, W]
    published = forecaster.Forecaster.from_checkpoint(run).forecast_batch(batch)[0].latent_occupancy
    np.testing.assert_array_equal(published >= 0.5, raw >= probability[:, None, None])
    np.testing.assert_allclose(published[:, 0], raw[:, 0], atol=1e-6)  # 0.5: unchanged

    settings = open_loop.evaluate(synthetic_windows, "mini_val", run)["settings"]  # the report says which
    assert list(settings["occupancy_thresholds"]["model"].values()) == pytest.approx(probability.tolist(), abs=1e-6)

    # training the run again replaces the weights and deletes the thresholds chosen for the old ones
    checkpoint.save(run, checkpoint.load_config(run), net, None, checkpoint.load_state(run))
    assert not (run / occupancy_thresholds.FILE).exists()
    assert float(checkpoint.load_model(run)[1].occupancy_logit_shift.abs().sum()) == 0.0


def test_thresholds_need_windows_of_the_run_grid(
    light_checkpoint: Path, synthetic_windows: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(light_checkpoint, run)
    assert cli.main(["thresholds", "--checkpoint", str(run), "--data", str(synthetic_windows), "--windows", "0"]) == 2
    assert cli.main(["thresholds", "--checkpoint", str(run), "--data", str(tmp_path / "missing")]) == 2
    assert not (run / occupancy_thresholds.FILE).exists()


def test_windows_of_another_horizon_are_refused(light_checkpoint: Path, synthetic_windows: Path) -> None:
    config = checkpoint.load_config(light_checkpoint).model
    dataset = torch_dataset.WindowDataset(synthetic_windows, cameras=False)
    checkpoint.check_windows(light_checkpoint, config, dataset)  # its own windows
    longer = dataclasses.replace(config, occupancy_steps=config.occupancy_steps + 1)
    with pytest.raises(ValueError, match=f"forecasts {config.occupancy_steps + 1} steps on"):
        checkpoint.check_windows(light_checkpoint, longer, dataset)


def test_thresholds_for_other_classes_are_refused(light_checkpoint: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(light_checkpoint, run)
    occupancy_thresholds.OccupancyThresholds(CLASSES[:2], (0.5, 0.9), (0, 0), (0, 0), "s", 1).save(run)
    with pytest.raises(ValueError, match="occupancy thresholds for 2 classes; the model has 3"):
        checkpoint.load_model(run)
    (run / occupancy_thresholds.FILE).write_text("[]")
    with pytest.raises(ValueError, match="not valid occupancy thresholds"):
        checkpoint.load_model(run)
