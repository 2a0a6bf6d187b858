"""Hostile tables and damaged files through the real ``bevjepa preprocess``: nothing read or written outside its
folders, and bad input recorded with a message that names the token, the file and the reason."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevjepa.datasets import nuscenes_source, preprocess, types, windows
from bevjepa.tools import cli


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-link a file (no space, and not a symbolic link, so it stays inside its dataroot), or copy it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _dataset_copy(source: Path, root: Path) -> tuple[Path, dict[str, list[dict]]]:
    """A copy of a dataroot whose files are hard links: replace a file (unlink, write), never write into one."""
    shutil.copytree(source, root, copy_function=_link_or_copy)
    tables = {}
    for name in ("sample_data", "sample", "scene", "map"):
        path = root / "v1.0-mini" / f"{name}.json"
        path.unlink()  # the copy's own table, edited freely
        tables[name] = json.loads((source / "v1.0-mini" / f"{name}.json").read_text())
        path.write_text(json.dumps(tables[name]))
    return root, tables


def _save_tables(root: Path, tables: dict[str, list[dict]]) -> None:
    for name, records in tables.items():
        (root / "v1.0-mini" / f"{name}.json").write_text(json.dumps(records))


def _snapshot(folder: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every file, link and folder under ``folder`` (not under ``skip``); files and links with size and mtime."""
    found = {}
    for path in folder.rglob("*"):
        if not any(path == s or s in path.parents for s in skip):
            info = path.lstat()
            found[str(path.relative_to(folder))] = (0, 0) if path.is_dir() else (info.st_size, info.st_mtime_ns)
    return found


def _keyframe_records(root: Path, tables: dict, scene_index: int, keyframe_index: int) -> tuple[str, dict[str, dict]]:
    """A keyframe of the scene ``scene_index`` (by name) and its sample_data records by channel."""
    scene = sorted(tables["scene"], key=lambda s: s["name"])[scene_index]
    samples = {s["token"]: s for s in tables["sample"]}
    token = scene["first_sample_token"]
    for _ in range(keyframe_index):
        token = samples[token]["next"]
    by_token = {r["token"]: r for r in tables["sample_data"]}
    records = {}
    for record in tables["sample_data"]:
        if record["sample_token"] == token and record["is_key_frame"]:
            channel = record["filename"].split("/")[1]
            records[channel] = by_token[record["token"]]
    return token, records


@pytest.fixture()
def dataset(synthetic_mini, tmp_path) -> tuple[Path, dict]:
    return _dataset_copy(synthetic_mini, tmp_path / "data")


def test_file_names_that_leave_the_dataroot_are_bad_inputs_and_never_read(dataset, tmp_path, capsys):
    root, tables = dataset
    # Files outside the dataroot that a hostile table points at: a real JPEG and real LiDAR points.
    outside_jpeg, outside_lidar = tmp_path / "outside.jpg", tmp_path / "outside.pcd.bin"
    Image.fromarray(np.full((90, 160, 3), (255, 0, 0), dtype=np.uint8)).save(outside_jpeg)
    np.tile(np.array([[5.0, 5.0, 0.0, 100.0, 0.0]], dtype=np.float32), (200, 1)).tofile(outside_lidar)
    token, records = _keyframe_records(root, tables, scene_index=0, keyframe_index=2)  # an input of the first window
    hostile = {
        "CAM_FRONT": "../outside.jpg",
        "CAM_BACK": str(outside_jpeg),  # absolute
        "CAM_FRONT_LEFT": "samples/../../outside.jpg",
        "LIDAR_TOP": "../outside.pcd.bin",
    }
    for channel, filename in hostile.items():
        records[channel]["filename"] = filename
    _save_tables(root, tables)

    out = tmp_path / "jobs" / "w"
    out.parent.mkdir()
    before = _snapshot(tmp_path, skip=(out,))
    assert cli.main(["preprocess", "--dataroot", str(root), "--out", str(out), "--sweeps", "1"]) == 0
    assert "4 windows" in capsys.readouterr().out
    assert _snapshot(tmp_path, skip=(out,)) == before  # nothing written outside --out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["windows"] == 4 and manifest["counts"]["failed_windows"] == 0
    listed = {b["file"]: b for b in manifest["bad_inputs"]}
    for channel, filename in hostile.items():
        item = listed[filename]
        assert item["sample_token"] == token
        assert item["reason"].startswith("unsafe path, not read: ")
        assert f"sample_data {records[channel]['token']} filename {filename!r}" in item["reason"]

    # The keyframe's frame holds none of the outside files: those cameras are missing, and with one sweep its
    # only LiDAR file was refused.
    frame = windows.load_frame(out / "frames" / sorted(s["name"] for s in tables["scene"])[0] / f"{token}.npz")
    missing = {types.CAMERA_CHANNELS[c] for c in np.flatnonzero(~frame.camera_mask)}
    assert missing == {"CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT"}
    assert len(frame.points) == 0
    assert {b["file"] for b in json.loads(frame.bad_inputs)} == set(hostile.values())

    # --strict stops at the first of them and names it.
    code = cli.main(["preprocess", "--dataroot", str(root), "--out", str(tmp_path / "strict"), "--strict"])
    assert code == 1
    error = capsys.readouterr().err
    assert "--strict: bad input" in error and "unsafe path" in error and any(f in error for f in hostile.values())


