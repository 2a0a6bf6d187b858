"""The regression gate: comparison, baseline file, JUnit XML, degraded checkpoints, and `bevjepa regress`."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bevjepa.evaluation.closed_loop import regress, safety, sources, suite_files
from bevjepa.prediction import checkpoint, model
from bevjepa.prediction import config as experiment_config

BASE = {"collision_rate": 0.25, "progress_m": 80.0, "min_ttc_s": 2.0, "drivable_compliance": 0.95, "score": 0.70}


# --- compare -------------------------------------------------------------------------------------------------------


def test_identical_metrics_pass():
    comparison = regress.compare(dict(BASE), BASE)
    assert comparison.passed and {m.status for m in comparison.metrics} == {regress.OK}
    assert all(m.delta == 0 for m in comparison.metrics)


def test_improvements_pass_in_either_direction():
    better = {**BASE, "collision_rate": 0.0, "progress_m": 95.0, "min_ttc_s": 3.0}
    comparison = regress.compare(better, BASE)
    assert comparison.passed
    for name in ("collision_rate", "progress_m", "min_ttc_s"):
        assert comparison.get(name).status == regress.IMPROVED, name
    assert comparison.get("collision_rate").delta == pytest.approx(-0.25)


def test_a_regression_beyond_tolerance_fails_and_is_named():
    worse = {**BASE, "collision_rate": 0.5, "min_ttc_s": 1.0}
    comparison = regress.compare(worse, BASE)
    assert not comparison.passed
    assert [m.name for m in comparison.failures] == ["collision_rate", "min_ttc_s"]
    table = comparison.table()
    assert "FAILED: 2 of 5 metrics" in table
    assert "collision_rate regressed: 0.25 → 0.5" in table and "lower is better" in table
    assert "min_ttc_s regressed: 2 → 1" in table and "tolerance ±0.25" in table


def test_within_tolerance_passes_and_the_tolerance_is_applied_both_ways():
    # progress_m: 5 % relative by default; 80 -> 77 m is a 3.75 % drop, 80 -> 75 m is 6.25 %.
    assert regress.compare({**BASE, "progress_m": 77.0}, BASE).get("progress_m").status == regress.OK
    assert regress.compare({**BASE, "progress_m": 75.0}, BASE).get("progress_m").status == regress.REGRESSED
    # an explicit absolute tolerance replaces the default
    loose = regress.compare({**BASE, "progress_m": 75.0}, BASE, {"progress_m": 10})
    assert loose.passed and loose.get("progress_m").tolerance == regress.Tolerance(absolute=10.0)
    strict = regress.compare({**BASE, "score": 0.69}, BASE, {"score": "0.001"})
    assert strict.get("score").status == regress.REGRESSED
    # the larger of absolute and relative slack applies
    both = regress.Tolerance.parse("0.01,10%")
    assert both == regress.Tolerance(absolute=0.01, relative=0.1)
    assert both.slack(2.0) == pytest.approx(0.2) and both.slack(0.05) == pytest.approx(0.01)


def test_direction_decides_which_change_is_a_regression():
    # The same numeric move (+0.1) is a regression for a lower-is-better metric and an improvement for a higher one.
    base = {"collision_rate": 0.1, "drivable_compliance": 0.8}
    moved = {"collision_rate": 0.2, "drivable_compliance": 0.9}
    comparison = regress.compare(moved, base)
    assert comparison.get("collision_rate").status == regress.REGRESSED
    assert comparison.get("drivable_compliance").status == regress.IMPROVED
    # unknown names: a keyword gives the direction, else any change beyond tolerance fails
    assert regress.rule_for("offroad_collisions_per_km").direction == regress.LOWER
    assert regress.rule_for("mean_ttc_s").direction == regress.HIGHER
    unknown = regress.compare({"mystery": 1.5}, {"mystery": 1.0})
    assert unknown.get("mystery").direction == regress.EITHER and not unknown.passed
    assert regress.compare({"mystery": 0.5}, {"mystery": 1.0}).get("mystery").status == regress.REGRESSED


def test_missing_metrics_are_reported_clearly():
    current = {k: v for k, v in BASE.items() if k != "score"} | {"route_completion": 0.9}
    comparison = regress.compare(current, BASE)
    gone, new = comparison.get("score"), comparison.get("route_completion")
    assert gone.status == regress.MISSING_CURRENT and gone.failed and gone.current is None and gone.delta is None
    assert new.status == regress.MISSING_BASELINE and not new.failed
    assert [m.name for m in comparison.failures] == ["score"]
    table = comparison.table()
    assert "score: in the baseline (0.7) but missing from the current run" in table
    assert "route_completion: 0.9 is not in the baseline" in table


def test_nan_handling():
    assert regress.compare({"score": math.nan}, {"score": 0.7}).get("score").status == regress.REGRESSED
    assert regress.compare({"min_ttc_s": None}, {"min_ttc_s": None}).passed
    assert regress.compare({"min_ttc_s": 3.0}, {"min_ttc_s": math.nan}).get("min_ttc_s").status == regress.IMPROVED
    with pytest.raises(ValueError, match="'score' is 'high', not a number"):
        regress.compare({"score": "high"}, {"score": 0.7})


@pytest.mark.parametrize("text", ["", "abc", "5%%", "1,2,3", "-0.1"])
def test_bad_tolerances_are_refused(text):
    with pytest.raises(ValueError, match="tolerance|Tolerance"):
        regress.Tolerance.parse(text)


# --- baseline file -------------------------------------------------------------------------------------------------


def _baseline(**changes) -> regress.Baseline:
    fields = {
        "suite": "smoke",
        "forecast": "cv",
        "checkpoint": None,
        "metrics": {**BASE, "min_ttc_s": math.nan, regress.FAILED_EPISODES: 0.0},
        "tolerances": regress.resolve_tolerances(set(BASE), {"score": "3%"}),
        "episodes": 4,
        "created_utc": "2024-01-01T00:00:00+00:00",
    }
    return regress.Baseline(**(fields | changes))


def test_baseline_round_trips_through_json(tmp_path):
    path = regress.write_baseline(tmp_path / "ci" / "baseline.json", _baseline())
    data = json.loads(path.read_text())  # strict JSON: NaN is written as null
    assert data["format"] == regress.BASELINE_FORMAT and data["format_version"] == regress.BASELINE_VERSION
    assert data["metrics"]["min_ttc_s"] is None and data["tolerances"]["score"] == {"absolute": 0.0, "relative": 0.03}
    back = regress.read_baseline(path)
    assert back.suite == "smoke" and back.tolerances == _baseline().tolerances
    assert math.isnan(back.metrics["min_ttc_s"]) and back.metrics["score"] == 0.70
    assert [p.name for p in path.parent.iterdir()] == ["baseline.json"]  # no temporary file left behind


def test_a_baseline_written_by_an_earlier_version_still_loads(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(  # as `bevjepa regress --update-baseline` wrote it before the suite result was typed
        '{"format": "bevjepa-regress-baseline", "format_version": 1, "suite": "ci", "forecast": "cv",'
        ' "checkpoint": null, "episodes": 8, "created_utc": "2024-05-01T12:00:00+00:00",'
        ' "metrics": {"collision_rate": 0.0, "episodes": 8.0, "failed": 0.0, "min_ttc_s": null, "score": 0.64},'
        ' "tolerances": {"collision_rate": {"absolute": 0.0, "relative": 0.0}}}\n'
    )
    baseline = regress.read_baseline(path)
    assert baseline.forecast == sources.CONSTANT_VELOCITY and baseline.episodes == 8
    assert baseline.metrics["failed"] == 0.0 and math.isnan(baseline.metrics["min_ttc_s"])
    path.write_text(path.read_text().replace('"cv"', '"psychic"'))
    with pytest.raises(ValueError, match="baseline.json is corrupt .*forecast 'psychic' is not one of"):
        regress.read_baseline(path)


def test_missing_and_corrupt_baselines_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--update-baseline"):
        regress.read_baseline(tmp_path / "none.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "bevjepa-regress-baseline", "metr')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        regress.read_baseline(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="other.json is not a bevjepa-regress-baseline file"):
        regress.read_baseline(other)
    future = tmp_path / "future.json"
    future.write_text(json.dumps(_baseline().to_dict() | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        regress.read_baseline(future)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps({k: v for k, v in _baseline().to_dict().items() if k != "suite"}))
    with pytest.raises(ValueError, match="truncated.json is corrupt"):
        regress.read_baseline(truncated)


# --- JUnit XML -----------------------------------------------------------------------------------------------------


def test_junit_xml_parses_and_counts_failures(tmp_path):
    worse = {**BASE, "collision_rate": 0.5, "route_completion": 1.0}
    comparison = regress.compare(worse, BASE)
    failed = (
        safety.FailedEpisode("crossing/3", "RuntimeError: planner found no trajectory", "Traceback (most recent..."),
        safety.FailedEpisode("merge/0", "ValueError: bare failure", ""),
    )
    tree = regress.junit_xml(comparison, "smoke", failed, {"forecast": "cv"}, time_s=1.5)
    path = regress.write_junit(tmp_path / "junit.xml", tree)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "smoke" and suite.get("tests") == "8" and suite.get("failures") == "3"
    assert suite.get("skipped") == "1" and root.get("failures") == "3"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {*BASE, "route_completion", "crossing/3", "merge/0"}
    failure = cases["collision_rate"].find("failure")
    assert "collision_rate regressed: 0.25 → 0.5" in failure.get("message") and "FAILED" in failure.text
    assert cases["progress_m"].find("failure") is None
    assert cases["route_completion"].find("skipped") is not None
    assert "no trajectory" in cases["crossing/3"].find("failure").text
    assert "Traceback" in cases["crossing/3"].find("failure").text
    assert cases["merge/0"].find("failure").text == "ValueError: bare failure"
    assert suite.find("properties/property").attrib == {"name": "forecast", "value": "cv"}


# --- degraded checkpoints ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained small model saved as a run folder (a real checkpoint; training is not what is tested here)."""
    torch.manual_seed(0)
    config = experiment_config.small()
    run = tmp_path_factory.mktemp("runs") / "run"
    checkpoint.save(run, config, model.BevJepa(config.model), None, {"step": 0})
    return run


