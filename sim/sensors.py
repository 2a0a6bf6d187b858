"""Sensor rendering of the synthetic world: a 32-beam spinning LiDAR and the six nuScenes cameras, ray cast.

The world is triangles: a ground quad at z = 0, one box per layout structure (buildings, walls, poles) and, per
frame, the agents. Rays are cast with open3d's ``RaycastingScene`` (Embree). Sensors sit where nuScenes mounts
them (the real ``calibrated_sensor`` records of the LIDAR_TOP and the six cameras), so every output is a
``types.LidarSweep`` or ``types.CameraImage`` that downstream code reads exactly as it reads nuScenes.

Agents are drawn strictly inside their annotation boxes: ``AGENT_INSET_M`` in from each side face and the top,
and ``AGENT_INSET_M`` up from the bottom, so that a LiDAR return on an agent lies inside its ``Box3D`` and
never on a face (the range noise is bounded accordingly).

Scene strategy (``bench.scene_strategies``: ``intersection`` layout, 20 cars, LiDAR rays, 2 CPU cores): a fresh
``RaycastingScene`` per frame holding the static world and the agents (~1.6 k triangles, one ``add_triangles``)
took 3.3-3.5 ms a sweep; a static scene built once plus a per-frame agent scene, both cast and the nearer hit
kept, took 0-2% longer (a tie within noise, before even merging the normals). The BVH builds in ~0.4 ms and the
second cast costs about as much. The fresh scene is kept: as fast, one cast, one triangle table.

Notation:
    N  rays or returns
    A  agents
    B  boxes (mesh parts)
    C  cameras
    H, W  image rows and columns (pixels)
    P  visibility sample points per agent
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import open3d as o3d

from bevjepa.datasets import geometry, types
from bevjepa.sim import layouts, materials

AGENT_INSET_M = 0.03
"""How far an agent's mesh stays inside its box: from each side face, from the top and from the bottom (m)."""

NOISE_TRUNCATION_SIGMA = 2.5
"""Range noise is a Gaussian truncated (clipped) at this many standard deviations."""

_AGENT_NOISE_LIMIT_M = 0.025
"""On agents the range noise is also clipped to this (m), so that a return stays 5 mm inside its box."""

GROUND_MARGIN_M = 10.0
"""The ground quad reaches this far beyond the layout square on every side (m)."""

REFERENCE_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
"""How close the fast LiDAR paths keep to their references (``_lidar_sweep_reference``, open3d's ray product): equal
bits where NumPy runs AVX-512 kernels, a few float32 ulps apart on AVX2, where it picks other kernels per array
shape; never a different point, ring or count."""

SUN_DIRECTION = np.array([0.35, -0.25, 0.90]) / np.linalg.norm([0.35, -0.25, 0.90])
"""[3] unit vector towards the sun (global frame), fixed."""

AMBIENT = 0.45
"""Lambertian shading: colour * (AMBIENT + (1 - AMBIENT) * max(0, n . sun))."""

SKY_HORIZON_RGB = np.array([205.0, 225.0, 245.0], dtype=np.float32)
SKY_ZENITH_RGB = np.array([115.0, 165.0, 235.0], dtype=np.float32)
"""The sky blends from the horizon to the zenith colour as a ray climbs from 0 to 30 degrees elevation."""

_PALETTE_RGB = np.concatenate([materials.MATERIAL_RGB, materials.SURFACE_RGB])
"""[len(Material) + len(Surface), 3] base colours: materials first, then ground surfaces."""

_COLOUR_OFFSET = np.concatenate([np.zeros_like(_PALETTE_RGB), SKY_HORIZON_RGB[None]]).T.copy()
_COLOUR_SCALE = np.concatenate([_PALETTE_RGB, (SKY_ZENITH_RGB - SKY_HORIZON_RGB)[None]]).T.copy()
"""[3, len(_PALETTE_RGB) + 1] a pixel's colour is offset + scale * blend, per palette row; the last row is sky."""

_VEHICLE_BODY_FRACTION = 0.55
"""A vehicle's lower body fills this share of its box height; the cabin sits on top."""


def nuscenes_lidar_top() -> geometry.RigidTransform:
    """``ego_from_lidar`` of the nuScenes LIDAR_TOP (a Velodyne HDL-32E): x right, y forward, z up."""
    return geometry.RigidTransform.from_quaternion(
        np.array([0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817]),
        np.array([0.943713, 0.0, 1.84023]),
    )


@dataclass(frozen=True)
class CameraCalibration:
    """A nuScenes camera's real placement and intrinsics at the native 1600x900 resolution.

    Attributes:
        ego_from_camera: the mounting; camera frame x right, y down, z forward.
        focal_px: fx = fy at 1600x900 (pixels).
        cx_px, cy_px: principal point at 1600x900 (pixels).
    """

    ego_from_camera: geometry.RigidTransform
    focal_px: float
    cx_px: float
    cy_px: float


NATIVE_WIDTH_PX, NATIVE_HEIGHT_PX = 1600, 900
"""The resolution the nuScenes intrinsics are given at."""


def _calibration(
    translation: list[float], rotation_wxyz: list[float], focal_px: float, cx_px: float, cy_px: float
) -> CameraCalibration:
    # from_quaternion normalises the (rounded) quaternion.
    return CameraCalibration(
        geometry.RigidTransform.from_quaternion(np.array(rotation_wxyz), np.array(translation)), focal_px, cx_px, cy_px
    )


NUSCENES_CAMERAS: dict[str, CameraCalibration] = {
    "CAM_FRONT": _calibration([1.7008, 0.0159, 1.511], [0.4998, -0.50303, 0.49978, -0.49737], 1266.4, 816.3, 491.5),
    "CAM_FRONT_RIGHT": _calibration(
        [1.5508, -0.4934, 1.4957], [0.20603, -0.20269, 0.68245, -0.67136], 1260.8, 808.0, 495.3
    ),
    "CAM_BACK_RIGHT": _calibration(
        [1.0149, -0.4806, 1.5624], [0.12281, -0.1324, -0.70043, 0.6905], 1259.5, 807.3, 501.2
    ),
    "CAM_BACK": _calibration([0.0283, 0.0035, 1.5791], [0.50379, -0.4974, -0.49419, 0.50455], 809.2, 829.2, 481.8),
    "CAM_BACK_LEFT": _calibration(
        [1.0357, 0.4848, 1.591], [0.69242, -0.70316, -0.11648, 0.11203], 1256.7, 792.1, 492.8
    ),
    "CAM_FRONT_LEFT": _calibration(
        [1.5239, 0.4946, 1.5093], [0.67573, -0.67363, 0.21214, -0.21123], 1272.6, 826.6, 479.8
    ),
}
"""The six nuScenes cameras (one real ``calibrated_sensor`` record each), keyed by ``types.CAMERA_CHANNELS``."""


