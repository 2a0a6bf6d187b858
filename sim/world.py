"""A world that can be stepped: the ego and the agents on a road layout, moving along paths.

Every actor, the ego included, has the same kinematics: it moves along its path with a speed and an
acceleration, its heading the path's. Vehicles and cyclists set their acceleration with the Intelligent Driver
Model (IDM) against whatever their box would run into as it moves along their path (vehicles, cyclists, pedestrians
on a crosswalk and the ego alike, where they are now and where they will be along their own paths), slow down for
curves, and at junctions the one that reaches the conflict zone first goes while the other waits outside it.
Pedestrians walk at their own pace. No two vehicles' boxes ever overlap: a vehicle enters from the map's edge only
when its entry is clear, and one whose move would hit another stops dead instead (see ``step``).
``step(world, state) -> state`` is a pure function.

Notation:
    A  actors; index 0 is the ego
    K  look-ahead samples along an actor's path
    G  ghosts: where an actor will be at ``GHOST_HORIZONS_S``
    P  pairs of actors (i, j) that are checked against each other
    V  vehicles (every actor but the pedestrians)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bevjepa.datasets import geometry, types
from bevjepa.sim import layouts
from bevjepa.sim.paths import Path, PathBank

EGO_ID = "ego"
EGO_SIZE_WLH_M = (1.73, 4.08, 1.56)
"""The nuScenes ego vehicle (a Renault Zoe)."""
EGO_REAR_AXLE_TO_CENTER_M = 1.34
"""The ego frame's origin is the rear axle, this far behind the box centre."""
BOX_BOTTOM_Z_M = 0.02
"""Boxes stand this far above the ground plane (z = 0), so that ground returns never lie on a box face."""

KIND_VEHICLE, KIND_PEDESTRIAN, KIND_CYCLIST = "vehicle", "pedestrian", "cyclist"
GHOST_HORIZONS_S = np.arange(0.0, 3.01, 0.5)
"""Horizons (s) of the ghosts: where each actor will be along its path at its present speed. Every 0.5 s, so that
a car's ghosts leave no gap that another could slip through unseen."""
LOOKAHEAD_OFFSETS_M = np.concatenate([np.arange(0.0, 4.0, 0.5), np.arange(4.0, 60.0, 2.0)])
"""How far along its path (m) each actor's box is moved to see what it would run into: finely near, where a long
vehicle's overhang swings through a tight turn, every 2 m up to 60 m."""
CLEARANCE_M = 0.02
"""Vehicles' boxes, grown by this (m) on every side, never overlap (see ``step``)."""


@dataclass(frozen=True)
class IdmParams:
    """Intelligent Driver Model parameters.

    Attributes:
        max_accel_mps2: maximum acceleration (m/s²).
        comfort_decel_mps2: comfortable deceleration (m/s²).
        max_decel_mps2: hardest braking (m/s², positive).
        min_gap_m: standstill gap (m).
        time_headway_s: desired time gap (s).
        max_jerk_mps3: largest change of acceleration per second (m/s³).
        lateral_accel_mps2: the lateral acceleration allowed in curves (m/s²).
    """

    max_accel_mps2: float = 1.5
    comfort_decel_mps2: float = 2.0
    max_decel_mps2: float = 6.0
    min_gap_m: float = 2.0
    time_headway_s: float = 1.2
    max_jerk_mps3: float = 6.0
    lateral_accel_mps2: float = 2.0


@dataclass(frozen=True)
class ActorSpec:
    """What does not change about an actor.

    Attributes:
        instance_id: stable identifier (``ego`` for the ego).
        category: nuScenes category name (``vehicle.car``, ``human.pedestrian.adult``, ...).
        kind: ``vehicle``, ``pedestrian`` or ``cyclist``.
        size_wlh_m: (width, length, height) in m.
        path: the path it follows; its box centre moves along it.
        desired_speed_mps: cruising speed (m/s); 0 for a parked vehicle.
        appear_time_s: when it enters the world (before that it does not exist).
        depart_time_s: when it starts to move (a waiting pedestrian stands until then).
        parked: a parked vehicle that never moves.
    """

    instance_id: str
    category: str
    kind: str
    size_wlh_m: tuple[float, float, float]
    path: Path
    desired_speed_mps: float
    appear_time_s: float = 0.0
    depart_time_s: float = 0.0
    parked: bool = False


