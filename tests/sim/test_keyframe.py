"""Live keyframes: the simulator's sensors aggregated by the dataset's own code, with the dataset's filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bevjepa.datasets import geometry, nuscenes_source, types, windows
from bevjepa.sim import keyframe, scenario, world


def _recorded_sweeps(nusc, sample_token: str, count: int) -> list[types.LidarSweep]:
    """The keyframe's LIDAR_TOP sweeps as the tables and files hold them, newest first (the devkit's order)."""
    record = nusc.get("sample_data", nusc.get("sample", sample_token)["data"][types.LIDAR_CHANNEL])
    sweeps = []
    for _ in range(count):
        points, _ = nuscenes_source.read_lidar_file(Path(nusc.dataroot), record["filename"], record["token"])
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        sweeps.append(
            types.LidarSweep(
                record["timestamp"],
                points,
                geometry.RigidTransform.from_quaternion(calibration["rotation"], calibration["translation"]),
                geometry.RigidTransform.from_quaternion(pose["rotation"], pose["translation"]),
            )
        )
        if not record["prev"]:
            break
        record = nusc.get("sample_data", record["prev"])
    return sweeps


@pytest.mark.parametrize("min_point_distance_m", [nuscenes_source.SourceConfig.min_point_distance_m, 4.0])
def test_live_aggregation_equals_the_dataset_on_the_same_sweeps(synthetic_mini, min_point_distance_m):
    source = nuscenes_source.NuScenesSource(
        nuscenes_source.SourceConfig(synthetic_mini, min_point_distance_m=min_point_distance_m)
    )
    live_config = keyframe.LiveSensorConfig(min_point_distance_m=min_point_distance_m)
    tokens = source.scene_sample_tokens(source.scenes[0])
    for token in (tokens[0], tokens[4]):
        timestamp, global_from_ego = source.ego_pose(token)
        sweeps = _recorded_sweeps(source.nusc, token, source.config.lidar_sweeps)
        live = keyframe.keyframe_from_sensors("scene", timestamp, global_from_ego, sweeps, [], [], live_config)
        np.testing.assert_array_equal(live.lidar_points, source.aggregate_lidar(token, bad := []))
        assert bad == [] and len(live.lidar_points) > 1000
    # The filter is the config's, not a constant: a wider one drops the nearest ground ring.
    unfiltered = nuscenes_source.aggregate_sweeps(sweeps, global_from_ego, timestamp, 0.0)
    assert (len(live.lidar_points) < len(unfiltered)) == (min_point_distance_m > 3.0)


def test_live_config_takes_the_dataset_filter_and_checks_fields():
    dataset = nuscenes_source.SourceConfig(Path("unused"))
    assert keyframe.LiveSensorConfig().min_point_distance_m == dataset.min_point_distance_m
    assert keyframe.LiveSensorConfig(image_width_px=256).image_hw == (144, 256)
    for bad in ({"image_width_px": 4}, {"lidar_sweeps": 0}, {"min_point_distance_m": -1.0}):
        with pytest.raises(ValueError, match=f"LiveSensorConfig.{next(iter(bad))}"):
            keyframe.LiveSensorConfig(**bad)


@pytest.fixture(scope="module")
def street():
    config = scenario.ScenarioConfig(layout="straight", duration_s=2.0, vehicles=3, parked=1, pedestrians=1, cyclists=0)
    return scenario.build_world(config)


def test_live_keyframe_and_frame_of_a_running_world(street):
    built, state = street
    config = keyframe.LiveSensorConfig(image_width_px=128, lidar_sweeps=2, min_point_distance_m=4.0)
    sensors = keyframe.LiveSensors(built.layout, config, seed=3, scene_name="live-test")
    for _ in range(3):  # three sweeps observed, the last two kept
        sensors.observe(built, state)
        state = world.step(built, state, 0.1)
    sensors.observe(built, state)
    now = sensors.keyframe(built, state)
    timestamp = keyframe.timestamp_us(state)
    assert now.sample_token == f"live-test-{timestamp}" and now.timestamp_us == timestamp
    np.testing.assert_array_equal(now.global_from_ego.matrix, world.ego_pose(built, state).matrix)
    assert now.bad_inputs == ()
    # The points are the dataset's aggregation of the kept sweeps, 0 and 0.1 s behind now.
    assert len(sensors.sweeps) == 2
    expected = nuscenes_source.aggregate_sweeps(list(sensors.sweeps), now.global_from_ego, timestamp, 4.0)
    np.testing.assert_array_equal(now.lidar_points, expected)
    np.testing.assert_allclose(np.unique(now.lidar_points[:, 4]), [0.0, 0.1], atol=1e-6)
    # Nothing survives within the filter in its sensor frame (the latest sweep: its ego frame is now's).
    latest = now.lidar_points[now.lidar_points[:, 4] == 0]
    in_sensor = sensors.sweeps[-1].ego_from_sensor.inverse().apply(latest[:, :3])
    assert len(latest) > 1000 and not np.any((np.abs(in_sensor[:, 0]) < 4.0) & (np.abs(in_sensor[:, 1]) < 4.0))
    # Six cameras at the configured size; the boxes are the agents in range, in the ego frame.
    assert [c.channel for c in now.cameras] == list(types.CAMERA_CHANNELS)
    assert all(c.image.shape == (72, 128, 3) for c in now.cameras)
    boxes, _ = world.agent_boxes(built, state)
    assert 0 < len(now.boxes) <= len(boxes)
    assert all(np.linalg.norm(b.center_m[:2]) <= config.annotation_range_m for b in now.boxes)
    # The frame is what preprocessing stores of such a keyframe.
    frame = sensors.frame(built, state, windows.WindowConfig())
    assert frame.sample_token == now.sample_token and frame.camera_mask.all()
    assert frame.image(0).shape == (72, 128, 3) and len(frame.points) > 0