@dataclass(frozen=True)
class LidarConfig:
    """A spinning LiDAR in the nuScenes LIDAR_TOP geometry (Velodyne HDL-32E).

    The sweep is instantaneous: every ray leaves from one sensor pose, with no motion during the 50 ms spin
    (the real sensor's rolling shutter is not modelled). Points are in the sensor frame.

    Attributes:
        beam_count: number of beams (rings); ring 0 is the lowest.
        elevation_min_deg, elevation_max_deg: elevation of the lowest and highest beam (deg), evenly spread.
        azimuth_steps: firings per revolution; 1200 gives 30-35 k returns in a typical street (measured: ~33 k).
        max_range_m: returns beyond this are discarded (m).
        range_noise_std_m: std of the Gaussian range noise (m), truncated at ``NOISE_TRUNCATION_SIGMA``.
        drop_probability: chance that a return is lost at random.
        ego_from_sensor: the mounting; default the real nuScenes LIDAR_TOP calibration.
    """

    beam_count: int = 32
    elevation_min_deg: float = -30.67
    elevation_max_deg: float = 10.67
    azimuth_steps: int = 1200
    max_range_m: float = 70.0
    range_noise_std_m: float = 0.01
    drop_probability: float = 0.03
    ego_from_sensor: geometry.RigidTransform = field(default_factory=nuscenes_lidar_top)

    def __post_init__(self) -> None:
        if self.beam_count < 1 or self.azimuth_steps < 1:
            raise ValueError(
                f"LidarConfig: beam_count ({self.beam_count}) and azimuth_steps ({self.azimuth_steps}) must be positive"
            )
        if not -90.0 < self.elevation_min_deg <= self.elevation_max_deg < 90.0:
            raise ValueError(
                f"LidarConfig: elevations [{self.elevation_min_deg}, {self.elevation_max_deg}] deg "
                "must be ordered and within (-90, 90)"
            )
        if not self.max_range_m > 0:
            raise ValueError(f"LidarConfig.max_range_m must be positive, got {self.max_range_m}")
        if not self.range_noise_std_m >= 0:
            raise ValueError(f"LidarConfig.range_noise_std_m must be >= 0, got {self.range_noise_std_m}")
        if not 0.0 <= self.drop_probability < 1.0:
            raise ValueError(f"LidarConfig.drop_probability must be in [0, 1), got {self.drop_probability}")

    @property
    def ray_count(self) -> int:
        """Rays per sweep: ``beam_count * azimuth_steps``."""
        return self.beam_count * self.azimuth_steps

    def elevations_rad(self) -> np.ndarray:
        """[beam_count] float64 beam elevations (rad), ring 0 first (lowest)."""
        return np.radians(np.linspace(self.elevation_min_deg, self.elevation_max_deg, self.beam_count))

    def ray_directions(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit ray directions in the sensor frame, in firing order (all rings at one azimuth, then the next).

        Returns:
            directions [N, 3] float32 (sensor frame), ring [N] float32 ring index.
        """
        elevation = self.elevations_rad()  # [R]
        azimuth = np.arange(self.azimuth_steps) * (2 * np.pi / self.azimuth_steps)  # [S]
        cos_el = np.cos(elevation)[None, :]
        directions = np.stack(
            [
                cos_el * np.cos(azimuth)[:, None],
                cos_el * np.sin(azimuth)[:, None],
                np.broadcast_to(np.sin(elevation)[None, :], (self.azimuth_steps, self.beam_count)),
            ],
            axis=-1,
        ).reshape(-1, 3)  # [S*R, 3]
        ring = np.tile(np.arange(self.beam_count, dtype=np.float32), self.azimuth_steps)  # [S*R]
        return directions.astype(np.float32), ring


@dataclass(frozen=True)
class CameraConfig:
    """The six nuScenes cameras at a chosen resolution (intrinsics scaled from 1600x900).

    Pixel (row v, column u) shows the ray through ``K^-1 [u + 0.5, v + 0.5, 1]``, so that the devkit's
    ``view_points`` of a point on that ray, floored, gives ``(u, v)``.

    Attributes:
        width_px: image width W (pixels).
        height_px: image height H (pixels).
    """

    width_px: int = 400
    height_px: int = 225

    def __post_init__(self) -> None:
        if self.width_px < 1 or self.height_px < 1:
            raise ValueError(f"CameraConfig: size {self.width_px}x{self.height_px} must be positive")

    def intrinsics(self, channel: str) -> np.ndarray:
        """[3, 3] float64 pinhole matrix of ``channel`` at this resolution (pixels)."""
        calibration = NUSCENES_CAMERAS[channel]
        sx, sy = self.width_px / NATIVE_WIDTH_PX, self.height_px / NATIVE_HEIGHT_PX
        return np.array(
            [
                [calibration.focal_px * sx, 0.0, calibration.cx_px * sx],
                [0.0, calibration.focal_px * sy, calibration.cy_px * sy],
                [0.0, 0.0, 1.0],
            ]
        )

    def ray_directions(self, channel: str) -> np.ndarray:
        """[H, W, 3] float64 unit ray directions (camera frame) of every pixel centre."""
        k_inv = np.linalg.inv(self.intrinsics(channel))
        v, u = np.meshgrid(np.arange(self.height_px) + 0.5, np.arange(self.width_px) + 0.5, indexing="ij")
        pixels = np.stack([u, v, np.ones_like(u)], axis=-1)  # [H, W, 3]
        directions = pixels @ k_inv.T
        return directions / np.linalg.norm(directions, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------ meshes


def _unit_box() -> tuple[np.ndarray, np.ndarray]:
    """Corners [8, 3] (signs, corner i has bits x, y, z = i & 1, i & 2, i & 4) and [12, 3] outward triangles."""
    index = np.arange(8)
    corners = np.stack([(index & 1) > 0, (index & 2) > 0, (index & 4) > 0], axis=-1) * 2.0 - 1.0
    quads = np.array([[0, 1, 3, 2], [4, 5, 7, 6], [0, 1, 5, 4], [2, 3, 7, 6], [0, 2, 6, 4], [1, 3, 7, 5]])
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])  # [12, 3]
    a, b, c = corners[triangles[:, 0]], corners[triangles[:, 1]], corners[triangles[:, 2]]
    inward = np.einsum("ij,ij->i", np.cross(b - a, c - a), a + b + c) < 0
    triangles[inward] = triangles[inward][:, [0, 2, 1]]
    return corners, triangles


_BOX_CORNERS, _BOX_TRIANGLES = _unit_box()


def box_meshes(
    centers_m: np.ndarray, half_extents_m: np.ndarray, yaws_rad: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Triangle meshes of boxes that stand upright, merged into one.

    Args:
        centers_m: [B, 3] float — box centres (m).
        half_extents_m: [B, 3] float — half sizes along the box's own x (length), y (width) and z (m).
        yaws_rad: [B] float — heading of each box's x axis about +z (rad).

    Returns:
        vertices [8B, 3] float32 and triangles [12B, 3] uint32 (outward wound); box b owns triangles
        ``12b .. 12b + 11``.
    """
    centers_m = np.asarray(centers_m, dtype=np.float64).reshape(-1, 3)
    boxes = len(centers_m)
    local = _BOX_CORNERS[None] * np.asarray(half_extents_m, dtype=np.float64).reshape(-1, 1, 3)  # [B, 8, 3]
    cos, sin = np.cos(yaws_rad)[:, None], np.sin(yaws_rad)[:, None]
    vertices = np.empty((boxes, 8, 3), dtype=np.float32)
    vertices[..., 0] = cos * local[..., 0] - sin * local[..., 1] + centers_m[:, None, 0]
    vertices[..., 1] = sin * local[..., 0] + cos * local[..., 1] + centers_m[:, None, 1]
    vertices[..., 2] = local[..., 2] + centers_m[:, None, 2]
    triangles = (_BOX_TRIANGLES[None] + 8 * np.arange(boxes)[:, None, None]).astype(np.uint32)  # [B, 12, 3]
    return vertices.reshape(-1, 3), triangles.reshape(-1, 3)


@dataclass(frozen=True)
class AgentMesh:
    """All agents of one frame as one triangle mesh (global frame).

    Attributes:
        vertices: [V, 3] float32 (m).
        triangles: [T, 3] uint32 vertex indices, outward wound.
        triangle_agent: [T] int32 index of the agent that owns each triangle.
        agent_material: [A] uint8 ``materials.Material`` of each agent.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    triangle_agent: np.ndarray
    agent_material: np.ndarray

    @staticmethod
    def from_boxes(agents: Sequence[types.Box3D]) -> AgentMesh:
        """Meshes strictly inside the boxes: vehicles a lower body and a narrower cabin, others one box."""
        count = len(agents)
        if count == 0:
            return AgentMesh(
                np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32), np.zeros(0, np.int32), np.zeros(0, np.uint8)
            )
        boxes = np.array([(*a.center_m, *a.size_wlh_m, a.yaw_rad) for a in agents])  # [A, 7]
        center, size_wlh, yaw = boxes[:, :3], boxes[:, 3:6], boxes[:, 6]
        material = np.array([materials.material_of_category(a.category) for a in agents], dtype=np.uint8)
        if np.any(size_wlh < 4 * AGENT_INSET_M):
            raise ValueError(f"AgentMesh: every box size must be at least {4 * AGENT_INSET_M} m to hold its mesh")
        half_length = size_wlh[:, 1] / 2 - AGENT_INSET_M  # [A]
        half_width = size_wlh[:, 0] / 2 - AGENT_INSET_M
        bottom = center[:, 2] - size_wlh[:, 2] / 2 + AGENT_INSET_M
        top = center[:, 2] + size_wlh[:, 2] / 2 - AGENT_INSET_M
        is_vehicle = material == materials.Material.VEHICLE
        split = np.where(is_vehicle, center[:, 2] - size_wlh[:, 2] / 2 + _VEHICLE_BODY_FRACTION * size_wlh[:, 2], top)
        # Part 1 of every agent: the inset box (its lower body for vehicles), centred on the box axis.
        body_center = np.stack([center[:, 0], center[:, 1], (bottom + split) / 2], axis=-1)
        body_half = np.stack([half_length, half_width, (split - bottom) / 2], axis=-1)
        # Part 2 of vehicles: a cabin 60% as long (set back by 10% of the length) and 85% as wide, up to the top.
        vehicle = np.flatnonzero(is_vehicle)
        offset = -0.1 * half_length[vehicle]
        cabin_center = np.stack(
            [
                center[vehicle, 0] + offset * np.cos(yaw[vehicle]),
                center[vehicle, 1] + offset * np.sin(yaw[vehicle]),
                (split[vehicle] + top[vehicle]) / 2,
            ],
            axis=-1,
        )
        cabin_half = np.stack(
            [0.6 * half_length[vehicle], 0.85 * half_width[vehicle], (top[vehicle] - split[vehicle]) / 2], axis=-1
        )
        part_agent = np.concatenate([np.arange(count), vehicle]).astype(np.int32)  # [B]
        vertices, triangles = box_meshes(
            np.concatenate([body_center, cabin_center]), np.concatenate([body_half, cabin_half]), yaw[part_agent]
        )
        return AgentMesh(vertices, triangles, np.repeat(part_agent, len(_BOX_TRIANGLES)), material)


def _static_mesh(layout: layouts.RoadLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The static world: the ground quad and every structure as a box.

    Returns:
        vertices [V, 3] float32 (m, global), triangles [T, 3] uint32 and material [T] uint8 per triangle; the
        ground's two triangles come first.
    """
    lo, hi = -GROUND_MARGIN_M, layout.extent_m + GROUND_MARGIN_M
    ground_vertices = np.array([[lo, lo, 0.0], [hi, lo, 0.0], [hi, hi, 0.0], [lo, hi, 0.0]], dtype=np.float32)
    ground_triangles = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.uint32)  # counter-clockwise from above: +z
    if layout.structures:
        centers = np.stack([s.center_m for s in layout.structures])
        size_wlh = np.stack([s.size_wlh_m for s in layout.structures])
        yaws = np.array([s.yaw_rad for s in layout.structures])
        box_vertices, box_triangles = box_meshes(centers, size_wlh[:, [1, 0, 2]] / 2, yaws)
        box_material = np.repeat(np.array([s.material for s in layout.structures], dtype=np.uint8), len(_BOX_TRIANGLES))
    else:
        box_vertices, box_triangles = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32)
        box_material = np.zeros(0, np.uint8)
    vertices = np.concatenate([ground_vertices, box_vertices])
    triangles = np.concatenate([ground_triangles, box_triangles + np.uint32(len(ground_vertices))])
    material = np.concatenate([np.full(2, materials.Material.GROUND, dtype=np.uint8), box_material])
    return vertices, triangles, material