@dataclass(frozen=True)
class World:
    """The parts of the world that do not change while it steps.

    Attributes:
        layout: the road layout.
        actors: every actor; ``actors[0]`` is the ego.
        idm: car-following parameters shared by vehicles and cyclists.
    """

    layout: layouts.RoadLayout
    actors: tuple[ActorSpec, ...]
    idm: IdmParams = IdmParams()

    def __post_init__(self) -> None:
        if not self.actors or self.actors[0].instance_id != EGO_ID:
            raise ValueError("World.actors: the first actor must be the ego")
        object.__setattr__(self, "_paths", PathBank.of([a.path for a in self.actors]))
        object.__setattr__(self, "_table", _ActorTable.of(self.actors))

    @property
    def paths(self) -> PathBank:
        """Every actor's path, stacked in actor order."""
        return self._paths  # type: ignore[attr-defined]

    @property
    def table(self) -> _ActorTable:
        """Per-actor constants as arrays."""
        return self._table  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _ActorTable:
    """Per-actor constants of a world as arrays ([A] each; sizes [A, 3])."""

    sizes_wlh_m: np.ndarray
    is_pedestrian: np.ndarray
    desired_speed_mps: np.ndarray
    appear_time_s: np.ndarray
    depart_time_s: np.ndarray
    parked: np.ndarray

    @staticmethod
    def of(actors: tuple[ActorSpec, ...]) -> _ActorTable:
        return _ActorTable(
            np.array([a.size_wlh_m for a in actors], dtype=np.float64),
            np.array([a.kind == KIND_PEDESTRIAN for a in actors]),
            np.array([a.desired_speed_mps for a in actors]),
            np.array([a.appear_time_s for a in actors]),
            np.array([a.depart_time_s for a in actors]),
            np.array([a.parked for a in actors]),
        )


@dataclass(frozen=True)
class WorldState:
    """The world at one instant.

    Attributes:
        time_s: seconds since the scenario started.
        s_m: [A] float64 arc length of each actor along its path (m).
        speed_mps: [A] float64 speed along the path (m/s), never negative.
        accel_mps2: [A] float64 current acceleration (m/s²).
        finished: [A] bool — the actor has left the map at the end of its path.
        entered: [A] bool — the actor has entered the world: at its ``appear_time_s``, or later if its entry was
            not clear then (see ``step``).
        emergency_stop: [A] bool — the actor stopped dead in the step that led here: driving on would have put its
            box on another vehicle's.
    """

    time_s: float
    s_m: np.ndarray
    speed_mps: np.ndarray
    accel_mps2: np.ndarray
    finished: np.ndarray
    entered: np.ndarray
    emergency_stop: np.ndarray

    def active(self, world: World) -> np.ndarray:
        """[A] bool: actors that exist now."""
        return self.entered & ~self.finished


def initial_state(world: World, s_m: np.ndarray, speed_mps: np.ndarray) -> WorldState:
    """The state at time 0 with actors at ``s_m`` ([A] m) moving at ``speed_mps`` ([A] m/s).

    Actors whose ``appear_time_s`` is 0 exist from the start; the caller places them apart.
    """
    count = len(world.actors)
    return WorldState(
        0.0,
        np.asarray(s_m, dtype=np.float64),
        np.asarray(speed_mps, dtype=np.float64),
        np.zeros(count),
        np.zeros(count, dtype=bool),
        world.table.appear_time_s <= 1e-9,
        np.zeros(count, dtype=bool),
    )


def actor_poses(world: World, state: WorldState) -> tuple[np.ndarray, np.ndarray]:
    """Box-centre positions [A, 2] (m, global) and headings [A] (rad) of every actor."""
    xy, yaw, _ = world.paths.lookup(state.s_m)
    return xy, geometry.wrap_angle(yaw)


def ego_pose(world: World, state: WorldState) -> geometry.RigidTransform:
    """``global_from_ego``: the ego frame, origin at the rear axle, on the ground (z = 0)."""
    xy, yaw = world.actors[0].path.pose_at(state.s_m[:1])
    heading = np.array([np.cos(yaw[0]), np.sin(yaw[0])])
    rear_axle = xy[0] - heading * EGO_REAR_AXLE_TO_CENTER_M
    return geometry.RigidTransform.from_pose_2d(rear_axle[0], rear_axle[1], float(yaw[0]))


