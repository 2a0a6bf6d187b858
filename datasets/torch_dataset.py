"""Preprocessed windows as a torch ``Dataset``, and the batches a model trains on.

``WindowDataset`` reads what ``bevjepa preprocess`` wrote (``OUT/manifest.json``, one ``windows.Window`` per
window, one ``windows.Frame`` per keyframe) and turns a window into a ``WindowSample`` of tensors, its inputs
assembled in the t0 ego frame by ``windows.assemble_inputs``. ``collate`` stacks samples into a ``WindowBatch``:
fixed-size fields gain a leading batch dimension, the LiDAR points of all samples are concatenated with the index
of their sample (the layout of dynamic pillar and voxel encoders), and agents are padded to the largest count.

Consecutive windows of a scene share P-1 of their P frames, so each dataset copy (one per ``DataLoader`` worker)
keeps the last few frames it read in a small LRU cache.

Camera image size: all images of a dataset share one size (``preprocess`` resizes every camera to the same width
and nuScenes cameras share one aspect ratio). The dataset reads it once, from the JPEG header of the first present
camera among the first frames of its windows; where those have no camera at all it derives it from the manifest's
``image_width_px`` and the nuScenes 1600 x 900 aspect (what ``nuscenes_source`` produces), unless ``image_hw`` is
given. Every frame read is checked against it, so a frame of another size fails with its file named instead of
giving samples that cannot be stacked.

Notation:
    B  samples in a batch                  P  past keyframes, t0 last
    N  LiDAR points of one sample (all P keyframes)   M  points of a batch (the sum of the samples' N)
    T  trajectory steps (0.5 s each)       F  future occupancy steps
    C  classes (``categories.CLASSES``)    A  agents at t0 (in a batch: A_max, the most of any sample)
    Hc, Wc  camera image rows and columns  H, W  BEV rows and columns
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from bevjepa.datasets import preprocess, windows

NUSCENES_IMAGE_HW = (900, 1600)
"""Native nuScenes camera size (rows, columns): the aspect used when no stored image gives the size."""
IMAGE_SIZE_SCAN_FRAMES = 64
"""How many frames ``WindowDataset`` looks through for a present camera before deriving the image size."""

# Field specs: (shape, dtype); a str is a named dimension that must agree across fields.
_SAMPLE_SPEC: dict[str, tuple[tuple[int | str, ...], torch.dtype]] = {
    "points": (("N", 5), torch.float32),
    "points_frame": (("N",), torch.int64),
    "images": (("P", 6, 3, "Hc", "Wc"), torch.uint8),
    "camera_mask": (("P", 6), torch.bool),
    "intrinsics": (("P", 6, 3, 3), torch.float32),
    "t0_from_camera": (("P", 6, 4, 4), torch.float32),
    "t0_from_ego": (("P", 4, 4), torch.float32),
    "actions": (("S", 3), torch.float32),
    "action_mask": (("S",), torch.bool),
    "ego_future": (("T", 3), torch.float32),
    "ego_future_mask": (("T",), torch.bool),
    "agent_class": (("A",), torch.int64),
    "agent_box": (("A", 7), torch.float32),
    "agent_velocity": (("A", 2), torch.float32),
    "agent_past": (("A", "P", 2), torch.float32),
    "agent_past_mask": (("A", "P"), torch.bool),
    "agent_future": (("A", "T", 2), torch.float32),
    "agent_future_mask": (("A", "T"), torch.bool),
    "occupancy": (("F1", "C", "H", "W"), torch.bool),
    "instances": (("F1", "H", "W"), torch.int64),
    "observed": (("H", "W"), torch.bool),
}
_POINT_FIELDS = ("points", "points_frame")
_AGENT_FIELDS = (
    "agent_class",
    "agent_box",
    "agent_velocity",
    "agent_past",
    "agent_past_mask",
    "agent_future",
    "agent_future_mask",
)
_BATCH_SPEC: dict[str, tuple[tuple[int | str, ...], torch.dtype]] = {
    **{name: (("B", *shape), dtype) for name, (shape, dtype) in _SAMPLE_SPEC.items() if name not in _POINT_FIELDS},
    "points": (("M", 5), torch.float32),
    "points_frame": (("M",), torch.int64),
    "points_batch": (("M",), torch.int64),
    "agent_mask": (("B", "A"), torch.bool),
}


def _check_fields(owner: object, spec: dict[str, tuple[tuple[int | str, ...], torch.dtype]]) -> None:
    """Raise ``ValueError`` naming the field whose shape or dtype does not match ``spec``."""
    sizes: dict[str, int] = {}
    name_of = type(owner).__name__
    for name, (want, dtype) in spec.items():
        value = getattr(owner, name)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name_of}.{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != dtype:
            raise ValueError(f"{name_of}.{name} must be {dtype}, got {value.dtype}")
        shape = tuple(value.shape)
        expected = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in want)
        ok = len(shape) == len(want) and all(isinstance(e, str) or e == s for e, s in zip(expected, shape, strict=True))
        if not ok:
            raise ValueError(f"{name_of}.{name} has shape {list(shape)}, want {list(expected)}")
        for d, s in zip(want, shape, strict=True):
            if isinstance(d, str):
                sizes[d] = s


@dataclass(frozen=True)
class FutureInputs:
    """What the sensors saw at a window's F future keyframes, in the t0 ego frame: the JEPA target encoder's input.

    Attributes:
        points: [N, 5] float32 — x, y, z (m, t0 ego frame), intensity, time lag (s) behind the point's keyframe.
        points_frame: [N] int64 — the future keyframe of each point (0 = t0 + 0.5 s, ..., F-1).
        images: [F, 6, 3, Hc, Wc] uint8.
        camera_mask: [F, 6] bool.
        intrinsics: [F, 6, 3, 3] float32.
        t0_from_camera: [F, 6, 4, 4] float32.
        t0_from_ego: [F, 4, 4] float32 — the ego's pose at each future keyframe in the t0 ego frame.
    """

    points: torch.Tensor
    points_frame: torch.Tensor
    images: torch.Tensor
    camera_mask: torch.Tensor
    intrinsics: torch.Tensor
    t0_from_camera: torch.Tensor
    t0_from_ego: torch.Tensor


@dataclass(frozen=True)
class FutureBatch:
    """``FutureInputs`` of B windows: points concatenated with ``points_batch`` [M], the rest stacked on B."""

    points: torch.Tensor
    points_frame: torch.Tensor
    points_batch: torch.Tensor
    images: torch.Tensor
    camera_mask: torch.Tensor
    intrinsics: torch.Tensor
    t0_from_camera: torch.Tensor
    t0_from_ego: torch.Tensor

    def _map_tensors(self, fn) -> FutureBatch:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class WindowSample:
    """One training window as tensors, everything in the ego frame of t0 (see the module notation).

    Attributes:
        sample_token: the t0 keyframe.
        scene_name: its scene.
        timestamp_us: t0 (µs).
        agent_ids: [A] the agents' instance tokens.
        points: [N, 5] float32 — x, y, z (m, t0 ego frame), intensity, time lag (s) behind t0.
        points_frame: [N] int64 — the input keyframe of each point (0 = oldest, P-1 = t0).
        images: [P, 6, 3, Hc, Wc] uint8 — RGB, channels first, cameras in ``types.CAMERA_CHANNELS`` order; zeros
            where a camera is missing.
        camera_mask: [P, 6] bool — which cameras exist.
        intrinsics: [P, 6, 3, 3] float32 — pinhole matrices at the stored resolution (pixels); 0 where missing.
        t0_from_camera: [P, 6, 4, 4] float32 — camera poses in the t0 ego frame (m).
        t0_from_ego: [P, 4, 4] float32 — the ego's pose at each input keyframe in the t0 ego frame (m).
        actions: [P - 1 + T, 3] float32 — ego motion over each step (dx, dy in m, dyaw in rad) in the frame of
            the step's start: the P-1 past steps, then the T future ones; 0 where masked.
        action_mask: [P - 1 + T] bool.
        ego_future: [T, 3] float32 — the ego's future x, y (m) and yaw (rad).
        ego_future_mask: [T] bool.
        agent_class: [A] int64 — class index (``categories.CLASSES``).
        agent_box: [A, 7] float32 — x, y, z, width, length, height (m), yaw (rad) at t0.
        agent_velocity: [A, 2] float32 — vx, vy (m/s) at t0; NaN where unknown.
        agent_past: [A, P, 2] float32 — xy (m) at each input keyframe; 0 where masked.
        agent_past_mask: [A, P] bool.
        agent_future: [A, T, 2] float32 — xy (m) at each future step; 0 where masked.
        agent_future_mask: [A, T] bool.
        occupancy: [F + 1, C, H, W] bool — per-class occupancy at steps 0 (t0) to F.
        instances: [F + 1, H, W] int64 — 0 where free, else 1 + the instance's index: 1..A are the agents in
            agent order, larger values instances that appear only at future steps.
        observed: [H, W] bool — cells the LiDAR observed at t0.
        future: the future keyframes' sensor inputs, when the dataset was asked for them.
        frame_tokens: [P] the input keyframes' sample tokens, oldest first (empty where unknown); a stream of
            forecasts uses them to encode each keyframe once.
    """

    sample_token: str
    scene_name: str
    timestamp_us: int
    agent_ids: tuple[str, ...]
    points: torch.Tensor
    points_frame: torch.Tensor
    images: torch.Tensor
    camera_mask: torch.Tensor
    intrinsics: torch.Tensor
    t0_from_camera: torch.Tensor
    t0_from_ego: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    ego_future: torch.Tensor
    ego_future_mask: torch.Tensor
    agent_class: torch.Tensor
    agent_box: torch.Tensor
    agent_velocity: torch.Tensor
    agent_past: torch.Tensor
    agent_past_mask: torch.Tensor
    agent_future: torch.Tensor
    agent_future_mask: torch.Tensor
    occupancy: torch.Tensor
    instances: torch.Tensor
    observed: torch.Tensor
    future: FutureInputs | None = None
    frame_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_fields(self, _SAMPLE_SPEC)
        if self.frame_tokens and len(self.frame_tokens) != self.t0_from_ego.shape[0]:
            raise ValueError(
                f"WindowSample.frame_tokens has {len(self.frame_tokens)} tokens for {self.t0_from_ego.shape[0]} frames"
            )
        if self.actions.shape[0] != self.t0_from_ego.shape[0] - 1 + self.ego_future.shape[0]:
            raise ValueError(
                f"WindowSample.actions has {self.actions.shape[0]} steps, want P - 1 + T = "
                f"{self.t0_from_ego.shape[0] - 1 + self.ego_future.shape[0]}"
            )

    @property
    def agent_count(self) -> int:
        """A, the agents at t0."""
        return int(self.agent_class.shape[0])

    def sensors_only(self) -> WindowSample:
        """A copy with every annotation removed: what a car has at t0 (sweeps, images, its own poses and motion).

        The agents (A = 0), the occupancy and instance targets (F + 1 = 0 maps) and the future keyframes' sensor
        inputs (``future``: not yet seen at t0) are emptied; the points, images, calibration, the LiDAR-observed
        mask, the ego's poses and actions stay. A forecast of this copy uses nothing but the sensors.
        """
        p, t = self.t0_from_ego.shape[0], self.ego_future.shape[0]
        c, (h, w) = self.occupancy.shape[1], self.occupancy.shape[2:]
        return dataclasses.replace(
            self,
            agent_ids=(),
            agent_class=torch.zeros(0, dtype=torch.int64),
            agent_box=torch.zeros(0, 7),
            agent_velocity=torch.zeros(0, 2),
            agent_past=torch.zeros(0, p, 2),
            agent_past_mask=torch.zeros(0, p, dtype=torch.bool),
            agent_future=torch.zeros(0, t, 2),
            agent_future_mask=torch.zeros(0, t, dtype=torch.bool),
            occupancy=torch.zeros(0, c, h, w, dtype=torch.bool),
            instances=torch.zeros(0, h, w, dtype=torch.int64),
            future=None,
        )


@dataclass(frozen=True)
class WindowBatch:
    """B windows collated by ``collate`` (see ``WindowSample`` for each field's meaning and units).

    Attributes:
        sample_tokens: [B] the t0 keyframes.
        scene_names: [B] their scenes.
        timestamps_us: [B] their times (µs).
        agent_ids: [B] each sample's agent instance tokens (A of them, before padding).
        points: [M, 5] float32 — every sample's points, sample after sample (M = the sum of the samples' N).
        points_frame: [M] int64 — input keyframe of each point (0 = oldest, P-1 = t0).
        points_batch: [M] int64 — the sample (0..B-1) of each point; non-decreasing.
        images: [B, P, 6, 3, Hc, Wc] uint8.
        camera_mask: [B, P, 6] bool.
        intrinsics: [B, P, 6, 3, 3] float32.
        t0_from_camera: [B, P, 6, 4, 4] float32.
        t0_from_ego: [B, P, 4, 4] float32.
        actions: [B, P - 1 + T, 3] float32.
        action_mask: [B, P - 1 + T] bool.
        ego_future: [B, T, 3] float32.
        ego_future_mask: [B, T] bool.
        agent_mask: [B, A_max] bool — True for a sample's real agents (its first A), False for padding.
        agent_class: [B, A_max] int64 — 0 in padding.
        agent_box: [B, A_max, 7] float32 — 0 in padding.
        agent_velocity: [B, A_max, 2] float32 — NaN where unknown, 0 in padding.
        agent_past: [B, A_max, P, 2] float32 — 0 in padding.
        agent_past_mask: [B, A_max, P] bool — False in padding.
        agent_future: [B, A_max, T, 2] float32 — 0 in padding.
        agent_future_mask: [B, A_max, T] bool — False in padding.
        occupancy: [B, F + 1, C, H, W] bool.
        instances: [B, F + 1, H, W] int64 — 1..A of a sample are its agents, as in ``WindowSample``.
        observed: [B, H, W] bool.
        future: the future keyframes' sensor inputs, when the dataset was asked for them.
        frame_tokens: [B] each sample's input keyframe tokens (see ``WindowSample.frame_tokens``).
    """

    sample_tokens: tuple[str, ...]
    scene_names: tuple[str, ...]
    timestamps_us: tuple[int, ...]
    agent_ids: tuple[tuple[str, ...], ...]
    points: torch.Tensor
    points_frame: torch.Tensor
    points_batch: torch.Tensor
    images: torch.Tensor
    camera_mask: torch.Tensor
    intrinsics: torch.Tensor
    t0_from_camera: torch.Tensor
    t0_from_ego: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    ego_future: torch.Tensor
    ego_future_mask: torch.Tensor
    agent_mask: torch.Tensor
    agent_class: torch.Tensor
    agent_box: torch.Tensor
    agent_velocity: torch.Tensor
    agent_past: torch.Tensor
    agent_past_mask: torch.Tensor
    agent_future: torch.Tensor
    agent_future_mask: torch.Tensor
    occupancy: torch.Tensor
    instances: torch.Tensor
    observed: torch.Tensor
    future: FutureBatch | None = None
    frame_tokens: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        _check_fields(self, _BATCH_SPEC)
        if len(self.sample_tokens) != self.images.shape[0] or len(self.scene_names) != self.images.shape[0]:
            raise ValueError(
                f"WindowBatch has {len(self.sample_tokens)} sample_tokens and {len(self.scene_names)} "
                f"scene_names for a batch of {self.images.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.images.shape[0])

    def _map_tensors(self, fn) -> WindowBatch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        if self.future is not None:
            changes["future"] = self.future._map_tensors(fn)
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> WindowBatch:
        """A new batch with every tensor on ``device`` (``non_blocking`` for pinned memory to a GPU)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> WindowBatch:
        """A new batch in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map_tensors(lambda t: t.pin_memory())


def collate(samples: list[WindowSample]) -> WindowBatch:
    """Stack windows into a batch: points concatenated with their sample index, agents padded to A_max.

    Raises:
        ValueError: no samples, or samples whose fixed-size fields (P, T, F, image or grid size) differ.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    stacked = {}
    for name in _SAMPLE_SPEC:
        if name in _POINT_FIELDS or name in _AGENT_FIELDS:
            continue
        shapes = {tuple(getattr(s, name).shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"collate: samples disagree on the shape of {name}: {sorted(shapes)}")
        stacked[name] = torch.stack([getattr(s, name) for s in samples])  # [B, ...]
    counts = torch.tensor([s.points.shape[0] for s in samples])  # [B]
    agent_counts = torch.tensor([s.agent_count for s in samples])  # [B]
    a_max = int(agent_counts.max())
    padded = {
        name: pad_sequence([getattr(s, name) for s in samples], batch_first=True)  # [B, A_max, ...]
        for name in _AGENT_FIELDS
    }
    return WindowBatch(
        sample_tokens=tuple(s.sample_token for s in samples),
        scene_names=tuple(s.scene_name for s in samples),
        timestamps_us=tuple(s.timestamp_us for s in samples),
        agent_ids=tuple(s.agent_ids for s in samples),
        points=torch.cat([s.points for s in samples]),  # [M, 5]
        points_frame=torch.cat([s.points_frame for s in samples]),  # [M]
        points_batch=torch.repeat_interleave(torch.arange(len(samples)), counts),  # [M]
        agent_mask=torch.arange(a_max)[None, :] < agent_counts[:, None],  # [B, A_max]
        future=_collate_future([s.future for s in samples]),
        frame_tokens=tuple(s.frame_tokens for s in samples),
        **stacked,
        **padded,
    )


def _collate_future(futures: list[FutureInputs | None]) -> FutureBatch | None:
    """Batch the samples' future inputs (all present, or None)."""
    if any(f is None for f in futures):
        return None
    counts = torch.tensor([f.points.shape[0] for f in futures])
    return FutureBatch(
        points=torch.cat([f.points for f in futures]),  # [M, 5]
        points_frame=torch.cat([f.points_frame for f in futures]),  # [M]
        points_batch=torch.repeat_interleave(torch.arange(len(futures)), counts),  # [M]
        **{
            name: torch.stack([getattr(f, name) for f in futures])  # [B, F, ...]
            for name in ("images", "camera_mask", "intrinsics", "t0_from_camera", "t0_from_ego")
        },
    )


def _jpeg_hw(jpeg: np.ndarray, offsets: np.ndarray, camera_mask: np.ndarray) -> set[tuple[int, int]]:
    """The (H, W) of each present camera's JPEG, from its header (nothing is decoded)."""
    sizes = set()
    for c in np.flatnonzero(camera_mask):
        start, end = offsets[c]
        with Image.open(io.BytesIO(jpeg[start:end].tobytes())) as image:
            sizes.add((image.height, image.width))
    return sizes


def sample_from_window(
    window: windows.Window,
    frames: list[windows.Frame],
    image_hw: tuple[int, int],
    future: FutureInputs | None = None,
    cameras: bool = True,
) -> WindowSample:
    """A window and its P input frames (in ``window.keyframe_tokens`` order) as tensors in the t0 ego frame.

    Args:
        window: the window (targets and the input frames' names and poses).
        frames: its input frames.
        image_hw: (H, W) of the stored images, used where a camera is missing.
        future: the future frames' inputs, for the target encoder.
        cameras: decode the cameras (False: black images, every camera missing; ``windows.assemble_inputs``).
    """
    inputs = windows.assemble_inputs(window, frames, image_hw, cameras=cameras)
    return WindowSample(
        sample_token=str(window.sample_token),
        scene_name=str(window.scene_name),
        timestamp_us=int(window.timestamp_us),
        agent_ids=tuple(str(a) for a in window.agent_ids),
        points=torch.from_numpy(inputs.points),
        points_frame=torch.from_numpy(inputs.points_frame.astype(np.int64)),
        images=torch.from_numpy(inputs.images).permute(0, 1, 4, 2, 3).contiguous(),  # [P, 6, 3, Hc, Wc]
        camera_mask=torch.from_numpy(inputs.camera_mask),
        intrinsics=torch.from_numpy(inputs.intrinsics.astype(np.float32)),
        t0_from_camera=torch.from_numpy(inputs.t0_from_camera),
        t0_from_ego=torch.from_numpy(window.t0_from_ego.astype(np.float32)),
        actions=torch.from_numpy(window.actions.astype(np.float32)),
        action_mask=torch.from_numpy(window.action_mask),
        ego_future=torch.from_numpy(window.ego_future.astype(np.float32)),
        ego_future_mask=torch.from_numpy(window.ego_future_mask),
        agent_class=torch.from_numpy(window.agent_class.astype(np.int64)),
        agent_box=torch.from_numpy(window.agent_box.astype(np.float32)),
        agent_velocity=torch.from_numpy(window.agent_velocity.astype(np.float32)),
        agent_past=torch.from_numpy(window.agent_past.astype(np.float32)),
        agent_past_mask=torch.from_numpy(window.agent_past_mask),
        agent_future=torch.from_numpy(window.agent_future.astype(np.float32)),
        agent_future_mask=torch.from_numpy(window.agent_future_mask),
        occupancy=torch.from_numpy(window.occupancy),
        instances=torch.from_numpy(window.instances.astype(np.int64)),
        observed=torch.from_numpy(window.observed),
        future=future,
        frame_tokens=tuple(str(token) for token in window.keyframe_tokens),
    )


class WindowDataset(Dataset):
    """The windows of a ``bevjepa preprocess`` output as ``WindowSample``s.

    Args:
        root: the preprocessing output folder (holding ``manifest.json``).
        scenes: keep only the windows of these scenes (manifest order); None keeps all.
        image_hw: camera image size (H, W) in pixels; None reads it from the data (see the module docstring).
        frame_cache_size: frames kept in memory per dataset copy (one copy per ``DataLoader`` worker).
        future_inputs: also load the future keyframes' sensors (``WindowSample.future``), for JEPA training.
        cameras: decode the camera images; False gives black images with every camera marked missing, for a
            model that sees the LiDAR alone (decoding is most of the loading time).

    Raises:
        FileNotFoundError: ``root/manifest.json`` is missing.
        ValueError: the manifest is not a windows manifest of this format version, or a scene in ``scenes`` has
            no windows.
    """

    def __init__(
        self,
        root: Path,
        scenes: Sequence[str] | None = None,
        image_hw: tuple[int, int] | None = None,
        frame_cache_size: int = 8,
        future_inputs: bool = False,
        cameras: bool = True,
    ) -> None:
        self.root = Path(root)
        self.future_inputs = future_inputs
        self.cameras = cameras
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: run `bevjepa preprocess --out {self.root}` to write the windows first"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != preprocess.MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, want {preprocess.MANIFEST_FORMAT!r}")
        if manifest.get("format_version") != windows.FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {manifest.get('format_version')}; this version of "
                f"bevjepa reads {windows.FORMAT_VERSION}: rerun `bevjepa preprocess`"
            )
        self.manifest_path = manifest_path
        self.config: dict = manifest["config"]
        entries: list[dict] = manifest["windows"]
        if scenes is not None:
            wanted = set(scenes)
            missing = sorted(wanted - {e["scene"] for e in entries})
            if missing:
                raise ValueError(f"{manifest_path}: no windows of scenes {missing}")
            entries = [e for e in entries if e["scene"] in wanted]
        self.entries: tuple[dict, ...] = tuple(entries)
        if frame_cache_size < 0:
            raise ValueError(f"frame_cache_size must not be negative, got {frame_cache_size}")
        self.frame_cache_size = frame_cache_size
        self._frames: OrderedDict[Path, windows.Frame] = OrderedDict()
        self.image_hw = tuple(image_hw) if image_hw is not None else self._read_image_hw()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> WindowSample:
        entry = self.entries[index]
        window = self._load(windows.load_window, self.root / entry["file"], "window")
        frames = [self.frame(entry["scene"], str(token)) for token in window.keyframe_tokens]
        future = self._future(entry["scene"], window) if self.future_inputs else None
        return sample_from_window(window, frames, self.image_hw, future, self.cameras)

    def scene_batches(self, batch_size: int) -> Iterator[list[WindowSample]]:
        """The windows ``batch_size`` at a time, grouped by scene, each scene's in manifest (keyframe) order.

        The order in which a forecaster's tracks stream over a scene (``bevjepa preprocess`` writes a scene's
        windows in keyframe order). ``ceil(len(self) / batch_size)`` batches, each loaded when it is asked for.

        Raises:
            ValueError: a ``batch_size`` under 1 (at the call, not at the first batch).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(self.entries)), key=lambda i: self.entries[i]["scene"])
        return ([self[i] for i in order[first : first + batch_size]] for first in range(0, len(order), batch_size))

    def _future(self, scene: str, window: windows.Window) -> FutureInputs:
        frames = [self.frame(scene, str(token)) for token in window.future_keyframe_tokens]
        inputs = windows.assemble_inputs(window, frames, self.image_hw, future=True, cameras=self.cameras)
        return FutureInputs(
            points=torch.from_numpy(inputs.points),
            points_frame=torch.from_numpy(inputs.points_frame.astype(np.int64)),
            images=torch.from_numpy(inputs.images).permute(0, 1, 4, 2, 3).contiguous(),  # [F, 6, 3, Hc, Wc]
            camera_mask=torch.from_numpy(inputs.camera_mask),
            intrinsics=torch.from_numpy(inputs.intrinsics.astype(np.float32)),
            t0_from_camera=torch.from_numpy(inputs.t0_from_camera),
            t0_from_ego=torch.from_numpy(window.t0_from_future_ego.astype(np.float32)),
        )

    def frame_path(self, scene: str, token: str) -> Path:
        """Where the frame of keyframe ``token`` of ``scene`` is stored."""
        return self.root / "frames" / scene / f"{token}.npz"

    def frame(self, scene: str, token: str) -> windows.Frame:
        """The stored frame of keyframe ``token``, through the LRU cache; checks its image size."""
        path = self.frame_path(scene, token)
        if path in self._frames:
            self._frames.move_to_end(path)
            return self._frames[path]
        frame = self._load(windows.load_frame, path, "frame")
        sizes = _jpeg_hw(frame.camera_jpeg, frame.camera_offsets, frame.camera_mask)
        if sizes - {self.image_hw}:
            raise ValueError(
                f"{path}: camera images of size {sorted(sizes)} (H, W), but this dataset's images are {self.image_hw}"
            )
        if self.frame_cache_size > 0:
            self._frames[path] = frame
            while len(self._frames) > self.frame_cache_size:
                self._frames.popitem(last=False)
        return frame

    def _load(self, loader, path: Path, what: str):
        """``loader(path)``, with a missing file reported as part of this dataset."""
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: {what} listed in {self.manifest_path} is missing; the preprocessing "
                "output is incomplete (rerun `bevjepa preprocess` with the same --out)"
            )
        return loader(path)

    def _read_image_hw(self) -> tuple[int, int]:
        """The camera size: the first present camera among the first frames, else derived from the manifest."""
        scenes = dict.fromkeys(e["scene"] for e in self.entries)  # manifest order, once each
        paths = (path for scene in scenes for path in sorted((self.root / "frames" / scene).glob("*.npz")))
        for path in itertools.islice(paths, IMAGE_SIZE_SCAN_FRAMES):
            with np.load(path, allow_pickle=False) as data:  # only the members read here are decompressed
                mask = data["camera_mask"]
                if mask.any():
                    return min(_jpeg_hw(data["camera_jpeg"], data["camera_offsets"], mask))
        width = int(self.config["image_width_px"])
        return round(NUSCENES_IMAGE_HW[0] * width / NUSCENES_IMAGE_HW[1]), width


def loader_throughput(root: Path, batch_size: int = 4, num_workers: int = 0, epochs: int = 1) -> dict:
    """Windows per second that a ``DataLoader`` over ``WindowDataset`` with ``collate`` delivers, in this process.

    For comparison, the same windows read by a plain loop of ``windows.load_window`` and ``windows.load_frame``
    (every frame of every window, no cache, no assembly or image decoding, no tensors), timed right after.

    Returns:
        windows: windows per epoch; epochs; batch_size; num_workers;
        loader_s: wall time of all epochs through the ``DataLoader`` (worker start-up included);
        loader_first_batch_s: time to the first batch;
        loader_windows_per_s: windows / s through the ``DataLoader``;
        plain_s, plain_windows_per_s: the same for the plain loop;
        points_per_window: mean points per window.
    """
    dataset = WindowDataset(root)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, persistent_workers=num_workers > 0
    )
    start = time.perf_counter()
    first_batch_s, points = None, 0
    for _ in range(epochs):
        for batch in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - start
            points += batch.points.shape[0]
    loader_s = time.perf_counter() - start
    del loader

    start = time.perf_counter()
    for _ in range(epochs):
        for entry in dataset.entries:
            window = windows.load_window(dataset.root / entry["file"])
            for token in window.keyframe_tokens:
                windows.load_frame(dataset.frame_path(entry["scene"], str(token)))
    plain_s = time.perf_counter() - start
    count = len(dataset) * epochs
    return {
        "windows": len(dataset),
        "epochs": epochs,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "loader_s": loader_s,
        "loader_first_batch_s": first_batch_s,
        "loader_windows_per_s": count / loader_s,
        "plain_s": plain_s,
        "plain_windows_per_s": count / plain_s,
        "points_per_window": points / max(count, 1),
    }
