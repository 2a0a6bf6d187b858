"""``bevjepa eval``: the open-loop report — metrics.json, report.md and PNG panels (and an animated GIF).

Output (``OUT``):

    windows/              the split preprocessed from ``--dataroot`` (only without ``--data``; resumable)
    metrics.json          ``open_loop.evaluate`` output, plus ``detection`` (when run) and ``evaluated`` (what
                          was scored); strict JSON: NaN and infinities are written as null
    report.md             what was evaluated, the tables, the figures with a one-line caption each
    figures/*.png         IoU per horizon; for each chosen window: LiDAR, occupancy per horizon, trajectories
    figures/scene.gif     consecutive windows of the first chosen window's scene, each over its horizon
    detection/            the detection evaluation's own files (when it runs)

The tables of ``report.md`` are generated from metrics.json as read back from disk, so every number in the
report is the one in the JSON (rounded for reading: 3 decimals, or 3 significant digits under 0.01). Keys the
evaluation does not produce (yet) are left out, and keys it adds are rendered by their shape: a number per model,
a list per horizon step, a ``{class: number}``, ``{class: [per step]}`` or ``{class: {metric: number}}`` map.

The windows shown are chosen deterministically: most moving agents first (``plots.choose_windows``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, geometry, preprocess, torch_dataset, windows
from bevjepa.datasets import io as bevio
from bevjepa.evaluation import baselines, detection_eval, open_loop
from bevjepa.evaluation.report import plots
from bevjepa.prediction import checkpoint, forecaster, train

SOURCE_NOTES = {
    "model": "the forecast: trajectory modes; occupancy = the agents' annotated t0 boxes moved along the modes, "
    "weighted by the mode probabilities",
    "model_latent": "the latent occupancy head alone (from the sensors, no agent boxes)",
    "constant_velocity": "the annotated t0 boxes moved at their annotated t0 velocity (nuScenes: a centred "
    "difference that looks 0.5 s ahead)",
    "constant_velocity_past": "the same boxes moved at the velocity of their last past step (causal, as the model; "
    "the devkit's constant-velocity speed)",
    "constant_velocity_anchor": "the same boxes moved at their t0 velocity from the last three past positions "
    "(causal): the model's anchor mode alone",
    "constant_velocity_detected": "the model's own t0 detections moved at their regressed velocity",
    "ctrv": "constant turn rate and velocity from the annotated t0 boxes and their past",
    "persistence": "everything stays as it is at t0",
}
"""One line on what each source of ``open_loop.evaluate`` is, for the report."""
MODEL_ORDER = tuple(SOURCE_NOTES)
"""The order of the rows of every table: that of ``SOURCE_NOTES`` (names not listed follow, sorted)."""
TRAJECTORY_KEYS = tuple(f"{metric}_{k}" for k in (1, 5, 10) for metric in ("minADE", "minFDE", "MissRate_2"))
"""The trajectory columns, in table order."""
MISSING = "—"
"""A cell whose value metrics.json lacks or holds as null."""


@dataclass(frozen=True)
class EvalConfig:
    """An open-loop evaluation and its report.

    Attributes:
        out: the report folder (created; rerunning rewrites the report and resumes preprocessing).
        split: the devkit split scored (``mini_val``, ``val``, ...; ``all`` for every scene present).
        checkpoint: a run folder; None scores only the baselines.
        data: windows written by ``bevjepa preprocess``; None preprocesses the split of ``dataroot`` into
            ``out/windows``.
        dataroot: the nuScenes dataset root (needed without ``data``; with a checkpoint it also feeds the
            detection evaluation, when that is installed).
        version: the table version of ``dataroot``.
        workers: Ray workers for preprocessing (1: this process).
        address: a Ray cluster for preprocessing.
        batch_size: windows per forward pass.
        figure_windows: windows drawn as PNG panels.
        animation_windows: consecutive windows in the GIF (0: no GIF).
        progress: show progress.
    """

    out: Path
    split: str = "mini_val"
    checkpoint: Path | None = None
    data: Path | None = None
    dataroot: Path | None = None
    version: str = "v1.0-mini"
    workers: int = 1
    address: str | None = None
    batch_size: int = 4
    figure_windows: int = 2
    animation_windows: int = 6
    progress: bool = True

    def __post_init__(self) -> None:
        if self.data is None and self.dataroot is None:
            raise ValueError("give --data WINDOWS (a `bevjepa preprocess` output) or --dataroot D (a nuScenes root)")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"--workers and the batch size must be at least 1, got {self.workers}, {self.batch_size}")
        if self.figure_windows < 0 or self.animation_windows < 0:
            raise ValueError("figure_windows and animation_windows must not be negative")


@dataclass(frozen=True)
class EvalReport:
    """What ``run`` wrote.

    Attributes:
        out: the report folder.
        windows: the windows scored.
        metrics: metrics.json as read back (NaN written as null).
        metrics_path: ``out/metrics.json``.
        report_path: ``out/report.md``.
        figures: every figure written, relative to ``out``.
    """

    out: Path
    windows: Path
    metrics: dict
    metrics_path: Path
    report_path: Path
    figures: tuple[str, ...]


# --- inputs ----------------------------------------------------------------------------------------------------


def check_inputs(config: EvalConfig) -> None:
    """Fail before any work on a wrong dataroot, version, split, windows folder or checkpoint.

    Raises:
        FileNotFoundError: the dataroot, its ``version`` tables, the windows' manifest or the run folder's files
            are missing.
        ValueError: the split is unknown, or not in the windows.
    """
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if config.split != "all" and config.split not in splits:
        raise ValueError(f"--split {config.split!r} is not a devkit split; choose one of {['all', *sorted(splits)]}")
    if config.dataroot is not None:
        dataroot = Path(config.dataroot)
        if not dataroot.is_dir():
            raise FileNotFoundError(
                f"--dataroot {dataroot} does not exist; pass the folder that holds {config.version}/"
            )
        if not (dataroot / config.version).is_dir():
            present = sorted(p.name for p in dataroot.glob("v1.0-*") if p.is_dir())
            raise FileNotFoundError(
                f"--dataroot {dataroot} has no {config.version}/ tables folder (it has {present}); check --version"
            )
    if config.data is not None:
        train.split_scenes(Path(config.data), config.split)  # names the manifest or the split if they are wrong
    if config.checkpoint is not None:
        checkpoint.load_config(Path(config.checkpoint))
        checkpoint.load_state(Path(config.checkpoint))
        if not (Path(config.checkpoint) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{Path(config.checkpoint) / 'model.safetensors'} not found: {config.checkpoint} holds no weights"
            )


def windows_folder(config: EvalConfig) -> Path:
    """The windows to score: ``data``, or the split of ``dataroot`` preprocessed into ``out/windows`` (resumed)."""
    if config.data is not None:
        return Path(config.data)
    out = Path(config.out) / "windows"
    print(f"preprocessing {config.dataroot} ({config.version}, {config.split}) into {out}", file=sys.stderr)
    preprocess.preprocess(
        preprocess.PreprocessConfig(
            dataroot=Path(config.dataroot),
            out=out,
            version=config.version,
            split=None if config.split == "all" else config.split,
            workers=config.workers,
            address=config.address,
        ),
        progress=config.progress,
    )
    return out


# --- metrics.json ----------------------------------------------------------------------------------------------


def describe_inputs(config: EvalConfig, data: Path) -> dict:
    """What was evaluated: the windows and their dataset, the checkpoint and a summary of its configuration."""
    manifest = json.loads((data / "manifest.json").read_text())
    described: dict = {
        "data": str(data),
        "dataset": manifest.get("dataset", {}),
        "windows_config_hash": manifest.get("config_hash"),
        "split": config.split,
        "checkpoint": str(config.checkpoint) if config.checkpoint is not None else None,
    }
    if config.checkpoint is not None:
        experiment = checkpoint.load_config(Path(config.checkpoint))
        state = checkpoint.load_state(Path(config.checkpoint))
        model = experiment.model
        sensors = [name for name, used in (("camera", model.use_camera), ("lidar", model.use_lidar)) if used]
        described["config"] = {
            "preset": experiment.preset,
            "hash": experiment.content_hash(),
            "sensors": sensors,
            "grid": dataclasses.asdict(model.grid),
            "occupancy_steps": model.occupancy_steps,
            "trajectory_steps": model.trajectory_steps,
            "modes": model.modes,
            "jepa_weight": experiment.train.weights.latent,
            "train_steps": experiment.train.steps,
            "trained_steps": state.get("step"),
            "batch_size": experiment.train.batch_size,
            "train_split": experiment.train.train_split,
        }
    return described


def detection_metrics(config: EvalConfig, data: Path) -> dict | None:
    """The devkit's detection evaluation (mAP, NDS, per-class AP) of the checkpoint, when a dataroot is given.

    Returns None when it does not apply; ``{"error": ...}`` when it failed (the report still gets written).
    """
    if config.dataroot is None or config.checkpoint is None:
        return None
    try:
        return detection_eval.evaluate_model_detections(
            Path(config.checkpoint),
            data,
            Path(config.dataroot),
            config.version,
            config.split,
            Path(config.out) / "detection",
            batch_size=config.batch_size,
        )
    except Exception as error:  # noqa: BLE001 — recorded in metrics.json and the report; the rest stands
        print(f"bevjepa eval: detection evaluation failed: {type(error).__name__}: {error}", file=sys.stderr)
        return {"error": f"{type(error).__name__}: {error}"}


# --- report.md -------------------------------------------------------------------------------------------------


def format_value(value: object) -> str:
    """A table cell: 3 decimals for a float (3 significant digits under 0.01), an int as is, ``—`` for none."""
    if value is None or isinstance(value, (dict, list)):
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def _is_scalar(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _cell(text: object) -> str:
    """Free text made safe for one Markdown table cell (one line, no column separators)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _ordered_models(models: dict) -> list[str]:
    known = [m for m in MODEL_ORDER if m in models]
    return known + sorted(m for m in models if m not in MODEL_ORDER)