def agent_boxes(world: World, state: WorldState) -> tuple[list[types.Box3D], np.ndarray]:
    """The boxes (global frame, with velocity) of the agents that exist now, the ego excluded.

    Returns:
        boxes, and [B] int64 the actor index of each box.
    """
    xy, yaw = actor_poses(world, state)
    indices = np.flatnonzero(state.active(world))
    indices = indices[indices != 0]
    boxes = []
    for i in indices:
        actor = world.actors[i]
        w, length, h = actor.size_wlh_m
        velocity = state.speed_mps[i] * np.array([np.cos(yaw[i]), np.sin(yaw[i])])
        boxes.append(
            types.Box3D(
                np.array([xy[i, 0], xy[i, 1], BOX_BOTTOM_Z_M + h / 2]),
                np.array([w, length, h]),
                yaw[i],
                velocity,
                actor.category,
                actor.instance_id,
            )
        )
    return boxes, indices


def step(world: World, state: WorldState, dt_s: float, ego_accel_mps2: float | None = None) -> WorldState:
    """Advance the world by ``dt_s``.

    Every actor accelerates by IDM against what lies along its path (the ego too, unless ``ego_accel_mps2``
    commands it). Two rules keep vehicles' boxes apart whatever the dynamics: a vehicle whose move would put its
    box on another vehicle's stops dead where it is instead (``WorldState.emergency_stop``; a commanded ego is never
    stopped, so that a planner's collisions stay visible), and a vehicle due to enter from the map's edge waits
    until its entry is clear (the stretch it needs to stop comfortably behind whatever is ahead).

    Args:
        world: the static world.
        state: the current state.
        dt_s: time step (s).
        ego_accel_mps2: the ego's commanded acceleration (m/s²); None lets the ego drive by IDM like the others.

    Returns:
        The state at ``state.time_s + dt_s``.
    """
    idm = world.idm
    accel = _idm_accelerations(world, state)
    if ego_accel_mps2 is not None:
        accel[0] = ego_accel_mps2
    table = world.table
    desired = table.desired_speed_mps
    departed = table.depart_time_s <= state.time_s + 1e-9
    parked = table.parked
    # Pedestrians walk at their own pace once they leave; nothing else is jerk-limited.
    is_ped = table.is_pedestrian
    walk = np.clip((desired - state.speed_mps) / 0.5, -2.0, 1.0)
    accel[is_ped] = np.minimum(walk[is_ped], accel[is_ped])
    accel[~departed | parked] = np.minimum(accel[~departed | parked], 0.0)
    max_change = idm.max_jerk_mps3 * dt_s
    accel = np.clip(accel, state.accel_mps2 - max_change, state.accel_mps2 + max_change)
    accel = np.clip(accel, -idm.max_decel_mps2, idm.max_accel_mps2)
    speed = state.speed_mps + accel * dt_s
    stopped = speed < 0
    speed = np.maximum(speed, 0.0)
    accel = np.where(stopped, np.minimum(0.0, -state.speed_mps / dt_s), accel)
    moved = (state.speed_mps + speed) / 2 * dt_s
    active = state.active(world)
    lengths = world.paths.length_m
    s = np.minimum(np.where(active, state.s_m + moved, state.s_m), lengths)
    may_stop = np.ones(len(world.actors), dtype=bool)
    may_stop[0] = ego_accel_mps2 is None
    halt = _emergency_stops(world, state, s, active & may_stop)
    s = np.where(halt, state.s_m, s)
    speed = np.where(halt, 0.0, speed)
    accel = np.where(halt, 0.0, accel)
    at_end = s >= lengths - 1e-6
    # Agents leave the map at the end of their path; the ego stops there.
    leaves = at_end & ~parked
    leaves[0] = False
    stop_here = at_end & ~leaves
    speed = np.where(stop_here, 0.0, speed)
    accel = np.where(stop_here, 0.0, accel)
    moved_state = replace(
        state,
        time_s=state.time_s + dt_s,
        s_m=s,
        speed_mps=np.where(active, speed, state.speed_mps),
        accel_mps2=np.where(active, accel, 0.0),
        finished=state.finished | (leaves & active),
        emergency_stop=halt,
    )
    return replace(moved_state, entered=state.entered | _entries(world, moved_state))


