"""Tests of ``bevjepa.datasets.geometry`` against pyquaternion and the nuScenes devkit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nuscenes.eval.common.utils import quaternion_yaw as devkit_quaternion_yaw
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import transform_matrix
from pyquaternion import Quaternion

from bevjepa.datasets import geometry

# ---------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240916)


def random_quaternions(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 4] unit quaternions, uniform on the sphere (so about half have w < 0)."""
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def random_transform(rng: np.random.Generator) -> geometry.RigidTransform:
    return geometry.RigidTransform.from_quaternion(random_quaternions(rng, 1)[0], rng.uniform(-100, 100, 3))


def assert_same_rotation_quaternion(actual: np.ndarray, expected: np.ndarray) -> None:
    """q and -q are the same rotation."""
    sign = np.where(np.sum(actual * expected, axis=-1, keepdims=True) < 0, -1.0, 1.0)
    np.testing.assert_allclose(actual, sign * expected, atol=1e-12)


# Rotations that exercise every branch of Shepperd's method, and the 180-degree turns where w = 0.
SPECIAL_QUATERNIONS = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
    [0.0, np.sqrt(0.5), np.sqrt(0.5), 0.0],
    [np.cos(np.radians(85)), np.sin(np.radians(85)), 0.0, 0.0],  # 170 deg about x: x dominates
    [np.cos(np.radians(85)), 0.0, np.sin(np.radians(85)), 0.0],  # ... about y
    [np.cos(np.radians(85)), 0.0, 0.0, np.sin(np.radians(85))],  # ... about z
    [-np.cos(np.radians(5)), 0.0, 0.0, np.sin(np.radians(5))],  # w < 0, small angle
    [1e-9, 0.6, 0.0, 0.8],
]


# ---------------------------------------------------------------------------------------------------------
# Quaternions


def test_quaternion_to_matrix_matches_pyquaternion(rng: np.random.Generator) -> None:
    quaternions = np.concatenate([random_quaternions(rng, 200), SPECIAL_QUATERNIONS])
    assert (quaternions[:, 0] < 0).sum() > 50  # both signs of w are covered
    for q in quaternions:
        np.testing.assert_allclose(geometry.quaternion_to_matrix(q), Quaternion(q).rotation_matrix, atol=1e-12)


def test_quaternion_to_matrix_normalises_and_is_a_proper_rotation(rng: np.random.Generator) -> None:
    q = random_quaternions(rng, 50)
    scaled = q * rng.uniform(0.1, 10.0, size=(50, 1))
    r = geometry.quaternion_to_matrix(scaled)  # [50, 3, 3]
    np.testing.assert_allclose(r, geometry.quaternion_to_matrix(q), atol=1e-12)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    # q and -q are the same rotation.
    np.testing.assert_allclose(geometry.quaternion_to_matrix(-q), r, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (7,), (2, 3), (2, 1, 4)])
def test_quaternion_matrix_batch_shapes(rng: np.random.Generator, batch: tuple[int, ...]) -> None:
    n = int(np.prod(batch, dtype=int))
    q = random_quaternions(rng, n).reshape(*batch, 4)
    r = geometry.quaternion_to_matrix(q)
    assert r.shape == (*batch, 3, 3)
    assert r.dtype == np.float64
    flat = r.reshape(n, 3, 3)
    for i, qi in enumerate(q.reshape(n, 4)):
        np.testing.assert_allclose(flat[i], Quaternion(qi).rotation_matrix, atol=1e-12)
    back = geometry.matrix_to_quaternion(r)
    assert back.shape == (*batch, 4)
    assert_same_rotation_quaternion(back, q)
    assert geometry.quaternion_yaw(q).shape == batch