def _ego_rays(ego_from_sensors: list[geometry.RigidTransform], directions: np.ndarray) -> o3d.core.Tensor:
    """Rays of S sensors in the ego frame, homogeneous for ``_global_rays``.

    Args:
        ego_from_sensors: the S sensors' mountings.
        directions: [S, R, 3] float — unit ray directions in each sensor's frame.

    Returns:
        [S*R, 7] float32 open3d tensor: origin (m, ego), unit direction (ego), 1.
    """
    sensors, count, _ = directions.shape
    rays = np.ones((sensors, count, 7))
    for s, ego_from_sensor in enumerate(ego_from_sensors):
        rays[s, :, :3] = ego_from_sensor.translation
        rays[s, :, 3:6] = ego_from_sensor.apply_vectors(directions[s])
    return o3d.core.Tensor(rays.reshape(-1, 7).astype(np.float32))


def _ray_transform(global_from_ego: geometry.RigidTransform) -> np.ndarray:
    """[7, 6] float32 ``[[R^T, 0], [0, R^T], [t, 0]]``: ``[o, d, 1] @`` it moves an ego ray into the global frame."""
    transform = np.zeros((7, 6), dtype=np.float32)
    transform[:3, :3] = transform[3:6, 3:] = global_from_ego.rotation.T
    transform[6, :3] = global_from_ego.translation
    return transform


