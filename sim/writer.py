"""Write simulated scenes as a nuScenes dataset: the 13 tables, sensor files under samples/ and sweeps/, map masks.

One scene is simulated and written by ``write_scene`` (its sensor files go straight to disk; its table records come
back), so that scenes can be written in parallel; ``write_tables`` then writes the merged tables. The layout of
the output is the real dataset's:

    DIR/v1.0-mini/{category,attribute,visibility,instance,sensor,calibrated_sensor,ego_pose,log,scene,sample,
                   sample_data,sample_annotation,map}.json
    DIR/samples/LIDAR_TOP/<log>__LIDAR_TOP__<timestamp>.pcd.bin   keyframe sweeps, [N, 5] float32
    DIR/sweeps/LIDAR_TOP/...                                      the nine sweeps between keyframes (20 Hz)
    DIR/samples/CAM_*/<log>__CAM_*__<timestamp>.jpg               six cameras on every keyframe
    DIR/maps/<token>.png                                          drivable area, 0.1 m a pixel
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bevjepa.datasets import geometry, types
from bevjepa.datasets import io as bevio
from bevjepa.sim import scenario, sensors, world

SWEEP_DT_S = 0.05
"""LiDAR sweeps at 20 Hz; the world steps once per sweep."""
SWEEPS_PER_KEYFRAME = 10
"""Keyframes at 2 Hz, as nuScenes."""
ANNOTATION_RANGE_M = 60.0
"""Agents whose centre lies within this distance of the ego are annotated."""
JPEG_QUALITY = 92

CATEGORIES: tuple[tuple[str, str], ...] = (
    ("human.pedestrian.adult", "Adult subcategory."),
    ("human.pedestrian.child", "Child subcategory."),
    ("human.pedestrian.wheelchair", "Wheelchairs."),
    ("human.pedestrian.stroller", "Strollers."),
    ("human.pedestrian.personal_mobility", "Personal mobility devices."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.construction_worker", "Construction worker."),
    ("animal", "All animals."),
    ("vehicle.car", "Vehicle designed primarily for personal use."),
    ("vehicle.motorcycle", "Gasoline or electric powered 2-wheeled vehicle."),
    ("vehicle.bicycle", "Human or electric powered 2-wheeled vehicle."),
    ("vehicle.bus.bendy", "Bendy bus subcategory."),
    ("vehicle.bus.rigid", "Rigid bus subcategory."),
    ("vehicle.truck", "Vehicles primarily designed to haul cargo."),
    ("vehicle.construction", "Vehicles primarily designed for construction."),
    ("vehicle.emergency.ambulance", "All types of ambulances."),
    ("vehicle.emergency.police", "All types of police vehicles."),
    ("vehicle.trailer", "Any vehicle trailer."),
    ("movable_object.barrier", "Temporary road barrier."),
    ("movable_object.trafficcone", "All types of traffic cones."),
    ("movable_object.pushable_pullable", "Objects that a pedestrian may push or pull."),
    ("movable_object.debris", "Movable object that is left on the driveable surface."),
    ("static_object.bicycle_rack", "Area or device intended to park or secure bicycles."),
)
"""The 23 nuScenes categories."""

ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
    ("vehicle.parked", "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.moving", "The human is moving."),
)
"""The 8 nuScenes attributes."""

VISIBILITY_LEVELS: tuple[tuple[str, str, float], ...] = (
    ("1", "v0-40", 0.4),
    ("2", "v40-60", 0.6),
    ("3", "v60-80", 0.8),
    ("4", "v80-100", 1.01),
)
"""(token, level, upper bound of the visible fraction), as nuScenes."""

SENSOR_CHANNELS: tuple[tuple[str, str], ...] = ((types.LIDAR_CHANNEL, "lidar"),) + tuple(
    (channel, "camera") for channel in types.CAMERA_CHANNELS
)


SCENE_TABLES: tuple[str, ...] = (
    "log",
    "map",
    "scene",
    "sample",
    "sample_data",
    "ego_pose",
    "calibrated_sensor",
    "instance",
    "sample_annotation",
)
"""The tables whose records each scene brings; with ``static_tables`` they make the 13 of nuScenes."""


def make_token(*parts: object) -> str:
    """A 32-hex-digit token, as nuScenes uses, derived deterministically from ``parts``."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines one written scene.

    Attributes:
        index: the scene's position in the dataset.
        name: the nuScenes scene name (``scene-0061``).
        scenario: the simulated scenario (layout, seed, duration, agent mix).
        dataset_seed: the dataset's seed; tokens derive from it.
        start_timestamp_us: timestamp of the first sweep (µs).
        lidar: the LiDAR's configuration.
        cameras: the cameras' configuration.
    """

    index: int
    name: str
    scenario: scenario.ScenarioConfig
    dataset_seed: int
    start_timestamp_us: int
    lidar: sensors.LidarConfig = field(default_factory=sensors.LidarConfig)
    cameras: sensors.CameraConfig = field(default_factory=sensors.CameraConfig)

    def token(self, *parts: object) -> str:
        """A token unique to this scene and dataset seed."""
        return make_token(self.dataset_seed, self.index, *parts)

    @property
    def logfile(self) -> str:
        """The log's name, as nuScenes spells them (vehicle, date, time)."""
        seconds = self.start_timestamp_us // 1_000_000
        return f"sim-{self.scenario.layout}-{self.dataset_seed}-{self.index:04d}-{seconds}"


