"""``bevjepa eval``: metrics.json, a report.md whose tables hold metrics.json's numbers, the figures, bad input."""

from __future__ import annotations

import dataclasses
import decimal
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from bevjepa.evaluation.report import eval_report
from bevjepa.tools import cli


@pytest.fixture(scope="module")
def run_folder(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def evaluated(
    synthetic_mini: Path, synthetic_windows: Path, run_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("eval") / "report"
    argv = ["eval", "--data", str(synthetic_windows), "--checkpoint", str(run_folder), "--out", str(out)]
    # --dataroot with --data: the windows are used as they are, the dataroot feeds the detection evaluation.
    assert cli.main([*argv, "--dataroot", str(synthetic_mini), "--animation-windows", "2"]) == 0
    return out


def _no_nan(constant: str) -> None:
    raise AssertionError(f"metrics.json holds {constant}: not strict JSON")


def _tables(markdown: str) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(the ## section, the heading above, header cells, rows of cells) of every Markdown table."""

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    tables, section, heading, lines, i = [], "", "", markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = heading = lines[i]
        elif lines[i].startswith("#"):
            heading = lines[i]
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|- "):
            header, rows, i = cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            tables.append((section, heading, header, rows))
            continue
        i += 1
    return tables


def _same(cell: str, value: object) -> bool:
    """A report cell shows a metrics.json value, rounded at the cell's last digit, or — for null."""
    if value is None:
        return cell == eval_report.MISSING
    last_digit = decimal.Decimal(cell).as_tuple().exponent
    return abs(float(cell) - float(value)) <= 0.5 * 10.0**last_digit * (1 + 1e-9)


def test_metrics_json_is_strict_and_says_what_was_evaluated(evaluated, synthetic_windows, run_folder):
    metrics = json.loads((evaluated / "metrics.json").read_text(), parse_constant=_no_nan)
    assert {"model", "constant_velocity", "persistence"} <= set(metrics["models"])
    assert metrics["windows"] == 2 and metrics["split"] == "mini_val"
    assert metrics["evaluated"]["checkpoint"] == str(run_folder)
    assert metrics["evaluated"]["data"] == str(synthetic_windows)
    assert metrics["evaluated"]["config"]["trained_steps"] == 1
    # 4 s scenes: no agent has a whole 6 s future, so the trajectory metrics are null, not NaN.
    assert metrics["agents"] == 0 and metrics["models"]["model"]["minADE_5"] is None
    detection = metrics["detection"]
    assert "error" not in detection and 0 <= detection["mAP"] <= 1 and 0 <= detection["NDS"] <= 1
    assert (evaluated / "detection").is_dir()


def test_every_number_in_the_report_is_the_one_in_metrics_json(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    text = (evaluated / "report.md").read_text()
    checked, checked_detection = 0, 0
    tables = _tables(text)
    assert tables
    for section, heading, header, rows in tables:
        key = (re.findall(r"`([^`]+)`", heading) or [""])[-1]
        for row in rows:
            assert len(row) == len(header), (heading, row)
            if section == "## Detection at t0":
                value = metrics["detection"] if heading == section else metrics["detection"][key]
                if header == ["metric", "value"]:
                    assert _same(row[1], value[row[0].strip("`")]), (heading, row)
                elif header == ["name", "value"]:
                    assert _same(row[1], value[row[0]]), (heading, row)
                else:
                    for column, cell in zip(header[1:], row[1:], strict=True):
                        assert _same(cell, value[row[0]][column]), (heading, row, column)
                checked_detection += 1
                continue
            model = metrics["models"][row[0].strip("`")]
            if header[1] == "class" and header[2].endswith(" s"):  # {class: [per step]}, by horizon
                for step, cell in enumerate(row[2:]):
                    assert _same(cell, model[key][row[1]][step]), (heading, row, step)
                    checked += 1
            elif header[1] == "class":  # {class: {metric: value}}
                for column, cell in zip(header[2:], row[2:], strict=True):
                    assert _same(cell, model[key][row[1]][column]), (heading, row, column)
                    checked += 1
            elif heading.endswith("per class"):  # {class: value}
                for column, cell in zip(header[1:], row[1:], strict=True):
                    assert _same(cell, model[key][column]), (heading, row, column)
                    checked += 1
            else:
                for column, cell in zip(header[1:], row[1:], strict=True):
                    assert _same(cell, model[column]), (heading, column, cell)
                    checked += 1
    iou_cells = sum(len(v) for m in metrics["models"].values() for v in m["iou"].values())
    assert checked >= iou_cells + len(metrics["models"])  # every IoU per step and every IoU at 2 s at least
    assert checked_detection >= 2  # mAP and NDS at least
    assert "## What was evaluated" in text and "mini_val" in text and "2 windows" in text


def test_the_report_shows_figures_that_exist_and_decode(evaluated):
    text = (evaluated / "report.md").read_text()
    linked = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", text)
    paths = [path for _, path in linked]
    assert "figures/iou_per_horizon.png" in paths and "figures/scene.gif" in paths
    assert {"figures/lidar_1.png", "figures/occupancy_1.png", "figures/trajectories_1.png"} <= set(paths)
    for caption, path in linked:
        assert "\n" not in caption and caption
        with Image.open(evaluated / path) as image:
            image.load()
            assert image.format in ("PNG", "GIF")
    with Image.open(evaluated / "figures" / "scene.gif") as gif:
        assert gif.n_frames == 2 * 5  # two windows, each over t0 and four steps
    assert sorted(p.name for p in (evaluated / "figures").iterdir()) == sorted(Path(p).name for p in paths)


def test_eval_preprocesses_a_dataroot_and_agrees_with_given_windows(synthetic_mini, synthetic_windows, tmp_path):
    out = tmp_path / "report"
    config = eval_report.EvalConfig(
        out=out, dataroot=synthetic_mini, figure_windows=0, animation_windows=0, progress=False
    )
    first = eval_report.run(config)
    assert first.windows == out / "windows" and (out / "windows" / "manifest.json").is_file()
    given = eval_report.run(dataclasses.replace(config, out=tmp_path / "given", data=synthetic_windows, dataroot=None))
    assert first.metrics["models"] == given.metrics["models"]
    again = eval_report.run(config)  # resumes: the windows are there, nothing is rebuilt
    assert again.metrics == first.metrics
    assert "model" not in first.metrics["models"] and "checkpoint: none" in first.report_path.read_text()


def test_the_report_renders_the_keys_that_exist():
    metrics = {
        "split": "val",
        "windows": 3,
        "agents": 7,
        "models": {
            "persistence": {"iou": {"vehicle": [1.0, 0.25]}, "iou_2s_mean": 0.25, "brier": [0.0, 0.125]},
            "model": {
                "minADE_5": 1.23456,
                "iou": {"vehicle": [0.5, None]},
                "iou_2s_mean": None,
                "vpq": 0.3333,
                "per_class": {"vehicle": {"minADE_5": 1.5, "minFDE_5": 2.0}},
            },
        },
        "detection": {"mAP": 0.4, "NDS": 0.5, "per_class_ap": {"vehicle": 0.6}},
    }
    text = eval_report.render_report(metrics)
    tables = {heading: (header, rows) for _, heading, header, rows in _tables(text)}
    trajectory = next(v for k, v in tables.items() if "Trajectories" in k)
    assert trajectory == (["model", "minADE_5"], [["`model`", "1.235"]])
    occupancy = next(v for k, v in tables.items() if "calibration" in k)
    assert occupancy[0] == ["model", "iou_2s_mean", "vpq"] and occupancy[1][0] == ["`model`", "—", "0.333"]
    assert next(v for k, v in tables.items() if "`brier`" in k)[1] == [["`persistence`", "0.000", "0.125"]]
    assert next(v for k, v in tables.items() if "per_class" in k)[1] == [["`model`", "vehicle", "1.500", "2.000"]]
    assert ["`mAP`", "0.400"] in next(v for k, v in tables.items() if "Detection" in k)[1]
    assert eval_report.render_report({"split": "val", "models": {}}).startswith("# Open-loop evaluation")


def test_bad_input_is_refused_with_a_clear_error(synthetic_mini, synthetic_windows, run_folder, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert cli.main(["eval", "--out", str(tmp_path / "out"), *argv]) == 2
        return capsys.readouterr().err

    assert "give --data" in fails()
    assert "does not exist" in fails("--dataroot", str(tmp_path / "nowhere"))
    trainval = fails("--dataroot", str(synthetic_mini), "--version", "v1.0-trainval")
    assert "has no v1.0-trainval/ tables folder" in trainval
    assert "is not a devkit split" in fails("--dataroot", str(synthetic_mini), "--split", "mini_vall")
    assert "has no windows of split 'test'" in fails("--data", str(synthetic_windows), "--split", "test")
    assert "not a bevjepa run folder" in fails("--data", str(synthetic_windows), "--checkpoint", str(tmp_path))
    assert "must be a `bevjepa preprocess` output" in fails("--data", str(tmp_path / "none"))
    assert not (tmp_path / "out" / "metrics.json").exists()
