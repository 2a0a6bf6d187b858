"""The stepped world: IDM following, reacting to the ego, yielding to pedestrians, turns and lane changes."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import LineString, Polygon

from bevjepa.sim import layouts, scenario, world
from bevjepa.sim.paths import Path, lane_change_polyline

CAR = (1.9, 4.6, 1.7)


def _straight(length_m: float = 400.0, y_m: float = 0.0) -> Path:
    return Path.from_polyline(np.array([[0.0, y_m], [length_m, y_m]]))


def _world(actors: list[world.ActorSpec], s: list[float], v: list[float]) -> tuple[world.World, world.WorldState]:
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    built = world.World(layout, tuple(actors))
    return built, world.initial_state(built, np.array(s), np.array(v))


def _run(built: world.World, state: world.WorldState, seconds: float, **kwargs) -> list[world.WorldState]:
    states = [state]
    for _ in range(round(seconds / 0.05)):
        states.append(world.step(built, states[-1], 0.05, **kwargs))
    return states


def _ego(path: Path, speed: float = 0.0) -> world.ActorSpec:
    return world.ActorSpec(world.EGO_ID, "vehicle.car", "vehicle", world.EGO_SIZE_WLH_M, path, speed)


def test_a_vehicle_stops_behind_a_stationary_one_without_touching_it():
    path = _straight()
    built, state = _world(
        [_ego(path, 0.0), world.ActorSpec("car", "vehicle.car", "vehicle", CAR, path, 12.0)], [150.0, 50.0], [0.0, 12.0]
    )
    states = _run(built, state, 30.0)
    gaps = [s.s_m[0] - s.s_m[1] - (world.EGO_SIZE_WLH_M[1] + CAR[1]) / 2 for s in states]
    assert min(gaps) > 0.5
    assert states[-1].speed_mps[1] < 0.5 and gaps[-1] < 6.0


def test_a_follower_reacts_to_the_ego_braking_or_accelerating():
    """The counterfactual the world model must learn: the same scene under two ego actions."""
    path = _straight()
    built, state = _world(
        [_ego(path, 10.0), world.ActorSpec("car", "vehicle.car", "vehicle", CAR, path, 14.0)],
        [80.0, 55.0],
        [10.0, 10.0],
    )
    braking = _run(built, state, 4.0, ego_accel_mps2=-3.0)
    accelerating = _run(built, state, 4.0, ego_accel_mps2=1.0)
    assert braking[-1].speed_mps[1] < accelerating[-1].speed_mps[1] - 2.0
    assert braking[-1].s_m[1] < accelerating[-1].s_m[1] - 3.0


def test_a_vehicle_stops_for_a_pedestrian_crossing_its_lane():
    path = _straight()
    crossing = Path.from_polyline(np.array([[100.0, -8.0], [100.0, 8.0]]))
    pedestrian = world.ActorSpec("ped", "human.pedestrian.adult", "pedestrian", (0.67, 0.73, 1.77), crossing, 0.0)
    built, state = _world(
        [_ego(_straight(y_m=50.0)), world.ActorSpec("car", "vehicle.car", "vehicle", CAR, path, 10.0), pedestrian],
        [10.0, 40.0, 8.0],
        [0.0, 10.0, 0.0],
    )
    states = _run(built, state, 15.0)
    front = max(s.s_m[1] for s in states) + CAR[1] / 2
    assert front < 100.0 - 0.5 and states[-1].speed_mps[1] < 0.1


def test_step_is_pure_and_deterministic():
    built, state = scenario.build_world(scenario.ScenarioConfig(layout="intersection", seed=3))
    before = state.s_m.copy()
    a = _run(built, state, 2.0)[-1]
    b = _run(built, state, 2.0)[-1]
    np.testing.assert_array_equal(state.s_m, before)
    np.testing.assert_array_equal(a.s_m, b.s_m)
    assert a.time_s == pytest.approx(2.0)


@pytest.mark.parametrize("layout", sorted(layouts.LAYOUTS))
def test_scenarios_run_without_vehicle_collisions(layout):
    built, state = scenario.build_world(scenario.ScenarioConfig(layout=layout, seed=11, duration_s=20.0))
    overlaps = 0
    for step, current in enumerate(_run(built, state, 20.0)):
        if step % 10:
            continue
        boxes, _ = world.agent_boxes(built, current)
        vehicles = [Polygon(b.footprint()) for b in boxes if not b.category.startswith("human")]
        tree = shapely.STRtree(vehicles)
        pairs = tree.query(vehicles, predicate="intersects")
        overlaps += int((pairs[0] < pairs[1]).sum())
    assert overlaps == 0
    moved = current.s_m - state.s_m
    assert moved[0] > 30.0  # the ego got somewhere


def test_vehicles_turn_at_intersections():
    layout = layouts.build_layout("intersection", np.random.default_rng(0))
    headings = []
    for route in layout.routes_from("a0_in0"):
        path = Path.from_polyline(layout.route_polyline(route))
        headings.append(np.degrees(path.heading_rad[-1] - path.heading_rad[0]))
    assert sorted(np.round(headings)) == [-90.0, 0.0, 90.0]


def test_a_lane_change_ends_in_the_neighbouring_lane():
    source = np.array([[0.0, 0.0], [200.0, 0.0]])
    target = np.array([[0.0, 3.5], [200.0, 3.5]])
    path = Path.from_polyline(lane_change_polyline(source, target, 50.0, 30.0))
    xy, _ = path.pose_at(np.array([10.0, 65.0, 150.0]))
    np.testing.assert_allclose(xy[:, 1], [0.0, 1.75, 3.5], atol=0.05)
    assert np.abs(np.diff(path.heading_rad)).max() < 0.05  # smooth


@pytest.mark.parametrize("name", sorted(layouts.LAYOUTS))
def test_layout_geometry_is_consistent(name):
    layout = layouts.build_layout(name, np.random.default_rng(1))
    for lane in layout.lanes:
        assert layout.drivable_area.buffer(0.01).contains(LineString(lane.centerline)), lane.lane_id
        for successor in lane.successors:
            np.testing.assert_allclose(layout.lane(successor).centerline[0], lane.centerline[-1], atol=1e-6)
    for walkway in layout.walkways:
        assert layout.sidewalks.buffer(0.01).contains(LineString(walkway))
    for structure in layout.structures:
        footprint = Polygon(
            __import__("bevjepa.datasets.types", fromlist=["Box3D"])
            .Box3D(structure.center_m, structure.size_wlh_m, structure.yaw_rad)
            .footprint()
        )
        assert not footprint.intersects(layout.drivable_area)
    # The raster agrees with the polygons away from their edges.
    rng = np.random.default_rng(0)
    points = rng.uniform(0, layout.extent_m, size=(4000, 2))
    interior = ~shapely.intersects_xy(layout.drivable_area.boundary.buffer(0.3), points[:, 0], points[:, 1])
    on_road = shapely.contains_xy(layout.drivable_area, points[:, 0], points[:, 1])
    drivable = layout.surface.drivable_mask()
    rows = (layout.surface.classes.shape[0] - points[:, 1] / 0.1).astype(int)
    cols = (points[:, 0] / 0.1).astype(int)
    np.testing.assert_array_equal((drivable[rows, cols] == 255)[interior], on_road[interior])
    assert on_road.sum() > 100


def test_unknown_layouts_and_bad_scenarios_are_refused():
    with pytest.raises(ValueError, match="unknown layout 'roundabout'"):
        layouts.build_layout("roundabout", np.random.default_rng(0))
    with pytest.raises(ValueError, match="duration_s must be positive"):
        scenario.ScenarioConfig(duration_s=0)
    with pytest.raises(ValueError, match="vehicles must not be negative"):
        scenario.ScenarioConfig(vehicles=-1)


@pytest.mark.parametrize("layout", sorted(layouts.LAYOUTS))
def test_pedestrians_start_and_wait_off_the_road(layout):
    """A crossing pedestrian walks up to the crosswalk along its own sidewalk, never from a spot on another road."""
    for seed in range(8):
        built, _ = scenario.build_world(scenario.ScenarioConfig(layout=layout, seed=seed, duration_s=20.0))
        starts = np.array([a.path.xy[0] for a in built.actors if a.kind == world.KIND_PEDESTRIAN])
        on_road = shapely.contains_xy(built.layout.drivable_area, starts[:, 0], starts[:, 1])
        assert not on_road.any(), (seed, starts[on_road])
