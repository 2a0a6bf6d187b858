"""Road layouts: lanes with centrelines, drivable area, sidewalks, crosswalks and the structures beside the road.

A layout lives in the global frame of its map: the square ``[0, extent_m]²`` (m), x east, y north, so that its
drivable-area mask is a nuScenes map mask as it is (origin at the bottom-left pixel, 0.1 m a pixel). Traffic
keeps to the right.

Notation:
    M  points along a line
    R, C  raster rows and columns (row 0 is the north edge, as in an image)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import LineString, MultiPolygon, Polygon, box
from shapely.ops import unary_union

from bevjepa.sim.materials import Material, Surface

LANE_WIDTH_M = 3.5
SIDEWALK_WIDTH_M = 3.5
PARKING_WIDTH_M = 2.5
RASTER_RESOLUTION_M = 0.1


@dataclass(frozen=True)
class Lane:
    """One lane, in its direction of travel.

    Attributes:
        lane_id: unique within the layout.
        centerline: [M, 2] float64 xy (m, global), in the direction of travel.
        width_m: lane width (m).
        successors: ids of the lanes a vehicle may continue into at the end.
        left_id, right_id: the adjacent lane in the same direction, if any (for lane changes).
        is_connector: whether the lane lies inside a junction.
    """

    lane_id: str
    centerline: np.ndarray
    width_m: float = LANE_WIDTH_M
    successors: tuple[str, ...] = ()
    left_id: str | None = None
    right_id: str | None = None
    is_connector: bool = False


@dataclass(frozen=True)
class Structure:
    """A static box beside the road (a building, a wall or a pole).

    Attributes:
        center_m: [3] float64 x, y, z (m, global) of the box centre.
        size_wlh_m: [3] float64 width, length, height (m).
        yaw_rad: heading of the length axis (rad).
        material: what it is made of.
    """

    center_m: np.ndarray
    size_wlh_m: np.ndarray
    yaw_rad: float
    material: Material


@dataclass(frozen=True)
class SurfaceRaster:
    """The ground's surface class on a 0.1 m raster covering the layout, oriented as a nuScenes map mask.

    Attributes:
        classes: [R, C] uint8 ``Surface`` values; row 0 is the north edge (y = R * resolution), column 0 is x = 0.
        resolution_m: cell edge (m).
    """

    classes: np.ndarray
    resolution_m: float = RASTER_RESOLUTION_M

    def lookup(self, xy: np.ndarray) -> np.ndarray:
        """Surface classes under points: xy [N, 2] float (m, global) → [N] uint8 (OFFROAD outside the raster)."""
        rows_count, cols_count = self.classes.shape
        xy = np.asarray(xy, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            cols = np.floor(xy[:, 0] / self.resolution_m)
            rows = np.floor(rows_count - xy[:, 1] / self.resolution_m)
        inside = (cols >= 0) & (cols < cols_count) & (rows >= 0) & (rows < rows_count)
        out = np.full(len(xy), Surface.OFFROAD, dtype=np.uint8)
        out[inside] = self.classes[rows[inside].astype(np.int64), cols[inside].astype(np.int64)]
        return out

    def drivable_mask(self) -> np.ndarray:
        """[R, C] uint8 nuScenes semantic-prior mask: 255 on drivable surfaces, 0 elsewhere."""
        drivable = np.isin(self.classes, [Surface.ROAD, Surface.CROSSWALK, Surface.LANE_MARKING, Surface.PARKING])
        return np.where(drivable, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class RoadLayout:
    """A road layout with everything that agents, sensors and the map need.

    Attributes:
        name: the layout's name (``straight``, ``intersection``, ``t_junction``).
        extent_m: side of the square map (m); the layout lies in ``[0, extent_m]²``.
        lanes: every lane, connectors included.
        drivable_area: shapely geometry of the drivable surface (roads, junctions, parking strips).
        sidewalks: shapely geometry of the sidewalks.
        crosswalks: one polygon per crosswalk (on the drivable area).
        walkways: [M, 2] polylines (m) that pedestrians walk along, each on a sidewalk.
        crossings: [M, 2] polylines (m) that lead a pedestrian across a crosswalk, sidewalk to sidewalk.
        parking_spots: [P, 3] float64 x, y (m), yaw (rad) of the parking places.
        structures: buildings, walls and poles.
        ego_routes: lane-id sequences the scripted ego may drive.
        surface: the ground's surface raster.
    """

    name: str
    extent_m: float
    lanes: tuple[Lane, ...]
    drivable_area: Polygon | MultiPolygon
    sidewalks: Polygon | MultiPolygon
    crosswalks: tuple[Polygon, ...]
    walkways: tuple[np.ndarray, ...]
    crossings: tuple[np.ndarray, ...]
    parking_spots: np.ndarray
    structures: tuple[Structure, ...]
    ego_routes: tuple[tuple[str, ...], ...]
    surface: SurfaceRaster

    def lane(self, lane_id: str) -> Lane:
        """The lane with this id."""
        for lane in self.lanes:
            if lane.lane_id == lane_id:
                return lane
        raise KeyError(f"layout {self.name!r} has no lane {lane_id!r}")

    def routes_from(self, lane_id: str, max_lanes: int = 4) -> list[tuple[str, ...]]:
        """Every lane sequence that starts at ``lane_id`` and follows successors until none is left."""
        routes: list[tuple[str, ...]] = []
        stack: list[tuple[str, ...]] = [(lane_id,)]
        while stack:
            route = stack.pop()
            successors = self.lane(route[-1]).successors
            if not successors or len(route) >= max_lanes:
                routes.append(route)
            stack.extend(route + (s,) for s in successors if s not in route)
        return sorted(routes)

    def route_polyline(self, route: tuple[str, ...]) -> np.ndarray:
        """[M, 2] float64 concatenated centrelines of a lane sequence (m)."""
        parts = [self.lane(route[0]).centerline]
        for lane_id in route[1:]:
            parts.append(self.lane(lane_id).centerline[1:])
        return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------------------------- builders


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, count: int = 24) -> np.ndarray:
    """[count, 2] points of the quadratic Bézier curve with control point ``p1``."""
    t = np.linspace(0.0, 1.0, count)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _line_intersection(p: np.ndarray, u: np.ndarray, q: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Where the lines ``p + a u`` and ``q + b v`` meet, or None if they are parallel."""
    det = u[0] * (-v[1]) - u[1] * (-v[0])
    if abs(det) < 1e-9:
        return None
    a = ((q - p)[0] * (-v[1]) - (q - p)[1] * (-v[0])) / det
    return p + a * u