def _horizon_header(steps: int) -> list[str]:
    return [f"{s * forecaster.STEP_S:.1f} s" for s in range(steps)]


def _model_tables(metrics: dict) -> list[str]:
    """The tables of the models' scores, each key rendered by its shape."""
    models: dict = metrics.get("models", {})
    names = _ordered_models(models)
    lines: list[str] = []
    trajectory = [k for k in TRAJECTORY_KEYS if any(k in models[m] for m in names)]
    if trajectory:
        rows = [
            [f"`{m}`", *(format_value(models[m].get(k)) for k in trajectory)]
            for m in names
            if any(k in models[m] for k in trajectory)
        ]
        lines += [
            "### Trajectories (`minADE_k`, `minFDE_k` in m; `MissRate_2_k`: no top-k mode within 2 m at every step)",
            "",
            *_table(["model", *trajectory], rows),
        ]
    scalar_keys = sorted(
        {k for m in names for k, v in models[m].items() if _is_scalar(v) and k not in TRAJECTORY_KEYS},
        key=lambda k: (k != "iou_2s_mean", k),
    )
    if scalar_keys:
        rows = [[f"`{m}`", *(format_value(models[m].get(k)) for k in scalar_keys)] for m in names]
        lines += [
            "### Occupancy and calibration (`iou_2s_mean`: IoU at 2 s, mean over classes)",
            "",
            *_table(["model", *scalar_keys], rows),
        ]
    for key in sorted({k for m in names for k, v in models[m].items() if isinstance(v, list)}):
        steps = max(len(models[m][key]) for m in names if isinstance(models[m].get(key), list))
        rows = [
            [f"`{m}`", *(format_value(v) for v in models[m][key]), *([MISSING] * (steps - len(models[m][key])))]
            for m in names
            if isinstance(models[m].get(key), list)
        ]
        lines += [f"### `{key}` per horizon", "", *_table(["model", *_horizon_header(steps)], rows)]
    per_class_keys = {
        k
        for m in names
        for k, v in models[m].items()
        if isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values())
    }
    for key in sorted(per_class_keys, key=lambda k: (k != "iou", k)):
        steps = max(len(x) for m in names for x in (models[m].get(key) or {}).values())
        rows = []
        for m in names:
            for cls, values in (models[m].get(key) or {}).items():
                rows.append([f"`{m}`", cls, *(format_value(v) for v in values), *([MISSING] * (steps - len(values)))])
        title = "Occupancy IoU" if key == "iou" else f"`{key}`"
        lines += [
            f"### {title} per horizon and class (`{key}`)",
            "",
            *_table(["model", "class", *_horizon_header(steps)], rows),
        ]
    class_scalar_keys = {
        k
        for m in names
        for k, v in models[m].items()
        if isinstance(v, dict) and v and all(_is_scalar(x) for x in v.values())
    }
    for key in sorted(class_scalar_keys):
        columns = list(dict.fromkeys(c for m in names for c in (models[m].get(key) or {})))
        rows = [
            [f"`{m}`", *(format_value(models[m][key].get(c)) for c in columns)]
            for m in names
            if isinstance(models[m].get(key), dict)
        ]
        lines += [f"### `{key}` per class", "", *_table(["model", *columns], rows)]
    nested_keys = {
        k
        for m in names
        for k, v in models[m].items()
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())
    }
    for key in sorted(nested_keys):
        columns = sorted(
            {c for m in names for x in (models[m].get(key) or {}).values() for c, y in x.items() if _is_scalar(y)},
            key=lambda c: (TRAJECTORY_KEYS.index(c) if c in TRAJECTORY_KEYS else len(TRAJECTORY_KEYS), c),
        )
        rows = [
            [f"`{m}`", cls, *(format_value(x.get(c)) for c in columns)]
            for m in names
            for cls, x in (models[m].get(key) or {}).items()
        ]
        lines += [f"### Per class (`{key}`)", "", *_table(["model", "class", *columns], rows)]
    return lines


