"""The report's pictures: rasterization, orientation, the choice of windows, PNG panels and the animated GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevjepa.datasets import geometry, torch_dataset
from bevjepa.evaluation.report import eval_report, plots


@pytest.fixture(scope="module")
def samples(synthetic_windows: Path) -> list[torch_dataset.WindowSample]:
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    return [dataset[i] for i in range(len(dataset))]


def _forecast(sample: torch_dataset.WindowSample):
    return eval_report.constant_velocity_forecast(sample, geometry.GridSpec(), steps=sample.occupancy.shape[0] - 1)


def test_lidar_density_counts_every_point_inside_once():
    grid = geometry.GridSpec(-4.0, 4.0, -2.0, 2.0, 0.5)
    rng = np.random.default_rng(0)
    points = rng.uniform(-6, 6, size=(500, 5)).astype(np.float32)
    density = plots.lidar_density(points, grid)
    rows, cols, inside = grid.xy_to_index(points[:, :2])
    assert density.shape == grid.shape and density.sum() == inside.sum()
    expected = np.zeros(grid.shape)
    np.add.at(expected, (rows[inside], cols[inside]), 1)
    np.testing.assert_array_equal(density, expected)


def test_images_put_forward_up_and_left_left():
    grid = geometry.GridSpec()
    bev = np.zeros(grid.shape, dtype=bool)
    rows, cols, _ = grid.xy_to_index(np.array([[20.2, 10.2]]))  # ahead and to the left
    bev[rows[0], cols[0]] = True
    image = grid.to_image(bev)
    r, c = np.argwhere(image)[0]
    left, right, bottom, top = plots._extent(grid)
    # Where imshow puts pixel (r, c) with that extent: columns from left to right, rows from top to bottom.
    horizontal = left + (c + 0.5) * (right - left) / image.shape[1]
    vertical = top - (r + 0.5) * (top - bottom) / image.shape[0]
    assert horizontal == pytest.approx(10.25) and vertical == pytest.approx(20.25)
    assert left > right  # +y to the left


def test_moving_agents_use_the_past_where_the_velocity_is_unknown():
    velocity = np.array([[3.0, 0.0], [np.nan, np.nan], [np.nan, np.nan], [0.1, 0.0]])
    past = np.zeros((4, 3, 2))
    past[1, :, 0] = [0.0, 1.0, 2.0]  # 2 m/s from its last displacement
    mask = np.ones((4, 3), dtype=bool)
    assert plots.moving_agent_count(velocity, past, mask) == 2


def test_windows_are_chosen_by_motion_then_agents_then_order_one_per_scene_first():
    moving = [1, 3, 3, 0, 3]
    agents = [5, 2, 4, 9, 4]
    scenes = ["a", "a", "a", "b", "c"]
    assert plots.choose_windows(moving, agents, scenes, 5) == [2, 4, 3, 1, 0]
    assert plots.choose_windows(moving, agents, scenes, 2) == [2, 4]
    with pytest.raises(ValueError, match="one entry per window"):
        plots.choose_windows([1], [1, 2], ["a"], 1)


def test_panels_are_written_as_pngs(samples, tmp_path):
    sample = samples[0]
    forecast = _forecast(sample)
    paths = [
        plots.plot_lidar(sample, tmp_path / "lidar.png", forecast.grid),
        plots.plot_occupancy(sample, forecast, tmp_path / "occupancy.png", "constant velocity"),
        plots.plot_trajectories(sample, forecast, tmp_path / "trajectories.png", "constant velocity"),
        plots.plot_iou_per_horizon(
            {"models": {"persistence": {"iou": {"vehicle": [1.0, 0.5, None], "pedestrian": [1.0, 0.2, 0.1]}}}},
            tmp_path / "iou.png",
        ),
    ]
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 200
    with Image.open(paths[1]) as image:
        assert image.width > 2 * image.height  # one panel per horizon in a row
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary file


def test_scene_animation_plays_every_window_over_its_horizon(samples, tmp_path):
    forecasts = [_forecast(s) for s in samples[:2]]
    path = plots.scene_animation(samples[:2], forecasts, tmp_path / "scene.gif", "constant velocity", fps=4)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 2 * samples[0].occupancy.shape[0]
        assert gif.info["duration"] == 250
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"))
    assert not np.array_equal(first, last)
    assert path.stat().st_size < 3e6
    with pytest.raises(ValueError, match="one forecast per window"):
        plots.scene_animation(samples[:2], forecasts[:1], tmp_path / "bad.gif")
