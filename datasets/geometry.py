"""Rigid transforms, quaternions and the BEV grid: the one place that turns metres into cells.

Conventions follow nuScenes: quaternions are scalar-first ``[w, x, y, z]`` (as ``pyquaternion`` and the
``rotation`` fields of the tables), transforms are named ``dst_from_src`` and compose left to right in the
order they read: ``global_from_lidar = global_from_ego @ ego_from_lidar``.

Notation:
    N  number of points
    H, W  BEV rows and columns (see ``GridSpec``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily where it is used: datasets must not need it at import
    import torch


def quaternion_to_matrix(quaternion_wxyz: np.ndarray) -> np.ndarray:
    """Rotation matrices of unit quaternions.

    Args:
        quaternion_wxyz: [..., 4] float — scalar-first quaternions; normalised here.

    Returns:
        [..., 3, 3] float64 rotation matrices.
    """
    q = np.asarray(quaternion_wxyz, dtype=np.float64)
    if q.shape[-1] != 4:
        raise ValueError(f"quaternion_wxyz: expected shape [..., 4], got {q.shape}")
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(q)):
        raise ValueError("quaternion_wxyz: quaternions must be finite and non-zero")
    q = q / norm
    if q.ndim == 1:  # one quaternion (a pose, a box): the same arithmetic on Python floats, 5x faster than on 0-d
        w, x, y, z = q.tolist()  # arrays; IEEE double either way, so the same bits as the batched path below
        return np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
        ],
        axis=-2,
    )


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternions of rotation matrices, with a non-negative scalar part.

    Args:
        rotation: [..., 3, 3] float — proper rotation matrices.

    Returns:
        [..., 4] float64 scalar-first quaternions ``[w, x, y, z]``, ``w >= 0``.
    """
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotation: expected shape [..., 3, 3], got {r.shape}")
    # Shepperd's method, vectorized: pick the largest of the four candidate denominators per matrix.
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    candidates = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1
    )  # [..., 4] = 4 * (w², x², y², z²)
    best = np.argmax(candidates, axis=-1)
    s = np.sqrt(np.maximum(np.take_along_axis(candidates, best[..., None], -1)[..., 0], 1e-300)) * 2
    d21, d02, d10 = r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]
    s21, s02, s10 = r[..., 2, 1] + r[..., 1, 2], r[..., 0, 2] + r[..., 2, 0], r[..., 1, 0] + r[..., 0, 1]
    options = np.stack(
        [
            np.stack([s / 4, d21 / s, d02 / s, d10 / s], axis=-1),
            np.stack([d21 / s, s / 4, s10 / s, s02 / s], axis=-1),
            np.stack([d02 / s, s10 / s, s / 4, s21 / s], axis=-1),
            np.stack([d10 / s, s02 / s, s21 / s, s / 4], axis=-1),
        ],
        axis=-2,
    )  # [..., 4 options, 4]
    q = np.take_along_axis(options, best[..., None, None], axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def yaw_to_quaternion(yaw_rad: np.ndarray | float) -> np.ndarray:
    """Quaternions of rotations about +z.

    Args:
        yaw_rad: [...] float — yaw angles (rad), counter-clockwise seen from above.

    Returns:
        [..., 4] float64 quaternions ``[cos(yaw/2), 0, 0, sin(yaw/2)]``.
    """
    half = 0.5 * np.asarray(yaw_rad, dtype=np.float64)
    zeros = np.zeros_like(half)
    return np.stack([np.cos(half), zeros, zeros, np.sin(half)], axis=-1)


def quaternion_yaw(quaternion_wxyz: np.ndarray) -> np.ndarray:
    """Yaw of rotations: the heading of their x-axis in the xy-plane, as the devkit's ``quaternion_yaw``.

    Args:
        quaternion_wxyz: [..., 4] float.

    Returns:
        [...] float64 yaw (rad) in (-pi, pi].
    """
    r = quaternion_to_matrix(quaternion_wxyz)
    return np.arctan2(r[..., 1, 0], r[..., 0, 0])


def wrap_angle(angle_rad: np.ndarray | float) -> np.ndarray:
    """Angles wrapped into [-pi, pi)."""
    return (np.asarray(angle_rad) + np.pi) % (2 * np.pi) - np.pi


def planar_pose(ref_from_ego: np.ndarray) -> np.ndarray:
    """The planar poses (x, y, yaw) of homogeneous transforms: their translation's xy and their x-axis heading.

    Args:
        ref_from_ego: [..., 4, 4] float — ``ref_from_ego`` transforms (e.g. ``t0_from_ego``).

    Returns:
        [..., 3] float64 — x, y (m) of the ego origin in ``ref``, yaw (rad) of the ego's x-axis in ``ref``.
    """
    m = np.asarray(ref_from_ego, dtype=np.float64)
    if m.shape[-2:] != (4, 4):
        raise ValueError(f"ref_from_ego: expected shape [..., 4, 4], got {m.shape}")
    return np.stack([m[..., 0, 3], m[..., 1, 3], np.arctan2(m[..., 1, 0], m[..., 0, 0])], axis=-1)


def ego_motion(start_pose: np.ndarray, end_pose: np.ndarray) -> np.ndarray:
    """The ego's motion from one planar pose to another, in the frame of the earlier one: a world-model action.

    With both poses given in one reference frame (``ref_from_start`` and ``ref_from_end`` as x, y, yaw), the motion
    is the planar pose ``start_from_end = inverse(ref_from_start) @ ref_from_end``: where the ego ends up, seen from
    where it started. Motions compose as transforms do: ``ego_motion(a, c)`` is ``ego_motion(a, b)`` followed by
    ``ego_motion(b, c)``, and ``ego_motion(b, a)`` is the inverse of ``ego_motion(a, b)``.

    Args:
        start_pose: [..., 3] float — x, y (m), yaw (rad) of ``ref_from_start``.
        end_pose: [..., 3] float — x, y (m), yaw (rad) of ``ref_from_end``; broadcasts against ``start_pose``.

    Returns:
        [..., 3] float64 — dx, dy (m), dyaw (rad, wrapped into [-pi, pi)) of ``start_from_end``: dx forward and dy
        to the left of the start pose.
    """
    start = np.asarray(start_pose, dtype=np.float64)
    end = np.asarray(end_pose, dtype=np.float64)
    if start.shape[-1:] != (3,) or end.shape[-1:] != (3,):
        raise ValueError(f"start_pose, end_pose: expected shapes [..., 3], got {start.shape} and {end.shape}")
    dx, dy = end[..., 0] - start[..., 0], end[..., 1] - start[..., 1]  # [...] in ref
    cos, sin = np.cos(start[..., 2]), np.sin(start[..., 2])
    return np.stack([cos * dx + sin * dy, -sin * dx + cos * dy, wrap_angle(end[..., 2] - start[..., 2])], axis=-1)


_EYE3 = np.eye(3)
_ORTHONORMAL_TOLERANCE = 1e-6 + 1e-5 * np.abs(_EYE3)
"""[3, 3] what ``np.allclose(R @ R.T, I, atol=1e-6)`` allows (its default rtol 1e-5 applies to ``|I|``)."""


def float32_geometry(device_type: str) -> torch.autocast:
    """A context in which torch's autocast leaves products in float32: poses, points and sampling coordinates.

    Training may run its forward pass under bfloat16 autocast (``TrainConfig.precision``), which would round the
    matrix products of transforms too: 8 bits of mantissa put a point 30 m out 0.25 m off, half a target cell. Each
    model stage wraps its geometry in this; without autocast it changes nothing.

    Args:
        device_type: the tensors' device type (``"cpu"``, ``"cuda"``).
    """
    import torch

    return torch.autocast(device_type, enabled=False)


def _det3(matrix: np.ndarray) -> float:
    """The determinant of a [3, 3] matrix by cofactors (its sign is all ``RigidTransform`` needs)."""
    (a, b, c), (d, e, f), (g, h, i) = matrix.tolist()
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


@dataclass(frozen=True)
class RigidTransform:
    """A proper rigid transform ``p_dst = rotation @ p_src + translation``, named ``dst_from_src`` where used.

    Attributes:
        rotation: [3, 3] float64 rotation matrix.
        translation: [3] float64 translation (m), the source origin expressed in the destination frame.
    """

    rotation: np.ndarray
    translation: np.ndarray

    def __post_init__(self) -> None:
        # Own copies: never alias (or freeze) the caller's arrays, so the transform stays immutable.
        rotation = np.array(self.rotation, dtype=np.float64)
        translation = np.array(self.translation, dtype=np.float64)
        if rotation.shape != (3, 3):
            raise ValueError(f"RigidTransform.rotation: expected shape (3, 3), got {rotation.shape}")
        if translation.shape != (3,):
            raise ValueError(f"RigidTransform.translation: expected shape (3,), got {translation.shape}")
        if not (np.isfinite(rotation).all() and np.isfinite(translation).all()):
            raise ValueError("RigidTransform: rotation and translation must be finite")
        # np.allclose(R @ R.T, I, atol=1e-6) and det(R) >= 0, spelled out: a transform is built for every box and
        # pose, and allclose's and det's own overhead was most of a preprocessing window's transform time.
        if not (np.abs(rotation @ rotation.T - _EYE3) <= _ORTHONORMAL_TOLERANCE).all() or _det3(rotation) < 0:
            raise ValueError("RigidTransform.rotation: not a proper rotation matrix")
        rotation.setflags(write=False)
        translation.setflags(write=False)
        object.__setattr__(self, "rotation", rotation)
        object.__setattr__(self, "translation", translation)

    @staticmethod
    def identity() -> RigidTransform:
        """The identity transform."""
        return RigidTransform(np.eye(3), np.zeros(3))

    @staticmethod
    def from_quaternion(quaternion_wxyz: np.ndarray, translation: np.ndarray) -> RigidTransform:
        """From a nuScenes ``rotation`` ([4] w, x, y, z) and ``translation`` ([3] m) pair."""
        return RigidTransform(quaternion_to_matrix(quaternion_wxyz), np.asarray(translation, dtype=np.float64))

    @staticmethod
    def from_matrix(matrix: np.ndarray) -> RigidTransform:
        """From a [4, 4] homogeneous matrix."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"matrix: expected shape (4, 4), got {matrix.shape}")
        return RigidTransform(matrix[:3, :3], matrix[:3, 3])

    @staticmethod
    def from_pose_2d(x_m: float, y_m: float, yaw_rad: float, z_m: float = 0.0) -> RigidTransform:
        """A planar pose: position (m) and yaw (rad) about +z."""
        return RigidTransform(quaternion_to_matrix(yaw_to_quaternion(yaw_rad)), np.array([x_m, y_m, z_m]))

    @property
    def matrix(self) -> np.ndarray:
        """[4, 4] float64 homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m

    @property
    def quaternion(self) -> np.ndarray:
        """[4] float64 scalar-first quaternion with ``w >= 0``."""
        return matrix_to_quaternion(self.rotation)

    @property
    def yaw_rad(self) -> float:
        """Heading of the rotated x-axis in the xy-plane (rad)."""
        return float(np.arctan2(self.rotation[1, 0], self.rotation[0, 0]))

    def inverse(self) -> RigidTransform:
        """``src_from_dst`` of this ``dst_from_src``."""
        return RigidTransform(self.rotation.T, -self.rotation.T @ self.translation)

    def __matmul__(self, other: RigidTransform) -> RigidTransform:
        """Composition: ``(a_from_b @ b_from_c) = a_from_c``."""
        return RigidTransform(self.rotation @ other.rotation, self.rotation @ other.translation + self.translation)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Move points from the source into the destination frame.

        Args:
            points: [N, 3] or [..., 3] float — coordinates (m) in the source frame.

        Returns:
            [..., 3] float64 coordinates (m) in the destination frame.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.shape[-1] != 3:
            raise ValueError(f"points: expected shape [..., 3], got {points.shape}")
        return points @ self.rotation.T + self.translation

    def apply_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Rotate direction vectors ([..., 3]) without translating them."""
        return np.asarray(vectors, dtype=np.float64) @ self.rotation.T


@dataclass(frozen=True)
class GridSpec:
    """A metric bird's-eye-view grid: the only owner of the mapping between xy (m) and BEV indices.

    Tensor layout: a BEV map is ``[..., H, W]`` with row ``i`` along +x (forward in the ego frame) and column
    ``j`` along +y (left): cell ``(i, j)`` covers ``x in [x_min + i*res, x_min + (i+1)*res)`` and
    ``y in [y_min + j*res, y_min + (j+1)*res)``. Plot with ``origin="lower"`` after a transpose, or use
    ``to_image`` which puts forward up and left to the left.

    Attributes:
        x_min_m, x_max_m: extent along x (m).
        y_min_m, y_max_m: extent along y (m).
        resolution_m: cell edge (m); both extents must be whole multiples of it.
    """

    x_min_m: float = -32.0
    x_max_m: float = 32.0
    y_min_m: float = -32.0
    y_max_m: float = 32.0
    resolution_m: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.resolution_m) and self.resolution_m > 0):
            raise ValueError(f"GridSpec.resolution_m must be positive and finite, got {self.resolution_m}")
        for lo, hi, axis in ((self.x_min_m, self.x_max_m, "x"), (self.y_min_m, self.y_max_m, "y")):
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"GridSpec: the {axis} extent [{lo}, {hi}) must be finite and non-empty")
            cells = (hi - lo) / self.resolution_m
            if round(cells) < 1 or abs(cells - round(cells)) > 1e-6:
                raise ValueError(
                    f"GridSpec: the {axis} extent [{lo}, {hi}) must be positive and a whole number of "
                    f"{self.resolution_m} m cells"
                )

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``: rows along x, columns along y."""
        return (
            round((self.x_max_m - self.x_min_m) / self.resolution_m),
            round((self.y_max_m - self.y_min_m) / self.resolution_m),
        )

    def xy_to_index(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells holding metric points.

        Args:
            xy: [N, 2] float — x, y (m) in the grid's frame.

        Returns:
            rows [N] int64, cols [N] int64, inside [N] bool (False where the point is outside the grid or not
            finite; rows and cols are then clipped into range and must be masked by the caller).
        """
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ValueError(f"xy: expected shape [N, 2], got {xy.shape}")
        h, w = self.shape
        with np.errstate(invalid="ignore"):
            fr = np.floor((xy[:, 0] - self.x_min_m) / self.resolution_m)
            fc = np.floor((xy[:, 1] - self.y_min_m) / self.resolution_m)
        inside = np.isfinite(fr) & np.isfinite(fc) & (fr >= 0) & (fr < h) & (fc >= 0) & (fc < w)
        rows = np.clip(np.nan_to_num(fr), 0, h - 1).astype(np.int64)
        cols = np.clip(np.nan_to_num(fc), 0, w - 1).astype(np.int64)
        return rows, cols, inside

    def xy_to_index_inside(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cells of the points inside the grid: ``xy_to_index``'s rows and cols where ``inside``, and no others.

        Args:
            xy: [N, 2] float — x, y (m) in the grid's frame.

        Returns:
            rows [M] int64, cols [M] int64 — one per point inside the grid (finite, in range), in their order.
        """
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ValueError(f"xy: expected shape [N, 2], got {xy.shape}")
        h, w = self.shape
        with np.errstate(invalid="ignore"):
            fr = np.floor((xy[:, 0] - self.x_min_m) / self.resolution_m)  # [N]
            fc = np.floor((xy[:, 1] - self.y_min_m) / self.resolution_m)  # [N]
        inside = (fr >= 0) & (fr < h) & (fc >= 0) & (fc < w)  # NaN fails every comparison, +-inf one of them
        return fr[inside].astype(np.int64), fc[inside].astype(np.int64)

    def flat_index_torch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat cells ``i * W + j`` holding metric points, in torch (the same cells as ``xy_to_index``).

        Args:
            x: [...] float tensor — x (m) in the grid's frame; computed in its dtype and on its device.
            y: [...] float tensor of ``x``'s shape — y (m).

        Returns:
            flat [...] int64 — ``i * W + j``, 0 where not inside (so it always indexes safely); inside [...] bool
            — False where the point is outside the grid or not finite.
        """
        import torch

        h, w = self.shape
        rows = torch.floor((x - self.x_min_m) / self.resolution_m)  # [...]
        cols = torch.floor((y - self.y_min_m) / self.resolution_m)  # [...]
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # [...]; NaN compares False
        flat = torch.where(inside, rows, 0).long() * w + torch.where(inside, cols, 0).long()  # [...]
        return flat, inside

    def sampling_coords_torch(self, xy: torch.Tensor) -> torch.Tensor:
        """``F.grid_sample`` coordinates of metric points on a map ``[..., H, W]`` of this grid.

        Args:
            xy: [..., 2] float tensor — x, y (m) in the grid's frame.

        Returns:
            [..., 2] — (column, row) normalised so that -1 and 1 are the outer cell edges (``align_corners=False``).
        """
        import torch

        rows = (xy[..., 0] - self.x_min_m) / (self.x_max_m - self.x_min_m) * 2 - 1  # [...] along H
        cols = (xy[..., 1] - self.y_min_m) / (self.y_max_m - self.y_min_m) * 2 - 1  # [...] along W
        return torch.stack([cols, rows], dim=-1)

    def index_to_xy(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Centres of cells: rows [N] and cols [N] int → [N, 2] float64 x, y (m)."""
        x = self.x_min_m + (np.asarray(rows, dtype=np.float64) + 0.5) * self.resolution_m
        y = self.y_min_m + (np.asarray(cols, dtype=np.float64) + 0.5) * self.resolution_m
        return np.stack([x, y], axis=-1)

    def cell_centers(self) -> np.ndarray:
        """[H, W, 2] float64 x, y (m) of every cell centre."""
        h, w = self.shape
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return self.index_to_xy(rows.ravel(), cols.ravel()).reshape(h, w, 2)

    def to_image(self, bev: np.ndarray) -> np.ndarray:
        """A BEV map ``[..., H, W]`` as an image of that shape, +x up and +y to the left (for plotting)."""
        return np.flip(bev, axis=(-2, -1))

    def center_window(
        self, lo_xy: np.ndarray, hi_xy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Index windows holding every cell whose centre lies strictly inside axis-aligned rectangles.

        The windows are conservative (they may hold one extra cell on each side, never miss one) and clipped to
        the grid, so the caller still tests each candidate centre exactly.

        Args:
            lo_xy: [A, 2] float — finite lower corners (x, y) of the rectangles (m).
            hi_xy: [A, 2] float — finite upper corners (x, y) of the rectangles (m).

        Returns:
            row_start, row_stop, col_start, col_stop: [A] int64 half-open index ranges within ``[0, H]`` and
            ``[0, W]``; an empty window has ``stop == start``.
        """
        lo_xy = np.asarray(lo_xy, dtype=np.float64)
        hi_xy = np.asarray(hi_xy, dtype=np.float64)
        if lo_xy.ndim != 2 or lo_xy.shape[1] != 2 or hi_xy.shape != lo_xy.shape:
            raise ValueError(f"lo_xy, hi_xy: expected two [A, 2] arrays, got {lo_xy.shape} and {hi_xy.shape}")
        h, w = self.shape
        origin = np.array([self.x_min_m, self.y_min_m])
        limit = np.array([h, w], dtype=np.float64)
        # Centre k sits at origin + (k + 0.5) * res: the first centre above lo has k >= (lo - origin)/res - 0.5,
        # the last below hi has k < (hi - origin)/res - 0.5; floor and one cell of slack absorb rounding.
        start = np.clip(np.floor((lo_xy - origin) / self.resolution_m - 0.5), 0, limit)  # [A, 2]
        stop = np.clip(np.floor((hi_xy - origin) / self.resolution_m - 0.5) + 2, 0, limit)  # [A, 2]
        stop = np.maximum(stop, start)
        start_i, stop_i = start.astype(np.int64), stop.astype(np.int64)
        return start_i[:, 0], stop_i[:, 0], start_i[:, 1], stop_i[:, 1]

    def index_to_center_coords(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre coordinates of rows and of columns, separately (the same values as ``index_to_xy``).

        Args:
            rows: [...] int — row indices.
            cols: [...] int — column indices (any shape; need not match ``rows``).

        Returns:
            x: float64 of ``rows``' shape — x (m) of the row centres; y: float64 of ``cols``' shape — y (m) of the
            column centres. Broadcasting ``x`` against ``y`` gives cell centres without materialising [..., 2].
        """
        x = self.x_min_m + (np.asarray(rows, dtype=np.float64) + 0.5) * self.resolution_m
        y = self.y_min_m + (np.asarray(cols, dtype=np.float64) + 0.5) * self.resolution_m
        return x, y