def _detection_tables(detection: dict) -> list[str]:
    lines = ["## Detection at t0", ""]
    if "error" in detection:
        return [*lines, f"The detection evaluation failed: `{detection['error']}`.", ""]
    scalars = [k for k, v in detection.items() if _is_scalar(v)]
    if scalars:
        lines += _table(["metric", "value"], [[f"`{k}`", format_value(detection[k])] for k in scalars])
    for key, value in detection.items():
        if not isinstance(value, dict) or not value:
            continue
        if all(_is_scalar(v) for v in value.values()):
            rows = [[k, format_value(v)] for k, v in value.items()]
            lines += [f"### `{key}`", "", *_table(["name", "value"], rows)]
        elif all(isinstance(v, dict) for v in value.values()):
            columns = sorted({c for v in value.values() for c, y in v.items() if _is_scalar(y)})
            rows = [[k, *(format_value(v.get(c)) for c in columns)] for k, v in value.items()]
            lines += [f"### `{key}`", "", *_table(["class", *columns], rows)]
    return lines


def render_report(metrics: dict, figures: Sequence[tuple[str, str]] = ()) -> str:
    """report.md from metrics.json's content.

    Args:
        metrics: metrics.json as read back (``evaluate`` output plus ``evaluated`` and ``detection``).
        figures: (path relative to the report, one-line caption) of each figure, in order.
    """
    evaluated = metrics.get("evaluated", {})
    dataset = evaluated.get("dataset", {})
    models = metrics.get("models", {})
    lines = ["# Open-loop evaluation", "", "## What was evaluated", ""]
    lines += [
        f"- data: `{evaluated.get('data', '?')}` (dataset `{dataset.get('dataroot', '?')}`, "
        f"version `{dataset.get('version', '?')}`; windows config `{evaluated.get('windows_config_hash', '?')}`)",
        f"- split: `{metrics.get('split', evaluated.get('split', '?'))}`: {metrics.get('windows', 0)} windows, "
        f"{metrics.get('agents', 0)} agents with a whole 6 s future (the trajectory metrics are over these)"
        + (f"; {metrics['windows_failed']} windows failed (listed below)" if metrics.get("windows_failed") else ""),
        f"- checkpoint: `{evaluated.get('checkpoint')}`"
        if evaluated.get("checkpoint")
        else "- checkpoint: none (baselines only)",
    ]
    config = evaluated.get("config")
    if config:
        grid = config.get("grid", {})
        lines.append(
            f"- model: preset `{config.get('preset')}` (config `{config.get('hash')}`), sensors "
            f"{' + '.join(config.get('sensors', []))}, grid x [{grid.get('x_min_m')}, {grid.get('x_max_m')}) y "
            f"[{grid.get('y_min_m')}, {grid.get('y_max_m')}) m at {grid.get('resolution_m')} m, "
            f"{config.get('occupancy_steps')} occupancy steps, {config.get('trajectory_steps')} trajectory steps, "
            f"{config.get('modes')} modes, JEPA weight {config.get('jepa_weight')}; trained "
            f"{config.get('trained_steps')} of {config.get('train_steps')} steps, batch {config.get('batch_size')}, "
            f"on `{config.get('train_split')}`"
        )
    lines += [
        "- occupancy: per-class IoU, model probabilities thresholded at 0.5, cell counts summed over the split",
        "- sources: " + "; ".join(f"`{m}`: {SOURCE_NOTES[m]}" for m in _ordered_models(models) if m in SOURCE_NOTES),
        f"- every number below is read from `metrics.json` (rounded to 3 decimals); `{MISSING}` where it holds none",
        "",
        "## Scores",
        "",
        *_model_tables(metrics),
    ]
    if isinstance(metrics.get("detection"), dict):
        lines += _detection_tables(metrics["detection"])
    failed = metrics.get("failed_windows") or []
    if failed:
        lines += [
            "## Failed windows",
            "",
            f"{len(failed)} windows could not be scored and are left out of every number above:",
            "",
            *_table(
                ["scene", "sample", "stage", "error"],
                [
                    [str(f.get("scene")), f"`{f.get('sample_token')}`", str(f.get("stage")), _cell(f.get("error"))]
                    for f in failed
                ],
            ),
        ]
    if figures:
        lines += ["## Figures", ""]
        for path, caption in figures:
            lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- figures ---------------------------------------------------------------------------------------------------