def test_matrix_to_quaternion_round_trip_with_non_negative_w(rng: np.random.Generator) -> None:
    q = np.concatenate([random_quaternions(rng, 500), SPECIAL_QUATERNIONS])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    back = geometry.matrix_to_quaternion(geometry.quaternion_to_matrix(q))  # [N, 4]
    assert np.all(back[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-12)
    assert_same_rotation_quaternion(back, q)
    # Where w is clearly non-zero the sign is determined: exactly the canonical one.
    clear = np.abs(q[:, 0]) > 1e-6
    np.testing.assert_allclose(back[clear], np.sign(q[clear, :1]) * q[clear], atol=1e-12)


def test_matrix_to_quaternion_matches_pyquaternion(rng: np.random.Generator) -> None:
    for q in random_quaternions(rng, 100):
        r = Quaternion(q).rotation_matrix
        expected = Quaternion(matrix=r).elements
        assert_same_rotation_quaternion(geometry.matrix_to_quaternion(r), expected)


def test_matrix_to_quaternion_of_matrix_round_trip(rng: np.random.Generator) -> None:
    r = geometry.quaternion_to_matrix(random_quaternions(rng, 100))
    np.testing.assert_allclose(geometry.quaternion_to_matrix(geometry.matrix_to_quaternion(r)), r, atol=1e-12)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(3), np.zeros((2, 5)), np.zeros(4), np.array([np.nan, 0, 0, 1]), np.array([np.inf, 0, 0, 0])],
    ids=["short", "wide", "zero", "nan", "inf"],
)
def test_quaternion_to_matrix_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="quaternion_wxyz"):
        geometry.quaternion_to_matrix(bad)


def test_matrix_to_quaternion_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="rotation"):
        geometry.matrix_to_quaternion(np.eye(4))


def test_quaternion_yaw_matches_devkit(rng: np.random.Generator) -> None:
    q = np.concatenate([random_quaternions(rng, 300), SPECIAL_QUATERNIONS[5:]])
    yaw = geometry.quaternion_yaw(q)
    expected = np.array([devkit_quaternion_yaw(Quaternion(qi)) for qi in q])
    np.testing.assert_allclose(yaw, expected, atol=1e-12)
    assert np.all((yaw > -np.pi) & (yaw <= np.pi))


def test_yaw_to_quaternion_matches_pyquaternion_axis_angle(rng: np.random.Generator) -> None:
    yaws = rng.uniform(-np.pi + 1e-6, np.pi - 1e-6, 100)
    q = geometry.yaw_to_quaternion(yaws)
    assert q.shape == (100, 4)
    for yaw, qi in zip(yaws, q, strict=True):
        np.testing.assert_allclose(qi, Quaternion(axis=[0, 0, 1], angle=yaw).elements, atol=1e-12)
    assert geometry.yaw_to_quaternion(0.3).shape == (4,)
    assert geometry.yaw_to_quaternion(np.zeros((2, 3))).shape == (2, 3, 4)


def test_yaw_round_trip_wraps_into_minus_pi_pi(rng: np.random.Generator) -> None:
    yaws = rng.uniform(-3 * np.pi, 3 * np.pi, 200)
    back = geometry.quaternion_yaw(geometry.yaw_to_quaternion(yaws))
    np.testing.assert_allclose(np.cos(back), np.cos(yaws), atol=1e-12)
    np.testing.assert_allclose(np.sin(back), np.sin(yaws), atol=1e-12)
    np.testing.assert_allclose(back, geometry.wrap_angle(yaws), atol=1e-9)
    # The devkit agrees on the yaw of a quaternion built from a yaw.
    for yaw, q in zip(yaws[:20], geometry.yaw_to_quaternion(yaws[:20]), strict=True):
        assert devkit_quaternion_yaw(Quaternion(q)) == pytest.approx(geometry.wrap_angle(yaw), abs=1e-9)


def test_wrap_angle_range_and_values() -> None:
    angles = np.linspace(-10, 10, 1001)
    wrapped = geometry.wrap_angle(angles)
    assert np.all((wrapped >= -np.pi) & (wrapped < np.pi))
    np.testing.assert_allclose(np.exp(1j * wrapped), np.exp(1j * angles), atol=1e-12)
    assert geometry.wrap_angle(np.pi) == pytest.approx(-np.pi)
    assert geometry.wrap_angle(0.5) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------
# Ego motion (the world model's actions)


def _planar(transform: geometry.RigidTransform) -> np.ndarray:
    """[3] x, y (m), yaw (rad) of a planar transform."""
    return np.array([transform.translation[0], transform.translation[1], transform.yaw_rad])


