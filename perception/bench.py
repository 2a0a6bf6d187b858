"""CPU benchmarks of the perception encoders: the Lift-Splat splat (three ways) and a forward of each encoder.

Run ``python -m bevjepa.perception.bench`` for a JSON report. Sizes follow the ``small`` preset: batch 1, six
cameras at 144 x 256 (18 x 32 feature pixels, 41 depth bins, 64 channels), a sweep of about 120k points.
"""

from __future__ import annotations

import json
import math
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


def _csr_autograd_splat(features: torch.Tensor, depth_probs: torch.Tensor, index: camera.SplatIndex) -> torch.Tensor:
    """``sparse_splat`` as it was, with torch's own backward of the CSR product (the dense gradient, masked).

    The baseline of ``pooling_speed``'s backward; arguments and result as ``camera.sparse_splat``.
    """
    values = camera.pair_values(depth_probs, index)  # [U]
    return camera.csr_matrix(values, index.crow_indices, index.col_indices, index.pixels) @ features  # [cells, C]


def pooling_speed(
    image_hw: tuple[int, int] = SMALL_IMAGE_HW,
    batch: int = 1,
    repeats: int = 20,
    threads: int = 2,
    seed: int = 0,
) -> dict:
    """Time the Lift-Splat splat three ways on the same six-camera rig, depth probabilities and features.

    (naive) the lift's [P, C] outer product and a ``naive_scatter_pool`` of every point; (index_add) the same
    outer product and ``lift_splat_pool``, the splat before the cached index; (sparse) ``sparse_splat`` with
    the rig's ``SplatIndex``, which never builds the outer product. All three are given the landing cells, as
    a pooling kernel is; what finding them costs is reported beside: ``landing_ms`` (every call of
    ``splat_reference``) and ``index_build_ms`` (once per rig, a cache miss of ``splat``). ``splat_reference_ms``
    and ``splat_ms`` time the whole splat of each path (geometry included). Every timed function runs once per
    repeat, in turn, in this process, so that drift in the machine hits all alike.

    Args:
        image_hw: (H, W) of the images (pixels); the features are ``feature_stride`` smaller.
        batch: B, samples with the same rig.
        repeats: timed calls of each (after one warm-up call of each).
        threads: torch intra-op threads during the run.
        seed: of the encoder's buffers, the depth probabilities and features.

    Returns:
        dict with the setup (``points``, ``kept_points``, ``channels``, ``cells``, ``threads``, ``repeats``),
        the medians (``*_ms``), ``speedup`` (naive / sparse), ``index_add_speedup`` (naive / index_add, the
        figure before the cached index), ``splat_speedup`` (reference / cached splat) and ``max_abs_diff`` of
        the sparse and cached results against the naive one. ``sparse_backward_ms`` and ``csr_autograd_backward_ms``
        time the sparse splat with its backward, ours against torch's own for a CSR product (``backward_speedup``).
    """
    torch.manual_seed(seed)
    encoder = camera.CameraEncoder(camera.CameraEncoderConfig()).eval()
    config = encoder.config
    B, N, C, D = batch, SMALL_CAMERAS, config.channels, config.depth_bins
    h, w = (math.ceil(size / config.feature_stride) for size in image_hw)
    X, Y = config.splat_grid.shape
    intrinsics, ego_from_camera = surround_cameras(image_hw)  # [N, 3, 3], [N, 4, 4]
    intrinsics, ego_from_camera = intrinsics.expand(B, N, 3, 3), ego_from_camera.expand(B, N, 4, 4)
    camera_mask = torch.ones(B, N, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, N, C, h, w, generator=g)  # [B, N, C, h, w]
    depth_probs = torch.randn(B, N, D, h, w, generator=g).softmax(dim=2)  # [B, N, D, h, w]
    pixels = features.permute(0, 1, 3, 4, 2).reshape(B * N * h * w, C)  # [B*N*h*w, C]

    def landing() -> tuple[torch.Tensor, torch.Tensor]:
        points = encoder.frustum_points(h, w, intrinsics, ego_from_camera, camera_mask)  # [B, N, D, h, w, 3]
        cell, keep = encoder._landing_cells(points, camera_mask)  # [B, N, D, h, w] each
        offset = torch.arange(B)[:, None, None, None, None] * (X * Y)  # [B, 1, 1, 1, 1]
        return (cell + offset).reshape(-1), keep.reshape(-1)  # [P] each

    def build_index() -> camera.SplatIndex:
        encoder._splat_index_cache.clear()
        return encoder.splat_index(h, w, intrinsics, ego_from_camera, camera_mask)

    flat, keep = landing()
    index = build_index()

    def lifted() -> torch.Tensor:
        channels_last = features.permute(0, 1, 3, 4, 2).contiguous()  # [B, N, h, w, C]
        return (depth_probs[..., None] * channels_last[:, :, None]).reshape(-1, C)  # [P, C]

    timed = {
        "naive": lambda: camera.naive_scatter_pool(lifted(), flat, keep, B * X * Y),
        "index_add": lambda: camera.lift_splat_pool(lifted(), flat, keep, B * X * Y),
        "sparse": lambda: camera.sparse_splat(pixels, depth_probs.reshape(-1), index),
        "landing": landing,
        "index_build": build_index,
        "splat_reference": lambda: encoder.splat_reference(
            features, depth_probs, intrinsics, ego_from_camera, camera_mask
        ),
        "splat": lambda: encoder.splat(features, depth_probs, intrinsics, ego_from_camera, camera_mask),
    }

    def forward_backward(splat: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            f, d = pixels.detach().requires_grad_(), depth_probs.reshape(-1).detach().requires_grad_()
            splat(f, d, index).sum().backward()

        return run

    backward = {  # training's path: the splat and its backward, ours against torch's own for a CSR product
        "sparse_backward": forward_backward(camera.sparse_splat),
        "csr_autograd_backward": forward_backward(_csr_autograd_splat),
    }
    times: dict[str, list[float]] = {name: [] for name in timed}
    with _threads(threads), torch.no_grad():
        results = {name: fn() for name, fn in timed.items()}  # warm up
        for _ in range(repeats):
            for name, fn in timed.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    with _threads(threads):
        for name, fn in backward.items():
            times[name] = []
            fn()  # warm up
        for _ in range(repeats):
            for name, fn in backward.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ms = {f"{name}_ms": 1e3 * statistics.median(spent) for name, spent in times.items()}
    naive = results["naive"]
    cached = results["splat"].permute(0, 2, 3, 1).reshape(B * X * Y, C)  # [B*X*Y, C]
    return {
        "points": B * N * D * h * w,
        "kept_points": int(keep.sum()),
        "channels": C,
        "cells": B * X * Y,
        "threads": threads,
        "repeats": repeats,
        **ms,
        "speedup": ms["naive_ms"] / ms["sparse_ms"],
        "index_add_speedup": ms["naive_ms"] / ms["index_add_ms"],
        "splat_speedup": ms["splat_reference_ms"] / ms["splat_ms"],
        "backward_speedup": ms["csr_autograd_backward_ms"] / ms["sparse_backward_ms"],
        "max_abs_diff": max(float((results["sparse"] - naive).abs().max()), float((cached - naive).abs().max())),
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