def constant_velocity_forecast(
    sample: torch_dataset.WindowSample, grid: geometry.GridSpec, steps: int
) -> forecaster.OccupancyForecast:
    """The constant-velocity baseline as an ``OccupancyForecast`` (one mode per agent; 0/1 occupancy).

    Args:
        sample: the window.
        grid: its target grid.
        steps: F, occupancy steps after t0.
    """
    box = sample.agent_box.numpy().astype(np.float64)  # [A, 7]
    velocity = baselines.agent_velocities(
        sample.agent_velocity.numpy(), sample.agent_past.numpy(), sample.agent_past_mask.numpy()
    )  # [A, 2]
    horizon = sample.agent_future.shape[1]
    occupancy = baselines.constant_velocity_occupancy(
        box, sample.agent_class.numpy(), velocity, grid, len(categories.CLASSES), steps
    )  # [S, C, H, W]
    return forecaster.OccupancyForecast(
        timestamp_us=sample.timestamp_us,
        grid=grid,
        classes=categories.CLASSES,
        times_s=np.arange(steps + 1, dtype=np.float32) * forecaster.STEP_S,
        occupancy=occupancy.astype(np.float32),
        agent_ids=np.array(sample.agent_ids, dtype=str).reshape(-1),
        agent_classes=sample.agent_class.numpy(),
        trajectory_times_s=np.arange(1, horizon + 1, dtype=np.float32) * forecaster.STEP_S,
        trajectories=baselines.constant_velocity_trajectories(box[:, :2], velocity, horizon).astype(np.float32),
        mode_probabilities=np.ones((len(box), 1), dtype=np.float32),
    )


