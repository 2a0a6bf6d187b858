"""The Rerun recording: written from real windows, read back with rerun's own reader, checked against the inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rerun.dataframe as rerun_dataframe  # the test extra holds rerun-sdk: CI reads the recordings back for real

from bevjepa.datasets import geometry, torch_dataset
from bevjepa.evaluation.report import eval_report, rerun_recording
from bevjepa.prediction import train


@pytest.fixture(scope="module")
def scene(synthetic_windows: Path) -> tuple[list[torch_dataset.WindowSample], list]:
    """The mini_val scene's consecutive windows and their constant-velocity forecasts."""
    dataset = torch_dataset.WindowDataset(synthetic_windows, scenes=train.split_scenes(synthetic_windows, "mini_val"))
    samples = [dataset[i] for i in range(len(dataset))]
    grid = geometry.GridSpec(**dataset.config["window"]["grid"])
    forecasts = [eval_report.constant_velocity_forecast(s, grid, s.occupancy.shape[0] - 1) for s in samples]
    return samples, forecasts


def _table(path: Path, contents: str):
    """The recording's rows on the ``time`` timeline, one per window, for the entities under ``contents``."""
    recording = rerun_dataframe.load_recording(path)
    return recording, recording.view(index="time", contents=contents).select().read_all()


def _sizes(table, column: str) -> list[int]:
    return [len(row) if row is not None else 0 for row in table.column(column).to_pylist()]


def test_recording_reads_back_with_every_entity_on_the_timeline(scene, tmp_path):
    samples, forecasts = scene
    assert len(samples) >= 2
    path = rerun_recording.record(samples, forecasts, tmp_path / "out" / "scene.rrd", label="constant velocity")
    assert path == tmp_path / "out" / "scene.rrd" and path.read_bytes()[:4] == b"RRF2"
    assert sorted(p.name for p in path.parent.iterdir()) == ["scene.rrd"]  # no temporary file left

    recording, table = _table(path, "/world/**")
    entities = {column.entity_path for column in recording.schema().component_columns()}
    horizons = [f"{t:.1f}s" for t in forecasts[0].times_s]
    assert horizons[1:] == ["0.5s", "1.0s", "1.5s", "2.0s"]
    expected = {
        "/world/ego",
        "/world/ego/box",
        "/world/ego/lidar",
        "/world/ego/ground_truth/agents",
        "/world/ego/ground_truth/agent_futures",
        "/world/ego/ground_truth/ego_future",
        "/world/ego/forecast/trajectories",
        *(f"/world/ego/CAM_{name}" for name in ("FRONT", "FRONT_RIGHT", "BACK_RIGHT", "BACK", "BACK_LEFT")),
        "/world/ego/CAM_FRONT_LEFT",
        *(f"/world/ego/forecast/occupancy/{h}" for h in horizons),
        *(f"/world/ego/ground_truth/occupancy/{h}" for h in horizons),
    }
    assert expected <= entities

    # One row per window at its t0, on both timelines.
    times = table.column("time").to_numpy().astype("datetime64[us]").astype(np.int64)
    np.testing.assert_array_equal(times, [s.timestamp_us for s in samples])
    np.testing.assert_array_equal(table.column("window").to_numpy(), np.arange(len(samples)))

    # What each row holds is what the windows and forecasts hold.
    t0_points = [int((s.points_frame == s.points_frame.max()).sum()) for s in samples]
    assert _sizes(table, "/world/ego/lidar:Position3D") == t0_points
    assert _sizes(table, "/world/ego/ground_truth/agents:HalfSize3D") == [s.agent_count for s in samples]
    modes = [int(np.prod(f.trajectories.shape[:2])) for f in forecasts]
    assert _sizes(table, "/world/ego/forecast/trajectories:LineStrip3D") == modes
    for s, horizon in enumerate(horizons):
        # Cells at or above the threshold, counted through the forecast's own query at the cell centres.
        expected_cells = [
            int((f.occupancy_at(f.grid.cell_centers().reshape(-1, 2), float(f.times_s[s])) >= 0.1).sum())
            for f in forecasts
        ]
        assert _sizes(table, f"/world/ego/forecast/occupancy/{horizon}:Position3D") == expected_cells
        occupied = [int(sample.occupancy[s].any(dim=0).sum()) for sample in samples]
        assert _sizes(table, f"/world/ego/ground_truth/occupancy/{horizon}:Position3D") == occupied
    assert sum(occupied) > 0 and sum(modes) > 0

    # Annotated futures: the t0 position and then each annotated step.
    strips = table.column("/world/ego/ground_truth/agent_futures:LineStrip3D").to_pylist()
    for sample, row in zip(samples, strips, strict=True):
        lengths = [len(strip) for strip in row]
        assert lengths == (1 + sample.agent_future_mask.sum(dim=1)).tolist()
        first = np.array([strip[0] for strip in row])
        np.testing.assert_allclose(first[:, :2], sample.agent_box[:, :2].numpy(), atol=1e-5)


