"""A recording of a scene's windows and forecasts for the Rerun viewer (``.rrd``; ``rerun FILE.rrd`` opens it).

``record`` logs one keyframe per window on two timelines, ``time`` (the window's t0, from its nuScenes timestamp)
and ``window`` (its index). Every entity below ``world/ego`` is in that window's t0 ego frame (x forward, y left,
z up, metres), as the model sees it; ``world/ego`` itself is placed by the ego's motion since the first window,
chained through consecutive windows (``t0_from_ego`` of the previous keyframe), so the ego drives through the
recording. A break in the chain (another scene, a gap) starts the world frame again at that window's ego.

Entities::

    world                                   z up (static)
    world/ego                               Transform3D: this window's t0 ego in the world frame
    world/ego/box                           the ego's footprint (Boxes3D)
    world/ego/lidar                         the t0 LiDAR points (every sweep of the keyframe), coloured by height
    world/ego/<CAM_*>                       the camera's pose, Pinhole and JPEG image: the viewer draws frustums
    world/ego/ground_truth/agents           annotated boxes at t0, coloured and labelled by class
    world/ego/ground_truth/agent_futures    each agent's annotated future from its t0 position (6 s)
    world/ego/ground_truth/ego_future       the ego's own future path
    world/ego/ground_truth/occupancy/<h>    occupied cells at horizon h (0.0s ... 2.0s), one entity per horizon
    world/ego/forecast/occupancy/<h>        cells whose forecast P(any class) >= threshold, class colour, alpha = P
    world/ego/forecast/trajectories         K modes per agent, opacity and width by mode probability
    description                             what the recording shows (static text)

The viewer's default layout: the 3D scene on the left, the six cameras on the right.

Colours are the report's (``plots.CLASS_COLORS``). Everything is computed with whole-array numpy operations: the
Python loops run over windows, horizons and cameras only. The file is written atomically (temporary file, then
rename). Rerun is an optional dependency: ``pip install 'bevjepa[rerun]'``.

Notation:
    W  windows     N  LiDAR points     A  agents     K  modes     T  trajectory steps (0.5 s)
    S  occupancy times (t0 and F steps)     C  classes     H, W  the grid (``GridSpec`` layout)
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import matplotlib
import numpy as np
import torch
from PIL import Image

from bevjepa.datasets import categories, geometry, torch_dataset, types, windows
from bevjepa.datasets import io as bevio
from bevjepa.evaluation.report import eval_report, plots
from bevjepa.prediction import forecaster, train

INSTALL_HINT = "pip install 'bevjepa[rerun]'"
"""How to get the optional dependency."""
APPLICATION_ID = "bevjepa"
"""The application the viewer groups recordings under."""
TIMELINE = "time"
"""The timeline of window t0 timestamps (absolute, from the nuScenes µs timestamps)."""
SEQUENCE = "window"
"""The timeline of window indices."""
EGO = "world/ego"
"""The entity of the t0 ego frame; everything the model sees and forecasts lives below it."""
HEIGHT_RANGE_M = (-1.0, 4.0)
"""LiDAR heights (m, ego frame) spread over the colour map; heights outside are clipped."""
LIDAR_CMAP = "turbo"
LIDAR_RADIUS_M = 0.04
MODE_COLOR = "#00bcd4"
"""The forecast modes' colour (as in the report's trajectory panels)."""
FUTURE_RGBA = (235, 235, 235, 255)
"""The annotated futures' colour (the viewer's background is dark)."""
LINE_LIFT_M = 0.1
"""Trajectories are drawn this far above each agent's box bottom (the ego's: above its origin)."""
OCCUPANCY_LIFT_M = 0.05
"""Occupancy cells are drawn at this height (m)."""
JPEG_QUALITY = 85


def import_rerun() -> ModuleType:
    """The ``rerun`` module.

    Raises:
        ModuleNotFoundError: rerun-sdk is not installed; the message names the extra that installs it.
    """
    try:
        import rerun
    except ImportError as error:
        raise ModuleNotFoundError(
            f"writing a Rerun recording (--rerun) needs the rerun-sdk package: {INSTALL_HINT} ({error})",
            name="rerun",
        ) from error
    return rerun


def check_output(path: Path) -> None:
    """Fail before any work when a recording could not be written to ``path``.

    Raises:
        ValueError: ``path`` does not end in ``.rrd``, or rerun-sdk is not installed (the message names the extra).
    """
    if Path(path).suffix != ".rrd":
        raise ValueError(f"--rerun {path}: a Rerun recording is a .rrd file; pass a path ending in .rrd")
    try:
        import_rerun()
    except ModuleNotFoundError as error:
        raise ValueError(str(error)) from error


# --- geometry and colours --------------------------------------------------------------------------------------


def _rgba(color: str, alpha: float = 1.0) -> np.ndarray:
    """[4] uint8 — a matplotlib colour as RGBA."""
    return np.round(np.asarray(matplotlib.colors.to_rgba(color, alpha)) * 255).astype(np.uint8)


def class_rgba() -> np.ndarray:
    """[C, 4] uint8 — each class's colour (``plots.CLASS_COLORS``, in ``categories.CLASSES`` order)."""
    return np.stack([_rgba(plots.CLASS_COLORS[name]) for name in categories.CLASSES])


