"""The nuScenes source: keyframes of any dataroot, version and split (real or synthetic) through the devkit.

For each keyframe: the six cameras resized (intrinsics scaled to match) with their poses at the image's own
timestamp; LiDAR aggregated over N sweeps into the keyframe's ego frame with per-sweep ego-motion compensation and
a time-lag channel (as the devkit's ``LidarPointCloud.from_file_multisweep``, which works in the sensor frame);
annotations as boxes in the keyframe's ego frame with their class, velocity and instance token.

Bad input does not stop the source: a missing, truncated or undecodable file, an empty sweep, NaN points or a file
name that would reach outside the dataroot (absolute, ``..``) are recorded as ``BadInput`` on the
keyframe, and the keyframe is made from what exists. Every file name from a table goes through ``sensor_path``
(``io.path_inside``) before anything is opened.

Notation:
    N  LiDAR points
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, JpegImagePlugin

from bevjepa.datasets import categories, geometry, types
from bevjepa.datasets import io as bevio

if TYPE_CHECKING:  # the devkit is imported where its tables are read: importing it costs seconds (matplotlib, sklearn)
    from nuscenes.nuscenes import NuScenes

LIDAR_POINT_BYTES = 5 * 4
"""A nuScenes LiDAR point: x, y, z, intensity, ring as float32."""


@dataclass(frozen=True)
class SourceConfig:
    """Which data to read and how.

    Attributes:
        dataroot: the dataset root (holds ``v1.0-*/``, ``samples/``, ``sweeps/``, ``maps/``).
        version: the table version, e.g. ``v1.0-mini`` or ``v1.0-trainval``.
        split: a devkit split (``mini_train``, ``mini_val``, ``train``, ``val``, ...); None takes every scene.
        image_width_px: cameras are resized to this width, keeping their aspect ratio.
        lidar_sweeps: sweeps aggregated per keyframe (10 = 0.5 s at 20 Hz).
        min_point_distance_m: points with |x| and |y| below this in their sensor frame are dropped (the devkit's
            ``remove_close``: returns from the ego vehicle itself).
    """

    dataroot: Path
    version: str = "v1.0-mini"
    split: str | None = None
    image_width_px: int = 256
    lidar_sweeps: int = 10
    min_point_distance_m: float = 1.0

    def __post_init__(self) -> None:
        if self.image_width_px < 8:
            raise ValueError(f"SourceConfig.image_width_px must be at least 8, got {self.image_width_px}")
        if self.lidar_sweeps < 1:
            raise ValueError(f"SourceConfig.lidar_sweeps must be at least 1, got {self.lidar_sweeps}")


@dataclass(frozen=True)
class BadInput:
    """A file or record that could not be used as it is.

    Attributes:
        sample_token: the keyframe that needed it.
        file: the file (relative to the dataroot) or the table record at fault.
        reason: what is wrong, e.g. ``missing file`` or ``truncated: 1234 bytes``.
    """

    sample_token: str
    file: str
    reason: str


@dataclass(frozen=True)
class Keyframe:
    """One keyframe (nuScenes ``sample``) with its sensors and annotations.

    Attributes:
        sample_token: the sample's token.
        scene_name: the scene's name, e.g. ``scene-0061``.
        timestamp_us: the keyframe's (LIDAR_TOP) timestamp (µs).
        global_from_ego: the ego pose at ``timestamp_us``.
        lidar_points: [N, 5] float32 — x, y, z (m, this keyframe's ego frame), intensity (0-255), time lag (s)
            behind the keyframe.
        cameras: the cameras that could be read, resized; each carries its own pose at its own timestamp.
        boxes: annotated agents of the predicted classes, in this keyframe's ego frame, with velocity (m/s, ego
            frame; NaN where the devkit cannot tell) and the instance token as ``instance_id``.
        bad_inputs: what was missing or damaged.
    """

    sample_token: str
    scene_name: str
    timestamp_us: int
    global_from_ego: geometry.RigidTransform
    lidar_points: np.ndarray
    cameras: tuple[types.CameraImage, ...]
    boxes: tuple[types.Box3D, ...]
    bad_inputs: tuple[BadInput, ...]


class BadInputError(Exception):
    """A file that cannot be used; ``reason`` says why."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def open_nuscenes(dataroot: Path, version: str) -> NuScenes:
    """Load the devkit's tables, with a clear error for a wrong dataroot or version: the project's one loader.

    Every ``NuScenes`` the project opens comes from here (the source, the detection evaluation, ``sim.inspect``), so
    each is checked the same way: the dataroot and its ``version/`` folder exist, and no ``map`` record names a
    file outside the dataroot.

    Raises:
        FileNotFoundError: no dataroot, or no ``version/`` tables folder in it.
        bevio.UnsafePathError: a ``map.json`` record's file would come from outside the dataroot.
    """
    dataroot = Path(dataroot)
    if not dataroot.is_dir():
        raise FileNotFoundError(f"dataroot {dataroot} does not exist; pass the folder that holds {version}/")
    if not (dataroot / version).is_dir():
        found = sorted(p.name for p in dataroot.glob("v1.0-*") if p.is_dir())
        raise FileNotFoundError(
            f"dataroot {dataroot} has no {version}/ tables folder (found: {found or 'none'}); "
            f"check --dataroot and --version (a nuScenes folder holding the {version} tables)"
        )
    _check_dataroot_paths(dataroot, version)
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=version, dataroot=str(dataroot), verbose=False)


