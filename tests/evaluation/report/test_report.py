"""``bevjepa eval``: metrics.json, a report.md whose tables hold metrics.json's numbers, the figures, bad input."""

from __future__ import annotations

import dataclasses
import decimal
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from bevjepa.datasets import categories
from bevjepa.evaluation import world_model_check
from bevjepa.evaluation.report import eval_report
from bevjepa.prediction import config as experiment_config
from bevjepa.tools import cli

CHECK_SECTION = "## Does the world model earn its place?"


@pytest.fixture(scope="module")
def run_folder(light_checkpoint: Path) -> Path:
    return light_checkpoint  # any trained world model: the light LiDAR-only one evaluates fastest


@pytest.fixture(scope="module")
def evaluated(
    synthetic_mini: Path,
    synthetic_windows: Path,
    run_folder: Path,
    tiny_direct_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out = tmp_path_factory.mktemp("eval") / "report"
    argv = ["eval", "--data", str(synthetic_windows), "--checkpoint", str(run_folder), "--out", str(out)]
    argv += ["--direct", str(tiny_direct_checkpoint)]
    # --dataroot with --data: the windows are used as they are, the dataroot feeds the detection evaluation.
    # one window's panels (the other's would be the same drawing again), two windows in the animation
    assert cli.main([*argv, "--dataroot", str(synthetic_mini), "--figures", "1", "--animation-windows", "2"]) == 0
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


def _source(cell: str) -> str:
    """The metrics.json name of a row's first cell: ``` `name` ``` or ``title (`name`)``."""
    return re.findall(r"`([^`]+)`", cell)[-1]


def _same(cell: str, value: object) -> bool:
    """A report cell shows a metrics.json value, rounded at the cell's last digit, or — for null."""
    if value is None:
        return cell == eval_report.MISSING
    last_digit = decimal.Decimal(cell).as_tuple().exponent
    return abs(float(cell) - float(value)) <= 0.5 * 10.0**last_digit * (1 + 1e-9)


def test_metrics_json_is_strict_and_says_what_was_evaluated(
    evaluated, synthetic_windows, run_folder, tiny_direct_checkpoint
):
    metrics = json.loads((evaluated / "metrics.json").read_text(), parse_constant=_no_nan)
    assert {"model", "model_latent", "direct", "constant_velocity", "persistence"} <= set(metrics["models"])
    assert metrics["windows"] == 2 and metrics["split"] == "mini_val"
    assert metrics["evaluated"]["checkpoint"] == str(run_folder)
    assert metrics["evaluated"]["direct_checkpoint"] == str(tiny_direct_checkpoint)
    assert metrics["evaluated"]["direct_config"]["world_model"] is False
    assert metrics["evaluated"]["config"]["world_model"] is True
    assert metrics["evaluated"]["config"]["present_occupancy"] is False
    classes = list(categories.CLASSES)
    direct = metrics["models"]["direct"]
    assert list(direct["iou"]) == classes and all(len(v) == 5 for v in direct["iou"].values())
    assert "minADE_5" not in direct  # occupancy only
    check = metrics["world_model_check"]
    assert check["windows"] == 2 and check["threshold"] == 0.5
    assert tuple(check["iou"]) == world_model_check.SOURCES
    for per_class in check["iou"].values():
        assert list(per_class) == classes and all(len(v) == 5 for v in per_class.values())
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
    checked, checked_detection, checked_check = 0, 0, 0
    tables = _tables(text)
    assert tables
    for section, heading, header, rows in tables:
        key = (re.findall(r"`([^`]+)`", heading) or [""])[-1]
        if section == CHECK_SECTION:
            checked_check += _check_table(metrics, heading, header, rows)
            continue
        for row in rows:
            assert len(row) == len(header), (heading, row)
            devkit = {title: name for name, title in eval_report.DEVKIT_SECTIONS.items()}
            if section in devkit:
                value = metrics[devkit[section]] if heading == section else metrics[devkit[section]][key]
                if header == ["metric", "value"]:
                    assert _same(row[1], value[row[0].strip("`")]), (heading, row)
                elif header == ["name", "value"]:
                    assert _same(row[1], value[row[0]]), (heading, row)
                else:
                    for column, cell in zip(header[1:], row[1:], strict=True):
                        assert _same(cell, value[row[0]][column]), (heading, row, column)
                checked_detection += 1
                continue
            model = metrics["models"][_source(row[0])]
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
                    assert _same(cell, model.get(column)), (heading, column, cell)
                    checked += 1
    iou_cells = sum(len(v) for m in metrics["models"].values() for v in m["iou"].values())
    assert checked >= iou_cells + len(metrics["models"])  # every IoU per step and every IoU at 2 s at least
    assert checked_detection >= 2  # mAP and NDS at least
    # per class: rollout, rollout unwarped, held, observed, direct and the ratio at 5 horizons; then the flow per
    # class and horizon
    assert checked_check == 3 * 6 * 5 + 3 * 5
    assert "## What was evaluated" in text and "mini_val" in text and "2 windows" in text


def _check_table(metrics: dict, heading: str, header: list[str], rows: list[list[str]]) -> int:
    """Check a table of the world-model section against metrics.json; the number of cells checked."""
    if heading == "### The rollout's flow":  # per class: "error / motion" (m) per horizon
        check = metrics["world_model_check"]
        assert [row[0] for row in rows] == list(categories.CLASSES)
        for row in rows:
            assert len(row) == len(header) == 6, (heading, row)
            for step, cell in enumerate(row[1:]):
                error, motion = cell.split(" / ")
                assert _same(error, check["flow_error_m"][row[0]][step]) and _same(
                    motion, check["motion_m"][row[0]][step]
                )
        return 5 * len(rows)
    cls = heading.removeprefix("### ").split(":")[0]
    assert cls in categories.CLASSES and header[0] == "latent", heading
    iou = metrics["world_model_check"]["iou"]
    series = {name: iou[name][cls] for name in world_model_check.SOURCES}
    series["direct"] = metrics["models"]["direct"]["iou"][cls]
    assert [_source(row[0]) for row in rows[:-1]] == [*world_model_check.SOURCES, "direct"]
    assert rows[-1][0] == "rollout ÷ held"
    checked = 0
    for row in rows:
        assert len(row) == len(header), (heading, row)
        for step, cell in enumerate(row[1:]):
            if row[0] == "rollout ÷ held":
                a, b = series["rollout"][step], series["held"][step]
                value = a / b if a is not None and b is not None and b > 0 else None
            else:
                value = series[_source(row[0])][step]
            assert _same(cell, value), (heading, row, step)
            checked += 1
    return checked


def test_the_sensor_only_sources_lead_and_the_world_model_check_has_its_section(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    text = (evaluated / "report.md").read_text()
    iou = next(rows for _, heading, _, rows in _tables(text) if heading.startswith("### Occupancy IoU per horizon"))
    assert [_source(row[0]) for row in iou[:9]] == ["model"] * 3 + ["model_latent"] * 3 + ["direct"] * 3
    assert iou[0][0] == "model, from the sensors (tracked agents and dense occupancy) (`model`)"
    annotated = next(row[0] for row in iou if _source(row[0]) == "model_annotated")
    assert annotated == "model, annotated agents (needs annotations) (`model_annotated`)"
    assert CHECK_SECTION in text and text.index(CHECK_SECTION) < text.index("## Detection at t0")
    for line in eval_report.world_model_verdicts(metrics):
        assert line in text


def test_the_verdicts_are_computed_from_the_numbers():
    metrics = {
        "models": {
            "model_latent": {"iou": {"vehicle": [0.9, 0.8, 0.6, 0.5, 0.4], "pedestrian": [0.5, 0.3, 0.1, 0.1, 0.05]}},
            "direct": {"iou": {"vehicle": [0.9, 0.8, 0.5, 0.5, 0.45], "pedestrian": [0.5, 0.3, 0.2, 0.1, 0.05]}},
        },
        "world_model_check": {
            "windows": 3,
            "threshold": 0.5,
            "iou": {
                "rollout": {"vehicle": [0.9, 0.8, 0.6, 0.5, 0.4], "pedestrian": [0.5, 0.3, 0.1, 0.1, 0.05]},
                "held": {"vehicle": [0.9, 0.7, 0.5, 0.3, 0.2], "pedestrian": [0.5, 0.3, 0.1, 0.1, 0.0]},
                "observed": {"vehicle": [0.9, 0.9, 0.9, 0.9, 0.9], "pedestrian": [0.5, 0.5, 0.5, 0.5, None]},
            },
        },
    }
    verdicts = eval_report.world_model_verdicts(metrics)
    assert verdicts == [
        "- at 2 s the rollout is 2.00× the held latent for vehicles (IoU 0.400 against 0.200).",
        "- at 2 s the rollout's IoU for pedestrians is 0.050, the held latent's 0.000: no ratio.",
        "- the world model beats the direct baseline at 1 s but not at 2 s for vehicles (IoU of `model_latent` "
        "against `direct`, 1 s: 0.600 against 0.500; 2 s: 0.400 against 0.450).",
        "- the world model does not beat the direct baseline at 1 s or 2 s for pedestrians (IoU of `model_latent` "
        "against `direct`, 1 s: 0.100 against 0.200; 2 s: 0.050 against 0.050).",
    ]
    # with both runs' forecast bars: the planner's forecast against the direct baseline, each at its own bars
    metrics["models"]["model"] = {"iou_at_bars": {"pedestrian": [0.5, 0.3, 0.25, 0.2, 0.15]}}
    metrics["models"]["direct"]["iou_at_bars"] = {"pedestrian": [0.5, 0.3, 0.2, 0.1, 0.2], "cyclist": [0.3] * 5}
    assert eval_report.world_model_verdicts(metrics)[len(verdicts) :] == [
        "- the planner's forecast, read at its bars, beats the direct baseline at 1 s but not at 2 s for pedestrians "
        "(IoU of `model` and `direct`, each at its own run's bars, 1 s: 0.250 against 0.200; 2 s: 0.150 against "
        "0.200)."
    ]
    del metrics["models"]["model"]
    text = eval_report.render_report(metrics)
    section = text.split(CHECK_SECTION)[1]
    tables = {heading: rows for _, heading, _, rows in _tables(section)}
    vehicle = tables["### vehicle: occupancy IoU per horizon"]
    assert vehicle[-1] == ["rollout ÷ held", "1.000", "1.143", "1.200", "1.667", "2.000"]
    assert [row[-1] for row in vehicle[:-1]] == ["0.400", "0.200", "0.900", "0.450"]
    assert tables["### pedestrian: occupancy IoU per horizon"][-1][-1] == eval_report.MISSING
    assert all(line in text for line in verdicts)
    assert "present_occupancy" not in text
    metrics["evaluated"] = {"config": {"present_occupancy": True}}  # every source includes the present reading
    assert "`held` is the world model's own direct baseline" in eval_report.render_report(metrics)
    del metrics["models"]["direct"]
    assert "No direct baseline was scored" in eval_report.render_report(metrics)
    failed = eval_report.render_report({"models": {}, "world_model_check": {"error": "ValueError: bad window"}})
    assert "The world-model check failed: `ValueError: bad window`." in failed


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
    model = "model, from the sensors (tracked agents and dense occupancy) (`model`)"
    assert trajectory == (["model", "minADE_5"], [[model, "1.235"]])
    occupancy = next(v for k, v in tables.items() if "calibration" in k)
    assert occupancy[0] == ["model", "iou_2s_mean", "vpq"] and occupancy[1][0] == [model, "—", "0.333"]
    assert next(v for k, v in tables.items() if "`brier`" in k)[1] == [["`persistence`", "0.000", "0.125"]]
    assert next(v for k, v in tables.items() if "per_class" in k)[1] == [[model, "vehicle", "1.500", "2.000"]]
    assert CHECK_SECTION not in text  # no world-model check in metrics.json: no section
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
    refused = fails("--data", str(synthetic_windows), "--direct", str(run_folder))
    assert "--direct" in refused and "has a world model" in refused and "bevjepa train --config direct" in refused
    assert "must be a `bevjepa preprocess` output" in fails("--data", str(tmp_path / "none"))
    # A run of the base preset (±50 m) on windows preprocessed for small (±32 m): named before any work.
    base_run = tmp_path / "base-run"
    shutil.copytree(run_folder, base_run)
    (base_run / "config.json").write_text(json.dumps(experiment_config.to_dict(experiment_config.preset("base"))))
    wrong_grid = fails("--data", str(synthetic_windows), "--checkpoint", str(base_run))
    assert "x [-32.0, 32.0) m" in wrong_grid and "bevjepa preprocess --config base" in wrong_grid
    assert not (tmp_path / "out" / "metrics.json").exists()
