from __future__ import annotations

import numpy as np
import pytest

from bevjepa.datasets import geometry, rasterize
from bevjepa.evaluation import baselines
from bevjepa.prediction import agent_occupancy

GRID = geometry.GridSpec()  # ±32 m at 0.5 m


def _box(x: float, y: float, yaw: float, width: float = 1.9, length: float = 4.6) -> np.ndarray:
    return np.array([x, y, 0.8, width, length, 1.6, yaw])


def test_one_sure_mode_is_the_moving_box_itself():
    """One mode with probability 1 along the heading: the constant-velocity baseline's boxes, cell for cell."""
    box = np.stack([_box(3.0, -4.0, 0.3), _box(-10.0, 8.0, 2.0, 0.7, 0.7)])
    cls = np.array([0, 1])
    velocity = np.stack([4.0 * np.array([np.cos(0.3), np.sin(0.3)]), 1.2 * np.array([np.cos(2.0), np.sin(2.0)])])
    modes = baselines.constant_velocity_trajectories(box[:, :2], velocity, 12)  # [A, 1, T, 2]
    got = agent_occupancy.mode_occupancy(box, cls, modes, np.ones((2, 1)), GRID, 3, 4)
    want = baselines.constant_velocity_occupancy(box, cls, velocity, GRID, 3, 4)
    assert got.shape == (5, 3, 128, 128) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_mode_mass_adds_up_within_an_agent_and_combines_across_agents():
    still = np.zeros((1, 2, 12, 2))
    # Agent 0: two modes, 0.7 staying put and 0.3 far to the left; at every step its t0 cells hold 0.7.
    box = _box(0.0, 0.0, 0.0)
    modes = still + box[:2]
    modes[0, 1] += [0.0, 20.0]
    occupancy = agent_occupancy.mode_occupancy(box[None], np.array([0]), modes, np.array([[0.7, 0.3]]), GRID, 3, 2)
    here, _ = rasterize.rasterize_boxes(GRID, box[None, :2], box[None, [3, 4]], box[None, 6], np.array([0]), 3)
    # The far mode jumps along +y, so its box turns to heading +y.
    there, _ = rasterize.rasterize_boxes(
        GRID, box[None, :2] + [0, 20], box[None, [3, 4]], np.array([np.pi / 2]), np.array([0]), 3
    )
    assert occupancy[0][here].min() == 1.0  # t0: the box itself
    np.testing.assert_allclose(occupancy[1][here], 0.7, rtol=1e-6)
    np.testing.assert_allclose(occupancy[2][there], 0.3, rtol=1e-6)
    assert occupancy[1][~(here | there)].max() == 0.0
    # Two agents of one class, each 0.5 on the same cells: free with probability 0.25.
    both = np.stack([box, box])
    modes = np.stack([still[0] + box[:2]] * 2)
    modes[:, 1] += [0.0, 20.0]
    occupancy = agent_occupancy.mode_occupancy(both, np.array([0, 0]), modes, np.full((2, 2), 0.5), GRID, 3, 1)
    np.testing.assert_allclose(occupancy[1][here], 0.75, rtol=1e-6)


def test_an_agents_existence_scales_its_whole_mass():
    """A tracked agent of score 0.6: its t0 box holds 0.6, each mode's box 0.6 × the mode's probability."""
    box = _box(0.0, 0.0, 0.0)
    modes = np.zeros((1, 2, 12, 2)) + box[:2]
    modes[0, 1] += [0.0, 20.0]
    here, _ = rasterize.rasterize_boxes(GRID, box[None, :2], box[None, [3, 4]], box[None, 6], np.array([0]), 3)
    occupancy = agent_occupancy.mode_occupancy(
        box[None], np.array([0]), modes, np.array([[0.7, 0.3]]), GRID, 3, 1, existence=np.array([0.6])
    )
    np.testing.assert_allclose(occupancy[0][here], 0.6, rtol=1e-6)
    np.testing.assert_allclose(occupancy[1][here], 0.42, rtol=1e-6)
    sure = agent_occupancy.mode_occupancy(box[None], np.array([0]), modes, np.array([[0.7, 0.3]]), GRID, 3, 1)
    np.testing.assert_array_equal(sure, agent_occupancy.mode_occupancy(
        box[None], np.array([0]), modes, np.array([[0.7, 0.3]]), GRID, 3, 1, existence=np.ones(1)
    ))  # fmt: skip
    for bad in (np.array([1.2]), np.array([np.nan]), np.ones(2)):
        with pytest.raises(ValueError, match="existence"):
            agent_occupancy.mode_occupancy(
                box[None], np.array([0]), modes, np.full((1, 2), 0.5), GRID, 3, 1, existence=bad
            )
    with pytest.raises(ValueError, match="existence"):  # refused even when no agent is left to draw
        agent_occupancy.mode_occupancy(
            box[None], np.array([-1]), modes, np.full((1, 2), 0.5), GRID, 3, 1, existence=np.array([1.2])
        )


