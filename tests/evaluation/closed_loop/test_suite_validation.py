"""Suite files are checked when read: a scenario that cannot run well is refused, naming file, scenario and field."""

from __future__ import annotations

import pytest

from bevjepa.evaluation.closed_loop import suite_files
from bevjepa.tools import cli

SUITE = """
name = "s"
[[scenario]]
name = "road"
layout = "straight"
seeds = [0]
duration_s = 2.0
"""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("duration_s = inf", r"`duration_s` must be finite"),
        ("duration_s = nan", r"`duration_s` must be finite"),
        ("duration_s = 1e-6", r"`duration_s` must lie between one planning step \(0.5 s\) and 3600 s, got 1e-06"),
        ("duration_s = 0.0", r"`duration_s` must be positive"),
        ("duration_s = 0.25", r"`duration_s` must lie between one planning step"),
        ("duration_s = 1e9", r"`duration_s` must lie between one planning step \(0.5 s\) and 3600 s"),
        ("duration_s = 1.2", r"`duration_s` must be a whole number of 0.5 s planning steps, got 1.2 \(use 1\)"),
        ("duration_s = 2.0\nvehicles = 100000", r"`vehicles` must be at most 500"),
        ("duration_s = 2.0\nego_speed_mps = nan", r"`ego_speed_mps` must lie in \(0, 20\] m/s, got nan"),
        ("duration_s = 2.0\nego_speed_mps = inf", r"`ego_speed_mps` must lie in \(0, 20\] m/s, got inf"),
    ],
)
def test_suite_values_are_checked_when_the_file_is_read(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(SUITE.replace("duration_s = 2.0", line))
    with pytest.raises(suite_files.SuiteError, match=message) as error:
        suite_files.load_suite(path)
    assert str(error.value).startswith(f"{path}: scenario 'road': ")


def test_a_default_duration_is_checked_on_every_scenario_that_takes_it(tmp_path):
    path = tmp_path / "defaults.toml"
    path.write_text(
        SUITE.replace("duration_s = 2.0", "").replace('name = "s"', 'name = "s"\n[defaults]\nduration_s = inf')
    )
    with pytest.raises(suite_files.SuiteError, match=rf"{path}: scenario 'road': `duration_s` must be finite"):
        suite_files.load_suite(path)


@pytest.mark.parametrize("duration", ["inf", "1e-6"])
def test_the_closed_loop_refuses_the_suite_before_running_anything(tmp_path, capsys, duration):
    path = tmp_path / "bad.toml"
    path.write_text(SUITE.replace("duration_s = 2.0", f"duration_s = {duration}"))
    out = tmp_path / "out"
    code = cli.main(["closed-loop", "--suite", str(path), "--forecast", "none", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert str(path) in error and "scenario 'road'" in error and "`duration_s`" in error
    assert not (out / "metrics.json").exists()


def test_episodes_made_in_code_are_checked_too():
    with pytest.raises(suite_files.SuiteError, match=r"episode road/0: `duration_s` must be finite"):
        suite_files.Episode("s", "road", 0, "straight", float("inf"))
    with pytest.raises(suite_files.SuiteError, match=r"episode road/0: `duration_s` must lie between"):
        suite_files.Episode("s", "road", 0, "straight", 1e-6)
    with pytest.raises(suite_files.SuiteError, match=r"`seed` must be a non-negative integer"):
        suite_files.Episode("s", "road", -1, "straight", 1.0)
    assert suite_files.Episode("s", "road", 0, "roundabout", 1.0).layout == "roundabout"  # checked at run time


@pytest.mark.parametrize("name", ["ci", "smoke", "empty"])
def test_the_shipped_suites_pass(name):
    suite = suite_files.load_suite(suite_files.resolve_suite_path(name))
    assert suite.episodes and all(e.duration_s >= suite_files.PLANNING_STEP_S for e in suite.episodes)
