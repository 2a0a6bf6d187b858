"""Throughput of the sensor renderer, measured against open3d's bare ``cast_rays`` on the same scene and rays.

Every comparison runs in one process with the two sides interleaved (one of each per round), so that a busy
machine slows both alike; rates come from the median time per round.

Run ``python -m bevjepa.sim.bench`` to print all three measurements.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open3d as o3d

from bevjepa.datasets import geometry, types
from bevjepa.datasets import io as bevio
from bevjepa.sim import layouts, sensors

CAR_SIZE_WLH_M = (1.9, 4.6, 1.7)
BOX_BOTTOM_Z_M = 0.02
"""Agent boxes stand this far above the ground, as the simulator places them."""


def street_scene(
    layout_name: str = "intersection", seed: int = 0, agent_count: int = 20
) -> tuple[layouts.RoadLayout, list[types.Box3D], geometry.RigidTransform]:
    """A layout, ``agent_count`` cars on its lanes near the ego, and the ego pose.

    The ego drives the first incoming lane 25 m before its end; the cars stand on lane centrelines (every 10 m
    along each lane, heading along it), the ones nearest the ego that are at least 9 m away from it.

    Returns:
        (layout, agents (global frame), global_from_ego).
    """
    layout = layouts.build_layout(layout_name, np.random.default_rng(seed))
    lanes = [lane for lane in layout.lanes if not lane.is_connector]
    ego_lane = layout.lane(layout.ego_routes[0][0]).centerline
    ego_xy = _point_before_end(ego_lane, 25.0)
    ego_heading = ego_lane[-1] - ego_lane[0]
    global_from_ego = geometry.RigidTransform.from_pose_2d(*ego_xy, float(np.arctan2(ego_heading[1], ego_heading[0])))

    # Candidate spots: lane centreline points (2 m apart) thinned to every 5th, with the lane's heading.
    xy = np.concatenate([lane.centerline[:-1:5] for lane in lanes])  # [K, 2]
    step = np.concatenate([(lane.centerline[1:] - lane.centerline[:-1])[::5] for lane in lanes])  # [K, 2]
    distance = np.linalg.norm(xy - ego_xy, axis=1)
    order = np.argsort(np.where(distance >= 9.0, distance, np.inf), kind="stable")[:agent_count]
    w, length, h = CAR_SIZE_WLH_M
    agents = [
        types.Box3D(
            np.array([*xy[i], BOX_BOTTOM_Z_M + h / 2]),
            np.array([w, length, h]),
            float(np.arctan2(step[i, 1], step[i, 0])),
            category="vehicle.car",
            instance_id=f"car-{n:02d}",
        )
        for n, i in enumerate(order)
    ]
    return layout, agents, global_from_ego


def _point_before_end(centerline: np.ndarray, distance_m: float) -> np.ndarray:
    """[2] the point ``distance_m`` before the end of a straight centreline [M, 2]."""
    direction = centerline[-1] - centerline[0]
    return centerline[-1] - direction / np.linalg.norm(direction) * distance_m


def _interleaved(rounds: int, *functions: Callable[[], object]) -> list[float]:
    """Median seconds per call of each function, called in turn ``rounds`` times after one warm-up round."""
    for function in functions:
        function()
    seconds = np.zeros((rounds, len(functions)))
    for r in range(rounds):
        for f, function in enumerate(functions):
            start = time.perf_counter()
            function()
            seconds[r, f] = time.perf_counter() - start
    return [float(s) for s in np.median(seconds, axis=0)]


def lidar_throughput(layout_name: str = "intersection", sweeps: int = 20, seed: int = 0) -> dict:
    """LiDAR sweeps per second, end to end, against the reference path and bare ``cast_rays`` on the same scene.

    (a) ``SensorRenderer.lidar_sweep``: the rays, agent meshing, a fresh scene, the cast, drops, noise, intensities
    and the ``LidarSweep``. (r) ``SensorRenderer._lidar_sweep_reference``, the same work as first written, which
    (a) must equal to float32 rounding (checked here once before timing). (b) open3d's ``RaycastingScene.cast_rays``
    alone, on the same scene (static world and agents, global frame) built once, with the rays precomputed.
    The three are interleaved, one of each per round.

    Returns:
        ``sweeps_per_s``, ``rays_per_s`` and ``returns_per_sweep`` of (a); ``reference_sweeps_per_s`` and
        ``reference_rays_per_s`` of (r); ``raw_sweeps_per_s`` and ``raw_rays_per_s`` of (b); ``overhead_ratio`` =
        (a) / (b) and ``reference_overhead_ratio`` = (r) / (b) (1 means no overhead); ``speedup`` = (a) / (r);
        and the setup.
    """
    layout, agents, global_from_ego = street_scene(layout_name, seed)
    renderer = sensors.SensorRenderer(layout)
    sweep, agent_index = renderer.lidar_sweep(agents, global_from_ego, 0, np.random.default_rng(seed))
    reference, reference_index = renderer._lidar_sweep_reference(
        agents, global_from_ego, 0, np.random.default_rng(seed)
    )
    same = sweep.points.shape == reference.points.shape
    same = same and np.allclose(sweep.points, reference.points, **sensors.REFERENCE_TOLERANCE)
    if not (same and np.array_equal(agent_index, reference_index)):
        raise AssertionError("lidar_throughput: lidar_sweep and its reference disagree")
    rng, reference_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    returns: list[int] = []

    def render() -> None:
        sweep, _ = renderer.lidar_sweep(agents, global_from_ego, 0, rng)
        returns.append(len(sweep.points))

    def render_reference() -> None:
        renderer._lidar_sweep_reference(agents, global_from_ego, 0, reference_rng)

    scene = renderer.raycasting_scene(agents)
    rays = renderer.lidar_rays(global_from_ego)

    seconds, reference_seconds, raw_seconds = _interleaved(
        sweeps, render, render_reference, lambda: scene.cast_rays(rays)
    )
    ray_count = renderer.lidar.ray_count
    return {
        "layout": layout_name,
        "agents": len(agents),
        "sweeps": sweeps,
        "rays_per_sweep": ray_count,
        "returns_per_sweep": float(np.mean(returns)),
        "sweeps_per_s": 1.0 / seconds,
        "rays_per_s": ray_count / seconds,
        "reference_sweeps_per_s": 1.0 / reference_seconds,
        "reference_rays_per_s": ray_count / reference_seconds,
        "raw_sweeps_per_s": 1.0 / raw_seconds,
        "raw_rays_per_s": ray_count / raw_seconds,
        "overhead_ratio": raw_seconds / seconds,
        "reference_overhead_ratio": raw_seconds / reference_seconds,
        "speedup": reference_seconds / seconds,
    }


def camera_throughput(
    layout_name: str = "intersection", frames: int = 5, seed: int = 0, cameras: sensors.CameraConfig | None = None
) -> dict:
    """Camera images per second (six per frame), end to end, against bare ``cast_rays`` of the same rays.

    Returns:
        ``images_per_s``, ``frames_per_s`` and ``rays_per_s`` of ``SensorRenderer.camera_images``;
        ``raw_rays_per_s`` of ``cast_rays`` alone on the same (global) scene and rays; ``overhead_ratio``.
    """
    layout, agents, global_from_ego = street_scene(layout_name, seed)
    renderer = sensors.SensorRenderer(layout, cameras=cameras)
    config = renderer.cameras
    scene = renderer.raycasting_scene(agents)
    rays = renderer.camera_rays(global_from_ego)  # [C*H*W, 6]

    seconds, raw_seconds = _interleaved(
        frames, lambda: renderer.camera_images(agents, global_from_ego, 0), lambda: scene.cast_rays(rays)
    )
    count = len(types.CAMERA_CHANNELS)
    return {
        "layout": layout_name,
        "resolution": f"{config.width_px}x{config.height_px}",
        "frames": frames,
        "images_per_s": count / seconds,
        "frames_per_s": 1.0 / seconds,
        "rays_per_s": rays.shape[0] / seconds,
        "raw_rays_per_s": rays.shape[0] / raw_seconds,
        "overhead_ratio": raw_seconds / seconds,
    }


def scene_strategies(layout_name: str = "intersection", sweeps: int = 20, seed: int = 0) -> dict:
    """Per-sweep cost of the two ways to cast a frame with moving agents, on LiDAR rays in the global frame.

    (fresh) a new ``RaycastingScene`` holding the static world and the agents, then one cast; (split) the
    static scene built once, a new scene holding only the agents, a cast into each and the nearer hit kept.
    Both include building the per-frame scene; ``SensorRenderer`` uses the faster.

    Returns:
        ``fresh_ms`` and ``split_ms`` (median per sweep), and ``split_over_fresh`` (their ratio).
    """
    layout, agents, global_from_ego = street_scene(layout_name, seed)
    renderer = sensors.SensorRenderer(layout)
    mesh = sensors.AgentMesh.from_boxes(agents)
    static_scene = renderer.raycasting_scene([])
    rays = renderer.lidar_rays(global_from_ego)
    static_scene.cast_rays(rays)  # commit the static scene's BVH outside the timing

    def fresh() -> np.ndarray:
        return renderer.raycasting_scene(agents).cast_rays(rays)["t_hit"].numpy()

    def split() -> np.ndarray:
        agent_scene = o3d.t.geometry.RaycastingScene()
        agent_scene.add_triangles(o3d.core.Tensor(mesh.vertices), o3d.core.Tensor(mesh.triangles))
        static_hits, agent_hits = static_scene.cast_rays(rays), agent_scene.cast_rays(rays)
        static_t, agent_t = static_hits["t_hit"].numpy(), agent_hits["t_hit"].numpy()
        nearer = agent_t < static_t
        np.where(nearer, agent_hits["primitive_ids"].numpy(), static_hits["primitive_ids"].numpy())
        return np.where(nearer, agent_t, static_t)

    if not np.array_equal(fresh(), split()):
        raise AssertionError("scene_strategies: the two strategies disagree on the hits")
    fresh_s, split_s = _interleaved(sweeps, fresh, split)
    return {
        "layout": layout_name,
        "sweeps": sweeps,
        "fresh_ms": 1e3 * fresh_s,
        "split_ms": 1e3 * split_s,
        "split_over_fresh": split_s / fresh_s,
    }


def synth_wall_time(scenes: int = 10, duration_s: float = 20.0, workers: int = 2, seed: int = 0) -> dict:
    """Wall time of ``bevjepa synth`` writing a v1.0-mini-sized dataset (by default 10 scenes of 20 s).

    The dataset goes to a temporary folder, removed afterwards.

    Returns:
        ``wall_s``, the counts written (keyframes, sweeps, images), ``bytes`` on disk and ``sweeps_per_s``.
    """
    from bevjepa.sim import synth

    parent = Path(tempfile.mkdtemp(prefix="bevjepa-bench-"))
    try:
        config = synth.SynthConfig(
            out=parent / "mini", scenes=scenes, seed=seed, duration_s=duration_s, workers=workers
        )
        report = synth.synthesize(config)
        size = sum(f.stat().st_size for f in report.out.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return {
        "scenes": scenes,
        "duration_s": duration_s,
        "workers": workers,
        "wall_s": report.wall_time_s,
        "keyframes": report.keyframes,
        "sweeps": report.sweeps,
        "images": report.images,
        "bytes": size,
        "sweeps_per_s": report.sweeps / report.wall_time_s,
    }


def main() -> None:
    """Print the LiDAR, camera and scene-strategy measurements."""
    for result in (lidar_throughput(), camera_throughput(), scene_strategies()):
        print(bevio.format_report(result), end="\n\n")


if __name__ == "__main__":
    main()
