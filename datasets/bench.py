"""Benchmarks of the dataset pipeline: preprocessing throughput on Ray against a plain loop, memory, bytes."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bevjepa.datasets import io as bevio
from bevjepa.datasets import preprocess, windows, workers


def _timed_run(
    dataroot: Path,
    version: str,
    out: Path,
    pool: workers.SequentialPool | workers.RayPool,
    window: windows.WindowConfig,
) -> tuple[float, list[preprocess.SceneResult]]:
    """Preprocess every scene through ``pool`` into ``out``; returns the wall time and the scenes' results."""
    config = preprocess.PreprocessConfig(dataroot=dataroot, out=out, version=version, window=window)
    source = preprocess._cached_source(config.source_config())
    tasks = preprocess.scene_tasks(config, source)
    out.mkdir(parents=True)
    start = time.perf_counter()
    indexed = sorted(pool.map_unordered(preprocess.process_scene, tasks), key=lambda pair: pair[0])
    seconds = time.perf_counter() - start
    results = [result for _, result in indexed]
    bevio.atomic_write_json(out / "manifest.json", preprocess.build_manifest(config, results))
    return seconds, results


def preprocess_throughput(
    dataroot: Path, version: str = "v1.0-mini", window: windows.WindowConfig | None = None
) -> dict:
    """Windows per second: a plain single-process loop, then Ray with 1 and with 2 workers, in one run.

    Ray is started once (2 CPUs) before the Ray runs, so its start-up is not counted; each Ray worker loads the
    devkit's tables once, inside the timing, as a real run does. Every run writes to its own temporary folder.

    Returns:
        windows, ``loop_windows_per_s``, ``ray1_windows_per_s``, ``ray2_windows_per_s``, ``ray2_over_ray1``,
        ``ray2_over_loop``, ``peak_worker_memory_mb``, ``bytes_per_window`` (its file plus its share of frames),
        and the windows per second the torch loader delivers (batch 4; 0 and 2 loader workers) against plain
        file loading.
    """
    import ray

    window = window or windows.WindowConfig()
    parent = Path(tempfile.mkdtemp(prefix="bevjepa-bench-preprocess-"))
    try:
        loop_s, loop_results = _timed_run(dataroot, version, parent / "loop", workers.SequentialPool(), window)
        started_here = workers.init_ray(2)  # local, loopback only; an already running Ray is used as it is
        try:
            one = workers.RayPool(1)
            ray1_s, _ = _timed_run(dataroot, version, parent / "ray1", one, window)
            two = workers.RayPool(2)
            ray2_s, ray2_results = _timed_run(dataroot, version, parent / "ray2", two, window)
        finally:
            if started_here:
                ray.shutdown()
        count = sum(len(r.windows) for r in loop_results)
        total_bytes = sum(f.stat().st_size for f in (parent / "loop").rglob("*.npz"))
        from bevjepa.datasets import torch_dataset

        loader0 = torch_dataset.loader_throughput(parent / "loop", batch_size=4, num_workers=0)
        loader2 = torch_dataset.loader_throughput(parent / "loop", batch_size=4, num_workers=2)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return {
        "windows": count,
        "loop_windows_per_s": count / loop_s,
        "ray1_windows_per_s": count / ray1_s,
        "ray2_windows_per_s": count / ray2_s,
        "ray2_over_ray1": ray1_s / ray2_s,
        "ray2_over_loop": loop_s / ray2_s,
        "peak_worker_memory_mb": max(r.peak_memory_bytes for r in ray2_results) / 1e6,
        "bytes_per_window": total_bytes / max(count, 1),
        "points_per_window": loader0["points_per_window"],
        "loader_windows_per_s_0_workers": loader0["loader_windows_per_s"],
        "loader_windows_per_s_2_workers": loader2["loader_windows_per_s"],
        "plain_file_loading_windows_per_s": loader0["plain_windows_per_s"],
    }