def _check_dataroot_paths(dataroot: Path, version: str) -> None:
    """Refuse, before the devkit loads, a ``map`` record whose file would come from outside the dataroot.

    The devkit opens every ``map`` record's file when it loads, before any of our checks could run.

    Raises:
        bevio.UnsafePathError: a ``map.json`` record's ``filename`` is absolute or holds ``..``.
    """
    table = Path(dataroot) / version / "map.json"
    if not table.is_file():
        return  # the devkit says what is missing
    for record in json.loads(table.read_text()):
        if isinstance(record, dict) and "filename" in record:
            try:
                bevio.path_inside(dataroot, record["filename"], f"{table}: map {record.get('token')} filename")
            except bevio.UnsafePathError as error:
                raise bevio.UnsafePathError(f"{error}; repair the table") from None


def sensor_path(dataroot: Path, record: dict) -> Path:
    """The file of a ``sample_data`` record, joined onto the dataroot by the one check for table paths.

    Raises:
        BadInputError: the record's ``filename`` is empty, absolute or holds ``..``; the reason names the
            sample_data token and the path.
    """
    filename = record.get("filename")
    try:
        return bevio.path_inside(dataroot, filename, f"sample_data {record.get('token')} filename")
    except bevio.UnsafePathError as error:
        raise BadInputError(str(filename), f"unsafe path, not read: {error}") from None


def read_file(path: Path, filename: str) -> bytes:
    """The bytes of a sensor file; a missing or unreadable one raises ``BadInputError`` naming ``filename``."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInputError(filename, "missing file") from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise BadInputError(filename, f"unreadable file: {error.strerror or error}") from None


def read_lidar_file(dataroot: Path, filename: str, token: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a ``.pcd.bin`` LiDAR file.

    Args:
        dataroot: the dataset root.
        filename: the file as the ``sample_data`` table gives it (relative to ``dataroot``).
        token: the ``sample_data`` token, named in errors.

    Returns:
        points [N, 5] float32 (x, y, z in the sensor frame, intensity, ring), with rows holding NaN or inf
        removed, and a list of non-fatal problems (``"3 points with NaN removed"``).

    Raises:
        BadInputError: the file name leaves the dataroot, or the file is missing, truncated (not whole points) or
            holds no finite point.
    """
    raw = read_file(sensor_path(dataroot, {"token": token, "filename": filename}), filename)
    if len(raw) % LIDAR_POINT_BYTES:
        raise BadInputError(filename, f"truncated: {len(raw)} bytes is not a whole number of 20-byte points")
    points = np.frombuffer(raw, dtype=np.float32).reshape(-1, 5)
    if len(points) == 0:
        raise BadInputError(filename, "empty sweep: no points")
    problems = []
    if np.isfinite(points).all():  # the usual file: one flat check, not a row-wise one (10x faster)
        return points, problems
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} points with NaN or inf removed")
        points = points[finite]
        if len(points) == 0:
            raise BadInputError(filename, "empty sweep: every point is NaN or inf")
    return points, problems