@dataclass(frozen=True)
class SceneRecords:
    """The table records of one written scene, keyed by table name, plus counts for reporting."""

    tables: dict[str, list[dict]]
    sweeps: int
    keyframes: int
    images: int
    returns: int


def static_tables() -> dict[str, list[dict]]:
    """The tables that do not depend on scenes: category, attribute, visibility and sensor."""
    return {
        "category": [{"token": make_token("category", n), "name": n, "description": d} for n, d in CATEGORIES],
        "attribute": [{"token": make_token("attribute", n), "name": n, "description": d} for n, d in ATTRIBUTES],
        "visibility": [
            {
                "token": token,
                "level": level,
                "description": "visibility of whole object is between {} and {}%".format(*level[1:].split("-")),
            }
            for token, level, _ in VISIBILITY_LEVELS
        ],
        "sensor": [{"token": make_token("sensor", c), "channel": c, "modality": m} for c, m in SENSOR_CHANNELS],
    }


def _pose_record(token: str, timestamp_us: int, transform: geometry.RigidTransform) -> dict:
    return {
        "token": token,
        "timestamp": timestamp_us,
        "rotation": transform.quaternion.tolist(),
        "translation": transform.translation.tolist(),
    }


def _attribute_name(actor: world.ActorSpec, speed_mps: float) -> str:
    if actor.kind == world.KIND_PEDESTRIAN:
        return "pedestrian.moving" if speed_mps > 0.2 else "pedestrian.standing"
    if actor.kind == world.KIND_CYCLIST:
        return "cycle.with_rider"
    if actor.parked:
        return "vehicle.parked"
    return "vehicle.moving" if speed_mps > 0.5 else "vehicle.stopped"


@dataclass(frozen=True)
class Frame:
    """The world at one LiDAR sweep of a scene.

    Attributes:
        step: sweep index from 0; keyframes are the multiples of ``SWEEPS_PER_KEYFRAME``.
        timestamp_us: the sweep's timestamp (µs).
        world: the scene's static world.
        state: the world's state at ``timestamp_us``.
    """

    step: int
    timestamp_us: int
    world: world.World
    state: world.WorldState

    @property
    def is_key_frame(self) -> bool:
        """Whether a keyframe (sample) falls on this sweep."""
        return self.step % SWEEPS_PER_KEYFRAME == 0


def keyframe_count(duration_s: float) -> int:
    """Keyframes in a scene of ``duration_s`` seconds (one every 0.5 s, the last at or before the end)."""
    return max(1, int(round(duration_s / (SWEEP_DT_S * SWEEPS_PER_KEYFRAME))))


def simulate(spec: SceneSpec) -> Iterator[Frame]:
    """Step a scene's world once per sweep from its first to its last keyframe: the simulator's own truth."""
    built_world, state = scenario.build_world(spec.scenario)
    steps = (keyframe_count(spec.scenario.duration_s) - 1) * SWEEPS_PER_KEYFRAME + 1
    for step in range(steps):
        if step > 0:
            state = world.step(built_world, state, SWEEP_DT_S)
        yield Frame(step, spec.start_timestamp_us + round(step * SWEEP_DT_S * 1e6), built_world, state)


