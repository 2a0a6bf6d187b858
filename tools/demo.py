"""The main job, end to end: a synthetic v1.0-mini, Ray preprocessing, training, open-loop and closed-loop evaluation.

``run(DemoConfig(out=...))`` writes into ``out``::

    nuscenes/         the synthetic dataset (nuScenes format; the devkit loads it)
    windows/          its training windows (``bevjepa preprocess``)
    run/              the trained ``small`` model (safetensors + JSON, its occupancy thresholds and forecast bars),
                      TensorBoard scalars
    run-direct/       the direct baseline (``bevjepa train --config direct``: LiDAR only, no world model), trained for
                      the same wall time as the model
    open-loop/        ``bevjepa eval`` on mini_val with ``--direct run-direct``: metrics.json (with the world-model
                      check), report.md, figures/ (PNG panels, scene.gif)
    closed-loop/      the ``ci`` suite driven with the model's, constant-velocity and oracle forecasts: one folder
                      (metrics.json) per source, named as ``sources.FORECASTS`` names it (model/, cv/, oracle/)
    plan.json         the training steps of both runs chosen for the time budget (a second run keeps them)
    timings.json      each stage's wall time in the run that did its work
    report.md         the summary: tables from the metrics files, the animation, the closed-loop results
    (``rerun``)       with ``DemoConfig.rerun``: a Rerun recording of one mini_val scene (``rerun FILE.rrd``)

Every stage keeps its output and a second run skips what is done (the dataset and windows when complete, each
training when its last step is reached, each evaluation when its metrics file exists), so a second run only
rewrites the summary. The two trainings share what the time budget leaves after the other stages' expected
durations, half each: the model's step count is set from its measured step time, so its learning-rate schedule
runs to its end within its half, and the direct baseline's from its own measured step time, so that it trains for
the same wall time as the model (``direct_steps`` in plan.json). A wall-time cap of 1.5 times the plan stops either
on a slower machine (a second run continues it). With ``DemoConfig.steps`` both step counts are fixed instead and no
cap applies, whatever the machine's speed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bevjepa.datasets import categories, preprocess
from bevjepa.datasets import io as bevio
from bevjepa.evaluation.closed_loop import runner, safety, sources, suite_files
from bevjepa.evaluation.report import eval_report, rerun_recording
from bevjepa.prediction import bench as model_bench
from bevjepa.prediction import checkpoint, forecast_bars, forecaster, occupancy_thresholds, threshold_fit, train
from bevjepa.prediction import config as experiment_config
from bevjepa.sim import synth

SUITES = suite_files.SHIPPED_SUITES
"""The scenario suites shipped with the package."""

COMPARED_FORECASTS = (sources.MODEL, sources.CONSTANT_VELOCITY, sources.ORACLE)
"""The closed-loop forecast sources the demo compares: the report's rows and ``closed-loop/``'s folders."""

THRESHOLD_WINDOWS = 60
"""Training windows each run's occupancy thresholds are chosen on (``bevjepa thresholds``; half the command's
default, to keep the budget)."""
_EARLIER_FOLDERS = {sources.CONSTANT_VELOCITY: "constant_velocity"}
"""Folder names under ``closed-loop/`` that earlier demos gave a source (they called ``cv`` ``constant_velocity``):
a rerun reads the results there instead of running the suite again."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings.

    Attributes:
        out: the output folder.
        minutes: the whole run's time budget (min); the model and the direct baseline each train for half of what
            the other stages leave. The default, 23, is the earlier default of 15 (which left the model about 7 of
            them, after the dataset, the preprocessing and the reserve), plus 7 for the direct baseline's training
            and 1 for the larger reserve: the model trains about as long as it did.
        scenes: synthetic scenes (``v1.0-mini`` names: 10 make the real mini_train / mini_val split, 8 and 2).
        duration_s: seconds per scene.
        workers: Ray workers for the dataset, preprocessing and the closed loop.
        suite: the closed-loop scenario suite.
        seed: seeds the dataset and the training.
        reserve_s: expected seconds of the stages after training (occupancy thresholds, evaluation, closed loop,
            report), kept free; the open-loop stage also scores the direct baseline and runs the world-model check.
        min_steps: the model's training steps even when the budget is spent.
        max_steps: the model's training steps at most (the direct baseline trains for the same wall time).
        steps: a fixed number of training steps for the model and for the direct baseline, run to the end however
            long they take (no step-time measurement, no wall-time cap); None: as many as the budget allows.
        progress: show progress bars.
        rerun: write a Rerun recording of one mini_val scene here after the open-loop stage (a ``.rrd`` file;
            needs ``pip install 'bevjepa[rerun]'``; kept when it exists); None: no recording.
    """

    out: Path = Path("out/demo")
    minutes: float = 23.0
    scenes: int = 10
    duration_s: float = 20.0
    workers: int = 2
    suite: Path = SUITES / "ci.toml"
    seed: int = 0
    reserve_s: float = 510.0
    min_steps: int = 100
    max_steps: int = 1500
    steps: int | None = None
    progress: bool = True
    rerun: Path | None = None

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be positive, got {self.minutes}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.scenes < 2 or self.workers < 1:
            raise ValueError(f"the demo needs at least 2 scenes and 1 worker, got {self.scenes} and {self.workers}")
        if not Path(self.suite).is_file():
            raise FileNotFoundError(f"scenario suite {self.suite} not found; pass --suite FILE.toml")
        if self.rerun is not None:
            rerun_recording.check_output(Path(self.rerun))


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote.

    Attributes:
        out: the output folder.
        report: ``out/report.md``.
        stage_seconds: wall time of each stage in the run that did its work, and their total.
        open_loop: the open-loop metrics.json.
        closed_loop: each compared forecast source's closed-loop run (``COMPARED_FORECASTS``), read back from its
            metrics.json.
    """

    out: Path
    report: Path
    stage_seconds: dict[str, float]
    open_loop: dict
    closed_loop: dict[str, safety.SuiteResult] = field(default_factory=dict)