def test_perturb_checkpoint_adds_deterministic_noise(tiny_run, tmp_path):
    first = regress.perturb_checkpoint(tiny_run, tmp_path / "a", noise_std=0.05, seed=3)
    second = regress.perturb_checkpoint(tiny_run, tmp_path / "b", noise_std=0.05, seed=3)
    other = regress.perturb_checkpoint(tiny_run, tmp_path / "c", noise_std=0.05, seed=4)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert regress.weights_sha256(first) != regress.weights_sha256(other) != regress.weights_sha256(tiny_run)
    original, noisy = load_file(str(tiny_run / "model.safetensors")), load_file(str(first / "model.safetensors"))
    assert set(original) == set(noisy)
    moved = []
    for key, value in original.items():
        assert noisy[key].dtype == value.dtype and noisy[key].shape == value.shape
        if value.is_floating_point() and not key.endswith(("running_mean", "running_var")) and value.numel() > 1000:
            moved.append(float((noisy[key] - value).std()))
        elif not value.is_floating_point() or key.endswith("running_var"):
            assert torch.equal(noisy[key], value), key
    assert moved and all(s == pytest.approx(0.05, rel=0.1) for s in moved)
    # the copy is a loadable run folder that says what was done to it
    config, net = checkpoint.load_model(first)
    assert config == checkpoint.load_config(tiny_run)
    assert checkpoint.load_state(first)["perturbation"] == {
        "from": str(tiny_run),
        "from_sha256": regress.weights_sha256(tiny_run),
        "noise_std": 0.05,
        "seed": 3,
    }
    with pytest.raises(FileExistsError, match="not empty"):
        regress.perturb_checkpoint(tiny_run, tmp_path / "a", noise_std=0.05, seed=3)
    with pytest.raises(FileNotFoundError, match="not a bevjepa run folder"):
        regress.perturb_checkpoint(tmp_path / "nothing", tmp_path / "d", noise_std=0.05, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging folder left behind


# --- `bevjepa regress`: the errors that stop it before any episode runs ----------------------------------------------

SUITE_TOML = """
name = "tiny"

[[scenario]]
name = "straight"
layout = "straight"
seeds = [0]
duration_s = 2.0
vehicles = 1
parked = 0
pedestrians = 0
cyclists = 0
"""


def test_cli_refuses_missing_corrupt_and_mismatched_baselines(tmp_path, tiny_run, capsys):
    from bevjepa.tools import cli

    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE_TOML)
    baseline = tmp_path / "baseline.json"
    args = ["regress", "--suite", str(suite), "--baseline", str(baseline)]

    assert cli.main(args) == 1  # no baseline and no --update-baseline
    err = capsys.readouterr().err
    assert f"baseline {baseline} not found" in err and "--update-baseline" in err

    baseline.write_text("{not json")
    assert cli.main(args) == 2
    assert "is not valid JSON" in capsys.readouterr().err

    regress.write_baseline(baseline, _baseline(suite="nightly"))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "suite mismatch" in err and "suite 'nightly', this run is suite 'tiny'" in err

    wrong_weights = regress.CheckpointRef(str(tiny_run), "0" * 64)
    regress.write_baseline(baseline, _baseline(suite="tiny", forecast="model", checkpoint=wrong_weights))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "checkpoint mismatch" in err and str(tiny_run) in err

    assert cli.main([*args, "--forecast", "cv", "--checkpoint", str(tiny_run)]) == 2
    assert "--checkpoint is only used by the model forecasts" in capsys.readouterr().err
    regress.write_baseline(baseline, _baseline(suite="tiny", forecast="cv"))
    assert cli.main([*args, "--forecast", "model"]) == 2
    assert "--forecast model needs --checkpoint" in capsys.readouterr().err
    assert cli.main([*args, "--tolerance", "score"]) == 2
    assert "write METRIC=VALUE" in capsys.readouterr().err


