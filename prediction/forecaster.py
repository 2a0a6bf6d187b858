"""The planner's API: ``Forecaster.from_checkpoint(RUN).forecast(window) -> OccupancyForecast``.

An ``OccupancyForecast`` is plain numpy in the ego frame of the present keyframe t0 (x forward, y left, z up,
origin at the rear axle; metres, seconds after t0), so a planner needs neither torch nor the model to use it.

Notation:
    S  occupancy times (t0 and the F rollout steps)     C  classes     H, W  the target grid (``GridSpec`` layout)
    A  agents     K  modes     T  trajectory steps      N  query points
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, geometry, torch_dataset
from bevjepa.datasets import io as io_utils
from bevjepa.prediction import agent_occupancy, checkpoint, forecast_bars, heads, lidar_velocity, model, tracking

FORECAST_FORMAT = "bevjepa-occupancy-forecast"
FORECAST_VERSION = 3
"""Version 2 added the optional ``latent_occupancy``, version 3 the optional ``agent_boxes`` and ``agent_scores``;
``load`` reads all three."""
OPTIONAL_FIELDS = ("latent_occupancy", "agent_boxes", "agent_scores")
"""Arrays a forecast file may hold (newer versions); a file without them loads them as None."""
AGENT_SOURCES = ("tracked", "annotated")
"""Where a forecast's agents come from: ``tracked``, the model's own detections tracked over the window's
keyframes (the default: sensors only); ``annotated``, the window's annotated agents with their annotated pasts
(the nuScenes prediction-challenge protocol, where past tracks are given)."""
STEP_S = 0.5
PROBABILITY_SUM_TOLERANCE = 1e-3
"""How far a row of ``mode_probabilities`` may sum from 1 (float32 softmax is within 1e-6)."""
ARRAY_FIELDS = (
    "times_s",
    "occupancy",
    "agent_ids",
    "agent_classes",
    "trajectory_times_s",
    "trajectories",
    "mode_probabilities",
)
"""The arrays of a forecast file that every version holds (see ``OPTIONAL_FIELDS``)."""
HEADER_KEYS = ("format", "format_version", "timestamp_us", "grid", "classes")
_KIND_NAMES = {"f": "a floating", "iu": "an integer", "U": "a string"}


def _check_array(
    field: str, value: object, want: tuple[tuple[str, int | None], ...], kinds: str, probability: bool = False
) -> tuple[int, ...]:
    """Check one array field of an ``OccupancyForecast``; return its shape.

    Args:
        field: the field's name (for the error).
        value: the field's value.
        want: (dimension letter, size or None for any size) of each axis.
        kinds: the numpy dtype kinds accepted (``"f"`` float, ``"iu"`` integer, ``"U"`` string).
        probability: also require finite values in [0, 1].

    Raises:
        ValueError: naming the field, what it got and what it wants.
    """
    wanted = "[" + ", ".join(letter if size is None else f"{letter}={size}" for letter, size in want) + "]"
    if not isinstance(value, np.ndarray):
        raise ValueError(
            f"OccupancyForecast.{field}: expected a numpy array of shape {wanted}, got {type(value).__name__}"
        )
    if value.ndim != len(want) or any(
        size is not None and got != size for got, (_, size) in zip(value.shape, want, strict=True)
    ):
        raise ValueError(f"OccupancyForecast.{field}: expected shape {wanted}, got {tuple(value.shape)}")
    if value.dtype.kind not in kinds:
        raise ValueError(f"OccupancyForecast.{field}: expected {_KIND_NAMES[kinds]} array, got dtype {value.dtype}")
    if probability:
        ok = np.isfinite(value) & (value >= 0) & (value <= 1)
        if not ok.all():
            bad = value[~ok]
            raise ValueError(
                f"OccupancyForecast.{field}: expected finite probabilities in [0, 1], got {bad.size} values outside "
                f"(e.g. {bad.ravel()[:3].tolist()})"
            )
    return tuple(value.shape)


@dataclass(frozen=True)
class OccupancyForecast:
    """Future occupancy and agent trajectories around the ego, in the t0 ego frame.

    Attributes:
        timestamp_us: t0 (µs).
        grid: the occupancy grid (metric bounds and resolution; rows along +x, columns along +y).
        classes: the class names of the occupancy channels.
        times_s: [S] float32 — seconds after t0 of each occupancy map (0, 0.5, ..., 2.0).
        occupancy: [S, C, H, W] float32 — probability that each cell is occupied by an agent of each class. For
            tracked agents (the default), the fused map (``agent_occupancy.fuse``): the agents' t0 boxes moved
            along their trajectory modes, weighted by the modes' probabilities and the agent's detection score,
            joined cell by cell (the larger) with the latent occupancy (after t0 per class: near the tracks only up
            to 1 s for vehicles, never for pedestrians; away from every track at every step for vehicles and
            cyclists); for annotated agents, their boxes along the modes alone.
        agent_ids: [A] str — track ids (tracked agents) or instance tokens (annotated agents).
        agent_classes: [A] int64 — class index of each agent.
        trajectory_times_s: [T] float32 — seconds after t0 of each trajectory step (0.5 ... 6.0).
        trajectories: [A, K, T, 2] float32 — x, y (m) of each agent's K modes.
        mode_probabilities: [A, K] float32 — each mode's probability (rows sum to 1).
        latent_occupancy: [S, C, H, W] float32 or None — the latent occupancy head's map alone (what the world
            model's latent holds, tracked agents or not); None for forecasts that have no latent (baselines).
        agent_boxes: [A, 7] float32 or None — each agent's t0 box: x, y, z, width, length, height (m), yaw (rad)
            (the tracked detection, or the annotated box); None in forecasts that do not carry them (baselines).
        agent_scores: [A] float32 or None — each agent's detection score at t0 (tracked agents); None where the
            agents were given (annotated agents, baselines).

    A road with nobody on it is a valid forecast: A = 0, ``trajectories`` [0, K, T, 2], ``mode_probabilities``
    [0, K], and (for the model) the occupancy of no agent, zero everywhere, next to ``latent_occupancy``.

    Construction checks every field (``ValueError`` naming the field, the shape or value got and the one wanted):
    the shapes above (H, W from ``grid``, C from ``classes``, S and T from the two time axes, A from
    ``agent_ids``, K >= 1), floating arrays for times, maps, trajectories and probabilities (any float width),
    integer classes in [0, C), string ids; times finite, non-negative and strictly increasing; trajectories
    finite; occupancy and mode probabilities finite and in [0, 1], each agent's mode probabilities summing to 1
    (within ``PROBABILITY_SUM_TOLERANCE``).
    """

    timestamp_us: int
    grid: geometry.GridSpec
    classes: tuple[str, ...]
    times_s: np.ndarray
    occupancy: np.ndarray
    agent_ids: np.ndarray
    agent_classes: np.ndarray
    trajectory_times_s: np.ndarray
    trajectories: np.ndarray
    mode_probabilities: np.ndarray
    latent_occupancy: np.ndarray | None = None
    agent_boxes: np.ndarray | None = None
    agent_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.timestamp_us, bool) or not isinstance(self.timestamp_us, int | np.integer):
            raise ValueError(
                f"OccupancyForecast.timestamp_us: expected an integer (µs), got {type(self.timestamp_us).__name__} "
                f"{self.timestamp_us!r}"
            )
        if not isinstance(self.grid, geometry.GridSpec):
            raise ValueError(f"OccupancyForecast.grid: expected a geometry.GridSpec, got {type(self.grid).__name__}")
        if not isinstance(self.classes, tuple) or not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"OccupancyForecast.classes: expected a non-empty tuple of names, got {self.classes!r}")
        H, W = self.grid.shape
        C = len(self.classes)
        S = _check_array("times_s", self.times_s, (("S", None),), "f")[0]
        T = _check_array("trajectory_times_s", self.trajectory_times_s, (("T", None),), "f")[0]
        A = _check_array("agent_ids", self.agent_ids, (("A", None),), "U")[0]
        for name, times in (("times_s", self.times_s), ("trajectory_times_s", self.trajectory_times_s)):
            if len(times) == 0:
                raise ValueError(f"OccupancyForecast.{name}: expected at least one time, got shape (0,)")
            if not np.isfinite(times).all() or times[0] < 0 or (np.diff(times) <= 0).any():
                raise ValueError(
                    f"OccupancyForecast.{name}: expected finite, non-negative, strictly increasing seconds after "
                    f"t0, got {times.tolist()}"
                )
        maps = (("S", S), ("C", C), ("H", H), ("W", W))
        _check_array("occupancy", self.occupancy, maps, "f", probability=True)
        if self.latent_occupancy is not None:
            _check_array("latent_occupancy", self.latent_occupancy, maps, "f", probability=True)
        _check_array("agent_classes", self.agent_classes, (("A", A),), "iu")
        if self.agent_scores is not None:
            _check_array("agent_scores", self.agent_scores, (("A", A),), "f", probability=True)
        if self.agent_boxes is not None:
            _check_array("agent_boxes", self.agent_boxes, (("A", A), ("box", 7)), "f")
            if not np.isfinite(self.agent_boxes).all():
                raise ValueError("OccupancyForecast.agent_boxes: expected finite boxes")
        if A and (self.agent_classes.min() < 0 or self.agent_classes.max() >= C):
            raise ValueError(
                f"OccupancyForecast.agent_classes: expected class indices in [0, {C}), got "
                f"{sorted(set(self.agent_classes.tolist()))}"
            )
        K = _check_array("trajectories", self.trajectories, (("A", A), ("K", None), ("T", T), ("xy", 2)), "f")[1]
        if K < 1:
            raise ValueError(
                f"OccupancyForecast.trajectories: expected K >= 1 modes, got shape {self.trajectories.shape}"
            )
        if not np.isfinite(self.trajectories).all():
            bad = np.flatnonzero(~np.isfinite(self.trajectories).reshape(A, -1).all(axis=1))
            raise ValueError(
                f"OccupancyForecast.trajectories: expected finite positions (m), agents {self.agent_ids[bad].tolist()}"
                " have NaN or infinite ones"
            )
        _check_array("mode_probabilities", self.mode_probabilities, (("A", A), ("K", K)), "f", probability=True)
        sums = self.mode_probabilities.astype(np.float64).sum(axis=1)  # [A]
        off = np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE
        if off.any():
            raise ValueError(
                f"OccupancyForecast.mode_probabilities: each agent's modes must sum to 1, agents "
                f"{self.agent_ids[off].tolist()} sum to {sums[off].tolist()}"
            )

    def occupancy_at(self, xy: np.ndarray, time_s: float | np.ndarray) -> np.ndarray:
        """Probability that points are occupied by any class at given times.

        Args:
            xy: [N, 2] float — x, y (m, t0 ego frame).
            time_s: scalar or [N] seconds after t0; linear in time between maps, clamped to the forecast's span.

        Returns:
            [N] float64 in [0, 1]; 0 outside the grid.
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        time_s = np.broadcast_to(np.asarray(time_s, dtype=np.float64), (len(xy),))
        any_class = 1.0 - np.prod(1.0 - self.occupancy.astype(np.float64), axis=1)  # [S, H, W]
        rows, cols, inside = self.grid.xy_to_index(xy)
        position = np.clip(np.interp(time_s, self.times_s, np.arange(len(self.times_s))), 0, len(self.times_s) - 1)
        lower = np.floor(position).astype(np.int64)
        upper = np.minimum(lower + 1, len(self.times_s) - 1)
        frac = position - lower
        value = (1 - frac) * any_class[lower, rows, cols] + frac * any_class[upper, rows, cols]
        return np.where(inside, value, 0.0)

    def collision_probability(
        self,
        ego_trajectory: np.ndarray,
        times_s: np.ndarray,
        length_m: float = 4.08,
        width_m: float = 1.73,
        rear_axle_to_center_m: float = 1.34,
        samples: int = 5,
    ) -> float:
        """The probability that a candidate ego trajectory overlaps occupied space.

        The ego's footprint (a ``length_m`` × ``width_m`` box whose centre lies ``rear_axle_to_center_m`` ahead
        of the pose) is sampled on a ``samples`` × ``samples`` lattice at every pose; the result is the largest
        occupancy probability met, over the footprint and over time (a conservative bound for one obstacle).

        Args:
            ego_trajectory: [N, 3] float — x, y (m), yaw (rad) of the rear axle in the t0 ego frame.
            times_s: [N] seconds after t0 of each pose.
        """
        xy, per_pose = _footprint_points(ego_trajectory, length_m, width_m, rear_axle_to_center_m, samples)
        probabilities = self.occupancy_at(xy, np.repeat(np.asarray(times_s, dtype=np.float64), per_pose))
        return float(probabilities.max()) if probabilities.size else 0.0

    def standing_collision_probability(
        self,
        ego_trajectory: np.ndarray,
        held_s: float = 0.5,
        length_m: float = 4.08,
        width_m: float = 1.73,
        rear_axle_to_center_m: float = 1.34,
        samples: int = 5,
    ) -> float:
        """The probability that the ego's footprint at poses it reaches after the forecast overlaps what stands there.

        What stands is what the forecast holds in place over its last ``held_s`` seconds: at each point, the
        smallest occupancy probability of the maps in that span (a car that drives on leaves the cells it held, a
        car that stands keeps them; the longer the span, the slower a car that counts as standing). Beyond its last
        time the forecast says nothing else, so this is how far a planner can look past it: whether the ego can
        still stop short of what stands at the end.

        Args:
            ego_trajectory: [N, 3] float — x, y (m), yaw (rad) of the rear axle in the t0 ego frame.
            held_s: the span (s) before the last time whose maps all hold what stands; 0: the last map alone.
        """
        if not held_s >= 0:
            raise ValueError(f"standing_collision_probability: held_s must be >= 0 seconds, got {held_s}")
        xy, _ = _footprint_points(ego_trajectory, length_m, width_m, rear_axle_to_center_m, samples)
        last = float(self.times_s[-1])
        held = [float(t) for t in self.times_s if t >= last - held_s - 1e-6]  # the last map at least
        standing = np.min([self.occupancy_at(xy, t) for t in held], axis=0)  # [N · Q]; a few maps
        return float(standing.max()) if standing.size else 0.0

    def save(self, path: Path) -> Path:
        """Write the forecast as an ``.npz`` (format ``bevjepa-occupancy-forecast`` version 2; no pickle), atomically.

        As ``np.savez``, ``.npz`` is appended to a path that does not end with it; the path written is returned.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(f"{path.name}.npz")
        header = {
            "format": FORECAST_FORMAT,
            "format_version": FORECAST_VERSION,
            "timestamp_us": int(self.timestamp_us),
            "grid": asdict(self.grid),
            "classes": list(self.classes),
        }
        io_utils.atomic_write_npz(
            path,
            header=np.array(json.dumps(header)),
            times_s=self.times_s,
            occupancy=self.occupancy,
            agent_ids=self.agent_ids,
            agent_classes=self.agent_classes,
            trajectory_times_s=self.trajectory_times_s,
            trajectories=self.trajectories,
            mode_probabilities=self.mode_probabilities,
            **{name: getattr(self, name) for name in OPTIONAL_FIELDS if getattr(self, name) is not None},
        )
        return path

    @staticmethod
    def load(path: Path) -> OccupancyForecast:
        """Read a forecast written by ``save`` (format versions 1 to 3), checking everything it holds.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a readable ``.npz`` of this format, its header lacks a key or holds a
                wrong value, an array is missing, or an array has the wrong shape, dtype or values (the message
                names the file and the field, and what it got and wants; see ``OccupancyForecast``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such forecast file (write one with OccupancyForecast.save)")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: not a {FORECAST_FORMAT} .npz file ({type(error).__name__}: {error})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single .npy array, not a {FORECAST_FORMAT} .npz file")
        with data:
            header = _read_header(path, _read_member(path, data, "header"))
            missing = [name for name in ARRAY_FIELDS if name not in data.files]
            if missing:
                raise ValueError(
                    f"{path}: the arrays {missing} are missing; a {FORECAST_FORMAT} file holds {list(ARRAY_FIELDS)}"
                )
            arrays = {name: _read_member(path, data, name) for name in ARRAY_FIELDS}
            for name in OPTIONAL_FIELDS:
                arrays[name] = _read_member(path, data, name) if name in data.files else None
        try:
            return OccupancyForecast(
                timestamp_us=header["timestamp_us"], grid=header["grid"], classes=header["classes"], **arrays
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _read_member(path: Path, data: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    """One array of an open ``.npz``; a missing or unreadable member raises ``ValueError`` naming file and array."""
    if name not in data.files:
        raise ValueError(f"{path}: the array {name!r} is missing; is this a {FORECAST_FORMAT} file?")
    try:
        return data[name]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: the array {name!r} cannot be read ({type(error).__name__}: {error})") from None


def _read_header(path: Path, raw: np.ndarray) -> dict:
    """The checked header of a forecast file: ``timestamp_us`` an int, ``grid`` a ``GridSpec``, ``classes`` a tuple."""
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"{path}: header: expected one JSON string, got a {raw.dtype} array of shape {raw.shape}")
    try:
        header = json.loads(str(raw))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: header: not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header: expected a JSON object, got {type(header).__name__}")
    version = header.get("format_version")
    if header.get("format") != FORECAST_FORMAT or version not in range(1, FORECAST_VERSION + 1):
        raise ValueError(
            f"{path}: not a {FORECAST_FORMAT} file of version 1 to {FORECAST_VERSION} (header: format "
            f"{header.get('format')!r}, format_version {version!r})"
        )
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise ValueError(f"{path}: header: the keys {missing} are missing; it needs {list(HEADER_KEYS)}")
    timestamp = header["timestamp_us"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise ValueError(f"{path}: header.timestamp_us: expected an integer (µs), got {timestamp!r}")
    grid = header["grid"]
    fields = sorted(geometry.GridSpec.__dataclass_fields__)
    if not isinstance(grid, dict) or sorted(grid) != fields:
        raise ValueError(f"{path}: header.grid: expected an object with the numbers {fields}, got {grid!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in grid.values()):
        raise ValueError(f"{path}: header.grid: expected numbers (m) for {fields}, got {grid!r}")
    try:
        spec = geometry.GridSpec(**grid)
    except ValueError as error:
        raise ValueError(f"{path}: header.grid: {error}") from None
    classes = header["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: header.classes: expected a non-empty list of class names, got {classes!r}")
    return {"timestamp_us": timestamp, "grid": spec, "classes": tuple(classes)}


def check_agent_inputs(batch: torch_dataset.WindowBatch, classes: int) -> None:
    """Refuse agents the model cannot forecast, naming the first one.

    The trajectory head reads each agent's t0 position and heading and its past positions; a NaN there becomes NaN
    trajectories and NaN occupancy, with no error. The forecast API does not guess: an agent with a non-finite t0
    box, a non-finite past position at a step its mask marks valid, or a class outside [0, ``classes``) is an
    error naming the window and the agent, and the caller drops or repairs it. Padding and masked past steps may
    hold anything.

    Args:
        batch: the windows (``agent_box`` [B, A, 7], ``agent_past`` [B, A, P, 2], ``agent_past_mask`` [B, A, P],
            ``agent_class`` [B, A], ``agent_mask`` [B, A]).
        classes: the model's class count.

    Raises:
        ValueError: ``window SCENE/SAMPLE: agent ID (index a) has ...``, and how many agents of the batch do.
    """
    mask = batch.agent_mask  # [B, A]
    box_bad = ~torch.isfinite(batch.agent_box).all(dim=-1) & mask  # [B, A]
    past_bad = (~torch.isfinite(batch.agent_past).all(dim=-1) & batch.agent_past_mask).any(dim=-1) & mask  # [B, A]
    class_bad = ((batch.agent_class < 0) | (batch.agent_class >= classes)) & mask  # [B, A]
    bad = box_bad | past_bad | class_bad
    if not bool(bad.any()):
        return
    b, a = (int(i) for i in bad.nonzero()[0])
    if box_bad[b, a]:
        what = f"a non-finite t0 box (x, y, z, w, l, h, yaw) {batch.agent_box[b, a].tolist()}"
    elif past_bad[b, a]:
        steps = (~torch.isfinite(batch.agent_past[b, a]).all(dim=-1) & batch.agent_past_mask[b, a]).nonzero()[:, 0]
        what = f"a non-finite past position at valid past steps {steps.tolist()} (t0 last)"
    else:
        what = f"class {int(batch.agent_class[b, a])} outside [0, {classes})"
    raise ValueError(
        f"window {batch.scene_names[b]}/{batch.sample_tokens[b]}: agent {batch.agent_ids[b][a]!r} (index {a}) has "
        f"{what}; the forecaster needs finite inputs for every agent: repair or drop it ({int(bad.sum())} agent(s) "
        "of the batch are affected)"
    )


class Forecaster:
    """A trained model behind the forecast API.

    Agents come from the sensors by default (``agents="tracked"``): the detection head runs on each input keyframe,
    ``tracking.track_window`` links the detections into tracks, and the trajectory head forecasts every track
    alive at t0, so a window without any annotation (``WindowSample.sensors_only``) gets a complete forecast.
    Over a stream (consecutive windows of a scene, each keyframe's ``frame_tokens`` known) a
    ``tracking.StreamTracker`` per scene keeps the track ids stable. ``agents="annotated"`` forecasts the window's
    annotated agents instead (the prediction-challenge protocol; see ``AGENT_SOURCES``).

    With ``cache_frames`` > 0 the forecaster keeps the encoded latents of the last ``cache_frames`` keyframes
    (by scene and sample token, ``WindowSample.frame_tokens``), so a stream of forecasts, each over the last P
    keyframes, encodes every keyframe once: a new forecast pays for one frame's cameras and LiDAR instead of P.
    The latents are the same as without the cache (a frame's own-frame latent does not depend on t0). It keeps
    each keyframe's detection too, from the forecast where that keyframe was the present, and the tracker of a
    later forecast reads it there instead of detecting the keyframe again (CenterPoint's streaming: each frame
    detected once). That detection fused the keyframe's whole history, where a window's earlier keyframes, detected
    from the window's own frames, have the oldest one standing in for those before it; so over a stream the
    tracks differ from cold forecasts': their earlier detections see as much as the present's.

    Each forecast encodes, rolls out and decodes the scene once (``BevJepa.scene``): its t0 detection feeds the
    tracker, which decodes only the earlier keyframes' detections (in one batched pass, coarse decoder levels
    only), and the trajectory head then runs on the tracks (``BevJepa.agent_modes``). ``reference=True`` keeps
    the path from before this sharing (each keyframe's detection decoded in full, one by one, and the scene
    predicted again for the trajectories): the same forecasts up to float noise, for tests and ``bench model``.

    Each moving track's velocity (and a standing pedestrian's or cyclist's) comes from its own LiDAR points, the
    motion that stacks its sweeps sharpest at t0 (``lidar_velocity``); ``velocity_from_points=False`` keeps the
    tracker's fit of detections (for a LiDAR whose points carry no time, and for comparisons).

    A window without agents gets a complete forecast with none (the latent occupancy beside an empty agent map).
    An annotated agent the model cannot forecast (a NaN or infinite t0 box or valid past position, a class out of
    range) is not dropped silently: ``forecast`` and ``forecast_batch`` raise ``ValueError`` naming the window and
    the agent (``check_agent_inputs``), and the caller decides (``bevjepa eval`` records the window as failed).

    ``bars`` (``from_checkpoint``: the run's ``forecast_bars.json``, None without) are the run's bars per step and
    class for reading a forecast's ``occupancy`` as cells: ``forecast.occupancy >= bars.array()[:, :, None, None]``.
    """

    STREAMS = 64
    """Scenes whose stream tracker is kept (least recently used dropped)."""

    def __init__(
        self,
        net,
        device: str | torch.device = "cpu",
        cache_frames: int = 0,
        agents: str = "tracked",
        min_score: float = tracking.MIN_SCORE,
        reference: bool = False,
        velocity_from_points: bool = True,
        bars: forecast_bars.ForecastBars | None = None,
    ) -> None:
        if agents not in AGENT_SOURCES:
            raise ValueError(f"Forecaster: agents must be one of {AGENT_SOURCES}, got {agents!r}")
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.cache_frames = cache_frames
        self.agents = agents
        self.min_score = min_score
        self.reference = reference
        self.velocity_from_points = velocity_from_points
        self.bars = bars
        self._cache: OrderedDict[tuple[str, str], model.FrameEncoding] = OrderedDict()
        # Each keyframe's detection from the forecast where it was the present: heat-map logits and regressions.
        self._detections: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._streams: OrderedDict[str, tuple[str, tracking.StreamTracker]] = OrderedDict()

    @staticmethod
    def from_checkpoint(
        run: Path,
        device: str | torch.device = "cpu",
        cache_frames: int = 0,
        agents: str = "tracked",
        min_score: float = tracking.MIN_SCORE,
        velocity_from_points: bool = True,
    ) -> Forecaster:
        """Load the model of a run folder (safetensors and JSON; nothing is unpickled), with its forecast bars."""
        _, net = checkpoint.load_model(run, device)
        bars = forecast_bars.ForecastBars.load(run)
        return Forecaster(
            net, device, cache_frames, agents, min_score, velocity_from_points=velocity_from_points, bars=bars
        )

    def encode_frames(self, batch: torch_dataset.WindowBatch) -> model.FrameEncoding:
        """The input frames' own-frame encodings (P frames), encoding only those not in the cache."""
        keys = self._frame_keys(batch)
        if keys is None:
            return self.net.encoder.encode_frames(model.SensorFrames.past(batch))
        missing = sorted({p for row in keys for p, key in enumerate(row) if key not in self._cache})
        if missing:
            frames = model.SensorFrames.past(batch)
            if len(missing) < frames.reference_from_ego.shape[1]:
                frames = model.select_frames(frames, missing)
            encoded = self.net.encoder.encode_frames(frames)  # S = len(missing)
            for b, row in enumerate(keys):
                for i, p in enumerate(missing):
                    self._cache.setdefault(row[p], encoded.frame(i).sample(b))
        own = model.FrameEncoding.stack(
            [model.FrameEncoding.stack([self._cache[key] for key in row], dim=1) for row in keys], dim=0
        )
        for row in keys:
            for key in row:
                self._cache.move_to_end(key)
        while len(self._cache) > max(self.cache_frames, len(keys[0]) * len(keys)):
            self._cache.popitem(last=False)
        return own

    def _frame_keys(self, batch: torch_dataset.WindowBatch) -> list[list[tuple[str, str]]] | None:
        """Each window's keyframes as (scene, token), oldest first; None without a cache or without every token."""
        if self.cache_frames <= 0 or not batch.frame_tokens or not all(batch.frame_tokens):
            return None
        return [
            [(scene, token) for token in tokens]
            for scene, tokens in zip(batch.scene_names, batch.frame_tokens, strict=True)
        ]

    def keyframe_detections(
        self,
        batch: torch_dataset.WindowBatch,
        own: model.FrameEncoding | None = None,
        scene: model.SceneOutput | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The detection head's output on every input keyframe, each in its own frame (what ``track`` decodes).

        Args:
            batch: the windows (on the forecaster's device); their annotations are not read.
            own: the input frames' encodings when already encoded.
            scene: the windows' scene when already predicted: its t0 detection is used, and only the earlier
                keyframes are decoded here.

        With the cache (``cache_frames``), each window's present detection is kept, and an earlier keyframe kept
        from the forecast where it was the present (this batch's windows included) is read, not detected again.

        Returns:
            heat-map logits [B, P, classes, h, w] and regressions [B, P, 10, h, w] (``BevJepa.detect_frames``).
        """
        own = self.encode_frames(batch) if own is None else own
        p = batch.t0_from_ego.shape[1]
        if self.reference:  # as before the speed work: a full decoder pass per keyframe, t0 included
            passes = [self.net.detect_frames(own, batch.t0_from_ego, [k], finest=0) for k in range(p)]
            return tuple(torch.cat(parts, dim=1) for parts in zip(*passes, strict=True))
        keys = self._frame_keys(batch)
        present = None if scene is None else (scene.heatmap_logits, scene.regression)  # [B, ...] each
        if present is not None and keys is None:  # no stream: the earlier keyframes from the window's frames
            if p == 1:
                return present[0][:, None], present[1][:, None]
            past = self.net.detect_frames(own, batch.t0_from_ego, list(range(p - 1)))
            return torch.cat([past[0], present[0][:, None]], 1), torch.cat([past[1], present[1][:, None]], 1)
        if keys is None:
            return self.net.detect_frames(own, batch.t0_from_ego, list(range(p)))
        # A stream: the present first (kept for later windows, this batch's too), then what the cache lacks.
        presents = {row[-1] for row in keys}
        wanted = sorted(
            {k for row in keys for k, key in enumerate(row[:-1]) if key not in self._detections and key not in presents}
        )
        if present is None:
            wanted.append(p - 1)
        detected = self.net.detect_frames(own, batch.t0_from_ego, wanted) if wanted else None  # [B, n, ...] each
        if present is None:
            present = (detected[0][:, -1], detected[1][:, -1])
        for b, row in enumerate(keys):
            self._detections[row[-1]] = (present[0][b], present[1][b])
            self._detections.move_to_end(row[-1])
        columns = {k: i for i, k in enumerate(wanted)}
        heatmaps, regressions = [], []
        for b, row in enumerate(keys):  # B windows × P keyframes: the kept copy, else the one just detected
            pick = [
                self._detections[key]
                if key in self._detections
                else (detected[0][b, columns[k]], detected[1][b, columns[k]])
                for k, key in enumerate(row[:-1])
            ] + [(present[0][b], present[1][b])]
            heatmaps.append(torch.stack([h for h, _ in pick]))
            regressions.append(torch.stack([r for _, r in pick]))
        while len(self._detections) > max(self.cache_frames, p * len(keys)):
            self._detections.popitem(last=False)
        return torch.stack(heatmaps), torch.stack(regressions)

    @torch.no_grad()
    def scene(self, batch: torch_dataset.WindowBatch) -> model.SceneOutput:
        """The windows' scene: encoded (through the frame cache), rolled out under the ego's motion, every step decoded.

        ``track`` and ``forecast_batch`` take it, so that scoring the tracked and the annotated agents of the same
        windows (``bevjepa eval``) predicts the scene once, not once per call. It reads no agent.
        """
        batch = batch.to(self.device)
        return self.net.scene(batch, None, self.encode_frames(batch))

    @torch.no_grad()
    def track(
        self,
        batch: torch_dataset.WindowBatch,
        own: model.FrameEncoding | None = None,
        scene: model.SceneOutput | None = None,
    ) -> list[tracking.TrackedAgents]:
        """The agents of each window, tracked from the model's own detections on its input keyframes.

        Vehicle boxes are then aligned to the dense occupancy at t0 (``tracking.align_to_occupancy``); without
        ``scene`` the t0 step alone is decoded for it. Last, each moving track (and each standing pedestrian and
        cyclist) takes the velocity under which its LiDAR points stack sharpest (``lidar_velocity.refine``), unless
        the forecaster was made with ``velocity_from_points=False``.

        Args: as ``keyframe_detections``.
        """
        if own is None:
            own = self.encode_frames(batch) if scene is None else scene.own
        if scene is None:
            scene = self.net.scene(batch, None, own, decode=(0,))
        present = self.net.occupancy_probability(scene.occupancy_logits[:, 0]).cpu().numpy()  # [B, C, H, W]
        heatmaps, regressions = self.keyframe_detections(batch, own, scene)
        p = heatmaps.shape[1]
        grid = self.net.detection.grid
        decoded = [
            heads.decode_detections(heatmaps[:, k], regressions[:, k], grid=grid, threshold=self.min_score)
            for k in range(p)
        ]  # [B, P, ...] each keyframe's in its own frame
        t0_from_ego = batch.t0_from_ego.cpu().numpy().astype(np.float64)  # [B, P, 4, 4]
        if self.velocity_from_points:
            points, owner = batch.points.cpu().numpy(), batch.points_batch.cpu().numpy()  # [M, 5], [M]
        result = []
        for b in range(batch.batch_size):
            frames = [
                tracking.FrameDetections.in_t0_frame(decoded[k].for_sample(b), t0_from_ego[b, k]) for k in range(p)
            ]
            agents = tracking.align_to_occupancy(
                tracking.track_window(frames, self.min_score), present[b], self.net.config.grid
            )
            agents = self._stream_ids(batch, b, agents)
            if self.velocity_from_points:
                agents = lidar_velocity.refine(agents, points[owner == b])
            result.append(agents)
        return result

    def _stream_ids(
        self, batch: torch_dataset.WindowBatch, b: int, agents: tracking.TrackedAgents
    ) -> tracking.TrackedAgents:
        """Stream ids for window ``b``'s agents: linked to its scene's previous window when that was t0 - 0.5 s."""
        scene, tokens = batch.scene_names[b], batch.frame_tokens[b] if batch.frame_tokens else ()
        previous_t0, tracker = self._streams.pop(scene, ("", tracking.StreamTracker()))
        linked = len(tokens) >= 2 and bool(previous_t0) and tokens[-2] == previous_t0
        t0_from_previous = batch.t0_from_ego[b, -2].cpu().numpy().astype(np.float64) if linked else None
        agents = tracker.update(agents, t0_from_previous)
        self._streams[scene] = (tokens[-1] if tokens else "", tracker)
        while len(self._streams) > self.STREAMS:
            self._streams.popitem(last=False)
        return agents

    def using(self, agents: str) -> Forecaster:
        """A forecaster of the same model with its agents from ``agents`` (``AGENT_SOURCES``) and this one's cache.

        Scoring both kinds of agent on the same windows then encodes each keyframe once.
        """
        other = Forecaster(
            self.net, self.device, self.cache_frames, agents, self.min_score, self.reference, self.velocity_from_points
        )
        other._cache, other._detections = self._cache, self._detections
        return other

    @torch.no_grad()
    def forecast_batch(
        self,
        batch: torch_dataset.WindowBatch,
        actions: torch.Tensor | None = None,
        tracks: list[tracking.TrackedAgents] | None = None,
        scene: model.SceneOutput | None = None,
    ) -> list[OccupancyForecast]:
        """Forecasts for every window of a batch; ``actions`` [B, F, 3] overrides the ego's future motion.

        A window without agents gets a forecast without agents (see ``OccupancyForecast``). ``tracks`` gives the
        windows' tracked agents when ``track`` already ran (tracked agents only); None tracks them here. ``scene``
        gives the batch's ``Forecaster.scene`` when already predicted (under the ego's own motion, so not with
        ``actions``); None predicts it here.

        Raises:
            ValueError: (annotated agents) an agent with a non-finite t0 box or past position, or a class out of
                range (``check_agent_inputs``); non-finite ``actions``; a ``scene`` with ``actions``, of another
                batch size or with steps left undecoded, or on the reference path.
        """
        if actions is not None and not bool(torch.isfinite(actions).all()):
            raise ValueError("forecast_batch: actions (dx, dy, dyaw per 0.5 s step) must be finite")
        if tracks is not None and (self.agents != "tracked" or len(tracks) != batch.batch_size):
            raise ValueError(f"forecast_batch: tracks are for tracked agents, one per window ({batch.batch_size})")
        if scene is not None and (
            actions is not None
            or self.reference
            or scene.decoded is not None
            or scene.latent.shape[0] != batch.batch_size
        ):
            raise ValueError(
                f"forecast_batch: scene must be this batch's Forecaster.scene ({batch.batch_size} windows, every "
                "step decoded, the ego's own motion: no actions), and the reference path predicts its own"
            )
        batch = batch.to(self.device)
        own = self.encode_frames(batch) if scene is None else scene.own
        scores: list[np.ndarray | None] = [None] * batch.batch_size
        if scene is None and not self.reference:
            scene = self.net.scene(batch, actions, own)
        if self.agents == "tracked":
            tracked = self.track(batch, own, scene) if tracks is None else tracks
            batch = with_agents(batch, tracked)
            scores = [agents.scores.astype(np.float32) for agents in tracked]
        else:
            check_agent_inputs(batch, self.net.config.classes)
        if scene is None:
            output = self.net(batch, actions=actions, own=own)
            occupancy_logits, (modes, mode_logits) = output.occupancy_logits, (output.modes, output.mode_logits)
        else:
            occupancy_logits, (modes, mode_logits) = scene.occupancy_logits, self.net.agent_modes(batch, scene)
        latent = self.net.occupancy_probability(occupancy_logits).cpu().numpy().astype(np.float32)  # [B, S, C, H, W]
        probabilities = torch.softmax(mode_logits, dim=-1).cpu().numpy().astype(np.float32)  # [B, A, K]
        modes = modes.cpu().numpy().astype(np.float32)  # [B, A, K, T, 2]
        config = self.net.config
        S, C = latent.shape[1:3]
        steps = np.arange(S, dtype=np.float32) * STEP_S
        trajectory_times = np.arange(1, config.trajectory_steps + 1, dtype=np.float32) * STEP_S
        results = []
        boxes = batch.agent_box.cpu().numpy().astype(np.float64)  # [B, A, 7]
        agent_classes = batch.agent_class.cpu().numpy()
        for b in range(batch.batch_size):
            count = int(batch.agent_mask[b].sum())
            existence = None if scores[b] is None else agent_occupancy.track_existence(
                scores[b], boxes[b, :count], agent_classes[b, :count], latent[b, 0], config.grid, S - 1
            )  # fmt: skip
            agents = agent_occupancy.mode_occupancy(
                boxes[b, :count], agent_classes[b, :count], modes[b, :count], probabilities[b, :count], config.grid,
                C, S - 1, existence=existence,
            )  # fmt: skip
            if self.agents == "annotated":
                occupancy = agents
            else:
                explained = agent_occupancy.track_footprint(
                    boxes[b, :count], agent_classes[b, :count], modes[b, :count], config.grid, C, S - 1
                )
                occupancy = agent_occupancy.fuse(agents, latent[b], explained)
            results.append(
                OccupancyForecast(
                    timestamp_us=batch.timestamps_us[b],
                    grid=self.net.config.grid,
                    classes=categories.CLASSES,
                    times_s=steps,
                    occupancy=occupancy,
                    agent_ids=np.array(batch.agent_ids[b], dtype=str).reshape(-1),
                    agent_classes=agent_classes[b, :count],
                    trajectory_times_s=trajectory_times,
                    trajectories=modes[b, :count],
                    mode_probabilities=probabilities[b, :count],
                    latent_occupancy=latent[b],
                    agent_boxes=boxes[b, :count].astype(np.float32),
                    agent_scores=scores[b],
                )
            )
        return results

    def forecast(self, window: torch_dataset.WindowSample, actions: np.ndarray | None = None) -> OccupancyForecast:
        """The forecast of one window; ``actions`` [F, 3] (dx, dy, dyaw per 0.5 s step) overrides the ego's motion."""
        batch = torch_dataset.collate([window])
        override = None if actions is None else torch.as_tensor(actions, dtype=torch.float32)[None]
        return self.forecast_batch(batch, override)[0]


def with_agents(batch: torch_dataset.WindowBatch, agents: list[tracking.TrackedAgents]) -> torch_dataset.WindowBatch:
    """The batch with its agent fields replaced by tracked agents (futures unknown: zero and masked out).

    An agent's past is where its track's motion puts it at every input keyframe (``TrackedAgents.motion_past``),
    so the trajectory head's anchor velocity is the track's velocity, not a difference of scattered detections.

    Args:
        batch: B windows.
        agents: each window's tracked agents, in the t0 ego frame.
    """
    b, t = batch.batch_size, batch.ego_future.shape[1]
    p = batch.t0_from_ego.shape[1]
    a_max = max((a.count for a in agents), default=0)
    device = batch.t0_from_ego.device
    box = torch.zeros(b, a_max, 7)
    velocity = torch.zeros(b, a_max, 2)
    past = torch.zeros(b, a_max, p, 2)
    past_mask = torch.zeros(b, a_max, p, dtype=torch.bool)
    classes = torch.zeros(b, a_max, dtype=torch.int64)
    for i, tracked in enumerate(agents):  # B windows
        n = tracked.count
        box[i, :n] = torch.as_tensor(tracked.boxes, dtype=torch.float32)
        velocity[i, :n] = torch.as_tensor(tracked.velocity, dtype=torch.float32)
        past[i, :n] = torch.as_tensor(tracked.motion_past(p), dtype=torch.float32)
        past_mask[i, :n] = True
        classes[i, :n] = torch.as_tensor(tracked.classes)
    counts = torch.tensor([a.count for a in agents])
    return dataclasses.replace(
        batch,
        agent_ids=tuple(tuple(a.ids.tolist()) for a in agents),
        agent_box=box.to(device),
        agent_velocity=velocity.to(device),
        agent_past=past.to(device),
        agent_past_mask=past_mask.to(device),
        agent_class=classes.to(device),
        agent_future=torch.zeros(b, a_max, t, 2, device=device),
        agent_future_mask=torch.zeros(b, a_max, t, dtype=torch.bool, device=device),
        agent_mask=(torch.arange(a_max)[None, :] < counts[:, None]).to(device),
    )


def _footprint_points(
    ego_trajectory: np.ndarray, length_m: float, width_m: float, rear_axle_to_center_m: float, samples: int
) -> tuple[np.ndarray, int]:
    """A ``samples`` × ``samples`` lattice over the ego's footprint at every pose.

    Args:
        ego_trajectory: [N, 3] float — x, y (m), yaw (rad) of the rear axle.
        length_m, width_m: the footprint (m), its centre ``rear_axle_to_center_m`` ahead of the pose.

    Returns:
        [N · Q, 2] float64 points (m, pose-major) and Q, the points per pose.
    """
    ego_trajectory = np.asarray(ego_trajectory, dtype=np.float64).reshape(-1, 3)
    along = np.linspace(-length_m / 2, length_m / 2, samples) + rear_axle_to_center_m
    across = np.linspace(-width_m / 2, width_m / 2, samples)
    local = np.stack(np.meshgrid(along, across, indexing="ij"), axis=-1).reshape(-1, 2)  # [Q, 2]
    cos, sin = np.cos(ego_trajectory[:, 2]), np.sin(ego_trajectory[:, 2])  # [N]
    x = ego_trajectory[:, None, 0] + cos[:, None] * local[None, :, 0] - sin[:, None] * local[None, :, 1]
    y = ego_trajectory[:, None, 1] + sin[:, None] * local[None, :, 0] + cos[:, None] * local[None, :, 1]
    return np.stack([x.ravel(), y.ravel()], axis=1), local.shape[0]
