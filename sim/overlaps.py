"""Do vehicles overlap? Count footprint overlaps of the world's vehicles, keyframe by keyframe, over many scenarios.

The world is stepped as the writer steps it (every ``writer.SWEEP_DT_S``), without sensors, and at every keyframe
(0.5 s) the footprint of each vehicle that exists (the ego, moving and parked vehicles, cyclists) is tested against
every other one with shapely. Pedestrians are left out: they are not vehicles and step around each other.

Run ``python -m bevjepa.sim.overlaps --seeds 20 --duration 12`` to print a survey over every layout.
"""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass

import numpy as np
import shapely

from bevjepa.sim import layouts, scenario, synth, world, writer


@dataclass(frozen=True)
class Overlap:
    """Two vehicles whose footprints overlap at one keyframe.

    Attributes:
        layout: the layout's name.
        seed: the scenario's seed.
        time_s: the keyframe's time (s since the scenario started).
        first_id, second_id: the two actors' instance ids.
        area_m2: area of the footprints' intersection (m²).
        fraction_of_smaller: ``area_m2`` over the smaller footprint's area.
        annotated: both are annotated (the writer annotates agents within ``writer.ANNOTATION_RANGE_M`` of the
            ego, and never the ego itself).
    """

    layout: str
    seed: int
    time_s: float
    first_id: str
    second_id: str
    area_m2: float
    fraction_of_smaller: float
    annotated: bool


@dataclass(frozen=True)
class Survey:
    """What a survey checked and found.

    Attributes:
        scenarios: scenarios stepped (seeds × layouts).
        keyframes: keyframes checked, over all scenarios.
        pairs: vehicle pairs checked, over all keyframes.
        overlaps: every overlap found (intersection area > 0).
        emergency_stops: (layout, seed, time (s), instance id) of every step in which a vehicle stopped dead
            (``world.WorldState.emergency_stop``): how often the last resort had to act.
    """

    scenarios: int
    keyframes: int
    pairs: int
    overlaps: tuple[Overlap, ...]
    emergency_stops: tuple[tuple[str, int, float, str], ...]

    def count(self, min_fraction: float = 0.0) -> int:
        """Overlaps whose area exceeds ``min_fraction`` of the smaller footprint."""
        return sum(o.fraction_of_smaller > min_fraction for o in self.overlaps)


def vehicle_footprints(built: world.World, state: world.WorldState) -> tuple[np.ndarray, np.ndarray]:
    """The footprints of every vehicle that exists now, the ego included, cyclists too.

    Returns:
        [V] int64 actor indices, and [V] shapely polygons (global frame, m).
    """
    xy, yaw = world.actor_poses(built, state)
    indices = np.flatnonzero(state.active(built) & ~built.table.is_pedestrian)
    half_w = built.table.sizes_wlh_m[indices, 0] / 2
    half_l = built.table.sizes_wlh_m[indices, 1] / 2
    forward = np.stack([np.cos(yaw[indices]), np.sin(yaw[indices])], axis=-1)  # [V, 2]
    left = np.stack([-forward[:, 1], forward[:, 0]], axis=-1)  # [V, 2]
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)  # [4, 2] (along, across)
    corners = (
        xy[indices, None, :]
        + signs[None, :, :1] * (half_l[:, None, None] * forward[:, None, :])
        + signs[None, :, 1:] * (half_w[:, None, None] * left[:, None, :])
    )  # [V, 4, 2]
    return indices, shapely.polygons(corners)


def keyframe_overlaps(
    built: world.World, state: world.WorldState, layout: str = "", seed: int = 0
) -> tuple[int, list[Overlap]]:
    """The number of vehicle pairs at this instant and those whose footprints overlap (intersection area > 0)."""
    indices, polygons = vehicle_footprints(built, state)
    pairs = len(indices) * (len(indices) - 1) // 2
    if len(indices) < 2:
        return pairs, []
    tree = shapely.STRtree(polygons)
    first, second = tree.query(polygons, predicate="intersects")
    keep = first < second
    xy, _ = world.actor_poses(built, state)
    ego_xy = world.ego_pose(built, state).translation[:2]  # the writer measures the range from the ego frame
    near = np.linalg.norm(xy[indices] - ego_xy, axis=1) <= writer.ANNOTATION_RANGE_M
    annotated = near & (indices != 0)  # [V]
    found = []
    for a, b in zip(first[keep], second[keep], strict=True):
        area = float(shapely.area(shapely.intersection(polygons[a], polygons[b])))
        if area <= 0.0:
            continue
        smaller = float(min(shapely.area(polygons[a]), shapely.area(polygons[b])))
        found.append(
            Overlap(
                layout,
                seed,
                round(state.time_s, 6),
                built.actors[indices[a]].instance_id,
                built.actors[indices[b]].instance_id,
                area,
                area / smaller,
                bool(annotated[a] and annotated[b]),
            )
        )
    return pairs, found


