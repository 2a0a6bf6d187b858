"""``bevjepa eval`` and ``bevjepa closed-loop`` record a failed window or episode, write their results, say how many
failed in their last line, and exit 1."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from bevjepa.datasets import windows
from bevjepa.evaluation import open_loop
from bevjepa.evaluation.closed_loop import runner, safety
from bevjepa.tools import cli

TWO_SCENARIOS = """
name = "two"
[[scenario]]
name = "fine"
layout = "straight"
seeds = [1]
duration_s = 0.5
vehicles = 2
parked = 0
pedestrians = 0
cyclists = 0

[[scenario]]
name = "breaks"
layout = "straight"
seeds = [2]
duration_s = 0.5
vehicles = 2
parked = 0
pedestrians = 0
cyclists = 0
"""


def test_closed_loop_exits_1_when_an_episode_fails_at_run_time(tmp_path, capsys, monkeypatch):
    suite = tmp_path / "two.toml"
    suite.write_text(TWO_SCENARIOS)
    real = runner.run_episode

    def breaks_one(one_episode, *args, **kwargs):  # a fault injected where the simulator would fail
        if one_episode.scenario == "breaks":
            raise RuntimeError("the simulator fell over")
        return real(one_episode, *args, **kwargs)

    monkeypatch.setattr(runner, "run_episode", breaks_one)
    out = tmp_path / "out"
    code = cli.main(["closed-loop", "--suite", str(suite), "--forecast", "cv", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert printed[-1] == f"1 episodes, 1 failed; {out / 'metrics.json'}"
    assert "FAILED breaks/2: RuntimeError: the simulator fell over" in "\n".join(printed)
    result = safety.SuiteResult.load(out / "metrics.json")  # written all the same
    assert [e.episode_id for e in result.episodes] == ["fine/1"]
    assert [f.episode_id for f in result.failed] == ["breaks/2"]
    assert result.failed[0].error == "RuntimeError: the simulator fell over"
    assert result.aggregate.failed == 1 and result.aggregate.episodes == 1

    monkeypatch.setattr(runner, "run_episode", real)
    assert cli.main(["closed-loop", "--suite", str(suite), "--forecast", "cv", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("2 episodes, 0 failed")


def _copy_with_bad_windows(synthetic_windows: Path, root: Path, nan_box: bool = True) -> tuple[Path, dict, dict]:
    """A copy of the windows where the first window file is corrupt and (``nan_box``) the last one has an agent
    with a NaN box; returns the copy and the two manifest entries."""
    data = root / "windows"
    shutil.copytree(synthetic_windows, data)
    entries = json.loads((data / "manifest.json").read_text())["windows"]
    corrupt, last = entries[0], entries[-1]
    path = data / corrupt["file"]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut in half, as a failed copy leaves it
    if nan_box:
        window = windows.load_window(data / last["file"])
        assert len(window.agent_ids) >= 1
        box = window.agent_box.copy()
        box[0, 1] = np.nan
        windows.save_window(dataclasses.replace(window, agent_box=box), data / last["file"])
    return data, corrupt, last


def test_eval_records_failed_windows_writes_the_rest_and_exits_1(synthetic_windows, light_checkpoint, tmp_path, capsys):
    data, corrupt, nan_box = _copy_with_bad_windows(synthetic_windows, tmp_path)
    out = tmp_path / "eval"
    code = cli.main(  # any trained model will do: the light LiDAR-only one
        ["eval", "--data", str(data), "--split", "all", "--checkpoint", str(light_checkpoint), "--out", str(out)]
        + ["--figures", "1", "--animation-windows", "2"]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert printed[-1].startswith("2 windows, 2 failed, ")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["windows"] == 2 and metrics["windows_failed"] == 2
    failed = {f["file"]: f for f in metrics["failed_windows"]}
    assert set(failed) == {corrupt["file"], nan_box["file"]}
    assert failed[corrupt["file"]]["stage"] == "load" and failed[corrupt["file"]]["scene"] == corrupt["scene"]
    assert failed[nan_box["file"]]["stage"] == "forecast"
    assert "non-finite t0 box" in failed[nan_box["file"]]["error"]
    assert isinstance(metrics["models"]["model"]["brier_mean"], float)  # the good windows are scored
    report = (out / "report.md").read_text()
    assert "## Failed windows" in report and nan_box["sample_token"] in report
    assert (out / "figures" / "scene.gif").is_file()  # drawn from the windows that load


def test_open_loop_scores_the_good_windows_as_if_the_bad_one_were_absent(synthetic_windows, tmp_path):
    data, corrupt, _ = _copy_with_bad_windows(synthetic_windows, tmp_path, nan_box=False)
    with_failure = open_loop.evaluate(data, "all", batch_size=4)
    assert with_failure["windows"] == 3 and with_failure["windows_failed"] == 1
    assert with_failure["failed_windows"][0]["file"] == corrupt["file"]
    assert with_failure["failed_windows"][0]["stage"] == "load"
    # The same scores as a manifest that never listed the corrupt window.
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["windows"] = [e for e in manifest["windows"] if e["file"] != corrupt["file"]]
    (data / "manifest.json").write_text(json.dumps(manifest))
    without = open_loop.evaluate(data, "all", batch_size=4)
    assert without["windows"] == 3 and without["windows_failed"] == 0
    assert json.dumps(with_failure["models"], sort_keys=True) == json.dumps(without["models"], sort_keys=True)
