"""``bevjepa preprocess``: a nuScenes dataset into training windows, Ray tasks of consecutive windows, resumable.

Output (``OUT``):

    config.json                              the resolved configuration and its hash
    frames/<scene>/<sample_token>.npz        one keyframe's inputs (LiDAR, cameras as JPEG), ``windows.Frame``
    windows/<scene>/<sample_token>.npz       one window's targets and the names of its frames, ``windows.Window``
    meta/<scene>/<sample_token>[.frame].json  size, sensor counts and bad inputs, written after the file it describes
    manifest.json                            config hash, dataset, counts, every window, bad inputs, failures,
                                             sensorless windows

Scene names and sample tokens come from the tables, which are untrusted: each becomes a file or folder name only
through ``io.safe_component`` and ``io.path_inside`` (``output_path``), so nothing is written outside ``OUT``. A
scene whose name is not a safe file name is recorded as failed (``failed_scenes``) and the others go on.

A window none of whose P input keyframes has a LiDAR point or a camera image is *sensorless*: a model cannot
forecast from nothing, so it is not written and not listed among the windows; the manifest lists it under
``sensorless_windows`` (with its bad inputs among ``bad_inputs``, which usually say why).

Why Ray tasks and not Ray Data: the unit of work is a run of consecutive windows of one scene (they share
keyframes, so one task reads each keyframe's sensors once), results are files written by the task itself, and
the driver only needs small summaries; tasks give that with automatic retries when a worker dies, and no
dataset-shaped intermediate to materialize. Each worker process loads the devkit's tables once and keeps them.

Every file is written atomically (temporary file, then rename) and its meta file after it, so a frame or window
counts as done only when its meta exists; a rerun skips those and writes the rest, and ends with the same
manifest. The bytes of a window in the manifest are its own file's plus its share of the frames it names.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import resource
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bevjepa.datasets import geometry, nuscenes_source, windows, workers
from bevjepa.datasets import io as bevio

MANIFEST_FORMAT = "bevjepa-windows"


@dataclass(frozen=True)
class PreprocessConfig:
    """A preprocessing job.

    Attributes:
        dataroot: the nuScenes dataset root.
        version: the table version.
        split: a devkit split; None takes every scene.
        out: the output folder (created; an existing one of the same config is resumed).
        workers: Ray workers; 1 runs in this process.
        address: a Ray cluster to run on (its workers must see ``dataroot`` and ``out``).
        strict: stop at the first bad input or failed window.
        image_width_px: camera width after resizing (pixels).
        lidar_sweeps: sweeps aggregated per keyframe.
        window: what each window holds.
        reference: build the windows as first written (``windows.WindowBuilder(reference=True)``): the same files,
            slower; for ``bevjepa bench preprocess`` and the test that compares the two. Not part of the content.
    """

    dataroot: Path
    out: Path
    version: str = "v1.0-mini"
    split: str | None = None
    workers: int = 1
    address: str | None = None
    strict: bool = False
    image_width_px: int = 256
    lidar_sweeps: int = 10
    window: windows.WindowConfig = field(default_factory=windows.WindowConfig)
    reference: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")

    def source_config(self) -> nuscenes_source.SourceConfig:
        """The source this job reads."""
        return nuscenes_source.SourceConfig(
            Path(self.dataroot), self.version, self.split, self.image_width_px, self.lidar_sweeps
        )

    def content(self) -> dict:
        """What determines the windows' content (not where they go or how many workers write them)."""
        return {
            "version": self.version,
            "split": self.split,
            "image_width_px": self.image_width_px,
            "lidar_sweeps": self.lidar_sweeps,
            "window": dataclasses.asdict(self.window),
            "window_format": windows.FORMAT_VERSION,
        }

    def content_hash(self) -> str:
        """A short hash of ``content``."""
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()[:16]


class StrictModeError(RuntimeError):
    """A bad input or failed window met under ``--strict``."""


@dataclass(frozen=True)
class SceneTask:
    """A run of consecutive windows of one scene to build (a task of the pool).

    Attributes:
        config: the job.
        scene_name: the scene.
        first, stop: the range of the scene's windows (in time order) this task builds; None for all of them.
    """

    config: PreprocessConfig
    scene_name: str
    first: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class SceneResult:
    """What a scene task did.

    Attributes:
        scene_name: the scene.
        windows: (sample_token, relative file, bytes, bad inputs) of the task's written windows, in time order.
        failed: (sample_token, error) of windows that could not be built.
        strict_violation: under ``--strict``, the first problem met (the task stopped there).
        peak_memory_bytes: the worker process's peak resident memory.
        sensorless: (sample_token, bad inputs) of the task's windows whose input keyframes hold no LiDAR point and
            no camera image (not written), in time order.
        scene_error: why the whole scene was refused (its name cannot be a folder name), or None.
    """

    scene_name: str
    windows: tuple[tuple[str, str, int, tuple[dict, ...]], ...]
    failed: tuple[tuple[str, str], ...]
    strict_violation: str | None
    peak_memory_bytes: int
    sensorless: tuple[tuple[str, tuple[dict, ...]], ...] = ()
    scene_error: str | None = None