def test_existence_may_differ_from_step_to_step():
    box = _box(0.0, 0.0, 0.0)
    modes = np.zeros((1, 1, 12, 2)) + box[:2]  # standing still: the same cells at every step
    here, _ = rasterize.rasterize_boxes(GRID, box[None, :2], box[None, [3, 4]], box[None, 6], np.array([0]), 3)
    existence = np.array([[0.4], [0.9], [0.5]])  # [S, A]
    occupancy = agent_occupancy.mode_occupancy(box[None], np.array([0]), modes, np.ones((1, 1)), GRID, 3, 2, existence)
    for step, expected in enumerate(existence[:, 0]):
        np.testing.assert_allclose(occupancy[step][here], expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"existence must be probabilities in \[0, 1\], \[1\] or \[3, 1\]"):
        agent_occupancy.mode_occupancy(box[None], np.array([0]), modes, np.ones((1, 1)), GRID, 3, 2, np.ones((2, 1)))


def test_a_tracks_existence_pools_its_score_with_the_dense_map_after_t0_and_leaves_cyclists_at_t0_to_it():
    """Pooled: the mean of the track's score and the dense map's mean probability of its class over its box."""
    boxes = np.stack(
        [_box(0.0, 0.0, 0.0), _box(10.0, 0.0, 0.0), _box(0.0, 10.0, 0.0), _box(99.0, 0.0, 0.0), _box(-10.0, 0.0, 0.0)]
    )
    classes = np.array([0, 0, 1, 0, 2])  # two vehicles, a pedestrian, a vehicle off the grid, a cyclist
    dense = np.zeros((3, *GRID.shape))
    cells, _ = rasterize.rasterize_boxes(GRID, boxes[:3, :2], boxes[:3, [3, 4]], boxes[:3, 6], classes[:3], 3)
    dense[cells] = 1.0  # the dense map sees the first three agents, not the cyclist
    _, rows, cols = rasterize.box_cells(GRID, boxes[:1, :2], boxes[:1, [3, 4]], boxes[:1, 6])
    dense[0, rows[: len(rows) // 2], cols[: len(rows) // 2]] = 0.5  # ... half the first vehicle only half as surely
    scores = np.array([0.4, 0.6, 0.3, 0.8, 0.7])
    existence = agent_occupancy.track_existence(scores, boxes, classes, dense, GRID, steps=4)
    assert existence.shape == (5, 5)
    np.testing.assert_array_equal(existence[0, :4], scores[:4])  # t0: the scores (the dense map draws its shapes)
    support = rasterize.box_means(GRID, dense, classes, boxes[:, :2], boxes[:, [3, 4]], boxes[:, 6])
    assert 0.5 < support[0] < 1.0 and support[1] == 1.0 and support[3] == 0.0 and support[4] == 0.0
    np.testing.assert_allclose(existence[1:, 0], (0.4 + support[0]) / 2)
    np.testing.assert_allclose(existence[1:, 1], 0.8)
    np.testing.assert_allclose(existence[1:, 2], 0.3)  # a pedestrian keeps its score
    np.testing.assert_allclose(existence[1:, 3], 0.4)  # nothing of the map under it: half its score
    np.testing.assert_allclose(existence[:, 4], [0.0, 0.7, 0.7, 0.7, 0.7])  # a cyclist: t0 is the dense map's
    drawn_at_t0 = agent_occupancy.track_existence(scores, boxes, classes, dense, GRID, 4, dense_only_at_t0=())
    np.testing.assert_array_equal(drawn_at_t0[0], scores)
    np.testing.assert_array_equal(drawn_at_t0[1:], existence[1:])
    with pytest.raises(ValueError, match="are not predicted classes"):
        agent_occupancy.track_existence(scores, boxes, classes, dense, GRID, 4, dense_only_at_t0=("bicycle",))
    with pytest.raises(ValueError, match="track_existence: 2 scores, 5 boxes and 5 classes differ"):
        agent_occupancy.track_existence(scores[:2], boxes, classes, dense, GRID, steps=4)


def test_boxes_turn_with_their_motion_and_keep_their_heading_when_still():
    modes = np.zeros((2, 1, 3, 2))
    modes[0, 0] = [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]  # agent 0 (yaw 0) drives along +y
    modes[1, 0] = [[10.0, 0.05], [10.0, 0.1], [10.0, 0.1]]  # agent 1 (yaw 0) creeps: keeps yaw 0
    headings = agent_occupancy.mode_headings(np.array([[0.0, 0.0], [10.0, 0.0]]), np.zeros(2), modes)
    np.testing.assert_allclose(headings[0, 0], np.pi / 2)
    np.testing.assert_allclose(headings[1, 0], 0.0)
    # A mode that turns and then stops keeps its last moving heading.
    stop = np.array([[[[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]]])
    np.testing.assert_allclose(
        agent_occupancy.mode_headings(np.zeros((1, 2)), np.zeros(1), stop)[0, 0], [0, 1.5708, 1.5708], atol=1e-4
    )
    occupancy = agent_occupancy.mode_occupancy(
        np.stack([_box(0.0, 0.0, 0.0), _box(10.0, 0.0, 0.0)]), np.array([0, 0]), modes, np.ones((2, 1)), GRID, 3, 3
    )
    want, _ = rasterize.rasterize_boxes(
        GRID, np.array([[0.0, 3.0]]), np.array([[1.9, 4.6]]), np.array([np.pi / 2]), np.array([0]), 3
    )
    turned = occupancy[3, 0] >= 0.5
    np.testing.assert_array_equal(turned & (np.abs(GRID.cell_centers()[..., 0]) < 5), want[0])


def test_agents_without_a_class_or_with_nan_modes_are_left_out():
    box = np.stack([_box(0.0, 0.0, 0.0), _box(10.0, 0.0, 0.0)])
    modes = np.broadcast_to(box[:, None, None, :2], (2, 1, 4, 2)).copy()
    modes[1, 0, 2] = np.nan
    occupancy = agent_occupancy.mode_occupancy(box, np.array([-1, 0]), modes, np.ones((2, 1)), GRID, 3, 4)
    assert occupancy.max() == 0.0
    outside = agent_occupancy.mode_occupancy_instances(
        box + [100.0, 0, 0, 0, 0, 0, 0], np.array([0, 0]), modes + 100.0, np.ones((2, 1)), GRID, 3, 2
    )  # every agent beyond the grid
    assert outside[0].max() == 0.0 and outside[1].max() == 0
    empty = agent_occupancy.mode_occupancy(
        np.zeros((0, 7)), np.zeros(0), np.zeros((0, 5, 12, 2)), np.zeros((0, 5)), GRID, 3, 4
    )
    assert empty.shape == (5, 3, 128, 128) and empty.max() == 0.0
    with pytest.raises(ValueError, match="modes"):
        agent_occupancy.mode_occupancy(box, np.array([0, 0]), modes[:, :, :2], np.ones((2, 1)), GRID, 3, 4)


def test_each_cell_belongs_to_the_agent_with_the_most_mass():
    """Instance ids index the input agents (skipped ones included) and follow the agent along its modes."""
    box = np.stack([_box(0.0, 0.0, 0.0), _box(-20.0, 0.0, 0.0), _box(10.0, 0.0, 0.0)])
    modes = np.broadcast_to(box[:, None, None, :2], (3, 2, 4, 2)).copy()
    modes[2, 1] += [[0.0, 0.0], [-4.0, 0.0], [-8.0, 0.0], [-10.0, 0.0]]  # agent 2's second mode drives onto agent 0
    probabilities = np.array([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    occupancy, instances = agent_occupancy.mode_occupancy_instances(
        box, np.array([0, -1, 0]), modes, probabilities, GRID, 3, 4
    )
    here, _ = rasterize.rasterize_boxes(GRID, box[:1, :2], box[:1, [3, 4]], box[:1, 6], np.array([0]), 3)
    assert set(np.unique(instances[0])) == {0, 1, 3}  # agent 1 has no class: left out, ids keep their index
    assert (instances[0][here[0]] == 1).all()
    # At 2 s agent 2's 0.8 mode covers agent 0's cells, where agent 0 has 1.0: agent 0 keeps them.
    assert (instances[4][here[0]] == 1).all()
    np.testing.assert_allclose(occupancy[4, 0][here[0]], 1.0)
    far = GRID.xy_to_index(np.array([[10.0, 0.0]]))
    assert instances[4][far[0][0], far[1][0]] == 3 and occupancy[4, 0][far[0][0], far[1][0]] == np.float32(0.2)


def test_a_tracks_footprint_covers_its_boxes_along_every_mode_grown_by_the_margin():
    box = _box(0.0, 0.0, 0.0)[None]  # a car at the origin heading +x
    modes = np.stack(
        [
            baselines.constant_velocity_trajectories(box[:, :2], np.array([[4.0, 0.0]]), 12)[:, 0],
            baselines.constant_velocity_trajectories(box[:, :2], np.array([[0.0, 0.0]]), 12)[:, 0],
        ],
        axis=1,
    )
    explained = agent_occupancy.track_footprint(box, np.array([0]), modes, GRID, 3, 4)
    assert explained.shape == (3, 128, 128) and explained.dtype == bool
    assert not explained[1:].any()  # only the car's class
    index = lambda x, y: GRID.xy_to_index(np.array([[x, y]]))[:2]  # noqa: E731
    for x, y in [(0.0, 0.0), (8.0, 0.0), (10.0, 0.0), (0.0, 1.6)]:  # t0, 2 s ahead, its front there, 1 m beside
        row, col = index(x, y)
        assert explained[0, row[0], col[0]], (x, y)
    for x, y in [(0.0, 2.6), (14.0, 0.0), (-4.0, 0.0)]:  # 1.6 m beside, beyond its path's ends
        row, col = index(x, y)
        assert not explained[0, row[0], col[0]], (x, y)
    tight = agent_occupancy.track_footprint(box, np.array([0]), modes, GRID, 3, 4, 0.0)
    assert tight.sum() < explained.sum() and not (tight & ~explained).any()
    with pytest.raises(ValueError, match="margin_m must be a non-negative distance"):
        agent_occupancy.track_footprint(box, np.array([0]), modes, GRID, 3, 4, -1.0)
    with pytest.raises(
        ValueError, match=r"track_footprint: expected 1 classes and modes \[1, K, T >= 4, 2\], got 1 and \[1, 2, 2, 2\]"
    ):
        agent_occupancy.track_footprint(box, np.array([0]), modes[:, :, :2], GRID, 3, 4)
    # No agent, or one without a class or with NaN modes: nothing is explained.
    assert not agent_occupancy.track_footprint(np.zeros((0, 7)), np.zeros(0), np.zeros((0, 2, 12, 2)), GRID, 3, 4).any()
    nan_modes = np.where(np.arange(12)[None, None, :, None] == 1, np.nan, modes)
    assert not agent_occupancy.track_footprint(box, np.array([0]), nan_modes, GRID, 3, 4).any()
    assert not agent_occupancy.track_footprint(box, np.array([-1]), modes, GRID, 3, 4).any()


def test_a_car_no_track_explains_stays_in_the_fused_future_and_a_tracked_one_is_its_tracks():
    """A car standing 20 m ahead that the detector missed: the dense map sees it at every step, and so must the
    forecast a planner reads; the same car where a track explains it is the track's own from 1 s on."""
    dense = np.zeros((5, 3, *GRID.shape), dtype=np.float32)
    missed = rasterize.rasterize_boxes(
        GRID, np.array([[20.0, 0.0]]), np.array([[1.9, 4.6]]), np.zeros(1), np.array([0]), 3
    )[0].astype(bool)  # [3, H, W]
    tracked = rasterize.rasterize_boxes(
        GRID, np.array([[-20.0, 0.0]]), np.array([[1.9, 4.6]]), np.zeros(1), np.array([0]), 3
    )[0].astype(bool)
    dense[:, missed | tracked] = 0.9
    box = _box(-20.0, 0.0, 0.0)[None]
    modes = baselines.constant_velocity_trajectories(box[:, :2], np.array([[0.0, 0.0]]), 12)
    instance = agent_occupancy.mode_occupancy(box, np.array([0]), modes, np.ones((1, 1)), GRID, 3, 4, np.full(1, 0.5))
    explained = agent_occupancy.track_footprint(box, np.array([0]), modes, GRID, 3, 4)
    fused = agent_occupancy.fuse(instance, dense, explained)
    assert np.all(fused[:, missed] == np.float32(0.9))  # every step, 0 s to 2 s
    assert np.all(fused[:2, tracked] == np.float32(0.9)) and np.all(fused[2:, tracked] == np.float32(0.5))
    # A pedestrian's future is its track's alone, explained or not: the rollout holds a person where they were.
    person = np.zeros_like(dense)
    person[:, 1, missed[0]] = 0.9
    fused = agent_occupancy.fuse(np.zeros_like(dense), person, np.zeros(dense.shape[1:], dtype=bool))
    assert np.all(fused[0, 1, missed[0]] == np.float32(0.9)) and not fused[1:].any()


def test_a_pedestrian_track_draws_at_t0_only_where_the_dense_map_sees_a_pedestrian():
    """A person's box a quarter metre off paints cells the person is not in; at t0 the track draws only on cells
    the dense map gives pedestrians at least ``SUPPORTED_AT_T0``'s 0.2, and from 0.5 s on its whole box."""
    box = _box(10.0, 0.0, 0.0, width=1.4, length=1.4)[None]  # a 3 × 3 cell square at 0.5 m
    modes = baselines.constant_velocity_trajectories(box[:, :2], np.array([[0.0, 0.0]]), 12)
    instance = agent_occupancy.mode_occupancy(box, np.array([1]), modes, np.ones((1, 1)), GRID, 3, 4, np.full(1, 0.6))
    drawn = instance[0, 1] > 0  # [H, W] the box's cells
    assert drawn.sum() >= 4
    rows, cols = np.nonzero(drawn)
    dense = np.zeros_like(instance)
    dense[0, 1, rows[0], cols[0]] = 0.3  # the dense map half-sees the person in one cell of the box
    dense[0, 1, rows[1], cols[1]] = 0.1  # and hardly in another
    explained = agent_occupancy.track_footprint(box, np.array([1]), modes, GRID, 3, 4)
    fused = agent_occupancy.fuse(instance, dense, explained)
    assert fused[0, 1, rows[0], cols[0]] == np.float32(0.6)  # the track lifts what the dense map half-sees
    assert np.count_nonzero(fused[0, 1]) == 2 and fused[0, 1, rows[1], cols[1]] == np.float32(0.1)
    assert np.array_equal(fused[1, 1], instance[1, 1])  # after t0 the track's box whole
    # A car's track draws its whole box at t0 whatever the dense map says; so does a pedestrian's with no floor.
    car = agent_occupancy.fuse(instance[:, [1, 0, 2]], dense, explained[[1, 0, 2]])
    assert np.array_equal(car[0, 0] > 0, drawn)
    unfloored = agent_occupancy.fuse(instance, dense, explained, supported_at_t0={})
    assert np.array_equal(unfloored[0, 1] > 0, drawn)
    with pytest.raises(ValueError, match=r"supported_at_t0 holds probabilities in \[0, 1\]"):
        agent_occupancy.fuse(instance, dense, explained, supported_at_t0={"pedestrian": 1.5})
    with pytest.raises(ValueError, match=r"supported_at_t0 names \['bus'\]"):
        agent_occupancy.fuse(instance, dense, explained, supported_at_t0={"bus": 0.2})