def test_the_world_frame_follows_the_ego_as_the_devkit_poses_say(scene, synthetic_mini):
    from nuscenes.nuscenes import NuScenes

    samples, _ = scene
    poses, linked = rerun_recording.world_from_ego(samples)
    assert linked[1:].all() and not linked[0]
    nusc = NuScenes(version="v1.0-mini", dataroot=str(synthetic_mini), verbose=False)

    def global_from_ego(token: str) -> np.ndarray:
        lidar = nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"])
        pose = nusc.get("ego_pose", lidar["ego_pose_token"])
        return geometry.RigidTransform.from_quaternion(np.array(pose["rotation"]), np.array(pose["translation"])).matrix

    first = np.linalg.inv(global_from_ego(samples[0].sample_token))
    for sample, pose in zip(samples, poses, strict=True):
        np.testing.assert_allclose(pose, first @ global_from_ego(sample.sample_token), atol=1e-3)
    assert np.linalg.norm(poses[-1][:3, 3]) > 0.1  # the ego moved


def test_a_break_in_the_scene_restarts_the_world_frame(scene):
    samples, _ = scene
    poses, linked = rerun_recording.world_from_ego([samples[1], samples[0]])  # out of order: not linked
    assert not linked.any()
    np.testing.assert_array_equal(poses, np.tile(np.eye(4), (2, 1, 1)))


