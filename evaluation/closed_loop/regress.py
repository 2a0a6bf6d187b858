"""The regression gate: a closed-loop suite run against a stored baseline, failing where a metric got worse.

A metric *regresses* when it moved in its bad direction by more than its allowed slack::

    slack = max(tolerance.absolute, tolerance.relative * |baseline|)
    higher is better: regressed if current < baseline - slack
    lower is better:  regressed if current > baseline + slack
    either (a metric of unknown direction): regressed if |current - baseline| > slack

The direction and default tolerance of each closed-loop metric is one table, ``METRIC_RULES``; a metric not
in it gets its direction from the keywords of ``DIRECTION_KEYWORDS`` (e.g. ``collision`` -> lower is better),
or, failing that, is gated on any change ("either"). A metric in the baseline but missing from the current run
fails the gate (a renamed or dropped metric must not pass silently); a metric new in the current run is
reported and not gated until the baseline is updated. A value that turns NaN fails.

The baseline file is JSON (``BASELINE_FORMAT``, version ``BASELINE_VERSION``): the suite name, the forecast
source, the checkpoint (its path and the SHA-256 of its ``model.safetensors``), the aggregate metrics, and the
tolerances used. It is written atomically. The gate also reports as JUnit XML: one ``<testsuite>`` per suite
run, one ``<testcase>`` per metric (``<failure>`` with the diff when it regressed), and one per failed episode.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import shutil
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bevjepa.datasets import io as bevio
from bevjepa.evaluation.closed_loop import safety, sources

BASELINE_FORMAT = "bevjepa-regress-baseline"
BASELINE_VERSION = 1
FAILED_EPISODES = "failed"
"""The aggregate metric counting episodes that raised instead of finishing (``safety.SuiteAggregate.failed``)."""

HIGHER = "higher"
LOWER = "lower"
EITHER = "either"
DIRECTIONS = (HIGHER, LOWER, EITHER)
_EPS = 1e-9
"""Slack below any tolerance: float noise in the last digits is never a regression."""


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move in its bad direction before the gate fails.

    The allowed slack is the larger of the two: ``max(absolute, relative * |baseline|)``.

    Attributes:
        absolute: slack in the metric's own units (>= 0).
        relative: slack as a fraction of the baseline's magnitude (>= 0; 0.05 is 5 %).
    """

    absolute: float = 0.0
    relative: float = 0.0

    def __post_init__(self) -> None:
        for name in ("absolute", "relative"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Tolerance.{name} must be a finite number >= 0, got {value!r}")

    def slack(self, baseline: float) -> float:
        """The allowed change (in the metric's units) from ``baseline``."""
        return max(self.absolute, self.relative * abs(baseline)) + _EPS

    def describe(self) -> str:
        """E.g. ``±0.02``, ``±5%`` or ``±0.02 or ±5%``."""
        parts = []
        if self.absolute or not self.relative:
            parts.append(f"±{self.absolute:g}")
        if self.relative:
            parts.append(f"±{self.relative * 100:g}%")
        return " or ".join(parts)

    def to_dict(self) -> dict:
        """JSON form: ``{"absolute": a, "relative": r}``."""
        return {"absolute": self.absolute, "relative": self.relative}

    @classmethod
    def from_dict(cls, data: Mapping) -> Tolerance:
        """Inverse of ``to_dict``."""
        return cls(float(data.get("absolute", 0.0)), float(data.get("relative", 0.0)))

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """Parse ``0.05`` (absolute), ``5%`` (relative) or ``0.05,5%`` (both; the larger slack applies)."""
        absolute, relative = 0.0, 0.0
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or len(parts) > 2:
            raise ValueError(f"tolerance {text!r}: write an absolute value (0.05), a percentage (5%), or both")
        for part in parts:
            try:
                if part.endswith("%"):
                    relative = float(part[:-1]) / 100.0
                else:
                    absolute = float(part)
            except ValueError:
                raise ValueError(f"tolerance {text!r}: {part!r} is not a number; write 0.05, 5% or 0.05,5%") from None
        return cls(absolute, relative)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Tolerance]:
    """Parse ``METRIC=VALUE`` items (``--tolerance``), VALUE as ``Tolerance.parse`` reads it."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--tolerance {item!r}: write METRIC=VALUE, e.g. collision_rate=0.05 or progress=5%")
        overrides[name.strip()] = Tolerance.parse(value)
    return overrides


@dataclass(frozen=True)
class MetricRule:
    """Which way a metric is better, and its default tolerance.

    Attributes:
        direction: ``"higher"`` (higher is better), ``"lower"`` (lower is better) or ``"either"``.
        tolerance: the default tolerance.
        description: one line: what the metric measures, in which units.
    """

    direction: str
    tolerance: Tolerance
    description: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"MetricRule.direction must be one of {DIRECTIONS}, got {self.direction!r}")


METRIC_RULES: dict[str, MetricRule] = {
    "collision_rate": MetricRule(LOWER, Tolerance(absolute=0.0), "share of episodes with a collision: none may be new"),
    "progress_m": MetricRule(HIGHER, Tolerance(relative=0.05), "mean distance driven along the route (m)"),
    "progress_ratio": MetricRule(HIGHER, Tolerance(absolute=0.03), "EP: progress against the expected, 0-1"),
    "min_ttc_s": MetricRule(HIGHER, Tolerance(absolute=0.25), "mean minimum time-to-collision (s)"),
    "ttc": MetricRule(HIGHER, Tolerance(absolute=0.0), "share of episodes whose minimum TTC stays above 1 s"),
    "drivable_compliance": MetricRule(HIGHER, Tolerance(absolute=0.02), "mean share of sub-steps on the road"),
    "dac": MetricRule(HIGHER, Tolerance(absolute=0.0), "share of episodes on the drivable area throughout"),
    "comfort": MetricRule(
        HIGHER, Tolerance(absolute=0.13), "share of episodes within comfort limits (one episode in eight may flip)"
    ),
    "score": MetricRule(HIGHER, Tolerance(absolute=0.02), "PDMS-style composite score, 0-1"),
    "pdms": MetricRule(HIGHER, Tolerance(absolute=0.02), "PDMS-style composite score, 0-1"),
    "max_abs_lon_jerk_mps3": MetricRule(LOWER, Tolerance(relative=0.10), "largest longitudinal jerk (m/s^3)"),
    "max_abs_lon_accel_mps2": MetricRule(LOWER, Tolerance(relative=0.10), "largest longitudinal acceleration (m/s^2)"),
    "episodes": MetricRule(EITHER, Tolerance(absolute=0.0), "episodes that finished: a change means the suite changed"),
    FAILED_EPISODES: MetricRule(LOWER, Tolerance(absolute=0.0), "episodes that raised instead of finishing"),
}
"""Direction and default tolerance of the closed-loop metrics, by name (case-insensitive)."""

DIRECTION_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("collision", LOWER),
    ("jerk", LOWER),
    ("violation", LOWER),
    ("fail", LOWER),
    ("error", LOWER),
    ("offroad", LOWER),
    ("off_road", LOWER),
    ("ade", LOWER),
    ("fde", LOWER),
    ("miss", LOWER),
    ("latency", LOWER),
    ("ttc", HIGHER),
    ("progress", HIGHER),
    ("compliance", HIGHER),
    ("comfort", HIGHER),
    ("pdms", HIGHER),
    ("score", HIGHER),
    ("success", HIGHER),
    ("completion", HIGHER),
    ("iou", HIGHER),
)
"""For a metric not in ``METRIC_RULES``: the first keyword found in its name gives the direction."""
DEFAULT_TOLERANCE = Tolerance(absolute=0.01, relative=0.05)
"""Tolerance of a metric not in ``METRIC_RULES``."""


def rule_for(name: str) -> MetricRule:
    """The rule of a metric: from ``METRIC_RULES``, else its direction from ``DIRECTION_KEYWORDS``."""
    key = name.lower()
    if key in METRIC_RULES:
        return METRIC_RULES[key]
    for keyword, direction in DIRECTION_KEYWORDS:
        if keyword in key:
            return MetricRule(direction, DEFAULT_TOLERANCE, f"direction inferred from {keyword!r}")
    return MetricRule(EITHER, DEFAULT_TOLERANCE, "unknown direction: any change beyond tolerance fails")


OK = "ok"
IMPROVED = "improved"
REGRESSED = "regressed"
MISSING_CURRENT = "missing in current run"
MISSING_BASELINE = "not in baseline"
STATUSES = (OK, IMPROVED, REGRESSED, MISSING_CURRENT, MISSING_BASELINE)


@dataclass(frozen=True)
class MetricComparison:
    """One metric, baseline against current.

    Attributes:
        name: metric name.
        baseline: the baseline's value; None where the baseline lacks the metric; NaN where it was NaN.
        current: the current run's value; None where the run lacks the metric.
        direction: ``"higher"``, ``"lower"`` or ``"either"``.
        tolerance: the tolerance applied.
        status: one of ``STATUSES``: ``ok`` (within tolerance), ``improved``, ``regressed``,
            ``missing in current run`` (fails), ``not in baseline`` (reported, not gated).
    """

    name: str
    baseline: float | None
    current: float | None
    direction: str
    tolerance: Tolerance
    status: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"MetricComparison.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def delta(self) -> float | None:
        """``current - baseline``; None where either is missing."""
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline

    @property
    def failed(self) -> bool:
        """Whether this metric fails the gate (regressed, or missing from the current run)."""
        return self.status in (REGRESSED, MISSING_CURRENT)

    def explain(self) -> str:
        """One line naming the metric, baseline -> current, and the tolerance."""
        arrow = f"{_fmt(self.baseline)} → {_fmt(self.current)}"
        better = {HIGHER: "higher is better", LOWER: "lower is better", EITHER: "any change counts"}[self.direction]
        if self.status == MISSING_CURRENT:
            return f"{self.name}: in the baseline ({_fmt(self.baseline)}) but missing from the current run"
        if self.status == MISSING_BASELINE:
            return f"{self.name}: {_fmt(self.current)} is not in the baseline (not gated; --update-baseline tracks it)"
        return (
            f"{self.name} {self.status}: {arrow} (delta {_fmt_delta(self.delta)}, tolerance "
            f"{self.tolerance.describe()}, {better})"
        )


@dataclass(frozen=True)
class Comparison:
    """Every metric of a run against its baseline.

    Attributes:
        metrics: one entry per metric in either, sorted by name.
    """

    metrics: tuple[MetricComparison, ...]

    @property
    def failures(self) -> tuple[MetricComparison, ...]:
        """The metrics that fail the gate."""
        return tuple(m for m in self.metrics if m.failed)

    @property
    def passed(self) -> bool:
        """Whether no metric fails the gate."""
        return not self.failures

    def get(self, name: str) -> MetricComparison:
        """The comparison of one metric (KeyError naming the known metrics if absent)."""
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; compared: {[m.name for m in self.metrics]}")

    def table(self) -> str:
        """A readable per-metric diff table, then one line per failing metric."""
        header = ("metric", "baseline", "current", "delta", "tolerance", "better", "status")
        rows = [
            (
                m.name,
                _fmt(m.baseline),
                _fmt(m.current),
                _fmt_delta(m.delta),
                m.tolerance.describe(),
                m.direction,
                m.status.upper() if m.failed else m.status,
            )
            for m in self.metrics
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header]]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        failures = self.failures
        if failures:
            lines.append("")
            lines.append(f"FAILED: {len(failures)} of {len(self.metrics)} metrics")
            lines += [f"  {m.explain()}" for m in failures]
        else:
            lines.append("")
            lines.append(f"PASSED: {len(self.metrics)} metrics within tolerance")
        new = [m for m in self.metrics if m.status == MISSING_BASELINE]
        lines += [f"  note: {m.explain()}" for m in new]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON form (NaN as null)."""
        return {
            "passed": self.passed,
            "metrics": [
                {
                    "name": m.name,
                    "baseline": _json_float(m.baseline),
                    "current": _json_float(m.current),
                    "delta": _json_float(m.delta),
                    "direction": m.direction,
                    "tolerance": m.tolerance.to_dict(),
                    "status": m.status,
                }
                for m in self.metrics
            ],
        }


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _fmt_delta(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    return f"{value:+.4g}"


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _as_float(name: str, value: object, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: metric {name!r} is {value!r}, not a number")
    return float(value)


def resolve_tolerances(names: list[str] | set[str], overrides: Mapping[str, Tolerance | float | str] | None) -> dict:
    """The tolerance of each metric: ``overrides`` first, then ``METRIC_RULES`` / ``DEFAULT_TOLERANCE``.

    Args:
        names: metric names.
        overrides: per metric a ``Tolerance``, a number (absolute) or a string for ``Tolerance.parse``.

    Returns:
        ``{name: Tolerance}`` for every name.
    """
    overrides = dict(overrides or {})
    resolved = {}
    for name in names:
        value = overrides.get(name, rule_for(name).tolerance)
        if isinstance(value, Tolerance):
            resolved[name] = value
        elif isinstance(value, str):
            resolved[name] = Tolerance.parse(value)
        elif isinstance(value, Mapping):
            resolved[name] = Tolerance.from_dict(value)
        else:
            resolved[name] = Tolerance(absolute=float(value))
    return resolved


def compare(
    current: Mapping[str, float], baseline: Mapping[str, float], tolerances: Mapping | None = None
) -> Comparison:
    """Compare a run's aggregate metrics with a baseline's.

    Args:
        current: ``{metric: value}`` of the run under test (None or NaN counts as NaN).
        baseline: ``{metric: value}`` of the baseline.
        tolerances: per metric a ``Tolerance``, a number (absolute slack) or a string (``"0.05"``, ``"5%"``,
            ``"0.05,5%"``); metrics absent here take their default from ``METRIC_RULES``.

    Returns:
        The per-metric comparison; ``Comparison.passed`` is the gate's verdict.
    """
    names = sorted(set(current) | set(baseline))
    resolved = resolve_tolerances(names, tolerances)
    results = []
    for name in names:
        direction = rule_for(name).direction
        tolerance = resolved[name]
        if name not in current:
            base = _as_float(name, baseline[name], "baseline")
            results.append(MetricComparison(name, base, None, direction, tolerance, MISSING_CURRENT))
            continue
        now = _as_float(name, current[name], "current run")
        if name not in baseline:
            results.append(MetricComparison(name, None, now, direction, tolerance, MISSING_BASELINE))
            continue
        base = _as_float(name, baseline[name], "baseline")
        results.append(
            MetricComparison(name, base, now, direction, tolerance, _status(base, now, direction, tolerance))
        )
    return Comparison(tuple(results))


def _status(base: float, now: float, direction: str, tolerance: Tolerance) -> str:
    if math.isnan(base) and math.isnan(now):
        return OK
    if math.isnan(now):
        return REGRESSED  # a number turned NaN
    if math.isnan(base):
        return IMPROVED  # NaN turned into a number
    slack = tolerance.slack(base)
    delta = now - base
    if direction == EITHER:
        return REGRESSED if abs(delta) > slack else OK
    gain = delta if direction == HIGHER else -delta
    if gain < -slack:
        return REGRESSED
    if gain > slack:
        return IMPROVED
    return OK


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: identity, and a deliberately degraded copy.


def weights_sha256(run: Path) -> str:
    """SHA-256 (hex) of a run folder's ``model.safetensors``."""
    path = Path(run) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} is not a bevjepa run folder (train one with `bevjepa train`)")
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_NOT_WEIGHTS = ("running_mean", "running_var", "num_batches_tracked")
"""State entries that are statistics, not weights: left as they are (noise would make a variance negative)."""


def perturb_checkpoint(run: Path, out: Path, noise_std: float, seed: int) -> Path:
    """Copy a run folder with Gaussian noise added to every floating weight: a deliberately degraded model.

    The files at the top of ``run`` are copied (sub-folders such as ``tensorboard/`` are not);
    ``model.safetensors`` is rewritten with ``w + noise_std * N(0, 1)`` for every floating tensor except the
    normalization statistics (``running_mean``, ``running_var``); dtypes, shapes and the file's metadata are kept.
    ``state.json`` records the perturbation (source, its weights' SHA-256, ``noise_std``, ``seed``). The same
    ``seed`` gives byte-identical weights. The folder appears whole or not at all (written next to ``out``, then
    renamed).

    Args:
        run: a run folder (``config.json``, ``state.json``, ``model.safetensors``).
        out: the folder to create; must not exist, or be empty.
        noise_std: standard deviation of the noise, in the weights' own units (>= 0).
        seed: seeds the noise.

    Returns:
        ``out``.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    run, out = Path(run), Path(out)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    source = run / "model.safetensors"
    for name in ("config.json", "state.json", "model.safetensors"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: {run} is not a bevjepa run folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    generator = torch.Generator().manual_seed(int(seed))
    noisy = {}
    for key in sorted(tensors):  # a fixed order: the same seed gives the same noise per tensor
        tensor = tensors[key]
        if tensor.is_floating_point() and not key.endswith(_NOT_WEIGHTS) and noise_std > 0:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * noise_std
            tensor = (tensor.float() + noise).to(tensor.dtype)
        noisy[key] = tensor.contiguous()
    # The record goes into state.json only: safetensors orders several metadata keys differently from run to run,
    # and the same seed must give the same bytes.
    record = {"from": str(run), "from_sha256": weights_sha256(run), "noise_std": noise_std, "seed": int(seed)}

    def fill(staging: Path) -> None:
        for item in run.iterdir():
            if item.is_file() and item.name != "model.safetensors" and not item.name.endswith(".tmp"):
                shutil.copy2(item, staging / item.name)
        save_file(noisy, str(staging / "model.safetensors"), metadata=metadata)
        state = json.loads((staging / "state.json").read_text())
        state["perturbation"] = record
        (staging / "state.json").write_text(json.dumps(state, indent=1))

    bevio.atomic_write_folder(out, fill)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The baseline file.


@dataclass(frozen=True)
class CheckpointRef:
    """The checkpoint a run used.

    Attributes:
        path: the run folder, as given.
        weights_sha256: SHA-256 (hex) of its ``model.safetensors``.
    """

    path: str
    weights_sha256: str

    @classmethod
    def of(cls, run: Path) -> CheckpointRef:
        """Hash the weights of a run folder."""
        return cls(str(run), weights_sha256(run))

    def describe(self) -> str:
        """E.g. ``out/run (weights sha256 1a2b3c4d5e6f)``."""
        return f"{self.path} (weights sha256 {self.weights_sha256[:12]})"


@dataclass(frozen=True)
class Baseline:
    """What a suite run scored, kept to compare later runs with.

    Attributes:
        suite: the suite's name.
        forecast: the forecast source (one of ``sources.FORECASTS``).
        checkpoint: the checkpoint of a ``model`` forecast; None for the others.
        metrics: ``{metric: value}``, the suite's aggregate metrics (with the ``failed`` count); NaN where undefined.
        tolerances: ``{metric: Tolerance}`` used when the baseline was written.
        episodes: how many episodes of the suite finished.
        created_utc: when it was written (ISO 8601).
    """

    suite: str
    forecast: str
    checkpoint: CheckpointRef | None
    metrics: dict[str, float]
    tolerances: dict[str, Tolerance]
    episodes: int = 0
    created_utc: str = ""

    def to_dict(self) -> dict:
        """JSON form (NaN as null)."""
        return {
            "format": BASELINE_FORMAT,
            "format_version": BASELINE_VERSION,
            "suite": self.suite,
            "forecast": self.forecast,
            "checkpoint": dataclasses.asdict(self.checkpoint) if self.checkpoint else None,
            "episodes": self.episodes,
            "created_utc": self.created_utc,
            "metrics": {k: _json_float(v) for k, v in sorted(self.metrics.items())},
            "tolerances": {k: v.to_dict() for k, v in sorted(self.tolerances.items())},
        }


def write_baseline(path: Path, baseline: Baseline) -> Path:
    """Write a baseline file atomically (temporary file, then rename)."""
    path = Path(path)
    bevio.atomic_write_text(path, json.dumps(baseline.to_dict(), indent=1) + "\n")
    return path


def read_baseline(path: Path) -> Baseline:
    """Read and check a baseline file; a clear ``ValueError`` naming the file where it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"baseline {path} not found; write one with `bevjepa regress --suite ... --baseline {path} "
            "--update-baseline`"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"baseline {path} is not valid JSON ({error}); restore it from version control or rewrite it with "
            "--update-baseline"
        ) from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise ValueError(f"baseline {path} is not a {BASELINE_FORMAT} file (its 'format' field is missing or other)")
    if data.get("format_version") != BASELINE_VERSION:
        raise ValueError(
            f"baseline {path} has format_version {data.get('format_version')!r}; this bevjepa reads version "
            f"{BASELINE_VERSION}: rewrite it with --update-baseline"
        )
    try:
        metrics = data["metrics"]
        if not isinstance(metrics, dict):
            raise ValueError("'metrics' is not an object")
        checkpoint = data.get("checkpoint")
        if data["forecast"] not in sources.FORECASTS:
            raise ValueError(f"forecast {data['forecast']!r} is not one of {sources.FORECASTS}")
        return Baseline(
            suite=str(data["suite"]),
            forecast=str(data["forecast"]),
            checkpoint=CheckpointRef(str(checkpoint["path"]), str(checkpoint["weights_sha256"]))
            if checkpoint
            else None,
            metrics={str(k): _as_float(k, v, f"baseline {path}") for k, v in metrics.items()},
            tolerances={str(k): Tolerance.from_dict(v) for k, v in (data.get("tolerances") or {}).items()},
            episodes=int(data.get("episodes", 0)),
            created_utc=str(data.get("created_utc", "")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"baseline {path} is corrupt ({type(error).__name__}: {error}); rewrite it with --update-baseline"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Suite results.


def run_metrics(result: safety.SuiteResult) -> dict[str, float]:
    """The gated metrics of a suite run: its aggregate (``safety.SuiteAggregate.metrics``), ``failed`` included.

    A run saved as ``metrics.json`` is read back with ``safety.SuiteResult.load``.
    """
    return result.aggregate.metrics()


# ---------------------------------------------------------------------------------------------------------------
# JUnit XML.


def junit_xml(
    comparison: Comparison,
    suite: str,
    failed_episodes: Sequence[safety.FailedEpisode] = (),
    properties: Mapping[str, str] | None = None,
    time_s: float = 0.0,
) -> ET.ElementTree:
    """The gate's verdict as JUnit XML: one testsuite, a testcase per metric and per failed episode.

    Args:
        comparison: the metrics compared.
        suite: the suite's name (the testsuite's name).
        failed_episodes: the suite run's failed episodes.
        properties: ``<property>`` entries of the testsuite (forecast, checkpoint, baseline file...).
        time_s: wall time of the suite run (s).
    """
    episodes = [(f.episode_id, f"{f.error}\n{f.traceback}".strip()) for f in failed_episodes]
    failures = len(comparison.failures) + len(episodes)
    skipped = sum(m.status == MISSING_BASELINE for m in comparison.metrics)
    root = ET.Element("testsuites", name="bevjepa regress", tests=str(len(comparison.metrics) + len(episodes)))
    root.set("failures", str(failures))
    root.set("errors", "0")
    node = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(comparison.metrics) + len(episodes)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{time_s:.3f}",
        timestamp=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        hostname=socket.gethostname(),
    )
    if properties:
        props = ET.SubElement(node, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", name=str(key), value=str(value))
    for metric in comparison.metrics:
        case = ET.SubElement(node, "testcase", classname=f"regress.{suite}.metrics", name=metric.name, time="0")
        if metric.failed:
            failure = ET.SubElement(case, "failure", message=metric.explain(), type=metric.status.replace(" ", "_"))
            failure.text = comparison.table()
        elif metric.status == MISSING_BASELINE:
            ET.SubElement(case, "skipped", message=metric.explain())
        else:
            ET.SubElement(case, "system-out").text = metric.explain()
    for name, message in episodes:
        case = ET.SubElement(node, "testcase", classname=f"regress.{suite}.episodes", name=name, time="0")
        failure = ET.SubElement(case, "failure", message=f"episode {name} failed", type="episode_failed")
        failure.text = message
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(path: Path, tree: ET.ElementTree) -> Path:
    """Write JUnit XML atomically."""
    path = Path(path)
    text = ET.tostring(tree.getroot(), encoding="unicode", xml_declaration=False)
    bevio.atomic_write_text(path, '<?xml version="1.0" encoding="utf-8"?>\n' + text + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The gate: run, compare, report.


@dataclass(frozen=True)
class RegressConfig:
    """One ``bevjepa regress`` invocation.

    Attributes:
        suite: a suite file (TOML) or the name of a shipped suite, as ``runner.run_suite`` takes it.
        baseline: the baseline JSON file.
        forecast: forecast source (one of ``sources.FORECASTS``); None takes the baseline's (``cv`` without a
            baseline, ``model`` where a checkpoint is given).
        checkpoint: run folder of a ``model`` forecast; None takes the baseline's, whose weights must then be
            unchanged.
        tolerances: per-metric overrides of the baseline's tolerances.
        workers: Ray workers for the episodes (1: in this process).
        address: Ray cluster address (None: start Ray locally where workers > 1).
        junit: where to write JUnit XML (None: nowhere).
        out: folder for the suite's outputs plus ``regress.json`` and ``diff.txt`` (None: nowhere).
        update_baseline: write the baseline from this run instead of gating on it.
        progress: show the suite's progress.
    """

    suite: str
    baseline: Path
    forecast: str | None = None
    checkpoint: Path | None = None
    tolerances: Mapping[str, Tolerance] = dataclasses.field(default_factory=dict)
    workers: int = 1
    address: str | None = None
    junit: Path | None = None
    out: Path | None = None
    update_baseline: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.forecast is not None and self.forecast not in sources.FORECASTS:
            raise ValueError(f"RegressConfig.forecast must be one of {sources.FORECASTS}, got {self.forecast!r}")
        if self.workers < 1:
            raise ValueError(f"RegressConfig.workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class RegressReport:
    """What the gate found.

    Attributes:
        exit_code: 0 (passed, or baseline written) or 1 (a metric regressed, or no baseline to compare with).
        text: the report to print: header, diff table, verdict.
        comparison: the comparison; None where there was no baseline to compare with.
        baseline: the baseline compared with, or the one written.
        result: the suite run (``runner.run_suite``); None where the suite did not run.
    """

    exit_code: int
    text: str
    comparison: Comparison | None
    baseline: Baseline | None
    result: safety.SuiteResult | None


@dataclass(frozen=True)
class _SuiteRun:
    """One run of the suite under the gate.

    Attributes:
        result: what ``runner.run_suite`` returned.
        forecast: the forecast source it ran with.
        checkpoint: the checkpoint of a ``model`` forecast, its weights hashed after the run; None for the others.
        metrics: its gated metrics (``run_metrics``).
        wall_s: how long the suite ran (s).
    """

    result: safety.SuiteResult
    forecast: str
    checkpoint: CheckpointRef | None
    metrics: dict[str, float]
    wall_s: float

    @property
    def suite(self) -> str:
        """The suite's name."""
        return self.result.suite


def regress(config: RegressConfig) -> RegressReport:
    """Run the suite, compare it with the baseline (or write the baseline), and report.

    Raises:
        ValueError: a corrupt baseline, a suite that is not the baseline's, a checkpoint whose weights changed
            under the baseline's path, a ``model`` forecast without a checkpoint, or a checkpoint with another
            forecast.
    """
    baseline_path = Path(config.baseline)
    if not config.update_baseline and not baseline_path.exists():
        text = (
            f"baseline {baseline_path} not found: nothing to compare with. Write it from a run with "
            f"`bevjepa regress --suite {config.suite} --baseline {baseline_path} --update-baseline`"
        )
        return RegressReport(1, text, None, None, None)
    baseline, notes = _read_baseline_or_note(baseline_path, config.update_baseline)

    default = sources.MODEL if config.checkpoint else sources.CONSTANT_VELOCITY
    forecast = config.forecast or (baseline.forecast if baseline else default)
    checkpoint = _resolve_checkpoint(config, forecast, baseline, baseline_path)
    if baseline is not None and not config.update_baseline:
        _check_suite_file(config.suite, baseline, baseline_path)  # before, not after, the run

    run = _run_suite(config, forecast, checkpoint)
    if baseline is not None and not config.update_baseline:
        _check_suite(baseline, baseline_path, run.suite)
    header = _header(run, baseline, baseline_path, notes)

    if config.update_baseline:
        report = _write_new_baseline(config, baseline, baseline_path, run, header)
    else:
        assert baseline is not None
        report = _gate(config, baseline, run, header)
    _write_outputs(config, report, run, baseline_path)
    return report


def _read_baseline_or_note(baseline_path: Path, update_baseline: bool) -> tuple[Baseline | None, list[str]]:
    """The baseline if there is one, and notes for the report; an unreadable one raises unless it is replaced."""
    if not baseline_path.exists():
        return None, []
    try:
        return read_baseline(baseline_path), []
    except ValueError as error:
        if not update_baseline:
            raise
        return None, [f"note: replacing an unreadable baseline ({error})"]


def _check_suite_file(suite: str, baseline: Baseline, baseline_path: Path) -> None:
    """Where the suite is a file, check its name against the baseline's without running it."""
    if Path(suite).is_file():
        from bevjepa.evaluation.closed_loop import suite_files

        _check_suite(baseline, baseline_path, suite_files.load_suite(suite).name)


def _run_suite(config: RegressConfig, forecast: str, checkpoint: Path | None) -> _SuiteRun:
    """Run the suite with ``forecast`` (and ``checkpoint``), timed."""
    import time

    from bevjepa.evaluation.closed_loop import runner

    started = time.perf_counter()
    result = runner.run_suite(
        config.suite,
        forecast,
        checkpoint=checkpoint,
        workers=config.workers,
        address=config.address,
        out=config.out,
        progress=config.progress,
        job="regress",
    )
    wall_s = time.perf_counter() - started
    current = run_metrics(result)
    current_ref = CheckpointRef.of(checkpoint) if checkpoint is not None else None
    return _SuiteRun(result, forecast, current_ref, current, wall_s)


def _header(run: _SuiteRun, baseline: Baseline | None, baseline_path: Path, notes: list[str]) -> list[str]:
    """The report's first lines: the run's size and time, what it and the baseline used, then ``notes``."""
    episodes, failed = len(run.result.episodes), run.result.failed
    header = [f"suite {run.suite}: {episodes} episodes, {len(failed)} failed, {run.wall_s:.1f} s"]
    header += _identity_lines(baseline, baseline_path, run.forecast, run.checkpoint)
    return header + notes


def _write_new_baseline(
    config: RegressConfig, baseline: Baseline | None, baseline_path: Path, run: _SuiteRun, header: list[str]
) -> RegressReport:
    """``--update-baseline``: write the run as the baseline (keeping the old one's tolerances); exit code 0."""
    suite, current, failed = run.suite, run.metrics, run.result.failed
    if failed and not run.result.episodes:
        raise ValueError(
            f"every episode of suite {suite!r} failed, so there is nothing to write a baseline from; the first, "
            f"{failed[0].episode_id}: {failed[0].error.splitlines()[0] if failed[0].error else '?'}"
        )
    if failed:
        header.append(f"warning: {len(failed)} episodes failed; the baseline records that as its `failed` count")
    kept = dict(baseline.tolerances) if baseline is not None and baseline.suite == suite else {}
    tolerances = resolve_tolerances(set(current), {**kept, **config.tolerances})
    written = Baseline(
        suite=suite,
        forecast=run.forecast,
        checkpoint=run.checkpoint,
        metrics=current,
        tolerances=tolerances,
        episodes=len(run.result.episodes),
        created_utc=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    )
    comparison = compare(current, current, tolerances)
    lines = [*header]
    if baseline is not None and baseline.suite == suite:
        previous = compare(current, baseline.metrics, tolerances)
        lines += ["", "against the previous baseline:", previous.table()]
    write_baseline(baseline_path, written)
    lines += ["", f"wrote baseline {baseline_path}: {len(current)} metrics"]
    lines += [
        f"  {name} = {_fmt(value)}  (tolerance {tolerances[name].describe()})"
        for name, value in sorted(current.items())
    ]
    return RegressReport(0, "\n".join(lines), comparison, written, run.result)


def _gate(config: RegressConfig, baseline: Baseline, run: _SuiteRun, header: list[str]) -> RegressReport:
    """Compare the run with the baseline: exit code 0 where no metric regressed, else 1."""
    tolerances = {**baseline.tolerances, **config.tolerances}
    comparison = compare(run.metrics, baseline.metrics, tolerances)
    verdict = (
        "regress: PASSED"
        if comparison.passed
        else "regress: FAILED — "
        + ", ".join(f"{m.name} ({_fmt(m.baseline)} → {_fmt(m.current)})" for m in comparison.failures)
    )
    text = "\n".join([*header, "", comparison.table(), "", verdict])
    return RegressReport(0 if comparison.passed else 1, text, comparison, baseline, run.result)


def _write_outputs(config: RegressConfig, report: RegressReport, run: _SuiteRun, baseline_path: Path) -> None:
    """Write the JUnit XML (``config.junit``) and ``diff.txt`` and ``regress.json`` (under ``config.out``)."""
    comparison = report.comparison
    assert comparison is not None
    if config.junit is not None:
        properties = {
            "forecast": run.forecast,
            "checkpoint": run.checkpoint.describe() if run.checkpoint else "none",
            "baseline": str(baseline_path),
        }
        write_junit(config.junit, junit_xml(comparison, run.suite, run.result.failed, properties, run.wall_s))
    if config.out is not None:
        out = Path(config.out)
        bevio.atomic_write_text(out / "diff.txt", report.text + "\n")
        summary = {
            "suite": run.suite,
            "forecast": run.forecast,
            "checkpoint": dataclasses.asdict(run.checkpoint) if run.checkpoint else None,
            "baseline": str(baseline_path),
            "exit_code": report.exit_code,
            "updated_baseline": config.update_baseline,
            "metrics": {k: _json_float(v) for k, v in sorted(run.metrics.items())},
            "comparison": comparison.to_dict(),
        }
        bevio.atomic_write_text(out / "regress.json", json.dumps(summary, indent=1) + "\n")


def _check_suite(baseline: Baseline, baseline_path: Path, suite: str) -> None:
    if baseline.suite != suite:
        raise ValueError(
            f"suite mismatch: baseline {baseline_path} was written for suite {baseline.suite!r}, this run is "
            f"suite {suite!r}; pass the baseline of this suite, or write one with --update-baseline"
        )


def _resolve_checkpoint(
    config: RegressConfig, forecast: str, baseline: Baseline | None, baseline_path: Path
) -> Path | None:
    """The checkpoint to run, checked against the forecast and the baseline."""
    if forecast not in sources.MODEL_SOURCES:
        if config.checkpoint is not None:
            raise ValueError(
                f"--checkpoint is only used by the model forecasts {sources.MODEL_SOURCES}, not {forecast!r}; drop one"
            )
        return None
    if config.checkpoint is not None:
        weights_sha256(Path(config.checkpoint))  # a clear error now, not after the suite
        return Path(config.checkpoint)
    if baseline is None or baseline.checkpoint is None:
        raise ValueError("--forecast model needs --checkpoint RUN (a `bevjepa train` run folder)")
    path = Path(baseline.checkpoint.path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"checkpoint mismatch: baseline {baseline_path} names checkpoint {path}, which holds no "
            "model.safetensors; pass --checkpoint RUN"
        )
    found = weights_sha256(path)
    if found != baseline.checkpoint.weights_sha256:
        raise ValueError(
            f"checkpoint mismatch: the weights at {path} (sha256 {found[:12]}) are not those baseline "
            f"{baseline_path} was written with (sha256 {baseline.checkpoint.weights_sha256[:12]}); pass "
            "--checkpoint to gate this model against the baseline, or --update-baseline to re-baseline"
        )
    return path


def _identity_lines(
    baseline: Baseline | None, baseline_path: Path, forecast: str, current: CheckpointRef | None
) -> list[str]:
    """Header lines: what the baseline and this run used; notes where they differ."""
    ours = current.describe() if current else "none"
    if baseline is None:
        return [f"forecast {forecast}, checkpoint {ours}; no baseline yet at {baseline_path}"]
    theirs = baseline.checkpoint.describe() if baseline.checkpoint else "none"
    lines = [
        f"baseline {baseline_path} ({baseline.created_utc or 'undated'}): forecast {baseline.forecast}, "
        f"checkpoint {theirs}",
        f"this run: forecast {forecast}, checkpoint {ours}",
    ]
    if baseline.forecast != forecast:
        lines.append(f"note: forecast differs from the baseline's ({baseline.forecast} → {forecast})")
    same_weights = (baseline.checkpoint and current) and baseline.checkpoint.weights_sha256 == current.weights_sha256
    if (baseline.checkpoint or current) and not same_weights:
        lines.append("note: the model's weights differ from the baseline's")
    return lines
