"""CPU benchmarks of the perception encoders: the Lift-Splat pooling and a forward of each encoder.

Run ``python -m bevjepa.perception.bench`` for a JSON report. Sizes follow the ``small`` preset: batch 1, six
cameras at 144 x 256 (18 x 32 feature pixels, 41 depth bins, 64 channels), a sweep of about 120k points.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from bevjepa.datasets import geometry
from bevjepa.perception import camera, lidar

SMALL_IMAGE_HW = (144, 256)
"""Image size of the ``small`` preset (pixels)."""
SMALL_CAMERAS = 6
"""Cameras of the ``small`` preset."""
SMALL_SWEEP_POINTS = 120_000
"""Points of a ``small`` preset sweep (10 aggregated sweeps)."""

CAM_FRONT_INTRINSICS_1600x900 = np.array(
    [[1266.417203046554, 0.0, 816.2670197447984], [0.0, 1266.417203046554, 491.50706579294757], [0.0, 0.0, 1.0]]
)
"""nuScenes CAM_FRONT pinhole matrix at 1600 x 900 (v1.0-mini calibration)."""
CAM_FRONT_ROTATION_WXYZ = np.array([0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755])
"""nuScenes CAM_FRONT rotation ``ego_from_camera`` (v1.0-mini calibration)."""
CAM_FRONT_TRANSLATION_M = np.array([1.70079118954, 0.0159456324149, 1.51095763913])
"""nuScenes CAM_FRONT translation ``ego_from_camera`` (m, v1.0-mini calibration)."""
SURROUND_YAWS_DEG = (0.0, -55.0, 55.0, -110.0, 110.0, 180.0)
"""Yaws of the six nuScenes-like cameras about the ego z axis (deg), front first."""


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(threads)``, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def surround_cameras(image_hw: tuple[int, int] = SMALL_IMAGE_HW) -> tuple[torch.Tensor, torch.Tensor]:
    """Six nuScenes-like cameras: CAM_FRONT's calibration turned about the ego z axis.

    Args:
        image_hw: (H, W) of the images the intrinsics are for (pixels).

    Returns:
        intrinsics [6, 3, 3] float32 (pixels at ``image_hw``), ego_from_camera [6, 4, 4] float32.
    """
    h, w = image_hw
    scale = np.diag([w / 1600.0, h / 900.0, 1.0])
    intrinsics = np.stack([scale @ CAM_FRONT_INTRINSICS_1600x900] * len(SURROUND_YAWS_DEG))  # [6, 3, 3]
    front = geometry.RigidTransform.from_quaternion(CAM_FRONT_ROTATION_WXYZ, CAM_FRONT_TRANSLATION_M)
    poses = np.stack(
        [(geometry.RigidTransform.from_pose_2d(0.0, 0.0, np.radians(yaw)) @ front).matrix for yaw in SURROUND_YAWS_DEG]
    )  # [6, 4, 4]
    return torch.from_numpy(intrinsics).float(), torch.from_numpy(poses).float()


def random_sweep(points: int, seed: int = 0) -> torch.Tensor:
    """[points, 5] float32 random points: x, y uniform in +-50 m, z in [-2, 3] m, intensity, lag in [0, 0.5) s."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(points, 5, generator=g)  # [M, 5]
    return torch.stack([u[:, 0] * 100 - 50, u[:, 1] * 100 - 50, u[:, 2] * 5 - 2, u[:, 3] * 255, u[:, 4] * 0.5], 1)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (ms), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pooling_speed(
    points: int = SMALL_CAMERAS * 41 * 18 * 32,
    channels: int = 64,
    repeats: int = 20,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Time ``camera.lift_splat_pool`` against ``camera.naive_scatter_pool`` on the same random frustum points.

    The points are uniform in x, y over +-48 m, so that about 44 % fall inside the 64 x 64 splat grid (B = 1).
    The two run alternately in every repeat, in this process, so that drift in the machine hits both alike.

    Args:
        points: P, frustum points (default: six cameras x 41 depths x 18 x 32 feature pixels).
        channels: C.
        repeats: timed calls of each (after one warm-up call of each).
        threads: torch intra-op threads during the run.
        seed: of the random points and features.

    Returns:
        dict with ``points``, ``channels``, ``cells``, ``inside_fraction``, ``threads``, ``repeats``,
        ``pool_ms`` and ``naive_ms`` (medians), ``speedup`` (naive / pool) and ``max_abs_diff`` of the results.
    """
    grid = camera.CameraEncoderConfig().splat_grid
    cells = grid.shape[0] * grid.shape[1]
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(points, 2, generator=g) * 96.0 - 48.0  # [P, 2]
    flat_index, inside = grid.flat_index_torch(xy[:, 0], xy[:, 1])  # [P] each
    features = torch.randn(points, channels, generator=g)  # [P, C]
    pool_times, naive_times = [], []
    with _threads(threads), torch.no_grad():
        pooled = camera.lift_splat_pool(features, flat_index, inside, cells)
        naive = camera.naive_scatter_pool(features, flat_index, inside, cells)
        for _ in range(repeats):
            for fn, times in ((camera.lift_splat_pool, pool_times), (camera.naive_scatter_pool, naive_times)):
                start = time.perf_counter()
                fn(features, flat_index, inside, cells)
                times.append(time.perf_counter() - start)
    pool_ms, naive_ms = 1e3 * statistics.median(pool_times), 1e3 * statistics.median(naive_times)
    return {
        "points": points,
        "channels": channels,
        "cells": cells,
        "inside_fraction": float(inside.float().mean()),
        "threads": threads,
        "repeats": repeats,
        "pool_ms": pool_ms,
        "naive_ms": naive_ms,
        "speedup": naive_ms / pool_ms,
        "max_abs_diff": float((pooled - naive).abs().max()),
    }


def encoder_latency(
    image_hw: tuple[int, int] = SMALL_IMAGE_HW,
    sweep_points: int = SMALL_SWEEP_POINTS,
    repeats: int = 10,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Milliseconds per forward of each encoder at the ``small`` preset size: batch 1, eval mode, no grad.

    Args:
        image_hw: (H, W) of the six camera images (pixels).
        sweep_points: points of the LiDAR sweep (uniform over +-50 m, so about 40 % inside the grid).
        repeats: timed forwards of each encoder (median reported, after one warm-up).
        threads: torch intra-op threads during the run.
        seed: of the weights and inputs.

    Returns:
        dict with ``camera_ms``, ``lidar_ms``, ``threads``, ``repeats``, ``image_hw``, ``cameras``,
        ``sweep_points``.
    """
    torch.manual_seed(seed)
    camera_encoder = camera.CameraEncoder(camera.CameraEncoderConfig()).eval()
    lidar_encoder = lidar.LidarEncoder(lidar.LidarEncoderConfig()).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (1, SMALL_CAMERAS, 3, *image_hw), dtype=torch.uint8, generator=g)
    intrinsics, ego_from_camera = surround_cameras(image_hw)  # [6, 3, 3], [6, 4, 4]
    camera_mask = torch.ones(1, SMALL_CAMERAS, dtype=torch.bool)
    points = random_sweep(sweep_points, seed)  # [M, 5]
    points_batch = torch.zeros(sweep_points, dtype=torch.int64)
    with _threads(threads), torch.no_grad():
        camera_ms = _median_ms(
            lambda: camera_encoder(images, intrinsics[None], ego_from_camera[None], camera_mask), repeats
        )
        lidar_ms = _median_ms(lambda: lidar_encoder(points, points_batch, 1), repeats)
    return {
        "camera_ms": camera_ms,
        "lidar_ms": lidar_ms,
        "threads": threads,
        "repeats": repeats,
        "image_hw": list(image_hw),
        "cameras": SMALL_CAMERAS,
        "sweep_points": sweep_points,
    }


def main() -> None:
    """Print both benchmarks as JSON."""
    print(json.dumps({"pooling_speed": pooling_speed(), "encoder_latency": encoder_latency()}, indent=2))


if __name__ == "__main__":
    main()
