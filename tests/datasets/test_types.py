"""Tests of ``bevjepa.datasets.types``: validation at construction, and Box3D against the nuScenes devkit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nuscenes.eval.common.utils import quaternion_yaw as devkit_quaternion_yaw
from nuscenes.utils.data_classes import Box, LidarPointCloud
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion
from shapely.geometry import Polygon

from bevjepa.datasets import geometry, types


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(916)


def random_box(rng: np.random.Generator) -> types.Box3D:
    return types.Box3D(
        center_m=rng.uniform(-50, 50, 3),
        size_wlh_m=rng.uniform(0.3, 12.0, 3),
        yaw_rad=rng.uniform(-np.pi, np.pi),
        velocity_mps=rng.uniform(-15, 15, 2),
        category="vehicle.car",
        instance_id="abc",
    )


def devkit_box(box: types.Box3D) -> Box:
    return Box(
        box.center_m.tolist(),
        box.size_wlh_m.tolist(),
        Quaternion(axis=[0, 0, 1], angle=box.yaw_rad),
        velocity=(*box.velocity_mps, 0.0),
    )


def random_transform(rng: np.random.Generator) -> geometry.RigidTransform:
    q = rng.normal(size=4)
    return geometry.RigidTransform.from_quaternion(q / np.linalg.norm(q), rng.uniform(-100, 100, 3))


# ---------------------------------------------------------------------------------------------------------
# Box3D against the devkit's Box


def test_box_corners_match_devkit(rng: np.random.Generator) -> None:
    for _ in range(100):
        box = random_box(rng)
        corners = box.corners()
        assert corners.shape == (8, 3)
        np.testing.assert_allclose(corners, devkit_box(box).corners().T, atol=1e-9)


def test_box_corner_order_front_first() -> None:
    box = types.Box3D(np.zeros(3), np.array([2.0, 4.0, 1.0]), 0.0)  # facing +x, 4 m long, 2 m wide
    corners = box.corners()
    np.testing.assert_allclose(corners[:4, 0], 2.0)  # the four at the front
    np.testing.assert_allclose(corners[4:, 0], -2.0)
    np.testing.assert_allclose(corners[0], [2.0, 1.0, 0.5])


def test_box_quaternion_matches_devkit_orientation(rng: np.random.Generator) -> None:
    for _ in range(20):
        box = random_box(rng)
        np.testing.assert_allclose(box.quaternion, Quaternion(axis=[0, 0, 1], angle=box.yaw_rad).elements, atol=1e-12)


def test_box_contains_matches_devkit_points_in_box(rng: np.random.Generator) -> None:
    for _ in range(30):
        box = random_box(rng)
        reach = 0.7 * np.linalg.norm(box.size_wlh_m)
        points = box.center_m + rng.uniform(-reach, reach, size=(2000, 3))  # [N, 3], some inside
        inside = box.contains(points)
        assert inside.shape == (2000,) and inside.dtype == bool
        expected = points_in_box(devkit_box(box), points.T)
        assert 0 < expected.sum() < len(points)
        np.testing.assert_array_equal(inside, expected)


def test_box_contains_includes_faces_and_excludes_just_outside() -> None:
    box = types.Box3D(np.array([1.0, 2.0, 0.0]), np.array([2.0, 4.0, 2.0]), 0.0)
    points = np.array([[3.0, 2.0, 0.0], [1.0, 3.0, 1.0], [3.001, 2.0, 0.0], [1.0, 3.001, 0.0], [1.0, 2.0, -1.001]])
    np.testing.assert_array_equal(box.contains(points), [True, True, False, False, False])
    # Extra columns (intensity, ring) are ignored.
    np.testing.assert_array_equal(box.contains(np.c_[points, np.ones((5, 2))]), box.contains(points))
    with pytest.raises(ValueError, match="points"):
        box.contains(np.zeros(3))


def test_box_transformed_matches_devkit_rotate_translate_for_yaw_transforms(rng: np.random.Generator) -> None:
    for _ in range(30):
        box = random_box(rng)
        dst_from_src = geometry.RigidTransform.from_pose_2d(
            *rng.uniform(-100, 100, 2), rng.uniform(-4, 4), z_m=rng.uniform(-3, 3)
        )
        moved = box.transformed(dst_from_src)
        expected = devkit_box(box)
        expected.rotate(Quaternion(matrix=dst_from_src.rotation))
        expected.translate(dst_from_src.translation)
        np.testing.assert_allclose(moved.center_m, expected.center, atol=1e-9)
        np.testing.assert_allclose(moved.corners(), expected.corners().T, atol=1e-9)
        np.testing.assert_allclose(moved.velocity_mps, expected.velocity[:2], atol=1e-9)
        assert moved.yaw_rad == pytest.approx(devkit_quaternion_yaw(expected.orientation), abs=1e-9)
        np.testing.assert_array_equal(moved.size_wlh_m, box.size_wlh_m)
        assert (moved.category, moved.instance_id) == (box.category, box.instance_id)


def test_box_transformed_keeps_centre_and_devkit_yaw_under_any_rotation(rng: np.random.Generator) -> None:
    # A full 3D rotation (an ego pose with pitch and roll): the box keeps only the yaw, as the devkit's
    # quaternion_yaw reads it; the centre and the horizontal velocity are exact.
    for _ in range(30):
        box = random_box(rng)
        dst_from_src = random_transform(rng)
        moved = box.transformed(dst_from_src)
        expected = devkit_box(box)
        expected.rotate(Quaternion(matrix=dst_from_src.rotation))
        expected.translate(dst_from_src.translation)
        np.testing.assert_allclose(moved.center_m, expected.center, atol=1e-9)
        assert moved.yaw_rad == pytest.approx(devkit_quaternion_yaw(expected.orientation), abs=1e-9)
        np.testing.assert_allclose(moved.velocity_mps, expected.velocity[:2], atol=1e-9)


def test_box_transformed_there_and_back(rng: np.random.Generator) -> None:
    box = random_box(rng)
    dst_from_src = geometry.RigidTransform.from_pose_2d(12.0, -7.0, 2.5, z_m=0.4)
    back = box.transformed(dst_from_src).transformed(dst_from_src.inverse())
    np.testing.assert_allclose(back.center_m, box.center_m, atol=1e-9)
    np.testing.assert_allclose(back.velocity_mps, box.velocity_mps, atol=1e-9)
    assert geometry.wrap_angle(back.yaw_rad - box.yaw_rad) == pytest.approx(0.0, abs=1e-9)
    # Unknown velocity stays unknown.
    no_velocity = types.Box3D(np.zeros(3), np.ones(3), 0.0)
    assert np.isnan(no_velocity.transformed(dst_from_src).velocity_mps).all()


def test_box_footprint_area_is_width_times_length(rng: np.random.Generator) -> None:
    # A property over many random boxes: the footprint is a counter-clockwise rectangle of area w * l.
    for _ in range(200):
        box = random_box(rng)
        footprint = box.footprint()
        assert footprint.shape == (4, 2)
        polygon = Polygon(footprint)
        assert polygon.is_valid
        assert polygon.exterior.is_ccw
        assert polygon.area == pytest.approx(box.size_wlh_m[0] * box.size_wlh_m[1], rel=1e-9)
        assert polygon.centroid.x == pytest.approx(box.center_m[0]) and polygon.centroid.y == pytest.approx(
            box.center_m[1]
        )
        # The same four corners as the devkit's bottom_corners, starting at the front left.
        np.testing.assert_allclose(footprint, np.roll(devkit_box(box).bottom_corners()[:2].T, -1, axis=0), atol=1e-9)


def test_box_footprint_starts_front_left() -> None:
    box = types.Box3D(np.zeros(3), np.array([2.0, 4.0, 1.0]), np.pi / 2)  # facing +y
    np.testing.assert_allclose(box.footprint()[0], [-1.0, 2.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Validation and immutability


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"center_m": np.zeros(2)}, "Box3D.center_m"),
        ({"center_m": np.zeros((1, 3))}, "Box3D.center_m"),
        ({"size_wlh_m": np.ones(4)}, "Box3D.size_wlh_m"),
        ({"size_wlh_m": np.array([1.0, 0.0, 1.0])}, "Box3D.size_wlh_m"),
        ({"size_wlh_m": np.array([1.0, -2.0, 1.0])}, "Box3D.size_wlh_m"),
        ({"size_wlh_m": np.array([1.0, np.nan, 1.0])}, "Box3D.size_wlh_m"),
        ({"velocity_mps": np.zeros(3)}, "Box3D.velocity_mps"),
    ],
)
def test_box_rejects_bad_fields(kwargs: dict, field: str) -> None:
    fields = {"center_m": np.zeros(3), "size_wlh_m": np.ones(3), "yaw_rad": 0.0, **kwargs}
    with pytest.raises(ValueError, match=field):
        types.Box3D(**fields)


def test_box_defaults_and_dtypes() -> None:
    box = types.Box3D([1, 2, 3], [1, 2, 3], np.float32(0.5))
    assert box.center_m.dtype == np.float64 and box.size_wlh_m.dtype == np.float64
    assert isinstance(box.yaw_rad, float)
    assert np.isnan(box.velocity_mps).all() and box.velocity_mps.shape == (2,)
    assert box.category == "" and box.instance_id == ""


def test_box_is_immutable_and_does_not_alias_its_inputs() -> None:
    center = np.zeros(3)
    box = types.Box3D(center, np.ones(3), 0.0)
    center[0] = 5.0  # the caller's array stays writeable and the box does not change
    assert box.center_m[0] == 0.0
    with pytest.raises(ValueError):
        box.center_m[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        box.yaw_rad = 1.0  # type: ignore[misc]
    # A read-only view of a writeable array is copied too: its owner could still change it.
    base = np.zeros(3)
    view = base[:]
    view.setflags(write=False)
    box = types.Box3D(view, np.ones(3), 0.0)
    base[0] = 7.0
    assert box.center_m[0] == 0.0
    # An array that is already frozen and owns its memory is shared, not copied.
    again = types.Box3D(box.center_m, box.size_wlh_m, box.yaw_rad)
    assert again.center_m is box.center_m


def test_lidar_sweep_validates_and_stores_float32(rng: np.random.Generator) -> None:
    identity = geometry.RigidTransform.identity()
    points = rng.normal(size=(100, 5))
    sweep = types.LidarSweep(1_000_000, points, identity, identity)
    assert sweep.points.dtype == np.float32 and sweep.points.shape == (100, 5)
    assert not sweep.points.flags.writeable
    np.testing.assert_allclose(sweep.points, points, rtol=1e-6)
    points[0, 0] = 1e6
    assert sweep.points[0, 0] != 1e6
    assert types.LidarSweep(0, np.zeros((0, 5)), identity, identity).points.shape == (0, 5)
    for bad in (np.zeros((100, 4)), np.zeros(5), np.zeros((2, 5, 1))):
        with pytest.raises(ValueError, match="LidarSweep.points"):
            types.LidarSweep(0, bad, identity, identity)


def make_camera(**overrides) -> types.CameraImage:
    identity = geometry.RigidTransform.identity()
    fields = {
        "channel": "CAM_FRONT",
        "timestamp_us": 0,
        "image": np.zeros((9, 16, 3), dtype=np.uint8),
        "intrinsics": np.eye(3),
        "ego_from_camera": identity,
        "global_from_ego": identity,
        **overrides,
    }
    return types.CameraImage(**fields)


def test_camera_image_validates_fields() -> None:
    camera = make_camera()
    assert camera.image.dtype == np.uint8 and not camera.image.flags.writeable
    assert camera.intrinsics.dtype == np.float64
    with pytest.raises(ValueError, match="CameraImage.channel"):
        make_camera(channel="LIDAR_TOP")
    with pytest.raises(ValueError, match="CameraImage.image"):
        make_camera(image=np.zeros((9, 16, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="CameraImage.image"):
        make_camera(image=np.zeros((9, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="CameraImage.intrinsics"):
        make_camera(intrinsics=np.eye(4))


def test_camera_image_refuses_lossy_casts_to_uint8(rng: np.random.Generator) -> None:
    # Whole numbers in 0-255 of another dtype are fine ...
    values = rng.integers(0, 256, size=(9, 16, 3))
    np.testing.assert_array_equal(make_camera(image=values).image, values)
    # ... a float image in [0, 1], an out-of-range int or NaN would be mangled in silence.
    for bad in (rng.uniform(0, 1, size=(9, 16, 3)), np.full((9, 16, 3), 300), np.full((9, 16, 3), np.nan)):
        with pytest.raises(ValueError, match="CameraImage.image"):
            make_camera(image=bad)


def test_camera_channels_are_the_six_nuscenes_cameras() -> None:
    assert len(types.CAMERA_CHANNELS) == 6 and len(set(types.CAMERA_CHANNELS)) == 6
    assert types.CAMERA_CHANNELS[0] == "CAM_FRONT"
    assert types.LIDAR_CHANNEL == "LIDAR_TOP"


def test_ego_pose_holds_a_transform() -> None:
    pose = types.EgoPose(5, geometry.RigidTransform.from_pose_2d(1.0, 2.0, 0.3))
    assert pose.global_from_ego.yaw_rad == pytest.approx(0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pose.timestamp_us = 6  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------
# Real data: scene-0916


def test_real_channels_exist_in_the_sensor_table(real_scene_nusc) -> None:
    channels = {sensor["channel"] for sensor in real_scene_nusc.sensor if sensor["modality"] == "camera"}
    assert channels == set(types.CAMERA_CHANNELS)
    assert types.LIDAR_CHANNEL in {sensor["channel"] for sensor in real_scene_nusc.sensor}


def test_real_annotations_as_box3d_match_devkit_and_count_lidar_points(real_scene_nusc) -> None:
    nusc = real_scene_nusc
    sample = nusc.get("sample", nusc.scene[0]["first_sample_token"])
    sample_data = nusc.get("sample_data", sample["data"][types.LIDAR_CHANNEL])
    calibration = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sample_data["ego_pose_token"])
    path = nusc.get_sample_data_path(sample_data["token"])
    raw = np.fromfile(path, dtype=np.float32).reshape(-1, 5)  # x, y, z, intensity, ring: the .pcd.bin layout
    # The devkit reads the same file but drops the ring column.
    np.testing.assert_array_equal(raw[:, :4], LidarPointCloud.from_file(path).points.T)
    assert set(np.unique(raw[:, 4])) <= set(range(32))
    sweep = types.LidarSweep(
        timestamp_us=sample_data["timestamp"],
        points=raw,
        ego_from_sensor=geometry.RigidTransform.from_quaternion(calibration["rotation"], calibration["translation"]),
        global_from_ego=geometry.RigidTransform.from_quaternion(pose["rotation"], pose["translation"]),
    )
    points_global = (sweep.global_from_ego @ sweep.ego_from_sensor).apply(sweep.points[:, :3])  # [N, 3]

    assert len(sample["anns"]) > 10
    for token in sample["anns"]:
        annotation = nusc.get("sample_annotation", token)
        reference = nusc.get_box(token)
        box = types.Box3D(
            center_m=annotation["translation"],
            size_wlh_m=annotation["size"],
            yaw_rad=devkit_quaternion_yaw(reference.orientation),
            velocity_mps=nusc.box_velocity(token)[:2],
            category=annotation["category_name"],
            instance_id=annotation["instance_token"],
        )
        np.testing.assert_allclose(box.corners(), reference.corners().T, atol=1e-6)
        # nuScenes counts the keyframe's LiDAR points in each box: so must we.
        assert int(box.contains(points_global).sum()) == annotation["num_lidar_pts"], annotation["token"]


def test_transformed_pose_is_the_composed_transform_bit_for_bit():
    """``Box3D.transformed`` (and ``transformed_pose``) give the bits of ``dst_from_src @ frame_from_box``."""
    rng = np.random.default_rng(3)
    for _ in range(500):
        box = types.Box3D(
            rng.uniform(-500, 500, 3), rng.uniform(0.2, 12, 3), float(rng.uniform(-4, 4)), rng.normal(0, 5, 2)
        )
        dst_from_src = geometry.RigidTransform.from_quaternion(rng.normal(size=4), rng.uniform(-2000, 2000, 3))
        composed = dst_from_src @ box.frame_from_box
        center_m, yaw_rad = box.transformed_pose(dst_from_src)
        assert center_m.tobytes() == composed.translation.tobytes() and yaw_rad == composed.yaw_rad
        moved = box.transformed(dst_from_src)
        assert moved.center_m.tobytes() == composed.translation.tobytes() and moved.yaw_rad == composed.yaw_rad
        expected_velocity = dst_from_src.apply_vectors(np.array([*box.velocity_mps, 0.0]))[:2]
        assert moved.velocity_mps.tobytes() == expected_velocity.tobytes()
