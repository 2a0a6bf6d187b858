"""The bars at which the forecast's occupancy reads as occupied: per step and class, chosen on training windows.

The forecast's fused map (``agent_occupancy.fuse``) is a probability: a tracked agent's boxes along its modes
weighed by the modes' probabilities and the track's existence, joined with the dense map. The further ahead, the
more that mass spreads over the modes: two seconds out a walker's five modes each hold a fraction of them, and no
cell of a person reaches 0.5 unless every mode passes through it. Read at 0.5, the map then loses people the
forecast saw. The probabilities are right to spread (their Brier score beats the tracks' boxes moved at constant
velocity, drawn as certain), and IoU at 0.5 is only one way to turn them into a map of cells: the bar of largest
IoU lies lower the more uncertain the step.

So ``bevjepa thresholds`` also forecasts windows it trained on from the sensors, as a planner would, counts the
fused map's occupied and free cells over probability bins per step and class (``occupancy_thresholds.BinCounts``),
and keeps the bar of largest IoU for each (``forecast_bars.json`` in the run folder). ``bevjepa eval`` scores the
forecast at them beside 0.5. The probabilities themselves are unchanged: these bars are a decision for those who
want a map of cells, not a recalibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevjepa.prediction import occupancy_thresholds

FILE = "forecast_bars.json"
"""The bars' file in a run folder (deleted whenever a training step rewrites the weights)."""
PROBABILITY_EDGES = np.round(np.arange(0.05, 0.951, 0.01), 2)
"""The candidate bars, 0.01 apart."""
MIN_OCCUPIED_CELLS = 500
"""A step and class with fewer occupied cells counted keeps 0.5 (a handful of cyclists is no ground for a bar)."""


@dataclass(frozen=True)
class ForecastBars:
    """The bars of one run's forecast, per step and class.

    Attributes:
        classes: the class names, in channel order.
        times_s: the seconds after t0 of each step (0, 0.5, … 2).
        bars: [S][C] the probability at and above which a cell counts as occupied.
        iou_at_half: [S][C] the IoU over the counted windows at 0.5.
        iou_chosen: [S][C] the IoU there at ``bars``.
        split: the split the windows came from.
        windows: how many windows were forecast.
    """

    classes: tuple[str, ...]
    times_s: tuple[float, ...]
    bars: tuple[tuple[float, ...], ...]
    iou_at_half: tuple[tuple[float, ...], ...]
    iou_chosen: tuple[tuple[float, ...], ...]
    split: str
    windows: int

    def __post_init__(self) -> None:
        shape = (len(self.times_s), len(self.classes))
        for name in ("bars", "iou_at_half", "iou_chosen"):
            value = getattr(self, name)
            if np.shape(value) != shape:
                raise ValueError(f"ForecastBars.{name}: expected [{shape[0]}][{shape[1]}] (steps, classes)")
        if not all(0.0 < p < 1.0 for row in self.bars for p in row):
            raise ValueError(f"ForecastBars.bars: each in (0, 1), got {self.bars}")

    def array(self) -> np.ndarray:
        """[S, C] float32: the bars, for ``probability >= bars[:, :, None, None]``."""
        return np.asarray(self.bars, dtype=np.float32)

    def save(self, run: Path) -> Path:
        """Write ``RUN/forecast_bars.json`` (atomically); returns its path."""
        return occupancy_thresholds.save_record(run, FILE, self)

    @staticmethod
    def load(run: Path) -> ForecastBars | None:
        """The bars of a run folder; None when it has none.

        Raises:
            ValueError: the file is not JSON or does not hold valid bars.
        """
        return occupancy_thresholds.load_record(
            run,
            FILE,
            "forecast bars",
            lambda values: ForecastBars(
                classes=tuple(str(c) for c in values["classes"]),
                times_s=tuple(float(t) for t in values["times_s"]),
                bars=_rows(values["bars"]),
                iou_at_half=_rows(values["iou_at_half"]),
                iou_chosen=_rows(values["iou_chosen"]),
                split=str(values["split"]),
                windows=int(values["windows"]),
            ),
        )


def _rows(table) -> tuple[tuple[float, ...], ...]:
    """A [S][C] table of floats as nested tuples (a frozen dataclass's field, JSON's lists)."""
    return tuple(tuple(float(v) for v in row) for row in table)


def counts(steps: int, classes: int) -> occupancy_thresholds.BinCounts:
    """Empty counts of a forecast's [S = steps, C] maps over ``PROBABILITY_EDGES``."""
    return occupancy_thresholds.BinCounts((steps, classes), PROBABILITY_EDGES)


def choose(
    counted: occupancy_thresholds.BinCounts,
    classes: tuple[str, ...],
    times_s: tuple[float, ...],
    split: str,
    windows: int,
) -> ForecastBars:
    """The bar of largest IoU per step and class; 0.5 where fewer than ``MIN_OCCUPIED_CELLS`` were occupied."""
    curve = counted.iou_curve()  # [S, C, bins]; column j: every cell at or above PROBABILITY_EDGES[j - 1]
    occupied = counted.occupied.sum(axis=1).reshape(curve.shape[:2])  # [S, C]
    half = int(np.flatnonzero(PROBABILITY_EDGES == 0.5)[0]) + 1
    best = 1 + np.argmax(curve[..., 1:], axis=-1)  # [S, C] never bin 0 (everything occupied)
    best = np.where(occupied >= MIN_OCCUPIED_CELLS, best, half)
    return ForecastBars(
        classes=tuple(classes),
        times_s=tuple(float(t) for t in times_s),
        bars=_rows(PROBABILITY_EDGES[best - 1]),
        iou_at_half=_rows(curve[..., half]),
        iou_chosen=_rows(np.take_along_axis(curve, best[..., None], axis=-1)[..., 0]),
        split=split,
        windows=windows,
    )
