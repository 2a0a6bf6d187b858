"""The forecast's bars per step and class: counted, chosen on training windows, kept in the run, scored by eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bevjepa.datasets import categories, torch_dataset
from bevjepa.evaluation import open_loop
from bevjepa.prediction import checkpoint, forecast_bars, forecaster, occupancy_thresholds, threshold_fit, train

CLASSES = categories.CLASSES
TIMES = (0.0, 0.5, 1.0)


def test_counts_per_step_and_class_give_the_iou_of_every_bar() -> None:
    rng = np.random.default_rng(0)
    probability = rng.uniform(0, 1, (4, 3, 3, 16, 16))  # [B, S, C, H, W]
    target = rng.uniform(0, 1, probability.shape) < probability  # occupied more often where the map says so
    counted = forecast_bars.counts(3, 3)
    counted.add(probability, target)
    curve = counted.iou_curve()  # [S, C, bins]
    for j in (1, 20, 45, 80):
        predicted = probability >= forecast_bars.PROBABILITY_EDGES[j - 1]
        for s in range(3):
            for c in range(3):
                p, t = predicted[:, s, c], target[:, s, c]
                assert curve[s, c, j] == pytest.approx((p & t).sum() / (p | t).sum())


def test_each_step_and_class_takes_its_own_bar_and_a_rare_one_keeps_half() -> None:
    target = np.zeros((3, 3, 40, 40), dtype=bool)  # [S, C, H, W]
    target[:, :, :25, :25] = True  # 625 occupied cells per step and class
    probability = np.where(target, 0.3, 0.1)  # step 0: every occupied cell at 0.3, the free ones at 0.1
    probability[1] = np.where(target[1], 0.8, 0.6)  # step 1: the free ones up to 0.6
    probability[1, :, 30:, 30:] = 0.6
    probability[2] = np.where(target[2], 0.9, 0.0)
    target[2, 2] = False
    target[2, 2, :5, :5] = True  # step 2, cyclists: 25 occupied cells, too few to choose a bar on
    counted = forecast_bars.counts(3, 3)
    counted.add(probability, target)
    bars = forecast_bars.choose(counted, CLASSES, TIMES, "mini_train", 1)

    chosen = bars.array()
    assert np.all((chosen[0] > 0.1) & (chosen[0] <= 0.3))  # below 0.5: the uncertain step reads its people
    assert np.allclose(bars.iou_chosen[0], 1.0) and np.allclose(bars.iou_at_half[0], 0.0)
    assert np.all((chosen[1] > 0.6) & (chosen[1] <= 0.8))
    assert chosen[2, 2] == pytest.approx(0.5)  # too few cells: 0.5
    assert bars.iou_at_half[1][0] == pytest.approx(625 / 1600)  # at 0.5 every cell of step 1 reads occupied
    assert bars.times_s == TIMES and bars.windows == 1 and bars.split == "mini_train"


def test_bars_round_trip_and_bad_files_are_refused(tmp_path: Path) -> None:
    rows = ((0.5, 0.3, 0.4),) * 3
    bars = forecast_bars.ForecastBars(CLASSES, TIMES, rows, rows, rows, "mini_train", 7)
    bars.save(tmp_path)
    assert forecast_bars.ForecastBars.load(tmp_path) == bars
    assert forecast_bars.ForecastBars.load(tmp_path / "nothing-here") is None

    values = json.loads((tmp_path / forecast_bars.FILE).read_text())
    values["bars"] = values["bars"][:2]  # a step missing
    (tmp_path / forecast_bars.FILE).write_text(json.dumps(values))
    with pytest.raises(ValueError, match="run `bevjepa thresholds` again"):
        forecast_bars.ForecastBars.load(tmp_path)
    (tmp_path / forecast_bars.FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid forecast bars"):
        forecast_bars.ForecastBars.load(tmp_path)
    with pytest.raises(ValueError, match="each in \\(0, 1\\)"):
        forecast_bars.ForecastBars(CLASSES, TIMES, ((1.0, 0.3, 0.4),) * 3, rows, rows, "s", 1)


def test_counts_refuse_maps_of_another_shape() -> None:
    counted = forecast_bars.counts(3, 3)
    with pytest.raises(ValueError, match="BinCounts.add"):
        counted.add(np.zeros((5, 3, 8, 8)), np.zeros((5, 3, 8, 8)))  # five steps, not three
    with pytest.raises(ValueError, match="BinCounts.add"):
        counted.add(np.zeros((3, 3, 8, 8)), np.zeros((3, 3, 8, 9)))
    with pytest.raises(ValueError, match="LogitCounts.add"):
        occupancy_thresholds.LogitCounts(3).add(np.zeros((2, 4, 8, 8)), np.zeros((2, 4, 8, 8)))


def test_a_world_model_run_chooses_its_bars_and_eval_scores_at_them(thresholded_run: Path, synthetic_windows: Path):
    run = thresholded_run
    bars = forecast_bars.ForecastBars.load(run)
    assert bars is not None and bars.windows == 2 and bars.split == "mini_train"
    assert bars.classes == CLASSES and bars.times_s == (0.0, 0.5, 1.0, 1.5, 2.0)
    assert forecaster.Forecaster.from_checkpoint(run).bars == bars  # a planner reads them beside the forecast

    # at bars of 0.5 everywhere, the IoU at the bars is the IoU at 0.5; the report names the bars
    half = ((0.5,) * 3,) * 5
    forecast_bars.ForecastBars(CLASSES, bars.times_s, half, half, half, "s", 1).save(run)
    result = open_loop.evaluate(synthetic_windows, "mini_val", run)
    model = result["models"]["model"]
    np.testing.assert_equal(model["iou_at_bars"], model["iou"])
    assert result["settings"]["forecast_bars"] == {"model": {name: [0.5] * 5 for name in CLASSES}}
    assert "iou_at_bars" not in result["models"]["model_latent"]

    # a bar under every probability at t0 (where the dense map joins everywhere): every cell reads occupied, so the
    # vehicles' IoU there is the share of cells the annotations fill; the IoU at 0.5 stays as it was
    low = ((1e-9,) * 3,) + half[1:]
    forecast_bars.ForecastBars(CLASSES, bars.times_s, low, half, half, "s", 1).save(run)
    model_low = open_loop.evaluate(synthetic_windows, "mini_val", run)["models"]["model"]
    np.testing.assert_equal(model_low["iou"], model["iou"])
    dataset = torch_dataset.WindowDataset(synthetic_windows, scenes=train.split_scenes(synthetic_windows, "mini_val"))
    vehicles = np.stack([dataset[i].occupancy[0, 0].numpy() for i in range(len(dataset))])  # [N, H, W]
    assert vehicles.any()
    assert model_low["iou_at_bars"]["vehicle"][0] == pytest.approx(vehicles.mean())
    np.testing.assert_equal(model_low["iou_at_bars"]["vehicle"][1:], model["iou"]["vehicle"][1:])

    # bars of another horizon are refused with the way out; training again deletes them
    three = ((0.5,) * 3,) * 3
    forecast_bars.ForecastBars(CLASSES, TIMES, three, three, three, "s", 1).save(run)
    with pytest.raises(ValueError, match="model run.s forecast_bars.json .* run `bevjepa thresholds` on it again"):
        open_loop.evaluate(synthetic_windows, "mini_val", run)
    _, net = checkpoint.load_model(run)
    checkpoint.save(run, checkpoint.load_config(run), net, None, checkpoint.load_state(run))
    assert not (run / forecast_bars.FILE).exists()


def test_a_direct_baseline_is_read_at_its_own_bars(
    tiny_direct_checkpoint: Path, light_checkpoint: Path, synthetic_windows: Path, tmp_path
):
    direct = tmp_path / "direct"
    shutil.copytree(tiny_direct_checkpoint, direct)
    bars = threshold_fit.fit_forecast_bars(direct, synthetic_windows, windows=2)
    assert forecast_bars.ForecastBars.load(direct) == bars
    assert bars.windows == 2 and bars.times_s == (0.0, 0.5, 1.0, 1.5, 2.0)

    # the direct map counted as the net publishes it: 0.5 everywhere scores it as at 0.5; the report names whose
    half = ((0.5,) * 3,) * 5
    forecast_bars.ForecastBars(CLASSES, bars.times_s, half, half, half, "s", 1).save(direct)
    result = open_loop.evaluate(synthetic_windows, "mini_val", light_checkpoint, direct_run=direct)
    scored = result["models"]["direct"]
    np.testing.assert_equal(scored["iou_at_bars"], scored["iou"])
    assert result["settings"]["forecast_bars"] == {"direct": {name: [0.5] * 5 for name in CLASSES}}
    assert "iou_at_bars" not in result["models"]["model"]  # the world model has none here

    # a bar under every probability at t0: every cell reads occupied, so the IoU there is the annotations' share
    low = ((1e-9,) * 3,) + half[1:]
    forecast_bars.ForecastBars(CLASSES, bars.times_s, low, half, half, "s", 1).save(direct)
    low_scored = open_loop.evaluate(synthetic_windows, "mini_val", None, direct_run=direct)["models"]["direct"]
    dataset = torch_dataset.WindowDataset(synthetic_windows, scenes=train.split_scenes(synthetic_windows, "mini_val"))
    vehicles = np.stack([dataset[i].occupancy[0, 0].numpy() for i in range(len(dataset))])  # [N, H, W]
    assert low_scored["iou_at_bars"]["vehicle"][0] == pytest.approx(vehicles.mean())

    # the direct run's bars of another horizon are refused by name
    three = ((0.5,) * 3,) * 3
    forecast_bars.ForecastBars(CLASSES, TIMES, three, three, three, "s", 1).save(direct)
    with pytest.raises(ValueError, match="the direct run's forecast_bars.json"):
        open_loop.evaluate(synthetic_windows, "mini_val", None, direct_run=direct)
