"""The shared data types: ego poses, LiDAR sweeps, camera images and 3D boxes.

Every source (the nuScenes devkit, the synthetic world) produces these; nothing downstream knows which one
it got. Frames follow nuScenes: global; ego (x forward, y left, z up, origin at the rear axle); each sensor as
its ``calibrated_sensor`` record says (cameras: x right, y down, z forward).

Notation:
    N  points
    H, W  image rows and columns (pixels)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bevjepa.datasets import geometry

CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)
"""The six nuScenes cameras, clockwise from the front."""

LIDAR_CHANNEL = "LIDAR_TOP"


def _frozen_array(name: str, value: np.ndarray, shape: tuple[int | None, ...], dtype: type) -> np.ndarray:
    """Check ``value`` against ``shape`` (None matches any size); return a read-only array of ``dtype``."""
    array = np.asarray(value)
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        wanted = ", ".join("N" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape [{wanted}], got {list(array.shape)}")
    if array.dtype == dtype:  # nothing to cast (most boxes and poses): errstate alone costs more than the rest
        converted = array
    else:
        with np.errstate(invalid="ignore"):  # NaN or out-of-range casts are caught just below
            converted = array.astype(dtype, copy=False)
    if np.issubdtype(dtype, np.integer) and converted is not array and not np.array_equal(converted, array):
        # A float image in [0, 1] or an int beyond 255 would otherwise be truncated or wrapped in silence.
        raise ValueError(f"{name}: values of dtype {array.dtype} do not fit {np.dtype(dtype).name} exactly")
    # Keep an array only if it is read-only and owns its memory; anything else could change under us.
    if converted.flags.writeable or converted.base is not None:
        converted = converted.copy()
        converted.setflags(write=False)
    return converted


@dataclass(frozen=True)
class EgoPose:
    """The ego vehicle's pose at one instant.

    Attributes:
        timestamp_us: int64 microseconds, as nuScenes.
        global_from_ego: the ego frame (origin at the rear axle) in the global frame.
    """

    timestamp_us: int
    global_from_ego: geometry.RigidTransform


@dataclass(frozen=True)
class LidarSweep:
    """One LiDAR sweep, as recorded.

    Attributes:
        timestamp_us: int64 microseconds.
        points: [N, 5] float32 — x, y, z (m, sensor frame), intensity (0-255), ring index (0-31).
        ego_from_sensor: the sensor's mounting (``calibrated_sensor``).
        global_from_ego: the ego pose at ``timestamp_us``.
    """

    timestamp_us: int
    points: np.ndarray
    ego_from_sensor: geometry.RigidTransform
    global_from_ego: geometry.RigidTransform

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", _frozen_array("LidarSweep.points", self.points, (None, 5), np.float32))


@dataclass(frozen=True)
class CameraImage:
    """One camera image with its calibration.

    Attributes:
        channel: one of ``CAMERA_CHANNELS``.
        timestamp_us: int64 microseconds.
        image: [H, W, 3] uint8 RGB.
        intrinsics: [3, 3] float64 pinhole matrix for this image's resolution (pixels).
        ego_from_camera: the camera's mounting; camera frame x right, y down, z forward.
        global_from_ego: the ego pose at ``timestamp_us``.
    """

    channel: str
    timestamp_us: int
    image: np.ndarray
    intrinsics: np.ndarray
    ego_from_camera: geometry.RigidTransform
    global_from_ego: geometry.RigidTransform

    def __post_init__(self) -> None:
        if self.channel not in CAMERA_CHANNELS:
            raise ValueError(f"CameraImage.channel: {self.channel!r} is not one of {CAMERA_CHANNELS}")
        object.__setattr__(self, "image", _frozen_array("CameraImage.image", self.image, (None, None, 3), np.uint8))
        object.__setattr__(
            self, "intrinsics", _frozen_array("CameraImage.intrinsics", self.intrinsics, (3, 3), np.float64)
        )


@dataclass(frozen=True)
class Box3D:
    """A 3D box around an agent or object: an annotation, a detection or the simulator's truth.

    Attributes:
        center_m: [3] float64 — box centre x, y, z (m) in the frame named by the holder.
        size_wlh_m: [3] float64 — width, length, height (m), the nuScenes order.
        yaw_rad: heading of the box's length axis about +z (rad).
        velocity_mps: [2] float64 — vx, vy (m/s) in the same frame; NaN where unknown.
        category: nuScenes category name, e.g. ``vehicle.car``.
        instance_id: the track's identifier (an instance token for nuScenes data).
    """

    center_m: np.ndarray
    size_wlh_m: np.ndarray
    yaw_rad: float
    velocity_mps: np.ndarray = field(default_factory=lambda: np.full(2, np.nan))
    category: str = ""
    instance_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_m", _frozen_array("Box3D.center_m", self.center_m, (3,), np.float64))
        object.__setattr__(self, "size_wlh_m", _frozen_array("Box3D.size_wlh_m", self.size_wlh_m, (3,), np.float64))
        object.__setattr__(
            self, "velocity_mps", _frozen_array("Box3D.velocity_mps", self.velocity_mps, (2,), np.float64)
        )
        if not np.all(self.size_wlh_m > 0):
            raise ValueError(f"Box3D.size_wlh_m: every size must be positive, got {self.size_wlh_m.tolist()}")
        object.__setattr__(self, "yaw_rad", float(self.yaw_rad))

    @property
    def quaternion(self) -> np.ndarray:
        """[4] float64 nuScenes ``rotation`` (w, x, y, z) of the box."""
        return geometry.yaw_to_quaternion(self.yaw_rad)

    @property
    def frame_from_box(self) -> geometry.RigidTransform:
        """The box frame (origin at its centre, x along its length) in the holder's frame."""
        return geometry.RigidTransform.from_pose_2d(*self.center_m[:2], self.yaw_rad, z_m=self.center_m[2])

    def transformed(self, dst_from_src: geometry.RigidTransform) -> Box3D:
        """The same box expressed in another frame (yaw taken about the new +z; velocity rotated)."""
        center_m, yaw_rad = self.transformed_pose(dst_from_src)
        velocity = dst_from_src.apply_vectors(np.array([*self.velocity_mps, 0.0]))[:2]
        return Box3D(center_m, self.size_wlh_m, yaw_rad, velocity, self.category, self.instance_id)

    def transformed_pose(self, dst_from_src: geometry.RigidTransform) -> tuple[np.ndarray, float]:
        """The centre [3] float64 (m) and yaw (rad) of ``transformed(dst_from_src)``, without building the box.

        ``dst_from_box = dst_from_src @ frame_from_box`` written out (``RigidTransform.__matmul__``'s arithmetic, so
        the same bits), without checking the composed rotation again: a window moves every box of F + 1 keyframes
        into its t0 frame and rasterizes only their centres and yaws.
        """
        box = self.frame_from_box
        rotation = dst_from_src.rotation @ box.rotation  # [3, 3] dst_from_box
        translation = dst_from_src.rotation @ box.translation + dst_from_src.translation  # [3]
        return translation, float(np.arctan2(rotation[1, 0], rotation[0, 0]))

    def corners(self) -> np.ndarray:
        """[8, 3] float64 corners (m) in the devkit's ``Box.corners`` order: the four at the front first."""
        w, length, h = self.size_wlh_m
        signs = np.array(
            [
                [1, 1, 1],
                [1, -1, 1],
                [1, -1, -1],
                [1, 1, -1],
                [-1, 1, 1],
                [-1, -1, 1],
                [-1, -1, -1],
                [-1, 1, -1],
            ],
            dtype=np.float64,
        )
        return self.frame_from_box.apply(signs * np.array([length, w, h]) / 2)

    def footprint(self) -> np.ndarray:
        """[4, 2] float64 xy corners (m) seen from above, counter-clockwise from front-left."""
        return self.corners()[[3, 7, 6, 2], :2]

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which points lie inside the box, faces included (the devkit's ``points_in_box`` rule).

        Args:
            points: [N, 3] float — x, y, z (m) in the holder's frame.

        Returns:
            [N] bool.
        """
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] < 3:
            raise ValueError(f"points: expected shape [N, 3], got {list(points.shape)}")
        local = self.frame_from_box.inverse().apply(points[:, :3])  # [N, 3] in the box frame
        half = np.array([self.size_wlh_m[1], self.size_wlh_m[0], self.size_wlh_m[2]]) / 2
        return np.all(np.abs(local) <= half, axis=1)
