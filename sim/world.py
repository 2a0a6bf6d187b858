"""A world that can be stepped: the ego and the agents on a road layout, moving along paths.

Every actor, the ego included, has the same kinematics: it moves along its path with a speed and an
acceleration, its heading the path's. Vehicles and cyclists set their acceleration with the Intelligent Driver
Model (IDM) against whatever lies in their corridor ahead (vehicles, cyclists, pedestrians on a crosswalk and the
ego alike), slow down for curves, and yield at junctions to whoever reaches the conflict first. Pedestrians walk
at their own pace. ``step(world, state) -> state`` is a pure function.

Notation:
    A  actors; index 0 is the ego
    K  look-ahead samples along an actor's path
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
    """

    time_s: float
    s_m: np.ndarray
    speed_mps: np.ndarray
    accel_mps2: np.ndarray
    finished: np.ndarray

    def active(self, world: World) -> np.ndarray:
        """[A] bool: actors that exist now."""
        return (world.table.appear_time_s <= self.time_s + 1e-9) & ~self.finished


def initial_state(world: World, s_m: np.ndarray, speed_mps: np.ndarray) -> WorldState:
    """The state at time 0 with actors at ``s_m`` ([A] m) moving at ``speed_mps`` ([A] m/s)."""
    count = len(world.actors)
    return WorldState(
        0.0,
        np.asarray(s_m, dtype=np.float64),
        np.asarray(speed_mps, dtype=np.float64),
        np.zeros(count),
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
    s = np.where(active, state.s_m + moved, state.s_m)
    lengths = world.paths.length_m
    at_end = s >= lengths - 1e-6
    # Agents leave the map at the end of their path; the ego stops there.
    leaves = at_end & ~parked
    leaves[0] = False
    stop_here = at_end & ~leaves
    s = np.minimum(s, lengths)
    speed = np.where(stop_here, 0.0, speed)
    accel = np.where(stop_here, 0.0, accel)
    return replace(
        state,
        time_s=state.time_s + dt_s,
        s_m=s,
        speed_mps=np.where(active, speed, state.speed_mps),
        accel_mps2=np.where(active, accel, 0.0),
        finished=state.finished | (leaves & active),
    )


def _idm_accelerations(world: World, state: WorldState, lookahead_m: float = 60.0, sample_m: float = 2.0) -> np.ndarray:
    """[A] IDM accelerations (m/s²) of every actor against what lies in its corridor ahead."""
    idm = world.idm
    count = len(world.actors)
    xy, yaw = actor_poses(world, state)
    active = state.active(world)
    sizes = world.table.sizes_wlh_m  # [A, 3]
    is_ped = world.table.is_pedestrian
    desired = world.table.desired_speed_mps
    speed = state.speed_mps

    # Look-ahead samples from each actor's front along its own path: [A, K, 2] and their headings [A, K].
    offsets = np.arange(0.0, lookahead_m, sample_m)
    s_ahead = state.s_m[:, None] + sizes[:, 1:2] / 2 + offsets[None, :]  # [A, K]
    ahead_xy, ahead_heading, curvature = world.paths.lookup(s_ahead)
    beyond_end = s_ahead > world.paths.length_m[:, None]

    # Obstacles: every active actor now and where it will be in 1 s and 2 s ([A, G] ghosts).
    horizons = np.array([0.0, 1.0, 2.0])
    heading_vec = np.stack([np.cos(yaw), np.sin(yaw)], axis=-1)  # [A, 2]
    ghost_xy = xy[:, None, :] + heading_vec[:, None, :] * (speed[:, None] * horizons)[:, :, None]  # [A, G, 2]
    # Distance from each look-ahead sample of i to the footprint of obstacle j's ghost g: [A_i, A_j, G, K].
    rel = ahead_xy[:, None, None, :, :] - ghost_xy[None, :, :, None, :]
    cos_j, sin_j = np.cos(yaw)[None, :, None, None], np.sin(yaw)[None, :, None, None]
    along = rel[..., 0] * cos_j + rel[..., 1] * sin_j
    across = -rel[..., 0] * sin_j + rel[..., 1] * cos_j
    dx = np.maximum(np.abs(along) - sizes[None, :, 1, None, None] / 2, 0.0)
    dy = np.maximum(np.abs(across) - sizes[None, :, 0, None, None] / 2, 0.0)
    distance = np.hypot(dx, dy)
    # Vehicles give pedestrians a wider berth.
    margin = np.where(~is_ped[:, None] & is_ped[None, :], 1.0, 0.3)  # [A, A]
    in_corridor = distance < (sizes[:, 0] / 2)[:, None, None, None] + margin[:, :, None, None]
    # Pedestrians step around each other: they only wait for vehicles.
    valid = active[:, None] & active[None, :] & ~np.eye(count, dtype=bool) & ~(is_ped[:, None] & is_ped[None, :])
    in_corridor &= valid[:, :, None, None] & ~beyond_end[:, None, None, :]
    # Only the present position counts for pedestrians (they stop if a car comes); ghosts only for vehicles.
    in_corridor[:, :, 1:, :] &= ~is_ped[None, :, None, None]

    hit_any = in_corridor.any(axis=3)  # [A, A, G]
    first_k = np.where(hit_any, in_corridor.argmax(axis=3), len(offsets))  # [A, A, G]
    gap = np.where(hit_any, offsets[np.minimum(first_k, len(offsets) - 1)], np.inf)  # [A, A, G] m
    # A ghost only matters if i would reach the sample no sooner than the ghost does (it is then in the way).
    time_i = gap / np.maximum(speed, 0.5)[:, None, None]
    gap = np.where((horizons[None, None, :] == 0) | (time_i >= horizons[None, None, :] - 0.5), gap, np.inf)
    gap_ij = gap.min(axis=2)  # [A, A]

    conflict_k = np.minimum(first_k.min(axis=2), len(offsets) - 1)  # [A, A]
    heading_at_conflict = np.take_along_axis(ahead_heading, conflict_k, axis=1)  # [A, A]
    alignment = np.cos(yaw[None, :] - heading_at_conflict)
    following = alignment > 0.7
    is_vehicle_j = ~is_ped[None, :]
    crossing = is_vehicle_j & ~following & np.isfinite(gap_ij)
    # Mutual crossing conflicts: the one farther from the conflict yields; ties go to the lower index.
    mutual = crossing & crossing.T
    farther = (gap_ij > gap_ij.T) | ((gap_ij == gap_ij.T) & (np.arange(count)[:, None] > np.arange(count)[None, :]))
    yields = np.where(mutual, farther, True)
    gap_ij = np.where(crossing & ~yields, np.inf, gap_ij)

    leader = np.argmin(gap_ij, axis=1)
    leader_gap = gap_ij[np.arange(count), leader]
    leader_speed = np.where(following[np.arange(count), leader], speed[leader] * alignment[np.arange(count), leader], 0)
    leader_speed = np.maximum(leader_speed, 0.0)

    # Curves: the speed the look-ahead allows, braking comfortably from here.
    curve_speed = np.sqrt(idm.lateral_accel_mps2 / np.maximum(curvature, 1e-6))  # [A, K]
    reachable = np.sqrt(curve_speed**2 + 2 * idm.comfort_decel_mps2 * offsets[None, :])
    target = np.minimum(desired, reachable.min(axis=1))
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
