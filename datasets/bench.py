"""Benchmarks of the dataset pipeline: preprocessing throughput, memory, bytes, where a window's time goes.

``python -m bevjepa.datasets.bench DATAROOT`` prints the stage breakdown (``preprocess_stages``); the throughput
is ``bevjepa bench preprocess``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bevjepa.datasets import io as bevio
from bevjepa.datasets import nuscenes_source, preprocess, rasterize, windows, workers


def _timed_run(
    dataroot: Path,
    version: str,
    out: Path,
    pool: workers.SequentialPool | workers.RayPool,
    window: windows.WindowConfig,
    reference: bool,
) -> tuple[float, list[preprocess.SceneResult]]:
    """Preprocess every scene through ``pool`` into ``out``; returns the wall time and the scenes' results.

    ``reference`` builds as first written (``PreprocessConfig.reference``: ``WindowBuilder(reference=True)``, tasks
    handed out in scene order); otherwise as ``preprocess`` does (tasks interleaved across scenes on Ray).
    """
    config = preprocess.PreprocessConfig(
        dataroot=dataroot, out=out, version=version, window=window, reference=reference
    )
    source = preprocess._cached_source(config.source_config())
    tasks = preprocess.scene_tasks(config, source)
    order = preprocess.task_order(tasks, interleave=isinstance(pool, workers.RayPool) and not reference)
    out.mkdir(parents=True)
    start = time.perf_counter()
    results: list[preprocess.SceneResult | None] = [None] * len(tasks)
    for position, result in pool.map_unordered(preprocess.process_scene, [tasks[i] for i in order]):
        results[order[position]] = result
    seconds = time.perf_counter() - start
    done = [result for result in results if result is not None]
    bevio.atomic_write_json(out / "manifest.json", preprocess.build_manifest(config, done))
    return seconds, done


def _file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by its path relative to ``root``."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def preprocess_throughput(
    dataroot: Path, version: str = "v1.0-mini", window: windows.WindowConfig | None = None
) -> dict:
    """Windows per second as first written (the reference) and as now, side by side in one run.

    Three ways, each with the reference then the current code: a plain single-process loop, Ray with 1 worker and
    Ray with 2 workers. Each Ray run gets a fresh local Ray (2 CPUs) whose start-up is not counted, so that both
    codes' workers import the package and load the devkit's tables inside the timing, as a real run does (an
    already running Ray is used as it is, warm after the first run). Every run writes to its own temporary
    folder, and every file the current code writes is compared, byte for byte, with the reference's.

    Returns:
        windows; for each of ``loop``, ``ray1`` and ``ray2``: ``<way>_windows_per_s_reference``,
        ``<way>_windows_per_s`` and ``<way>_speedup`` (reference time over current time); ``ray2_over_ray1`` and
        ``ray2_over_loop`` for both; ``same_bytes`` (whether every file of the three current runs equals the
        reference's); ``peak_worker_memory_mb`` (current, 2 workers), ``bytes_per_window`` (its file plus its share
        of frames), and the windows per second the torch loader delivers (batch 4; 0 and 2 loader workers) against
        plain file loading.
    """
    import ray

    window = window or windows.WindowConfig()
    parent = Path(tempfile.mkdtemp(prefix="bevjepa-bench-preprocess-"))
    seconds: dict[str, float] = {}
    digests: dict[str, dict[str, str]] = {}

    def run(way: str, ray_workers: int) -> list[preprocess.SceneResult]:
        results = []
        for reference in (True, False):  # the reference first, then the current code, under the same load
            name = f"{way}_reference" if reference else way
            started_here = workers.init_ray(2) if ray_workers else False  # local, loopback only
            try:
                pool = workers.RayPool(ray_workers) if ray_workers else workers.SequentialPool()
                seconds[name], results = _timed_run(dataroot, version, parent / name, pool, window, reference)
            finally:
                if started_here:
                    ray.shutdown()
            digests[name] = _file_digests(parent / name)
            if way != "loop" or reference:  # the current loop's output feeds the loader measurement below
                shutil.rmtree(parent / name)
        return results  # the current code's

    try:
        loop_results = run("loop", 0)
        run("ray1", 1)
        ray2_results = run("ray2", 2)
        count = sum(len(r.windows) for r in loop_results)
        total_bytes = sum(f.stat().st_size for f in (parent / "loop").rglob("*.npz"))
        from bevjepa.datasets import torch_dataset

        loader0 = torch_dataset.loader_throughput(parent / "loop", batch_size=4, num_workers=0)
        loader2 = torch_dataset.loader_throughput(parent / "loop", batch_size=4, num_workers=2)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    differing = [
        f"{way}/{name}"
        for way in ("loop", "ray1", "ray2")
        for name in sorted(set(digests[way]) | set(digests[f"{way}_reference"]))
        if digests[way].get(name) != digests[f"{way}_reference"].get(name)
    ]
    result: dict = {"windows": count}
    for way in ("loop", "ray1", "ray2"):
        result[f"{way}_windows_per_s_reference"] = count / seconds[f"{way}_reference"]
        result[f"{way}_windows_per_s"] = count / seconds[way]
        result[f"{way}_speedup"] = seconds[f"{way}_reference"] / seconds[way]
    return {
        **result,
        "ray2_over_ray1_reference": seconds["ray1_reference"] / seconds["ray2_reference"],
        "ray2_over_ray1": seconds["ray1"] / seconds["ray2"],
        "ray2_over_loop_reference": seconds["loop_reference"] / seconds["ray2_reference"],
        "ray2_over_loop": seconds["loop"] / seconds["ray2"],
        "same_bytes": f"NO: {len(differing)} files differ, {differing[0]} first" if differing else "yes, every file",
        "peak_worker_memory_mb": max(r.peak_memory_bytes for r in ray2_results) / 1e6,
        "bytes_per_window": total_bytes / max(count, 1),
        "points_per_window": loader0["points_per_window"],
        "loader_windows_per_s_0_workers": loader0["loader_windows_per_s"],
        "loader_windows_per_s_2_workers": loader2["loader_windows_per_s"],
        "plain_file_loading_windows_per_s": loader0["plain_windows_per_s"],
    }


_STAGES: tuple[tuple[object, str, str], ...] = (
    (nuscenes_source, "read_lidar_file", "sweep_file_reads"),
    (nuscenes_source.NuScenesSource, "aggregate_lidar", "sweep_aggregation"),
    (nuscenes_source.NuScenesSource, "cameras", "jpeg_decode_resize"),
    (nuscenes_source.NuScenesSource, "boxes", "annotation_boxes"),
    (nuscenes_source.NuScenesSource, "keyframe", "other"),
    (windows, "voxel_downsample", "voxel_downsample"),
    (windows, "voxel_downsample_reference", "voxel_downsample"),
    (windows, "build_frame", "crop_and_jpeg_encode"),
    (windows, "_save", "npz_compress_write"),
    (preprocess, "_write_json", "meta_json"),
    (windows.WindowBuilder, "_occupancy", "window_occupancy"),
    (rasterize, "observed_cells", "window_observed_cells"),
    (rasterize, "observed_cells_reference", "window_observed_cells"),
    (windows.WindowBuilder, "_agent_tracks", "window_tracks_and_ego"),
    (windows.WindowBuilder, "_ego_targets", "window_tracks_and_ego"),
    (windows.WindowBuilder, "window", "window_rest"),
    (preprocess, "process_scene", "other"),
)
"""(owner, attribute, stage): the functions ``preprocess_stages`` times; each stage's time excludes the stages
called inside it (``aggregate_lidar`` does not count ``read_lidar_file``, a window not its occupancy)."""


def preprocess_stages(
    dataroot: Path, version: str = "v1.0-mini", scenes: int = 2, window: windows.WindowConfig | None = None
) -> dict:
    """Where a window's time goes: milliseconds per window in each stage, as first written and as now, one process.

    Preprocesses the first ``scenes`` scenes in a plain loop with the reference code, then with the current code
    (each into its own temporary folder), timing the functions of ``_STAGES`` by wall clock (their own time, without
    the timed functions they call); the functions are restored afterwards.

    Returns:
        windows; ``ms_per_window_reference`` and ``ms_per_window``; then ``<stage>_ms_reference`` and
        ``<stage>_ms`` for each stage (per window, summed over the frames and windows of the run).
    """
    window = window or windows.WindowConfig()
    spent: dict[str, float] = {}
    inside: list[float] = []  # per open timed call: the time spent in timed calls below it

    def timed(fn: Callable, stage: str) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            inside.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                spent[stage] = spent.get(stage, 0.0) + elapsed - inside.pop()
                if inside:
                    inside[-1] += elapsed

        return call

    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in _STAGES]
    result: dict = {}
    parent = Path(tempfile.mkdtemp(prefix="bevjepa-bench-stages-"))
    try:
        for (owner, name, fn), (_, _, stage) in zip(originals, _STAGES, strict=True):
            setattr(owner, name, timed(fn, stage))
        for reference in (True, False):
            spent.clear()
            suffix = "_reference" if reference else ""
            config = preprocess.PreprocessConfig(
                dataroot=dataroot, out=parent / f"out{suffix}", version=version, window=window, reference=reference
            )
            source = preprocess._cached_source(config.source_config())
            names = {scene["name"] for scene in source.scenes[:scenes]}
            start = time.perf_counter()
            count = 0
            for task in preprocess.scene_tasks(config, source):
                if task.scene_name in names:
                    count += len(preprocess.process_scene(task).windows)
            result["windows"] = count
            result[f"ms_per_window{suffix}"] = 1e3 * (time.perf_counter() - start) / max(count, 1)
            for stage in dict.fromkeys(stage for _, _, stage in _STAGES):
                result[f"{stage}_ms{suffix}"] = 1e3 * spent.get(stage, 0.0) / max(count, 1)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        shutil.rmtree(parent, ignore_errors=True)
    order = ["windows", "ms_per_window_reference", "ms_per_window"]
    order += [
        key for stage in dict.fromkeys(s for _, _, s in _STAGES) for key in (f"{stage}_ms_reference", f"{stage}_ms")
    ]
    return {key: result[key] for key in order}


def main() -> None:
    """Print ``preprocess_stages`` of a dataset: ``python -m bevjepa.datasets.bench DATAROOT [--scenes N]``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dataroot", type=Path, help="a nuScenes dataset root")
    parser.add_argument("--version", default="v1.0-mini", help="table version (default v1.0-mini)")
    parser.add_argument("--scenes", type=int, default=2, help="scenes to preprocess (default 2)")
    args = parser.parse_args()
    result = preprocess_stages(args.dataroot, args.version, args.scenes)
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key.ljust(width)}  {value:,.1f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