def aggregate_sweeps(
    sweeps: Sequence[types.LidarSweep],
    global_from_ego: geometry.RigidTransform,
    timestamp_us: int,
    min_point_distance_m: float,
) -> np.ndarray:
    """LiDAR sweeps moved into one keyframe's ego frame with their time lag: a keyframe's aggregated point cloud.

    The one aggregation of the project: the nuScenes source (``NuScenesSource.aggregate_lidar``) and the
    simulator's live keyframes (``bevjepa.sim.keyframe``) both call it. Each sweep is compensated for the ego's
    motion through its own ego pose (``keyframe_ego_from_sensor = ego_from_global @ global_from_sweep_ego @
    sweep_ego_from_sensor``); points with both |x| and |y| below ``min_point_distance_m`` in their sensor frame
    are dropped first (the devkit's ``remove_close``: returns from the ego vehicle itself).

    Args:
        sweeps: the sweeps, in the order their points are to appear (each: points [n, 5] float32 x, y, z in its
            sensor frame, intensity, ring; its mounting and its ego pose).
        global_from_ego: the keyframe's ego pose.
        timestamp_us: the keyframe's time (µs); each point's time lag is measured behind it.
        min_point_distance_m: the close-point filter's half-width (m), ``SourceConfig.min_point_distance_m``.

    Returns:
        [N, 5] float32 — x, y, z (m, keyframe ego frame), intensity, time lag (s) behind ``timestamp_us``.
    """
    ego_from_global = global_from_ego.inverse()
    kept = []
    for sweep in sweeps:  # a few sweeps, each vectorized
        points = sweep.points
        close = (np.abs(points[:, 0]) < min_point_distance_m) & (np.abs(points[:, 1]) < min_point_distance_m)
        kept.append(np.compress(~close, points, axis=0))  # [n, 5]; boolean row indexing is 4x slower
    out = np.empty((sum(len(points) for points in kept), 5), dtype=np.float32)  # [N, 5], filled sweep by sweep
    start = 0
    for sweep, points in zip(sweeps, kept, strict=True):
        keyframe_ego_from_sensor = ego_from_global @ sweep.global_from_ego @ sweep.ego_from_sensor
        part = out[start : start + len(points)]  # [n, 5] view
        part[:, :3] = keyframe_ego_from_sensor.apply(points[:, :3])  # [n, 3] float64 → float32
        part[:, 3] = points[:, 3]
        part[:, 4] = (timestamp_us - sweep.timestamp_us) * 1e-6
        start += len(points)
    return out