@dataclass(frozen=True)
class _SceneTokens:
    """The tokens a scene's records share (all derived from the scene's spec, so a rerun gives the same ones)."""

    log: str
    scene: str
    map: str
    samples: list[str]
    lidar: list[str]
    cameras: dict[str, list[str]]
    calibrated: dict[str, str]
    categories: dict[str, str]
    attributes: dict[str, str]


def _scene_tokens(spec: SceneSpec, keyframes: int, steps: int) -> _SceneTokens:
    """Every token of the scene's samples, sample_data, sensors, categories and attributes."""
    return _SceneTokens(
        log=spec.token("log"),
        scene=spec.token("scene"),
        map=spec.token("map"),
        samples=[spec.token("sample", k) for k in range(keyframes)],
        lidar=[spec.token("sample_data", types.LIDAR_CHANNEL, step) for step in range(steps)],
        cameras={c: [spec.token("sample_data", c, k) for k in range(keyframes)] for c in types.CAMERA_CHANNELS},
        calibrated={c: spec.token("calibrated_sensor", c) for c, _ in SENSOR_CHANNELS},
        categories={n: make_token("category", n) for n, _ in CATEGORIES},
        attributes={n: make_token("attribute", n) for n, _ in ATTRIBUTES},
    )


def _write_static_records(
    spec: SceneSpec, built_world: world.World, root: Path, tokens: _SceneTokens, tables: dict[str, list[dict]]
) -> None:
    """The scene's log, its map (the drivable mask, written as a PNG) and its sensors' calibrations."""
    tables["log"].append(
        {
            "token": tokens.log,
            "logfile": spec.logfile,
            "vehicle": "sim",
            "date_captured": "2018-08-01",
            "location": f"sim-{spec.scenario.layout}",
        }
    )
    mask = Image.fromarray(built_world.layout.surface.drivable_mask(), mode="L")
    map_path = root / "maps" / f"{tokens.map}.png"
    bevio.atomic_write_with(map_path, lambda tmp: mask.save(tmp, format="PNG", optimize=False))
    tables["map"].append(
        {
            "category": "semantic_prior",
            "token": tokens.map,
            "filename": f"maps/{tokens.map}.png",
            "log_tokens": [tokens.log],
        }
    )
    tables["calibrated_sensor"].append(
        {
            "token": tokens.calibrated[types.LIDAR_CHANNEL],
            "sensor_token": make_token("sensor", types.LIDAR_CHANNEL),
            "translation": spec.lidar.ego_from_sensor.translation.tolist(),
            "rotation": spec.lidar.ego_from_sensor.quaternion.tolist(),
            "camera_intrinsic": [],
        }
    )
    for channel in types.CAMERA_CHANNELS:
        ego_from_camera = sensors.NUSCENES_CAMERAS[channel].ego_from_camera
        tables["calibrated_sensor"].append(
            {
                "token": tokens.calibrated[channel],
                "sensor_token": make_token("sensor", channel),
                "translation": ego_from_camera.translation.tolist(),
                "rotation": ego_from_camera.quaternion.tolist(),
                "camera_intrinsic": spec.cameras.intrinsics(channel).tolist(),
            }
        )


def _write_lidar(
    spec: SceneSpec,
    root: Path,
    frame: Frame,
    sweep: types.LidarSweep,
    global_from_ego: geometry.RigidTransform,
    tokens: _SceneTokens,
    tables: dict[str, list[dict]],
) -> None:
    """One sweep's ``.pcd.bin`` file, its ego pose and its sample_data record (a sweep belongs to the next sample)."""
    step, timestamp = frame.step, frame.timestamp_us
    keyframes, steps = len(tokens.samples), len(tokens.lidar)
    is_key, keyframe = frame.is_key_frame, step // SWEEPS_PER_KEYFRAME
    folder = "samples" if is_key else "sweeps"
    lidar_file = f"{folder}/{types.LIDAR_CHANNEL}/{spec.logfile}__{types.LIDAR_CHANNEL}__{timestamp}.pcd.bin"
    bevio.atomic_write_bytes(root / lidar_file, sweep.points.astype(np.float32).tobytes())
    sd_token = tokens.lidar[step]
    tables["ego_pose"].append(_pose_record(sd_token, timestamp, global_from_ego))
    # Sweeps belong to the keyframe that follows them, as in nuScenes.
    owner = tokens.samples[min(keyframe + (0 if is_key else 1), keyframes - 1)]
    tables["sample_data"].append(
        {
            "token": sd_token,
            "sample_token": owner,
            "ego_pose_token": sd_token,
            "calibrated_sensor_token": tokens.calibrated[types.LIDAR_CHANNEL],
            "timestamp": timestamp,
            "fileformat": "pcd",
            "is_key_frame": is_key,
            "height": 0,
            "width": 0,
            "filename": lidar_file,
            "prev": tokens.lidar[step - 1] if step > 0 else "",
            "next": tokens.lidar[step + 1] if step + 1 < steps else "",
        }
    )