@pytest.mark.parametrize("hostile", ["../../escape", "ABSOLUTE"])
def test_a_scene_name_that_is_not_a_folder_name_is_refused_and_the_others_go_on(dataset, tmp_path, capsys, hostile):
    root, tables = dataset
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "absolute-escape")
    scenes = sorted(tables["scene"], key=lambda s: s["name"])
    good = scenes[1]["name"]
    scenes[0]["name"] = hostile
    _save_tables(root, tables)

    out = tmp_path / "jobs" / "w"
    out.parent.mkdir()
    before = _snapshot(tmp_path, skip=(out,))
    assert cli.main(["preprocess", "--dataroot", str(root), "--out", str(out), "--sweeps", "1"]) == 0
    printed = capsys.readouterr()
    assert _snapshot(tmp_path, skip=(out,)) == before  # nothing written outside --out
    assert not Path(tmp_path / "absolute-escape").exists()
    assert f"scene {hostile!r} refused" in printed.err and "cannot be used as a file name" in printed.err
    for kind in ("frames", "windows", "meta"):
        assert [p.name for p in (out / kind).iterdir()] == [good]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["failed_scenes"] == 1 and manifest["counts"]["scenes"] == 1
    assert manifest["failed_scenes"][0]["scene"] == hostile
    assert manifest["counts"]["windows"] == 2 and {w["scene"] for w in manifest["windows"]} == {good}

    # --strict stops at the refused scene and names it.
    code = cli.main(["preprocess", "--dataroot", str(root), "--out", str(tmp_path / "strict"), "--strict"])
    assert code == 1
    assert f"scene {hostile!r} refused" in capsys.readouterr().err
    assert _snapshot(tmp_path, skip=(out, tmp_path / "strict")) == before


def test_a_map_file_name_outside_the_dataroot_is_refused_before_loading_and_linked_sensor_folders_are_read(
    dataset, synthetic_mini, tmp_path, capsys
):
    root, tables = dataset
    tables["map"][0]["filename"] = "../../etc/passwd"
    _save_tables(root, tables)
    assert cli.main(["preprocess", "--dataroot", str(root), "--out", str(tmp_path / "w")]) == 2
    error = capsys.readouterr().err
    assert f"map {tables['map'][0]['token']} filename '../../etc/passwd'" in error and "repair the table" in error
    assert not (tmp_path / "w").exists()

    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copytree(synthetic_mini / "v1.0-mini", linked / "v1.0-mini")
    shutil.copytree(synthetic_mini / "maps", linked / "maps")
    (linked / "samples").symlink_to(synthetic_mini / "samples")  # sensor files on another disk: the user's setup
    (linked / "sweeps").symlink_to(synthetic_mini / "sweeps")
    assert cli.main(["preprocess", "--dataroot", str(linked), "--out", str(tmp_path / "w2"), "--sweeps", "1"]) == 0
    manifest = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert manifest["counts"]["windows"] == 4 and not manifest["bad_inputs"]


def test_an_unreadable_jpeg_is_named_with_the_decoder_reason(dataset, tmp_path, capsys):
    root, tables = dataset
    token, records = _keyframe_records(root, tables, scene_index=0, keyframe_index=2)
    garbage, truncated = records["CAM_FRONT"]["filename"], records["CAM_BACK"]["filename"]
    (root / garbage).unlink()  # hard links: replace the copy's file, never write into the shared one
    (root / garbage).write_bytes(b"this is not an image at all")
    data = (root / truncated).read_bytes()
    (root / truncated).unlink()
    (root / truncated).write_bytes(data[: len(data) // 2])

    out = tmp_path / "w"
    assert cli.main(["preprocess", "--dataroot", str(root), "--out", str(out), "--sweeps", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {b["file"]: b["reason"] for b in manifest["bad_inputs"]}
    assert listed[garbage] == (
        "unreadable image: no image format recognised (JPEG decoder: not a JPEG file); 27 bytes, starting "
        "74 68 69 73 20 69 73 20"
    )
    assert listed[truncated].startswith("unreadable image: image file is truncated")
    assert not [reason for reason in listed.values() if "object at 0x" in reason or "BytesIO" in reason]

    code = cli.main(["preprocess", "--dataroot", str(root), "--out", str(tmp_path / "strict"), "--strict"])
    assert code == 1
    error = capsys.readouterr().err
    assert f"{garbage}: unreadable image: no image format recognised" in error and "0x" not in error


def test_a_sensor_path_check_names_the_token_and_the_path(tmp_path):
    (tmp_path / "root").mkdir()
    for filename in ("/etc/passwd", "../secret.jpg", "samples/../../secret.jpg", "", "a\x00b"):
        with pytest.raises(nuscenes_source.BadInputError) as caught:
            nuscenes_source.sensor_path(tmp_path / "root", {"token": "abc123", "filename": filename})
        assert caught.value.file == filename
        assert caught.value.reason.startswith(f"unsafe path, not read: sample_data abc123 filename {filename!r}")
    inside = nuscenes_source.sensor_path(tmp_path / "root", {"token": "t", "filename": "samples/CAM_FRONT/x.jpg"})
    assert inside == tmp_path / "root" / "samples" / "CAM_FRONT" / "x.jpg"


def test_an_output_path_takes_only_safe_scene_names_and_tokens(tmp_path):
    path, relative = preprocess.output_path(tmp_path, "frames", "scene-0061", "3115e87e7a1a", ".npz")
    assert path == tmp_path / relative and relative == "frames/scene-0061/3115e87e7a1a.npz"
    for scene, token in (("../x", "t"), ("/tmp/x", "t"), ("a/b", "t"), ("..", "t"), ("s", "../t"), ("s", "/t")):
        with pytest.raises(ValueError, match="cannot be used as a file name"):
            preprocess.output_path(tmp_path, "frames", scene, token, ".npz")
