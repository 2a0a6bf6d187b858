"""Training keeps its progress and its folder: interval and signal checkpoints, extension by --resume, refused folders,
damaged files, a full disk, and configs with unknown fields."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bevjepa.datasets import io as bevio
from bevjepa.datasets import torch_dataset
from bevjepa.prediction import checkpoint, train
from bevjepa.prediction import config as experiment_config
from bevjepa.tools import cli

BEVJEPA = str(Path(sys.executable).with_name("bevjepa"))


def _train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [BEVJEPA, "train", "--data", str(data), "--out", str(out), "--loader-workers", "0", *extra]


def test_resume_extends_a_finished_run_and_continues_the_schedule(synthetic_windows, tmp_path, light_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(light_checkpoint, run)  # a copy of the shared run (``light_config``, one step): extended here
    assert checkpoint.load_state(run)["step"] == 1
    config = checkpoint.load_config(run)

    def tiny(steps: int) -> experiment_config.ExperimentConfig:
        """The run's own config for ``steps``."""
        return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))

    extended = train.train(synthetic_windows, run, tiny(3), resume=True, progress=False)
    assert extended.steps == 3 and checkpoint.load_state(run)["step"] == 3
    assert checkpoint.load_config(run).train.steps == 3
    with pytest.raises(ValueError, match="already at step 3"):
        train.train(synthetic_windows, run, tiny(2), resume=True, progress=False)
    # The stretched schedule: warm-up, then the cosine of the new total down to 5% at its last step.
    settings = tiny(400).train
    rates = [train._learning_rate(settings, step) for step in range(400)]
    assert rates[39] == pytest.approx(settings.learning_rate) and rates[-1] > 0.05 * settings.learning_rate
    assert all(later <= earlier for earlier, later in zip(rates[39:], rates[40:], strict=False))
    # The extended run's last step used the 3-step schedule's rate, not the 1-step run's.
    last_rate = checkpoint.load_state(run)["param_groups"][0]["lr"]
    assert last_rate == pytest.approx(train._learning_rate(tiny(3).train, 2))


def test_a_budget_in_minutes_ends_the_cosine_when_the_minutes_run_out():
    steps = experiment_config.TrainConfig(steps=1000, learning_rate=1e-3)
    timed = dataclasses.replace(steps, max_minutes=10.0)
    floor = 0.05 * steps.learning_rate
    # Without minutes the wall time is ignored: the step schedule alone.
    assert train._learning_rate(steps, 200, elapsed_s=1e6) == train._learning_rate(steps, 200)
    # Half the minutes gone at step 200 of 1000: the rate is the cosine's halfway value, below the step schedule's.
    halfway = floor + (steps.learning_rate - floor) * 0.5
    assert train._learning_rate(timed, 200, elapsed_s=300.0) == pytest.approx(halfway)
    assert train._learning_rate(timed, 200, elapsed_s=300.0) < train._learning_rate(steps, 200)
    # The minutes spent: the floor, however few steps were done; the steps ahead of the clock still lead.
    assert train._learning_rate(timed, 200, elapsed_s=600.0) == pytest.approx(floor)
    assert train._learning_rate(timed, 200, elapsed_s=900.0) == pytest.approx(floor)
    assert train._learning_rate(timed, 999, elapsed_s=60.0) == pytest.approx(train._learning_rate(steps, 999))
    # The warm-up stays counted in steps.
    assert train._learning_rate(timed, 0, elapsed_s=599.0) == pytest.approx(steps.learning_rate / 50)


def test_cli_resume_keeps_the_runs_own_config(synthetic_windows, tmp_path, capsys, light_config_file):
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(synthetic_windows),
                "--out",
                str(run),
                "--config",
                str(light_config_file),
                "--steps",
                "1",
                "--loader-workers",
                "0",
                "--batch-size",
                "1",
                "--precision",
                "bfloat16",
            ]
        )
        == 0
    )
    # No --batch-size here: the run's own (1) is kept, not the config file's (2); only --steps changes.
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(synthetic_windows),
                "--out",
                str(run),
                "--resume",
                "--steps",
                "2",
                "--loader-workers",
                "0",
            ]
        )
        == 0
    )
    config = checkpoint.load_config(run)
    assert config.train.batch_size == 1 and config.train.steps == 2 and config.train.precision == "bfloat16"
    assert checkpoint.load_state(run)["step"] == 2


