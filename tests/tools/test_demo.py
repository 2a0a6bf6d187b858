"""The demo end to end on a tiny budget: every stage runs, the report reads its numbers from the metrics files,
and a second run reuses everything."""

from __future__ import annotations

import json

import pytest

from bevjepa.evaluation.closed_loop import safety
from bevjepa.tools import cli, demo


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    config = demo.DemoConfig(
        out=tmp_path_factory.mktemp("demo") / "out",
        minutes=1.0,
        scenes=4,
        duration_s=4.0,
        workers=1,  # Ray is tested where it is the point; here each stage would start it again
        suite=demo.SUITES / "smoke.toml",
        reserve_s=0.0,
        steps=2,  # fixed: the training budget would give a slow or busy machine fewer steps
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
    assert json.loads((out / "run" / "state.json").read_text())["step"] == 2
    assert json.loads((out / "plan.json").read_text())["steps"] == 2
    assert (out / "open-loop" / "report.md").is_file() and (out / "open-loop" / "figures" / "scene.gif").is_file()
    assert tuple(result.closed_loop) == demo.COMPARED_FORECASTS == ("model", "cv", "oracle")
    for name in demo.COMPARED_FORECASTS:
        saved = safety.SuiteResult.load(out / "closed-loop" / name / "metrics.json")
        assert saved.to_dict() == result.closed_loop[name].to_dict()
        assert saved.forecast == name and saved.aggregate.episodes == 2


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


def test_a_second_run_reuses_every_stage(tiny_demo, capsys):
    config, _ = tiny_demo
    before = (config.out / "open-loop" / "metrics.json").stat().st_mtime_ns
    # an earlier demo wrote the cv results under closed-loop/constant_velocity: they are read, not run again
    closed_loop = config.out / "closed-loop"
    (closed_loop / "cv").rename(closed_loop / "constant_velocity")
    try:
        code = cli.main(
            ["demo", "--out", str(config.out), "--minutes", "1", "--suite", str(demo.SUITES / "smoke.toml")]
        )
        assert not (closed_loop / "cv").exists()
    finally:
        (closed_loop / "constant_velocity").rename(closed_loop / "cv")
    assert code == 0
    assert (config.out / "open-loop" / "metrics.json").stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "synthetic dataset: 0 s" in printed and "training: 0 s" in printed and "report:" in printed
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