def scene_splits(scene_names: set[str]) -> dict[str, list[str]]:
    """{devkit split: its scenes among ``scene_names``, sorted} for every split that holds one of them."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = {split: sorted(set(names) & scene_names) for split, names in create_splits_scenes().items()}
    return {split: names for split, names in sorted(splits.items()) if names}


class NuScenesSource:
    """Keyframes of one dataroot, version and split, read through the devkit."""

    def __init__(self, config: SourceConfig, nusc: NuScenes | None = None) -> None:
        self.config = config
        self.nusc = nusc if nusc is not None else open_nuscenes(config.dataroot, config.version)
        names = {scene["name"] for scene in self.nusc.scene}
        if config.split is None:
            wanted = names
        else:
            from nuscenes.utils.splits import create_splits_scenes

            splits = create_splits_scenes()
            if config.split not in splits:
                raise ValueError(f"unknown split {config.split!r}; choose one of {sorted(splits)}")
            wanted = set(splits[config.split]) & names
            if not wanted:
                raise ValueError(f"split {config.split!r} has no scene in {config.dataroot} ({config.version})")
        self.scenes = tuple(sorted((s for s in self.nusc.scene if s["name"] in wanted), key=lambda s: s["name"]))

    def scene_sample_tokens(self, scene: dict) -> list[str]:
        """The keyframe tokens of a scene, in time order."""
        tokens, token = [], scene["first_sample_token"]
        while token:
            tokens.append(token)
            token = self.nusc.get("sample", token)["next"]
        return tokens

    def ego_pose(self, sample_token: str) -> tuple[int, geometry.RigidTransform]:
        """The keyframe's timestamp (µs) and ``global_from_ego`` (at its LIDAR_TOP sample_data)."""
        record = self.nusc.get("sample_data", self.nusc.get("sample", sample_token)["data"][types.LIDAR_CHANNEL])
        return record["timestamp"], self._global_from_ego(record)

    def keyframe(self, sample_token: str, with_boxes: bool = True) -> Keyframe:
        """Read one keyframe: LiDAR, cameras and boxes; damaged inputs become ``bad_inputs``.

        Args:
            sample_token: the keyframe.
            with_boxes: read the annotations; False leaves ``boxes`` empty (for a caller that reads them through
                ``boxes`` itself, as ``windows.WindowBuilder`` does, and would otherwise read them twice).
        """
        timestamp, global_from_ego = self.ego_pose(sample_token)
        bad: list[BadInput] = []
        points = self.aggregate_lidar(sample_token, bad)
        cameras = self.cameras(sample_token, bad)
        return Keyframe(
            sample_token,
            self.scene_name(sample_token),
            timestamp,
            global_from_ego,
            points,
            tuple(cameras),
            tuple(self.boxes(sample_token, global_from_ego)) if with_boxes else (),
            tuple(bad),
        )

    def scene_name(self, sample_token: str) -> str:
        """The name of the keyframe's scene."""
        return self.nusc.get("scene", self.nusc.get("sample", sample_token)["scene_token"])["name"]

    def _global_from_ego(self, sample_data: dict) -> geometry.RigidTransform:
        pose = self.nusc.get("ego_pose", sample_data["ego_pose_token"])
        return geometry.RigidTransform.from_quaternion(pose["rotation"], pose["translation"])

    def _ego_from_sensor(self, sample_data: dict) -> geometry.RigidTransform:
        calibration = self.nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
        return geometry.RigidTransform.from_quaternion(calibration["rotation"], calibration["translation"])

    def aggregate_lidar(self, sample_token: str, bad: list[BadInput]) -> np.ndarray:
        """LIDAR_TOP sweeps up to the keyframe, moved into the keyframe's ego frame with their time lag.

        Walks the ``prev`` chain from the keyframe's sweep as the devkit does; a sweep whose file is missing or
        damaged is skipped (and recorded in ``bad``), its predecessors still used. The sweeps are aggregated by
        ``aggregate_sweeps`` (as the simulator's live keyframes are), newest first.

        Returns:
            [N, 5] float32 — x, y, z (m, keyframe ego frame), intensity, time lag (s).
        """
        sample = self.nusc.get("sample", sample_token)
        reference = self.nusc.get("sample_data", sample["data"][types.LIDAR_CHANNEL])
        sweeps = []
        record = reference
        for _ in range(self.config.lidar_sweeps):
            try:
                points, problems = read_lidar_file(self.config.dataroot, record["filename"], record["token"])
                bad.extend(BadInput(sample_token, record["filename"], p) for p in problems)
                sweeps.append(
                    types.LidarSweep(
                        record["timestamp"], points, self._ego_from_sensor(record), self._global_from_ego(record)
                    )
                )
            except BadInputError as error:
                bad.append(BadInput(sample_token, error.file, error.reason))
            if not record["prev"]:
                break
            record = self.nusc.get("sample_data", record["prev"])
        return aggregate_sweeps(
            sweeps, self._global_from_ego(reference), reference["timestamp"], self.config.min_point_distance_m
        )

    def cameras(self, sample_token: str, bad: list[BadInput]) -> list[types.CameraImage]:
        """The keyframe's camera images resized to ``image_width_px``, intrinsics scaled to match."""
        sample = self.nusc.get("sample", sample_token)
        images = []
        for channel in types.CAMERA_CHANNELS:
            if channel not in sample["data"]:
                bad.append(BadInput(sample_token, f"sample {sample_token}", f"no {channel} sample_data"))
                continue
            record = self.nusc.get("sample_data", sample["data"][channel])
            try:
                data = read_file(sensor_path(self.config.dataroot, record), record["filename"])
                resized, (width, height) = decode_image(data, record["filename"], self.config.image_width_px)
            except BadInputError as error:
                bad.append(BadInput(sample_token, error.file, error.reason))
                continue
            new_height = resized.shape[0]
            calibration = self.nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
            scale = np.diag([self.config.image_width_px / width, new_height / height, 1.0])
            images.append(
                types.CameraImage(
                    channel=channel,
                    timestamp_us=record["timestamp"],
                    image=resized,
                    intrinsics=scale @ np.asarray(calibration["camera_intrinsic"], dtype=np.float64),
                    ego_from_camera=self._ego_from_sensor(record),
                    global_from_ego=self._global_from_ego(record),
                )
            )
        return images

    def boxes(self, sample_token: str, global_from_ego: geometry.RigidTransform) -> list[types.Box3D]:
        """Annotated agents of the predicted classes, in the ego frame of ``global_from_ego``."""
        ego_from_global = global_from_ego.inverse()
        boxes = []
        for annotation_token in self.nusc.get("sample", sample_token)["anns"]:
            annotation = self.nusc.get("sample_annotation", annotation_token)
            if categories.class_index(annotation["category_name"]) < 0:
                continue
            velocity = self.nusc.box_velocity(annotation_token)[:2]
            yaw = geometry.quaternion_yaw(np.asarray(annotation["rotation"]))
            box = types.Box3D(
                np.asarray(annotation["translation"]),
                np.asarray(annotation["size"]),
                float(yaw),
                velocity,
                annotation["category_name"],
                annotation["instance_token"],
            )
            boxes.append(box.transformed(ego_from_global))
        return boxes


