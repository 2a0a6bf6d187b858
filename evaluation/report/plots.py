"""Pictures of windows and forecasts: LiDAR in BEV, occupancy per horizon, trajectories, and an animated GIF.

Every panel is drawn in the ego frame of t0 as nuScenes BEV plots are: x (forward) points up, y (left) points
left, axes in metres. Grids come through ``GridSpec.to_image`` and are placed with ``extent``, so no plotting code
computes a BEV index. Rasterization is vectorized (``np.bincount`` over ``GridSpec.xy_to_index``); boxes and
trajectories are drawn as matplotlib collections, one artist per kind, never one per agent or point.

Figures use the Agg backend (no display needed) and are written atomically (temporary file, then rename).

Notation:
    N  LiDAR points     A  agents     K  modes     T  trajectory steps (0.5 s)
    S  occupancy times (t0 and F steps)     C  classes     H, W  the grid (``GridSpec`` layout)
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 — the backend is chosen first
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

from bevjepa.datasets import categories, geometry, rasterize, torch_dataset  # noqa: E402
from bevjepa.datasets import io as bevio  # noqa: E402
from bevjepa.evaluation import baselines  # noqa: E402
from bevjepa.prediction import forecaster  # noqa: E402

CLASS_COLORS: dict[str, str] = {"vehicle": "#1f77b4", "pedestrian": "#d62728", "cyclist": "#2ca02c"}
"""One colour per class (``categories.CLASSES``), the same in every figure."""
EGO_COLOR = "#9467bd"
EGO_LENGTH_M = 4.08
EGO_WIDTH_M = 1.73
EGO_REAR_AXLE_TO_CENTER_M = 1.34
"""The ego footprint drawn (a nuScenes Renault Zoe; the origin of the ego frame is its rear axle)."""
MOVING_SPEED_MPS = 1.0
"""Agents faster than this count as moving when windows are chosen for the figures."""
PROBABILITY_CMAP = "YlOrRd"
LIDAR_CMAP = "Greys"


# --- choosing windows ------------------------------------------------------------------------------------------


def moving_agent_count(
    agent_velocity: np.ndarray, agent_past: np.ndarray, agent_past_mask: np.ndarray, speed_mps: float = MOVING_SPEED_MPS
) -> int:
    """How many agents of a window move faster than ``speed_mps``.

    Args:
        agent_velocity: [A, 2] float — vx, vy (m/s, t0 ego frame); NaN where unknown.
        agent_past: [A, P, 2] float — xy (m) at the input keyframes (t0 last).
        agent_past_mask: [A, P] bool.
        speed_mps: the speed threshold (m/s).

    Returns:
        the count (unknown velocities are taken from the last past displacement, as the baselines do).
    """
    velocity = baselines.agent_velocities(
        np.asarray(agent_velocity), np.asarray(agent_past), np.asarray(agent_past_mask, dtype=bool)
    )  # [A, 2]
    return int((np.linalg.norm(velocity, axis=1) > speed_mps).sum())


def choose_windows(moving: Sequence[int], agents: Sequence[int], scenes: Sequence[str], count: int) -> list[int]:
    """The windows to show, deterministically: most moving agents first, then most agents, then dataset order.

    Windows of scenes not shown yet come before a second window of the same scene.

    Args:
        moving: [N] int — moving agents per window.
        agents: [N] int — agents per window.
        scenes: [N] str — each window's scene.
        count: how many to choose.

    Returns:
        up to ``count`` window indices, best first.
    """
    moving_arr, agents_arr = np.asarray(moving, dtype=np.int64), np.asarray(agents, dtype=np.int64)
    if not (len(moving_arr) == len(agents_arr) == len(scenes)):
        raise ValueError(
            f"choose_windows: moving, agents and scenes must have one entry per window, got "
            f"{len(moving_arr)}, {len(agents_arr)} and {len(scenes)}"
        )
    order = np.lexsort((np.arange(len(moving_arr)), -agents_arr, -moving_arr))  # last key sorts first
    first_of_scene, rest, seen = [], [], set()
    for i in order.tolist():  # windows, not points or cells
        (rest if scenes[i] in seen else first_of_scene).append(i)
        seen.add(scenes[i])
    return (first_of_scene + rest)[: max(count, 0)]


# --- rasterization and geometry --------------------------------------------------------------------------------


def lidar_density(points: np.ndarray, grid: geometry.GridSpec) -> np.ndarray:
    """LiDAR returns per cell.

    Args:
        points: [N, >=2] float — x, y (m, the grid's frame) first.
        grid: the grid to count on.

    Returns:
        [H, W] float32 — returns per cell (points outside the grid are dropped).
    """
    h, w = grid.shape
    rows, cols, inside = grid.xy_to_index(np.asarray(points, dtype=np.float64)[:, :2])
    counts = np.bincount(rows[inside] * w + cols[inside], minlength=h * w)  # [H*W]
    return counts.reshape(h, w).astype(np.float32)


def _extent(grid: geometry.GridSpec) -> tuple[float, float, float, float]:
    """``imshow`` extent of ``grid.to_image`` output: y from left (+) to right (-), x from bottom to top."""
    return (grid.y_max_m, grid.y_min_m, grid.x_min_m, grid.x_max_m)


def _plot_xy(xy: np.ndarray) -> np.ndarray:
    """Ego-frame x, y [..., 2] as plot coordinates [..., 2] (horizontal y, vertical x)."""
    return np.asarray(xy)[..., ::-1]


def _box_polygons(boxes: np.ndarray) -> np.ndarray:
    """[A, 7] x, y, z, w, l, h, yaw → [A, 4, 2] corners in plot coordinates."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    corners = rasterize.box_footprints(boxes[:, :2], boxes[:, [3, 4]], boxes[:, 6])  # [A, 4, 2] x, y
    return _plot_xy(corners)


def _ego_box() -> np.ndarray:
    """[1, 7] the ego's footprint as a box in its own frame."""
    return np.array([[EGO_REAR_AXLE_TO_CENTER_M, 0.0, 0.0, EGO_WIDTH_M, EGO_LENGTH_M, 1.5, 0.0]])


def any_class(occupancy: np.ndarray) -> np.ndarray:
    """Probability of any class: occupancy [..., C, H, W] in [0, 1] → [..., H, W] float32 (independent classes)."""
    return (1.0 - np.prod(1.0 - np.asarray(occupancy, dtype=np.float32), axis=-3)).astype(np.float32)


# --- drawing on an axis ----------------------------------------------------------------------------------------


def _setup_axis(ax: plt.Axes, grid: geometry.GridSpec, title: str | None = None, labels: bool = True) -> None:
    ax.set_xlim(grid.y_max_m, grid.y_min_m)  # +y (left) on the left
    ax.set_ylim(grid.x_min_m, grid.x_max_m)  # +x (forward) up
    ax.set_aspect("equal")
    if labels:
        ax.set_xlabel("y (m, left +)")
        ax.set_ylabel("x (m, forward +)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _draw_lidar(ax: plt.Axes, points: np.ndarray, grid: geometry.GridSpec) -> None:
    """Points as a log density image on a grid twice as fine as ``grid``."""
    fine = geometry.GridSpec(grid.x_min_m, grid.x_max_m, grid.y_min_m, grid.y_max_m, grid.resolution_m / 2)
    density = np.log1p(lidar_density(points, fine))  # [2H, 2W]
    ax.imshow(
        fine.to_image(np.where(density > 0, density, np.nan)),  # empty cells transparent
        extent=_extent(fine),
        cmap=LIDAR_CMAP,
        vmin=0,
        vmax=max(float(density.max()), 1.0),
        interpolation="nearest",
    )


def _draw_boxes(ax: plt.Axes, boxes: np.ndarray, classes: np.ndarray, fill: bool = False) -> None:
    """Agent boxes [A, 7] outlined in their class colours (``classes`` [A] int)."""
    if len(boxes) == 0:
        return
    colors = [CLASS_COLORS[c] for c in np.asarray(categories.CLASSES)[np.asarray(classes, dtype=np.int64)]]
    ax.add_collection(
        PolyCollection(
            _box_polygons(boxes), edgecolors=colors, facecolors=colors if fill else "none", linewidths=1.2, alpha=0.9
        )
    )


def _draw_ego(ax: plt.Axes) -> None:
    ax.add_collection(PolyCollection(_box_polygons(_ego_box()), facecolors=EGO_COLOR, edgecolors="black", lw=0.8))


def _draw_probability(ax: plt.Axes, probability: np.ndarray, grid: geometry.GridSpec):
    """A probability map [H, W] in [0, 1]; returns the image (for a colour bar)."""
    shown = np.where(probability >= 0.01, probability, np.nan)  # below 1%: transparent
    return ax.imshow(
        grid.to_image(shown), extent=_extent(grid), cmap=PROBABILITY_CMAP, vmin=0, vmax=1, interpolation="nearest"
    )


def _draw_outline(ax: plt.Axes, occupancy: np.ndarray, grid: geometry.GridSpec, linewidth: float = 1.0) -> None:
    """Ground-truth occupancy [C, H, W] bool outlined per class in its colour."""
    occupancy = np.asarray(occupancy, dtype=bool)
    h, w = grid.shape
    image_rows = np.linspace(grid.x_max_m - grid.resolution_m / 2, grid.x_min_m + grid.resolution_m / 2, h)  # [H]
    image_cols = np.linspace(grid.y_max_m - grid.resolution_m / 2, grid.y_min_m + grid.resolution_m / 2, w)  # [W]
    for c, name in enumerate(categories.CLASSES[: occupancy.shape[0]]):  # a handful of classes, not cells
        if occupancy[c].any():
            ax.contour(
                image_cols,
                image_rows,
                grid.to_image(occupancy[c]).astype(np.float32),
                levels=[0.5],
                colors=CLASS_COLORS[name],
                linewidths=linewidth,
            )


def _polylines(paths: np.ndarray) -> np.ndarray:
    """[L, T, 2] x, y paths (NaN where absent) → [L*(T+1), 2] plot coordinates with a NaN row between paths."""
    paths = np.asarray(paths, dtype=np.float64)
    padded = np.concatenate([paths, np.full((paths.shape[0], 1, 2), np.nan)], axis=1)  # [L, T+1, 2]
    return _plot_xy(padded.reshape(-1, 2))


def _draw_ground_truth_future(ax: plt.Axes, sample: torch_dataset.WindowSample, steps: int | None = None) -> None:
    """Each agent's annotated future from its t0 position (dashed black), up to ``steps`` steps."""
    box = sample.agent_box.numpy().astype(np.float64)  # [A, 7]
    future = sample.agent_future.numpy().astype(np.float64)  # [A, T, 2]
    mask = sample.agent_future_mask.numpy()  # [A, T]
    paths = np.concatenate([box[:, None, :2], np.where(mask[..., None], future, np.nan)], axis=1)  # [A, T+1, 2]
    if steps is not None:
        paths = paths[:, : steps + 1]
    line = _polylines(paths)
    ax.plot(line[:, 0], line[:, 1], color="black", lw=1.2, ls="--", label="ground-truth future")


def _draw_modes(
    ax: plt.Axes, forecast: forecaster.OccupancyForecast, box: np.ndarray, steps: int | None = None, color="#00bcd4"
) -> None:
    """The K modes of every agent from its t0 position, opacity in proportion to the mode's probability."""
    modes = np.asarray(forecast.trajectories, dtype=np.float64)  # [A, K, T, 2]
    if modes.size == 0:
        return
    a, k, _, _ = modes.shape
    start = np.broadcast_to(np.asarray(box, dtype=np.float64)[:, None, None, :2], (a, k, 1, 2))
    paths = np.concatenate([start, modes], axis=2)  # [A, K, T+1, 2]
    if steps is not None:
        paths = paths[:, :, : steps + 1]
    probability = np.asarray(forecast.mode_probabilities, dtype=np.float64)  # [A, K]
    alpha = 0.15 + 0.85 * probability / np.maximum(probability.max(axis=1, keepdims=True), 1e-9)  # [A, K]
    rgba = np.tile(np.asarray(matplotlib.colors.to_rgba(color)), (a * k, 1))  # [A*K, 4]
    rgba[:, 3] = alpha.reshape(-1)
    segments = _plot_xy(paths.reshape(a * k, -1, 2))  # [A*K, T+1, 2]
    ax.add_collection(LineCollection(segments, colors=rgba, linewidths=1.0 + 1.5 * probability.reshape(-1)))


def _class_legend(extra: Sequence = ()) -> list:
    handles = [Patch(edgecolor=CLASS_COLORS[c], facecolor="none", label=c) for c in categories.CLASSES]
    return [*handles, Patch(facecolor=EGO_COLOR, edgecolor="black", label="ego"), *extra]


def _t0_points(sample: torch_dataset.WindowSample) -> np.ndarray:
    """[N0, 5] the points of the t0 keyframe."""
    frame = sample.points_frame.numpy()
    return sample.points.numpy()[frame == int(frame.max(initial=0))]


def _save(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically and close it."""
    path = Path(path)
    try:
        bevio.atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


# --- panels ----------------------------------------------------------------------------------------------------


def plot_lidar(sample: torch_dataset.WindowSample, path: Path, grid: geometry.GridSpec) -> Path:
    """The t0 LiDAR sweep in BEV (log density of returns) with the ego and the ground-truth agent boxes.

    Args:
        sample: the window (points [N, 5] in the t0 ego frame; agent_box [A, 7]).
        path: the PNG to write.
        grid: the extent shown (metres; drawn at half its resolution).
    """
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    _draw_lidar(ax, _t0_points(sample), grid)
    _draw_boxes(ax, sample.agent_box.numpy(), sample.agent_class.numpy())
    _draw_ego(ax)
    _setup_axis(ax, grid, f"{sample.scene_name} {sample.sample_token[:8]}: LiDAR at t0 and annotated boxes")
    ax.legend(handles=_class_legend(), loc="upper right", fontsize=7)
    return _save(fig, path)


def plot_occupancy(
    sample: torch_dataset.WindowSample, forecast: forecaster.OccupancyForecast, path: Path, label: str = "model"
) -> Path:
    """Ground truth against forecast occupancy, one panel per horizon (0, 0.5, ..., 2 s).

    The forecast is the probability of any class (colour map); the ground truth is outlined in class colours.

    Args:
        sample: the window (occupancy [S, C, H, W] bool).
        forecast: its forecast (occupancy [S, C, H, W] float32 on ``forecast.grid``).
        path: the PNG to write.
        label: what made the forecast (panel titles).
    """
    target = sample.occupancy.numpy()  # [S, C, H, W]
    probability = any_class(forecast.occupancy)  # [S, H, W]
    steps = min(len(target), len(probability))
    fig, axes = plt.subplots(1, steps, figsize=(3.0 * steps + 0.8, 3.4), squeeze=False)
    image = None
    for s, ax in enumerate(axes[0]):  # one panel per horizon
        image = _draw_probability(ax, probability[s], forecast.grid)
        _draw_outline(ax, target[s], forecast.grid)
        _draw_ego(ax)
        _setup_axis(ax, forecast.grid, f"t0 + {float(forecast.times_s[s]):.1f} s", labels=s == 0)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.01, label=f"{label}: P(occupied)")
    axes[0, -1].legend(
        handles=[Line2D([], [], color=CLASS_COLORS[c], label=f"ground truth: {c}") for c in categories.CLASSES],
        loc="lower left",
        fontsize=6,
    )
    fig.suptitle(f"{sample.scene_name} {sample.sample_token[:8]}: occupancy, ground truth (outline) vs {label}")
    return _save(fig, path)


def plot_trajectories(
    sample: torch_dataset.WindowSample,
    forecast: forecaster.OccupancyForecast,
    path: Path,
    label: str = "model",
) -> Path:
    """Ground-truth futures and the forecast's K modes, shaded by mode probability, over the t0 LiDAR.

    Args:
        sample: the window (agent_box [A, 7], agent_future [A, T, 2] with its mask).
        forecast: its forecast (trajectories [A, K, T, 2], mode_probabilities [A, K]).
        path: the PNG to write.
        label: what made the forecast.
    """
    grid = forecast.grid
    box = sample.agent_box.numpy()
    starts = box if forecast.agent_boxes is None else forecast.agent_boxes  # where the forecast's agents are
    reach = np.concatenate(
        [
            np.abs(np.asarray(forecast.trajectories, dtype=np.float64)).reshape(-1),
            np.abs(sample.agent_future.numpy()[sample.agent_future_mask.numpy()]).reshape(-1),
            [grid.x_max_m],
        ]
    )
    half = float(min(np.nanmax(reach) + 5.0, 2 * grid.x_max_m))
    view = geometry.GridSpec(-half, half, -half, half, 2 * half / math.ceil(2 * half))
    fig, ax = plt.subplots(figsize=(6, 6))
    _draw_lidar(ax, _t0_points(sample), view)
    _draw_modes(ax, forecast, starts)
    _draw_ground_truth_future(ax, sample)
    _draw_boxes(ax, box, sample.agent_class.numpy())
    _draw_ego(ax)
    _setup_axis(ax, view, f"{sample.scene_name} {sample.sample_token[:8]}: trajectories, 6 s")
    ax.legend(
        handles=_class_legend(
            [
                Line2D([], [], color="black", ls="--", label="ground-truth future"),
                Line2D([], [], color="#00bcd4", lw=2, label=f"{label} modes (opacity: probability)"),
            ]
        ),
        loc="upper right",
        fontsize=7,
    )
    return _save(fig, path)


def plot_iou_per_horizon(metrics: dict, path: Path) -> Path:
    """Occupancy IoU of every model against the horizon, one line per model, one panel per class.

    Args:
        metrics: ``open_loop.evaluate`` output (``models[name]["iou"][class]`` lists per step; None or NaN skipped).
        path: the PNG to write.
    """
    classes = list(categories.CLASSES)
    fig, axes = plt.subplots(1, len(classes), figsize=(4 * len(classes), 3.2), squeeze=False, sharey=True)
    for c, (name, ax) in enumerate(zip(classes, axes[0], strict=True)):
        for model, scores in metrics.get("models", {}).items():
            values = scores.get("iou", {}).get(name)
            if not values:
                continue
            y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            ax.plot(np.arange(len(y)) * forecaster.STEP_S, y, marker="o", label=model)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("horizon (s)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if c == 0:
            ax.set_ylabel("IoU")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        axes[0, -1].legend(handles, labels, fontsize=7)
    fig.suptitle("Occupancy IoU per horizon")
    return _save(fig, path)


# --- animation -------------------------------------------------------------------------------------------------


def scene_animation(
    samples: Sequence[torch_dataset.WindowSample],
    forecasts: Sequence[forecaster.OccupancyForecast],
    path: Path,
    label: str = "model",
    fps: float = 3.0,
    width_px: int = 720,
) -> Path:
    """An animated GIF of consecutive windows, each played over its horizon (t0, t0 + 0.5 s, ..., t0 + F).

    Each frame has two panels in the t0 ego frame: on the left the ground truth (t0 LiDAR, annotated boxes,
    occupancy at the frame's time in class colours, the agents' annotated futures up to that time); on the
    right the forecast (its probability of occupancy at that time, the ground truth outlined, the modes up to
    that time shaded by probability). A single window gives one pass over its horizon.

    Args:
        samples: [W] windows, usually consecutive windows of one scene.
        forecasts: [W] their forecasts.
        path: the GIF to write.
        label: what made the forecasts.
        fps: frames per second.
        width_px: frame width (pixels); the file stays small (a 256-colour palette shared by all frames).

    Returns:
        ``path``.
    """
    if len(samples) != len(forecasts) or not samples:
        raise ValueError(
            f"scene_animation needs one forecast per window and at least one window, got {len(samples)} windows "
            f"and {len(forecasts)} forecasts"
        )
    if fps <= 0:
        raise ValueError(f"scene_animation: fps must be positive, got {fps}")
    dpi = 80
    fig, (left, right) = plt.subplots(1, 2, figsize=(width_px / dpi, width_px / dpi * 0.52), dpi=dpi)
    frames: list[Image.Image] = []
    for w, (sample, forecast) in enumerate(zip(samples, forecasts, strict=True)):
        grid = forecast.grid
        target = sample.occupancy.numpy()  # [S, C, H, W]
        probability = any_class(forecast.occupancy)  # [S, H, W]
        points = _t0_points(sample)
        box, classes = sample.agent_box.numpy(), sample.agent_class.numpy()
        for s in range(min(len(target), len(probability))):  # the horizon's steps
            left.clear()
            right.clear()
            _draw_lidar(left, points, grid)
            colored = np.zeros((*grid.shape, 4), dtype=np.float32)  # [H, W, RGBA] ground truth in class colours
            for c, name in enumerate(categories.CLASSES[: target.shape[1]]):  # a handful of classes
                colored[target[s, c]] = matplotlib.colors.to_rgba(CLASS_COLORS[name], 0.75)
            left.imshow(grid.to_image(colored.transpose(2, 0, 1)).transpose(1, 2, 0), extent=_extent(grid))
            _draw_boxes(left, box, classes)
            _draw_ground_truth_future(left, sample, steps=s)
            _draw_ego(left)
            _setup_axis(left, grid, "ground truth", labels=False)
            _draw_probability(right, probability[s], grid)
            _draw_outline(right, target[s], grid, linewidth=0.8)
            _draw_modes(right, forecast, box if forecast.agent_boxes is None else forecast.agent_boxes, steps=s)
            _draw_ego(right)
            _setup_axis(right, grid, f"{label} forecast (P occupied, modes)", labels=False)
            fig.suptitle(
                f"{sample.scene_name}  window {w + 1}/{len(samples)}  t0 + {float(forecast.times_s[s]):.1f} s",
                fontsize=10,
            )
            fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.88, wspace=0.12)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi)
            buffer.seek(0)
            frames.append(Image.open(buffer).convert("RGB"))
    plt.close(fig)
    palette = frames[len(frames) // 2].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    quantized = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    path = Path(path)
    bevio.atomic_write_with(
        path,
        lambda tmp: quantized[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=quantized[1:],
            duration=round(1000 / fps),
            loop=0,
            optimize=False,
        ),
    )
    return path
