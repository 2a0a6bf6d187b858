"""Scenarios: a layout, an agent mix with behaviours, an ego route, a seed and a duration, built into a ``World``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevjepa.sim import layouts, world
from bevjepa.sim.paths import Path, lane_change_polyline

VEHICLE_TYPES: tuple[tuple[str, tuple[float, float, float], float], ...] = (
    ("vehicle.car", (1.95, 4.62, 1.73), 0.78),
    ("vehicle.truck", (2.51, 6.93, 2.84), 0.12),
    ("vehicle.bus.rigid", (2.94, 11.2, 3.47), 0.05),
    ("vehicle.construction", (2.85, 6.37, 3.19), 0.05),
)
"""(category, mean size (w, l, h) in m as nuScenes annotates them, share of moving vehicles)."""
PEDESTRIAN_SIZE_WLH_M = (0.67, 0.73, 1.77)
BICYCLE_SIZE_WLH_M = (0.61, 1.70, 1.70)
"""A bicycle with its rider (``cycle.with_rider``)."""


@dataclass(frozen=True)
class ScenarioConfig:
    """One scenario.

    Attributes:
        layout: layout name (see ``layouts.LAYOUTS``).
        seed: seeds every random choice of the scenario.
        duration_s: how long it runs (s).
        vehicles: moving vehicles.
        parked: parked vehicles.
        pedestrians: pedestrians (some walk along, some cross).
        cyclists: cyclists.
        ego_speed_mps: the ego's cruising speed (m/s); None draws one between 7 and 11.
    """

    layout: str = "intersection"
    seed: int = 0
    duration_s: float = 20.0
    vehicles: int = 14
    parked: int = 8
    pedestrians: int = 12
    cyclists: int = 3
    ego_speed_mps: float | None = None

    def __post_init__(self) -> None:
        if self.layout not in layouts.LAYOUTS:
            raise ValueError(
                f"ScenarioConfig.layout: unknown layout {self.layout!r}; choose one of {sorted(layouts.LAYOUTS)}"
            )
        if not self.duration_s > 0:
            raise ValueError(f"ScenarioConfig.duration_s must be positive, got {self.duration_s}")
        for name in ("vehicles", "parked", "pedestrians", "cyclists"):
            if getattr(self, name) < 0:
                raise ValueError(f"ScenarioConfig.{name} must not be negative")


def build_world(config: ScenarioConfig) -> tuple[world.World, world.WorldState]:
    """The world and its initial state for a scenario; the same config always gives the same world."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5CE7E]))
    layout = layouts.build_layout(config.layout, rng)
    actors: list[world.ActorSpec] = []
    s0: list[float] = []
    v0: list[float] = []
    placed: list[np.ndarray] = []
    entries: list[tuple[str, float]] = []  # (first lane, time) of vehicles entering from the map's edge

    def free(xy: np.ndarray, clearance_m: float) -> bool:
        return all(np.linalg.norm(xy - p) >= clearance_m for p in placed)

    # The ego: a random route, starting about 40 m into it.
    route = layout.ego_routes[rng.integers(len(layout.ego_routes))]
    ego_path = Path.from_polyline(layout.route_polyline(route))
    ego_speed = config.ego_speed_mps if config.ego_speed_mps is not None else float(rng.uniform(7.0, 11.0))
    actors.append(world.ActorSpec(world.EGO_ID, "vehicle.car", "vehicle", world.EGO_SIZE_WLH_M, ego_path, ego_speed))
    s0.append(40.0)
    v0.append(ego_speed)
    placed.append(ego_path.pose_at(np.array([40.0]))[0][0])

    entry_lanes = [
        lane for lane in layout.lanes if lane.lane_id.split("_")[1].startswith("in") and not lane.is_connector
    ]
    for n in range(config.vehicles):
        category, size = _vehicle_type(rng)
        lane = entry_lanes[rng.integers(len(entry_lanes))]
        routes = layout.routes_from(lane.lane_id)
        route = routes[rng.integers(len(routes))]
        polyline = layout.route_polyline(route)
        neighbour = lane.left_id or lane.right_id
        if neighbour is not None and rng.uniform() < 0.5:  # change lanes somewhere along the first lane
            other_routes = [r for r in layout.routes_from(neighbour) if len(r) == len(route)]
            target = layout.route_polyline(other_routes[0])
            start = float(rng.uniform(20.0, 120.0))
            polyline = lane_change_polyline(polyline, target, start, float(rng.uniform(25.0, 40.0)))
        path = Path.from_polyline(polyline)
        speed = float(rng.uniform(6.0, 12.0))
        appear = 0.0
        for _ in range(20):
            s = float(rng.uniform(0.0, path.length_m * 0.7))
            appear = 0.0
            if rng.uniform() < 0.3:  # enters from the map's edge later on, well apart from the others
                s, appear = 0.0, float(rng.uniform(0.1, config.duration_s * 0.6))
                if all(lane_id != lane.lane_id or abs(t - appear) > 3.0 for lane_id, t in entries):
                    entries.append((lane.lane_id, appear))
                    break
                continue
            xy = path.pose_at(np.array([s]))[0][0]
            if free(xy, 14.0):
                placed.append(xy)
                break
        else:
            continue
        actors.append(
            world.ActorSpec(f"vehicle-{n:03d}", category, world.KIND_VEHICLE, size, path, speed, appear_time_s=appear)
        )
        s0.append(s)
        v0.append(speed * float(rng.uniform(0.6, 1.0)))

    spots = rng.permutation(len(layout.parking_spots))
    for n, spot in enumerate(spots[: config.parked]):
        x, y, yaw = layout.parking_spots[spot]
        category, size = _vehicle_type(rng, parked=True)
        actors.append(
            world.ActorSpec(
                f"parked-{n:03d}", category, world.KIND_VEHICLE, size, Path.stationary(x, y, yaw), 0.0, parked=True
            )
        )
        s0.append(0.0)
        v0.append(0.0)

    for n in range(config.pedestrians):
        size = _jitter(rng, PEDESTRIAN_SIZE_WLH_M, 0.08)
        speed = float(rng.uniform(0.9, 1.6))
        if rng.uniform() < 0.45 and layout.crossings:
            polyline = _crossing_route(layout, rng)
            depart = float(rng.uniform(0.0, config.duration_s * 0.6))
            s = 0.0
        else:
            polyline = layout.walkways[rng.integers(len(layout.walkways))]
            polyline = polyline[::-1] if rng.uniform() < 0.5 else polyline
            polyline = _offset_right(polyline, float(rng.uniform(0.6, 1.2)))  # keep right on the sidewalk
            depart = 0.0 if rng.uniform() < 0.8 else float(rng.uniform(0.0, config.duration_s))
            s = float(rng.uniform(0.0, 100.0))
        path = Path.from_polyline(polyline)
        actors.append(
            world.ActorSpec(
                f"pedestrian-{n:03d}",
                "human.pedestrian.adult",
                world.KIND_PEDESTRIAN,
                size,
                path,
                speed,
                depart_time_s=depart,
            )
        )
        s0.append(min(s, path.length_m))
        v0.append(speed if depart == 0.0 else 0.0)

    right_lanes = [lane for lane in entry_lanes if lane.right_id is None]
    for n in range(config.cyclists):
        lane = right_lanes[rng.integers(len(right_lanes))]
        straight = [r for r in layout.routes_from(lane.lane_id) if _is_straight(layout.route_polyline(r))]
        route = (straight or layout.routes_from(lane.lane_id))[0]
        path = Path.from_polyline(_offset_right(layout.route_polyline(route), 1.1))
        speed = float(rng.uniform(3.5, 6.0))
        for _ in range(20):
            s = float(rng.uniform(0.0, path.length_m * 0.6))
            xy = path.pose_at(np.array([s]))[0][0]
            if free(xy, 10.0):
                break
        else:
            continue
        placed.append(xy)
        actors.append(
            world.ActorSpec(
                f"cyclist-{n:03d}",
                "vehicle.bicycle",
                world.KIND_CYCLIST,
                _jitter(rng, BICYCLE_SIZE_WLH_M, 0.05),
                path,
                speed,
            )
        )
        s0.append(s)
        v0.append(speed)

    built = world.World(layout, tuple(actors))
    return built, world.initial_state(built, np.array(s0), np.array(v0))