# --- `bevjepa regress` on real closed-loop runs ------------------------------------------------------------------

MERGE_TOML = """
# One episode of the CI suite's T-junction merge: driving on blind (`none`) hits a merging car, the oracle
# forecast brakes in time.
name = "merge"

[[scenario]]
name = "t-junction-merge"
layout = "t_junction"
seeds = [5]
duration_s = 10.0
vehicles = 14
parked = 4
pedestrians = 10
cyclists = 2
"""


def test_cli_gate_passes_the_baseline_run_and_fails_a_blind_planner(tmp_path, capsys):
    from bevjepa.tools import cli

    suite = tmp_path / "merge.toml"
    suite.write_text(MERGE_TOML)
    baseline, junit = tmp_path / "gate" / "baseline.json", tmp_path / "junit.xml"
    args = ["regress", "--suite", str(suite), "--baseline", str(baseline), "--junit", str(junit)]

    assert cli.main([*args, "--forecast", "oracle", "--update-baseline", "--out", str(tmp_path / "out")]) == 0
    assert f"wrote baseline {baseline}" in capsys.readouterr().out
    written = regress.read_baseline(baseline)
    assert written.suite == "merge" and written.forecast == "oracle" and written.checkpoint is None
    assert written.metrics["collision_rate"] == 0.0 and written.metrics["episodes"] == 1.0
    assert written.tolerances["collision_rate"] == regress.Tolerance(absolute=0.0)
    assert {"metrics.json", "diff.txt", "regress.json"} <= {p.name for p in (tmp_path / "out").iterdir()}

    # the same forecast again (the baseline's, by default) reproduces it exactly
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "regress: PASSED" in out and "forecast oracle" in out
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"

    # planning without a forecast drives into the merging car
    assert cli.main([*args, "--forecast", "none"]) == 1
    out = capsys.readouterr().out
    assert (
        "collision_rate regressed: 0 → 1" in out and "note: forecast differs from the baseline's (oracle → none)" in out
    )
    suite_node = ET.parse(junit).getroot().find("testsuite")
    failing = {case.get("name") for case in suite_node.iter("testcase") if case.find("failure") is not None}
    assert "collision_rate" in failing and suite_node.get("failures") == str(len(failing))
    # a tolerance from the command line is applied on top of the baseline's
    assert cli.main([*args, "--forecast", "none", "--tolerance", "collision_rate=1"]) == 1
    out = capsys.readouterr().out
    assert "collision_rate regressed" not in out and "regress: FAILED" in out

    # --update-baseline overwrites it from the current run and exits 0, showing what changed
    assert cli.main([*args, "--forecast", "none", "--update-baseline"]) == 0
    out = capsys.readouterr().out
    assert "against the previous baseline:" in out and "collision_rate" in out
    assert regress.read_baseline(baseline).forecast == "none"
    assert cli.main(args) == 0