@functools.lru_cache(maxsize=2)
def _cached_source(source_config: nuscenes_source.SourceConfig) -> nuscenes_source.NuScenesSource:
    """One devkit instance per worker process and dataset (loading the tables is the slow part)."""
    return nuscenes_source.NuScenesSource(source_config)


def _write_json(path: Path, value: object) -> None:
    bevio.atomic_write_json(path, value, indent=1, sort_keys=True)


def output_path(out: Path, kind: str, scene_name: str, token: str, suffix: str) -> tuple[Path, str]:
    """Where a scene's output file goes: ``out/<kind>/<scene_name>/<token><suffix>``, and that path relative to out.

    The scene name and token come from the tables; both must be one safe path component (``io.safe_component``)
    and the result must stay inside ``out`` (``io.path_inside``).

    Raises:
        io.UnsafePathError: the scene name or token is not a safe file name (``/``, ``..``, absolute, ...).
    """
    scene = bevio.safe_component(scene_name, "scene name")
    name = bevio.safe_component(token, f"sample token of scene {scene_name}")
    relative = f"{kind}/{scene}/{name}{suffix}"
    return bevio.path_inside(out, relative, f"output of scene {scene_name}"), relative


def _frame_meta(stored: windows.Frame, size: int) -> dict:
    """A frame's meta: its bytes, how many LiDAR points and cameras it holds, and its bad inputs."""
    return {
        "bytes": size,
        "points": len(stored.points),
        "cameras": int(stored.camera_mask.sum()),
        "bad_inputs": json.loads(stored.bad_inputs),
    }


