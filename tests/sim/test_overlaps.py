"""No two vehicles overlap: start placement, entries at the map's edge, right of way at junctions and lane changes,
long vehicles' swept boxes, the emergency stop, and the survey (``sim.overlaps``) that checks them all."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from bevjepa.sim import layouts, overlaps, world
from bevjepa.sim.paths import Path, lane_change_polyline

CAR = (1.95, 4.62, 1.73)
BUS = (3.12, 11.87, 3.68)
"""The largest rigid bus the scenarios draw (the nuScenes mean size, 6 % up)."""
SEEDS = tuple(range(3))  # 17,000 vehicle pairs a layout; the slow test runs 40 seeds and dense traffic
DURATION_S = 10.0


def _route(layout: layouts.RoadLayout, *lane_ids: str) -> Path:
    return Path.from_polyline(layout.route_polyline(lane_ids))


def _car(instance_id: str, path: Path, speed_mps: float, size=CAR, **kwargs) -> world.ActorSpec:
    return world.ActorSpec(instance_id, "vehicle.car", world.KIND_VEHICLE, size, path, speed_mps, **kwargs)


def _ego(path: Path, speed_mps: float = 0.0) -> world.ActorSpec:
    return world.ActorSpec(world.EGO_ID, "vehicle.car", world.KIND_VEHICLE, world.EGO_SIZE_WLH_M, path, speed_mps)


def _run(
    built: world.World, s: list[float], v: list[float], seconds: float, **step_kwargs
) -> tuple[list[world.WorldState], list[overlaps.Overlap]]:
    """Step every 0.05 s; every state, and every overlap of two vehicles found at any of them."""
    states = [world.initial_state(built, np.array(s, dtype=float), np.array(v, dtype=float))]
    found = overlaps.keyframe_overlaps(built, states[0])[1]
    for _ in range(round(seconds / 0.05)):
        states.append(world.step(built, states[-1], 0.05, **step_kwargs))
        found += overlaps.keyframe_overlaps(built, states[-1])[1]
    return states, found


@pytest.mark.parametrize("layout", sorted(layouts.LAYOUTS))
def test_no_two_vehicles_overlap_at_any_keyframe(layout):
    """The default agent mix, as the writer steps it: the ego, moving and parked vehicles and cyclists."""
    result = overlaps.survey(overlaps.grid([layout], list(SEEDS), DURATION_S))
    assert result.keyframes == len(SEEDS) * 20 and result.pairs > 10_000
    assert result.overlaps == ()
    # The emergency stop is the last resort; with placement, entries and right of way right it never has to act.
    assert result.emergency_stops == ()


@pytest.mark.slow
def test_no_overlaps_over_many_seeds_and_in_dense_traffic():
    configs = overlaps.grid(sorted(layouts.LAYOUTS), list(range(100, 140)), 12.0)
    configs += overlaps.grid(sorted(layouts.LAYOUTS), list(range(10)), 20.0, agents=(28, 16, 24, 6))
    result = overlaps.survey(configs)
    assert result.overlaps == ()
    assert len(result.emergency_stops) <= 2, result.emergency_stops


def test_the_survey_measures_an_overlap():
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    lane = _route(layout, "a1_in0", "a0_out0")
    built = world.World(layout, (_ego(_route(layout, "a0_in0", "a1_out0")), _car("a", lane, 0.0), _car("b", lane, 0.0)))
    state = world.initial_state(built, np.array([10.0, 50.0, 53.62]), np.zeros(3))
    pairs, found = overlaps.keyframe_overlaps(built, state, "straight", 0)
    assert pairs == 3 and len(found) == 1
    assert (found[0].first_id, found[0].second_id) == ("a", "b")
    assert found[0].area_m2 == pytest.approx(1.95, rel=1e-6)  # a 1 m × 1.95 m overlap
    assert found[0].fraction_of_smaller == pytest.approx(1.0 / 4.62)


def test_box_separation_agrees_with_shapely():
    rng = np.random.default_rng(0)
    count = 3000
    centers = rng.uniform(-4, 4, size=(2, count, 2))
    halves = rng.uniform(0.3, 3.0, size=(2, 2, count))  # [box, length/width, pair]
    yaws = rng.uniform(-np.pi, np.pi, size=(2, count))
    separation = world.box_separation(
        centers[0], halves[0, 0], halves[0, 1], yaws[0], centers[1], halves[1, 0], halves[1, 1], yaws[1]
    )

    def polygons(b: int) -> np.ndarray:
        forward = np.stack([np.cos(yaws[b]), np.sin(yaws[b])], -1) * halves[b, 0][:, None]
        left = np.stack([-np.sin(yaws[b]), np.cos(yaws[b])], -1) * halves[b, 1][:, None]
        c = centers[b]
        return shapely.polygons(
            np.stack([c + forward + left, c - forward + left, c - forward - left, c + forward - left], 1)
        )

    first, second = polygons(0), polygons(1)
    area = shapely.area(shapely.intersection(first, second))
    distance = shapely.distance(first, second)
    clear = np.abs(separation) > 1e-6
    np.testing.assert_array_equal((separation < 0)[clear], (area > 0)[clear])
    assert np.all(separation[separation > 0] <= distance[separation > 0] + 1e-9)  # a lower bound of the distance
    assert 0.2 < (separation < 0).mean() < 0.8


def test_a_vehicle_due_at_the_map_edge_waits_until_its_entry_is_clear():
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    lane = _route(layout, "a1_in0", "a0_out0")
    built = world.World(
        layout,
        (
            _ego(_route(layout, "a0_in0", "a1_out0")),
            _car("blocker", lane, 8.0, depart_time_s=3.0),  # stands just inside the map's edge for 3 s
            _car("entrant", lane, 10.0, appear_time_s=0.5),
        ),
    )
    states, found = _run(built, [10.0, 4.0, 0.0], [0.0, 0.0, 10.0], 15.0)
    assert found == []
    entered = next(s for s in states if s.entered[2])
    assert entered.time_s > 3.0
    # It appears with the stretch it needs to stop comfortably from 10 m/s ahead of it: 2 + 12 + 25 m.
    assert entered.s_m[1] - CAR[1] - entered.s_m[2] >= 39.0
    assert not any(s.emergency_stop.any() for s in states)


def test_a_vehicle_that_cannot_brake_in_time_stops_dead_instead_of_hitting():
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    lane = _route(layout, "a1_in0", "a0_out0")
    actors = (_ego(_route(layout, "a0_in0", "a1_out0")), _car("stopped", lane, 0.0), _car("late", lane, 15.0))
    built = world.World(layout, actors, idm=world.IdmParams(max_decel_mps2=1.0))
    states, found = _run(built, [10.0, 60.0, 20.0], [0.0, 0.0, 15.0], 6.0)
    assert found == []
    stops = [s for s in states if s.emergency_stop[2]]
    assert stops and stops[0].speed_mps[2] == 0.0
    gap = states[-1].s_m[1] - states[-1].s_m[2] - CAR[1]
    assert 0.0 < gap < 1.0  # stopped where it was, short of the one it would have hit


def test_a_commanded_ego_is_never_stopped_but_nothing_drives_into_it():
    """A planner's collisions stay visible; the agents behind the ego never run into it."""
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    lane = _route(layout, "a1_in0", "a0_out0")
    built = world.World(layout, (_ego(lane, 10.0), _car("stopped", lane, 0.0), _car("behind", lane, 12.0)))
    states = [world.initial_state(built, np.array([20.0, 60.0, 5.0]), np.array([10.0, 0.0, 12.0]))]
    for _ in range(120):
        states.append(world.step(built, states[-1], 0.05, ego_accel_mps2=0.0))
    found = [o for s in states for o in overlaps.keyframe_overlaps(built, s)[1]]
    assert {(o.first_id, o.second_id) for o in found} == {("ego", "stopped")}
    assert not any(s.emergency_stop[0] for s in states)