def _write_cameras(
    spec: SceneSpec,
    root: Path,
    frame: Frame,
    images: list,
    global_from_ego: geometry.RigidTransform,
    tokens: _SceneTokens,
    tables: dict[str, list[dict]],
) -> None:
    """A keyframe's six JPEGs, their ego poses and sample_data records."""
    timestamp, keyframe, keyframes = frame.timestamp_us, frame.step // SWEEPS_PER_KEYFRAME, len(tokens.samples)
    for image in images:
        camera_tokens = tokens.cameras[image.channel]
        cam_file = f"samples/{image.channel}/{spec.logfile}__{image.channel}__{timestamp}.jpg"
        picture = Image.fromarray(image.image)
        bevio.atomic_write_with(
            root / cam_file, lambda tmp, p=picture: p.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        )
        tables["ego_pose"].append(_pose_record(camera_tokens[keyframe], timestamp, global_from_ego))
        tables["sample_data"].append(
            {
                "token": camera_tokens[keyframe],
                "sample_token": tokens.samples[keyframe],
                "ego_pose_token": camera_tokens[keyframe],
                "calibrated_sensor_token": tokens.calibrated[image.channel],
                "timestamp": timestamp,
                "fileformat": "jpg",
                "is_key_frame": True,
                "height": image.image.shape[0],
                "width": image.image.shape[1],
                "filename": cam_file,
                "prev": camera_tokens[keyframe - 1] if keyframe > 0 else "",
                "next": camera_tokens[keyframe + 1] if keyframe + 1 < keyframes else "",
            }
        )


def _annotate(
    spec: SceneSpec,
    built_world: world.World,
    renderer: sensors.SensorRenderer,
    frame: Frame,
    boxes: list,
    sweep: types.LidarSweep,
    global_from_ego: geometry.RigidTransform,
    tokens: _SceneTokens,
    tracks: dict[str, list[dict]],
) -> None:
    """Annotate a keyframe's agents near the ego, with the LiDAR points inside each box, into ``tracks``."""
    keyframe = frame.step // SWEEPS_PER_KEYFRAME
    actor_index = {a.instance_id: i for i, a in enumerate(built_world.actors)}
    ego_xy = global_from_ego.translation[:2]
    near = [b for b in boxes if np.linalg.norm(b.center_m[:2] - ego_xy) <= ANNOTATION_RANGE_M]
    if not near:
        return
    visible = renderer.visible_fraction(near, global_from_ego)
    # Count in the global frame, where boxes are upright (the sensor frame is slightly tilted).
    points = (global_from_ego @ spec.lidar.ego_from_sensor).apply(sweep.points[:, :3].astype(np.float64))
    for box, fraction in zip(near, visible, strict=True):
        actor = built_world.actors[actor_index[box.instance_id]]
        speed = float(np.linalg.norm(box.velocity_mps))
        visibility = next(t for t, _, upper in VISIBILITY_LEVELS if fraction < upper)
        tracks.setdefault(box.instance_id, []).append(
            {
                "token": spec.token("sample_annotation", box.instance_id, keyframe),
                "sample_token": tokens.samples[keyframe],
                "instance_token": spec.token("instance", box.instance_id),
                "visibility_token": visibility,
                "attribute_tokens": [tokens.attributes[_attribute_name(actor, speed)]],
                "translation": box.center_m.tolist(),
                "size": box.size_wlh_m.tolist(),
                "rotation": box.quaternion.tolist(),
                "prev": "",
                "next": "",
                "num_lidar_pts": int(box.contains(points).sum()),
                "num_radar_pts": 0,
            }
        )