def _random_poses(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 3] planar poses x, y (m), yaw (rad); yaw anywhere, including beyond (-pi, pi]."""
    return np.concatenate([rng.uniform(-200, 200, (n, 2)), rng.uniform(-3 * np.pi, 3 * np.pi, (n, 1))], axis=1)


def test_ego_motion_is_start_from_end(rng: np.random.Generator) -> None:
    start, end = _random_poses(rng, 50), _random_poses(rng, 50)
    motion = geometry.ego_motion(start, end)  # [50, 3]
    assert motion.shape == (50, 3)
    for a, b, m in zip(start, end, motion, strict=True):
        start_from_end = geometry.RigidTransform.from_pose_2d(*a).inverse() @ geometry.RigidTransform.from_pose_2d(*b)
        np.testing.assert_allclose(m[:2], start_from_end.translation[:2], atol=1e-9)
        assert geometry.wrap_angle(m[2] - start_from_end.yaw_rad) == pytest.approx(0.0, abs=1e-9)
    assert np.all((motion[:, 2] >= -np.pi) & (motion[:, 2] < np.pi))


def test_ego_motion_composes_and_inverts(rng: np.random.Generator) -> None:
    a, b, c = _random_poses(rng, 30), _random_poses(rng, 30), _random_poses(rng, 30)
    ab, bc, ac = geometry.ego_motion(a, b), geometry.ego_motion(b, c), geometry.ego_motion(a, c)
    zero = np.zeros(3)
    for i in range(30):
        # Composition: a→b followed by b→c is a→c (each seen from where it starts).
        composed = geometry.RigidTransform.from_pose_2d(*ab[i]) @ geometry.RigidTransform.from_pose_2d(*bc[i])
        np.testing.assert_allclose(_planar(composed)[:2], ac[i, :2], atol=1e-9)
        assert geometry.wrap_angle(_planar(composed)[2] - ac[i, 2]) == pytest.approx(0.0, abs=1e-9)
        # Inverse: b→a is a→b undone, i.e. the motion from a→b's end pose back to the origin.
        np.testing.assert_allclose(geometry.ego_motion(ab[i], zero), geometry.ego_motion(b[i], a[i]), atol=1e-9)
    # No motion from a pose to itself; a common rigid motion of both poses changes nothing.
    np.testing.assert_allclose(geometry.ego_motion(a, a), 0.0, atol=1e-12)
    shift = geometry.RigidTransform.from_pose_2d(12.0, -7.0, 0.8)
    moved_a = np.stack([_planar(shift @ geometry.RigidTransform.from_pose_2d(*p)) for p in a])
    moved_b = np.stack([_planar(shift @ geometry.RigidTransform.from_pose_2d(*p)) for p in b])
    np.testing.assert_allclose(geometry.ego_motion(moved_a, moved_b), ab, atol=1e-9)


def _old_relative_motion(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``windows._relative_motion`` as it was before ``geometry.ego_motion`` replaced it."""
    dx, dy = end[..., 0] - start[..., 0], end[..., 1] - start[..., 1]
    cos, sin = np.cos(start[..., 2]), np.sin(start[..., 2])
    return np.stack(
        [cos * dx + sin * dy, -sin * dx + cos * dy, geometry.wrap_angle(end[..., 2] - start[..., 2])], axis=-1
    )


def _old_window_sample_past_actions(global_from: np.ndarray) -> np.ndarray:
    """The past actions of ``sources.window_sample_from_frames`` as they were, from [P, 4, 4] ego poses."""
    t0_from_ego = np.linalg.inv(global_from[-1])[None] @ global_from  # [P, 4, 4]
    yaw = np.arctan2(t0_from_ego[:, 1, 0], t0_from_ego[:, 0, 0])  # [P]
    pose = np.stack([t0_from_ego[:, 0, 3], t0_from_ego[:, 1, 3], yaw], 1)  # [P, 3] x, y, yaw in t0
    dx, dy = pose[1:, 0] - pose[:-1, 0], pose[1:, 1] - pose[:-1, 1]
    cos, sin = np.cos(pose[:-1, 2]), np.sin(pose[:-1, 2])
    return np.stack([cos * dx + sin * dy, -sin * dx + cos * dy, geometry.wrap_angle(np.diff(pose[:, 2]))], 1)