def height_colors(z_m: np.ndarray) -> np.ndarray:
    """LiDAR colours by height.

    Args:
        z_m: [N] float — heights (m, ego frame).

    Returns:
        [N, 3] uint8 — RGB along ``LIDAR_CMAP`` over ``HEIGHT_RANGE_M`` (clipped).
    """
    low, high = HEIGHT_RANGE_M
    scaled = np.clip((np.asarray(z_m, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [N]
    return (matplotlib.colormaps[LIDAR_CMAP](scaled)[:, :3] * 255).astype(np.uint8)  # [N, 3]


def yaw_quaternions_xyzw(yaw_rad: np.ndarray) -> np.ndarray:
    """Rotations about +z: yaw [A] (rad) → [A, 4] float32 quaternions x, y, z, w (Rerun's order)."""
    half = np.asarray(yaw_rad, dtype=np.float64) / 2
    zeros = np.zeros_like(half)
    return np.stack([zeros, zeros, np.sin(half), np.cos(half)], axis=-1).astype(np.float32)


def box_arrays(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes as Rerun wants them.

    Args:
        boxes: [A, 7] float — x, y, z (m, centre), width, length, height (m), yaw (rad).

    Returns:
        centres [A, 3] float32 (m), sizes [A, 3] float32 (m; along the box's x = length, y = width, z = height),
        quaternions [A, 4] float32 (x, y, z, w).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 7)
    return boxes[:, :3], boxes[:, [4, 3, 5]], yaw_quaternions_xyzw(boxes[:, 6])


def occupied_cells(
    probability: np.ndarray, grid: geometry.GridSpec, threshold: float, z_m: float = OCCUPANCY_LIFT_M
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cells of one occupancy map at or above a threshold, as points at their centres.

    Args:
        probability: [C, H, W] float in [0, 1] (or bool) — per-class occupancy of one time.
        grid: its grid.
        threshold: the least probability of any class shown.
        z_m: the height of the points (m).

    Returns:
        positions [M, 3] float32 (m, the grid's frame), classes [M] int64 (the most probable class),
        probabilities [M] float32 (of any class: 1 - prod(1 - p_c)).
    """
    probability = np.asarray(probability, dtype=np.float32)  # [C, H, W]
    any_class = plots.any_class(probability)  # [H, W]
    shown = any_class >= threshold  # [H, W]
    centers = grid.cell_centers()[shown]  # [M, 2]
    positions = np.concatenate([centers, np.full((len(centers), 1), z_m)], axis=1).astype(np.float32)  # [M, 3]
    return positions, np.argmax(probability, axis=0)[shown].astype(np.int64), any_class[shown]


def valid_strips(start: np.ndarray, path: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Line strips through each row's valid points.

    Args:
        start: [L, 3] float — the first point of every strip (m).
        path: [L, T, 3] float — the later points (m).
        mask: [L, T] bool — which later points exist.

    Returns:
        L arrays [1 + valid_l, 3] float32: the start and then the valid points, in order.
    """
    points = np.concatenate([np.asarray(start)[:, None], np.asarray(path)], axis=1).astype(np.float32)  # [L, T+1, 3]
    keep = np.concatenate([np.ones((len(points), 1), dtype=bool), np.asarray(mask, dtype=bool)], axis=1)
    counts = keep.sum(axis=1)  # [L]
    return np.split(points[keep], np.cumsum(counts)[:-1]) if len(points) else []


def world_from_ego(samples: Sequence[torch_dataset.WindowSample]) -> tuple[np.ndarray, np.ndarray]:
    """Each window's t0 ego pose in the world frame of the recording (the first window's t0 ego).

    Consecutive windows are linked through the previous keyframe's pose in the later window's frame
    (``t0_from_ego[P-2]``); a window that does not follow its predecessor (another scene, a keyframe between
    them, no past frames) starts the world frame again.

    Args:
        samples: [W] windows in time order.

    Returns:
        poses [W, 4, 4] float64 (m), linked [W] bool — whether each window continues the chain of the one before.
    """
    poses = np.tile(np.eye(4), (len(samples), 1, 1))
    linked = np.zeros(len(samples), dtype=bool)
    for w in range(1, len(samples)):  # windows, not points
        before, now = samples[w - 1], samples[w]
        if now.t0_from_ego.shape[0] < 2 or now.scene_name != before.scene_name:
            continue
        if now.frame_tokens and before.frame_tokens:
            follows = now.frame_tokens[-2] == before.sample_token
        else:
            follows = abs(now.timestamp_us - before.timestamp_us - forecaster.STEP_S * 1e6) < 0.1e6
        if follows:
            now_from_before = now.t0_from_ego[-2].double().numpy()  # the previous keyframe's ego in this t0 frame
            poses[w] = poses[w - 1] @ np.linalg.inv(now_from_before)
            linked[w] = True
    return poses, linked


def _jpeg(image_chw: torch.Tensor) -> bytes:
    """[3, Hc, Wc] uint8 RGB → JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _check(samples: Sequence[torch_dataset.WindowSample], forecasts: Sequence[forecaster.OccupancyForecast]) -> None:
    if not samples or len(samples) != len(forecasts):
        raise ValueError(
            f"a Rerun recording needs one forecast per window and at least one window, got {len(samples)} windows "
            f"and {len(forecasts)} forecasts"
        )
    for sample, forecast in zip(samples, forecasts, strict=True):
        own_agents = forecast.agent_boxes is not None or len(forecast.trajectories) == sample.agent_count
        if forecast.timestamp_us != sample.timestamp_us or not own_agents:
            raise ValueError(
                f"the forecast of window {sample.sample_token} ({sample.scene_name}) is not its own: t0 "
                f"{forecast.timestamp_us} µs and {len(forecast.trajectories)} agents against {sample.timestamp_us} µs "
                f"and {sample.agent_count} agents; pass the forecasts in the windows' order"
            )


# --- the recording ---------------------------------------------------------------------------------------------


def _describe(label: str, threshold: float, samples: Sequence[torch_dataset.WindowSample]) -> str:
    scenes = ", ".join(dict.fromkeys(s.scene_name for s in samples))
    legend = ", ".join(f"{name} {color}" for name, color in plots.CLASS_COLORS.items())
    return "\n".join(
        [
            f"# {scenes}: {len(samples)} windows, {label} forecasts",
            "",
            "Each keyframe shows one window in its t0 ego frame (x forward, y left, z up; metres).",
            "",
            "- `ground_truth/agents`: annotated boxes at t0; `agent_futures`: their 6 s futures (white);"
            " `ego_future`: the ego's path.",
            f"- `forecast/occupancy/<h>`: cells where the {label} P(occupied, any class) >= {threshold:g} at t0 + h,"
            " in the most probable class's colour, opacity = P.",
            f"- `forecast/trajectories`: the {label} modes ({MODE_COLOR}), opacity and width by mode probability.",
            f"- `ground_truth/occupancy/<h>`: the annotated occupancy at t0 + h. Classes: {legend}.",
            f"- `lidar`: the t0 sweeps, coloured by height ({HEIGHT_RANGE_M[0]:g} to {HEIGHT_RANGE_M[1]:g} m).",
        ]
    )


def _blueprint(rr: ModuleType):
    import rerun.blueprint as rrb

    cameras = [rrb.Spatial2DView(origin=f"{EGO}/{name}", name=name) for name in types.CAMERA_CHANNELS]
    return rrb.Blueprint(
        rrb.Horizontal(
            rrb.Spatial3DView(origin="world", name="scene"),
            rrb.Vertical(rrb.Grid(*cameras), rrb.TextDocumentView(origin="description"), row_shares=[3, 1]),
            column_shares=[3, 2],
        ),
        collapse_panels=True,
    )


def _log_window(
    rec,
    rr: ModuleType,
    sample: torch_dataset.WindowSample,
    forecast: forecaster.OccupancyForecast,
    threshold: float,
    cameras: bool,
) -> None:
    """Log one window's ground truth and forecast below ``EGO`` at the current time."""
    frame = sample.points_frame.numpy()
    points = sample.points.numpy()[frame == int(frame.max(initial=0))]  # [N0, 5] the t0 keyframe
    rec.log(
        f"{EGO}/lidar",
        rr.Points3D(points[:, :3], colors=height_colors(points[:, 2]), radii=LIDAR_RADIUS_M),
    )
    start = _log_ground_truth(rec, rr, sample)
    if forecast.agent_boxes is not None:  # the forecast's own agents (tracked ones need not be the annotated)
        box = forecast.agent_boxes.astype(np.float64)  # [A, 7]
        start = np.concatenate([box[:, :2], (box[:, 2] - box[:, 5] / 2 + LINE_LIFT_M)[:, None]], axis=1)  # [A, 3]
    _log_modes(rec, rr, forecast, start)
    _log_occupancy(rec, rr, sample, forecast, threshold)
    if cameras:
        _log_cameras(rec, rr, sample)


def _log_ground_truth(rec, rr: ModuleType, sample: torch_dataset.WindowSample) -> np.ndarray:
    """Log the annotated boxes, their futures and the ego's; return [A, 3] where each agent's lines start."""
    colors = class_rgba()  # [C, 4]
    names = np.asarray(categories.CLASSES)
    box = sample.agent_box.numpy().astype(np.float64)  # [A, 7]
    agent_class = sample.agent_class.numpy()  # [A]
    centers, sizes, quaternions = box_arrays(box)
    rec.log(
        f"{EGO}/ground_truth/agents",
        rr.Boxes3D(
            centers=centers,
            sizes=sizes,
            quaternions=quaternions,
            colors=colors[agent_class],
            labels=names[agent_class].tolist(),
            class_ids=agent_class,
        ),
    )
    lift = box[:, 2] - box[:, 5] / 2 + LINE_LIFT_M  # [A] line height above each box's bottom
    start = np.concatenate([box[:, :2], lift[:, None]], axis=1)  # [A, 3]
    future = sample.agent_future.numpy().astype(np.float64)  # [A, T, 2]
    future_3d = np.concatenate([future, np.broadcast_to(lift[:, None, None], (*future.shape[:2], 1))], axis=2)
    rec.log(
        f"{EGO}/ground_truth/agent_futures",
        rr.LineStrips3D(
            valid_strips(start, future_3d, sample.agent_future_mask.numpy()), colors=FUTURE_RGBA, radii=0.06
        ),
    )
    ego_future = sample.ego_future.numpy().astype(np.float64)  # [T, 3] x, y, yaw
    ego_path = np.concatenate([ego_future[:, :2], np.full((len(ego_future), 1), LINE_LIFT_M)], axis=1)  # [T, 3]
    rec.log(
        f"{EGO}/ground_truth/ego_future",
        rr.LineStrips3D(
            valid_strips(np.array([[0.0, 0.0, LINE_LIFT_M]]), ego_path[None], sample.ego_future_mask.numpy()[None]),
            colors=_rgba(plots.EGO_COLOR),
            radii=0.08,
        ),
    )
    return start


def _log_modes(rec, rr: ModuleType, forecast: forecaster.OccupancyForecast, start: np.ndarray) -> None:
    """Log the K trajectory modes of every agent from ``start`` [A, 3], shaded and thickened by probability."""
    modes = np.asarray(forecast.trajectories, dtype=np.float64)  # [A, K, T, 2]
    a, k = modes.shape[:2]
    probability = np.asarray(forecast.mode_probabilities, dtype=np.float64).reshape(a, k)  # [A, K]
    lift = start[:, 2]
    modes_3d = np.concatenate([modes, np.broadcast_to(lift[:, None, None, None], (*modes.shape[:3], 1))], axis=3)
    strips = np.concatenate([np.broadcast_to(start[:, None, None, :], (a, k, 1, 3)), modes_3d], axis=2)  # [A,K,T+1,3]
    alpha = 0.15 + 0.85 * probability / np.maximum(probability.max(axis=1, keepdims=True, initial=0.0), 1e-9)
    mode_colors = np.tile(_rgba(MODE_COLOR), (a * k, 1))  # [A*K, 4]
    mode_colors[:, 3] = np.round(alpha.reshape(-1) * 255).astype(np.uint8)
    rec.log(
        f"{EGO}/forecast/trajectories",
        rr.LineStrips3D(
            strips.reshape(a * k, -1, 3).astype(np.float32),
            colors=mode_colors,
            radii=(0.03 + 0.12 * probability.reshape(-1)).astype(np.float32),
        ),
    )


def _log_occupancy(
    rec,
    rr: ModuleType,
    sample: torch_dataset.WindowSample,
    forecast: forecaster.OccupancyForecast,
    threshold: float,
) -> None:
    """Log the annotated and the forecast occupancy as cells, one entity per horizon."""
    colors = class_rgba()  # [C, 4]
    target = sample.occupancy.numpy()  # [S, C, H, W] bool
    occupancy = np.asarray(forecast.occupancy, dtype=np.float32)  # [S, C, H, W]
    radius = 0.45 * forecast.grid.resolution_m
    for s in range(min(len(target), len(occupancy))):  # horizons, not cells
        horizon = f"{float(forecast.times_s[s]):.1f}s"
        positions, classes, _ = occupied_cells(target[s], forecast.grid, 0.5)
        rec.log(
            f"{EGO}/ground_truth/occupancy/{horizon}",
            rr.Points3D(positions, colors=colors[classes], radii=radius, class_ids=classes),
        )
        positions, classes, p = occupied_cells(occupancy[s], forecast.grid, threshold)
        shaded = colors[classes].copy()  # [M, 4]
        shaded[:, 3] = np.round(p * 255).astype(np.uint8)
        rec.log(
            f"{EGO}/forecast/occupancy/{horizon}",
            rr.Points3D(positions, colors=shaded, radii=radius, class_ids=classes),
        )


def _log_cameras(rec, rr: ModuleType, sample: torch_dataset.WindowSample) -> None:
    """Log the six t0 cameras with their poses and pinholes (a missing camera is cleared)."""
    latest = sample.images.shape[0] - 1  # t0
    _, _, _, height, width = sample.images.shape
    for c, name in enumerate(types.CAMERA_CHANNELS):  # six cameras
        entity = f"{EGO}/{name}"
        if not bool(sample.camera_mask[latest, c]):
            rec.log(entity, rr.Clear(recursive=False))
            continue
        pose = sample.t0_from_camera[latest, c].double().numpy()  # [4, 4] camera → t0 ego
        rec.log(entity, rr.Transform3D(translation=pose[:3, 3], mat3x3=pose[:3, :3]))
        rec.log(
            entity,
            rr.Pinhole(
                image_from_camera=sample.intrinsics[latest, c].numpy(),
                resolution=[width, height],
                camera_xyz=rr.ViewCoordinates.RDF,
                image_plane_distance=2.0,
            ),
        )
        rec.log(entity, rr.EncodedImage(contents=_jpeg(sample.images[latest, c]), media_type="image/jpeg"))


def record(
    samples: Sequence[torch_dataset.WindowSample],
    forecasts: Sequence[forecaster.OccupancyForecast],
    path: Path,
    label: str = "model",
    threshold: float = 0.1,
    cameras: bool = True,
    recording_id: str | None = None,
) -> Path:
    """Write a Rerun recording of consecutive windows and their forecasts (see the module doc for the entities).

    Args:
        samples: [W] windows in time order, usually the consecutive windows of one scene (t0 ego frame
            throughout: points [N, 5], agent_box [A, 7], agent_future [A, T, 2], occupancy [S, C, H, W],
            images [P, 6, 3, Hc, Wc], t0_from_camera [P, 6, 4, 4], intrinsics [P, 6, 3, 3]).
        forecasts: [W] their forecasts, in the same order (occupancy [S, C, H, W] probabilities, trajectories
            [A, K, T, 2] m, mode_probabilities [A, K]).
        path: the ``.rrd`` file to write (its folder is created; an existing file is replaced).
        label: what made the forecasts (the description shown in the viewer).
        threshold: forecast cells whose probability of any class is below this are left out (0 < threshold <= 1).
        cameras: log the six camera images, poses and pinholes (most of the file's size).
        recording_id: the recording's id (default: derived from the windows' tokens, so the same windows give
            the same id).

    Returns:
        ``path``.

    Raises:
        ModuleNotFoundError: rerun-sdk is not installed (``pip install 'bevjepa[rerun]'``).
        ValueError: no windows, a forecast per window missing or out of order, a threshold outside (0, 1], or a
            path not ending in ``.rrd``.
    """
    rr = import_rerun()
    _check(samples, forecasts)
    if not 0 < threshold <= 1:
        raise ValueError(f"the occupancy threshold must be in (0, 1], got {threshold}")
    path = Path(path)
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if recording_id is None:
        recording_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "bevjepa:" + ",".join(s.sample_token for s in samples)))
    poses, _ = world_from_ego(samples)  # [W, 4, 4]

    def write(tmp: Path) -> None:
        rec = rr.RecordingStream(APPLICATION_ID, recording_id=recording_id, send_properties=False)
        try:
            rec.save(tmp, default_blueprint=_blueprint(rr))
            rec.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
            rec.log(
                "description",
                rr.TextDocument(_describe(label, threshold, samples), media_type="text/markdown"),
                static=True,
            )
            rec.log(
                f"{EGO}/box",
                rr.Boxes3D(
                    centers=[[plots.EGO_REAR_AXLE_TO_CENTER_M, 0.0, 0.75]],
                    sizes=[[plots.EGO_LENGTH_M, plots.EGO_WIDTH_M, 1.5]],
                    colors=_rgba(plots.EGO_COLOR),
                    labels=["ego"],
                ),
                static=True,
            )
            for w, (sample, forecast) in enumerate(zip(samples, forecasts, strict=True)):  # windows
                rec.set_time(TIMELINE, timestamp=np.datetime64(int(sample.timestamp_us), "us"))
                rec.set_time(SEQUENCE, sequence=w)
                rec.log(EGO, rr.Transform3D(translation=poses[w, :3, 3], mat3x3=poses[w, :3, :3]))
                _log_window(rec, rr, sample, forecast, threshold, cameras)
            rec.flush(blocking=True)
        finally:
            rec.disconnect()  # closes the file, after a failure too, before the temporary file goes

    bevio.atomic_write_with(path, write)
    return path


def scene_windows(data: Path, split: str, scene: str | None = None, max_windows: int = 20) -> list[int]:
    """The windows to record: consecutive windows of one scene of a split, in time order.

    Without ``scene``, the scene of the report's first chosen window (most moving agents,
    ``plots.choose_windows``), and up to ``max_windows`` of its windows around that one.

    Args:
        data: windows written by ``bevjepa preprocess``.
        split: the devkit split (``mini_val``, ...; ``all`` for every scene).
        scene: a scene name of the split, or None.
        max_windows: the most windows recorded (at least 1).

    Returns:
        indices into ``torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))``.

    Raises:
        ValueError: the split has no windows, ``scene`` is not in it, or ``max_windows`` < 1.
    """
    if max_windows < 1:
        raise ValueError(f"a recording needs at least one window, got max_windows={max_windows}")
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    scenes = [entry["scene"] for entry in dataset.entries]
    if not scenes:
        raise ValueError(f"{data}: split {split!r} has no windows to record")
    if scene is None:
        stored = [windows.load_window(dataset.root / entry["file"]) for entry in dataset.entries]
        moving = [plots.moving_agent_count(w.agent_velocity, w.agent_past, w.agent_past_mask) for w in stored]
        first = plots.choose_windows(moving, [len(w.agent_ids) for w in stored], scenes, 1)[0]
    elif scene in scenes:
        first = scenes.index(scene)
    else:
        raise ValueError(f"{data}: scene {scene!r} has no windows in split {split!r}; it has {sorted(set(scenes))}")
    of_scene = [i for i, name in enumerate(scenes) if name == scenes[first]]  # time order
    position = of_scene.index(first) if scene is None else 0
    start = max(0, min(position - max_windows // 2, len(of_scene) - max_windows))
    return of_scene[start : start + max_windows]


def record_scene(
    data: Path,
    split: str,
    run: Path | None,
    path: Path,
    scene: str | None = None,
    max_windows: int = 20,
    batch_size: int = 4,
    cameras: bool = True,
) -> Path:
    """Forecast consecutive windows of one scene of a split and write their Rerun recording.

    Args:
        data: windows written by ``bevjepa preprocess``.
        split: the devkit split (``mini_val``, ...; ``all`` for every scene).
        run: a run folder (its model forecasts); None records the constant-velocity baseline.
        path: the ``.rrd`` file to write.
        scene: the scene (default: as ``scene_windows`` chooses).
        max_windows: the most windows recorded.
        batch_size: windows per forward pass.
        cameras: log the camera images.

    Returns:
        ``path``.
    """
    import_rerun()  # before any work
    check_output(path)
    data = Path(data)
    chosen = scene_windows(data, split, scene, max_windows)
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    samples = [dataset[i] for i in chosen]
    if run is None:
        grid = geometry.GridSpec(**dataset.config["window"]["grid"])
        steps = int(dataset.config["window"]["occupancy_steps"])
        forecasts = [eval_report.constant_velocity_forecast(s, grid, steps) for s in samples]
        label = "constant velocity"
    else:
        model = forecaster.Forecaster.from_checkpoint(Path(run), cache_frames=4 * batch_size)
        forecasts = []
        for first in range(0, len(samples), batch_size):  # batches of windows
            forecasts += model.forecast_batch(torch_dataset.collate(samples[first : first + batch_size]))
        label = "model"
    return record(samples, forecasts, path, label=label, cameras=cameras)