@pytest.mark.slow
def test_the_gate_fails_a_degraded_model_and_passes_the_intact_one(synthetic_windows, tmp_path, capsys):
    """Acceptance: a trained checkpoint passes against its own baseline; the same weights plus noise do not."""
    import dataclasses

    from bevjepa.prediction import train
    from bevjepa.tools import cli

    config = experiment_config.small()
    settings = {"steps": 40, "val_every": 40, "val_batches": 1, "loader_workers": 0, "train_split": "all"}
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **settings))
    run = train.train(synthetic_windows, tmp_path / "run", config, progress=False).run
    degraded = regress.perturb_checkpoint(run, tmp_path / "degraded", noise_std=0.2, seed=0)
    suite = suite_files.SHIPPED_SUITES / "smoke.toml"
    args = ["regress", "--suite", str(suite), "--baseline", str(tmp_path / "baseline.json")]

    assert cli.main([*args, "--checkpoint", str(run), "--update-baseline"]) == 0
    assert cli.main(args) == 0  # the baseline's own checkpoint, by default
    assert "regress: PASSED" in capsys.readouterr().out
    assert cli.main([*args, "--checkpoint", str(degraded)]) == 1
    out = capsys.readouterr().out
    assert "regress: FAILED" in out and " regressed: " in out and "note: the model's weights differ" in out