def test_boxes_are_oriented_and_sized_along_their_heading():
    boxes = np.array([[1.0, 2.0, 0.5, 2.0, 4.5, 1.6, np.pi / 2], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    centers, sizes, quaternions = rerun_recording.box_arrays(boxes)
    np.testing.assert_allclose(centers, boxes[:, :3])
    np.testing.assert_allclose(sizes[0], [4.5, 2.0, 1.6])  # length along the box's own x
    rotation = geometry.quaternion_to_matrix(quaternions[0][[3, 0, 1, 2]])  # x, y, z, w → w, x, y, z
    np.testing.assert_allclose(rotation @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-6)  # heading +y
    np.testing.assert_allclose(quaternions[1], [0, 0, 0, 1])


def test_occupied_cells_are_the_cell_centres_above_the_threshold():
    grid = geometry.GridSpec(-2.0, 2.0, -1.0, 1.0, 0.5)
    probability = np.zeros((3, *grid.shape), dtype=np.float32)
    rows, cols, _ = grid.xy_to_index(np.array([[1.2, -0.7], [-1.9, 0.9]]))
    probability[1, rows[0], cols[0]] = 0.7  # pedestrian
    probability[0, rows[1], cols[1]] = 0.05  # below the threshold
    positions, classes, p = rerun_recording.occupied_cells(probability, grid, 0.1, z_m=0.2)
    np.testing.assert_allclose(positions, [[1.25, -0.75, 0.2]])
    assert classes.tolist() == [1] and p.tolist() == pytest.approx([0.7])


def test_lidar_colours_follow_height():
    colors = rerun_recording.height_colors(np.array([-5.0, -1.0, 4.0, 9.0]))
    assert colors.shape == (4, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors[0], colors[1])  # clipped at the bottom
    np.testing.assert_array_equal(colors[2], colors[3])  # and at the top
    assert not np.array_equal(colors[1], colors[2])


def test_bad_inputs_are_refused_before_anything_is_written(scene, synthetic_windows, tmp_path):
    samples, forecasts = scene
    with pytest.raises(ValueError, match="one forecast per window"):
        rerun_recording.record(samples, forecasts[:1], tmp_path / "a.rrd")
    with pytest.raises(ValueError, match=f"forecast of window {samples[0].sample_token}"):
        rerun_recording.record(samples, forecasts[::-1], tmp_path / "a.rrd")
    with pytest.raises(ValueError, match=r"\.rrd"):
        rerun_recording.record(samples, forecasts, tmp_path / "a.txt")
    with pytest.raises(ValueError, match="threshold"):
        rerun_recording.record(samples, forecasts, tmp_path / "a.rrd", threshold=0.0)
    with pytest.raises(ValueError, match="scene 'scene-nope'"):
        rerun_recording.scene_windows(synthetic_windows, "mini_val", scene="scene-nope")
    assert list(tmp_path.iterdir()) == []


def test_without_rerun_the_error_names_the_extra(scene, tmp_path, monkeypatch):
    samples, forecasts = scene
    monkeypatch.setitem(sys.modules, "rerun", None)  # as if rerun-sdk were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'bevjepa\[rerun\]'"):
        rerun_recording.record(samples, forecasts, tmp_path / "a.rrd")
    with pytest.raises(ValueError, match=r"bevjepa\[rerun\]"):
        rerun_recording.check_output(tmp_path / "a.rrd")
    assert list(tmp_path.iterdir()) == []


def test_record_scene_records_the_consecutive_windows_of_one_scene(synthetic_windows, tmp_path):
    path = rerun_recording.record_scene(synthetic_windows, "mini_val", None, tmp_path / "cv.rrd", cameras=False)
    _, table = _table(path, "/world/**")
    dataset = torch_dataset.WindowDataset(synthetic_windows, scenes=train.split_scenes(synthetic_windows, "mini_val"))
    assert table.num_rows == len(dataset) == 2
    times = table.column("time").to_numpy().astype("datetime64[us]").astype(np.int64)
    np.testing.assert_array_equal(times, [dataset[i].timestamp_us for i in range(len(dataset))])
    assert not any(c.startswith("/world/ego/CAM_") for c in table.column_names)
    assert rerun_recording.scene_windows(synthetic_windows, "all", max_windows=1) in ([0], [1], [2], [3])


def test_eval_and_demo_take_a_rerun_file(synthetic_windows, tmp_path):
    from bevjepa.tools import cli, demo

    out = tmp_path / "eval"
    argv = ["eval", "--data", str(synthetic_windows), "--out", str(out), "--figures", "0", "--animation-windows", "0"]
    assert cli.main([*argv, "--rerun", str(out / "scene.rrd")]) == 0
    assert (out / "metrics.json").is_file() and (out / "scene.rrd").read_bytes()[:4] == b"RRF2"
    assert cli.main([*argv, "--rerun", str(out / "scene.txt")]) == 2  # refused before the evaluation
    assert not (out / "scene.txt").exists()
    assert demo.DemoConfig(out=tmp_path, rerun=tmp_path / "demo.rrd").rerun == tmp_path / "demo.rrd"
    with pytest.raises(ValueError, match=r"\.rrd"):
        demo.DemoConfig(out=tmp_path, rerun=tmp_path / "demo.txt")
    parsed = cli.build_parser().parse_args(["demo", "--rerun", "x.rrd"])
    assert parsed.rerun == "x.rrd"


@pytest.mark.slow
def test_a_trained_checkpoint_records_its_own_forecasts(synthetic_windows, tmp_path):
    import dataclasses

    from bevjepa.prediction import config as experiment_config
    from bevjepa.prediction import forecaster

    preset = experiment_config.small()
    tiny = dataclasses.replace(
        preset, train=dataclasses.replace(preset.train, steps=1, val_every=1, val_batches=1, loader_workers=0)
    )
    train.train(synthetic_windows, tmp_path / "run", tiny, progress=False)
    path = rerun_recording.record_scene(synthetic_windows, "mini_val", tmp_path / "run", tmp_path / "model.rrd")
    _, table = _table(path, "/world/ego/forecast/**")
    dataset = torch_dataset.WindowDataset(synthetic_windows, scenes=train.split_scenes(synthetic_windows, "mini_val"))
    forecasts = forecaster.Forecaster.from_checkpoint(tmp_path / "run").forecast_batch(
        torch_dataset.collate([dataset[i] for i in range(len(dataset))])
    )
    modes = [int(np.prod(f.trajectories.shape[:2])) for f in forecasts]
    assert _sizes(table, "/world/ego/forecast/trajectories:LineStrip3D") == modes and min(modes) > 1
    # The widest strip belongs to the most probable mode of some agent.
    radii = table.column("/world/ego/forecast/trajectories:Radius").to_pylist()[0]
    best = np.argmax(forecasts[0].mode_probabilities.reshape(-1))
    assert int(np.argmax(radii)) == best


def test_a_failed_write_leaves_the_previous_recording_and_no_temporary_file(scene, tmp_path):
    import copy

    samples, forecasts = scene
    path = rerun_recording.record(samples, forecasts, tmp_path / "scene.rrd", cameras=False)
    before = path.read_bytes()
    # A forecast whose maps do not fit the grid (its construction would refuse them: set behind its back).
    damaged = copy.copy(forecasts[0])
    object.__setattr__(damaged, "occupancy", forecasts[0].occupancy[:, :, :3, :3])
    broken = [damaged, *forecasts[1:]]
    with pytest.raises(IndexError):  # the maps do not fit the grid: fails in the middle of the write
        rerun_recording.record(samples, broken, path, cameras=False)
    assert [p.name for p in tmp_path.iterdir()] == ["scene.rrd"] and path.read_bytes() == before