def _segment(start: np.ndarray, end: np.ndarray, spacing_m: float = 2.0) -> np.ndarray:
    """[M, 2] evenly spaced points from ``start`` to ``end``."""
    count = max(2, int(np.ceil(np.linalg.norm(end - start) / spacing_m)) + 1)
    return np.linspace(start, end, count)


@dataclass(frozen=True)
class _Arm:
    """A road leaving the junction centre in direction ``angle_rad``."""

    angle_rad: float
    lanes_per_direction: int

    @property
    def out_dir(self) -> np.ndarray:
        return np.array([np.cos(self.angle_rad), np.sin(self.angle_rad)])

    @property
    def left(self) -> np.ndarray:
        return np.array([-np.sin(self.angle_rad), np.cos(self.angle_rad)])


def _junction_layout(
    name: str, arm_angles: list[float], lanes_per_direction: int, rng: np.random.Generator, extent_m: float = 300.0
) -> RoadLayout:
    """A junction of straight arms meeting at the map centre (two opposite arms and no junction: a straight road)."""
    center = np.array([extent_m / 2, extent_m / 2])
    arms = [_Arm(a, lanes_per_direction) for a in arm_angles]
    road_half_m = lanes_per_direction * LANE_WIDTH_M
    is_straight = len(arms) == 2
    junction_half_m = 0.0 if is_straight else road_half_m + 4.0
    arm_length_m = extent_m / 2

    lanes: dict[str, Lane] = {}
    incoming: dict[tuple[int, int], str] = {}
    outgoing: dict[tuple[int, int], str] = {}
    for ai, arm in enumerate(arms):
        for k in range(lanes_per_direction):
            offset = (k + 0.5) * LANE_WIDTH_M
            near, far = center + arm.out_dir * junction_half_m, center + arm.out_dir * arm_length_m
            out_id, in_id = f"a{ai}_out{k}", f"a{ai}_in{k}"
            # Outgoing traffic drives away from the centre on the right of the arm's axis.
            lanes[out_id] = Lane(out_id, _segment(near - arm.left * offset, far - arm.left * offset))
            lanes[in_id] = Lane(in_id, _segment(far + arm.left * offset, near + arm.left * offset))
            outgoing[(ai, k)], incoming[(ai, k)] = out_id, in_id
    # Neighbours in the same direction: lane k=0 is the innermost (leftmost) one.
    for (ai, k), lane_id in list(outgoing.items()) + list(incoming.items()):
        table = outgoing if lane_id in outgoing.values() else incoming
        left = table.get((ai, k - 1)) if k > 0 else None
        right = table.get((ai, k + 1))
        lanes[lane_id] = _replace_lane(lanes[lane_id], left_id=left, right_id=right)

    successors: dict[str, list[str]] = {lane_id: [] for lane_id in lanes}
    for ai, a_arm in enumerate(arms):
        for bi, b_arm in enumerate(arms):
            if ai == bi:
                continue
            turn = np.degrees(
                np.arctan2(np.cross(-a_arm.out_dir, b_arm.out_dir), np.dot(-a_arm.out_dir, b_arm.out_dir))
            )
            if abs(turn) < 30:
                pairs = [(k, k) for k in range(lanes_per_direction)]
            elif turn > 0:  # left turn from the innermost lane
                pairs = [(0, 0)]
            else:  # right turn from the outermost lane
                pairs = [(lanes_per_direction - 1, lanes_per_direction - 1)]
            for k_in, k_out in pairs:
                in_id, out_id = incoming[(ai, k_in)], outgoing[(bi, k_out)]
                if is_straight:
                    successors[in_id].append(out_id)
                    continue
                p0, p2 = lanes[in_id].centerline[-1], lanes[out_id].centerline[0]
                control = _line_intersection(p0, -a_arm.out_dir, p2, -b_arm.out_dir)
                control = (p0 + p2) / 2 if control is None else control
                conn_id = f"{in_id}_to_{out_id}"
                lanes[conn_id] = Lane(conn_id, _bezier(p0, control, p2), successors=(out_id,), is_connector=True)
                successors[in_id].append(conn_id)
    lanes = {
        lane_id: lane if lane.is_connector else _replace_lane(lane, successors=tuple(sorted(successors[lane_id])))
        for lane_id, lane in lanes.items()
    }

    # Surfaces: roads, then parking strips along the outer edge of each arm, sidewalks around everything.
    arm_roads = []
    parking = []
    parking_spots = []
    for arm in arms:
        start, end = center, center + arm.out_dir * arm_length_m
        axis = LineString([start, end])
        arm_roads.append(axis.buffer(road_half_m, cap_style="flat"))
        for side in (1.0, -1.0):
            strip_from_m, strip_to_m = junction_half_m, arm_length_m
            a = center + arm.out_dir * strip_from_m + side * arm.left * (road_half_m + PARKING_WIDTH_M / 2)
            b = center + arm.out_dir * strip_to_m + side * arm.left * (road_half_m + PARKING_WIDTH_M / 2)
            parking.append(LineString([a, b]).buffer(PARKING_WIDTH_M / 2, cap_style="flat"))
            yaw = arm.angle_rad if side < 0 else arm.angle_rad + np.pi
            for along in np.arange(strip_from_m + 30.0, strip_to_m - 10.0, 7.0):
                xy = center + arm.out_dir * along + side * arm.left * (road_half_m + PARKING_WIDTH_M / 2)
                parking_spots.append([xy[0], xy[1], np.arctan2(np.sin(yaw), np.cos(yaw))])
    junction = box(*(center - junction_half_m), *(center + junction_half_m)) if junction_half_m > 0 else Polygon()
    road = unary_union([*arm_roads, junction])
    parking_area = unary_union(parking)
    drivable = unary_union([road, parking_area])
    curb = drivable.buffer(SIDEWALK_WIDTH_M, join_style="mitre")
    sidewalks = curb.difference(drivable)

    # Crosswalks across each arm just outside the junction (mid-block on a straight road).
    crosswalks = []
    crossings = []
    walkways = []
    for arm in arms:
        near_m = junction_half_m + 1.0 if not is_straight else 20.0
        a = center + arm.out_dir * near_m
        b = center + arm.out_dir * (near_m + 4.0)
        width = road_half_m + PARKING_WIDTH_M + 0.01
        crosswalks.append(
            Polygon([a - arm.left * width, b - arm.left * width, b + arm.left * width, a + arm.left * width])
        )
        mid = (a + b) / 2
        reach = road_half_m + PARKING_WIDTH_M + SIDEWALK_WIDTH_M / 2
        crossings.append(_segment(mid - arm.left * reach, mid + arm.left * reach, 0.5))
        for side in (1.0, -1.0):
            lateral = road_half_m + PARKING_WIDTH_M + SIDEWALK_WIDTH_M / 2
            start_m = junction_half_m + SIDEWALK_WIDTH_M / 2 if not is_straight else 0.0
            walkways.append(
                _segment(
                    center + arm.out_dir * start_m + side * arm.left * lateral,
                    center + arm.out_dir * (arm_length_m - 2) + side * arm.left * lateral,
                    1.0,
                )
            )

    structures = _structures(
        arms, center, road_half_m + PARKING_WIDTH_M + SIDEWALK_WIDTH_M, junction_half_m, arm_length_m, rng
    )
    lane_ids = sorted(lanes)
    routes = _ego_routes(arms, incoming, lanes, is_straight)
    surface = _rasterize(
        extent_m,
        road,
        parking_area,
        sidewalks,
        crosswalks,
        lanes,
        arms,
        center,
        junction_half_m,
        arm_length_m,
        lanes_per_direction,
    )
    return RoadLayout(
        name=name,
        extent_m=extent_m,
        lanes=tuple(lanes[i] for i in lane_ids),
        drivable_area=drivable,
        sidewalks=sidewalks,
        crosswalks=tuple(crosswalks),
        walkways=tuple(walkways),
        crossings=tuple(crossings),
        parking_spots=np.asarray(parking_spots, dtype=np.float64).reshape(-1, 3),
        structures=tuple(structures),
        ego_routes=routes,
        surface=surface,
    )