def survey(configs: list[scenario.ScenarioConfig]) -> Survey:
    """Step every scenario for its duration, as the writer does, and check every keyframe for overlaps."""
    keyframes = pairs = 0
    overlaps: list[Overlap] = []
    stops: list[tuple[str, int, float, str]] = []
    for config in configs:
        built, state = scenario.build_world(config)
        steps = (writer.keyframe_count(config.duration_s) - 1) * writer.SWEEPS_PER_KEYFRAME + 1
        for step in range(steps):
            if step > 0:
                state = world.step(built, state, writer.SWEEP_DT_S)
                for i in np.flatnonzero(state.emergency_stop):
                    stops.append((config.layout, config.seed, round(state.time_s, 6), built.actors[i].instance_id))
            if step % writer.SWEEPS_PER_KEYFRAME:
                continue
            count, found = keyframe_overlaps(built, state, config.layout, config.seed)
            keyframes += 1
            pairs += count
            overlaps.extend(found)
    return Survey(len(configs), keyframes, pairs, tuple(overlaps), tuple(stops))


def grid(
    layout_names: list[str], seeds: list[int], duration_s: float, agents: tuple[int, int, int, int] = (14, 8, 12, 3)
) -> list[scenario.ScenarioConfig]:
    """Every (layout, seed) scenario with this agent mix (vehicles, parked, pedestrians, cyclists)."""
    vehicles, parked, pedestrians, cyclists = agents
    return [
        scenario.ScenarioConfig(name, seed, duration_s, vehicles, parked, pedestrians, cyclists)
        for name in layout_names
        for seed in seeds
    ]


def main(argv: list[str] | None = None) -> None:
    """Print a survey: how many vehicle pairs overlap at keyframes, and each overlap."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1 of every layout")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per scenario")
    parser.add_argument("--layouts", nargs="+", default=sorted(layouts.LAYOUTS), help="layouts to survey")
    parser.add_argument(
        "--agents", type=int, nargs=4, default=(14, 8, 12, 3), help="vehicles, parked, pedestrians, cyclists"
    )
    parser.add_argument(
        "--synth-seed", type=int, default=None, help="survey the scenes `bevjepa synth --seed N` writes instead"
    )
    parser.add_argument("--scenes", type=int, default=10, help="scenes of --synth-seed")
    args = parser.parse_args(argv)
    if args.synth_seed is None:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        configs = grid(args.layouts, seeds, args.duration, tuple(args.agents))
    else:
        synth_config = synth.SynthConfig(
            out=pathlib.Path("unused"),  # nothing is written: only the scenes' configs are taken
            scenes=args.scenes,
            seed=args.synth_seed,
            duration_s=args.duration,
            version="v1.0-trainval",
            layouts=tuple(args.layouts),
            agents=tuple(args.agents),
        )
        configs = [spec.scenario for spec in synth.scene_specs(synth_config)]
    print(format_survey(survey(configs)))


def format_survey(result: Survey) -> str:
    """Every overlap and emergency stop of a survey, one a line, then the totals."""
    lines = [
        f"{o.layout:12s} seed {o.seed:6d} t {o.time_s:5.1f} s  {o.first_id:12s} {o.second_id:12s} "
        f"{o.area_m2:6.2f} m²  {100 * o.fraction_of_smaller:5.1f} %{'  annotated' if o.annotated else ''}"
        for o in result.overlaps
    ]
    lines += [
        f"{layout:12s} seed {seed:6d} t {time_s:5.2f} s  {instance:12s} emergency stop"
        for layout, seed, time_s, instance in result.emergency_stops
    ]
    lines.append(
        f"{result.scenarios} scenarios, {result.keyframes} keyframes, {result.pairs} vehicle pairs: "
        f"{result.count()} overlap ({sum(o.annotated for o in result.overlaps)} of them both annotated), "
        f"{result.count(0.1)} by more than 10 % of the smaller footprint; "
        f"{len(result.emergency_stops)} emergency stops (vehicle-steps of {writer.SWEEP_DT_S} s)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
