"""``bevjepa synth``: write a synthetic dataset in the nuScenes format, scenes in parallel, atomically.

The dataset is assembled in a hidden sibling folder and renamed into place at the end, so an interrupted or
failed run leaves nothing at ``out`` (a stale ``.out.partial-*`` folder from a killed run is removed by the next).
The same seed gives the same bytes whatever the number of workers: every random choice of a scene derives from
the dataset seed and the scene's index.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from nuscenes.utils.splits import create_splits_scenes
from tqdm import tqdm

from bevjepa.datasets import workers
from bevjepa.sim import layouts, scenario, sensors, writer

VERSIONS = ("v1.0-mini", "v1.0-trainval")
FIRST_TIMESTAMP_US = 1_533_151_603_547_590
"""2018-08-01, when the first scene starts; later scenes start a day apart."""


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic dataset to write.

    Attributes:
        out: the dataset root to create; it must not exist or be an empty folder.
        scenes: how many scenes.
        seed: the dataset seed.
        duration_s: length of each scene (s); keyframes every 0.5 s.
        version: ``v1.0-mini`` (real mini scene names, at most 10) or ``v1.0-trainval`` (real train/val names).
        layouts: the layouts to cycle through, scene by scene.
        workers: parallel scene writers; more than one runs them as Ray tasks.
        address: a Ray cluster to run on (its workers must see ``out``); None starts Ray locally.
        agents: the agent mix of every scene (vehicles, parked, pedestrians, cyclists).
        lidar: the LiDAR's configuration.
        cameras: the cameras' configuration.
    """

    out: Path
    scenes: int = 10
    seed: int = 0
    duration_s: float = 20.0
    version: str = "v1.0-mini"
    layouts: tuple[str, ...] = ("intersection", "straight", "t_junction")
    workers: int = 1
    address: str | None = None
    agents: tuple[int, int, int, int] = (14, 8, 12, 3)
    lidar: sensors.LidarConfig = field(default_factory=sensors.LidarConfig)
    cameras: sensors.CameraConfig = field(default_factory=sensors.CameraConfig)

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"--version: {self.version!r} is not supported; choose one of {list(VERSIONS)}")
        if self.scenes < 1:
            raise ValueError(f"--scenes must be at least 1, got {self.scenes}")
        limit = len(scene_names(self.version, None))
        if self.scenes > limit:
            raise ValueError(
                f"--scenes: {self.version} has {limit} scene names, {self.scenes} asked for"
                + ("; use --version v1.0-trainval for more" if self.version == "v1.0-mini" else "")
            )
        if not self.duration_s > 0:
            raise ValueError(f"--duration must be positive, got {self.duration_s} s")
        if not self.layouts:
            raise ValueError("--layouts: give at least one layout")
        for name in self.layouts:
            if name not in layouts.LAYOUTS:
                raise ValueError(f"--layouts: unknown layout {name!r}; choose from {sorted(layouts.LAYOUTS)}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if any(n < 0 for n in self.agents):
            raise ValueError(f"agent counts must not be negative, got {self.agents}")


@dataclass(frozen=True)
class SynthReport:
    """What a synth run wrote and how long it took."""

    out: Path
    version: str
    scene_names: tuple[str, ...]
    keyframes: int
    sweeps: int
    images: int
    lidar_returns: int
    wall_time_s: float


def scene_names(version: str, count: int | None) -> list[str]:
    """The real nuScenes scene names to use, validation scenes spread among the training ones.

    For ``v1.0-mini`` the order puts both ``mini_val`` scenes among the first four, so that even a small dataset
    has the devkit's ``mini_train`` and ``mini_val`` splits; for ``v1.0-trainval`` every sixth scene is a ``val``
    scene.
    """
    splits = create_splits_scenes()
    if version == "v1.0-mini":
        train, val = list(splits["mini_train"]), list(splits["mini_val"])
        names = [train[0], val[0], train[1], val[1], *train[2:]]
    else:
        train, val = list(splits["train"]), list(splits["val"])
        names = []
        while train or val:
            source = val if (len(names) % 6 == 1 and val) or not train else train
            names.append(source.pop(0))
    return names if count is None else names[:count]


def scene_specs(config: SynthConfig) -> list[writer.SceneSpec]:
    """One spec per scene: the layout cycles through ``config.layouts``; seeds derive from the dataset seed."""
    vehicles, parked, pedestrians, cyclists = config.agents
    specs = []
    for index, name in enumerate(scene_names(config.version, config.scenes)):
        scene = scenario.ScenarioConfig(
            layout=config.layouts[index % len(config.layouts)],
            seed=config.seed * 100_003 + index,
            duration_s=config.duration_s,
            vehicles=vehicles,
            parked=parked,
            pedestrians=pedestrians,
            cyclists=cyclists,
        )
        specs.append(
            writer.SceneSpec(
                index,
                name,
                scene,
                config.seed,
                FIRST_TIMESTAMP_US + index * 86_400_000_000,
                config.lidar,
                config.cameras,
            )
        )
    return specs


def check_output_folder(out: Path) -> None:
    """Refuse an ``out`` that exists and is not an empty folder, before any work starts."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty folder; choose a new path or remove it")


def synthesize(config: SynthConfig, progress: bool = True) -> SynthReport:
    """Write the dataset that ``config`` describes at ``config.out``; nothing is left there if it fails."""
    out = Path(config.out).absolute()
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{time.time_ns()}"
    staging.mkdir()
    specs = scene_specs(config)
    start = time.perf_counter()
    pool = workers.make_pool(config.workers, config.address)
    try:
        results: list[writer.SceneRecords | None] = [None] * len(specs)
        with tqdm(total=len(specs), desc="synth scenes", unit="scene", disable=not progress) as bar:
            for index, records in pool.map_unordered(partial(writer.write_scene, root=staging), specs):
                results[index] = records
                bar.update()
        scenes = [r for r in results if r is not None]
        writer.write_tables(staging, config.version, scenes)
        resolved = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(config).items()
            if k not in ("lidar", "cameras")
        }
        resolved["lidar"] = {k: v for k, v in asdict(config.lidar).items() if k != "ego_from_sensor"}
        resolved["cameras"] = asdict(config.cameras)
        resolved.pop("out")
        resolved.pop("workers")
        resolved.pop("address")
        (staging / "synth_config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
        if out.exists():
            out.rmdir()  # empty, as checked
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if isinstance(pool, workers.RayPool):
            pool.close()
    return SynthReport(
        out,
        config.version,
        tuple(s.name for s in specs),
        sum(s.keyframes for s in scenes),
        sum(s.sweeps for s in scenes),
        sum(s.images for s in scenes),
        sum(s.returns for s in scenes),
        time.perf_counter() - start,
    )