def _global_rays(rays_ego: o3d.core.Tensor, global_from_ego: geometry.RigidTransform) -> o3d.core.Tensor:
    """[N, 6] float32 rays (origin, unit direction) in the global frame, from ``_ego_rays`` output [N, 7].

    One open3d product ``[o, d, 1] @ _ray_transform(global_from_ego)``. It sums the seven float32 terms of each
    output in order, from +0, rounding each product and each sum (no fused multiply-add): ``_one_origin_rays``
    reproduces it bit for bit where NumPy runs AVX-512 kernels, and to a few float32 ulps on AVX2.
    """
    return rays_ego @ o3d.core.Tensor(_ray_transform(global_from_ego))


def _one_origin_rays(
    origin_ego: np.ndarray, directions_ego: np.ndarray, global_from_ego: geometry.RigidTransform
) -> tuple[np.ndarray, np.ndarray]:
    """Rays that all leave from one point, moved into the global frame as ``_global_rays`` moves them.

    ``_global_rays`` rounds ``((0 + a0 b0) + a1 b1) + ...`` term by term; the terms whose factor is zero only ever
    add a signed zero, which changes nothing but the sign of a zero sum, and open3d's sum starts from +0, so a
    zero comes out +0 (the ``+ 0`` below). Here the same float32 operations run column by column on contiguous
    arrays, and the origin once: measured 2-2.5x faster than open3d's product for the LiDAR's 38,400 rays. (numpy's
    ``@`` is faster than open3d's too, but its BLAS rounds differently: last-bit differences for most poses.)

    Args:
        origin_ego: [3] float32 — the rays' common origin (m, ego), as in ``_ego_rays`` output.
        directions_ego: [3, N] float32 — unit directions (ego), one row per axis.
        global_from_ego: the ego pose.

    Returns:
        rays [N, 6] float32 (origin, unit direction; global), equal to ``_global_rays``'s, and their directions
        [3, N] float32 (global), one contiguous row per axis.
    """
    _, count = directions_ego.shape
    transform = _ray_transform(global_from_ego)  # [7, 6]
    origin = np.zeros(3, dtype=np.float32)
    for k in range(3):
        origin = origin + origin_ego[k] * transform[k, :3]
    origin = origin + transform[6, :3]  # [3] global
    directions = np.empty((3, count), dtype=np.float32)
    term = np.empty(count, dtype=np.float32)
    for j in range(3):  # global axis
        row = directions[j]
        np.multiply(directions_ego[0], transform[3, 3 + j], out=row)
        for k in (1, 2):
            row += np.multiply(directions_ego[k], transform[3 + k, 3 + j], out=term)
        row += np.float32(0.0)  # -0 becomes +0, as in open3d's sum from +0
    rays = np.empty((count, 6), dtype=np.float32)  # [N, 6]
    for j in range(3):  # column by column: several times faster than broadcasting [3] or [3, N].T into [N, 3]
        rays[:, j] = origin[j]
        rays[:, 3 + j] = directions[j]
    return rays, directions


@dataclass(frozen=True)
class _Scene:
    """One frame's world in an open3d scene, with per-triangle lookup tables.

    Triangle ``T`` of the tables (one past the last) stands for a miss: cast results clip their primitive id
    onto it. Triangles 0 and 1 are the ground.

    Attributes:
        scene: the open3d scene (global frame); its BVH is built on the first cast.
        triangle_material: [T + 1] uint8 ``Material`` (GROUND for a miss).
        triangle_agent: [T + 1] int32 agent index, -1 for the static world and a miss.
        triangle_reflectivity: [T + 1] float32 LiDAR reflectivity (0 for the ground: see the surface raster).
    """

    scene: o3d.t.geometry.RaycastingScene
    triangle_material: np.ndarray
    triangle_agent: np.ndarray
    triangle_reflectivity: np.ndarray


