"""``bevjepa synth``: determinism, parallel writers, and bad input that loses nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bevjepa.sim import sensors, synth
from bevjepa.tools import cli

SMALL = dict(scenes=2, duration_s=1.5, agents=(4, 2, 3, 1))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = synth.synthesize(synth.SynthConfig(out=tmp_path / "a", seed=3, **SMALL), progress=False)
    second = synth.synthesize(synth.SynthConfig(out=tmp_path / "b", seed=3, **SMALL), progress=False)
    other = synth.synthesize(synth.SynthConfig(out=tmp_path / "c", seed=4, **SMALL), progress=False)
    a, b, c = _digest(first.out), _digest(second.out), _digest(other.out)
    assert len(a) > 50
    assert a == b
    assert a.keys() != c.keys() or a != c
    assert sum(a[k] != c.get(k) for k in a) > len(a) // 2


@pytest.mark.slow  # heavy: two full writes; determinism per process stays in the default run
def test_ray_workers_write_the_same_bytes_as_one_process(tmp_path):
    one = synth.synthesize(synth.SynthConfig(out=tmp_path / "one", seed=5, workers=1, **SMALL), progress=False)
    two = synth.synthesize(synth.SynthConfig(out=tmp_path / "two", seed=5, workers=2, **SMALL), progress=False)
    assert _digest(one.out) == _digest(two.out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenes", "0"], "--scenes must be at least 1"),
        (["--duration", "-1"], "--duration must be positive"),
        (["--layouts", "roundabout"], "unknown layout 'roundabout'"),
        (["--version", "v1.0-test"], "is not supported"),
        (["--scenes", "11"], "v1.0-mini has 10 scene names"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_arguments_get_a_clear_error_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "data"
    assert cli.main(["synth", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_existing_folder_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["synth", "--out", str(out), "--scenes", "1", "--duration", "0.5"]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_an_empty_folder_is_filled(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    report = synth.synthesize(synth.SynthConfig(out=out, scenes=1, duration_s=0.5, agents=(2, 0, 1, 0)), progress=False)
    assert (report.out / "v1.0-mini" / "sample.json").exists()


def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = sensors.SensorRenderer.camera_images

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-way through the second keyframe of the first scene
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sensors.SensorRenderer, "camera_images", interrupted)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize(synth.SynthConfig(out=out, **SMALL), progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_stale_partial_folder_of_a_killed_run_is_cleared(tmp_path):
    stale = tmp_path / ".data.partial-123"
    (stale / "samples").mkdir(parents=True)
    synth.synthesize(
        synth.SynthConfig(out=tmp_path / "data", scenes=1, duration_s=0.5, agents=(1, 0, 0, 0)), progress=False
    )
    assert not stale.exists() and (tmp_path / "data").exists()


def test_trainval_names_give_the_devkit_train_and_val_splits():
    names = synth.scene_names("v1.0-trainval", 12)
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    assert sum(n in splits["val"] for n in names) == 2
    assert sum(n in splits["train"] for n in names) == 10
    assert len(synth.scene_names("v1.0-trainval", None)) == 850
