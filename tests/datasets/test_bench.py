"""The preprocessing stage breakdown: it times both builds and leaves the timed functions as they were."""

from __future__ import annotations

from bevjepa.datasets import bench, nuscenes_source, preprocess, rasterize, windows


def test_stage_breakdown_times_both_builds_and_restores_the_functions(synthetic_mini):
    before = [getattr(owner, name) for owner, name, _ in bench._STAGES]
    result = bench.preprocess_stages(synthetic_mini, scenes=1)
    assert result["windows"] == 2
    assert result["ms_per_window_reference"] > 0 and result["ms_per_window"] > 0
    for stage in ("sweep_aggregation", "voxel_downsample", "npz_compress_write", "window_observed_cells"):
        assert result[f"{stage}_ms_reference"] > 0 and result[f"{stage}_ms"] > 0
    # Each stage counts its own time only: together they are the run's time.
    for suffix in ("_reference", ""):
        stages = sum(value for key, value in result.items() if key.endswith(f"_ms{suffix}"))
        assert abs(stages - result[f"ms_per_window{suffix}"]) < 0.05 * result[f"ms_per_window{suffix}"]
    assert [getattr(owner, name) for owner, name, _ in bench._STAGES] == before
    assert windows.build_frame is before[7] and rasterize.observed_cells is before[11]
    assert nuscenes_source.read_lidar_file is before[0] and preprocess.process_scene is before[-1]
