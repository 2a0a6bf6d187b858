"""Training windows and their targets, in the ego frame of the present keyframe t0.

A window holds the past P keyframes (t0 included) as inputs (LiDAR aggregated per keyframe, six cameras each),
the ego's motion between steps (the actions), and the targets: every agent's future xy over T steps with masks,
per-class BEV occupancy and instance ids for steps 0..F rasterized from box footprints on the ``GridSpec``, and
the cells the LiDAR observed at t0.

Storage: the inputs of a keyframe are stored once, as a ``Frame`` (its aggregated LiDAR in its own ego frame, its
cameras as JPEG bytes), since every keyframe is an input of P windows; a ``Window`` holds the targets and names
its P frames. Both are ``.npz`` files read without pickle. ``assemble_inputs`` moves a window's frames into t0.

Notation:
    P  past keyframes, t0 last            T  trajectory steps (0.5 s each)
    F  future occupancy steps             C  classes (``categories.CLASSES``)
    A  agents annotated at t0             I  instances seen in any occupancy step (the A agents first)
    N  LiDAR points (all P keyframes)      H, W  BEV rows and columns
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from bevjepa.datasets import categories, geometry, nuscenes_source, rasterize, types
from bevjepa.datasets import io as bevio

KEYFRAME_INTERVAL_US = 500_000
"""nuScenes keyframes are 0.5 s apart."""
FORMAT_VERSION = 2


@dataclass(frozen=True)
class WindowConfig:
    """What a window holds.

    Attributes:
        past_keyframes: P, the input keyframes including t0 (3 = the past 1 s).
        occupancy_steps: F, future occupancy steps (4 = 2 s, as FIERY).
        trajectory_steps: T, future trajectory steps (12 = 6 s, as the nuScenes prediction challenge).
        grid: the BEV grid of the targets; LiDAR points outside it are dropped.
        voxel_size_m: if positive, each keyframe's aggregated points are voxel-downsampled (averaging the points
            that share a voxel); 0 keeps every point.
        frame_margin_m: a frame keeps the points within the grid's reach plus this margin (m), so that past frames
            still cover the grid once moved into t0.
        jpeg_quality: quality of the stored camera JPEGs.
    """

    past_keyframes: int = 3
    occupancy_steps: int = 4
    trajectory_steps: int = 12
    grid: geometry.GridSpec = field(default_factory=geometry.GridSpec)
    voxel_size_m: float = 0.2
    frame_margin_m: float = 20.0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name in ("past_keyframes", "occupancy_steps", "trajectory_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"WindowConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.voxel_size_m < 0:
            raise ValueError(f"WindowConfig.voxel_size_m must not be negative, got {self.voxel_size_m}")


@dataclass(frozen=True)
class Frame:
    """The stored inputs of one keyframe, in its own ego frame.

    Attributes:
        sample_token: the keyframe.
        scene_name: its scene.
        timestamp_us: its time (µs).
        global_from_ego: [4, 4] float64 — the ego pose at ``timestamp_us``.
        points: [N, 5] float32 — x, y, z (m, this keyframe's ego frame), intensity, time lag (s) behind it.
        camera_jpeg: [bytes] uint8 — the six images' JPEG files, concatenated.
        camera_offsets: [6, 2] int64 — start and end of each image in ``camera_jpeg`` (0, 0 where missing).
        camera_mask: [6] bool — which cameras exist, in ``types.CAMERA_CHANNELS`` order.
        intrinsics: [6, 3, 3] float32 — pinhole matrices at the stored resolution (pixels).
        ego_from_camera: [6, 4, 4] float32 — each camera's pose at its own timestamp, in this keyframe's ego frame.
        bad_inputs: JSON list of {file, reason}: what was missing or damaged.
    """

    sample_token: str
    scene_name: str
    timestamp_us: int
    global_from_ego: np.ndarray
    points: np.ndarray
    camera_jpeg: np.ndarray
    camera_offsets: np.ndarray
    camera_mask: np.ndarray
    intrinsics: np.ndarray
    ego_from_camera: np.ndarray
    bad_inputs: str

    def image(self, camera: int) -> np.ndarray | None:
        """The decoded image [H, W, 3] uint8 of camera ``camera``, or None if it is missing."""
        if not self.camera_mask[camera]:
            return None
        start, end = self.camera_offsets[camera]
        try:
            with Image.open(io.BytesIO(self.camera_jpeg[start:end].tobytes())) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:  # a damaged frame file: name it, not the memory buffer
            raise ValueError(
                f"frame {self.sample_token} ({self.scene_name}): stored {types.CAMERA_CHANNELS[camera]} JPEG "
                f"(bytes {start}-{end}) cannot be decoded: {type(error).__name__}: "
                f"{'unrecognised image data' if isinstance(error, Image.UnidentifiedImageError) else error}; "
                "rerun bevjepa preprocess into a new --out"
            ) from None


@dataclass(frozen=True)
class Window:
    """One training window: its input frames by name, and its targets (see the module notation), in t0's frame.

    Attributes:
        sample_token: the t0 keyframe.
        scene_name: its scene.
        timestamp_us: t0 (µs).
        keyframe_tokens: [P] str — the input frames, oldest first (t0 last).
        t0_from_ego: [P, 4, 4] float64 — the ego's pose at each input keyframe, in the t0 ego frame.
        future_keyframe_tokens: [F] str — the frames of the F future keyframes (for the JEPA target encoder, which
            encodes what the sensors saw there; never a model input at inference).
        t0_from_future_ego: [F, 4, 4] float64 — the ego's pose at each future keyframe, in the t0 ego frame.
        ego_future: [T, 3] float32 — the ego's future x, y (m) and yaw (rad).
        ego_future_mask: [T] bool — where the scene still has a keyframe.
        actions: [P - 1 + T, 3] float32 — ego motion over each step (dx, dy in m, dyaw in rad) in the frame of the
            step's start: the P-1 past steps, then the T future ones; 0 where masked.
        action_mask: [P - 1 + T] bool.
        agent_ids: [A] str — instance tokens of the agents annotated at t0.
        agent_class: [A] int8 — class index (``categories.CLASSES``).
        agent_box: [A, 7] float32 — x, y, z, width, length, height (m), yaw (rad) at t0.
        agent_velocity: [A, 2] float32 — vx, vy (m/s) at t0; NaN where unknown.
        agent_past: [A, P, 2] float32 — xy (m) at each input keyframe.
        agent_past_mask: [A, P] bool.
        agent_future: [A, T, 2] float32 — xy (m) at each future step.
        agent_future_mask: [A, T] bool.
        occupancy: [F + 1, C, H, W] bool — steps 0 (t0) to F.
        instance_ids: [I] str — the instance tokens that ``instances`` refers to.
        instances: [F + 1, H, W] int32 — 1 + index into ``instance_ids``, 0 where free.
        observed: [H, W] bool — cells the LiDAR observed at t0.
    """

    sample_token: str
    scene_name: str
    timestamp_us: int
    keyframe_tokens: np.ndarray
    t0_from_ego: np.ndarray
    future_keyframe_tokens: np.ndarray
    t0_from_future_ego: np.ndarray
    ego_future: np.ndarray
    ego_future_mask: np.ndarray
    actions: np.ndarray
    action_mask: np.ndarray
    agent_ids: np.ndarray
    agent_class: np.ndarray
    agent_box: np.ndarray
    agent_velocity: np.ndarray
    agent_past: np.ndarray
    agent_past_mask: np.ndarray
    agent_future: np.ndarray
    agent_future_mask: np.ndarray
    occupancy: np.ndarray
    instance_ids: np.ndarray
    instances: np.ndarray
    observed: np.ndarray


def _save(value: Frame | Window, path: Path) -> int:
    """Write a frame or window atomically; returns the bytes written.

    ``io.atomic_write_with``: no temporary file survives a failure (e.g. a full disk), and the temporary file is one
    per process, as two tasks may write the same frame.
    """
    arrays = {"format_version": np.int64(FORMAT_VERSION)}
    arrays.update({f.name: np.asarray(getattr(value, f.name)) for f in fields(value)})
    sizes = []

    def write(tmp: Path) -> None:
        # An .npz as numpy writes it, with the fastest deflate level: level 6 (savez_compressed) spends three times
        # as long for files a few percent smaller.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
        sizes.append(tmp.stat().st_size)

    bevio.atomic_write_with(Path(path), write)
    return sizes[0]


def _load(cls: type, path: Path) -> Frame | Window:
    with np.load(path, allow_pickle=False) as data:
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format {version}; this version of bevjepa reads {FORMAT_VERSION}")
        values = {f.name: data[f.name] for f in fields(cls)}
    for name, value in values.items():
        if value.ndim == 0:
            values[name] = value.item()
    return cls(**values)


def save_frame(frame: Frame, path: Path) -> int:
    """Write a frame atomically; returns the bytes written."""
    return _save(frame, path)


def load_frame(path: Path) -> Frame:
    """Read a frame written by ``save_frame`` (never unpickles)."""
    return _load(Frame, path)  # type: ignore[return-value]


def save_window(window: Window, path: Path) -> int:
    """Write a window atomically; returns the bytes written."""
    return _save(window, path)


def load_window(path: Path) -> Window:
    """Read a window written by ``save_window`` (never unpickles)."""
    return _load(Window, path)  # type: ignore[return-value]


def window_sample_tokens(scene_tokens: list[str], config: WindowConfig) -> list[int]:
    """Indices (into a scene's keyframes) of the t0s that have P-1 past and F future keyframes."""
    last = len(scene_tokens) - 1 - config.occupancy_steps
    return list(range(config.past_keyframes - 1, last + 1))


def voxel_downsample(points: np.ndarray, voxel_size_m: float) -> np.ndarray:
    """Average the points that share a voxel (every column: position, intensity, time lag).

    Numpy and a hash factorization (``pandas.factorize``) of the voxel keys, then weighted bincounts: the same
    voxels, the same sums in the same order and so the same bytes as ``voxel_downsample_reference`` (a sort of
    every key), two to three times faster, and several times faster than open3d's ``voxel_down_sample``
    (``voxel_downsample_open3d``).

    Args:
        points: [N, 5] float32 — x, y, z (m), intensity, time lag (s).
        voxel_size_m: voxel edge (m).

    Returns:
        [M, 5] float32, M <= N, in the order of the voxels' keys.
    """
    import pandas  # a dependency already (Ray Train's); imported here so that loading windows does not need it

    if len(points) == 0:
        return points
    # Column by column: on the [N, 3] view of an [N, 5] array numpy's inner loops run three elements long.
    cells = [np.floor(points[:, k] / voxel_size_m).astype(np.int64) for k in range(3)]  # 3 x [N]
    cells = [c - c.min() for c in cells]
    span = [c.max() + 1 for c in cells]
    keys = (cells[0] * span[1] + cells[1]) * span[2] + cells[2]  # [N], ordered as (x, y, z) cells
    if int(span[0]) * int(span[1]) * int(span[2]) <= np.iinfo(np.int32).max:
        keys = keys.astype(np.int32)  # the same keys; a 4-byte hash table is faster
    # Each point's voxel numbered in key order (np.unique's return_inverse): a hash pass over the N keys and a sort
    # of the M distinct ones, instead of a sort of all N.
    first_seen, voxel_keys = pandas.factorize(keys, sort=False)  # [N] voxel in order of first appearance, [M] keys
    order = np.argsort(voxel_keys)  # [M]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    inverse = rank[first_seen]  # [N]
    counts = np.bincount(inverse, minlength=len(voxel_keys))  # [M]
    return _voxel_means(points, inverse, counts)


def voxel_downsample_reference(points: np.ndarray, voxel_size_m: float) -> np.ndarray:
    """``voxel_downsample`` as it was first written (``np.unique`` of the keys): kept as its reference.

    ``bevjepa bench preprocess`` times preprocessing with it (``WindowBuilder(reference=True)``) against the faster
    one, and a test checks that both give the same bytes.
    """
    if len(points) == 0:
        return points
    cells = np.floor(points[:, :3] / voxel_size_m).astype(np.int64)  # [N, 3]
    cells -= cells.min(axis=0)
    span = cells.max(axis=0) + 1
    keys = (cells[:, 0] * span[1] + cells[:, 1]) * span[2] + cells[:, 2]  # [N]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return _voxel_means(points, inverse, counts)


def _voxel_means(points: np.ndarray, inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[M, 5] float32 — the mean of each column over the points of each voxel.

    Args:
        points: [N, 5] float32.
        inverse: [N] int — each point's voxel in [0, M).
        counts: [M] int — the points of each voxel.
    """
    out = np.empty((len(counts), points.shape[1]), dtype=np.float32)
    for column in range(points.shape[1]):  # five columns, not points
        out[:, column] = np.bincount(inverse, weights=points[:, column], minlength=len(counts)) / counts
    return out


def voxel_downsample_open3d(points: np.ndarray, voxel_size_m: float) -> np.ndarray:
    """The same as ``voxel_downsample`` with open3d's tensor ``voxel_down_sample`` (kept for the benchmark)."""
    import open3d as o3d

    if len(points) == 0:
        return points
    cloud = o3d.t.geometry.PointCloud(o3d.core.Tensor(np.ascontiguousarray(points[:, :3])))
    cloud.point["intensity"] = o3d.core.Tensor(np.ascontiguousarray(points[:, 3:4]))
    cloud.point["lag"] = o3d.core.Tensor(np.ascontiguousarray(points[:, 4:5]))
    down = cloud.voxel_down_sample(voxel_size_m)
    return np.concatenate(
        [down.point.positions.numpy(), down.point["intensity"].numpy(), down.point["lag"].numpy()], axis=1
    ).astype(np.float32)


def build_frame(keyframe: nuscenes_source.Keyframe, config: WindowConfig, reference: bool = False) -> Frame:
    """A keyframe's stored inputs: its LiDAR cropped (and voxel-downsampled), its cameras as JPEG.

    Args:
        keyframe: the keyframe.
        config: the window layout (the grid and margin to crop to, the voxel size, the JPEG quality).
        reference: crop and downsample as first written (boolean row indexing, ``voxel_downsample_reference``);
            the same bytes, slower: for ``bevjepa bench preprocess`` and the test that compares the two.
    """
    points = keyframe.lidar_points
    reach = (
        max(abs(config.grid.x_min_m), abs(config.grid.x_max_m), abs(config.grid.y_min_m), abs(config.grid.y_max_m))
        + config.frame_margin_m
    )
    inside = (np.abs(points[:, 0]) <= reach) & (np.abs(points[:, 1]) <= reach)  # [N]
    # np.compress picks the same rows as boolean indexing, four times faster on an [N, 5] array.
    points = points[inside] if reference else np.compress(inside, points, axis=0)
    if config.voxel_size_m > 0:
        points = (voxel_downsample_reference if reference else voxel_downsample)(points, config.voxel_size_m)
    jpeg, offsets = bytearray(), np.zeros((6, 2), dtype=np.int64)
    camera_mask = np.zeros(6, dtype=bool)
    intrinsics = np.zeros((6, 3, 3), dtype=np.float32)
    ego_from_camera = np.tile(np.eye(4, dtype=np.float32), (6, 1, 1))
    ego_from_global = keyframe.global_from_ego.inverse()
    for image in keyframe.cameras:
        c = types.CAMERA_CHANNELS.index(image.channel)
        buffer = io.BytesIO()
        Image.fromarray(image.image).save(buffer, format="JPEG", quality=config.jpeg_quality)
        offsets[c] = (len(jpeg), len(jpeg) + buffer.tell())
        jpeg.extend(buffer.getvalue())
        camera_mask[c] = True
        intrinsics[c] = image.intrinsics
        ego_from_camera[c] = (ego_from_global @ image.global_from_ego @ image.ego_from_camera).matrix
    return Frame(
        sample_token=keyframe.sample_token,
        scene_name=keyframe.scene_name,
        timestamp_us=keyframe.timestamp_us,
        global_from_ego=keyframe.global_from_ego.matrix,
        points=points.astype(np.float32),
        camera_jpeg=np.frombuffer(bytes(jpeg), dtype=np.uint8),
        camera_offsets=offsets,
        camera_mask=camera_mask,
        intrinsics=intrinsics,
        ego_from_camera=ego_from_camera,
        bad_inputs=json.dumps([{"file": b.file, "reason": b.reason} for b in keyframe.bad_inputs]),
    )


@dataclass(frozen=True)
class _EgoTargets:
    """The ego's part of a window (``Window.ego_future``, ``ego_future_mask``, ``actions``, ``action_mask``).

    Attributes:
        future: [T, 3] float32 — future x, y (m) and yaw (rad) in t0.
        future_mask: [T] bool.
        actions: [P - 1 + T, 3] float32 — dx, dy (m), dyaw (rad) over each step; 0 where masked.
        action_mask: [P - 1 + T] bool.
    """

    future: np.ndarray
    future_mask: np.ndarray
    actions: np.ndarray
    action_mask: np.ndarray


@dataclass(frozen=True)
class _AgentTracks:
    """The tracks of the agents annotated at t0 (``Window.agent_past``, ``agent_future`` and their masks).

    Attributes:
        past: [A, P, 2] float32 — xy (m, t0) at each input keyframe.
        past_mask: [A, P] bool.
        future: [A, T, 2] float32 — xy (m, t0) at each future step.
        future_mask: [A, T] bool.
    """

    past: np.ndarray
    past_mask: np.ndarray
    future: np.ndarray
    future_mask: np.ndarray


class WindowBuilder:
    """Builds the frames and windows of one scene from a ``NuScenesSource``, reading each keyframe once.

    A run of consecutive windows shares its keyframes, so what they need is read once and kept while a window may
    still need it: a keyframe (LiDAR and cameras) from the frame that first needs it (as the F-th future frame of a
    window) to the window whose t0 it is (P + F + 1 keyframes), the boxes of the last 2 (P + T) keyframes, and every
    ego pose of the scene. A window whose t0 keyframe is no longer kept (its frame was built by an earlier task)
    reads the t0 LiDAR alone, not the cameras.

    ``reference=True`` builds as first written (P + 1 keyframes kept, each read whole with its boxes, the t0
    keyframe read again for its window, ``build_frame(reference=True)``, ``rasterize.observed_cells_reference``):
    the same bytes, slower; ``bevjepa bench preprocess`` times both and a test compares them.
    """

    def __init__(self, source: nuscenes_source.NuScenesSource, config: WindowConfig, reference: bool = False) -> None:
        self.source = source
        self.config = config
        self.reference = reference
        self._keyframes: dict[str, nuscenes_source.Keyframe] = {}
        self._keyframes_kept = config.past_keyframes + 1 + (0 if reference else config.occupancy_steps)
        self._boxes: dict[str, dict[str, types.Box3D]] = {}
        self._poses: dict[str, tuple[int, geometry.RigidTransform]] = {}

    def keyframe(self, token: str) -> nuscenes_source.Keyframe:
        """The source's keyframe, cached for the last few tokens (without its boxes unless ``reference``)."""
        if token not in self._keyframes:
            if len(self._keyframes) >= self._keyframes_kept:
                self._keyframes.pop(next(iter(self._keyframes)))
            self._keyframes[token] = self.source.keyframe(token, with_boxes=self.reference)
        return self._keyframes[token]

    def frame(self, token: str) -> Frame:
        """The stored inputs of keyframe ``token``."""
        return build_frame(self.keyframe(token), self.config, reference=self.reference)

    def _global_boxes(self, token: str) -> dict[str, types.Box3D]:
        """The sample's boxes of predicted classes in the global frame, by instance token (cached)."""
        if token not in self._boxes:
            if len(self._boxes) > 2 * (self.config.past_keyframes + self.config.trajectory_steps):
                self._boxes.pop(next(iter(self._boxes)))
            boxes = self.source.boxes(token, geometry.RigidTransform.identity())
            self._boxes[token] = {b.instance_id: b for b in boxes}
        return self._boxes[token]

    def _ego_pose(self, token: str) -> tuple[int, geometry.RigidTransform]:
        """``source.ego_pose``, kept for the scene (a window asks for P + T of them, each of P + T windows)."""
        if self.reference:
            return self.source.ego_pose(token)
        if token not in self._poses:
            self._poses[token] = self.source.ego_pose(token)
        return self._poses[token]

    def _t0_lidar(self, token: str) -> np.ndarray:
        """[N, 5] float32 — the keyframe's aggregated LiDAR (``Keyframe.lidar_points``), for its window's targets."""
        if self.reference or token in self._keyframes:
            return self.keyframe(token).lidar_points
        return self.source.aggregate_lidar(token, [])  # its frame exists: the LiDAR alone, no cameras

    def window(self, scene_tokens: list[str], index: int) -> Window:
        """The window (targets) whose t0 is ``scene_tokens[index]``."""
        config = self.config
        p_count, t_count, f_count = config.past_keyframes, config.trajectory_steps, config.occupancy_steps
        t0_token = scene_tokens[index]
        past_tokens = scene_tokens[index - p_count + 1 : index + 1]
        future_tokens = scene_tokens[index + 1 : index + 1 + max(t_count, f_count)]
        occupancy_tokens = future_tokens[:f_count]
        t0_timestamp, global_from_t0 = self._ego_pose(t0_token)
        t0_from_global = global_from_t0.inverse()
        t0_from_ego = np.stack([(t0_from_global @ self._ego_pose(t)[1]).matrix for t in past_tokens])

        ego = self._ego_targets(t0_from_ego, future_tokens, t0_from_global)
        agents = [b.transformed(t0_from_global) for b in self._global_boxes(t0_token).values()]  # the A agents at t0
        tracks = self._agent_tracks(agents, past_tokens, future_tokens, t0_from_global, t0_timestamp)
        occupancy, instance_ids, instances = self._occupancy(agents, occupancy_tokens, t0_from_global)
        observed = (rasterize.observed_cells_reference if self.reference else rasterize.observed_cells)(
            config.grid, self._t0_lidar(t0_token)[:, :2], self._lidar_xy(t0_token)
        )
        return Window(
            sample_token=t0_token,
            scene_name=self.keyframe(t0_token).scene_name if self.reference else self.source.scene_name(t0_token),
            timestamp_us=t0_timestamp,
            keyframe_tokens=np.array(past_tokens),
            t0_from_ego=t0_from_ego,
            future_keyframe_tokens=np.array(occupancy_tokens),
            t0_from_future_ego=np.stack([(t0_from_global @ self._ego_pose(t)[1]).matrix for t in occupancy_tokens]),
            ego_future=ego.future,
            ego_future_mask=ego.future_mask,
            actions=ego.actions,
            action_mask=ego.action_mask,
            agent_ids=np.array([b.instance_id for b in agents], dtype="U64").reshape(-1),
            agent_class=np.array([categories.class_index(b.category) for b in agents], dtype=np.int8),
            agent_box=np.array([[*b.center_m, *b.size_wlh_m, b.yaw_rad] for b in agents], dtype=np.float32).reshape(
                -1, 7
            ),
            agent_velocity=np.array([b.velocity_mps for b in agents], dtype=np.float32).reshape(-1, 2),
            agent_past=tracks.past,
            agent_past_mask=tracks.past_mask,
            agent_future=tracks.future,
            agent_future_mask=tracks.future_mask,
            occupancy=occupancy,
            instance_ids=np.array(instance_ids, dtype="U64").reshape(-1),
            instances=instances,
            observed=observed,
        )

    def _ego_targets(
        self, t0_from_ego: np.ndarray, future_tokens: list[str], t0_from_global: geometry.RigidTransform
    ) -> _EgoTargets:
        """The ego's future poses (x, y, yaw) in t0, and the actions between consecutive past and future steps.

        Args:
            t0_from_ego: [P, 4, 4] — the ego's pose at each input keyframe, in t0.
            future_tokens: the keyframes after t0 (up to max(T, F) of them; the first T are used).
            t0_from_global: the t0 ego frame from the global frame.
        """
        p_count, t_count = self.config.past_keyframes, self.config.trajectory_steps
        past_pose = geometry.planar_pose(t0_from_ego)  # [P, 3]
        ego_future = np.zeros((t_count, 3))
        ego_future_mask = np.zeros(t_count, dtype=bool)
        for k, token in enumerate(future_tokens[:t_count]):
            pose = t0_from_global @ self._ego_pose(token)[1]
            ego_future[k] = (pose.translation[0], pose.translation[1], pose.yaw_rad)
            ego_future_mask[k] = True
        sequence = np.concatenate([past_pose, ego_future])  # [P + T, 3]
        action_mask = np.concatenate([np.ones(p_count - 1, dtype=bool), ego_future_mask])  # [P - 1 + T]
        actions = np.where(action_mask[:, None], geometry.ego_motion(sequence[:-1], sequence[1:]), 0.0)
        return _EgoTargets(
            future=ego_future.astype(np.float32),
            future_mask=ego_future_mask,
            actions=actions.astype(np.float32),
            action_mask=action_mask,
        )

    def _agent_tracks(
        self,
        agents: list[types.Box3D],
        past_tokens: list[str],
        future_tokens: list[str],
        t0_from_global: geometry.RigidTransform,
        t0_timestamp: int,
    ) -> _AgentTracks:
        """Where each agent annotated at t0 is (xy in t0) at the input keyframes and the T future steps.

        A future keyframe's step is counted from its timestamp (keyframes 0.5 s apart), not from its position.
        """
        p_count, t_count = self.config.past_keyframes, self.config.trajectory_steps
        agent_ids = [b.instance_id for b in agents]
        agent_past = np.zeros((len(agents), p_count, 2))
        agent_past_mask = np.zeros((len(agents), p_count), dtype=bool)
        for p, token in enumerate(past_tokens):
            by_instance = self._global_boxes(token)
            for a, instance in enumerate(agent_ids):  # agents, not points or cells
                if instance in by_instance:
                    agent_past[a, p] = t0_from_global.apply(by_instance[instance].center_m)[:2]
                    agent_past_mask[a, p] = True
        agent_future = np.zeros((len(agents), t_count, 2))
        agent_future_mask = np.zeros((len(agents), t_count), dtype=bool)
        for token in future_tokens:
            by_instance = self._global_boxes(token)
            step = round((self._ego_pose(token)[0] - t0_timestamp) / KEYFRAME_INTERVAL_US) - 1
            if step < t_count:
                for a, instance in enumerate(agent_ids):
                    if instance in by_instance:
                        agent_future[a, step] = t0_from_global.apply(by_instance[instance].center_m)[:2]
                        agent_future_mask[a, step] = True
        return _AgentTracks(
            past=agent_past.astype(np.float32),
            past_mask=agent_past_mask,
            future=agent_future.astype(np.float32),
            future_mask=agent_future_mask,
        )

    def _occupancy(
        self, agents: list[types.Box3D], occupancy_tokens: list[str], t0_from_global: geometry.RigidTransform
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Per-class occupancy and instances for steps 0 (``agents``, at t0) to F (``occupancy_tokens``).

        Returns:
            occupancy: [F + 1, C, H, W] bool.
            instance_ids: [I] the instance tokens: the A agents first, then those new at each step, sorted.
            instances: [F + 1, H, W] int32 — 1 + index into ``instance_ids``, 0 where free.
        """
        grid, f_count = self.config.grid, self.config.occupancy_steps
        # Each step's boxes with their centre and yaw in t0 (the agents are there already; later steps' boxes are
        # moved by ``transformed_pose``, the values ``Box3D.transformed`` gives, without building the boxes).
        step_boxes = [[(b, b.center_m, b.yaw_rad) for b in agents]]
        for token in occupancy_tokens:
            boxes = self._global_boxes(token).values()
            step_boxes.append([(b, *b.transformed_pose(t0_from_global)) for b in boxes])
        instance_ids = [b.instance_id for b in agents]
        for posed in step_boxes[1:]:
            instance_ids.extend(sorted({b.instance_id for b, _, _ in posed} - set(instance_ids)))
        instance_index = {token: i for i, token in enumerate(instance_ids)}
        h, w = grid.shape
        occupancy = np.zeros((f_count + 1, len(categories.CLASSES), h, w), dtype=bool)
        instances = np.zeros((f_count + 1, h, w), dtype=np.int32)
        for k, posed in enumerate(step_boxes):
            if not posed:
                continue
            posed = sorted(posed, key=lambda entry: instance_index[entry[0].instance_id])
            boxes = [b for b, _, _ in posed]
            occupancy[k], local = rasterize.rasterize_boxes(
                grid,
                np.array([center_m[:2] for _, center_m, _ in posed]),
                np.array([[b.size_wlh_m[0], b.size_wlh_m[1]] for b in boxes]),
                np.array([yaw_rad for _, _, yaw_rad in posed]),
                np.array([categories.class_index(b.category) for b in boxes]),
                len(categories.CLASSES),
            )
            lookup = np.array([0] + [instance_index[b.instance_id] + 1 for b in boxes], dtype=np.int32)
            instances[k] = lookup[local]
        return occupancy, instance_ids, instances

    def _lidar_xy(self, token: str) -> np.ndarray:
        """[2] xy (m) of the LIDAR_TOP sensor in the keyframe's ego frame."""
        nusc = self.source.nusc
        record = nusc.get("sample_data", nusc.get("sample", token)["data"][types.LIDAR_CHANNEL])
        return np.asarray(nusc.get("calibrated_sensor", record["calibrated_sensor_token"])["translation"][:2])


def inference_window(
    frames: list[Frame],
    agent_box: np.ndarray,
    agent_class: np.ndarray,
    agent_velocity: np.ndarray,
    agent_past: np.ndarray,
    agent_past_mask: np.ndarray,
    agent_ids: list[str],
    config: WindowConfig,
    future_actions: np.ndarray | None = None,
) -> Window:
    """A window of in-memory frames for inference (live sensors, no future): its inputs named, its targets zero.

    The past actions come from the frames' ego poses as ``WindowBuilder.window`` computes them
    (``geometry.ego_motion``); ``torch_dataset.sample_from_window(window, frames, image_hw)`` makes the model input.

    Args:
        frames: the P input frames, oldest first, t0 last (``build_frame`` of each keyframe).
        agent_box: [A, 7] float — x, y, z, width, length, height (m), yaw (rad) of the agents at t0 (t0 ego frame).
        agent_class: [A] int — class index (``categories.CLASSES``).
        agent_velocity: [A, 2] float — vx, vy (m/s, t0 ego frame).
        agent_past: [A, P, 2] float — xy (m, t0 ego frame) at each input keyframe.
        agent_past_mask: [A, P] bool.
        agent_ids: [A] instance ids.
        config: the window layout (P, T, F and the grid) the model was trained on.
        future_actions: [F', 3] float, F' <= F — the ego motion (dx, dy in m, dyaw in rad per 0.5 s step, in the
            step's start frame) to roll out under; None: no future action (masked).

    Returns:
        the window; ``ego_future``, ``agent_future``, ``occupancy``, ``instances`` and ``observed`` are zero and
        ``future_keyframe_tokens`` empty.

    Raises:
        ValueError: the number of frames is not ``config.past_keyframes``.
    """
    p_count, t_count, f_count = len(frames), config.trajectory_steps, config.occupancy_steps
    if p_count != config.past_keyframes:
        raise ValueError(f"inference_window: {p_count} frames, the config wants {config.past_keyframes}")
    global_from_ego = np.stack([np.asarray(f.global_from_ego, dtype=np.float64) for f in frames])  # [P, 4, 4]
    t0_from_ego = np.linalg.inv(global_from_ego[-1])[None] @ global_from_ego  # [P, 4, 4]
    pose = geometry.planar_pose(t0_from_ego)  # [P, 3] x, y, yaw in t0
    actions = np.zeros((p_count - 1 + t_count, 3), dtype=np.float32)  # [P - 1 + T, 3]
    actions[: p_count - 1] = geometry.ego_motion(pose[:-1], pose[1:])
    action_mask = np.zeros(p_count - 1 + t_count, dtype=bool)
    action_mask[: p_count - 1] = True
    if future_actions is not None:
        future_actions = np.asarray(future_actions, dtype=np.float32)[:f_count]  # [F', 3]
        actions[p_count - 1 : p_count - 1 + len(future_actions)] = future_actions
        action_mask[p_count - 1 : p_count - 1 + len(future_actions)] = True
    count = len(agent_ids)
    h, w = config.grid.shape
    return Window(
        sample_token=frames[-1].sample_token,
        scene_name=frames[-1].scene_name,
        timestamp_us=int(frames[-1].timestamp_us),
        keyframe_tokens=np.array([f.sample_token for f in frames]),
        t0_from_ego=t0_from_ego,
        future_keyframe_tokens=np.array([], dtype=str),
        t0_from_future_ego=np.zeros((0, 4, 4)),
        ego_future=np.zeros((t_count, 3), dtype=np.float32),
        ego_future_mask=np.zeros(t_count, dtype=bool),
        actions=actions,
        action_mask=action_mask,
        agent_ids=np.array(list(agent_ids), dtype="U64").reshape(-1),
        agent_class=np.asarray(agent_class, dtype=np.int8).reshape(-1),
        agent_box=np.asarray(agent_box, dtype=np.float32).reshape(-1, 7),
        agent_velocity=np.asarray(agent_velocity, dtype=np.float32).reshape(-1, 2),
        agent_past=np.asarray(agent_past, dtype=np.float32).reshape(count, p_count, 2),
        agent_past_mask=np.asarray(agent_past_mask, dtype=bool).reshape(count, p_count),
        agent_future=np.zeros((count, t_count, 2), dtype=np.float32),
        agent_future_mask=np.zeros((count, t_count), dtype=bool),
        occupancy=np.zeros((f_count + 1, len(categories.CLASSES), h, w), dtype=bool),
        instance_ids=np.array(list(agent_ids), dtype="U64").reshape(-1),
        instances=np.zeros((f_count + 1, h, w), dtype=np.int32),
        observed=np.zeros((h, w), dtype=bool),
    )


@dataclass(frozen=True)
class WindowInputs:
    """A window's inputs assembled in the t0 ego frame (what a model consumes).

    Attributes:
        points: [N, 5] float32 — x, y, z (m, t0 ego frame), intensity, time lag (s) behind t0.
        points_frame: [N] uint8 — the input keyframe of each point (0 = oldest, P-1 = t0).
        images: [P, 6, H, W, 3] uint8 — zeros where a camera is missing.
        camera_mask: [P, 6] bool.
        intrinsics: [P, 6, 3, 3] float32 (pixels).
        t0_from_camera: [P, 6, 4, 4] float32 — camera poses in the t0 ego frame.
    """

    points: np.ndarray
    points_frame: np.ndarray
    images: np.ndarray
    camera_mask: np.ndarray
    intrinsics: np.ndarray
    t0_from_camera: np.ndarray


def assemble_inputs(
    window: Window, frames: list[Frame], image_hw: tuple[int, int], future: bool = False, cameras: bool = True
) -> WindowInputs:
    """Move a window's frames into its t0 ego frame and decode their cameras.

    Args:
        window: the window.
        frames: its P input frames in ``window.keyframe_tokens`` order, or with ``future`` its F future frames in
            ``window.future_keyframe_tokens`` order.
        image_hw: (H, W) of the stored images, used where a camera is missing.
        future: assemble the future frames (for the target encoder); ``points_frame`` then counts 0..F-1 from
            the first future keyframe, and time lags are taken behind each frame's own keyframe.
        cameras: decode the cameras; False leaves every image black and every camera marked missing (for a model
            that sees the LiDAR alone: JPEG decoding is most of a window's loading time).
    """
    tokens = window.future_keyframe_tokens if future else window.keyframe_tokens
    poses = window.t0_from_future_ego if future else window.t0_from_ego
    if [f.sample_token for f in frames] != list(tokens):
        raise ValueError(
            f"window {window.sample_token}: frames do not match its {'future_' if future else ''}keyframe_tokens"
        )
    p_count = len(frames)
    clouds, owners = [], []
    images = np.zeros((p_count, 6, *image_hw, 3), dtype=np.uint8)
    t0_from_camera = np.zeros((p_count, 6, 4, 4), dtype=np.float32)
    for p, frame in enumerate(frames):
        t0_from_this = poses[p]  # [4, 4]
        points = frame.points.copy()
        points[:, :3] = points[:, :3] @ t0_from_this[:3, :3].T.astype(np.float32) + t0_from_this[:3, 3]
        if not future:
            points[:, 4] += (window.timestamp_us - frame.timestamp_us) * 1e-6
        clouds.append(points)
        owners.append(np.full(len(points), p, dtype=np.uint8))
        for c in np.flatnonzero(frame.camera_mask) if cameras else ():
            images[p, c] = frame.image(c)
        t0_from_camera[p] = t0_from_this.astype(np.float32) @ frame.ego_from_camera
    return WindowInputs(
        points=np.concatenate(clouds).astype(np.float32),
        points_frame=np.concatenate(owners),
        images=images,
        camera_mask=np.stack([f.camera_mask & cameras for f in frames]),
        intrinsics=np.stack([f.intrinsics for f in frames]),
        t0_from_camera=t0_from_camera,
    )
