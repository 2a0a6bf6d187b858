"""``bevjepa eval``: the open-loop report — metrics.json, report.md and PNG panels (and an animated GIF).

Output (``OUT``):

    windows/              the split preprocessed from ``--dataroot`` (only without ``--data``; resumable)
    metrics.json          ``open_loop.evaluate`` output, plus ``detection`` (when run), ``world_model_check`` (with
                          a world-model checkpoint: ``world_model_check.WorldModelCheck.to_dict``) and ``evaluated``
                          (what was scored); strict JSON: NaN and infinities are written as null
    report.md             what was evaluated, the tables (the sensor-only sources first), the world-model check,
                          the figures with a one-line caption each
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, geometry, preprocess, torch_dataset, windows
from bevjepa.datasets import io as bevio
from bevjepa.evaluation import baselines, detection_eval, open_loop, prediction_export, tracking_eval, world_model_check
from bevjepa.evaluation.report import plots
from bevjepa.prediction import checkpoint, forecaster, train
from bevjepa.prediction import config as experiment_config

SOURCE_NOTES = {
    "model": "the forecast from the sensors alone (no annotation read), what a planner gets: agents tracked from the "
    "model's own detections, trajectory modes, occupancy = their boxes along the modes joined with the dense map; "
    "trajectories scored on the annotated agents a track stands for (same class, within 2 m at t0)",
    "model_latent": "the model's dense occupancy alone, decoded from its sensors (no agents)",
    "direct": "the direct baseline (`bevjepa train --config direct`): the LiDAR alone, every horizon's occupancy "
    "decoded at once from z_t0, no world model",
    "constant_velocity_tracked": "the model's own tracked agents moved at their track's velocity (from the sensors: "
    "the like-for-like baseline of `model`)",
    "model_annotated": "the model forecasting the annotated agents from their annotated pasts (the prediction "
    "challenge's protocol; needs annotations): occupancy = the annotated t0 boxes moved along the modes",
    "tracked_true_velocity": "the model's tracked boxes moved at the annotated velocity of the agent each stands "
    "for (a diagnostic, needs annotations): against `constant_velocity_tracked`, what the tracks' velocities cost; "
    "against `constant_velocity`, what their t0 boxes cost",
    "constant_velocity": "the annotated t0 boxes moved at their annotated t0 velocity (nuScenes: a centred "
    "difference that looks 0.5 s ahead)",
    "constant_velocity_past": "the same boxes moved at the velocity of their last past step (causal, as the model; "
    "the devkit's constant-velocity speed)",
    "constant_velocity_anchor": "the same boxes moved at their t0 velocity from the last three past positions "
    "(causal): the model's anchor mode alone",
    "ctrv": "constant turn rate and velocity from the annotated t0 boxes and their past",
    "persistence": "everything stays as it is at t0",
}
"""One line on what each source of ``open_loop.evaluate`` is, for the report."""
MODEL_ORDER = tuple(SOURCE_NOTES)
"""The order of the rows of every table: that of ``SOURCE_NOTES`` (names not listed follow, sorted): the sources that
read only the sensors first, then those that read the annotated boxes."""
SOURCE_TITLES = {
    "model": "model, from the sensors (tracked agents and dense occupancy)",
    "model_latent": "model, from the sensors (dense occupancy alone)",
    "direct": "direct baseline, from the LiDAR (dense occupancy)",
    "constant_velocity_tracked": "model's tracks at constant velocity (from the sensors)",
    "model_annotated": "model, annotated agents (needs annotations)",
    "tracked_true_velocity": "model's tracks at their annotated agents' velocity (diagnostic, needs annotations)",
}
"""The first cell of a source's rows, before its name (a source not listed shows its name alone)."""
CHECK_TITLES = {
    "rollout": "rollout ẑ_k",
    "rollout_unwarped": "rollout ẑ_k, fine maps not warped by its flow",
    "held": "held z_t0",
    "observed": "observed future (target encoder)",
    "direct": "direct baseline",
}
"""The rows of the world-model check's tables: ``world_model_check.SOURCES`` and the direct baseline."""
VERDICT_SECONDS = (1.0, 2.0)
"""The horizons (s) at which the world model is compared with the direct baseline."""
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
        checkpoint: a run folder; None scores only the baselines. With a world model, the world-model check
            (``world_model_check.check``) runs on the same windows.
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
        direct_checkpoint: a run folder of the direct baseline (``bevjepa train --config direct``), scored beside
            the model as ``direct``; None: not scored.
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
    direct_checkpoint: Path | None = None

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
    """Fail before any work on a wrong dataroot, version, split, windows folder, checkpoint or direct baseline.

    Raises:
        FileNotFoundError: the dataroot, its ``version`` tables, the windows' manifest or a run folder's files
            are missing.
        ValueError: the split is unknown, or not in the windows; the direct baseline's run has a world model; the
            windows' target grid is not a run's.
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
    runs = []
    if config.checkpoint is not None:
        runs.append(_check_run(Path(config.checkpoint)))
    if config.direct_checkpoint is not None:
        experiment = _check_run(Path(config.direct_checkpoint))
        if experiment.model.world_model:
            raise ValueError(
                f"--direct {config.direct_checkpoint}: this run has a world model (preset {experiment.preset!r}); "
                "give a run of the direct baseline, trained with `bevjepa train --config direct`"
            )
        runs.append(experiment)
    if config.data is not None:
        for experiment in runs:  # a model scored on targets of another grid would fail deep in the metrics
            train.check_windows_grid(Path(config.data), experiment)


def _check_run(run: Path) -> experiment_config.ExperimentConfig:
    """The configuration of a run folder that holds a config, a checkpoint state and weights."""
    experiment = checkpoint.load_config(run)
    checkpoint.load_state(run)
    if not (run / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run / 'model.safetensors'} not found: {run} holds no weights")
    return experiment


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
    """What was evaluated: the windows and their dataset, the checkpoints and a summary of their configurations."""
    manifest = json.loads((data / "manifest.json").read_text())
    described: dict = {
        "data": str(data),
        "dataset": manifest.get("dataset", {}),
        "windows_config_hash": manifest.get("config_hash"),
        "split": config.split,
        "checkpoint": str(config.checkpoint) if config.checkpoint is not None else None,
    }
    if config.checkpoint is not None:
        described["config"] = describe_run(Path(config.checkpoint))
    if config.direct_checkpoint is not None:
        described["direct_checkpoint"] = str(config.direct_checkpoint)
        described["direct_config"] = describe_run(Path(config.direct_checkpoint))
    return described


def describe_run(run: Path) -> dict:
    """A summary of a run folder's configuration and how far it trained."""
    experiment = checkpoint.load_config(run)
    state = checkpoint.load_state(run)
    model = experiment.model
    sensors = [name for name, used in (("camera", model.use_camera), ("lidar", model.use_lidar)) if used]
    return {
        "preset": experiment.preset,
        "hash": experiment.content_hash(),
        "sensors": sensors,
        "world_model": model.world_model,
        "present_occupancy": model.present_occupancy,
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


def _recorded(what: str, evaluate: Callable[[], dict]) -> dict:
    """``evaluate()``, or ``{"error": ...}`` when it raised (recorded in metrics.json and the report)."""
    try:
        return evaluate()
    except Exception as error:  # noqa: BLE001 — a failed devkit evaluation does not cost the user the report
        print(f"bevjepa eval: {what} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return {"error": f"{type(error).__name__}: {error}"}


DEVKIT_EVALUATIONS = {
    "detection": detection_eval.evaluate_model_detections,
    "tracking": tracking_eval.evaluate_model_tracking,
}
"""The devkit's evaluations of a checkpoint that ``bevjepa eval`` runs with a dataroot, each into ``OUT/<key>/``:
detection (mAP, NDS, per-class AP) and tracking of the model's own tracks (AMOTA, AMOTP, ID switches)."""


def devkit_metrics(config: EvalConfig, data: Path, key: str) -> dict | None:
    """The devkit evaluation ``key`` (``DEVKIT_EVALUATIONS``) of the checkpoint, when a dataroot is given.

    Returns None when it does not apply; ``{"error": ...}`` when it failed (the report still gets written).
    """
    if config.dataroot is None or config.checkpoint is None:
        return None
    evaluate = DEVKIT_EVALUATIONS[key]
    return _recorded(
        f"{key} evaluation",
        lambda: evaluate(
            Path(config.checkpoint),
            data,
            Path(config.dataroot),
            config.version,
            config.split,
            Path(config.out) / key,
            batch_size=config.batch_size,
            progress=config.progress,
        ),  # fmt: skip
    )


def prediction_challenge_file(config: EvalConfig, data: Path) -> dict | None:
    """The prediction challenge's submission JSON of the checkpoint in ``out/prediction/`` (None without one).

    The challenge's protocol gives the annotated agents and their pasts; the devkit's ``compute_metrics`` reads
    the file. ``{"error": ...}`` when the export failed.
    """
    if config.checkpoint is None:
        return None
    path = Path(config.out) / "prediction" / prediction_export.SUBMISSION_FILE

    def export() -> dict:
        records = prediction_export.export(
            data, config.split, path, "model", Path(config.checkpoint), batch_size=config.batch_size
        )
        return {"submission": str(path), "agents": len(records)}

    return _recorded("prediction export", export)


def world_model_metrics(config: EvalConfig, data: Path) -> dict | None:
    """The world-model check of the checkpoint (``world_model_check.WorldModelCheck.to_dict``) on the split.

    Returns None without a checkpoint or when the checkpoint has no world model (the direct baseline);
    ``{"error": ...}`` when it failed (the report still gets written).
    """
    if config.checkpoint is None:
        return None
    experiment, net = checkpoint.load_model(Path(config.checkpoint))
    if not experiment.model.world_model:
        return None
    try:
        check = world_model_check.check(net, data, config.split, batch_size=config.batch_size, progress=config.progress)
    except Exception as error:  # noqa: BLE001 — recorded in metrics.json and the report; the rest stands
        print(f"bevjepa eval: world-model check failed: {type(error).__name__}: {error}", file=sys.stderr)
        return {"error": f"{type(error).__name__}: {error}"}
    return check.to_dict()


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


def ordered_models(models: dict) -> list[str]:
    """The names of ``models`` in table order (``MODEL_ORDER``; names not listed follow, sorted)."""
    known = [m for m in MODEL_ORDER if m in models]
    return known + sorted(m for m in models if m not in MODEL_ORDER)


def _label(name: str) -> str:
    """The first cell of a source's rows: its title (``SOURCE_TITLES``) and its name in metrics.json."""
    return f"{SOURCE_TITLES[name]} (`{name}`)" if name in SOURCE_TITLES else f"`{name}`"


def _horizon_header(steps: int) -> list[str]:
    return [f"{s * forecaster.STEP_S:.1f} s" for s in range(steps)]


def _model_tables(metrics: dict) -> list[str]:
    """The tables of the models' scores, each key rendered by its shape."""
    models: dict = metrics.get("models", {})
    names = ordered_models(models)
    lines: list[str] = []
    trajectory = [k for k in TRAJECTORY_KEYS if any(k in models[m] for m in names)]
    if trajectory:
        rows = [
            [_label(m), *(format_value(models[m].get(k)) for k in trajectory)]
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
        rows = [[_label(m), *(format_value(models[m].get(k)) for k in scalar_keys)] for m in names]
        lines += [
            "### Occupancy and calibration (`iou_2s_mean`: IoU at 2 s, mean over classes)",
            "",
            *_table(["model", *scalar_keys], rows),
        ]
    for key in sorted({k for m in names for k, v in models[m].items() if isinstance(v, list)}):
        steps = max(len(models[m][key]) for m in names if isinstance(models[m].get(key), list))
        rows = [
            [_label(m), *(format_value(v) for v in models[m][key]), *([MISSING] * (steps - len(models[m][key])))]
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
    for key in sorted(per_class_keys, key=lambda k: (k != "iou", k != "iou_at_bars", k != "iou_short", k)):
        steps = max(len(x) for m in names for x in (models[m].get(key) or {}).values())
        rows = []
        for m in names:
            for cls, values in (models[m].get(key) or {}).items():
                rows.append([_label(m), cls, *(format_value(v) for v in values), *([MISSING] * (steps - len(values)))])
        title = {
            "iou": "Occupancy IoU",
            "iou_at_bars": "Occupancy IoU at each run's forecast bars (`bevjepa thresholds`, per step and class)",
            "iou_short": "Occupancy IoU at short range (the central 30 × 30 m)",
        }.get(key, f"`{key}`")
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
            [_label(m), *(format_value(models[m][key].get(c)) for c in columns)]
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
            [_label(m), cls, *(format_value(x.get(c)) for c in columns)]
            for m in names
            for cls, x in (models[m].get(key) or {}).items()
        ]
        lines += [f"### Per class (`{key}`)", "", *_table(["model", "class", *columns], rows)]
    return lines


def _number(value: object) -> float | None:
    """A finite float of metrics.json, or None (null, missing, NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _at(values: object, step: int) -> float | None:
    """Step ``step`` of a per-horizon list of metrics.json (None where it holds none)."""
    return _number(values[step]) if isinstance(values, list) and 0 <= step < len(values) else None


def iou_ratio(numerator: object, denominator: object) -> float | None:
    """``numerator`` ÷ ``denominator`` of two IoU values; None where either is missing or the denominator is 0."""
    a, b = _number(numerator), _number(denominator)
    return a / b if a is not None and b is not None and b > 0 else None


def world_model_verdicts(metrics: dict) -> list[str]:
    """Plain lines on what the world-model check and the direct baseline say, computed from metrics.json.

    Per class: the rollout's IoU over the held z_t0's at the last horizon (2 s); whether the world model's
    sensor-only occupancy (``model_latent``) beats the direct baseline's (``direct``), same windows, at
    ``VERDICT_SECONDS``; and, where both runs have forecast bars, whether the planner's forecast (``model``) read at
    its bars beats the direct baseline read at its own (``iou_at_bars``: the same rule for both). Classes or
    horizons without a value are left out.
    """
    lines: list[str] = []
    check = metrics.get("world_model_check")
    iou = check.get("iou", {}) if isinstance(check, dict) else {}
    for cls in categories.CLASSES:
        rollout, held = iou.get("rollout", {}).get(cls), iou.get("held", {}).get(cls)
        if not isinstance(rollout, list) or not rollout:
            continue
        last = len(rollout) - 1
        seconds = f"{last * forecaster.STEP_S:g} s"
        a, b = _at(rollout, last), _at(held, last)
        ratio = iou_ratio(a, b)
        if ratio is not None:
            lines.append(
                f"- at {seconds} the rollout is {ratio:.2f}× the held latent for {cls}s "
                f"(IoU {format_value(a)} against {format_value(b)})."
            )
        elif a is not None or b is not None:
            lines.append(
                f"- at {seconds} the rollout's IoU for {cls}s is {format_value(a)}, the held latent's "
                f"{format_value(b)}: no ratio."
            )
    models = metrics.get("models", {})
    lines += _direct_verdicts(
        models.get("model_latent", {}).get("iou", {}),
        models.get("direct", {}).get("iou", {}),
        "the world model",
        "IoU of `model_latent` against `direct`",
    )
    lines += _direct_verdicts(
        models.get("model", {}).get("iou_at_bars", {}),
        models.get("direct", {}).get("iou_at_bars", {}),
        "the planner's forecast, read at its bars,",
        "IoU of `model` and `direct`, each at its own run's bars",
    )
    return lines


def _direct_verdicts(ours: dict, theirs: dict, subject: str, what: str) -> list[str]:
    """Per class, a line on whether ``ours`` beats the direct baseline's ``theirs`` at ``VERDICT_SECONDS``.

    Both are {class: [IoU per step]}; a class or horizon missing on either side is left out.
    """
    lines = []
    for cls in categories.CLASSES:
        compared = []  # (seconds, our IoU, the direct baseline's)
        for seconds in VERDICT_SECONDS:
            step = round(seconds / forecaster.STEP_S)
            a, b = _at(ours.get(cls), step), _at(theirs.get(cls), step)
            if a is not None and b is not None:
                compared.append((seconds, a, b))
        if not compared:
            continue
        won = [f"{seconds:g} s" for seconds, a, b in compared if a > b]
        lost = [f"{seconds:g} s" for seconds, a, b in compared if not a > b]
        if not lost:
            verdict = f"beats the direct baseline at {' and '.join(won)}"
        elif not won:
            verdict = f"does not beat the direct baseline at {' or '.join(lost)}"
        else:
            verdict = f"beats the direct baseline at {' and '.join(won)} but not at {' or '.join(lost)}"
        numbers = "; ".join(f"{seconds:g} s: {format_value(a)} against {format_value(b)}" for seconds, a, b in compared)
        lines.append(f"- {subject} {verdict} for {cls}s ({what}, {numbers}).")
    return lines


def _world_model_section(metrics: dict) -> list[str]:
    """``## Does the world model earn its place?``: the world-model check per class and horizon, and the verdicts."""
    check = metrics.get("world_model_check")
    if not isinstance(check, dict):
        return []
    lines = ["## Does the world model earn its place?", ""]
    if "error" in check:
        return [*lines, f"The world-model check failed: `{_cell(check['error'])}`.", ""]
    direct = metrics.get("models", {}).get("direct", {}).get("iou")
    lines += [
        f"The model's occupancy decoder applied, on {check.get('windows')} windows, to the latent the predictor "
        "rolled out (`rollout`, what a forecast uses), to z_t0 held still for every horizon (`held`: the world "
        "standing still, the bar a rollout must clear) and to the target encoder's latents of the frames that "
        "really came (`observed`: what the decoder makes of a perfect prediction). "
        + (
            "The direct baseline (`direct`: the LiDAR alone, every horizon decoded at once from z_t0) is its "
            "open-loop IoU on the same split. "
            if direct
            else "No direct baseline was scored (`bevjepa eval --direct RUN`). "
        )
        + f"IoU per class, probabilities thresholded at {check.get('threshold')}, cell counts summed "
        "over the split; `rollout ÷ held` above 1 is what the world model adds."
        + (
            " This model adds to every horizon a reading of t0's features (`present_occupancy`), and every source "
            "below includes it: `held` is the world model's own direct baseline."
            if metrics.get("evaluated", {}).get("config", {}).get("present_occupancy")
            else ""
        ),
        "",
    ]
    iou = check.get("iou", {})
    for cls in categories.CLASSES:
        series = {source: iou.get(source, {}).get(cls) for source in world_model_check.SOURCES}
        if direct:
            series["direct"] = direct.get(cls)
        series = {name: values for name, values in series.items() if isinstance(values, list)}
        if not series:
            continue
        steps = max(len(values) for values in series.values())
        rows = [
            [
                f"{CHECK_TITLES[name]} (`{name}`)",
                *(format_value(v) for v in values),
                *([MISSING] * (steps - len(values))),
            ]
            for name, values in series.items()
        ]
        if "rollout" in series and "held" in series:
            rows.append(
                [
                    "rollout ÷ held",
                    *(format_value(iou_ratio(_at(series["rollout"], k), _at(series["held"], k))) for k in range(steps)),
                ]
            )
        lines += [f"### {cls}: occupancy IoU per horizon", "", *_table(["latent", *_horizon_header(steps)], rows)]
    lines += _flow_table(check)
    verdicts = world_model_verdicts(metrics)
    return [*lines, *verdicts, ""] if verdicts else lines


def _flow_table(check: dict) -> list[str]:
    """The rollout flow's mean error per class and horizon beside the annotated motion it should explain."""
    error, motion = check.get("flow_error_m"), check.get("motion_m")
    if not (isinstance(error, dict) and isinstance(motion, dict)):
        return []
    rows = [
        [cls, *(f"{format_value(e)} / {format_value(m)}" for e, m in zip(error[cls], motion[cls], strict=True))]
        for cls in categories.CLASSES
        if isinstance(error.get(cls), list) and isinstance(motion.get(cls), list)
    ]
    if not rows:
        return []
    steps = max(len(row) - 1 for row in rows)
    return [
        "### The rollout's flow",
        "",
        "Where the flow says each annotated instance cell's content was at t0, against where it was: the mean "
        "error (m) / the mean motion since t0 (m), the error of a flow that moves nothing.",
        "",
        *_table(["class", *_horizon_header(steps)], rows),
    ]


DEVKIT_SECTIONS = {"detection": "## Detection at t0", "tracking": "## Tracking"}
"""The devkit evaluations of metrics.json and their report sections."""


def _devkit_tables(key: str, detection: dict) -> list[str]:
    """The section of a devkit evaluation (``DEVKIT_SECTIONS``): its scalars, then its tables."""
    lines = [DEVKIT_SECTIONS[key], ""]
    if "error" in detection:
        return [*lines, f"The {key} evaluation failed: `{detection['error']}`.", ""]
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
        metrics: metrics.json as read back (``evaluate`` output plus ``evaluated``, ``detection`` and
            ``world_model_check``).
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
            f"{' + '.join(config.get('sensors', []))}"
            + (", no world model (the direct baseline)" if config.get("world_model") is False else "")
            + f", grid x [{grid.get('x_min_m')}, {grid.get('x_max_m')}) y "
            f"[{grid.get('y_min_m')}, {grid.get('y_max_m')}) m at {grid.get('resolution_m')} m, "
            f"{config.get('occupancy_steps')} occupancy steps, {config.get('trajectory_steps')} trajectory steps, "
            f"{config.get('modes')} modes, JEPA weight {config.get('jepa_weight')}; trained "
            f"{config.get('trained_steps')} of {config.get('train_steps')} steps, batch {config.get('batch_size')}, "
            f"on `{config.get('train_split')}`"
        )
    direct = evaluated.get("direct_config")
    if evaluated.get("direct_checkpoint"):
        lines.append(
            f"- direct baseline: `{evaluated['direct_checkpoint']}`"
            + (
                f", preset `{direct.get('preset')}` (config `{direct.get('hash')}`), sensors "
                f"{' + '.join(direct.get('sensors', []))}, no world model; trained {direct.get('trained_steps')} of "
                f"{direct.get('train_steps')} steps, batch {direct.get('batch_size')}, on `{direct.get('train_split')}`"
                if isinstance(direct, dict)
                else ""
            )
        )
    lines += [
        "- occupancy: per-class IoU, model probabilities thresholded at 0.5, cell counts summed over the split; the "
        "sources that read only the sensors come first in every table",
        "- sources: " + "; ".join(f"`{m}`: {SOURCE_NOTES[m]}" for m in ordered_models(models) if m in SOURCE_NOTES),
        f"- every number below is read from `metrics.json` (rounded to 3 decimals); `{MISSING}` where it holds none",
        "",
        "## Scores",
        "",
        *_model_tables(metrics),
        *_world_model_section(metrics),
    ]
    for key in DEVKIT_SECTIONS:
        if isinstance(metrics.get(key), dict):
            lines += _devkit_tables(key, metrics[key])
    challenge = metrics.get("prediction_challenge")
    if isinstance(challenge, dict):
        lines += ["## Prediction challenge", ""]
        lines += (
            [f"The export failed: `{challenge['error']}`.", ""]
            if "error" in challenge
            else [
                f"`{challenge.get('submission')}`: the model's modes for the {challenge.get('agents')} annotated "
                "agents (the challenge's protocol), in the submission format the devkit's `compute_metrics` reads.",
                "",
            ]
        )
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
    direct_folder = Path(config.direct_checkpoint) if config.direct_checkpoint is not None else None
    result = open_loop.evaluate(data, config.split, run_folder, batch_size=config.batch_size, direct_run=direct_folder)
    for key in DEVKIT_EVALUATIONS:
        value = devkit_metrics(config, data, key)
        if value is not None:
            result[key] = value
    challenge = prediction_challenge_file(config, data)
    if challenge is not None:
        result["prediction_challenge"] = challenge
    check = world_model_metrics(config, data)
    if check is not None:
        result["world_model_check"] = check
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