def _timed(seconds: dict[str, float], name: str, fn: Callable[[], object], say: Callable[[str], None]) -> object:
    say(f"[demo] {name} ...")
    start = time.perf_counter()
    value = fn()
    seconds[name] = time.perf_counter() - start
    say(f"[demo] {name}: {seconds[name]:.0f} s")
    return value


def _record_times(path: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Merge this run's stage times into ``path`` (a stage's time is kept from the run that did the work)."""
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded.update({name: value for name, value in seconds.items() if value >= 1.0 or name not in recorded})
    recorded["total"] = sum(value for name, value in recorded.items() if name != "total")
    bevio.atomic_write_json(path, recorded)
    return recorded


def _dataset(config: DemoConfig, dataroot: Path) -> None:
    if (dataroot / "v1.0-mini" / "sample.json").is_file():
        return
    if dataroot.exists():  # an interrupted write leaves nothing at ``dataroot`` (atomic); anything else is foreign
        synth.check_output_folder(dataroot)
    synth.synthesize(
        synth.SynthConfig(
            out=dataroot, scenes=config.scenes, duration_s=config.duration_s, seed=config.seed, workers=config.workers
        ),
        progress=config.progress,
    )


def _windows(config: DemoConfig, dataroot: Path, windows: Path) -> None:
    if (windows / "manifest.json").is_file():
        return
    preprocess.preprocess(
        preprocess.PreprocessConfig(dataroot=dataroot, out=windows, workers=config.workers), progress=config.progress
    )


def _plan_steps(config: DemoConfig, windows: Path, spent_s: float) -> dict:
    """The training plan (kept in plan.json): the model's steps and the direct baseline's.

    The model gets the steps that fit half the budget at its measured step time (within ``min_steps`` and
    ``max_steps``); the direct baseline gets that planned wall time divided by its own measured step time. A plan
    without ``direct_steps`` (from a demo before the direct baseline) keeps its steps and gets them added.
    """
    plan_path = config.out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if plan is not None and config.steps is not None and plan["steps"] != config.steps:
        plan = None  # other fixed steps asked for: a new plan
    if plan is not None and "direct_steps" in plan:
        return plan
    if plan is None:
        plan = _model_plan(config, windows, spent_s)
    if plan["measured_step_s"] is None:
        plan.update(direct_steps=plan["steps"], direct_measured_step_s=None)
    else:
        direct_s = model_bench.training_step_time(windows, preset="direct", repeats=2)["step_ms"] / 1e3
        training_s = plan["steps"] * plan["measured_step_s"]  # the model's planned wall time
        plan.update(direct_steps=max(1, round(training_s / direct_s)), direct_measured_step_s=direct_s)
    bevio.atomic_write_json(plan_path, plan)
    return plan


def _model_plan(config: DemoConfig, windows: Path, spent_s: float) -> dict:
    """The model's part of the plan: ``config.steps``, or the steps that fit half the budget at its step time."""
    if config.steps is not None:
        return {"steps": config.steps, "measured_step_s": None, "training_budget_s": None, "seed": config.seed}
    step_s = model_bench.training_step_time(windows, repeats=2)["step_ms"] / 1e3
    budget_s = (config.minutes * 60 - spent_s - config.reserve_s) / 2  # each training's half
    steps = int(min(config.max_steps, max(config.min_steps, budget_s / step_s)))
    return {"steps": steps, "measured_step_s": step_s, "training_budget_s": budget_s, "seed": config.seed}