def test_ego_motion_equals_the_formulas_it_replaced(rng: np.random.Generator) -> None:
    start, end = _random_poses(rng, 200), _random_poses(rng, 200)
    np.testing.assert_array_equal(geometry.ego_motion(start, end), _old_relative_motion(start, end))
    sequence = _random_poses(rng, 15)  # [P + T, 3], as WindowBuilder.window chains them
    np.testing.assert_array_equal(
        geometry.ego_motion(sequence[:-1], sequence[1:]), _old_relative_motion(sequence[:-1], sequence[1:])
    )
    # The inference window's past actions: planar poses of t0_from_ego, then the motion between them.
    global_from = np.stack([geometry.RigidTransform.from_pose_2d(*p).matrix for p in _random_poses(rng, 3)])
    global_from[:, :3, 3] += rng.uniform(-0.5, 0.5, (3, 3))  # a little z
    pose = geometry.planar_pose(np.linalg.inv(global_from[-1])[None] @ global_from)  # [P, 3]
    np.testing.assert_allclose(
        geometry.ego_motion(pose[:-1], pose[1:]), _old_window_sample_past_actions(global_from), atol=1e-12
    )


def test_planar_pose_and_ego_motion_check_shapes(rng: np.random.Generator) -> None:
    transform = geometry.RigidTransform.from_pose_2d(3.0, -4.0, 2.5, z_m=1.0)
    np.testing.assert_allclose(geometry.planar_pose(transform.matrix), [3.0, -4.0, 2.5], atol=1e-12)
    assert geometry.planar_pose(np.tile(transform.matrix, (2, 5, 1, 1))).shape == (2, 5, 3)
    with pytest.raises(ValueError, match=r"ref_from_ego: expected shape \[\.\.\., 4, 4\]"):
        geometry.planar_pose(np.eye(3))
    with pytest.raises(ValueError, match="start_pose, end_pose"):
        geometry.ego_motion(np.zeros((4, 2)), np.zeros((4, 3)))
    assert geometry.ego_motion(np.zeros(3), _random_poses(rng, 6)).shape == (6, 3)  # broadcasts


# ---------------------------------------------------------------------------------------------------------
# RigidTransform


def test_inverse_after_forward_returns_the_input(rng: np.random.Generator) -> None:
    for _ in range(20):
        dst_from_src = random_transform(rng)
        points = rng.uniform(-50, 50, size=(100, 3))
        back = dst_from_src.inverse().apply(dst_from_src.apply(points))
        np.testing.assert_allclose(back, points, atol=1e-9)
        np.testing.assert_allclose((dst_from_src @ dst_from_src.inverse()).matrix, np.eye(4), atol=1e-12)
        np.testing.assert_allclose((dst_from_src.inverse() @ dst_from_src).matrix, np.eye(4), atol=1e-12)


def test_composition_reads_a_from_b_at_b_from_c(rng: np.random.Generator) -> None:
    a_from_b, b_from_c = random_transform(rng), random_transform(rng)
    points_c = rng.uniform(-20, 20, size=(50, 3))
    a_from_c = a_from_b @ b_from_c
    np.testing.assert_allclose(a_from_c.apply(points_c), a_from_b.apply(b_from_c.apply(points_c)), atol=1e-9)
    np.testing.assert_allclose(a_from_c.matrix, a_from_b.matrix @ b_from_c.matrix, atol=1e-12)
    # The order matters: the other order is a different transform.
    assert not np.allclose((b_from_c @ a_from_b).matrix, a_from_c.matrix, atol=1e-3)
    # (a_from_b @ b_from_c)^-1 = c_from_b @ b_from_a.
    np.testing.assert_allclose(a_from_c.inverse().matrix, (b_from_c.inverse() @ a_from_b.inverse()).matrix, atol=1e-12)


def test_matrix_matches_devkit_transform_matrix(rng: np.random.Generator) -> None:
    for q in random_quaternions(rng, 20):
        translation = rng.uniform(-1000, 1000, 3)
        transform = geometry.RigidTransform.from_quaternion(q, translation)
        np.testing.assert_allclose(transform.matrix, transform_matrix(translation, Quaternion(q)), atol=1e-9)
        np.testing.assert_allclose(
            transform.inverse().matrix, transform_matrix(translation, Quaternion(q), inverse=True), atol=1e-9
        )
        # Accessors round-trip through the matrix and the quaternion.
        again = geometry.RigidTransform.from_matrix(transform.matrix)
        np.testing.assert_allclose(again.rotation, transform.rotation, atol=1e-15)
        np.testing.assert_allclose(again.translation, translation, atol=1e-12)
        assert transform.quaternion[0] >= 0
        assert_same_rotation_quaternion(transform.quaternion, q)
        assert transform.yaw_rad == pytest.approx(devkit_quaternion_yaw(Quaternion(q)), abs=1e-12)