@pytest.mark.parametrize("wait_m", [2.4, 4.0])
def test_a_bus_turning_right_swings_clear_of_a_car_waiting_at_the_junction(wait_m):
    """The bus's overhang sweeps over the corner of the crossing lane: it waits until the car has gone."""
    layout = layouts.build_layout("intersection", np.random.default_rng(0))
    car_path = _route(layout, "a1_in0", "a1_in0_to_a3_out0", "a3_out0")
    bus_path = _route(layout, "a0_in0", "a0_in0_to_a1_out0", "a1_out0")
    bus = world.ActorSpec("bus", "vehicle.bus.rigid", world.KIND_VEHICLE, BUS, bus_path, 8.0)
    car = _car("car", car_path, 8.0, depart_time_s=6.0)  # waits at the junction's edge for 6 s
    built = world.World(layout, (_ego(_route(layout, "a2_in0", "a2_in0_to_a0_out0", "a0_out0")), bus, car))
    car_s = car_path.project(np.array([148.25, 157.5 + wait_m]))
    states, found = _run(built, [10.0, 110.0, car_s], [0.0, 8.0, 0.0], 20.0)
    assert found == [] and not any(s.emergency_stop.any() for s in states)
    assert states[-1].s_m[1] > bus_path.project(np.array([151.75, 170.0]))  # the bus got through