def _train(
    config: DemoConfig,
    windows: Path,
    run: Path,
    preset: experiment_config.ExperimentConfig,
    steps: int,
    step_s: float | None,
    seed: int,
) -> None:
    """Train ``preset`` for ``steps`` into ``run`` (continuing a checkpoint there; nothing when it is finished).

    ``step_s``, the measured step time, caps the wall time at 1.5 times the plan; None: no cap.
    """
    experiment = dataclasses.replace(
        preset,
        train=dataclasses.replace(
            preset.train,
            steps=steps,
            seed=seed,
            val_every=max(50, steps // 4),
            max_minutes=None if step_s is None else 1.5 * steps * step_s / 60,
        ),
    )
    if (run / "state.json").is_file():
        if checkpoint.load_state(run).get("step", 0) >= steps:
            return
        train.train(windows, run, experiment, resume=True, progress=config.progress)
    else:
        train.train(windows, run, experiment, progress=config.progress)


def run(config: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    """Run every stage (reusing finished ones) and write ``out/report.md``."""
    out = bevio.claim_output_folder(Path(config.out), "demo", own_files=lambda folder: (folder / "plan.json").is_file())
    dataroot, windows, run_folder, direct_folder = out / "nuscenes", out / "windows", out / "run", out / "run-direct"
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    _timed(seconds, "synthetic dataset", lambda: _dataset(config, dataroot), say)
    _timed(seconds, "preprocessing", lambda: _windows(config, dataroot, windows), say)
    plan = _plan_steps(config, windows, time.perf_counter() - started)
    if plan["measured_step_s"] is None:
        say(f"[demo] training plan: {plan['steps']} steps, the direct baseline {plan['direct_steps']} (fixed)")
    else:
        say(
            f"[demo] training plan: {plan['steps']} steps at {plan['measured_step_s']:.2f} s a step, the direct "
            f"baseline {plan['direct_steps']} at {plan['direct_measured_step_s']:.2f} s a step"
        )
    _timed(
        seconds,
        "training",
        lambda: _train(
            config, windows, run_folder, experiment_config.small(), plan["steps"], plan["measured_step_s"], plan["seed"]
        ),
        say,
    )
    _timed(
        seconds,
        "direct baseline training",
        lambda: _train(
            config,
            windows,
            direct_folder,
            experiment_config.direct(),
            plan["direct_steps"],
            plan["direct_measured_step_s"],
            plan["seed"],
        ),
        say,
    )
    chosen = (  # each run's occupancy thresholds, then its forecast bars (counted at those thresholds)
        ("occupancy thresholds", occupancy_thresholds.FILE, threshold_fit.fit),
        ("forecast bars", forecast_bars.FILE, threshold_fit.fit_forecast_bars),
    )
    for folder, (stage, file, fit) in itertools.product((run_folder, direct_folder), chosen):
        if not (folder / file).is_file():
            _timed(
                seconds,
                f"{stage} ({folder.name})",
                lambda folder=folder, fit=fit: fit(
                    folder, windows, windows=THRESHOLD_WINDOWS, progress=config.progress
                ),
                say,
            )

    open_loop_dir = out / "open-loop"
    if not _open_loop_done(open_loop_dir):
        _timed(
            seconds,
            "open-loop evaluation",
            lambda: eval_report.run(
                eval_report.EvalConfig(
                    out=open_loop_dir,
                    split="mini_val",
                    checkpoint=run_folder,
                    data=windows,
                    dataroot=dataroot,
                    version="v1.0-mini",
                    progress=config.progress,
                    direct_checkpoint=direct_folder,
                )
            ),
            say,
        )
    open_loop = json.loads((open_loop_dir / "metrics.json").read_text())
    if config.rerun is not None and not Path(config.rerun).is_file():
        _timed(
            seconds,
            "rerun recording",
            lambda: rerun_recording.record_scene(windows, "mini_val", run_folder, Path(config.rerun)),
            say,
        )

    closed: dict[str, safety.SuiteResult] = {}
    for name in COMPARED_FORECASTS:
        folder = _closed_loop_folder(out, name)
        if not (folder / "metrics.json").is_file():
            _timed(
                seconds,
                f"closed loop ({name})",
                lambda name=name, folder=folder: runner.run_suite(
                    config.suite,
                    name,
                    checkpoint=run_folder if name == sources.MODEL else None,
                    workers=config.workers,
                    out=folder,
                    progress=config.progress,
                ),
                say,
            )
        closed[name] = safety.SuiteResult.load(folder / "metrics.json")

    this_run_s = time.perf_counter() - started
    recorded = _record_times(out / "timings.json", seconds)
    report_path = out / "report.md"
    bevio.atomic_write_text(report_path, render(config, plan, recorded, open_loop, closed, out))
    say(f"[demo] done in {this_run_s:.0f} s (all stages, as they ran: {recorded['total']:.0f} s): {report_path}")
    return DemoResult(out, report_path, recorded, open_loop, closed)


def _open_loop_done(folder: Path) -> bool:
    """Whether ``folder`` holds a finished open-loop report with the direct baseline and the world-model check.

    An earlier demo's report, without them, is redone.
    """
    if not (folder / "metrics.json").is_file() or not (folder / "report.md").is_file():
        return False
    metrics = json.loads((folder / "metrics.json").read_text())
    return "direct" in metrics.get("models", {}) and "world_model_check" in metrics


def _closed_loop_folder(out: Path, name: str) -> Path:
    """The folder of a source's closed-loop run: ``closed-loop/NAME``, or an earlier demo's, where only it is done."""
    folder = out / "closed-loop" / name
    earlier = out / "closed-loop" / _EARLIER_FOLDERS.get(name, name)
    if not (folder / "metrics.json").is_file() and (earlier / "metrics.json").is_file():
        return earlier
    return folder


def _number(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


OPEN_LOOP_COLUMNS = (
    ("minADE_5", "minADE₅ (m)"),
    ("minFDE_5", "minFDE₅ (m)"),
    ("MissRate_2_5", "MissRate₂,₅"),
    ("iou_2s_mean", "occupancy IoU @ 2 s"),
)
"""The open-loop figures the summary shows, as keys of ``metrics.json``'s ``models`` entries."""

SENSOR_ONLY = {
    "model": "the model's forecast, from the sensors",
    "model_latent": "its dense map alone",
    "direct": "the direct baseline, from the LiDAR",
}
"""The occupancy read from the sensors alone, the headline of the summary, with the first cell of their rows."""

INPUTS = {
    "model": "sensors",
    "model_latent": "sensors",
    "direct": "sensors (LiDAR)",
    "constant_velocity_tracked": "sensors",
    "model_annotated": "sensors + annotated t0 boxes and past",
    "tracked_true_velocity": "sensors + annotated velocities",
    "persistence": "annotated t0 occupancy",
}
"""What each open-loop source reads (the summary's last column); a source not listed reads the annotated t0 boxes."""

WORLD_MODEL_ROWS = {"rollout": "rollout ẑ_k", "held": "held z_t0"}
"""The latents of the world-model check the summary shows (``open-loop/report.md`` has the observed future too)."""

CLOSED_LOOP_COLUMNS = (
    ("collision_rate", "collision rate"),
    ("progress_m", "progress (m)"),
    ("progress_ratio", "progress ratio"),
    ("min_ttc_s", "min TTC (s)"),
    ("drivable_compliance", "drivable area"),
    ("comfort", "comfort"),
    ("score", "PDMS-style score"),
    ("failed", "failed episodes"),
)
"""The closed-loop aggregate figures the summary shows (fields of ``safety.SuiteAggregate``; the score is
``safety.PDMS_FORMULA``)."""


def verdicts(models: dict) -> list[str]:
    """One line per comparison of the model against a constant-velocity baseline.

    ``model`` (the sensors alone) against ``constant_velocity_tracked`` (its own tracks at their regressed
    velocity: the same agents); ``model_annotated`` (the sensors, the annotated t0 boxes and their past) against
    ``constant_velocity_past`` (the same boxes at the velocity of their last past step: the same input, the
    devkit's constant-velocity speed), ``constant_velocity_anchor`` (the velocity at t0 the model's trajectory
    head starts from: what its learning adds) and ``constant_velocity`` (the annotated velocity, which on nuScenes
    looks 0.5 s ahead).
    """
    lines = []
    metrics_compared = (
        ("minADE_5", "minADE₅", True),
        ("minFDE_5", "minFDE₅", True),
        ("iou_2s_mean", "occupancy IoU at 2 s", False),
    )
    comparisons = [
        ("model", key, label, "constant_velocity_tracked", lower) for key, label, lower in metrics_compared
    ] + [
        ("model_annotated", key, label, baseline, lower)
        for baseline in ("constant_velocity_past", "constant_velocity_anchor", "constant_velocity")
        for key, label, lower in metrics_compared
    ]
    for source, key, label, baseline, lower_is_better in comparisons:
        ours, theirs = models.get(source, {}).get(key), models.get(baseline, {}).get(key)
        if ours is None or theirs is None:
            continue
        better = ours < theirs if lower_is_better else ours > theirs
        lines.append(
            f"- {label}: `{source}` {'beats' if better else 'does not beat'} `{baseline}` "
            f"({_number(ours)} against {_number(theirs)})."
        )
    return lines


def _horizons(steps: int) -> list[str]:
    return [f"{k * forecaster.STEP_S:.1f} s" for k in range(steps)]


def _per_class_rows(series: dict[str, dict], titles: dict[str, str]) -> tuple[int, list[list[str]]]:
    """Rows (title, class, a value per horizon) of ``{name: {class: [per step]}}``, and the number of steps."""
    steps = max((len(v) for per_class in series.values() for v in per_class.values() if isinstance(v, list)), default=0)
    rows = [
        [f"{titles[name]} (`{name}`)", cls, *(_number(v) for v in values), *(["–"] * (steps - len(values)))]
        for name, per_class in series.items()
        for cls, values in per_class.items()
        if isinstance(values, list)
    ]
    return steps, rows


def _sensor_only_section(models: dict) -> list[str]:
    """The headline: the dense occupancy IoU from the sensors alone, per class and horizon.

    Read at 0.5, and for the runs that chose forecast bars (``bevjepa thresholds``) at those bars too.
    """

    def series(key: str) -> dict[str, dict]:  # {source: {class: [per step]}} of the sources that hold ``key``
        return {name: models[name][key] for name in SENSOR_ONLY if isinstance(models.get(name, {}).get(key), dict)}

    at_half, at_bars = series("iou"), series("iou_at_bars")
    if not at_half:
        return []
    steps, rows = _per_class_rows(at_half, SENSOR_ONLY)
    lines = [
        "### From the sensors alone",
        "",
        "Occupancy IoU per class and horizon from the sensors, no annotation read: `model`, the model's forecast "
        "(agents tracked from its own detections, their boxes along the modes joined with the dense map); "
        "`model_latent`, its dense map alone (the world model rolled out under the ego's actions); `direct`, the "
        "direct baseline's (the LiDAR alone, every horizon decoded at once from z_t0, trained for the same wall "
        "time).",
        "",
        *_table(["forecast", "class", *_horizons(steps)], rows),
        "",
    ]
    if at_bars:
        steps, rows = _per_class_rows(at_bars, SENSOR_ONLY)
        lines += [
            "The same forecasts read as a planner reads them: each cell occupied where its probability reaches the "
            "run's own bar for that step and class (`forecast_bars.json`, chosen on `mini_train` by `bevjepa "
            "thresholds`), the world model's forecast and the direct baseline's by the same rule.",
            "",
            *_table(["forecast, at its bars", "class", *_horizons(steps)], rows),
            "",
        ]
    return lines


def _world_model_section(open_loop: dict) -> list[str]:
    """The world-model check: the rollout against the held z_t0, per class and horizon, and the verdicts."""
    check = open_loop.get("world_model_check")
    if not isinstance(check, dict):
        return []
    lines = ["### Does the world model earn its place?", ""]
    if "error" in check:
        return [*lines, f"The world-model check failed: `{check['error']}`.", ""]
    iou = check.get("iou", {})
    series = {
        name: {cls: iou[name][cls] for cls in categories.CLASSES if cls in iou.get(name, {})}
        for name in WORLD_MODEL_ROWS
        if isinstance(iou.get(name), dict)
    }
    steps, rows = _per_class_rows(series, WORLD_MODEL_ROWS)
    rows.sort(key=lambda row: categories.CLASSES.index(row[1]))  # each class's rows together
    lines += [
        "The model's occupancy decoder on the latents its predictor rolled out against z_t0 held still for every "
        f"horizon, on {check.get('windows', '?')} windows (`open-loop/metrics.json`, `world_model_check`; the "
        "target encoder's latents of the future that came are in `open-loop/report.md`).",
        "",
        *_table(["latent", "class", *_horizons(steps)], rows),
        "",
    ]
    verdicts = eval_report.world_model_verdicts(open_loop)
    return [*lines, *verdicts, ""] if verdicts else lines


def render(
    config: DemoConfig,
    plan: dict,
    seconds: dict[str, float],
    open_loop: dict,
    closed: dict[str, safety.SuiteResult],
    out: Path,
) -> str:
    """The summary report's Markdown; every number is read from the metrics files passed in."""
    models = open_loop.get("models", {})
    lines = [
        "# bevjepa demo",
        "",
        f"A synthetic nuScenes v1.0-mini ({config.scenes} scenes × {config.duration_s:.0f} s), preprocessed on Ray, "
        f"the `small` model trained for {plan['steps']} steps and the direct baseline (LiDAR only, no world model) "
        f"for {plan.get('direct_steps', '?')} steps "
        + ("(fixed)" if plan.get("direct_measured_step_s") is None else "(the model's wall time at its own step time)")
        + f", then scored open loop on `mini_val` and closed loop on the `{Path(config.suite).stem}` suite.",
        "",
    ]
    if (out / "open-loop" / "figures" / "scene.gif").is_file():
        lines += ["![a mini_val scene: ground truth (left) and the forecast (right)](open-loop/figures/scene.gif)", ""]
    lines += ["## Open loop on mini_val", ""]
    lines += [
        f"{open_loop.get('windows', '?')} windows, {open_loop.get('agents', '?')} agents with a full 6 s future "
        "(from `open-loop/metrics.json`; the full tables and figures are in `open-loop/report.md`).",
        "",
    ]
    lines += _sensor_only_section(models)
    lines += _world_model_section(open_loop)
    lines += ["### Every source", ""]
    names = eval_report.ordered_models(models)
    rows = [
        [
            name,
            *(_number(models[name].get(key)) for key, _ in OPEN_LOOP_COLUMNS),
            INPUTS.get(name, "annotated t0 boxes"),
        ]
        for name in names
    ]
    lines += _table(["forecast", *(label for _, label in OPEN_LOOP_COLUMNS), "input"], rows)
    lines += [
        "",
        "The sources that read the sensors alone come first: `model` is the forecast a planner gets (agents tracked "
        "from the model's own detections; its trajectory figures are on the annotated agents a track stands for, "
        "see `detection_recall` in the open-loop report), `model_latent` its dense map alone, `direct` the direct "
        "baseline's, `constant_velocity_tracked` the model's own tracks at their track's velocity. The rows after "
        "them need annotations: `model_annotated` forecasts the annotated t0 boxes from their annotated past (its "
        "occupancy moves those boxes along its trajectory modes); `constant_velocity_past` moves the same boxes at "
        "the velocity of their last past step (the same input), `constant_velocity_anchor` at their t0 velocity "
        "from the last three past positions (the path the model's trajectory head starts from), `constant_velocity` "
        "at their annotated velocity (nuScenes' centred difference, which looks 0.5 s ahead).",
        "",
    ]
    if "detection" in open_loop:
        detection = open_loop["detection"]
        lines += [
            f"Detection (devkit `DetectionEval`): mAP {_number(detection.get('mAP'))}, "
            f"NDS {_number(detection.get('NDS'))}.",
            "",
        ]
    lines += [*verdicts(models), ""] if verdicts(models) else []
    lines += ["## Closed loop", "", f"The score: `{safety.PDMS_FORMULA}` (`evaluation/closed_loop/safety.py`).", ""]
    keys = list(CLOSED_LOOP_COLUMNS)
    rows = [[name] + [_number(getattr(result.aggregate, key)) for key, _ in keys] for name, result in closed.items()]
    lines += _table(["forecast"] + [label for _, label in keys], rows)
    lines += ["", "Per-episode results: `closed-loop/<forecast>/metrics.json`.", "", "## Time", ""]
    lines += ["Each stage's wall time in the run that did its work (`timings.json`; reused stages cost ~0 s).", ""]
    lines += _table(["stage", "seconds"], [[name, f"{value:.0f}"] for name, value in seconds.items()])
    lines += ["", f"Training plan: {json.dumps(plan)}", ""]
    return "\n".join(lines)