def test_apply_matches_homogeneous_matrix_and_keeps_batch_shape(rng: np.random.Generator) -> None:
    transform = random_transform(rng)
    points = rng.normal(size=(2, 5, 3))
    moved = transform.apply(points)
    assert moved.shape == (2, 5, 3)
    homogeneous = np.concatenate([points, np.ones((2, 5, 1))], axis=-1) @ transform.matrix.T
    np.testing.assert_allclose(moved, homogeneous[..., :3], atol=1e-12)
    vectors = rng.normal(size=(4, 3))
    np.testing.assert_allclose(transform.apply_vectors(vectors), vectors @ transform.rotation.T, atol=1e-12)
    # Directions do not move with the origin.
    np.testing.assert_allclose(
        transform.apply_vectors(vectors), transform.apply(vectors) - transform.apply(np.zeros(3)), atol=1e-9
    )


def test_from_pose_2d_and_identity() -> None:
    pose = geometry.RigidTransform.from_pose_2d(10.0, -2.0, np.pi / 2, z_m=1.5)
    np.testing.assert_allclose(pose.apply(np.array([1.0, 0.0, 0.0])), [10.0, -1.0, 1.5], atol=1e-12)
    np.testing.assert_allclose(pose.apply(np.array([0.0, 1.0, 0.0])), [9.0, -2.0, 1.5], atol=1e-12)
    assert pose.yaw_rad == pytest.approx(np.pi / 2)
    np.testing.assert_array_equal(geometry.RigidTransform.identity().matrix, np.eye(4))


@pytest.mark.parametrize(
    ("rotation", "translation", "field"),
    [
        (np.eye(2), np.zeros(3), "RigidTransform.rotation"),
        (np.eye(4), np.zeros(3), "RigidTransform.rotation"),
        (np.eye(3), np.zeros(2), "RigidTransform.translation"),
        (np.eye(3), np.zeros((3, 1)), "RigidTransform.translation"),
        (np.diag([1.0, 1.0, -1.0]), np.zeros(3), "RigidTransform.rotation"),  # a reflection
        (2 * np.eye(3), np.zeros(3), "RigidTransform.rotation"),  # a scaling
        (np.eye(3), np.array([0.0, np.nan, 0.0]), "RigidTransform"),
    ],
)
def test_rigid_transform_rejects_bad_fields(rotation: np.ndarray, translation: np.ndarray, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        geometry.RigidTransform(rotation, translation)


def test_shape_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="matrix"):
        geometry.RigidTransform.from_matrix(np.eye(3))
    with pytest.raises(ValueError, match="points"):
        geometry.RigidTransform.identity().apply(np.zeros((4, 2)))


