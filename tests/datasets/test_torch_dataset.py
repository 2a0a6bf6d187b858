"""WindowDataset, collate and WindowBatch on a tiny synthetic dataset (2 scenes of 4 s → 4 windows)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bevjepa.datasets import preprocess, torch_dataset, windows


@pytest.fixture(scope="module")
def windows_root(tmp_path_factory: pytest.TempPathFactory, synthetic_mini: Path) -> Path:
    base = tmp_path_factory.mktemp("torch_dataset")
    preprocess.preprocess(preprocess.PreprocessConfig(dataroot=synthetic_mini, out=base / "windows"), progress=False)
    return base / "windows"


@pytest.fixture(scope="module")
def dataset(windows_root: Path) -> torch_dataset.WindowDataset:
    return torch_dataset.WindowDataset(windows_root)


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _assert_batches_equal(a: torch_dataset.WindowBatch, b: torch_dataset.WindowBatch) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=field.name)
        else:
            assert x == y, field.name


def test_length_and_scene_filter(windows_root, dataset):
    manifest = _manifest(windows_root)
    assert len(dataset) == len(manifest["windows"]) == manifest["counts"]["windows"] == 4
    scene = manifest["windows"][0]["scene"]
    only = torch_dataset.WindowDataset(windows_root, scenes=[scene])
    assert len(only) == sum(e["scene"] == scene for e in manifest["windows"]) == 2
    assert {only[i].scene_name for i in range(len(only))} == {scene}
    with pytest.raises(ValueError, match="no-such-scene"):
        torch_dataset.WindowDataset(windows_root, scenes=["no-such-scene"])


def test_scene_batches_stream_each_scene_in_manifest_order(tmp_path, windows_root):
    root = tmp_path / "windows"
    shutil.copytree(windows_root, root)
    manifest = _manifest(root)
    by_scene: dict[str, list[dict]] = {}
    for entry in manifest["windows"]:
        by_scene.setdefault(entry["scene"], []).append(entry)
    first, second = sorted(by_scene)
    interleaved = [by_scene[second][0], by_scene[first][0], by_scene[second][1], by_scene[first][1]]
    (root / "manifest.json").write_text(json.dumps({**manifest, "windows": interleaved}))
    dataset = torch_dataset.WindowDataset(root)
    batches = list(dataset.scene_batches(3))
    assert [len(b) for b in batches] == [3, 1]
    streamed = [(s.scene_name, s.sample_token) for b in batches for s in b]
    expected = [(e["scene"], dataset[interleaved.index(e)].sample_token) for e in by_scene[first] + by_scene[second]]
    assert streamed == expected
    assert [len(b) for b in dataset.scene_batches(4)] == [4]
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        dataset.scene_batches(0)


def test_sample_shapes_and_dtypes(dataset):
    sample = dataset[0]
    p, t, f = 3, 12, 4
    hc, wc = dataset.image_hw
    assert (hc, wc) == (144, 256)
    n, a = sample.points.shape[0], sample.agent_count
    assert n > 0 and a > 0
    expected = {
        "points": ((n, 5), torch.float32),
        "points_frame": ((n,), torch.int64),
        "images": ((p, 6, 3, hc, wc), torch.uint8),
        "camera_mask": ((p, 6), torch.bool),
        "intrinsics": ((p, 6, 3, 3), torch.float32),
        "t0_from_camera": ((p, 6, 4, 4), torch.float32),
        "t0_from_ego": ((p, 4, 4), torch.float32),
        "actions": ((p - 1 + t, 3), torch.float32),
        "action_mask": ((p - 1 + t,), torch.bool),
        "ego_future": ((t, 3), torch.float32),
        "ego_future_mask": ((t,), torch.bool),
        "agent_class": ((a,), torch.int64),
        "agent_box": ((a, 7), torch.float32),
        "agent_velocity": ((a, 2), torch.float32),
        "agent_past": ((a, p, 2), torch.float32),
        "agent_past_mask": ((a, p), torch.bool),
        "agent_future": ((a, t, 2), torch.float32),
        "agent_future_mask": ((a, t), torch.bool),
        "occupancy": ((f + 1, 3, 128, 128), torch.bool),
        "instances": ((f + 1, 128, 128), torch.int64),
        "observed": ((128, 128), torch.bool),
    }
    for name, (shape, dtype) in expected.items():
        value = getattr(sample, name)
        assert tuple(value.shape) == shape, name
        assert value.dtype == dtype, name
    assert isinstance(sample.sample_token, str) and sample.sample_token == _first_entry(dataset)["sample_token"]
    assert set(sample.points_frame.unique().tolist()) == {0, 1, 2}
    assert sample.camera_mask.all()
    torch.testing.assert_close(sample.t0_from_ego[-1], torch.eye(4), atol=1e-5, rtol=0)


def _first_entry(dataset) -> dict:
    return dataset.entries[0]


def test_sample_rejects_a_wrong_shape(dataset):
    sample = dataset[0]
    with pytest.raises(ValueError, match=r"agent_box has shape \[\d+, 6\]"):
        dataclasses.replace(sample, agent_box=sample.agent_box[:, :6])
    with pytest.raises(ValueError, match="points_frame must be torch.int64"):
        dataclasses.replace(sample, points_frame=sample.points_frame.to(torch.int32))


def test_points_are_the_frames_points_moved_into_t0(windows_root, dataset):
    entry = _first_entry(dataset)
    sample = dataset[0]
    window = windows.load_window(windows_root / entry["file"])
    frames = [windows.load_frame(dataset.frame_path(entry["scene"], str(t))) for t in window.keyframe_tokens]
    # t0: t0_from_ego is the identity, so the points are the t0 frame's own.
    t0_points = sample.points[sample.points_frame == 2].numpy()
    np.testing.assert_allclose(t0_points, frames[-1].points, atol=1e-4)
    # A past frame: its points moved with t0_from_ego (float64 here) and their lag grown by the frame's age.
    for p in (0, 1):
        frame = frames[p]
        xyz = frame.points[:, :3].astype(np.float64) @ window.t0_from_ego[p][:3, :3].T + window.t0_from_ego[p][:3, 3]
        lag = frame.points[:, 4] + (window.timestamp_us - frame.timestamp_us) * 1e-6
        moved = sample.points[sample.points_frame == p].numpy()
        np.testing.assert_allclose(moved[:, :3], xyz, atol=1e-3)
        np.testing.assert_allclose(moved[:, 3], frame.points[:, 3])
        np.testing.assert_allclose(moved[:, 4], lag, atol=1e-5)
        assert not np.allclose(moved[:, :2], frame.points[:, :2], atol=0.1)  # the ego did move


def test_images_are_the_stored_jpegs(dataset):
    entry = _first_entry(dataset)
    sample = dataset[0]
    tokens = [str(t) for t in windows.load_window(dataset.root / entry["file"]).keyframe_tokens]
    for p, c in ((2, 0), (0, 5)):
        frame = windows.load_frame(dataset.frame_path(entry["scene"], tokens[p]))
        stored = frame.image(c)
        assert stored is not None
        np.testing.assert_array_equal(sample.images[p, c].permute(1, 2, 0).numpy(), stored)
        np.testing.assert_array_equal(sample.intrinsics[p, c].numpy(), frame.intrinsics[c])


def test_a_lidar_only_dataset_skips_the_cameras_and_keeps_everything_else(windows_root, dataset):
    lidar_only = torch_dataset.WindowDataset(windows_root, cameras=False, future_inputs=True)
    with_cameras, without = torch_dataset.WindowDataset(windows_root, future_inputs=True)[0], lidar_only[0]
    assert without.images.shape == with_cameras.images.shape and int(without.images.max()) == 0
    assert not bool(without.camera_mask.any()) and bool(with_cameras.camera_mask.any())
    assert not bool(without.future.camera_mask.any()) and int(without.future.images.max()) == 0
    for name in ("points", "points_frame", "t0_from_ego", "agent_box", "occupancy", "observed"):
        assert torch.equal(getattr(without, name), getattr(with_cameras, name)), name
    assert torch.equal(without.future.points, with_cameras.future.points)


def test_collate_pads_agents(dataset):
    samples = [dataset[i] for i in range(len(dataset))]
    counts = [s.agent_count for s in samples]
    assert len(set(counts)) > 1, counts  # the two scenes have different agent counts
    # And one sample with no agents at all.
    empty = dataclasses.replace(
        samples[0], **{name: getattr(samples[0], name)[:0] for name in torch_dataset._AGENT_FIELDS}
    )
    samples.append(empty)
    counts.append(0)
    batch = torch_dataset.collate(samples)
    a_max = max(counts)
    assert batch.batch_size == len(samples)
    assert batch.agent_mask.shape == (len(samples), a_max)
    assert batch.agent_mask.sum(1).tolist() == counts
    assert batch.agent_box.shape == (len(samples), a_max, 7)
    assert batch.agent_past.shape == (len(samples), a_max, 3, 2)
    assert batch.agent_future_mask.shape == (len(samples), a_max, 12)
    for b, (sample, count) in enumerate(zip(samples, counts, strict=True)):
        assert batch.agent_mask[b, :count].all() and not batch.agent_mask[b, count:].any()
        for name in torch_dataset._AGENT_FIELDS:
            padded = getattr(batch, name)[b]
            torch.testing.assert_close(padded[:count], getattr(sample, name), rtol=0, atol=0, equal_nan=True)
            assert not padded[count:].any(), name  # zeros and False in the padding
    assert batch.sample_tokens == tuple(s.sample_token for s in samples)
    assert batch.images.shape == (len(samples), 3, 6, 3, *dataset.image_hw)
    assert batch.occupancy.shape == (len(samples), 5, 3, 128, 128)


def test_points_batch_indexes_back_to_the_sample(dataset):
    samples = [dataset[i] for i in (3, 0, 2)]
    batch = torch_dataset.collate(samples)
    assert batch.points.shape[0] == sum(s.points.shape[0] for s in samples)
    assert torch.all(batch.points_batch[1:] >= batch.points_batch[:-1])
    for b, sample in enumerate(samples):
        torch.testing.assert_close(batch.points[batch.points_batch == b], sample.points, rtol=0, atol=0)
        torch.testing.assert_close(batch.points_frame[batch.points_batch == b], sample.points_frame)


def test_batch_to_device_returns_a_new_batch(dataset):
    batch = torch_dataset.collate([dataset[0]])
    moved = batch.to("cpu")
    assert moved is not batch and moved.points.device.type == "cpu"
    _assert_batches_equal(batch, moved)
    if torch.cuda.is_available():
        on_gpu = batch.to("cuda")
        assert on_gpu.images.is_cuda and on_gpu.points_batch.is_cuda
        _assert_batches_equal(batch, on_gpu.to("cpu"))


def test_dataloader_workers_match_the_main_process(windows_root):
    dataset = torch_dataset.WindowDataset(windows_root)
    serial = list(DataLoader(dataset, batch_size=3, num_workers=0, collate_fn=torch_dataset.collate))
    parallel = list(DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=torch_dataset.collate))
    assert [b.batch_size for b in serial] == [3, 1]
    assert len(parallel) == len(serial)
    for a, b in zip(serial, parallel, strict=True):
        assert isinstance(b, torch_dataset.WindowBatch)
        _assert_batches_equal(a, b)


def test_frame_cache_is_bounded_and_reused(windows_root):
    dataset = torch_dataset.WindowDataset(windows_root, frame_cache_size=3)
    dataset[0]
    first = dict(dataset._frames)
    assert len(first) == 3
    dataset[1]  # shares two frames with window 0
    assert len(dataset._frames) == 3
    shared = set(first) & set(dataset._frames)
    assert len(shared) == 2 and all(dataset._frames[k] is first[k] for k in shared)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*bevjepa preprocess"):
        torch_dataset.WindowDataset(tmp_path)


def test_wrong_manifest_format_is_rejected(tmp_path, windows_root):
    manifest = _manifest(windows_root)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(ValueError, match="something-else"):
        torch_dataset.WindowDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    with pytest.raises(ValueError, match="format_version 999"):
        torch_dataset.WindowDataset(tmp_path)


def test_deleted_window_file_names_the_file(tmp_path, windows_root):
    root = tmp_path / "windows"
    shutil.copytree(windows_root, root)
    dataset = torch_dataset.WindowDataset(root)
    victim = root / dataset.entries[1]["file"]
    victim.unlink()
    dataset[0]  # the others still load
    with pytest.raises(FileNotFoundError, match=re.escape(str(victim))):
        dataset[1]
    frame = dataset.frame_path(dataset.entries[2]["scene"], dataset.entries[2]["sample_token"])
    frame.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(frame))):
        dataset[2]


def test_image_size_falls_back_to_the_manifest_width(tmp_path, windows_root):
    # A copy whose frames have no cameras: the size comes from image_width_px and the nuScenes aspect.
    root = tmp_path / "windows"
    shutil.copytree(windows_root, root, ignore=shutil.ignore_patterns("frames"))
    dataset = torch_dataset.WindowDataset(root)
    assert dataset.image_hw == (144, 256)
    assert torch_dataset.WindowDataset(root, image_hw=(10, 20)).image_hw == (10, 20)


def test_loader_throughput_reports_rates(windows_root):
    report = torch_dataset.loader_throughput(windows_root, batch_size=2)
    assert report["windows"] == 4
    assert report["loader_windows_per_s"] > 0 and report["plain_windows_per_s"] > 0


def test_future_inputs_for_the_target_encoder(windows_root):
    dataset = torch_dataset.WindowDataset(windows_root, future_inputs=True)
    sample = dataset[0]
    window = windows.load_window(windows_root / _manifest(windows_root)["windows"][0]["file"])
    future = sample.future
    assert future is not None and future.images.shape[0] == len(window.future_keyframe_tokens) == 4
    frame = dataset.frame(sample.scene_name, str(window.future_keyframe_tokens[0]))
    pose = window.t0_from_future_ego[0]
    expected = frame.points[:, :3].astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
    np.testing.assert_allclose(future.points[future.points_frame == 0, :3].numpy(), expected, atol=1e-3)
    batch = torch_dataset.collate([sample, dataset[1]])
    assert batch.future is not None and batch.future.images.shape[:2] == (2, 4)
    assert int(batch.future.points_batch.max()) == 1
    assert torch_dataset.WindowDataset(windows_root)[0].future is None