def test_of_two_vehicles_reaching_a_crossing_together_one_waits_and_both_get_through():
    layout = layouts.build_layout("intersection", np.random.default_rng(0))
    west = _route(layout, "a0_in0", "a0_in0_to_a2_out0", "a2_out0")
    south = _route(layout, "a1_in0", "a1_in0_to_a3_out0", "a3_out0")
    ego = _ego(_route(layout, "a3_in0", "a3_in0_to_a0_out0", "a0_out0"))
    built = world.World(layout, (ego, _car("west", west, 10.0), _car("south", south, 10.0)))
    states, found = _run(built, [5.0, 110.0, 110.0], [0.0, 10.0, 10.0], 20.0)
    assert found == [] and not any(s.emergency_stop.any() for s in states)
    slowest = np.min([s.speed_mps[1:] for s in states], axis=0)
    assert sorted(slowest)[0] < 4.0 < sorted(slowest)[1]  # one of them yields, the other hardly slows
    assert np.all(states[-1].s_m[1:] > 170.0)  # both crossed (the junction spans 142.5-157.5 along each)


def test_a_vehicle_changing_lanes_lets_the_faster_one_in_the_target_lane_pass():
    layout = layouts.build_layout("straight", np.random.default_rng(0))
    source = layout.route_polyline(("a1_in1", "a0_out1"))
    target = layout.route_polyline(("a1_in0", "a0_out0"))
    changer = Path.from_polyline(lane_change_polyline(source, target, 60.0, 30.0))
    fast = _route(layout, "a1_in0", "a0_out0")
    built = world.World(
        layout, (_ego(_route(layout, "a0_in0", "a1_out0")), _car("changer", changer, 8.0), _car("fast", fast, 13.0))
    )
    states, found = _run(built, [10.0, 40.0, 25.0], [0.0, 8.0, 13.0], 20.0)
    assert found == [] and not any(s.emergency_stop.any() for s in states)
    xy, _ = world.actor_poses(built, states[-1])
    assert xy[1, 1] == pytest.approx(148.25, abs=0.01)  # the changer is in the target lane
    assert xy[2, 0] > xy[1, 0] + 20.0  # behind the one it let pass


@pytest.mark.parametrize("name", sorted(layouts.LAYOUTS))
def test_parked_cars_stand_clear_of_every_route_swept_by_the_largest_bus(name):
    layout = layouts.build_layout(name, np.random.default_rng(0))

    def boxes(xy: np.ndarray, yaw: np.ndarray, size: tuple[float, float, float]) -> np.ndarray:
        forward = np.stack([np.cos(yaw), np.sin(yaw)], -1)[:, None] * size[1] / 2
        left = np.stack([-np.sin(yaw), np.cos(yaw)], -1)[:, None] * size[0] / 2
        signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])[None]
        return shapely.polygons(xy[:, None] + signs[..., :1] * forward + signs[..., 1:] * left)

    largest_car = tuple(1.06 * np.array(CAR))
    spots = shapely.STRtree(boxes(layout.parking_spots[:, :2], layout.parking_spots[:, 2], largest_car))
    entries = [lane.lane_id for lane in layout.lanes if "_in" in lane.lane_id and not lane.is_connector]
    for lane_id in entries:
        for route in layout.routes_from(lane_id):
            path = _route(layout, *route)
            swept = boxes(path.xy, path.heading_rad, BUS)
            assert spots.query(swept, predicate="intersects").size == 0, route
    assert len(layout.parking_spots) > 20