def test_rigid_transform_is_immutable_and_does_not_alias_its_inputs() -> None:
    matrix = np.eye(4)
    transform = geometry.RigidTransform.from_matrix(matrix)
    matrix[0, 3] = 5.0  # the caller keeps a writeable array ...
    np.testing.assert_array_equal(transform.translation, np.zeros(3))  # ... and the transform does not change
    rotation, translation = np.eye(3), np.zeros(3)
    geometry.RigidTransform(rotation, translation)
    rotation[0, 0] = 1.0  # not frozen behind the caller's back
    translation[0] = 1.0
    with pytest.raises(ValueError):
        transform.translation[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        transform.translation = np.ones(3)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------
# GridSpec


def test_grid_default_shape() -> None:
    assert geometry.GridSpec().shape == (128, 128)
    assert geometry.GridSpec().cell_centers().shape == (128, 128, 2)


def test_grid_non_square_shape_rows_along_x() -> None:
    grid = geometry.GridSpec(x_min_m=-10.0, x_max_m=30.0, y_min_m=-5.0, y_max_m=5.0, resolution_m=0.25)
    assert grid.shape == (160, 40)
    # nuScenes-style bounds that are not exact in binary still count as whole cells.
    assert geometry.GridSpec(-51.2, 51.2, -51.2, 51.2, 0.4).shape == (256, 256)


@pytest.mark.parametrize(
    "grid",
    [
        geometry.GridSpec(),
        geometry.GridSpec(-10.0, 30.0, -5.0, 5.0, 0.25),
        geometry.GridSpec(-51.2, 51.2, -51.2, 51.2, 0.4),
    ],
    ids=["default", "rect", "nuscenes"],
)
def test_grid_cell_centres_round_trip(grid: geometry.GridSpec) -> None:
    h, w = grid.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    xy = grid.index_to_xy(rows, cols)  # [H*W, 2]
    assert xy.shape == (h * w, 2)
    back_rows, back_cols, inside = grid.xy_to_index(xy)
    assert inside.all()
    np.testing.assert_array_equal(back_rows, rows)
    np.testing.assert_array_equal(back_cols, cols)
    np.testing.assert_allclose(grid.cell_centers().reshape(-1, 2), xy)
    # The first centre is half a cell inside the corner.
    np.testing.assert_allclose(xy[0], [grid.x_min_m + grid.resolution_m / 2, grid.y_min_m + grid.resolution_m / 2])


def test_grid_random_points_fall_in_the_cell_that_covers_them(rng: np.random.Generator) -> None:
    grid = geometry.GridSpec(-10.0, 30.0, -5.0, 5.0, 0.25)
    xy = np.stack([rng.uniform(-10, 30, 2000), rng.uniform(-5, 5, 2000)], axis=1)
    rows, cols, inside = grid.xy_to_index(xy)
    assert inside.all()
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    lower = grid.index_to_xy(rows, cols) - grid.resolution_m / 2
    assert np.all(lower <= xy + 1e-12)
    assert np.all(xy < lower + grid.resolution_m + 1e-12)


def test_grid_flags_points_outside_or_not_finite() -> None:
    grid = geometry.GridSpec()
    xy = np.array(
        [
            [0.0, 0.0],  # inside
            [-32.0, -32.0],  # the lower corner is inside (half-open cells)
            [31.999, 31.999],  # inside
            [32.0, 0.0],  # the upper edge is outside
            [0.0, 32.0],
            [-32.001, 0.0],
            [0.0, -40.0],
            [np.nan, 0.0],
            [0.0, np.nan],
            [np.inf, 0.0],
            [-np.inf, 0.0],
            [1e300, -1e300],
        ]
    )
    rows, cols, inside = grid.xy_to_index(xy)
    np.testing.assert_array_equal(inside, [True, True, True] + [False] * 9)
    h, w = grid.shape
    assert np.all((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w))  # clipped, safe to index then mask
    assert (rows[1], cols[1]) == (0, 0)
    assert (rows[2], cols[2]) == (h - 1, w - 1)


def test_grid_xy_to_index_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="xy"):
        geometry.GridSpec().xy_to_index(np.zeros(4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution_m": 0.0},
        {"resolution_m": -0.5},
        {"resolution_m": float("nan")},
        {"resolution_m": float("inf")},
        {"resolution_m": 0.3},  # 64 m is not a whole number of 0.3 m cells
        {"resolution_m": 100.0},  # less than one cell
        {"x_max_m": -32.0},
        {"x_max_m": -40.0},
        {"y_min_m": 40.0},
        {"x_max_m": 32.25},
        {"y_max_m": float("inf")},
        {"x_min_m": float("nan")},
    ],
)
def test_grid_rejects_bad_specs(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="GridSpec"):
        geometry.GridSpec(**kwargs)


def test_grid_to_image_puts_forward_up_and_left_left() -> None:
    grid = geometry.GridSpec(0.0, 4.0, -2.0, 2.0, 1.0)
    h, w = grid.shape
    bev = np.zeros((h, w))
    rows, cols, _ = grid.xy_to_index(np.array([[3.5, 1.5]]))  # far ahead, far left
    bev[rows[0], cols[0]] = 1.0
    rows, cols, _ = grid.xy_to_index(np.array([[0.5, -1.5]]))  # near, far right
    bev[rows[0], cols[0]] = 2.0
    image = grid.to_image(bev)
    assert image.shape == (h, w)
    assert image[0, 0] == 1.0  # top-left
    assert image[h - 1, w - 1] == 2.0  # bottom-right


# ---------------------------------------------------------------------------------------------------------
# Real data: a LiDAR sweep of scene-0916 moved to the global frame, devkit against RigidTransform


