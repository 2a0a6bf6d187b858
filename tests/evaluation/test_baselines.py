"""Baselines: constant velocity against the devkit's ConstantVelocityHeading on the real scene-0916, CTRV on a
circle, detection-based constant velocity, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.prediction import metrics as devkit_metrics
from nuscenes.prediction import PredictHelper
from nuscenes.prediction.models.physics import ConstantVelocityHeading

from bevjepa.datasets import categories, geometry, windows
from bevjepa.evaluation import baselines, metrics
from bevjepa.prediction import tracking


def test_constant_velocity_heading_equals_the_devkit_on_scene_0916(real_scene_nusc):
    helper = PredictHelper(real_scene_nusc)
    reference_model = ConstantVelocityHeading(6, helper)
    annotations = [
        a for a in real_scene_nusc.sample_annotation if categories.class_index(a["category_name"]) >= 0
    ]  # every agent of a predicted class at every one of the 41 keyframes
    instances = [a["instance_token"] for a in annotations]
    samples = [a["sample_token"] for a in annotations]
    xy, speed, yaw = baselines.devkit_kinematics(helper, instances, samples)
    assert np.isnan(speed).any() and (np.nan_to_num(speed) > 1.0).any()  # first sightings and movers
    ours = baselines.constant_velocity_heading(xy, speed, yaw, seconds=6.0, frequency_hz=2.0)  # [A, 1, 12, 2]
    reference = np.stack([reference_model(f"{i}_{s}").prediction for i, s in zip(instances, samples, strict=True)])
    assert ours.shape == reference.shape == (len(annotations), 1, 12, 2)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9)

    # Every agent it can score (a whole 6 s future): the same minADE, minFDE and misses as the devkit's metrics.
    futures = [
        helper.get_future_for_agent(i, s, 6, in_agent_frame=False) for i, s in zip(instances, samples, strict=True)
    ]
    scored = np.array([len(f) == 12 for f in futures])
    assert scored.sum() > 100
    truth = np.stack([f for f, keep in zip(futures, scored, strict=True) if keep])
    one = np.ones((len(truth), 1))
    ade, fde = metrics.min_ade_fde(ours[scored], one, truth, 1)
    miss = metrics.miss_rate(ours[scored], one, truth, 1)
    expected = np.array(
        [
            [
                devkit_metrics.min_ade_k(r, devkit_metrics.stack_ground_truth(t, 1), np.ones(1))[0, 0],
                devkit_metrics.min_fde_k(r, devkit_metrics.stack_ground_truth(t, 1), np.ones(1))[0, 0],
                devkit_metrics.miss_rate_top_k(r, devkit_metrics.stack_ground_truth(t, 1), np.ones(1), 2.0)[0, 0],
            ]
            for r, t in zip(reference[scored], truth, strict=True)
        ]
    )
    np.testing.assert_allclose(np.stack([ade, fde, miss], axis=1), expected, rtol=0, atol=1e-9)


def test_heading_velocity_treats_an_unknown_speed_as_standing_still():
    velocity = baselines.heading_velocity(np.array([2.0, np.nan]), np.array([np.pi / 2, 0.3]))
    np.testing.assert_allclose(velocity, [[0.0, 2.0], [0.0, 0.0]], atol=1e-12)


def test_ctrv_recovers_a_circle_and_continues_it():
    radius_m, speed_mps = 20.0, 8.0
    rate = speed_mps / radius_m  # rad/s, counter-clockwise

    def on_circle(t: np.ndarray) -> np.ndarray:
        angle = rate * t - np.pi / 2  # at t = 0: (0, -R) relative to the centre, heading +x
        return np.stack([radius_m * np.cos(angle), radius_m * np.sin(angle) + radius_m], axis=-1)

    past = on_circle(np.array([-1.0, -0.5, 0.0]))[None]  # [1, 3, 2], t0 last, at the origin
    yaw_rate = baselines.yaw_rate_from_past(past, np.ones((1, 3), bool))
    assert yaw_rate[0] == pytest.approx(rate, rel=1e-12)
    future = baselines.ctrv_trajectories(past[:, -1], np.array([[speed_mps, 0.0]]), yaw_rate, steps=12)
    np.testing.assert_allclose(future[0, 0], on_circle(np.arange(1, 13) * 0.5), atol=1e-9)
    # The same turning the other way, then a yaw rate too large to keep.
    mirrored = past * np.array([1.0, -1.0])
    assert baselines.yaw_rate_from_past(mirrored, np.ones((1, 3), bool))[0] == pytest.approx(-rate, rel=1e-12)
    tight = on_circle(np.array([-1.0, -0.5, 0.0])) / 10  # radius 2 m at 0.8 m/s: 0.4 rad/s, still fine
    assert baselines.yaw_rate_from_past(tight[None], np.ones((1, 3), bool))[0] == pytest.approx(rate)
    sharp = np.array([[[0.0, -2.0], [1.0, -1.0], [0.0, 0.0]]])  # a 90 degree turn in 0.5 s
    assert baselines.yaw_rate_from_past(sharp, np.ones((1, 3), bool))[0] == baselines.MAX_YAW_RATE_RADPS


def test_ctrv_without_a_turn_is_constant_velocity_and_slow_or_unseen_agents_do_not_turn():
    xy = np.array([[1.0, 2.0], [3.0, -4.0]])
    velocity = np.array([[5.0, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(
        baselines.ctrv_trajectories(xy, velocity, np.zeros(2), 12),
        baselines.constant_velocity_trajectories(xy, velocity, 12),
    )
    wiggle = np.array([[[0.0, 0.0], [0.1, 0.05], [0.2, 0.0]]])  # 0.2 m/s: direction is noise
    assert baselines.yaw_rate_from_past(wiggle, np.ones((1, 3), bool))[0] == 0.0
    turning = np.array([[[0.0, -2.0], [2.0, -1.0], [4.0, 0.0]]])
    assert baselines.yaw_rate_from_past(turning, np.array([[False, True, True]]))[0] == 0.0


def test_ctrv_occupancy_turns_the_boxes():
    grid = geometry.GridSpec()
    box = np.array([[0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0]])
    occupancy, ids = baselines.ctrv_occupancy(box, np.array([0]), np.array([[6.0, 0.0]]), np.array([1.0]), grid, 3, 4)
    assert occupancy.shape == (5, 3, 128, 128) and ids.shape == (5, 128, 128)
    straight, _ = baselines.constant_velocity_occupancy_instances(box, np.array([0]), np.array([[6.0, 0.0]]), grid, 3)
    np.testing.assert_array_equal(occupancy[0], straight[0])  # t0 is the box itself
    assert not np.array_equal(occupancy[4], straight[4])
    # At 2 s the box has turned 2 rad: its centre is on the circle of radius 6 m.
    rows, cols = np.nonzero(occupancy[4, 0])
    centre = grid.index_to_xy(rows, cols).mean(axis=0)
    np.testing.assert_allclose(centre, [6.0 * np.sin(2.0), 6.0 * (1 - np.cos(2.0))], atol=0.3)
    assert set(np.unique(ids[4])) == {0, 1}


def test_constant_velocity_tracked_moves_tracks_as_the_oracle_moves_boxes(synthetic_windows: Path):
    window = windows.load_window(sorted((synthetic_windows / "windows").rglob("*.npz"))[0])
    grid = geometry.GridSpec()
    box = window.agent_box.astype(np.float64)
    velocity = np.nan_to_num(window.agent_velocity.astype(np.float64))
    a = len(box)
    tracks = tracking.TrackedAgents(
        ids=np.array([str(i) for i in range(a)], dtype=str).reshape(-1),
        classes=window.agent_class.astype(np.int64),
        boxes=box,
        velocity=velocity,
        scores=np.ones(a),
        past=np.zeros((a, 3, 2)),
        past_mask=np.ones((a, 3), dtype=bool),
        detected_velocity=velocity,
    )
    occupancy, ids = baselines.constant_velocity_tracked(tracks, grid, 3, 4)
    oracle, oracle_ids = baselines.constant_velocity_occupancy_instances(
        box, window.agent_class.astype(np.int64), velocity, grid, 3, 4
    )
    np.testing.assert_array_equal(occupancy, oracle)
    np.testing.assert_array_equal(ids, oracle_ids)
    # At t0 both equal the ground truth of the agents.
    np.testing.assert_array_equal(occupancy[0], window.occupancy[0])
    nothing = tracking.track_window(
        [tracking.FrameDetections(np.zeros((0, 7)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int64))]
    )
    empty, empty_ids = baselines.constant_velocity_tracked(nothing, grid, 3, 4)
    assert not empty.any() and not empty_ids.any()


def test_true_track_velocities_take_the_matched_agents_velocity():
    tracks = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    true = np.array([[0.0, 5.0], [0.0, 6.0], [0.0, 7.0], [0.0, 8.0]])
    match = np.array([2, -1, 0, -1])  # annotated agent 0 is track 2, agent 2 track 0; track 1 matched nobody
    velocity = baselines.true_track_velocities(tracks, match, true)
    np.testing.assert_array_equal(velocity, [[0.0, 7.0], [2.0, 0.0], [0.0, 5.0]])
    np.testing.assert_array_equal(tracks[:, 0], [1.0, 2.0, 3.0])  # the tracks' own array is not written
    assert baselines.true_track_velocities(np.zeros((0, 2)), np.full(4, -1), true).shape == (0, 2)


def test_persistence_repeats_t0():
    occupancy = np.zeros((3, 4, 4), bool)
    occupancy[1, 2, 2] = True
    repeated = baselines.persistence_occupancy(occupancy, 4)
    assert repeated.shape == (5, 3, 4, 4) and all(np.array_equal(r, occupancy) for r in repeated)
