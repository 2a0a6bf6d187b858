"""Tracking the model's own detections: association, ego-motion compensation, stream ids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bevjepa.datasets import geometry, rasterize
from bevjepa.prediction import heads, tracking

CAR, PEDESTRIAN = 0, 1


def _frame(boxes_xy, velocity, classes, scores=None) -> tracking.FrameDetections:
    xy = np.asarray(boxes_xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    boxes = np.concatenate([xy, np.full((n, 1), 0.8), np.tile([1.9, 4.5, 1.6], (n, 1)), np.zeros((n, 1))], axis=1)
    return tracking.FrameDetections(
        boxes,
        np.asarray(velocity, dtype=np.float64).reshape(-1, 2),
        np.full(n, 0.9) if scores is None else np.asarray(scores, dtype=np.float64),
        np.asarray(classes, dtype=np.int64).reshape(-1),
    )


def test_a_car_and_a_pedestrian_become_two_agents_with_their_whole_past():
    # A car at 10 m/s along x and a pedestrian at 1.5 m/s along y, detected at all three keyframes.
    frames = [
        _frame([[10.0 + 5 * k, 0.0], [0.0, 3.0 + 0.75 * k]], [[10.0, 0.0], [0.0, 1.5]], [CAR, PEDESTRIAN])
        for k in range(3)
    ]
    agents = tracking.track_window(frames)
    assert agents.count == 2
    assert agents.past_mask.all()
    car = int(np.flatnonzero(agents.classes == CAR)[0])
    np.testing.assert_allclose(agents.past[car], [[10, 0], [15, 0], [20, 0]])
    np.testing.assert_allclose(agents.boxes[car, :2], [20, 0])
    np.testing.assert_allclose(agents.velocity[car], [10, 0])


def test_the_track_velocity_weighs_the_earlier_detections_against_the_regressed_one():
    # A car moving 10 m/s along x whose t0 detection regresses 6 m/s: its earlier detections pull the velocity
    # toward 10 by their weight (closed form of fit_velocity: Σ t² / σ_p² = (0.25 + 1) / 0.16, 1 / σ_v² = 1).
    frames = [_frame([[10.0 + 5 * k, 0.0]], [[10.0, 0.0] if k < 2 else [6.0, 0.0]], [CAR]) for k in range(3)]
    agents = tracking.track_window(frames)
    sum_t2 = (0.25 + 1.0) / tracking.POSITION_ERROR_M["vehicle"] ** 2
    prior = 1.0 / tracking.VELOCITY_ERROR_MPS["vehicle"] ** 2
    np.testing.assert_allclose(agents.velocity[0], [(sum_t2 * 10 + prior * 6) / (sum_t2 + prior), 0.0])
    assert 9.0 < agents.velocity[0, 0] < 10.0
    # Only the t0 detection: the regressed velocity stands; the motion past runs back along it from the t0 centre.
    alone = tracking.track_window(
        [_frame(np.zeros((0, 2)), np.zeros((0, 2)), []), _frame([[3.0, 1.0]], [[2, 0]], [CAR])]
    )
    np.testing.assert_allclose(alone.velocity, [[2, 0]])
    np.testing.assert_allclose(alone.motion_past(2), [[[2, 1], [3, 1]]])
    assert alone.past_mask.tolist() == [[False, True]]  # the detections themselves stay as they were


def test_a_track_slower_than_its_class_velocity_error_stands_still():
    # Each class's threshold is its VELOCITY_ERROR_MPS (vehicle 1.0, pedestrian 0.4 m/s): a car regressed at
    # 0.9 m/s and a pedestrian at 0.3 m/s stand still; a car at 1.2 m/s and a pedestrian at 0.5 m/s keep theirs.
    speeds = {CAR: (0.9, 1.2), PEDESTRIAN: (0.3, 0.5)}
    for cls, (slow, fast) in speeds.items():
        frame = _frame([[5.0, 0.0], [-5.0, 10.0]], [[0.0, slow], [-fast * 0.6, fast * 0.8]], [cls, cls])
        agents = tracking.track_window([frame])
        order = np.argsort(agents.boxes[:, 0])[::-1]  # the slow one (x = 5) first
        np.testing.assert_allclose(agents.velocity[order], [[0.0, 0.0], [-fast * 0.6, fast * 0.8]])
        np.testing.assert_allclose(
            agents.motion_past(1)[order[0]], [[5.0, 0.0]]
        )  # a standing agent's past is its place
    # The rule reads the fitted velocity: earlier detections that move the car 1.5 m/s lift a 0.5 m/s regression.
    frames = [_frame([[1.5 * 0.5 * k, 0.0]], [[0.5, 0.0]], [CAR]) for k in range(3)]
    moving = tracking.track_window(frames).velocity[0, 0]
    assert tracking.VELOCITY_ERROR_MPS["vehicle"] < moving < 1.5
    np.testing.assert_allclose(tracking.standing_still(np.array([[0.6, 0.0]]), np.array([CAR])), [[0.0, 0.0]])


def test_a_stray_earlier_detection_moves_the_velocity_less_than_it_moves_a_difference():
    # A pedestrian walking 1.5 m/s along y, its t-1 s detection 0.4 m off: the second-order difference the
    # trajectory head would take from raw detections errs by 0.4 m/s, the fitted velocity by less.
    truth = np.array([0.0, 1.5])
    centres = [[0.0, 0.0 + 0.4], [0.0, 0.75], [0.0, 1.5]]
    frames = [_frame([c], [truth], [PEDESTRIAN]) for c in centres]
    agents = tracking.track_window(frames)
    past = agents.past[0]
    difference = (3 * past[2] - 4 * past[1] + past[0]) / (2 * tracking.KEYFRAME_S)
    assert np.linalg.norm(difference - truth) == pytest.approx(0.4)
    assert np.linalg.norm(agents.velocity[0] - truth) < 0.3  # 0.27: the stray point weighs most (t = -1 s)


def test_the_velocity_decides_which_track_a_detection_continues():
    # Two cars 4 m apart at t-0.5 s; at t0 one detection 5 m ahead of the first, moving at 10 m/s: it continues
    # the first (compensated distance 0), though the second car's old position is nearer (1 m).
    frames = [
        _frame([[0.0, 0.0], [6.0, 0.0]], [[10.0, 0.0], [0.0, 0.0]], [CAR, CAR]),
        _frame([[5.0, 0.0]], [[10, 0]], [CAR]),
    ]
    agents = tracking.track_window(frames)
    assert agents.count == 1
    np.testing.assert_allclose(agents.past[0], [[0, 0], [5, 0]])


def test_classes_never_share_a_track_and_a_new_detection_has_only_its_t0_position():
    frames = [_frame([[0.0, 0.0]], [[0, 0]], [CAR]), _frame([[0.2, 0.0]], [[0, 0]], [PEDESTRIAN])]
    agents = tracking.track_window(frames)
    assert agents.count == 1 and agents.classes[0] == PEDESTRIAN
    assert agents.past_mask.tolist() == [[False, True]]
    assert agents.past[0, 0].tolist() == [0.0, 0.0]


def test_the_best_scoring_detection_takes_a_contested_track():
    frames = [
        _frame([[0.0, 0.0]], [[0, 0]], [CAR]),
        _frame([[0.5, 0.0], [-0.5, 0.0]], [[0, 0], [0, 0]], [CAR, CAR], scores=[0.4, 0.8]),
    ]
    agents = tracking.track_window(frames)
    assert agents.count == 2
    assert agents.scores.tolist() == [0.8, 0.4]  # best first
    assert agents.past_mask.tolist() == [[True, True], [False, True]]


def test_low_scores_and_empty_keyframes_make_no_agents():
    empty = _frame(np.zeros((0, 2)), np.zeros((0, 2)), [])
    assert tracking.track_window([empty, empty, empty]).count == 0
    agents = tracking.track_window([empty, _frame([[1.0, 1.0]], [[0, 0]], [CAR], scores=[0.1])])
    assert agents.count == 0 and agents.past.shape == (0, 2, 2)
    with pytest.raises(ValueError, match="at least one keyframe"):
        tracking.track_window([])


def test_detections_move_into_the_t0_frame_with_their_heading_and_velocity():
    # The keyframe's ego stood 5 m behind t0's and was turned by 90 degrees (facing +y of t0).
    t0_from_frame = np.eye(4)
    t0_from_frame[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    t0_from_frame[:3, 3] = [-5.0, 0.0, 0.0]
    detections = heads.Detections(
        boxes=np.array([[10.0, 0.0, 0.8, 1.9, 4.5, 1.6, 0.0]], dtype=np.float32),
        velocity=np.array([[3.0, 0.0]], dtype=np.float32),
        scores=np.array([0.7], dtype=np.float32),
        classes=np.array([CAR]),
        batch_index=np.array([0]),
    )
    moved = tracking.FrameDetections.in_t0_frame(detections, t0_from_frame)
    np.testing.assert_allclose(moved.boxes[0, :3], [-5.0, 10.0, 0.8], atol=1e-6)
    assert moved.boxes[0, 6] == pytest.approx(math.pi / 2)
    np.testing.assert_allclose(moved.velocity[0], [0.0, 3.0], atol=1e-6)


def test_non_finite_detections_are_refused():
    with pytest.raises(ValueError, match="must be finite"):
        _frame([[float("nan"), 0.0]], [[0, 0]], [CAR])
    with pytest.raises(ValueError, match=r"FrameDetections.velocity: expected an array of shape \(1, 2\)"):
        tracking.FrameDetections(np.zeros((1, 7)), np.zeros((2, 2)), np.ones(1), np.zeros(1, dtype=np.int64))


GRID = geometry.GridSpec(x_min_m=-16.0, x_max_m=16.0, y_min_m=-16.0, y_max_m=16.0, resolution_m=0.5)


def _occupied(box_xy, cls, size=(1.9, 4.5), yaw=0.0) -> np.ndarray:
    """[3, H, W] probability 0.9 on the cells a box at ``box_xy`` covers, 0.05 elsewhere."""
    covered, _ = rasterize.rasterize_boxes(
        GRID, np.array([box_xy], dtype=np.float64), np.array([size]), np.array([yaw]), np.array([cls]), 3
    )
    return np.where(covered, 0.9, 0.05)


def test_vehicle_boxes_move_onto_the_dense_occupancy_by_at_most_one_cell():
    yaw = 0.3
    truth = np.array([4.1, -2.3])
    occupancy = _occupied(truth, CAR, yaw=yaw) + _occupied([-6.0, 6.0], PEDESTRIAN, size=(0.7, 0.7)) - 0.05
    frame = _frame([truth + [0.5, -0.25], [-6.5, 6.0], [10.0, 10.0]], np.zeros((3, 2)), [CAR, PEDESTRIAN, CAR])
    frame = tracking.FrameDetections(
        np.concatenate([frame.boxes[:, :6], np.full((3, 1), yaw)], axis=1), frame.velocity, frame.scores, frame.classes
    )
    agents = tracking.track_window([frame])
    aligned = tracking.align_to_occupancy(agents, occupancy, GRID)
    by_x = {round(float(x)): a for a, x in enumerate(agents.boxes[:, 0])}  # 5: the car, -6: the pedestrian, 10
    np.testing.assert_allclose(aligned.boxes[by_x[5], :2], truth)  # 0.5 and 0.25 m back onto the occupied cells
    np.testing.assert_allclose(aligned.boxes[by_x[-6], :2], [-6.5, 6.0])  # pedestrians stay where detected
    np.testing.assert_allclose(aligned.boxes[by_x[10], :2], [10.0, 10.0])  # nothing occupied near it: a tie
    np.testing.assert_array_equal(aligned.boxes[:, 2:], agents.boxes[:, 2:])
    np.testing.assert_array_equal(aligned.velocity, agents.velocity)
    # A car 3 m from the occupied cells moves one cell at most, toward them.
    far = tracking.track_window([_frame([truth + [3.0, 0.0]], np.zeros((1, 2)), [CAR])])
    moved = tracking.align_to_occupancy(far, _occupied(truth, CAR), GRID).boxes[0, :2] - far.boxes[0, :2]
    assert -GRID.resolution_m <= moved[0] < 0.0 and moved[1] == 0.0
    with pytest.raises(ValueError, match="occupancy"):
        tracking.align_to_occupancy(agents, occupancy[:2], GRID)


def test_a_stream_keeps_ids_for_agents_that_continue_and_gives_new_ids_to_the_rest():
    stream = tracking.StreamTracker()
    first = stream.update(
        tracking.track_window([_frame([[10.0, 0.0], [0.0, 5.0]], [[10, 0], [0, 0]], [CAR, CAR])]), None
    )
    assert sorted(first.ids.tolist()) == ["0", "1"]
    # The ego drove 2 m forward: the previous t0 lies at x = -2 in the new frame. The moving car advanced 5 m.
    t0_from_previous = np.eye(4)
    t0_from_previous[0, 3] = -2.0
    second_agents = tracking.track_window(
        [_frame([[13.0, 0.0], [-2.0, 5.0], [0.0, -20.0]], [[10, 0], [0, 0], [0, 0]], [CAR] * 3)]
    )
    second = stream.update(second_agents, t0_from_previous)
    by_x = {round(float(x)): i for x, i in zip(second.boxes[:, 0], second.ids, strict=True)}
    car_moving = first.ids[int(np.argmax(first.boxes[:, 0]))]
    car_parked = first.ids[int(np.argmin(first.boxes[:, 0]))]
    assert by_x[13] == car_moving and by_x[-2] == car_parked and by_x[0] == "2"
    # An unlinked window (another scene, a gap) keeps nothing but the counter.
    third = stream.update(second_agents, None)
    assert sorted(third.ids.tolist()) == ["3", "4", "5"]


def test_a_stream_fits_a_continuing_track_over_its_whole_history():
    # A car at 8 m/s along the world's x; the ego drives 2 m forward per keyframe, so in the frame of a window whose
    # t0 is keyframe n the car lies at 4 k + 10 - 2 n metres, k its keyframe. Its detections scatter ±0.3 m along x,
    # and the head regresses 6 m/s: a window of three keyframes fits one velocity, the stream five keyframes another.
    scatter = [0.3, -0.3, 0.3, -0.3, 0.3, 0.0]
    t0_from_previous = np.eye(4)
    t0_from_previous[0, 3] = -2.0

    def window(n: int) -> tracking.TrackedAgents:
        frames = [
            _frame([[4.0 * k + 10.0 - 2.0 * n + scatter[k], 5.0]], [[6.0, 0.0]], [CAR]) for k in range(n - 2, n + 1)
        ]
        return tracking.track_window(frames)

    assert tracking.StreamTracker().history == tracking.HISTORY_KEYFRAMES
    stream = tracking.StreamTracker(history={"vehicle": 5, "pedestrian": 5, "cyclist": 5})
    agents = [stream.update(window(2), None)]
    for n in (3, 4, 5):
        agents.append(stream.update(window(n), t0_from_previous))
    assert [a.ids.tolist() for a in agents] == [["0"]] * 4
    assert [a.past.shape[1] for a in agents] == [3, 4, 5, 5]
    last = agents[-1]
    truth = [[4.0 * k + scatter[k], 5.0] for k in range(1, 6)]  # keyframes 1..5 in the frame of window 5 (n = 5)
    np.testing.assert_allclose(last.past[0], truth, atol=1e-9)
    assert last.past_mask.all()
    np.testing.assert_allclose(last.velocity, tracking.track_velocity(last.past, last.past_mask, [[6.0, 0.0]], [CAR]))
    # The longer baseline lands nearer the true 8 m/s than the window's own fit.
    alone = window(5)
    assert abs(last.velocity[0, 0] - 8.0) < abs(alone.velocity[0, 0] - 8.0)
    np.testing.assert_allclose(last.boxes, alone.boxes)  # only the history and the velocity change
    # An unlinked window starts its history afresh; a stream of history 3 keeps the window's own fit.
    fresh = stream.update(window(5), None)
    assert fresh.past.shape[1] == 3 and fresh.ids.tolist() == ["1"]
    np.testing.assert_allclose(fresh.velocity, alone.velocity)
    short = tracking.StreamTracker(history={"vehicle": 3, "pedestrian": 5, "cyclist": 5})
    short.update(window(4), None)
    np.testing.assert_allclose(short.update(window(5), t0_from_previous).velocity, alone.velocity)


def test_a_stream_leaves_out_older_detections_far_from_the_window_track():
    # A car that drove 12 m/s (6 m a keyframe) and then braked to 4 m/s from keyframe 2 on; the ego stands still, so
    # every window's frame is the same. Window 4's own line (keyframes 2-4) passes 4 and 8 m from the detections at
    # keyframes 1 and 0, beyond the vehicle gate (3 m), so the stream keeps the window's velocity.
    positions = {0: -16.0, 1: -10.0, 2: -4.0, 3: -2.0, 4: 0.0}

    def window(n: int) -> tracking.TrackedAgents:
        frames = [_frame([[positions[k], 0.0]], [[4.0, 0.0]], [CAR]) for k in range(n - 2, n + 1)]
        return tracking.track_window(frames)

    stream = tracking.StreamTracker(history={"vehicle": 5, "pedestrian": 5, "cyclist": 5})
    stream.update(window(2), None)
    stream.update(window(3), np.eye(4))
    last = stream.update(window(4), np.eye(4))
    assert last.past.shape[1] == 5 and last.past_mask.tolist() == [[False, False, True, True, True]]
    np.testing.assert_allclose(last.velocity, window(4).velocity)


def test_each_class_keeps_its_own_history_length():
    # The defaults: vehicles fit the window's three keyframes, pedestrians five. A car at 8 m/s and a pedestrian at
    # 1.2 m/s along x, the ego standing still, four windows of one stream.
    assert tracking.HISTORY_KEYFRAMES["vehicle"] == 3 and tracking.HISTORY_KEYFRAMES["pedestrian"] == 5

    def window(n: int) -> tracking.TrackedAgents:
        frames = [
            _frame([[4.0 * k, 0.0], [0.6 * k, 10.0]], [[7.0, 0.0], [1.0, 0.0]], [CAR, PEDESTRIAN])
            for k in range(n - 2, n + 1)
        ]
        return tracking.track_window(frames)

    stream = tracking.StreamTracker()
    for n in (2, 3, 4):
        last = stream.update(window(n), np.eye(4) if n > 2 else None)
    car, pedestrian = int(np.flatnonzero(last.classes == CAR)[0]), int(np.flatnonzero(last.classes == PEDESTRIAN)[0])
    assert last.past_mask[car].tolist() == [False, False, True, True, True]
    assert last.past_mask[pedestrian].tolist() == [True] * 5
    np.testing.assert_allclose(last.velocity[car], window(4).velocity[car])
    np.testing.assert_allclose(last.past[pedestrian, :, 0], 0.6 * np.arange(5))
    # A history that leaves a class out, or counts no keyframe, is refused with the classes named.
    for history in ({"vehicle": 3, "pedestrian": 5}, {"vehicle": 0, "pedestrian": 5, "cyclist": 3}):
        with pytest.raises(ValueError, match="each class of .*vehicle.*pedestrian.*cyclist"):
            tracking.StreamTracker(history=history)


def test_a_detection_exports_the_velocity_of_the_agent_tracked_from_it():
    # Two cars tracked over three keyframes at 10 and 0 m/s, their t0 detections regressing 6 and 3 m/s; a weak
    # duplicate beside the first, a pedestrian beside the second, and a lone car 20 m from every agent.
    frames = [
        _frame(
            [[10.0 + 5 * k, 0.0], [0.0, 8.0]], [[10.0, 0.0] if k < 2 else [6.0, 0.0], [0.0, 3.0 * (k == 2)]], [CAR, CAR]
        )
        for k in range(3)
    ]
    agents = tracking.track_window(frames)
    xy = np.array([[20.0, 0.0], [21.0, 0.5], [0.0, 8.0], [0.5, 8.0], [40.0, 0.0]])
    boxes = np.concatenate([xy, np.zeros((5, 1)), np.tile([1.9, 4.5, 1.6], (5, 1)), np.zeros((5, 1))], axis=1)
    regressed = np.array([[6.0, 0.0], [5.0, 0.0], [0.0, 3.0], [1.0, 1.0], [7.0, 0.0]], dtype=np.float32)
    detections = heads.Detections(
        boxes.astype(np.float32),
        regressed,
        np.array([0.9, 0.2, 0.9, 0.9, 0.2], dtype=np.float32),
        np.array([CAR, CAR, CAR, PEDESTRIAN, CAR]),
        np.zeros(5, dtype=np.int64),
    )
    velocity = tracking.track_velocity_of(detections, agents)
    moving = agents.velocity[np.argmin(np.abs(agents.boxes[:, 0] - 20.0))]
    assert 9.0 < moving[0] < 10.0  # the track's, not the regressed 6 m/s
    np.testing.assert_allclose(velocity[:2], [moving, moving], rtol=1e-6)  # the duplicate takes it too
    standing = agents.velocity[np.argmin(np.abs(agents.boxes[:, 0]))]
    np.testing.assert_allclose(velocity[2], standing, atol=1e-6)
    assert np.hypot(*velocity[2]) < 1.0  # the standing car's track, not its regressed 3 m/s
    np.testing.assert_allclose(velocity[3:], regressed[3:])  # another class, or no agent within the gate
    assert velocity.dtype == np.float32 and velocity.shape == (5, 2)
    empty = tracking.track_window([_frame(np.zeros((0, 2)), np.zeros((0, 2)), [])])
    np.testing.assert_array_equal(tracking.track_velocity_of(detections, empty), regressed)
