"""``bevjepa preprocess`` on Ray: manifests, resuming, dying workers, bad input, the real scene."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bevjepa.datasets import preprocess, windows
from bevjepa.tools import cli


def _config(dataroot: Path, out: Path, **changes) -> preprocess.PreprocessConfig:
    return preprocess.PreprocessConfig(dataroot=dataroot, out=out, **changes)


@pytest.fixture(scope="module")
def reference_run(synthetic_mini, tmp_path_factory) -> tuple[Path, dict]:
    """The output folder and the manifest of one uninterrupted single-process run (shared: do not write into it)."""
    out = tmp_path_factory.mktemp("ref") / "w"
    return out, preprocess.preprocess(_config(synthetic_mini, out), progress=False)


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    """The manifest of one uninterrupted single-process run."""
    return reference_run[1]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_the_manifest_counts_and_lists_every_window(reference, synthetic_mini, tmp_path):
    assert reference["format"] == "bevjepa-windows"
    assert reference["counts"]["scenes"] == 2 and reference["counts"]["windows"] == 4
    assert reference["counts"]["failed_windows"] == 0 and reference["bad_inputs"] == []
    assert len(reference["config_hash"]) == 16
    # A second run over the same output writes nothing and returns the same manifest.
    out = tmp_path / "w"
    first = preprocess.preprocess(_config(synthetic_mini, out), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    again = preprocess.preprocess(_config(synthetic_mini, out), progress=False)
    assert again == first == reference
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == stamps
    for entry in reference["windows"]:
        window = windows.load_window(out / entry["file"])
        assert window.sample_token == entry["sample_token"]


def _digests(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (by relative path) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_files(a: Path, b: Path) -> None:
    first, second = _digests(a), _digests(b)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []


def test_the_reference_build_writes_the_same_bytes(synthetic_mini, reference_run, tmp_path, monkeypatch):
    """Preprocessing as first written (``reference``) and as now write byte-identical files, also when every window
    is its own task (each t0 frame then built by an earlier task, its LiDAR read again alone)."""
    preprocess.preprocess(_config(synthetic_mini, tmp_path / "reference", reference=True), progress=False)
    current, _ = reference_run  # as now: the module's single-process run
    _same_files(tmp_path / "reference", current)
    split = preprocess.scene_tasks
    monkeypatch.setattr(preprocess, "scene_tasks", lambda config, source: split(config, source, windows_per_task=1))
    preprocess.preprocess(_config(synthetic_mini, tmp_path / "one_window_tasks"), progress=False)
    _same_files(tmp_path / "reference", tmp_path / "one_window_tasks")


def test_the_reference_build_writes_the_same_bytes_from_damaged_input(damaged, damaged_run, tmp_path):
    root, _ = damaged
    preprocess.preprocess(_config(root, tmp_path / "reference", reference=True), progress=False)
    _same_files(tmp_path / "reference", damaged_run[0])  # as now: the module's run over the damaged copy


def test_tasks_are_even_runs_handed_out_scene_by_scene(synthetic_mini):
    config = _config(synthetic_mini, Path("unused"))
    source = preprocess._cached_source(config.source_config())
    scenes = [s["name"] for s in source.scenes]
    tasks = preprocess.scene_tasks(config, source, windows_per_task=1)  # 2 windows a scene: 2 runs of 1
    assert [(t.scene_name, t.first, t.stop) for t in tasks] == [(s, i, i + 1) for s in scenes for i in (0, 1)]
    assert preprocess.task_order(tasks, interleave=False) == [0, 1, 2, 3]
    assert preprocess.task_order(tasks, interleave=True) == [0, 2, 1, 3]  # each scene's first run, then the second
    # 34 windows in runs of at most 16: three near-equal runs (the reference: 8, 8, 8, 8, 2).
    counts = [0, 11, 23, 34]
    fake = type("Source", (), {"scenes": ({"name": "s"},), "scene_sample_tokens": lambda self, s: list(range(40))})()
    assert [(t.first, t.stop) for t in preprocess.scene_tasks(config, fake)] == list(
        zip(counts[:-1], counts[1:], strict=True)
    )
    reference = _config(synthetic_mini, Path("unused"), reference=True)
    assert [t.stop - t.first for t in preprocess.scene_tasks(reference, fake)] == [8, 8, 8, 8, 2]


@pytest.mark.slow  # Ray preprocessing stays in the default run through the dying-worker test
def test_ray_workers_give_the_same_manifest_and_files(reference, synthetic_mini, tmp_path):
    out = tmp_path / "w"
    manifest = preprocess.preprocess(_config(synthetic_mini, out, workers=2), progress=False)
    assert manifest == reference


def _die_once(marker: str, how: str):
    """A scene function that kills its worker process (or raises) the first time it runs, then works."""

    def scene_fn(task):
        flag = Path(marker)
        if not flag.exists():
            flag.write_text("done")
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("transient failure")
        from bevjepa.datasets import preprocess as module

        return module.process_scene(task)

    return scene_fn


@pytest.mark.parametrize("how", ["kill", pytest.param("raise", marks=pytest.mark.slow)])
def test_a_dying_worker_leaves_every_window_written_once(reference, synthetic_mini, tmp_path, how):
    out = tmp_path / "w"
    scene_fn = _die_once(str(tmp_path / "marker"), how)
    manifest = preprocess.preprocess(_config(synthetic_mini, out, workers=2), progress=False, scene_fn=scene_fn)
    assert (tmp_path / "marker").exists()
    assert manifest == reference
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert len(list(out.glob("windows/*/*.npz"))) == reference["counts"]["windows"]


def test_a_killed_run_resumes_where_it_stopped(reference, synthetic_mini, tmp_path):
    out = tmp_path / "w"
    command = [
        sys.executable,
        "-m",
        "bevjepa.tools.cli",
        "preprocess",
        "--dataroot",
        str(synthetic_mini),
        "--out",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("meta/*/*.frame.json")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    done_before = len(list(out.glob("meta/*/*.json")))
    assert cli.main(["preprocess", "--dataroot", str(synthetic_mini), "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text()) == reference
    assert done_before >= 1
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # a half-written file was rewritten and renamed


@pytest.fixture(scope="module")
def damaged(synthetic_mini, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of ``synthetic_mini`` with missing, truncated and NaN files, and {file: reason} of each (read only)."""
    root = tmp_path_factory.mktemp("damaged") / "damaged"
    shutil.copytree(synthetic_mini, root)
    tables = {t: json.loads((root / "v1.0-mini" / f"{t}.json").read_text()) for t in ("sample_data", "sample")}
    sweeps = sorted(
        (r for r in tables["sample_data"] if r["filename"].startswith("sweeps/")), key=lambda r: r["timestamp"]
    )
    cameras = sorted((r for r in tables["sample_data"] if "CAM_FRONT/" in r["filename"]), key=lambda r: r["timestamp"])
    broken = {
        sweeps[5]["filename"]: "missing file",
        sweeps[12]["filename"]: "truncated",
        sweeps[20]["filename"]: "3 points with NaN or inf removed",
        cameras[3]["filename"]: "missing file",
    }
    (root / sweeps[5]["filename"]).unlink()
    data = (root / sweeps[12]["filename"]).read_bytes()
    (root / sweeps[12]["filename"]).write_bytes(data[:-3])
    points = np.fromfile(root / sweeps[20]["filename"], dtype=np.float32).reshape(-1, 5)
    points[:3, 2] = np.nan
    points.tofile(root / sweeps[20]["filename"])
    (root / cameras[3]["filename"]).unlink()
    return root, broken