def _instance_records(
    spec: SceneSpec,
    built_world: world.World,
    tracks: dict[str, list[dict]],
    tokens: _SceneTokens,
    tables: dict[str, list[dict]],
) -> None:
    """Link each instance's annotations in time and write its instance record (in the actors' order)."""
    actor_index = {a.instance_id: i for i, a in enumerate(built_world.actors)}
    for instance_id in sorted(tracks, key=lambda i: actor_index[i]):
        annotations = tracks[instance_id]
        for previous, current in zip(annotations, annotations[1:], strict=False):
            previous["next"], current["prev"] = current["token"], previous["token"]
        tables["sample_annotation"].extend(annotations)
        category = built_world.actors[actor_index[instance_id]].category
        tables["instance"].append(
            {
                "token": spec.token("instance", instance_id),
                "category_token": tokens.categories[category],
                "nbr_annotations": len(annotations),
                "first_annotation_token": annotations[0]["token"],
                "last_annotation_token": annotations[-1]["token"],
            }
        )


def write_scene(spec: SceneSpec, root: Path) -> SceneRecords:
    """Simulate one scene and write its sensor files under ``root``; return its table records.

    Args:
        spec: the scene to write.
        root: the dataset root; ``samples/``, ``sweeps/`` and ``maps/`` are filled in.
    """
    frames = simulate(spec)
    first = next(frames)
    built_world = first.world
    renderer = sensors.SensorRenderer(built_world.layout, spec.lidar, spec.cameras)
    rng = np.random.default_rng(np.random.SeedSequence([spec.dataset_seed, spec.index, 0x5E75]))
    keyframes = keyframe_count(spec.scenario.duration_s)
    steps = (keyframes - 1) * SWEEPS_PER_KEYFRAME + 1
    tokens = _scene_tokens(spec, keyframes, steps)
    for folder in ["maps", *(f"samples/{c}" for c, _ in SENSOR_CHANNELS), f"sweeps/{types.LIDAR_CHANNEL}"]:
        (root / folder).mkdir(parents=True, exist_ok=True)

    tables: dict[str, list[dict]] = {name: [] for name in SCENE_TABLES}
    _write_static_records(spec, built_world, root, tokens, tables)
    for k, token in enumerate(tokens.samples):
        tables["sample"].append(
            {
                "token": token,
                "timestamp": spec.start_timestamp_us + round(k * SWEEPS_PER_KEYFRAME * SWEEP_DT_S * 1e6),
                "prev": tokens.samples[k - 1] if k > 0 else "",
                "next": tokens.samples[k + 1] if k + 1 < keyframes else "",
                "scene_token": tokens.scene,
            }
        )
    tracks: dict[str, list[dict]] = {}  # instance id -> its annotations in time order
    total_returns = 0
    for frame in itertools.chain([first], frames):
        global_from_ego = world.ego_pose(built_world, frame.state)
        boxes, _ = world.agent_boxes(built_world, frame.state)
        sweep, _ = renderer.lidar_sweep(boxes, global_from_ego, frame.timestamp_us, rng)
        total_returns += len(sweep.points)
        _write_lidar(spec, root, frame, sweep, global_from_ego, tokens, tables)
        if frame.is_key_frame:
            images, _ = renderer.camera_images(boxes, global_from_ego, frame.timestamp_us)
            _write_cameras(spec, root, frame, images, global_from_ego, tokens, tables)
            _annotate(spec, built_world, renderer, frame, boxes, sweep, global_from_ego, tokens, tracks)
    _instance_records(spec, built_world, tracks, tokens, tables)
    tables["scene"].append(
        {
            "token": tokens.scene,
            "log_token": tokens.log,
            "nbr_samples": keyframes,
            "first_sample_token": tokens.samples[0],
            "last_sample_token": tokens.samples[-1],
            "name": spec.name,
            "description": f"Synthetic {spec.scenario.layout}, seed "
            f"{spec.scenario.seed}, {len(built_world.actors) - 1} agents",
        }
    )
    return SceneRecords(
        tables, sweeps=steps, keyframes=keyframes, images=keyframes * len(types.CAMERA_CHANNELS), returns=total_returns
    )


def write_tables(root: Path, version: str, scenes: list[SceneRecords]) -> None:
    """Merge the scenes' records with the static tables and write the 13 JSON tables under ``root/version``."""
    tables = static_tables()
    for name in SCENE_TABLES:
        tables[name] = [record for scene in scenes for record in scene.tables[name]]
    folder = root / version
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in tables.items():
        bevio.atomic_write_bytes(folder / f"{name}.json", json.dumps(records, indent=0).encode())