def box_separation(
    center_a: np.ndarray,
    half_length_a: np.ndarray,
    half_width_a: np.ndarray,
    yaw_a: np.ndarray,
    center_b: np.ndarray,
    half_length_b: np.ndarray,
    half_width_b: np.ndarray,
    yaw_b: np.ndarray,
) -> np.ndarray:
    """How far apart two oriented rectangles are along their best separating axis, broadcast over ``...``.

    Args:
        center_a: [..., 2] float — centres x, y (m) of the first rectangles.
        half_length_a, half_width_a: [...] float — half extents along and across the heading (m).
        yaw_a: [...] float — headings (rad).
        center_b, half_length_b, half_width_b, yaw_b: the second rectangles, broadcastable against the first.

    Returns:
        [...] float64 — the largest gap (m) along any of the four axes of the separating-axis test: positive when
        they lie apart (a lower bound of their distance, exact when they face each other squarely), zero or
        negative when they overlap.
    """
    delta = np.asarray(center_b, dtype=np.float64) - np.asarray(center_a, dtype=np.float64)  # [..., 2]
    cos_a, sin_a = np.cos(yaw_a), np.sin(yaw_a)
    cos_b, sin_b = np.cos(yaw_b), np.sin(yaw_b)
    # |cos| and |sin| of the angle between the two headings.
    cos_ab = np.abs(cos_a * cos_b + sin_a * sin_b)
    sin_ab = np.abs(sin_a * cos_b - cos_a * sin_b)
    dx, dy = delta[..., 0], delta[..., 1]
    along_a = np.abs(dx * cos_a + dy * sin_a) - (half_length_a + half_length_b * cos_ab + half_width_b * sin_ab)
    across_a = np.abs(-dx * sin_a + dy * cos_a) - (half_width_a + half_length_b * sin_ab + half_width_b * cos_ab)
    along_b = np.abs(dx * cos_b + dy * sin_b) - (half_length_b + half_length_a * cos_ab + half_width_a * sin_ab)
    across_b = np.abs(-dx * sin_b + dy * cos_b) - (half_width_b + half_length_a * sin_ab + half_width_a * cos_ab)
    return np.maximum(np.maximum(along_a, across_a), np.maximum(along_b, across_b))