@pytest.fixture(scope="module")
def damaged_run(damaged, tmp_path_factory) -> tuple[Path, dict]:
    """``damaged`` preprocessed as now: the output folder and the manifest (shared: do not write into it)."""
    out = tmp_path_factory.mktemp("damaged-run") / "w"
    return out, preprocess.preprocess(_config(damaged[0], out), progress=False)


def test_bad_inputs_are_listed_with_file_and_reason(damaged, damaged_run):
    _, broken = damaged
    _, manifest = damaged_run
    listed = {b["file"]: b["reason"] for b in manifest["bad_inputs"]}
    for file, reason in broken.items():
        assert file in listed, f"{file} not in the manifest"
        assert listed[file].startswith(reason)
    assert manifest["counts"]["windows"] == 4  # every window still made from what exists


def test_strict_stops_at_the_first_bad_input(damaged, tmp_path, capsys):
    root, broken = damaged
    code = cli.main(["preprocess", "--dataroot", str(root), "--out", str(tmp_path / "w"), "--strict"])
    assert code == 1
    error = capsys.readouterr().err
    assert "--strict: bad input" in error and any(file in error for file in broken)


def test_wrong_dataroot_version_or_foreign_out_folder(synthetic_mini, reference_run, tmp_path, capsys):
    assert cli.main(["preprocess", "--dataroot", str(tmp_path / "none"), "--out", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "preprocess",
                "--dataroot",
                str(synthetic_mini),
                "--version",
                "v1.0-trainval",
                "--out",
                str(tmp_path / "w"),
            ]
        )
        == 2
    )
    assert "no v1.0-trainval/ tables folder" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["preprocess", "--dataroot", str(synthetic_mini), "--out", str(foreign)]) == 2
    assert "not a bevjepa windows folder" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(reference_run[0], other)  # a finished output of the default configuration
    assert cli.main(["preprocess", "--dataroot", str(synthetic_mini), "--out", str(other), "--sweeps", "5"]) == 2
    assert "another configuration" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_scene_run(real_scene_nusc, tmp_path_factory) -> tuple[Path, dict]:
    """The real scene preprocessed as now: the output folder and the manifest (shared: do not write into it)."""
    out = tmp_path_factory.mktemp("real") / "w"
    return out, preprocess.preprocess(_config(Path(real_scene_nusc.dataroot), out), progress=False)