@dataclass(frozen=True)
class _Hits:
    """First hits of N rays.

    Attributes:
        t_hit: [N] float32 distance along the ray (m, for unit directions); inf on a miss.
        triangle: [N] int64 index into the ``_Scene`` tables (T on a miss).
        normal: [N, 3] float32 unit normal of the hit triangle, as wound (global); zero on a miss.
    """

    t_hit: np.ndarray
    triangle: np.ndarray
    normal: np.ndarray


# ---------------------------------------------------------------------------------------------- renderer

_VISIBILITY_PATTERN = np.concatenate(
    [
        0.9 * _BOX_CORNERS,  # the 8 inset corners pulled 10% towards the centre
        np.zeros((1, 3)),  # the centre
        0.9 * np.concatenate([np.eye(3), -np.eye(3)]),  # the 6 face centres, pulled in alike
    ]
)
"""[P, 3] sample points of an agent as fractions of its inset half extents (box frame: length, width, up)."""


class SensorRenderer:
    """Renders LiDAR sweeps, camera images and agent visibility of a road layout with agents in it.

    The static world (ground and structures) is meshed once; each call adds the given agents to a fresh
    ``RaycastingScene`` and casts. Everything is cast in the global frame, where the ground and the boxes are
    axis-aligned and their bounding volumes tight (the same scene moved into the slightly tilted LiDAR frame
    casts about 25% slower).

    Args:
        layout: the road layout (global frame).
        lidar: the LiDAR; default ``LidarConfig()``.
        cameras: the cameras; default ``CameraConfig()``.
    """

    def __init__(
        self, layout: layouts.RoadLayout, lidar: LidarConfig | None = None, cameras: CameraConfig | None = None
    ) -> None:
        self.layout = layout
        self.lidar = LidarConfig() if lidar is None else lidar
        self.cameras = CameraConfig() if cameras is None else cameras
        self._static_vertices, self._static_triangles, self._static_material = _static_mesh(layout)
        self._static_reflectivity = np.where(
            self._static_material == materials.Material.GROUND,
            0.0,
            materials.MATERIAL_REFLECTIVITY[self._static_material],
        ).astype(np.float32)
        # The surface raster padded with OFFROAD beyond the ground quad, flat: lookups need no masks.
        self._surface_pad = int(np.ceil(GROUND_MARGIN_M / layout.surface.resolution_m)) + 1
        padded = np.pad(layout.surface.classes, self._surface_pad, constant_values=materials.Surface.OFFROAD)
        self._padded_surface_shape = padded.shape
        self._padded_surface = padded.ravel()  # [(R + 2 pad) * (C + 2 pad)] uint8
        # [2, 1] float64 the padded raster's last column and row
        self._padded_surface_last = np.array([[padded.shape[1] - 1], [padded.shape[0] - 1]], dtype=np.float64)
        directions, self._lidar_ring = self.lidar.ray_directions()  # [N, 3] sensor frame, [N]
        self._lidar_directions_t = np.ascontiguousarray(directions.T)  # [3, N]
        self._lidar_rays_ego = _ego_rays([self.lidar.ego_from_sensor], directions[None])  # [N, 7]
        rays_ego = self._lidar_rays_ego.numpy()
        self._lidar_origin_ego = rays_ego[0, :3].copy()  # [3] float32, shared by every ray
        self._lidar_directions_ego_t = np.ascontiguousarray(rays_ego[:, 3:6].T)  # [3, N] float32
        camera_directions = np.stack([self.cameras.ray_directions(c).reshape(-1, 3) for c in types.CAMERA_CHANNELS])
        self._camera_rays_ego = _ego_rays(
            [NUSCENES_CAMERAS[c].ego_from_camera for c in types.CAMERA_CHANNELS], camera_directions
        )  # [C*H*W, 7]
        self._intrinsics = np.stack([self.cameras.intrinsics(c) for c in types.CAMERA_CHANNELS])  # [C, 3, 3]

    # ---------------------------------------------------------------------------------------- casting

    def lidar_rays(self, global_from_ego: geometry.RigidTransform) -> o3d.core.Tensor:
        """[N, 6] float32 LiDAR rays (origin, unit direction; global), in firing order, as ``lidar_sweep`` casts."""
        rays, _ = _one_origin_rays(self._lidar_origin_ego, self._lidar_directions_ego_t, global_from_ego)
        return o3d.core.Tensor.from_numpy(rays)

    def camera_rays(self, global_from_ego: geometry.RigidTransform) -> o3d.core.Tensor:
        """[C*H*W, 6] float32 pixel rays (global), camera by camera, row-major, as ``camera_images`` casts."""
        return _global_rays(self._camera_rays_ego, global_from_ego)

    def raycasting_scene(self, agents: Sequence[types.Box3D]) -> o3d.t.geometry.RaycastingScene:
        """The open3d scene (global frame) of the static world plus ``agents``, as every method casts into."""
        return self._scene(AgentMesh.from_boxes(agents)).scene

    def _scene(self, mesh: AgentMesh) -> _Scene:
        """Static world and agents merged into one ``add_triangles`` of a fresh scene.

        A fresh scene per frame was measured faster than a static scene built once plus an agent scene cast
        separately, keeping the nearer hit (see the module docstring).
        """
        vertices = np.concatenate([self._static_vertices, mesh.vertices])  # [V, 3] float32 global
        triangles = np.concatenate([self._static_triangles, mesh.triangles + np.uint32(len(self._static_vertices))])
        material = np.concatenate(
            [self._static_material, mesh.agent_material[mesh.triangle_agent], [materials.Material.GROUND]]
        ).astype(np.uint8)  # [T + 1]
        agent = np.concatenate([np.full(len(self._static_material), -1, np.int32), mesh.triangle_agent, [-1]]).astype(
            np.int32
        )
        reflectivity = np.concatenate(
            [self._static_reflectivity, materials.MATERIAL_REFLECTIVITY[material[len(self._static_material) :]]]
        )
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor.from_numpy(vertices), o3d.core.Tensor.from_numpy(triangles))
        return _Scene(scene, material, agent, reflectivity.astype(np.float32))

    @staticmethod
    def _cast(scene: _Scene, rays: o3d.core.Tensor) -> _Hits:
        """First hits of rays [N, 6] float32 (origin, unit direction; global) in ``scene``."""
        result = scene.scene.cast_rays(rays)
        miss = np.uint32(len(scene.triangle_agent) - 1)
        triangle = np.minimum(result["primitive_ids"].numpy(), miss)  # [N]; INVALID_ID on a miss
        return _Hits(result["t_hit"].numpy(), triangle, result["primitive_normals"].numpy())

    def surface_classes(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """The layout's ``Surface`` under points: the cells of ``SurfaceRaster.lookup``, without its masks.

        Args:
            x_m: [M] float — finite global x (m).
            y_m: [M] float — finite global y (m).

        Returns:
            [M] uint8 ``Surface`` (OFFROAD outside the raster).
        """
        return self._padded_surface[self._surface_cells(np.stack([x_m, y_m]))]

    def _surface_cells(self, xy_m: np.ndarray) -> np.ndarray:
        """[M] intp flat indices into the OFFROAD-padded raster of the cells under points xy_m [2, M] (m, global).

        The cells of ``SurfaceRaster.lookup`` (floor of the float64 quotient), shifted by the padding and clipped
        onto the padded raster; both axes at once, in place.
        """
        rows_count, _ = self.layout.surface.classes.shape
        resolution, pad = self.layout.surface.resolution_m, self._surface_pad
        col_row = np.divide(xy_m, resolution, dtype=np.float64)  # [2, M]
        np.subtract(rows_count, col_row[1], out=col_row[1])  # rows count from the top (+y)
        np.floor(col_row, out=col_row)
        col_row += pad
        np.minimum(np.maximum(col_row, 0, out=col_row), self._padded_surface_last, out=col_row)
        cell = col_row[1] * self._padded_surface_shape[1]  # [M] float64, exact
        cell += col_row[0]
        return cell.astype(np.intp)

    # ------------------------------------------------------------------------------------------ LiDAR

    def lidar_sweep(
        self,
        agents: Sequence[types.Box3D],
        global_from_ego: geometry.RigidTransform,
        timestamp_us: int,
        rng: np.random.Generator,
    ) -> tuple[types.LidarSweep, np.ndarray]:
        """One instantaneous LiDAR sweep (every ray from one pose: no motion during the 50 ms spin).

        The same points (bit for bit on AVX-512, a few float32 ulps apart on AVX2) and the same draws from ``rng``
        as ``_lidar_sweep_reference``, faster: the rays by ``_one_origin_rays``; every step after the cast on whole
        per-ray columns ([N] arrays straight from the cast), the returns picked out once at the end instead of a
        dozen gathers through index lists; both axes of the ground's surface lookup at once; the points handed to
        the sweep without a copy.

        Args:
            agents: the agents' boxes (global frame).
            global_from_ego: the ego pose.
            timestamp_us: the sweep's time (µs).
            rng: draws the random drops and the range noise (nothing else is random).

        Returns:
            The sweep (points [M, 5] float32 in the sensor frame: x, y, z (m), intensity 0-255, ring 0-31), and
            [M] int32 the index into ``agents`` of the agent each point lies on, -1 for the static world.
        """
        config = self.lidar
        rays, directions = _one_origin_rays(self._lidar_origin_ego, self._lidar_directions_ego_t, global_from_ego)
        count = len(rays)  # N rays; rays [N, 6] float32 global, directions [3, N] float32 global
        scene = self._scene(AgentMesh.from_boxes(agents))
        result = scene.scene.cast_rays(o3d.core.Tensor.from_numpy(rays))
        t_hit = result["t_hit"].numpy()  # [N] float32 (m); inf on a miss
        # [N] uint32; INVALID_ID on a miss, which take(mode="clip") maps onto the tables' miss entry
        triangle = result["primitive_ids"].numpy()
        normal = result["primitive_normals"].numpy()  # [N, 3] float32 global; zero on a miss

        # Random drops, then Gaussian range noise truncated (tighter on agents: returns stay in their boxes);
        # the draws are the reference's: one uniform per ray in range, one normal per surviving ray, in ray order.
        valid = t_hit <= config.max_range_m  # [N]
        survived = np.zeros(count, dtype=bool)  # [N]
        survived[valid] = rng.random(np.count_nonzero(valid), dtype=np.float32) >= config.drop_probability
        noise = rng.standard_normal(np.count_nonzero(survived), dtype=np.float32)  # [S] surviving rays, in order
        np.clip(noise, -NOISE_TRUNCATION_SIGMA, NOISE_TRUNCATION_SIGMA, out=noise)
        noise *= np.float32(config.range_noise_std_m)  # (m)
        if NOISE_TRUNCATION_SIGMA * config.range_noise_std_m > _AGENT_NOISE_LIMIT_M:
            on_agent = scene.triangle_agent.take(triangle[survived], mode="clip") >= 0
            noise = np.where(on_agent, np.clip(noise, -_AGENT_NOISE_LIMIT_M, _AGENT_NOISE_LIMIT_M), noise)
        range_noise = np.zeros(count, dtype=np.float32)  # [N] (m)
        range_noise[survived] = noise
        range_m = t_hit + range_noise  # [N] float32 (m); inf on a miss
        kept = survived & (range_m > 0) & (range_m <= config.max_range_m)  # [N]

        # Every quantity per ray, on whole columns, the kept rows picked out at the end; rays not kept may hold
        # inf or NaN (a miss), hence the errstate. Column by column: strided 1-D products are several times
        # faster than [N, 3] ones here.
        per_ray = np.empty((count, 5), dtype=np.float32)  # [N, 5]: x, y, z, intensity, ring
        with np.errstate(invalid="ignore"):
            for axis in range(3):  # x, y, z in the sensor frame
                np.multiply(self._lidar_directions_t[axis], range_m, out=per_ray[:, axis])
            # The ground's reflectivity is its surface's, under the noiseless hit.
            on_ground = kept & (triangle < 2)  # [N] the ground quad's two triangles
            ground_xy = np.compress(on_ground, rays[0, :2, None] + t_hit * directions[:2], axis=1)  # [2, G] (m)
        surface = self._padded_surface.take(self._surface_cells(ground_xy))  # [G] Surface
        reflectivity = scene.triangle_reflectivity.take(triangle, mode="clip")  # [N] float32
        reflectivity[on_ground] = materials.SURFACE_REFLECTIVITY.take(surface)
        cos_incidence = normal[:, 0] * directions[0]
        cos_incidence += normal[:, 1] * directions[1]
        cos_incidence += normal[:, 2] * directions[2]
        reflectivity *= np.abs(cos_incidence, out=cos_incidence)
        reflectivity *= np.float32(255.0)
        np.clip(reflectivity, 0.0, 255.0, out=per_ray[:, 3])
        per_ray[:, 4] = self._lidar_ring

        points = np.compress(kept, per_ray, axis=0)  # [M, 5] in ray order
        points.setflags(write=False)  # read-only and owning its memory: the sweep keeps it without a copy
        sweep = types.LidarSweep(timestamp_us, points, config.ego_from_sensor, global_from_ego)
        return sweep, scene.triangle_agent.take(triangle[kept], mode="clip")

    def _lidar_sweep_reference(
        self,
        agents: Sequence[types.Box3D],
        global_from_ego: geometry.RigidTransform,
        timestamp_us: int,
        rng: np.random.Generator,
    ) -> tuple[types.LidarSweep, np.ndarray]:
        """``lidar_sweep`` as first written: rays by open3d's product, returns gathered through index lists.

        Kept as the reference that ``lidar_sweep`` must equal to float32 rounding (tests) and as the baseline of
        ``bench.lidar_throughput``; same arguments and results as ``lidar_sweep``.
        """
        config = self.lidar
        rays_tensor = _global_rays(self._lidar_rays_ego, global_from_ego)
        rays = rays_tensor.numpy()  # [N, 6] float32 global, shared memory
        sensor_x, sensor_y = rays[0, :2]  # every ray leaves from the sensor
        scene = self._scene(AgentMesh.from_boxes(agents))
        hits = self._cast(scene, rays_tensor)

        # Random drops, then Gaussian range noise truncated (tighter on agents: returns stay in their boxes).
        valid = np.flatnonzero(hits.t_hit <= config.max_range_m)  # [M] ray indices; a miss is inf
        valid = valid[rng.random(len(valid), dtype=np.float32) >= config.drop_probability]
        noise = np.clip(
            rng.standard_normal(len(valid), dtype=np.float32), -NOISE_TRUNCATION_SIGMA, NOISE_TRUNCATION_SIGMA
        ) * np.float32(config.range_noise_std_m)
        if NOISE_TRUNCATION_SIGMA * config.range_noise_std_m > _AGENT_NOISE_LIMIT_M:
            on_agent = scene.triangle_agent[hits.triangle[valid]] >= 0
            noise = np.where(on_agent, np.clip(noise, -_AGENT_NOISE_LIMIT_M, _AGENT_NOISE_LIMIT_M), noise)
        t_hit = hits.t_hit[valid]  # [M] float32 noiseless range (m)
        range_m = t_hit + noise
        keep = (range_m > 0) & (range_m <= config.max_range_m)
        kept, t_hit, range_m = valid[keep], t_hit[keep], range_m[keep]

        # Column by column: strided 1-D products and gathers are several times faster than [M, 3] ones here.
        normal = hits.normal  # [N, 3] global; zero on a miss
        cos_incidence = np.abs(normal[:, 0] * rays[:, 3] + normal[:, 1] * rays[:, 4] + normal[:, 2] * rays[:, 5])
        triangle = hits.triangle[kept]  # [M]
        reflectivity = scene.triangle_reflectivity[triangle]  # [M]
        ground = np.flatnonzero(triangle < 2)  # [G] the ground quad's two triangles
        ground_ray, ground_t = kept[ground], t_hit[ground]  # noiseless hits
        ground_x = sensor_x + ground_t * rays[ground_ray, 3]
        ground_y = sensor_y + ground_t * rays[ground_ray, 4]
        reflectivity[ground] = materials.SURFACE_REFLECTIVITY[self.surface_classes(ground_x, ground_y)]

        points = np.empty((len(kept), 5), dtype=np.float32)  # [M, 5]
        for axis in range(3):  # x, y, z in the sensor frame
            points[:, axis] = np.take(self._lidar_directions_t[axis], kept) * range_m
        points[:, 3] = np.clip(reflectivity * cos_incidence[kept] * np.float32(255.0), 0.0, 255.0)
        points[:, 4] = self._lidar_ring[kept]
        sweep = types.LidarSweep(timestamp_us, points, config.ego_from_sensor, global_from_ego)
        return sweep, scene.triangle_agent[triangle]

    # ---------------------------------------------------------------------------------------- cameras

    def global_from_cameras(self, global_from_ego: geometry.RigidTransform) -> list[geometry.RigidTransform]:
        """``global_from_camera`` of the six cameras, in ``types.CAMERA_CHANNELS`` order."""
        return [global_from_ego @ NUSCENES_CAMERAS[c].ego_from_camera for c in types.CAMERA_CHANNELS]

    def camera_images(
        self, agents: Sequence[types.Box3D], global_from_ego: geometry.RigidTransform, timestamp_us: int
    ) -> tuple[list[types.CameraImage], list[np.ndarray]]:
        """The six camera images, shaded deterministically, and which agent each pixel shows.

        Args:
            agents: the agents' boxes (global frame).
            global_from_ego: the ego pose.
            timestamp_us: the images' time (µs).

        Returns:
            Six ``CameraImage`` ([H, W, 3] uint8 RGB) in ``types.CAMERA_CHANNELS`` order, and six [H, W] int32
            images of the index into ``agents`` seen at each pixel (-1 where no agent).
        """
        count, height, width = len(types.CAMERA_CHANNELS), self.cameras.height_px, self.cameras.width_px
        rays_tensor = self.camera_rays(global_from_ego)
        rays = rays_tensor.numpy()  # [C*H*W, 6] float32 global, shared memory
        scene = self._scene(AgentMesh.from_boxes(agents))
        hits = self._cast(scene, rays_tensor)

        # Every pixel's colour is a + b * s with (a, b) from a palette row: (0, base colour) and s the Lambertian
        # shade for a hit, (horizon, zenith - horizon) and s the sky blend for a miss (the last row).
        palette_index = scene.triangle_material[hits.triangle].astype(np.intp)  # [C*H*W]
        ground = np.flatnonzero(hits.triangle < 2)
        ground_t = hits.t_hit[ground]
        ground_x = rays[ground, 0] + ground_t * rays[ground, 3]
        ground_y = rays[ground, 1] + ground_t * rays[ground, 4]
        palette_index[ground] = len(materials.MATERIAL_RGB) + self.surface_classes(ground_x, ground_y)
        miss = ~np.isfinite(hits.t_hit)
        palette_index[miss] = len(_PALETTE_RGB)
        normal = hits.normal  # [C*H*W, 3]; zero on a miss
        facing = np.sign(normal[:, 0] * rays[:, 3] + normal[:, 1] * rays[:, 4] + normal[:, 2] * rays[:, 5])
        sun = SUN_DIRECTION.astype(np.float32)
        # A normal faces the camera whatever its winding: flip it against the ray before lighting.
        sunlit = np.maximum(-facing * (normal[:, 0] * sun[0] + normal[:, 1] * sun[1] + normal[:, 2] * sun[2]), 0.0)
        blend = np.float32(AMBIENT) + np.float32(1 - AMBIENT) * sunlit  # [C*H*W]
        blend[miss] = np.clip(rays[miss, 5] / np.float32(np.sin(np.radians(30.0))), 0.0, 1.0)
        rgb = np.empty((len(rays), 3), dtype=np.uint8)  # [C*H*W, 3]
        for k in range(3):  # channel by channel: long 1-D loops
            value = _COLOUR_OFFSET[k].take(palette_index) + _COLOUR_SCALE[k].take(palette_index) * blend
            rgb[:, k] = np.rint(np.clip(value, 0, 255, out=value), out=value)
        rgb = rgb.reshape(count, height, width, 3)
        agent_images = scene.triangle_agent[hits.triangle].reshape(count, height, width)

        images = [
            types.CameraImage(
                channel,
                timestamp_us,
                rgb[c],
                self._intrinsics[c],
                NUSCENES_CAMERAS[channel].ego_from_camera,
                global_from_ego,
            )
            for c, channel in enumerate(types.CAMERA_CHANNELS)
        ]
        return images, [agent_images[c] for c in range(count)]

    # ------------------------------------------------------------------------------------- visibility

    def visible_fraction(self, agents: Sequence[types.Box3D], global_from_ego: geometry.RigidTransform) -> np.ndarray:
        """How much of each agent some camera sees.

        Each agent has P = 15 sample points (its 8 inset corners pulled 10% inwards, its centre and its 6 face
        centres pulled in alike). A point counts if it projects into some camera's image and the ray from that
        camera's centre first hits this agent, or nothing before the point. All agents and cameras are cast at once.

        Args:
            agents: the agents' boxes (global frame).
            global_from_ego: the ego pose.

        Returns:
            [A] float64 fractions in [0, 1].
        """
        count = len(agents)
        if count == 0:
            return np.zeros(0)
        center = np.stack([a.center_m for a in agents])  # [A, 3]
        size_wlh = np.stack([a.size_wlh_m for a in agents])
        yaw = np.array([a.yaw_rad for a in agents])
        half = np.maximum(size_wlh[:, [1, 0, 2]] / 2 - AGENT_INSET_M, 0.0)  # [A, 3] inset half extents
        local = _VISIBILITY_PATTERN[None] * half[:, None]  # [A, P, 3]
        cos, sin = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
        samples = (
            np.stack(
                [cos * local[..., 0] - sin * local[..., 1], sin * local[..., 0] + cos * local[..., 1], local[..., 2]],
                axis=-1,
            )
            + center[:, None]
        )  # [A, P, 3] global
        samples = samples.reshape(-1, 3)  # [A*P, 3]

        cameras = self.global_from_cameras(global_from_ego)
        origins = np.stack([g.translation for g in cameras])  # [C, 3]
        offsets = samples[None] - origins[:, None]  # [C, A*P, 3]
        distance = np.linalg.norm(offsets, axis=-1)  # [C, A*P]
        in_view = np.zeros(distance.shape, dtype=bool)
        for c, global_from_camera in enumerate(cameras):
            in_camera = global_from_camera.inverse().apply(samples)  # [A*P, 3]
            depth = in_camera[:, 2]
            with np.errstate(divide="ignore", invalid="ignore"):
                uv = (in_camera @ self._intrinsics[c].T)[:, :2] / depth[:, None]
            in_view[c] = (
                (depth > 0.1)
                & (uv[:, 0] >= 0)
                & (uv[:, 0] < self.cameras.width_px)
                & (uv[:, 1] >= 0)
                & (uv[:, 1] < self.cameras.height_px)
            )
        rays = np.concatenate(
            [np.broadcast_to(origins[:, None], offsets.shape), offsets / np.maximum(distance, 1e-9)[..., None]], axis=-1
        )  # [C, A*P, 6]
        scene = self._scene(AgentMesh.from_boxes(agents))
        hits = self._cast(scene, o3d.core.Tensor(rays.reshape(-1, 6).astype(np.float32)))
        owner = np.repeat(np.arange(count), len(_VISIBILITY_PATTERN))  # [A*P]
        first_agent = scene.triangle_agent[hits.triangle].reshape(distance.shape)
        clear = (first_agent == owner[None]) | (hits.t_hit.reshape(distance.shape) >= distance)
        seen = np.any(in_view & clear, axis=0).reshape(count, -1)  # [A, P]
        return seen.mean(axis=1)
