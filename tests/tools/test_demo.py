"""The demo end to end on a tiny budget: every stage runs, the report reads its numbers from the metrics files,
and a second run reuses everything."""

from __future__ import annotations

import json

import pytest

from bevjepa.datasets import categories
from bevjepa.evaluation.closed_loop import safety
from bevjepa.evaluation.report import eval_report
from bevjepa.tools import cli, demo

TINY_SUITE = """
# The smoke suite's straight road for 1 s instead of 2: the closed-loop stage of every source at the least cost.
name = "tiny"

[[scenario]]
name = "straight-short"
layout = "straight"
seeds = [1]
duration_s = 1.0
vehicles = 4
parked = 2
pedestrians = 2
cyclists = 1
"""


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    suite = tmp_path_factory.mktemp("suite") / "tiny.toml"
    suite.write_text(TINY_SUITE)
    config = demo.DemoConfig(
        out=tmp_path_factory.mktemp("demo") / "out",
        minutes=1.0,
        scenes=2,  # the fewest: one mini_train scene, one mini_val scene
        duration_s=3.5,  # one window per scene
        workers=1,  # Ray is tested where it is the point; here each stage would start it again
        suite=suite,
        reserve_s=0.0,
        steps=1,  # fixed: the training budget would give a slow or busy machine fewer steps
        progress=False,
    )
    return config, demo.run(config, say=lambda _: None)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_every_stage_writes_its_output(tiny_demo):
    config, result = tiny_demo
    out = config.out
    assert (out / "nuscenes" / "v1.0-mini" / "sample.json").is_file()
    assert (out / "windows" / "manifest.json").is_file()
    assert json.loads((out / "run" / "state.json").read_text())["step"] == 1
    assert json.loads((out / "run-direct" / "state.json").read_text())["step"] == 1
    assert json.loads((out / "run-direct" / "config.json").read_text())["model"]["world_model"] is False
    for run in ("run", "run-direct"):  # chosen on the mini_train windows (one here)
        assert json.loads((out / run / "occupancy_thresholds.json").read_text())["windows"] == 1
        assert json.loads((out / run / "forecast_bars.json").read_text())["windows"] == 1
    assert "iou_at_bars" in result.open_loop["models"]["model"]
    assert "iou_at_bars" in result.open_loop["models"]["direct"]  # both read as cells by the same rule
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"] == plan["direct_steps"] == 1  # fixed steps: the same for both
    metrics = result.open_loop
    assert "direct" in metrics["models"] and "world_model_check" in metrics
    assert metrics["evaluated"]["direct_checkpoint"] == str(out / "run-direct")
    assert (out / "open-loop" / "report.md").is_file() and (out / "open-loop" / "figures" / "scene.gif").is_file()
    assert tuple(result.closed_loop) == demo.COMPARED_FORECASTS == ("model", "cv", "oracle")
    for name in demo.COMPARED_FORECASTS:
        saved = safety.SuiteResult.load(out / "closed-loop" / name / "metrics.json")
        assert saved.to_dict() == result.closed_loop[name].to_dict()
        assert saved.forecast == name and saved.aggregate.episodes == 1