def _replace_lane(lane: Lane, **changes: object) -> Lane:
    from dataclasses import replace

    return replace(lane, **changes)


def _ego_routes(
    arms: list[_Arm], incoming: dict[tuple[int, int], str], lanes: dict[str, Lane], is_straight: bool
) -> tuple[tuple[str, ...], ...]:
    """Every route from an incoming lane through the junction to the end of an outgoing lane."""
    routes = []
    for (_, _), in_id in sorted(incoming.items()):
        for nxt in lanes[in_id].successors:
            routes.append((in_id, nxt) if is_straight else (in_id, nxt, *lanes[nxt].successors))
    return tuple(sorted(set(routes)))


def _structures(
    arms: list[_Arm],
    center: np.ndarray,
    setback_m: float,
    junction_half_m: float,
    arm_length_m: float,
    rng: np.random.Generator,
) -> list[Structure]:
    """Buildings, low walls and poles along both sides of every arm, placed at random behind the sidewalk."""
    structures: list[Structure] = []
    for arm in arms:
        for side in (1.0, -1.0):
            along = junction_half_m + SIDEWALK_WIDTH_M + 2.0 + rng.uniform(0, 4)
            while along < arm_length_m - 12:
                length = rng.uniform(10, 24)
                depth = rng.uniform(8, 14)
                gap = rng.uniform(2, 8)
                lateral = setback_m + rng.uniform(1.0, 3.0) + depth / 2
                mid = center + arm.out_dir * (along + length / 2) + side * arm.left * lateral
                if rng.uniform() < 0.2:  # a low wall in front of an empty lot
                    wall_mid = center + arm.out_dir * (along + length / 2) + side * arm.left * (setback_m + 1.0)
                    structures.append(
                        Structure(
                            np.array([*wall_mid, 0.6]), np.array([0.3, length, 1.2]), arm.angle_rad, Material.WALL
                        )
                    )
                else:
                    height = rng.uniform(5, 18)
                    structures.append(
                        Structure(
                            np.array([*mid, height / 2]),
                            np.array([depth, length, height]),
                            arm.angle_rad,
                            Material.BUILDING,
                        )
                    )
                along += length + gap
            # Street-light poles on the outer edge of the sidewalk.
            for pole_along in np.arange(junction_half_m + 8.0, arm_length_m - 5, 25.0):
                xy = center + arm.out_dir * pole_along + side * arm.left * (setback_m - 0.4)
                structures.append(
                    Structure(np.array([*xy, 3.0]), np.array([0.3, 0.3, 6.0]), arm.angle_rad, Material.POLE)
                )
    return structures


