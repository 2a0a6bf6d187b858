"""Forecasts from the sensors alone: ``WindowSample.sensors_only`` and the tracked-agent path of the forecast API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bevjepa.datasets import categories, torch_dataset
from bevjepa.prediction import agent_occupancy, forecaster, lidar_velocity


@pytest.fixture(scope="module")
def dataset(synthetic_windows) -> torch_dataset.WindowDataset:
    return torch_dataset.WindowDataset(synthetic_windows, future_inputs=True)


def test_sensors_only_empties_every_annotation_and_keeps_every_sensor(dataset):
    window = dataset[0]
    assert window.agent_count > 0 and window.occupancy.any() and window.future is not None
    blind = window.sensors_only()
    assert blind.agent_count == 0 and blind.agent_ids == ()
    for name in ("agent_box", "agent_velocity", "agent_past", "agent_past_mask", "agent_future", "agent_future_mask"):
        assert getattr(blind, name).shape[0] == 0, name
    assert blind.occupancy.shape[0] == 0 and blind.instances.shape[0] == 0 and blind.future is None
    for name in ("points", "points_frame", "images", "camera_mask", "intrinsics", "t0_from_camera", "t0_from_ego"):
        assert torch.equal(getattr(blind, name), getattr(window, name)), name
    assert torch.equal(blind.actions, window.actions) and blind.frame_tokens == window.frame_tokens
    torch_dataset.collate([blind, dataset[1].sensors_only()])  # batches as any window does


def test_a_forecast_reads_the_sensors_and_never_the_annotations(dataset, tiny_checkpoint):
    # min_score 0: the one-step model's detections all become agents, so the tracked path carries many of them.
    model = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0)
    window = dataset[0]
    blind = model.forecast(window.sensors_only())
    assert blind.agent_ids.size > 0 and len(set(blind.agent_ids.tolist())) == blind.agent_ids.size
    assert blind.agent_scores is not None and blind.agent_scores.shape == blind.agent_ids.shape
    assert np.all(np.diff(blind.agent_scores) <= 0)  # best first
    assert np.isfinite(blind.trajectories).all()
    # The fused occupancy: the tracks' boxes along their modes joined with the dense map.
    instance = agent_occupancy.mode_occupancy(
        np.zeros((0, 7)), np.zeros(0, np.int64), np.zeros((0, 10, 12, 2)), np.zeros((0, 10)), blind.grid, 3, 4
    )
    assert blind.latent_occupancy is not None
    joined = np.ones(blind.occupancy.shape[:2], dtype=bool)  # [S, C] where the dense map joins every track
    joined[1:, categories.CLASSES.index("pedestrian")] = False  # near its track, a pedestrian's future is the track's
    joined[2:, categories.CLASSES.index("vehicle")] = False  # a vehicle's from 1 s on
    assert np.all(blind.occupancy[joined] >= blind.latent_occupancy[joined])
    nowhere = np.zeros(blind.latent_occupancy.shape[1:], dtype=bool)  # no track explains any cell: the dense map stands
    people = np.ones(blind.occupancy.shape[:2], dtype=bool)
    people[1:, categories.CLASSES.index("pedestrian")] = False  # but a pedestrian's future is its track's alone
    expected = np.where(people[:, :, None, None], blind.latent_occupancy, 0.0)
    assert np.array_equal(agent_occupancy.fuse(instance, blind.latent_occupancy, nowhere), expected)
    all_classes = agent_occupancy.fuse(instance, blind.latent_occupancy, nowhere, untracked_future=categories.CLASSES)
    assert np.array_equal(all_classes, blind.latent_occupancy)
    expected = np.where(joined[:, :, None, None], blind.latent_occupancy, 0.0)
    assert np.array_equal(agent_occupancy.fuse(instance, blind.latent_occupancy, ~nowhere), expected)
    every = agent_occupancy.fuse(
        instance, blind.latent_occupancy, ~nowhere, dense_future={c: 4 for c in categories.CLASSES}
    )
    assert np.array_equal(every, blind.latent_occupancy)
    # The tracks' share: their boxes along their modes, each there with its score, pooled with the dense map's support
    # after t0 for vehicles; a cyclist's t0 is the dense map's alone (``track_existence``).
    boxes = blind.agent_boxes.astype(np.float64)
    existence = agent_occupancy.track_existence(
        blind.agent_scores, boxes, blind.agent_classes, blind.latent_occupancy[0], blind.grid, 4
    )
    assert existence.shape == (5, blind.agent_ids.size)
    assert (existence[1:] != existence[0]).any()  # vehicle tracks here: the pool moves their existence
    tracked = agent_occupancy.mode_occupancy(
        boxes, blind.agent_classes, blind.trajectories, blind.mode_probabilities, blind.grid, 3, 4, existence
    )
    explained = agent_occupancy.track_footprint(boxes, blind.agent_classes, blind.trajectories, blind.grid, 3, 4)
    assert explained.any() and not explained.all()
    np.testing.assert_allclose(
        blind.occupancy, agent_occupancy.fuse(tracked, blind.latent_occupancy, explained), atol=1e-6
    )
    cyclist = categories.CLASSES.index("cyclist")  # at t0 the cyclists are the dense map's alone, tracked or not
    assert (blind.agent_classes == cyclist).any()
    np.testing.assert_array_equal(blind.occupancy[0, cyclist], blind.latent_occupancy[0, cyclist])
    # The annotated window gives the same forecast: nothing annotated is read (fresh forecaster, fresh ids).
    again = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0).forecast(window)
    np.testing.assert_array_equal(again.agent_ids, blind.agent_ids)
    np.testing.assert_allclose(again.trajectories, blind.trajectories, atol=1e-5)
    np.testing.assert_allclose(again.occupancy, blind.occupancy, atol=1e-5)


def test_a_stream_gives_new_ids_to_a_window_that_does_not_follow_the_last(dataset, tiny_checkpoint):
    model = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0)
    window = dataset[0].sensors_only()
    first, second = model.forecast(window), model.forecast(window)  # the same t0 twice: no link, new tracks
    assert first.agent_ids.size == second.agent_ids.size > 0
    assert not set(first.agent_ids.tolist()) & set(second.agent_ids.tolist())


def test_moving_tracks_take_the_velocity_of_their_lidar_points(dataset, tiny_checkpoint):
    # min_score 0: the one-step model's every heat-map peak is a track, and its regressed velocities move some (at
    # the grid's edge, where few points lie: the search itself is tested in test_lidar_velocity.py). Here: the
    # forecaster refines the tracker's agents with the window's own points, and changes nothing but velocities.
    window = dataset[1].sensors_only()
    batch = torch_dataset.collate([window])
    fitted = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0, velocity_from_points=False)
    model = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0)
    tracker_only, refined = fitted.track(batch)[0], model.track(batch)[0]
    assert (np.hypot(*tracker_only.velocity.T) > 0).any()
    expected = lidar_velocity.refine(tracker_only, window.points.numpy())
    np.testing.assert_array_equal(refined.velocity, expected.velocity)
    np.testing.assert_array_equal(refined.ids, tracker_only.ids)
    np.testing.assert_array_equal(refined.boxes, tracker_only.boxes)
    assert not fitted.using("annotated").velocity_from_points  # a sibling forecaster keeps the choice


def test_the_annotated_agent_path_is_an_explicit_choice(dataset, tiny_checkpoint):
    window = dataset[0]
    annotated = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, agents="annotated")
    forecast = annotated.forecast(window)
    assert forecast.agent_ids.tolist() == list(window.agent_ids) and forecast.agent_scores is None
    assert forecast.occupancy[0].max() == 1.0  # the annotated t0 boxes themselves
    assert annotated.forecast(window.sensors_only()).agent_ids.size == 0
    with pytest.raises(ValueError, match=r"agents must be one of \('tracked', 'annotated'\)"):
        forecaster.Forecaster(annotated.net, agents="oracle")


def test_forecast_files_keep_the_agent_scores(dataset, tiny_checkpoint, tmp_path):
    forecast = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0).forecast(dataset[1].sensors_only())
    loaded = forecaster.OccupancyForecast.load(forecast.save(tmp_path / "forecast"))
    assert loaded.agent_scores is not None
    np.testing.assert_array_equal(loaded.agent_scores, forecast.agent_scores)
    np.testing.assert_array_equal(loaded.agent_ids, forecast.agent_ids)


def test_the_report_draws_tracked_agents_that_are_not_the_annotated_ones(dataset, tiny_checkpoint, tmp_path):
    from bevjepa.evaluation.report import plots, rerun_recording

    samples = [dataset[0], dataset[1]]
    model = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0)
    forecasts = [model.forecast(sample) for sample in samples]
    assert forecasts[0].agent_ids.size != samples[0].agent_count  # the tracks are the model's, not the annotations
    assert plots.plot_trajectories(samples[0], forecasts[0], tmp_path / "t.png").stat().st_size > 0
    # the animation of the first window alone, the one whose tracks are not its annotations (five frames, not ten)
    assert plots.scene_animation(samples[:1], forecasts[:1], tmp_path / "s.gif").stat().st_size > 0
    assert rerun_recording.record(samples, forecasts, tmp_path / "r.rrd", cameras=False).stat().st_size > 0


def test_the_latency_bench_times_sensor_only_forecasts_of_a_trained_run(
    synthetic_windows, tiny_checkpoint, tiny_direct_checkpoint
):
    from bevjepa.prediction import bench

    # A run (cameras and LiDAR) and another timed beside it in the same run: each its own times, and the ratios
    # against the other's. Two different models, so that a run and its baseline swapped would show.
    result = bench.stream_latency(
        synthetic_windows, windows=2, threads=1, run=tiny_checkpoint, baseline=tiny_direct_checkpoint
    )
    assert result["model"] == str(tiny_checkpoint) and result["forecasts"] == 1
    for key in ("cold_ms", "streaming_ms", "cold_reference_ms", "streaming_reference_ms", "annotated_streaming_ms"):
        assert result[key] > 0, key
    assert result["streaming_tracker_velocity_ms"] > 0
    assert result["velocity_from_points_cost"] == pytest.approx(
        result["streaming_ms"] / result["streaming_tracker_velocity_ms"]
    )
    assert result["tracked_agents_per_forecast"] >= 0
    assert result["max_occupancy_diff"] < 1e-5
    assert result["baseline"] == str(tiny_direct_checkpoint)
    assert result["baseline_cold_ms"] > 0 and result["baseline_streaming_ms"] > 0
    assert result["cold_over_baseline"] == pytest.approx(result["cold_ms"] / result["baseline_cold_ms"])


def test_the_evaluation_bench_shares_one_scene_and_forecasts_the_same(synthetic_windows, tiny_checkpoint, capsys):
    from bevjepa.prediction import bench
    from bevjepa.tools import cli

    # The evaluation's three calls on each batch (tracks, their forecast, the annotated agents' forecast), each
    # predicting its own scene or sharing one: the same forecasts, and a time for each.
    result = bench.evaluation_pass(synthetic_windows, run=tiny_checkpoint, windows=2, batch_size=2, threads=1)
    assert result["model"] == str(tiny_checkpoint) and result["windows"] == 2
    assert result["each_its_own_ms_per_window"] > 0 and result["shared_ms_per_window"] > 0
    assert result["speedup"] == pytest.approx(result["each_its_own_ms_per_window"] / result["shared_ms_per_window"])
    assert result["max_occupancy_diff"] < 1e-5
    assert cli.main(["bench", "evaluation"]) == 2
    assert "bench evaluation needs --data" in capsys.readouterr().err


def test_the_model_bench_names_a_missing_gpu(synthetic_windows, capsys):
    from bevjepa.tools import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = ["bench", "model", "--data", str(synthetic_windows), "--config", "base", "--device", "cuda"]
    assert cli.main(argv) == 2
    assert "bench model --device cuda: no CUDA device here" in capsys.readouterr().err


@torch.no_grad()
def test_the_shared_scene_pass_forecasts_what_the_reference_path_does(dataset, tiny_checkpoint):
    """One scene pass feeding tracker and trajectories, the cached splat: the same forecasts as before them.

    The two paths batch their convolutions differently, which rounds differently on some CPUs (AVX2 against
    AVX-512), and the one-step model's flat heat map then decodes near-tied peaks into other tracks. So the heat maps
    are held to float noise, and the forecasts are compared on the same tracks.
    """
    from bevjepa.prediction import bench

    # min_score 0: every detection of the one-step model becomes a track, so a changed score would show. No frame
    # cache: over a stream the current path reads earlier keyframes' detections from earlier forecasts.
    now = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, min_score=0.0)
    before = forecaster.Forecaster(now.net, min_score=0.0, reference=True)
    stream = [
        dataset[i].sensors_only()
        for i in range(len(dataset))
        if dataset.entries[i]["scene"] == dataset.entries[0]["scene"]
    ]
    assert len(stream) >= 2
    for window in stream:
        batch = torch_dataset.collate([window])
        own = now.encode_frames(batch)
        scene = now.net.scene(batch, None, own)
        with bench.reference_splat(before.net):
            expected = before.keyframe_detections(batch)
        for shared, reference in zip(now.keyframe_detections(batch, own, scene), expected, strict=True):
            assert shared.shape == reference.shape and shared.shape[1] == batch.t0_from_ego.shape[1]
            torch.testing.assert_close(shared, reference, rtol=0.0, atol=1e-5)
        tracks = now.track(batch, own, scene)
        assert tracks[0].ids.size > 0
        current = now.forecast_batch(batch, tracks=tracks)[0]
        with bench.reference_splat(before.net):
            reference = before.forecast_batch(batch, tracks=tracks)[0]
        np.testing.assert_array_equal(current.agent_ids, reference.agent_ids)
        np.testing.assert_array_equal(current.agent_scores, reference.agent_scores)
        np.testing.assert_allclose(current.trajectories, reference.trajectories, atol=1e-3)  # m
        np.testing.assert_allclose(current.occupancy, reference.occupancy, atol=1e-5)


@torch.no_grad()
def test_a_stream_detects_each_keyframe_once_when_it_is_the_present(dataset, tiny_checkpoint):
    first, second = (dataset[i].sensors_only() for i in (0, 1))
    assert first.scene_name == second.scene_name and second.frame_tokens[-2] == first.frame_tokens[-1]
    streaming = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, cache_frames=16)
    batches = [torch_dataset.collate([window]) for window in (first, second)]
    (heat0, regression0), (heat1, regression1) = (
        streaming.keyframe_detections(batch, scene=streaming.scene(batch)) for batch in batches
    )
    # The second window's previous keyframe is read as detected when it was the first window's present.
    torch.testing.assert_close(heat1[:, -2], heat0[:, -1], rtol=0.0, atol=0.0)
    torch.testing.assert_close(regression1[:, -2], regression0[:, -1], rtol=0.0, atol=0.0)
    # Cold, it would be detected again from the second window's own frames (the oldest standing in for the one
    # before it): the same encodings, another detection.
    own = streaming.encode_frames(batches[1])  # cached: the very latents the stream used
    heat_cold, _ = streaming.net.detect_frames(own, batches[1].t0_from_ego, [heat1.shape[1] - 2])
    assert float((heat_cold[:, 0] - heat1[:, -2]).abs().max()) > 1e-4
    # Both windows in one batch read the same detections as one after the other.
    together = forecaster.Forecaster(streaming.net, cache_frames=16)
    both = torch_dataset.collate([first, second])
    heat_both, regression_both = together.keyframe_detections(both, scene=together.scene(both))
    torch.testing.assert_close(heat_both[1], heat1[0], rtol=0.0, atol=1e-3)  # float noise of batching
    torch.testing.assert_close(regression_both[1], regression1[0], rtol=0.0, atol=1e-3)
    assert len(together._detections) == 2  # each present kept once


def test_mismatched_inputs_are_refused_by_name(dataset, tiny_checkpoint):
    with pytest.raises(ValueError, match=r"fuse: instance \[5, 3, 4, 4\] and dense \[5, 3, 8, 8\] must match"):
        agent_occupancy.fuse(np.zeros((5, 3, 4, 4)), np.zeros((5, 3, 8, 8)), np.zeros((3, 8, 8), bool))
    with pytest.raises(ValueError, match=r"must match, \[S, 3, H, W\]"):  # two classes: not the model's three
        agent_occupancy.fuse(np.zeros((5, 2, 4, 4)), np.zeros((5, 2, 4, 4)), np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match=r"fuse: explained must be \[C, H, W\] = \[3, 4, 4\], got \[3, 8, 8\]"):
        agent_occupancy.fuse(np.zeros((5, 3, 4, 4)), np.zeros((5, 3, 4, 4)), np.zeros((3, 8, 8), bool))
    with pytest.raises(ValueError, match=r"fuse: untracked_future names \['truck'\]"):
        agent_occupancy.fuse(np.zeros((5, 3, 4, 4)), np.zeros((5, 3, 4, 4)), np.zeros((3, 4, 4), bool), {}, ("truck",))
    with pytest.raises(ValueError, match=r"fuse: dense_future names \['truck'\]"):
        agent_occupancy.fuse(
            np.zeros((5, 3, 4, 4)), np.zeros((5, 3, 4, 4)), np.zeros((3, 4, 4), bool), {"vehicle": 4, "truck": 4}
        )
    model = forecaster.Forecaster.from_checkpoint(tiny_checkpoint)
    batch = torch_dataset.collate([dataset[0].sensors_only()])
    with pytest.raises(ValueError, match=r"tracks are for tracked agents, one per window \(1\)"):
        model.forecast_batch(batch, tracks=[])
    with pytest.raises(ValueError, match="tracks are for tracked agents"):
        model.using("annotated").forecast_batch(batch, tracks=model.track(batch))
    # A shared scene must be this batch's, every step decoded, under the ego's own motion.
    scene = model.scene(batch)
    two = torch_dataset.collate([dataset[0].sensors_only(), dataset[1].sensors_only()])
    t0_only = model.net.scene(batch, None, scene.own, decode=(0,))
    actions = torch.zeros(1, scene.rollout.shape[1], 3)
    for bad_batch, bad_scene, bad_actions in ((two, scene, None), (batch, t0_only, None), (batch, scene, actions)):
        with pytest.raises(ValueError, match="scene must be this batch's Forecaster.scene"):
            model.forecast_batch(bad_batch, bad_actions, scene=bad_scene)
    with pytest.raises(ValueError, match="the reference path predicts its own"):
        forecaster.Forecaster(model.net, reference=True).forecast_batch(batch, scene=scene)
    shared = model.forecast_batch(batch, scene=scene)[0]
    assert shared.occupancy.shape == model.forecast_batch(batch)[0].occupancy.shape