def make_figures(
    data: Path,
    split: str,
    run: Path | None,
    metrics: dict,
    out: Path,
    figure_windows: int = 2,
    animation_windows: int = 6,
) -> list[tuple[str, str]]:
    """Draw the report's figures into ``out/figures``.

    Returns:
        (path relative to ``out``, one-line caption) of each figure, in report order.
    """
    figures_dir = Path(out) / "figures"
    figures: list[tuple[str, str]] = []
    plots.plot_iou_per_horizon(metrics, figures_dir / "iou_per_horizon.png")
    figures.append(("figures/iou_per_horizon.png", "Occupancy IoU against the horizon, per class, every model."))
    if figure_windows == 0 and animation_windows == 0:
        return figures
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    failed_files = {f["file"] for f in metrics.get("failed_windows") or []}
    usable: list[int] = []  # indices into dataset.entries of the windows that were scored
    stored: list[windows.Window] = []
    for index, entry in enumerate(dataset.entries):
        if entry["file"] in failed_files:
            continue
        try:
            stored.append(windows.load_window(dataset.root / entry["file"]))
        except Exception:  # noqa: BLE001 — a window that no longer loads is not drawn
            continue
        usable.append(index)
    moving_usable = [plots.moving_agent_count(w.agent_velocity, w.agent_past, w.agent_past_mask) for w in stored]
    moving = dict(zip(usable, moving_usable, strict=True))
    picked = plots.choose_windows(
        moving_usable,
        [len(w.agent_ids) for w in stored],
        [dataset.entries[i]["scene"] for i in usable],
        max(figure_windows, 1),
    )
    chosen = [usable[i] for i in picked]
    model = forecaster.Forecaster.from_checkpoint(run) if run is not None else None
    label = "model" if model is not None else "constant velocity"
    grid = geometry.GridSpec(**dataset.config["window"]["grid"])
    steps = int(dataset.config["window"]["occupancy_steps"])

    cache: dict[int, tuple[torch_dataset.WindowSample, forecaster.OccupancyForecast]] = {}

    def forecasts_of(indices: list[int]) -> tuple[list, list]:
        """The windows and their forecasts, each forecast once (the figures and the GIF share windows)."""
        todo = [i for i in dict.fromkeys(indices) if i not in cache]
        for first in range(0, len(todo), 4):  # a few windows per forward pass
            samples = [dataset[i] for i in todo[first : first + 4]]
            if model is None:
                forecasts = [constant_velocity_forecast(s, grid, steps) for s in samples]
            else:
                with torch.no_grad():
                    forecasts = model.forecast_batch(torch_dataset.collate(samples))
            cache.update(zip(todo[first : first + 4], zip(samples, forecasts, strict=True), strict=True))
        return [cache[i][0] for i in indices], [cache[i][1] for i in indices]

    samples, forecasts = forecasts_of(chosen[:figure_windows])
    for n, (index, sample, forecast) in enumerate(zip(chosen, samples, forecasts, strict=False), start=1):
        name = f"{sample.scene_name} {sample.sample_token[:8]} ({moving[index]} moving agents)"
        plots.plot_lidar(sample, figures_dir / f"lidar_{n}.png", grid)
        plots.plot_occupancy(sample, forecast, figures_dir / f"occupancy_{n}.png", label)
        plots.plot_trajectories(sample, forecast, figures_dir / f"trajectories_{n}.png", label)
        figures += [
            (f"figures/lidar_{n}.png", f"{name}: LiDAR at t0 (log density), ego and annotated boxes."),
            (
                f"figures/occupancy_{n}.png",
                f"{name}: {label} P(occupied) per horizon, ground truth outlined by class.",
            ),
            (
                f"figures/trajectories_{n}.png",
                f"{name}: ground-truth futures (dashed) and {label} modes shaded by probability.",
            ),
        ]
    if animation_windows > 0 and chosen:
        scene = dataset.entries[chosen[0]]["scene"]
        of_scene = [i for i in usable if dataset.entries[i]["scene"] == scene]  # time order
        position = of_scene.index(chosen[0])
        start = max(0, min(position - animation_windows // 2, len(of_scene) - animation_windows))
        run_of_windows = of_scene[start : start + animation_windows]
        samples, forecasts = forecasts_of(run_of_windows)
        plots.scene_animation(samples, forecasts, figures_dir / "scene.gif", label)
        figures.append(
            (
                "figures/scene.gif",
                f"{scene}: {len(samples)} consecutive windows, each over its 2 s horizon; ground truth (left), "
                f"{label} (right).",
            )
        )
    return figures


# --- the job ---------------------------------------------------------------------------------------------------


def run(config: EvalConfig) -> EvalReport:
    """Evaluate, then write metrics.json, the figures and report.md into ``config.out``.

    Raises:
        FileNotFoundError, ValueError: wrong inputs (see ``check_inputs``).
    """
    check_inputs(config)
    out = bevio.claim_output_folder(
        Path(config.out), "eval", own_files=lambda folder: (folder / "metrics.json").is_file()
    )
    data = windows_folder(config)
    run_folder = Path(config.checkpoint) if config.checkpoint is not None else None
    result = open_loop.evaluate(data, config.split, run_folder, batch_size=config.batch_size)
    detection = detection_metrics(config, data)
    if detection is not None:
        result["detection"] = detection
    result["evaluated"] = describe_inputs(config, data)
    metrics_path = out / "metrics.json"
    bevio.atomic_write_json(metrics_path, result)
    metrics = json.loads(metrics_path.read_text())  # the report shows what the file holds
    figures = make_figures(
        data, config.split, run_folder, metrics, out, config.figure_windows, config.animation_windows
    )
    report_path = out / "report.md"
    bevio.atomic_write_text(report_path, render_report(metrics, figures))
    return EvalReport(out, data, metrics, metrics_path, report_path, tuple(path for path, _ in figures))