def test_the_report_shows_the_numbers_of_the_metrics_files(tiny_demo):
    config, result = tiny_demo
    text = result.report.read_text()
    open_loop = json.loads((config.out / "open-loop" / "metrics.json").read_text())
    for name, scores in open_loop["models"].items():
        row = next(_cells(line) for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert row[4] == demo._number(scores.get("iou_2s_mean"))
        assert row[1] == demo._number(scores.get("minADE_5"))
    for name in demo.COMPARED_FORECASTS:
        aggregate = safety.SuiteResult.load(config.out / "closed-loop" / name / "metrics.json").aggregate
        rows = [_cells(line) for line in text.split("## Closed loop")[1].splitlines() if line.startswith(f"| {name} |")]
        assert rows[0][1] == demo._number(aggregate.collision_rate)
        assert rows[0][7] == demo._number(aggregate.score)
        assert rows[0][8] == "0"  # failed episodes: a count
    assert "open-loop/figures/scene.gif" in text
    # The headline: the sensor-only occupancy per class and horizon, then the world-model check, then every source.
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert headings == ["### From the sensors alone", "### Does the world model earn its place?", "### Every source"]
    headline = text.split("### From the sensors alone")[1].split("###")[0]
    at_half, at_bars = headline.split("read as a planner reads them")
    for name in demo.SENSOR_ONLY:
        for cls in categories.CLASSES:
            row = next(_cells(line) for line in at_half.splitlines() if f"(`{name}`) | {cls} |" in line)
            assert row[2:] == [demo._number(v) for v in open_loop["models"][name]["iou"][cls]]
    for name in ("model", "direct"):  # the demo chose both runs' bars
        for cls in categories.CLASSES:
            row = next(_cells(line) for line in at_bars.splitlines() if f"(`{name}`) | {cls} |" in line)
            assert row[2:] == [demo._number(v) for v in open_loop["models"][name]["iou_at_bars"][cls]]
    assert "(`model_latent`)" not in at_bars  # the dense map alone has no bars of its own
    check = text.split("### Does the world model earn its place?")[1].split("###")[0]
    for source in demo.WORLD_MODEL_ROWS:
        row = next(_cells(line) for line in check.splitlines() if f"(`{source}`) | vehicle |" in line)
        assert row[2:] == [demo._number(v) for v in open_loop["world_model_check"]["iou"][source]["vehicle"]]
    assert all(line in check for line in eval_report.world_model_verdicts(open_loop))
    every = text.split("### Every source")[1]
    order = [
        _cells(line)[0]
        for line in every.splitlines()
        if line.startswith("| ") and _cells(line)[0] in open_loop["models"]
    ]
    assert order[:3] == ["model", "model_latent", "direct"]  # the sensor-only sources first
    assert order.index("model_annotated") > order.index("constant_velocity_tracked")
    table = every.split("\n## ")[0]  # up to the next section (the closed loop has a `model` row too)
    inputs = {row[0]: row[-1] for row in (_cells(line) for line in table.splitlines() if line.startswith("| "))}
    assert inputs["model"] == "sensors" and inputs["model_annotated"].startswith("sensors +")


def test_a_second_run_reuses_every_stage(tiny_demo, capsys):
    config, _ = tiny_demo
    before = (config.out / "open-loop" / "metrics.json").stat().st_mtime_ns
    # an earlier demo wrote the cv results under closed-loop/constant_velocity: they are read, not run again
    closed_loop = config.out / "closed-loop"
    (closed_loop / "cv").rename(closed_loop / "constant_velocity")
    try:
        code = cli.main(["demo", "--out", str(config.out), "--minutes", "1", "--suite", str(config.suite)])
        assert not (closed_loop / "cv").exists()
    finally:
        (closed_loop / "constant_velocity").rename(closed_loop / "cv")
    assert code == 0
    assert (config.out / "open-loop" / "metrics.json").stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "synthetic dataset: 0 s" in printed and "training: 0 s" in printed and "report:" in printed
    assert "direct baseline training: 0 s" in printed
    assert "closed loop (" not in printed
    assert "| cv |" in (config.out / "report.md").read_text()


def test_bad_settings_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="--minutes"):
        demo.DemoConfig(out=tmp_path, minutes=0)
    with pytest.raises(ValueError, match="--steps"):
        demo.DemoConfig(out=tmp_path, steps=0)
    (tmp_path / "thesis.tex").write_text("mine")
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "holds files that are not this job's output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
    with pytest.raises(FileNotFoundError, match="suite"):
        demo.DemoConfig(out=tmp_path, suite=tmp_path / "missing.toml")


def test_the_direct_baseline_gets_the_models_wall_time(tmp_path, monkeypatch):
    step_ms = {"small": 1000.0, "direct": 250.0}
    monkeypatch.setattr(
        demo.model_bench,
        "training_step_time",
        lambda windows, preset="small", repeats=5: {"preset": preset, "step_ms": step_ms[preset]},
    )
    config = demo.DemoConfig(out=tmp_path, minutes=10.0, reserve_s=0.0, progress=False)
    plan = demo._plan_steps(config, tmp_path, spent_s=0.0)
    # half of 600 s each: 300 steps of 1 s for the model, the same 300 s at 0.25 s a step for the direct baseline
    assert plan["training_budget_s"] == 300.0 and plan["steps"] == 300 and plan["direct_steps"] == 1200
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    # a plan from before the direct baseline keeps its steps and gets the direct baseline's added
    earlier = {"steps": 100, "measured_step_s": 2.0, "training_budget_s": 200.0, "seed": 0}
    (tmp_path / "plan.json").write_text(json.dumps(earlier))
    assert demo._plan_steps(config, tmp_path, spent_s=0.0) == {
        **earlier,
        "direct_steps": 800,
        "direct_measured_step_s": 0.25,
    }
    fixed = demo._plan_steps(demo.DemoConfig(out=tmp_path, steps=7), tmp_path, spent_s=0.0)
    assert fixed["steps"] == fixed["direct_steps"] == 7 and fixed["direct_measured_step_s"] is None