def _rasterize(
    extent_m: float,
    road: Polygon,
    parking: Polygon | MultiPolygon,
    sidewalks: Polygon | MultiPolygon,
    crosswalks: list[Polygon],
    lanes: dict[str, Lane],
    arms: list[_Arm],
    center: np.ndarray,
    junction_half_m: float,
    arm_length_m: float,
    lanes_per_direction: int,
) -> SurfaceRaster:
    """Draw the surfaces into a 0.1 m raster oriented as a nuScenes map mask (PIL fills the polygons)."""
    size = round(extent_m / RASTER_RESOLUTION_M)
    image = Image.new("L", (size, size), int(Surface.OFFROAD))
    draw = ImageDraw.Draw(image)

    def pixels(coords: np.ndarray) -> list[tuple[float, float]]:
        coords = np.asarray(coords)
        return list(zip(coords[:, 0] / RASTER_RESOLUTION_M, size - coords[:, 1] / RASTER_RESOLUTION_M, strict=False))

    def fill(geometry: Polygon | MultiPolygon, value: Surface) -> None:
        for polygon in getattr(geometry, "geoms", [geometry]):
            if polygon.is_empty:
                continue
            draw.polygon(pixels(np.asarray(polygon.exterior.coords)), fill=int(value))
            for hole in polygon.interiors:
                draw.polygon(pixels(np.asarray(hole.coords)), fill=int(Surface.OFFROAD))

    fill(sidewalks, Surface.SIDEWALK)
    fill(parking, Surface.PARKING)
    fill(road, Surface.ROAD)
    marking_px = max(1, round(0.15 / RASTER_RESOLUTION_M))
    for arm in arms:
        start_m = junction_half_m + 6.0 if junction_half_m > 0 else 0.0
        # The centre line (solid) and dashed lines between lanes of the same direction.
        a, b = center + arm.out_dir * start_m, center + arm.out_dir * arm_length_m
        draw.line(pixels(np.stack([a, b])), fill=int(Surface.LANE_MARKING), width=marking_px)
        for k in range(1, lanes_per_direction):
            for side in (1.0, -1.0):
                offset = side * arm.left * k * LANE_WIDTH_M
                for dash_m in np.arange(start_m, arm_length_m - 3.0, 9.0):
                    p = center + arm.out_dir * dash_m + offset
                    q = center + arm.out_dir * (dash_m + 3.0) + offset
                    draw.line(pixels(np.stack([p, q])), fill=int(Surface.LANE_MARKING), width=marking_px)
    for crosswalk in crosswalks:
        fill(crosswalk, Surface.ROAD)
        corners = np.asarray(crosswalk.exterior.coords)[:4]
        across = corners[2] - corners[1]  # along the crosswalk's long side (across the road)
        steps = int(np.linalg.norm(across) // 1.0)
        for i in range(0, steps, 2):  # zebra stripes half a metre wide
            t0, t1 = i / steps, (i + 0.5) / steps
            stripe = [
                corners[0] + across * t0,
                corners[1] + across * t0,
                corners[1] + across * t1,
                corners[0] + across * t1,
            ]
            draw.polygon(pixels(np.stack(stripe)), fill=int(Surface.CROSSWALK))
    return SurfaceRaster(np.asarray(image, dtype=np.uint8))


LAYOUTS: dict[str, Callable[[np.random.Generator], RoadLayout]] = {
    "straight": lambda rng: _junction_layout("straight", [0.0, np.pi], 2, rng),
    "intersection": lambda rng: _junction_layout("intersection", [0.0, np.pi / 2, np.pi, 3 * np.pi / 2], 1, rng),
    "t_junction": lambda rng: _junction_layout("t_junction", [0.0, np.pi / 2, np.pi], 1, rng),
}
"""Layout builders by name; each takes the random generator that places the structures."""


def build_layout(name: str, rng: np.random.Generator) -> RoadLayout:
    """Build the named layout; structures beside the road are placed with ``rng``."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[name](rng)