def test_real_lidar_to_global_matches_devkit(real_scene_nusc) -> None:
    nusc = real_scene_nusc
    scene = nusc.scene[0]
    sample = nusc.get("sample", scene["first_sample_token"])
    sample_data = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    assert sample_data["is_key_frame"]
    calibration = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sample_data["ego_pose_token"])

    def devkit_to_global(cloud: LidarPointCloud) -> np.ndarray:
        """The devkit tutorial's way: sensor -> ego -> global, in place."""
        cloud.rotate(Quaternion(calibration["rotation"]).rotation_matrix)
        cloud.translate(np.array(calibration["translation"]))
        cloud.rotate(Quaternion(pose["rotation"]).rotation_matrix)
        cloud.translate(np.array(pose["translation"]))
        return cloud.points[:3].T  # [N, 3]

    path = nusc.get_sample_data_path(sample_data["token"])
    cloud = LidarPointCloud.from_file(path)
    assert cloud.points.dtype == np.float32
    points_lidar = cloud.points[:3].T.astype(np.float64)  # [N, 3]
    assert points_lidar.shape[0] > 30_000
    expected_float32 = devkit_to_global(cloud)
    cloud64 = LidarPointCloud.from_file(path)
    cloud64.points = cloud64.points.astype(np.float64)
    expected_float64 = devkit_to_global(cloud64)

    ego_from_lidar = geometry.RigidTransform.from_quaternion(calibration["rotation"], calibration["translation"])
    global_from_ego = geometry.RigidTransform.from_quaternion(pose["rotation"], pose["translation"])
    global_from_lidar = global_from_ego @ ego_from_lidar
    actual = global_from_lidar.apply(points_lidar)
    assert np.abs(actual).max() > 1000  # far from the global origin, where float32 runs short
    # The same arithmetic in float64: equal to far below a millimetre.
    np.testing.assert_allclose(actual, expected_float64, rtol=0, atol=1e-6)
    # The tutorial as written stores every step in float32. At |y| ~ 1810 m one float32 step is 1.2e-4 m,
    # so 1e-4 m cannot hold there; allow two float32 steps.
    float32_step = np.spacing(np.float32(np.abs(expected_float32).max()))
    np.testing.assert_allclose(actual, expected_float32, rtol=0, atol=max(1e-4, 2 * float32_step))
    # And the same through the devkit's homogeneous matrices.
    devkit_global_from_lidar = transform_matrix(pose["translation"], Quaternion(pose["rotation"])) @ transform_matrix(
        calibration["translation"], Quaternion(calibration["rotation"])
    )
    np.testing.assert_allclose(global_from_lidar.matrix, devkit_global_from_lidar, atol=1e-9)
    # The way back lands on the sensor's points.
    np.testing.assert_allclose(global_from_lidar.inverse().apply(actual), points_lidar, atol=1e-9)


def test_one_quaternion_gives_the_bits_of_the_batched_path(rng: np.random.Generator) -> None:
    """The Python-float path for a single quaternion computes exactly what the batched numpy path does."""
    quaternions = rng.normal(size=(2000, 4)) * rng.uniform(1e-3, 1e3, (2000, 1))
    batched = geometry.quaternion_to_matrix(quaternions)
    single = np.stack([geometry.quaternion_to_matrix(q) for q in quaternions])
    assert single.dtype == np.float64 and single.tobytes() == batched.tobytes()


def test_rigid_transform_check_is_allclose_and_det(rng: np.random.Generator) -> None:
    """The spelled-out orthonormality check accepts and refuses what ``np.allclose`` and ``det`` did."""
    for _ in range(3000):
        rotation = geometry.quaternion_to_matrix(rng.normal(size=4))
        rotation = rotation + rng.normal(size=(3, 3)) * 10 ** rng.uniform(-8, -4) * (rng.random() < 0.7)
        rotation = -rotation if rng.random() < 0.3 else rotation
        expected_ok = np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6) and np.linalg.det(rotation) >= 0
        try:
            geometry.RigidTransform(rotation, np.zeros(3))
            ok = True
        except ValueError:
            ok = False
        assert ok == expected_ok


def test_xy_to_index_inside_is_xy_to_index_masked(rng: np.random.Generator) -> None:
    grid = geometry.GridSpec(-40.0, 40.0, -20.0, 30.0, 0.4)
    xy = rng.uniform(-60.0, 60.0, (5000, 2))
    xy[:5] = [[np.nan, 0.0], [0.0, np.inf], [-np.inf, 1.0], [-40.0, -20.0], [40.0, 30.0]]
    rows, cols, inside = grid.xy_to_index(xy)
    got_rows, got_cols = grid.xy_to_index_inside(xy)
    np.testing.assert_array_equal(got_rows, rows[inside])
    np.testing.assert_array_equal(got_cols, cols[inside])