def test_the_real_scene_makes_windows_and_says_what_was_missing(real_scene_run):
    out, manifest = real_scene_run
    # 35 windows; sensor files exist for keyframes 0-4 only (no sweep files), so windows from t0 = 7 on see nothing.
    assert manifest["counts"]["windows"] == 5 and manifest["counts"]["sensorless_windows"] == 30
    assert manifest["counts"]["failed_windows"] == 0
    missing = [b for b in manifest["bad_inputs"] if b["reason"] == "missing file"]
    assert any(b["file"].startswith("sweeps/LIDAR_TOP/") for b in missing)
    assert any(b["file"].startswith("samples/CAM_FRONT/") for b in missing)
    first = windows.load_window(out / manifest["windows"][0]["file"])
    assert first.agent_future_mask.any() and first.occupancy[0].any()


def test_the_reference_build_writes_the_same_bytes_from_the_real_scene(real_scene_nusc, real_scene_run, tmp_path):
    dataroot = Path(real_scene_nusc.dataroot)
    preprocess.preprocess(_config(dataroot, tmp_path / "reference", reference=True), progress=False)
    _same_files(tmp_path / "reference", real_scene_run[0])  # as now: the module's run


def test_sensorless_windows_of_the_real_scene_are_flagged_and_not_written(real_scene_nusc, tmp_path, capsys):
    dataroot, out = Path(real_scene_nusc.dataroot), tmp_path / "w"
    tokens, token = [], real_scene_nusc.scene[0]["first_sample_token"]
    while token:
        tokens.append(token)
        token = real_scene_nusc.get("sample", token)["next"]
    arguments = ["preprocess", "--dataroot", str(dataroot), "--out", str(out), "--sweeps", "1"]
    assert cli.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 windows of 1 scenes" in printed and "30 sensorless" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (counts["windows"], counts["sensorless_windows"], counts["failed_windows"]) == (5, 30, 0)
    # Keyframes 0-4 have sensor files: t0 = 2..6 has at least one of them among its 3 input keyframes.
    assert [w["sample_token"] for w in manifest["windows"]] == tokens[2:7]
    assert [w["sample_token"] for w in manifest["sensorless_windows"]] == tokens[7:37]
    assert sorted(p.stem for p in out.glob("windows/*/*.npz")) == sorted(tokens[2:7])
    # The last written window sees only keyframe 4, the oldest of its inputs; its files are not hidden.
    last = windows.load_window(out / manifest["windows"][-1]["file"])
    frames = [windows.load_frame(out / "frames" / "scene-0916" / f"{t}.npz") for t in last.keyframe_tokens]
    assert [len(f.points) > 0 for f in frames] == [True, False, False]
    assert [int(f.camera_mask.sum()) for f in frames] == [6, 0, 0]
    # Why they are sensorless: each of their keyframes' files is listed as missing.
    missing = {b["file"] for b in manifest["bad_inputs"] if b["reason"] == "missing file"}
    for t in tokens[7:10]:
        sample = real_scene_nusc.get("sample", t)
        assert real_scene_nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["filename"] in missing
        assert real_scene_nusc.get("sample_data", sample["data"]["CAM_FRONT"])["filename"] in missing
    # A rerun writes nothing and ends with the same manifest.
    assert cli.main(arguments) == 0
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_windows_for_the_base_preset_hold_its_grid(synthetic_mini, tmp_path):
    """`--config base` preprocesses onto base's ±50 m target grid, which `train` reads back to check the model's."""
    from bevjepa.datasets import geometry, torch_dataset

    out = tmp_path / "w"
    assert cli.main(["preprocess", "--dataroot", str(synthetic_mini), "--out", str(out), "--config", "base"]) == 0
    base_grid = geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 0.5)
    assert preprocess.window_grid(out) == base_grid
    window = torch_dataset.WindowDataset(out)[0]
    assert tuple(window.occupancy.shape[-2:]) == base_grid.shape == (200, 200)
    with pytest.raises(FileNotFoundError, match="must be a `bevjepa preprocess` output"):
        preprocess.window_grid(tmp_path)