def _idm_accelerations(world: World, state: WorldState) -> np.ndarray:
    """[A] IDM accelerations (m/s²) of every actor against whatever its body would run into along its path.

    Each actor's body is moved along its own path (to ``LOOKAHEAD_OFFSETS_M``; its box turns with
    the path, so that the overhangs of a long vehicle in a tight turn count) and checked against where every other
    actor is now and will be at ``GHOST_HORIZONS_S`` along that one's path. Only pairs whose reach overlaps at all
    are checked.
    """
    idm = world.idm
    table = world.table
    count = len(world.actors)
    xy, yaw = actor_poses(world, state)
    active = state.active(world)
    sizes = table.sizes_wlh_m  # [A, 3]
    is_ped = table.is_pedestrian
    desired = table.desired_speed_mps
    speed = state.speed_mps
    path_length = world.paths.length_m  # [A]

    # The body of each actor after it drives offsets[k] along its path: centres [A, K, 2], headings [A, K].
    offsets = LOOKAHEAD_OFFSETS_M  # [K]
    body_s = state.s_m[:, None] + offsets[None, :]
    body_xy, body_heading, _ = world.paths.lookup(body_s)
    on_path = body_s <= path_length[:, None] + 1e-9  # [A, K]; agents leave the map at the end of their path
    # Curvature ahead of each actor's front, for the speed that curves allow: [A, K].
    _, _, curvature = world.paths.lookup(state.s_m[:, None] + sizes[:, 1:2] / 2 + offsets[None, :])

    # Ghosts: every actor now and where it will be after each horizon at its present speed along its path ([A, G]).
    horizons = GHOST_HORIZONS_S
    ghost_xy, ghost_heading, _ = world.paths.lookup(state.s_m[:, None] + speed[:, None] * horizons[None, :])
    # Only the present position counts for pedestrians (they stop if a car comes).
    ghost_valid = ~is_ped[:, None] | (horizons[None, :] == 0)  # [A, G]

    # Vehicles give pedestrians a wider berth: the lateral margin i keeps from j, [A, A].
    margin = np.where(~is_ped[:, None] & is_ped[None, :], 1.0, 0.3)
    # Candidate pairs: i's swept boxes and j's ghosts come within reach (their axis-aligned bounds overlap).
    lo_i, hi_i = _bounds(body_xy, body_heading, sizes[:, 1] / 2, sizes[:, 0] / 2 + margin.max(axis=1), on_path)
    lo_j, hi_j = _bounds(ghost_xy, ghost_heading, sizes[:, 1] / 2, sizes[:, 0] / 2, ghost_valid)
    reachable = np.all((lo_i[:, None, :] <= hi_j[None, :, :]) & (lo_j[None, :, :] <= hi_i[:, None, :]), axis=-1)
    # Pedestrians step around each other: they only wait for vehicles; parked vehicles wait for nothing.
    valid = active[:, None] & active[None, :] & ~np.eye(count, dtype=bool) & ~(is_ped[:, None] & is_ped[None, :])
    valid &= ~world.table.parked[:, None]
    # Whoever drives behind another in the same lane looks out for it, not the other way round. One behind in
    # another lane still counts: a vehicle changing lanes waits for the traffic coming up in the lane it moves to.
    heading_vec = np.stack([np.cos(yaw), np.sin(yaw)], axis=-1)  # [A, 2]
    left_vec = np.stack([-heading_vec[:, 1], heading_vec[:, 0]], axis=-1)  # [A, 2]
    relative = xy[None, :, :] - xy[:, None, :]  # [A, A, 2]: j as seen from i
    same_direction = heading_vec @ heading_vec.T > 0.7  # [A, A]
    behind_i = np.einsum("ijc,ic->ij", relative, heading_vec) < 0  # [A, A]
    beside_i = np.abs(np.einsum("ijc,ic->ij", relative, left_vec))  # [A, A] m
    in_lane_i = beside_i < (sizes[:, None, 0] + sizes[None, :, 0]) / 2 + margin
    follower = same_direction & behind_i & in_lane_i
    pair_i, pair_j = np.nonzero(valid & reachable & ~follower)  # [P] each

    # Separation of i's swept boxes (grown across by the margin) from j's ghosts: [P, G, K].
    separation = box_separation(
        body_xy[pair_i][:, None, :, :],
        (sizes[pair_i, 1] / 2)[:, None, None],
        (sizes[pair_i, 0] / 2 + margin[pair_i, pair_j])[:, None, None],
        body_heading[pair_i][:, None, :],
        ghost_xy[pair_j][:, :, None, :],
        (sizes[pair_j, 1] / 2)[:, None, None],
        (sizes[pair_j, 0] / 2)[:, None, None],
        ghost_heading[pair_j][:, :, None],
    )
    hit = (separation < 0) & on_path[pair_i][:, None, :] & ghost_valid[pair_j][:, :, None]  # [P, G, K]
    gap, first_k = _first_contact(separation, hit, offsets)  # [P, G] m, [P, G]
    # A ghost only matters if i would reach it no sooner than the ghost gets there (it is then in the way).
    time_i = gap / np.maximum(speed[pair_i], 0.5)[:, None]
    gap = np.where((horizons[None, :] == 0) | (time_i >= horizons[None, :] - 0.5), gap, np.inf)

    gap_ij = np.full((count, count), np.inf)  # [A, A] m
    gap_ij[pair_i, pair_j] = gap.min(axis=1)
    gap_now_ij = np.full((count, count), np.inf)  # [A, A] m, to j's present body only
    gap_now_ij[pair_i, pair_j] = gap[:, 0]
    conflict_k = np.minimum(first_k.min(axis=1), len(offsets) - 1)  # [P]
    heading_at_conflict = np.zeros((count, count))
    heading_at_conflict[pair_i, pair_j] = body_heading[pair_i, conflict_k]
    alignment = np.cos(yaw[None, :] - heading_at_conflict)  # [A, A]
    following = alignment > 0.7
    is_vehicle_j = ~is_ped[None, :]
    crossing = is_vehicle_j & ~following & np.isfinite(gap_ij)
    # Two vehicles going the same way in different lanes whose paths meet: one is changing lanes.
    apart = ~(in_lane_i | in_lane_i.T)
    merging = same_direction & same_direction.T & apart & (np.isfinite(gap_ij) | np.isfinite(gap_ij.T))
    # Pedestrians yield to vehicles; of two vehicles whose paths cross or merge, one goes first (_right_of_way).
    # The other waits outside the path the first will sweep, unless it merges in behind it: then it follows it.
    # The one that goes first still stops for the other's body if that stands in its way.
    contest = np.triu(crossing | crossing.T | merging, 1) & ~is_ped[:, None] & ~is_ped[None, :]
    first, second = np.nonzero(contest)  # [C] each
    merge = merging[first, second] & ~(crossing | crossing.T)[first, second]
    first_goes, first_zone, second_zone = _right_of_way(
        world, state, first, second, merge, body_xy, body_heading, on_path, offsets
    )
    first_behind = behind_i[second, first]  # [C]: first drives behind second
    first_follows = merge & ~first_goes & first_behind
    second_follows = merge & first_goes & ~first_behind
    first_waits = np.minimum(first_zone, gap_ij[first, second])
    second_waits = np.minimum(second_zone, gap_ij[second, first])
    gap_ij[first, second] = np.where(
        first_goes, gap_now_ij[first, second], np.where(first_follows, gap_ij[first, second], first_waits)
    )
    gap_ij[second, first] = np.where(
        first_goes, np.where(second_follows, gap_ij[second, first], second_waits), gap_now_ij[second, first]
    )
    following[first, second] &= first_goes | first_follows
    following[second, first] &= ~first_goes | second_follows

    leader = np.argmin(gap_ij, axis=1)
    leader_gap = gap_ij[np.arange(count), leader]
    leader_speed = np.where(following[np.arange(count), leader], speed[leader] * alignment[np.arange(count), leader], 0)
    leader_speed = np.maximum(leader_speed, 0.0)

    # Curves: the speed the look-ahead allows, braking comfortably from here.
    curve_speed = np.sqrt(idm.lateral_accel_mps2 / np.maximum(curvature, 1e-6))  # [A, K]
    reachable_speed = np.sqrt(curve_speed**2 + 2 * idm.comfort_decel_mps2 * offsets[None, :])
    target = np.minimum(desired, reachable_speed.min(axis=1))
    target = np.maximum(target, 0.1)

    free = 1 - (speed / target) ** 4
    desired_gap = (
        idm.min_gap_m
        + speed * idm.time_headway_s
        + speed * (speed - leader_speed) / (2 * np.sqrt(idm.max_accel_mps2 * idm.comfort_decel_mps2))
    )
    interaction = np.where(
        np.isfinite(leader_gap), (np.maximum(desired_gap, idm.min_gap_m) / np.maximum(leader_gap, 0.1)) ** 2, 0.0
    )
    accel = idm.max_accel_mps2 * (free - interaction)
    # The ego stops at the end of its route instead of driving off it.
    ego_left = world.actors[0].path.length_m - state.s_m[0]
    if np.isfinite(ego_left):
        ego_gap = max(ego_left - sizes[0, 1] / 2, 0.1)
        ego_stop = idm.max_accel_mps2 * (
            1
            - (
                idm.min_gap_m
                + speed[0] * idm.time_headway_s
                + speed[0] ** 2 / (2 * np.sqrt(idm.max_accel_mps2 * idm.comfort_decel_mps2))
            )
            ** 2
            / ego_gap**2
        )
        accel[0] = min(accel[0], ego_stop)
    return accel