def decode_image(data: bytes, filename: str, width_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file and resize it to ``width_px`` wide, keeping its aspect ratio.

    Args:
        data: the file's bytes.
        filename: the file (relative to the dataroot), named in errors.
        width_px: the width after resizing (pixels).

    Returns:
        the image [H, W, 3] uint8 (W = ``width_px``) and the original (width, height) in pixels.

    Raises:
        BadInputError: the bytes are not an image Pillow can decode (the reason is the decoder's), or the image is
            so large that Pillow refuses it as a decompression bomb.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            new_height = max(1, round(height * width_px / width))
            resized = np.asarray(image.convert("RGB").resize((width_px, new_height), Image.BILINEAR))
    except Image.UnidentifiedImageError:  # its message names the in-memory buffer, not the file: say what it is
        raise BadInputError(filename, f"unreadable image: {_unidentified_reason(data)}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # truncated, corrupt, huge
        raise BadInputError(filename, f"unreadable image: {error or type(error).__name__}") from None
    return resized, (width, height)


def _unidentified_reason(data: bytes) -> str:
    """Why no Pillow decoder accepted ``data``: the JPEG decoder's own complaint, the size and the first bytes."""
    try:
        JpegImagePlugin.JpegImageFile(io.BytesIO(data))
        jpeg = "accepts the header"
    except Exception as error:  # noqa: BLE001 — only its message is wanted
        jpeg = str(error) or type(error).__name__
    return f"no image format recognised (JPEG decoder: {jpeg}); {len(data)} bytes, starting {data[:8].hex(' ') or '-'}"