def _vehicle_type(rng: np.random.Generator, parked: bool = False) -> tuple[str, tuple[float, float, float]]:
    """A category and a size drawn around its nuScenes mean."""
    if parked:
        category, mean = VEHICLE_TYPES[0][0], VEHICLE_TYPES[0][1]
    else:
        shares = np.array([t[2] for t in VEHICLE_TYPES])
        category, mean, _ = VEHICLE_TYPES[rng.choice(len(VEHICLE_TYPES), p=shares / shares.sum())]
    return category, _jitter(rng, mean, 0.06)


def _jitter(rng: np.random.Generator, size: tuple[float, float, float], fraction: float) -> tuple[float, float, float]:
    scaled = np.asarray(size) * rng.uniform(1 - fraction, 1 + fraction, size=3)
    return (round(float(scaled[0]), 3), round(float(scaled[1]), 3), round(float(scaled[2]), 3))


def _is_straight(polyline: np.ndarray) -> bool:
    direction = polyline[-1] - polyline[0]
    first = polyline[1] - polyline[0]
    return float(np.dot(direction, first) / (np.linalg.norm(direction) * np.linalg.norm(first))) > 0.99


def _offset_right(polyline: np.ndarray, offset_m: float) -> np.ndarray:
    """The polyline shifted ``offset_m`` to the right of its direction of travel."""
    path = Path.from_polyline(polyline, 1.0)
    right = np.stack([np.sin(path.heading_rad), -np.cos(path.heading_rad)], axis=1)
    return path.xy + right * offset_m


def _crossing_route(layout: layouts.RoadLayout, rng: np.random.Generator) -> np.ndarray:
    """A walk along the sidewalk to a crosswalk, across it, and away along the far sidewalk to the map's edge."""
    crossing = layout.crossings[rng.integers(len(layout.crossings))]
    across = crossing[-1] - crossing[0]
    along_road = np.array([-across[1], across[0]]) / np.linalg.norm(across)
    if rng.uniform() < 0.5:
        crossing = crossing[::-1]
    side_step = (crossing[1] - crossing[0]) / np.linalg.norm(crossing[1] - crossing[0]) * rng.uniform(-0.8, 0.8)
    before = crossing[0] + side_step + along_road * float(rng.choice([-1, 1]) * rng.uniform(4.0, 12.0))
    # After crossing, walk away from the junction along the far sidewalk until the map's edge.
    center = np.full(2, layout.extent_m / 2)
    away = along_road if np.dot(crossing[-1] - center, along_road) >= 0 else -along_road
    reach = layout.extent_m / 2 - 3.0 - abs(float(np.dot(crossing[-1] - center, away)))
    after = crossing[-1] + side_step + away * max(reach, 5.0)
    return np.concatenate([before[None], crossing, after[None]], axis=0)