def _box_arrays(world: World, s_m: np.ndarray, indices: np.ndarray, grow_m: float) -> tuple[np.ndarray, ...]:
    """Centres [V, 2], half lengths [V], half widths [V] (grown by ``grow_m``) and headings [V] of some actors."""
    xy, heading, _ = world.paths.lookup(s_m)
    sizes = world.table.sizes_wlh_m[indices]
    return xy[indices], sizes[:, 1] / 2 + grow_m, sizes[:, 0] / 2 + grow_m, heading[indices]


def _overlapping(boxes_a: tuple[np.ndarray, ...], boxes_b: tuple[np.ndarray, ...]) -> np.ndarray:
    """[Va, Vb] bool: which boxes of the first set overlap which of the second (touching does not count)."""
    xy_a, hl_a, hw_a, yaw_a = (b[:, None] for b in boxes_a)
    xy_b, hl_b, hw_b, yaw_b = (b[None, :] for b in boxes_b)
    return box_separation(xy_a, hl_a, hw_a, yaw_a, xy_b, hl_b, hw_b, yaw_b) < 0


def _emergency_stops(world: World, state: WorldState, s_new: np.ndarray, may_stop: np.ndarray) -> np.ndarray:
    """[A] bool: the vehicles that must stay where they are so that no two vehicles' boxes overlap after the step.

    Boxes are grown by ``CLEARANCE_M``. A pair that would overlap is resolved by stopping whichever drives into
    the other's present place (both if each does, or neither does); pairs that overlap already are left alone.
    Stopping one vehicle can bring it into conflict with a third, so this repeats until nothing overlaps or no
    more vehicles can be stopped. Pedestrians are not vehicles and are left out.
    """
    count = len(world.actors)
    vehicles = np.flatnonzero(state.active(world) & ~world.table.is_pedestrian)  # [V]
    halt = np.zeros(count, dtype=bool)
    if len(vehicles) < 2:
        return halt
    old = _box_arrays(world, state.s_m, vehicles, CLEARANCE_M)
    new = _box_arrays(world, s_new, vehicles, CLEARANCE_M)
    before = _overlapping(old, old)  # [V, V]
    into = _overlapping(new, old)  # [V, V]: i's new box on j's present one
    movers = may_stop[vehicles] & (s_new[vehicles] > state.s_m[vehicles])  # [V]
    held = np.zeros(len(vehicles), dtype=bool)
    for _ in range(len(vehicles)):
        held_xy = np.where(held[:, None], old[0], new[0])  # [V, 2]: the stopped stay, the others move
        where = (held_xy, *(np.where(held, o, n) for o, n in zip(old[1:], new[1:], strict=True)))
        can = movers & ~held
        clash = _overlapping(where, where) & ~before & (can[:, None] | can[None, :])  # [V, V]
        if not clash.any():
            break
        stop_i = can[:, None] & (~can[None, :] | into | ~into.T)  # [V, V]: i stops for this pair
        held |= (clash & stop_i).any(axis=1)
    halt[vehicles] = held
    return halt


