"""The nuScenes source against the devkit: multi-sweep aggregation, boxes, cameras, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from nuscenes.utils.data_classes import LidarPointCloud
from pyquaternion import Quaternion

from bevjepa.datasets import categories, nuscenes_source, types


def _devkit_multisweep_in_ego(nusc, sample_token: str, sweeps: int) -> np.ndarray:
    """The devkit's aggregation (reference sensor frame) moved into the keyframe's ego frame: [N, 5]."""
    sample = nusc.get("sample", sample_token)
    cloud, times = LidarPointCloud.from_file_multisweep(nusc, sample, "LIDAR_TOP", "LIDAR_TOP", nsweeps=sweeps)
    reference = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    calibration = nusc.get("calibrated_sensor", reference["calibrated_sensor_token"])
    xyz = Quaternion(calibration["rotation"]).rotation_matrix @ cloud.points[:3].astype(np.float64)
    xyz += np.array(calibration["translation"])[:, None]
    return np.concatenate([xyz.T, cloud.points[3:4].T, times.T], axis=1)


def test_multisweep_aggregation_equals_the_devkit(synthetic_mini):
    source = nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(synthetic_mini))
    tokens = source.scene_sample_tokens(source.scenes[0])
    for token in (tokens[0], tokens[3], tokens[-1]):
        ours = source.aggregate_lidar(token, bad := [])
        devkit = _devkit_multisweep_in_ego(source.nusc, token, 10)
        assert bad == []
        assert ours.shape == devkit.shape
        np.testing.assert_allclose(ours[:, :3], devkit[:, :3], atol=1e-4)
        np.testing.assert_array_equal(ours[:, 3], devkit[:, 3])
        np.testing.assert_allclose(ours[:, 4], devkit[:, 4], atol=1e-6)
    assert np.unique(ours[:, 4]).size == 10  # ten sweeps, 50 ms apart
    np.testing.assert_allclose(np.unique(ours[:, 4]), np.arange(10) * 0.05, atol=1e-6)


def test_keyframe_boxes_cameras_and_classes(synthetic_mini):
    source = nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(synthetic_mini, image_width_px=200))
    token = source.scene_sample_tokens(source.scenes[0])[4]
    keyframe = source.keyframe(token)
    assert [c.channel for c in keyframe.cameras] == list(types.CAMERA_CHANNELS)
    image = keyframe.cameras[0]
    assert image.image.shape == (112, 200, 3)
    # Intrinsics scaled with the image: the principal point stays at the same relative place.
    record = source.nusc.get("sample_data", source.nusc.get("sample", token)["data"]["CAM_FRONT"])
    full = np.array(source.nusc.get("calibrated_sensor", record["calibrated_sensor_token"])["camera_intrinsic"])
    np.testing.assert_allclose(image.intrinsics[0, 2] / 200, full[0, 2] / record["width"], rtol=1e-9)
    # Boxes are in the ego frame: moved back to global they sit where the devkit's annotations are.
    annotations = {
        a["instance_token"]: a
        for a in (source.nusc.get("sample_annotation", t) for t in source.nusc.get("sample", token)["anns"])
    }
    assert keyframe.boxes
    for box in keyframe.boxes:
        annotation = annotations[box.instance_id]
        np.testing.assert_allclose(keyframe.global_from_ego.apply(box.center_m), annotation["translation"], atol=1e-6)
        assert categories.class_index(box.category) >= 0


def test_wrong_dataroot_version_and_split_are_clear(tmp_path, synthetic_mini):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no v1.0-trainval/ tables folder"):
        nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(synthetic_mini, version="v1.0-trainval"))
    with pytest.raises(ValueError, match="unknown split"):
        nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(synthetic_mini, split="mini_test"))


def test_damaged_files_become_bad_inputs(tmp_path, synthetic_mini):
    root = tmp_path / "damaged"
    shutil.copytree(synthetic_mini, root)
    source = nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(root))
    token = source.scene_sample_tokens(source.scenes[0])[5]
    sample = source.nusc.get("sample", token)
    keyframe_sd = source.nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    chain = [keyframe_sd]
    while len(chain) < 4:
        chain.append(source.nusc.get("sample_data", chain[-1]["prev"]))
    (root / chain[1]["filename"]).unlink()  # missing
    data = (root / chain[2]["filename"]).read_bytes()
    (root / chain[2]["filename"]).write_bytes(data[: len(data) - 7])  # truncated
    points = np.fromfile(root / chain[3]["filename"], dtype=np.float32).reshape(-1, 5)
    points[:10, 0] = np.nan
    points.tofile(root / chain[3]["filename"])  # NaNs
    camera = source.nusc.get("sample_data", sample["data"]["CAM_BACK"])
    (root / camera["filename"]).unlink()

    keyframe = source.keyframe(token)
    reasons = {b.file: b.reason for b in keyframe.bad_inputs}
    assert reasons[chain[1]["filename"]] == "missing file"
    assert reasons[chain[2]["filename"]].startswith("truncated")
    assert reasons[chain[3]["filename"]] == "10 points with NaN or inf removed"
    assert reasons[camera["filename"]] == "missing file"
    assert "CAM_BACK" not in [c.channel for c in keyframe.cameras] and len(keyframe.cameras) == 5
    assert np.isfinite(keyframe.lidar_points).all()
    assert np.unique(keyframe.lidar_points[:, 4]).size == 8  # the missing and truncated sweeps are skipped
    empty = root / chain[0]["filename"]
    empty.write_bytes(b"")
    assert any(b.reason.startswith("empty sweep") for b in source.keyframe(token).bad_inputs)


def test_the_real_scene_with_its_missing_sweeps(real_scene_nusc, realdata_root):
    dataroot = Path(real_scene_nusc.dataroot)
    source = nuscenes_source.NuScenesSource(nuscenes_source.SourceConfig(dataroot), nusc=real_scene_nusc)
    tokens = source.scene_sample_tokens(source.scenes[0])
    assert len(tokens) == 41
    first = source.keyframe(tokens[0])  # the scene's first sweep: nothing before it
    devkit = _devkit_multisweep_in_ego(real_scene_nusc, tokens[0], 10)
    np.testing.assert_allclose(first.lidar_points[:, :3], devkit[:, :3], atol=1e-4)
    assert len(first.cameras) == 6 and first.bad_inputs == ()
    second = source.keyframe(tokens[1])  # its keyframe file exists, the sweeps before it do not
    assert len(second.bad_inputs) == 9
    assert all(b.reason == "missing file" and b.file.startswith("sweeps/LIDAR_TOP/") for b in second.bad_inputs)
    assert np.all(second.lidar_points[:, 4] == 0) and len(second.lidar_points) > 20_000
    later = source.keyframe(tokens[20])  # tables only: no sensor file at all
    assert len(later.lidar_points) == 0 and later.cameras == () and len(later.boxes) > 10