def test_a_killed_run_resumes_from_its_interval_checkpoint(synthetic_windows, tmp_path, light_config_file):
    run = tmp_path / "run"
    process = subprocess.Popen(
        _train_command(
            synthetic_windows, run, "--config", str(light_config_file), "--steps", "500", "--checkpoint-minutes", "0"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # the first interval checkpoint (after step 1) is all it takes
        while not (run / "state.json").is_file():
            assert process.poll() is None, "training ended before it was killed"
            time.sleep(0.1)
    finally:
        process.kill()  # SIGKILL: no handler runs
        process.wait()
    reached = checkpoint.load_state(run)["step"]
    assert 1 <= reached < 500
    # the resume runs here: only the killed run needs a process of its own
    resume = ["train", "--data", str(synthetic_windows), "--out", str(run), "--resume", "--steps", str(reached + 1)]
    assert cli.main([*resume, "--loader-workers", "0"]) == 0
    assert checkpoint.load_state(run)["step"] == reached + 1


def test_sigterm_stops_after_the_step_with_a_checkpoint(synthetic_windows, tmp_path, light_config_file):
    run = tmp_path / "run"
    process = subprocess.Popen(
        _train_command(
            synthetic_windows, run, "--config", str(light_config_file), "--steps", "500", "--checkpoint-minutes", "600"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen = bytearray()
    first_step = threading.Event()

    def read() -> None:  # tqdm draws "1/500" once the first step is done (the handler is in place by then)
        while chunk := os.read(process.stderr.fileno(), 4096):
            seen.extend(chunk)
            if b"1/500" in seen:
                first_step.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while not first_step.wait(1):  # no time budget: only the process ending early fails the wait
            assert process.poll() is None, seen.decode(errors="replace")[-2000:]
        assert not (run / "state.json").exists()  # no validation or interval checkpoint yet
        process.send_signal(signal.SIGTERM)
        code = process.wait()
    finally:
        process.kill()
        process.wait()
    reader.join(10)
    assert code == 128 + signal.SIGTERM
    message = seen.decode(errors="replace")
    assert "stopped by SIGTERM" in message and "--resume" in message
    assert 1 <= checkpoint.load_state(run)["step"] < 500


def test_training_refuses_a_folder_that_holds_other_work(synthetic_windows, tmp_path, capsys):
    windows_config = (synthetic_windows / "config.json").read_text()
    args = ["train", "--data", str(synthetic_windows), "--steps", "1", "--loader-workers", "0"]
    assert cli.main([*args, "--out", str(synthetic_windows)]) == 2
    assert "holds files that are not this job's output" in capsys.readouterr().err
    assert (synthetic_windows / "config.json").read_text() == windows_config  # nothing replaced
    assert not (synthetic_windows / bevio.JOB_MARKER).exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert cli.main([*args, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "mine"


def test_damaged_run_files_are_named(synthetic_windows, tmp_path, capsys, light_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(light_checkpoint, run)  # a copy of the shared one-step run: it is damaged here
    weights = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is damaged"):
        checkpoint.load_model(run)
    (run / "model.safetensors").write_bytes(weights)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json holds a JSON list, not an object"):
        checkpoint.load_model(run)
    args = ["train", "--data", str(synthetic_windows), "--out", str(run), "--resume", "--loader-workers", "0"]
    assert cli.main(args) == 2
    assert "not an object" in capsys.readouterr().err


def test_a_misspelt_config_field_is_named_not_ignored(synthetic_windows, tmp_path, capsys):
    values = experiment_config.to_dict(experiment_config.small())
    values["model"]["fuser"]["modality_dropuot"] = values["model"]["fuser"].pop("modality_dropout")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(
        ValueError,
        match=r"config\.model\.fuser: unknown field 'modality_dropuot' \(did you mean "
        r"'modality_dropout'\?\)",
    ):
        experiment_config.preset(str(path))
    code = cli.main(["train", "--data", str(synthetic_windows), "--out", str(tmp_path / "run"), "--config", str(path)])
    assert code == 2 and "modality_dropuot" in capsys.readouterr().err
    values["model"]["fuser"]["modality_dropout"] = 0.0
    del values["model"]["fuser"]["modality_dropuot"]
    path.write_text(json.dumps(values))
    assert experiment_config.preset(str(path)).model.fuser.modality_dropout == 0.0


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_file(
    synthetic_windows, tmp_path, capsys, light_checkpoint
):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    run = tmp_path / "run"
    shutil.copytree(light_checkpoint, run)  # a copy of the shared one-step run: it is resumed here
    before = {name: (run / name).read_bytes() for name in ("config.json", "model.safetensors", "state.json")}
    # Writes to /dev/full fail with ENOSPC: the temporary file of the next checkpoint's first write is linked there.
    temporary = run / f".config.json.{os.getpid()}.tmp"
    temporary.symlink_to("/dev/full")
    args = ["train", "--data", str(synthetic_windows), "--out", str(run), "--resume", "--steps", "2"]
    assert cli.main([*args, "--loader-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not temporary.exists() and not temporary.is_symlink()
    assert {name: (run / name).read_bytes() for name in before} == before  # the previous checkpoint is whole
    assert checkpoint.load_state(run)["step"] == 1


def test_windows_for_another_grid_are_refused_before_training(synthetic_windows, tmp_path, capsys):
    """`base` predicts on ±50 m: windows preprocessed for `small` (±32 m) are named, with the command that fits."""
    run = tmp_path / "run"
    args = ["train", "--data", str(synthetic_windows), "--out", str(run), "--config", "base", "--steps", "1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "x [-32.0, 32.0) m" in err and "x [-50.0, 50.0) m" in err
    assert "bevjepa preprocess --config base" in err
    assert not run.exists()  # refused before the run folder is claimed


def test_extra_worlds_join_the_training_set_whole_and_validation_stays_on_data(
    synthetic_windows, tmp_path, capsys, light_config, light_config_file
):
    """`--extra-data`: every window of another world is trained on, the main world's validation scenes never."""
    other = tmp_path / "other_world"
    shutil.copytree(synthetic_windows, other)  # a stand-in for another seed's world: a folder of its own
    config = dataclasses.replace(
        light_config, train=dataclasses.replace(light_config.train, extra_train_data=(str(other),))
    )
    sources = train.training_sources(synthetic_windows, config)
    assert [(path, scenes) for path, scenes in sources] == [
        (synthetic_windows, train.split_scenes(synthetic_windows, "mini_train")),
        (other, train.split_scenes(other, "all")),
    ]
    assert set(train.split_scenes(other, "mini_val")) <= set(sources[1][1])  # the other world whole
    twice = dataclasses.replace(config, train=dataclasses.replace(config.train, extra_train_data=(str(other),) * 2))
    with pytest.raises(ValueError, match="given twice"):
        train.training_sources(synthetic_windows, twice)
    loader = train.make_loader(sources, 1, True, 0, 0, future=False, cameras=False)
    windows = len(torch_dataset.WindowDataset(synthetic_windows, scenes=sources[0][1]))
    assert len(loader.dataset) == windows + len(torch_dataset.WindowDataset(other, scenes=sources[1][1])) > windows

    run = tmp_path / "run"
    common = ["train", "--data", str(synthetic_windows), "--config", str(light_config_file), "--steps", "1"]
    assert cli.main([*common, "--out", str(run), "--loader-workers", "0", "--extra-data", str(other)]) == 0
    assert checkpoint.load_config(run).train.extra_train_data == (str(other.resolve()),)  # recorded with the run

    # The scored world itself, or a folder for another grid, is refused before the run folder is claimed.
    refused = tmp_path / "refused"
    assert cli.main([*common, "--out", str(refused), "--extra-data", str(synthetic_windows)]) == 2
    assert "validation scenes of --data would be trained on" in capsys.readouterr().err
    windows_config = json.loads((other / "config.json").read_text())
    windows_config["content"]["window"]["grid"]["x_min_m"] = -50.0
    (other / "config.json").write_text(json.dumps(windows_config))
    assert cli.main([*common, "--out", str(refused), "--extra-data", str(other)]) == 2
    assert f"--extra-data {other} holds windows on x [-50.0" in capsys.readouterr().err
    assert not refused.exists()


def test_split_scenes_reads_the_manifest_not_the_devkit(synthetic_windows, tmp_path, monkeypatch):
    manifest = json.loads((synthetic_windows / "manifest.json").read_text())
    splits = manifest["splits"]  # written by preprocess from the devkit's split table
    assert splits["mini_train"] and splits["mini_val"] and not set(splits["mini_train"]) & set(splits["mini_val"])
    monkeypatch.setitem(sys.modules, "nuscenes.utils.splits", None)  # importing the devkit's splits now fails
    assert train.split_scenes(synthetic_windows, "mini_val") == splits["mini_val"]
    # Windows written before the manifest held the splits: the devkit names them.
    older = tmp_path / "older"
    older.mkdir()
    (older / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "splits"}))
    with pytest.raises(ImportError):
        train.split_scenes(older, "mini_val")
    monkeypatch.undo()
    assert train.split_scenes(older, "mini_val") == splits["mini_val"]
    # A damaged manifest is named.
    (older / "manifest.json").write_text(json.dumps({**manifest, "splits": ["mini_val"]}))
    with pytest.raises(ValueError, match=r"manifest.json: 'splits' must map split names"):
        train.split_scenes(older, "mini_val")