def _entries(world: World, state: WorldState) -> np.ndarray:
    """[A] bool: the actors due by now that may enter: nothing lies where they appear or in the stretch ahead.

    The stretch is what it needs to stop comfortably from its entry speed, plus the standstill gap; it is checked
    against every vehicle, parked or moving, with the lateral margin vehicles keep. Several due at once enter in
    index order, each against those before it.
    """
    idm = world.idm
    table = world.table
    due = np.flatnonzero(~state.entered & (table.appear_time_s <= state.time_s + 1e-9))
    enter = np.zeros(len(world.actors), dtype=bool)
    if not len(due):
        return enter
    present = state.active(world) & ~table.is_pedestrian
    xy, heading, _ = world.paths.lookup(state.s_m)
    sizes = table.sizes_wlh_m
    for i in due:
        if table.is_pedestrian[i]:
            enter[i] = True
            continue
        speed = state.speed_mps[i]
        stretch = idm.min_gap_m + speed * idm.time_headway_s + speed**2 / (2 * idm.comfort_decel_mps2)
        forward = np.array([np.cos(heading[i]), np.sin(heading[i])])
        others = np.flatnonzero(present | (enter & ~table.is_pedestrian))
        free = box_separation(
            xy[i] + forward * stretch / 2,
            sizes[i, 1] / 2 + stretch / 2,
            sizes[i, 0] / 2 + 0.3,
            heading[i],
            xy[others],
            sizes[others, 1] / 2,
            sizes[others, 0] / 2,
            heading[others],
        )
        enter[i] = bool(np.all(free >= 0))
    return enter