def process_scene(task: SceneTask) -> SceneResult:
    """Build and write every frame and window of one scene that is not on disk yet.

    A window whose input keyframes hold no LiDAR point and no camera image is not written (``sensorless``); a scene
    whose name is not a safe folder name is refused whole (``scene_error``).
    """
    config = task.config
    out = Path(config.out)
    try:
        bevio.safe_component(task.scene_name, "scene name")
    except bevio.UnsafePathError as error:
        message = f"scene {task.scene_name!r} refused: {error}; nothing of it was read or written"
        return SceneResult(
            task.scene_name, (), (), message if config.strict else None, _peak_memory(), scene_error=message
        )
    source = _cached_source(config.source_config())
    scene = next(s for s in source.scenes if s["name"] == task.scene_name)
    tokens = source.scene_sample_tokens(scene)
    builder = windows.WindowBuilder(source, config.window, reference=config.reference)
    frame_meta: dict[str, dict] = {}
    written, failed, sensorless = [], [], []

    def frame(token: str) -> dict:
        """The frame's meta, building and writing the frame first if needed."""
        if token not in frame_meta:
            meta_path, _ = output_path(out, "meta", task.scene_name, token, ".frame.json")
            frame_path, _ = output_path(out, "frames", task.scene_name, token, ".npz")
            if meta_path.exists():
                meta = json.loads(meta_path.read_text())
                if "points" not in meta:  # written before frames recorded their sensors: count them now
                    meta = _frame_meta(windows.load_frame(frame_path), meta["bytes"])
                    _write_json(meta_path, meta)
            else:
                stored = builder.frame(token)
                meta = _frame_meta(stored, windows.save_frame(stored, frame_path))
                _write_json(meta_path, meta)
            frame_meta[token] = meta
        return frame_meta[token]

    def stop(message: str) -> SceneResult:
        return SceneResult(task.scene_name, tuple(written), tuple(failed), message, _peak_memory(), tuple(sensorless))

    for index in windows.window_sample_tokens(tokens, config.window)[task.first : task.stop]:
        token = tokens[index]
        try:
            window_path, relative = output_path(out, "windows", task.scene_name, token, ".npz")
            meta_path, _ = output_path(out, "meta", task.scene_name, token, ".json")
            past = tokens[index - config.window.past_keyframes + 1 : index + 1]
            future = tokens[index + 1 : index + 1 + config.window.occupancy_steps]
            # No LiDAR point and no camera in any input keyframe: nothing to forecast from.
            empty = all(frame(t)["points"] == 0 and frame(t)["cameras"] == 0 for t in past)
            if meta_path.exists():
                meta = json.loads(meta_path.read_text())
            else:
                # The future frames feed the JEPA target encoder; their bad inputs count as the window's too.
                bad = [item for t in (*past, *future) for item in frame(t)["bad_inputs"]]
                if config.strict and bad:
                    message = f"bad input in window {token} of {task.scene_name}: {bad[0]['file']}: {bad[0]['reason']}"
                    return stop(message)
                if config.strict and empty:
                    return stop(f"window {token} of {task.scene_name} is sensorless: no LiDAR point, no camera")
                size = 0 if empty else windows.save_window(builder.window(tokens, index), window_path)
                meta = {"bytes": size, "frames": [*past, *future], "bad_inputs": bad, "sensorless": empty}
                _write_json(meta_path, meta)
        except Exception as error:  # noqa: BLE001 — recorded, and the scene goes on
            failed.append((token, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"))
            if config.strict:
                return stop(f"window {token} of {task.scene_name} failed: {type(error).__name__}: {error}")
            continue
        if empty:
            sensorless.append((token, tuple(meta["bad_inputs"])))
        else:
            written.append((token, relative, meta["bytes"], tuple(meta["bad_inputs"])))
    return SceneResult(task.scene_name, tuple(written), tuple(failed), None, _peak_memory(), tuple(sensorless))


def _peak_memory() -> int:
    """Peak resident memory of this process (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def preprocess(config: PreprocessConfig, progress: bool = True, scene_fn=process_scene) -> dict:
    """Run the job and write ``manifest.json``; returns the manifest.

    Args:
        config: the job.
        progress: show a progress bar.
        scene_fn: the per-scene work (``process_scene``); a seam for fault-injection tests.

    Raises:
        StrictModeError: under ``--strict``, at the first bad input, failed or sensorless window, or refused scene.
        FileExistsError: ``out`` holds windows of another configuration.
        io.UnsafePathError: a ``map`` record's file name leaves the dataroot.
    """
    out = Path(config.out)
    source = nuscenes_source.NuScenesSource(config.source_config())  # fails early on a wrong dataroot
    resolved = {"content": config.content(), "hash": config.content_hash(), "dataroot": str(config.dataroot)}
    existing = out / "config.json"
    if existing.exists():
        previous = json.loads(existing.read_text())
        if previous.get("hash") != resolved["hash"]:
            raise FileExistsError(
                f"--out {out} holds windows of another configuration (hash {previous.get('hash')},"
                f" this one {resolved['hash']}); choose another --out or remove it"
            )
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not a bevjepa windows folder; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(existing, resolved)
    for stale in out.glob("*/*/*.tmp*"):  # half-written files of a killed run; no other job writes here
        stale.unlink()

    tasks = scene_tasks(config, source)
    pool = workers.make_pool(config.workers, config.address)
    order = task_order(tasks, interleave=(config.workers > 1 or bool(config.address)) and not config.reference)
    results: list[SceneResult | None] = [None] * len(tasks)
    try:
        with tqdm(
            total=sum(t.stop - t.first for t in tasks), desc="preprocess windows", unit="window", disable=not progress
        ) as bar:
            for position, result in pool.map_unordered(scene_fn, [tasks[i] for i in order]):
                index = order[position]
                results[index] = result
                bar.update(tasks[index].stop - tasks[index].first)
                if result.strict_violation:
                    raise StrictModeError(result.strict_violation)
    finally:
        pool.close()
    manifest = build_manifest(config, [r for r in results if r is not None])
    _write_json(out / "manifest.json", manifest)
    return manifest


def window_grid(out: Path) -> geometry.GridSpec:
    """The target grid of the windows in ``out`` (a ``preprocess`` output), from its ``config.json``.

    Raises:
        FileNotFoundError: ``out`` is not a windows folder.
    """
    path = Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--data {out} must be a `bevjepa preprocess` output (it has no config.json)")
    return geometry.GridSpec(**json.loads(path.read_text())["content"]["window"]["grid"])


def scene_tasks(
    config: PreprocessConfig, source: nuscenes_source.NuScenesSource, windows_per_task: int | None = None
) -> list[SceneTask]:
    """The job's tasks: each scene's windows in runs of at most ``windows_per_task``, of near-equal length.

    A run pays once for what its windows share with its neighbours: the boxes of the T keyframes after its last
    t0 (the trajectory targets) and the t0 LiDAR of the windows whose frames its predecessor built. Runs of 16
    windows pay that half as often as runs of 8 and still balance the work across workers (a 20 s scene is split
    in three); a frame at a boundary may be built by both neighbours when they run side by side (``task_order``
    keeps that rare; writes are atomic, so the second rename replaces identical bytes).

    Args:
        config: the job; ``config.reference`` splits as first written (runs of 8, the last one short).
        source: its source.
        windows_per_task: the longest run; None: 16 (8 with ``config.reference``).
    """
    if windows_per_task is None:
        windows_per_task = 8 if config.reference else 16
    tasks = []
    for scene in source.scenes:
        count = len(windows.window_sample_tokens(source.scene_sample_tokens(scene), config.window))
        if config.reference:
            bounds = [*range(0, count, windows_per_task), count]
        else:
            runs = -(-count // windows_per_task)  # ceil
            bounds = [round(i * count / runs) for i in range(runs + 1)]
        tasks.extend(SceneTask(config, scene["name"], a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return tasks


def task_order(tasks: list[SceneTask], interleave: bool) -> list[int]:
    """The order in which to hand ``tasks`` (``scene_tasks``' list, scene by scene) to the pool, as indices into it.

    Neighbouring runs of one scene share the keyframes at their boundary (P - 1 before it, F after it): run side by
    side on two workers, both would build those frames. ``interleave`` hands out the first run of every scene, then
    every scene's second run, and so on: with at least as many scenes as workers a run starts after its neighbour
    is done and finds the shared frames on disk. Results are still collected in ``tasks``' order, so the manifest
    does not depend on it.

    Args:
        tasks: the job's tasks, as ``scene_tasks`` returns them.
        interleave: round-robin over the scenes (parallel workers); False keeps ``tasks``' order (one worker).
    """
    if not interleave:
        return list(range(len(tasks)))
    runs_before: dict[str, int] = {}
    keys = []
    for index, task in enumerate(tasks):
        rank = runs_before.get(task.scene_name, 0)
        runs_before[task.scene_name] = rank + 1
        keys.append((rank, index))
    return [index for _, index in sorted(keys)]


def build_manifest(config: PreprocessConfig, results: list[SceneResult]) -> dict:
    """The manifest of a finished job, from the tasks' results (in task order): deterministic.

    ``windows`` lists the written windows (the ones to train and evaluate on); ``splits`` the devkit's splits of
    their scenes (so that training and evaluation read them without importing the devkit); ``sensorless_windows``
    the windows left out because none of their input keyframes has a LiDAR point or a camera image;
    ``failed_scenes`` the scenes refused whole; ``bad_inputs`` each bad file once, with the first window that
    needed it.
    """
    entries, bad_inputs, failed, sensorless, failed_scenes, seen = [], [], [], [], [], set()

    def note(token: str, bad: tuple[dict, ...]) -> None:
        for item in bad:
            key = (item["file"], item["reason"])
            if key not in seen:
                seen.add(key)
                bad_inputs.append({"sample_token": token, **item})

    for result in results:
        if result.scene_error and not any(f["scene"] == result.scene_name for f in failed_scenes):
            failed_scenes.append({"scene": result.scene_name, "error": result.scene_error})
        for token, relative, size, bad in result.windows:
            entries.append({"scene": result.scene_name, "sample_token": token, "file": relative, "bytes": size})
            note(token, bad)
        for token, bad in result.sensorless:
            sensorless.append({"scene": result.scene_name, "sample_token": token})
            note(token, bad)
        failed.extend(
            {"scene": result.scene_name, "sample_token": t, "error": e.splitlines()[0]} for t, e in result.failed
        )
    frame_bytes = sum(json.loads(p.read_text())["bytes"] for p in sorted(Path(config.out).glob("meta/*/*.frame.json")))
    return {
        "format": MANIFEST_FORMAT,
        "format_version": windows.FORMAT_VERSION,
        "config_hash": config.content_hash(),
        "config": config.content(),
        "dataset": {"dataroot": str(config.dataroot), "version": config.version, "split": config.split},
        "counts": {
            "scenes": len({r.scene_name for r in results if not r.scene_error}),
            "windows": len(entries),
            "sensorless_windows": len(sensorless),
            "failed_windows": len(failed),
            "failed_scenes": len(failed_scenes),
            "bad_inputs": len(bad_inputs),
            "window_bytes": sum(e["bytes"] for e in entries),
            "frame_bytes": frame_bytes,
        },
        "windows": entries,
        "splits": nuscenes_source.scene_splits({e["scene"] for e in entries}),
        "sensorless_windows": sensorless,
        "bad_inputs": bad_inputs,
        "failed_windows": failed,
        "failed_scenes": failed_scenes,
    }
