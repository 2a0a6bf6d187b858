"""Shared fixtures: the real nuScenes data in ``../shared/realdata`` (skipped where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One torch (OpenMP) thread in the tests and in every process they start (CLI runs, Ray workers), unless
# OMP_NUM_THREADS is set: the models are tiny and the tests start processes of their own. On a two-core machine with
# the other core busy a second thread makes each small operation wait for the scheduler (a 2-step training took 52 s
# on two threads, 13 s on one); on a quiet one the whole suite ran faster on one thread too (405 s against 427 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"
"""Real driving data, read in place (see its README.md); never copied into the project."""

SCENE_0916 = "nuscenes-scene-0916"
"""A v1.0-mini dataroot holding scene-0916: all tables, sensor files for the first 5 keyframes."""


@pytest.fixture(scope="session")
def realdata_root() -> Path:
    """``../shared/realdata``, or skip the test where it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="session")
def real_scene_nusc(realdata_root: Path):
    """``NuScenes('v1.0-mini')`` over the scene-0916 dataroot, loaded once per session."""
    dataroot = realdata_root / SCENE_0916
    if not (dataroot / "v1.0-mini").is_dir():
        pytest.skip(f"nuScenes scene-0916 not found at {dataroot}")
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version="v1.0-mini", dataroot=str(dataroot), verbose=False)


@pytest.fixture(scope="session")
def real_scene_val_poses(real_scene_nusc) -> dict:
    """{sample token: [4, 4] its LiDAR keyframe's ego pose (global from ego, m)} of scene-0916's mini_val samples."""
    from bevjepa.datasets import geometry
    from bevjepa.evaluation import detection_eval

    poses = {}
    for token in detection_eval.split_sample_tokens(real_scene_nusc, "mini_val"):
        lidar = real_scene_nusc.get("sample_data", real_scene_nusc.get("sample", token)["data"]["LIDAR_TOP"])
        pose = real_scene_nusc.get("ego_pose", lidar["ego_pose_token"])
        poses[token] = geometry.RigidTransform.from_quaternion(pose["rotation"], pose["translation"]).matrix
    return poses


@pytest.fixture(scope="session")
def synthetic_mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic v1.0-mini written by the simulator: 2 scenes of 4 s (8 keyframes each)."""
    from bevjepa.sim import synth

    out = tmp_path_factory.mktemp("synthetic") / "mini"
    synth.synthesize(synth.SynthConfig(out=out, scenes=2, duration_s=4.0, seed=1, agents=(8, 2, 6, 2)), progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_windows(synthetic_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic_mini`` preprocessed into windows: 2 per scene, one scene in mini_train and one in mini_val."""
    from bevjepa.datasets import preprocess

    out = tmp_path_factory.mktemp("windows") / "mini"
    preprocess.preprocess(preprocess.PreprocessConfig(dataroot=synthetic_mini, out=out), progress=False)
    return out


@pytest.fixture(scope="session")
def light_config():
    """``small`` cut down for tests that need *a* trained world model, not ``small`` itself: the LiDAR alone, 16
    latent channels, a narrow PointNet, fine LiDAR stage, predictor and decoder; one window per validation; no loader
    process.

    It is still the whole model (encoder with its fine maps, EMA target encoder, action-conditioned predictor, every
    head and loss), at about a seventh of ``small``'s step time on the CPU.
    """
    import dataclasses

    from bevjepa.prediction import config as experiment_config

    config = experiment_config.small()
    model, channels = config.model, 16
    model = dataclasses.replace(
        model,
        use_camera=False,
        camera=dataclasses.replace(model.camera, channels=channels),
        lidar=dataclasses.replace(model.lidar, channels=channels, pointnet_width=8, fine_width=8),
        fuser=dataclasses.replace(model.fuser, camera_channels=channels, lidar_channels=channels, channels=channels),
        predictor=dataclasses.replace(model.predictor, channels=channels, hidden=32),
        decoder_widths=(8, 16),
    )
    settings = {"val_every": 100, "val_batches": 1, "loader_workers": 0}
    return dataclasses.replace(config, model=model, train=dataclasses.replace(config.train, **settings))


@pytest.fixture(scope="session")
def light_config_file(light_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``light_config`` as a JSON config file, for ``bevjepa train --config``."""
    import json

    from bevjepa.prediction import config as experiment_config

    path = tmp_path_factory.mktemp("light-config") / "light.json"
    path.write_text(json.dumps(experiment_config.to_dict(light_config), indent=1))
    return path


def _train_one_step(preset, windows: Path, run: Path) -> Path:
    """A run of ``preset`` (a name or an ``ExperimentConfig``) trained one step on ``windows`` into ``run``."""
    import dataclasses

    from bevjepa.prediction import config as experiment_config
    from bevjepa.prediction import train

    config = experiment_config.preset(preset) if isinstance(preset, str) else preset
    settings = {"steps": 1, "val_every": 1, "val_batches": 1, "loader_workers": 0}
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **settings))
    train.train(windows, run, config, progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_windows: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the ``small`` model trained one step on ``synthetic_windows`` (shared: do not write into it)."""
    return _train_one_step("small", synthetic_windows, tmp_path_factory.mktemp("tiny-checkpoint") / "run")


@pytest.fixture(scope="session")
def tiny_direct_checkpoint(synthetic_windows: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the ``direct`` baseline trained one step on ``synthetic_windows`` (shared: do not write)."""
    return _train_one_step("direct", synthetic_windows, tmp_path_factory.mktemp("tiny-direct") / "run")


@pytest.fixture(scope="session")
def light_checkpoint(light_config, synthetic_windows: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of ``light_config`` trained one step on ``synthetic_windows``, for tests that need *a* trained
    world model and do not look at the cameras (shared: do not write into it)."""
    return _train_one_step(light_config, synthetic_windows, tmp_path_factory.mktemp("light-checkpoint") / "run")


@pytest.fixture
def thresholded_run(light_checkpoint: Path, synthetic_windows: Path, tmp_path: Path) -> Path:
    """A copy of ``light_checkpoint`` (this test's own) after ``bevjepa thresholds --windows 2`` on mini_train."""
    import shutil

    from bevjepa.tools import cli

    run = tmp_path / "thresholded-run"
    shutil.copytree(light_checkpoint, run)
    assert cli.main(["thresholds", "--checkpoint", str(run), "--data", str(synthetic_windows), "--windows", "2"]) == 0
    return run