def _bounds(
    xy: np.ndarray, heading: np.ndarray, half_length: np.ndarray, half_width: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds of each actor's boxes.

    Args:
        xy: [A, N, 2] box centres (m); heading: [A, N] (rad); half_length, half_width: [A] (m); valid: [A, N] bool.

    Returns:
        Lower and upper corners [A, 2] (m); +inf and -inf for an actor without a valid box.
    """
    cos, sin = np.abs(np.cos(heading)), np.abs(np.sin(heading))  # [A, N]
    half = np.stack(
        [
            cos * half_length[:, None] + sin * half_width[:, None],
            sin * half_length[:, None] + cos * half_width[:, None],
        ],
        axis=-1,
    )  # [A, N, 2]
    lower = np.where(valid[..., None], xy - half, np.inf).min(axis=1)
    upper = np.where(valid[..., None], xy + half, -np.inf).max(axis=1)
    return lower, upper


def _first_contact(separation: np.ndarray, hit: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far an actor drives along its samples (the last axis, at ``offsets``) until its box first hits.

    Args:
        separation: [..., K] separation (m) of the actor's box at each sample from an obstacle (``box_separation``).
        hit: [..., K] bool — the samples that count as contact.
        offsets: [K] distance (m) of each sample along the path, increasing from 0.

    Returns:
        [...] distance (m): 0 if the first sample hits, inf if none does, else interpolated between the last free
        sample and the first hit by their separations; and [...] the index of the first hit (K if none).
    """
    count = len(offsets)
    hit_any = hit.any(axis=-1)
    first_k = np.where(hit_any, hit.argmax(axis=-1), count)
    before = np.maximum(first_k - 1, 0)
    sep_before = np.take_along_axis(separation, before[..., None], axis=-1)[..., 0]
    sep_hit = np.take_along_axis(separation, np.minimum(first_k, count - 1)[..., None], axis=-1)[..., 0]
    fraction = np.clip(sep_before / np.maximum(sep_before - sep_hit, 1e-9), 0.0, 1.0)
    spacing = offsets[np.minimum(first_k, count - 1)] - offsets[before]
    distance = np.where(first_k == 0, 0.0, offsets[before] + spacing * fraction)
    return np.where(hit_any, distance, np.inf), first_k


def _right_of_way(
    world: World,
    state: WorldState,
    first: np.ndarray,
    second: np.ndarray,
    merge: np.ndarray,
    body_xy: np.ndarray,
    body_heading: np.ndarray,
    on_path: np.ndarray,
    offsets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which of two vehicles whose paths cross or merge goes first, and how far each is from the other's swept path.

    The conflict zone of a pair is where one's swept boxes (along its path, as ``_idm_accelerations`` moves them)
    meet the other's; each one's distance to it depends on the paths alone, not on speeds, so the decision does not
    flip back and forth as both brake. A vehicle that can no longer stop before the zone (at its hardest braking)
    goes first. Otherwise, where paths cross, the one that reaches the zone sooner at its present speed goes (ties
    to the lower index); where they merge (one changes lanes), the one ahead goes if the one behind would have the
    gap IDM keeps behind it, else the one behind goes and the one ahead waits before moving over.

    Args:
        first, second: [C] int actor indices of the pairs.
        merge: [C] bool — the pair merges (same direction, different lanes) rather than crosses.
        body_xy, body_heading, on_path: every actor's swept boxes: [A, K, 2] centres, [A, K] headings, [A, K] valid.
        offsets: [K] their distances along the path (m).

    Returns:
        [C] bool: ``first`` goes; [C] m: ``first``'s distance to the zone; [C] m: ``second``'s (inf: no zone).
    """
    if not len(first):
        return np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0)
    idm = world.idm
    sizes = world.table.sizes_wlh_m
    speed = state.speed_mps
    separation = box_separation(
        body_xy[first][:, :, None, :],
        (sizes[first, 1] / 2)[:, None, None],
        (sizes[first, 0] / 2 + 0.3)[:, None, None],
        body_heading[first][:, :, None],
        body_xy[second][:, None, :, :],
        (sizes[second, 1] / 2)[:, None, None],
        (sizes[second, 0] / 2 + 0.3)[:, None, None],
        body_heading[second][:, None, :],
    )  # [C, K first, K second]
    # Each one's separation from the other's whole swept path, sample by sample: [C, K].
    first_sep = np.where(on_path[second][:, None, :], separation, np.inf).min(axis=2)
    second_sep = np.where(on_path[first][:, :, None], separation, np.inf).min(axis=1)
    first_zone, _ = _first_contact(first_sep, (first_sep < 0) & on_path[first], offsets)
    second_zone, _ = _first_contact(second_sep, (second_sep < 0) & on_path[second], offsets)
    committed_first = first_zone <= speed[first] ** 2 / (2 * idm.max_decel_mps2)
    committed_second = second_zone <= speed[second] ** 2 / (2 * idm.max_decel_mps2)
    # Crossing: the sooner goes.
    time_first = first_zone / np.maximum(speed[first], 0.5)
    time_second = second_zone / np.maximum(speed[second], 0.5)
    sooner = (time_first < time_second) | ((time_first == time_second) & (first < second))
    # Merging: the one ahead goes if the one behind keeps IDM's gap behind it.
    heading = body_heading[first, 0]
    relative = body_xy[second, 0] - body_xy[first, 0]  # [C, 2]
    along = relative[:, 0] * np.cos(heading) + relative[:, 1] * np.sin(heading)  # [C] m: second ahead if > 0
    ahead = np.where(along > 0, second, first)
    behind = np.where(along > 0, first, second)
    clear_m = np.abs(along) - (sizes[ahead, 1] + sizes[behind, 1]) / 2
    need_m = (
        idm.min_gap_m
        + speed[behind] * idm.time_headway_s
        + np.maximum(speed[behind] ** 2 - speed[ahead] ** 2, 0.0) / (2 * idm.comfort_decel_mps2)
    )
    ahead_goes = clear_m >= need_m
    first_ahead = along <= 0
    merged = np.where(first_ahead, ahead_goes, ~ahead_goes)
    decided = np.where(merge, merged, sooner)
    return np.where(committed_first == committed_second, decided, committed_first), first_zone, second_zone
