"""Per-class decision thresholds of the dense occupancy map, chosen on training windows.

The occupancy loss weighs each class's occupied cells ``LossWeights.occupancy_pos_weight`` times (pedestrians and
cyclists 10×), which moves the decoder's sigmoid up: where weighted cross-entropy alone is minimised, a cell the
model shows at p is occupied with odds p / (1 - p) / w. So 0.5 is too low a bar for the rare classes. This module
counts, over training windows, how the occupied and the free cells spread over the logit, and picks for each class
the threshold of largest IoU at 0.5 or above (pooled over every step decoded). The run folder keeps them
(``occupancy_thresholds.json``, ``bevjepa thresholds``), and ``BevJepa.occupancy_probability`` shifts each class's
logits by its threshold's logit, so that 0.5 on the published probabilities is that threshold: the forecast, its
fused map, the evaluation and the world-model check all read the same maps.

One threshold per class, not per step: over the steps the future cyclist cells of the training windows are few and
the per-step optimum is noisy (docs/train.md, "Occupancy thresholds chosen on training windows").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from bevjepa.datasets import io as bevio

FILE = "occupancy_thresholds.json"
"""The thresholds' file in a run folder (deleted whenever a training step rewrites the weights)."""
T = TypeVar("T")
LOGIT_EDGES = np.linspace(-12.0, 12.0, 241)
"""Bin edges of the counted logits (0.1 apart); the candidate thresholds are these edges."""


@dataclass(frozen=True)
class OccupancyThresholds:
    """The decision thresholds of one run's dense occupancy map.

    Attributes:
        classes: the class names, in channel order.
        probability: per class, the sigmoid probability from which a cell counts as occupied (0.5: none chosen).
        iou_at_half: per class, the IoU over the counted windows at 0.5 (every step pooled).
        iou_chosen: per class, the IoU there at ``probability``.
        split: the split the windows came from.
        windows: how many windows were counted.
    """

    classes: tuple[str, ...]
    probability: tuple[float, ...]
    iou_at_half: tuple[float, ...]
    iou_chosen: tuple[float, ...]
    split: str
    windows: int

    def __post_init__(self) -> None:
        n = len(self.classes)
        if not all(len(v) == n for v in (self.probability, self.iou_at_half, self.iou_chosen)):
            raise ValueError(f"OccupancyThresholds: one value per class ({n}) in every field")
        if not all(0.0 < p < 1.0 for p in self.probability):
            raise ValueError(f"OccupancyThresholds.probability: each in (0, 1), got {self.probability}")

    def logit_shift(self) -> np.ndarray:
        """[C] float32: the logit of each class's threshold (0 for 0.5)."""
        p = np.asarray(self.probability, dtype=np.float64)
        return np.log(p / (1.0 - p)).astype(np.float32)

    def save(self, run: Path) -> Path:
        """Write ``RUN/occupancy_thresholds.json`` (atomically); returns its path."""
        return save_record(run, FILE, self)

    @staticmethod
    def load(run: Path) -> OccupancyThresholds | None:
        """The thresholds of a run folder; None when it has none.

        Raises:
            ValueError: the file is not JSON or does not hold valid thresholds.
        """
        return load_record(
            run,
            FILE,
            "occupancy thresholds",
            lambda values: OccupancyThresholds(
                classes=tuple(str(c) for c in values["classes"]),
                probability=tuple(float(v) for v in values["probability"]),
                iou_at_half=tuple(float(v) for v in values["iou_at_half"]),
                iou_chosen=tuple(float(v) for v in values["iou_chosen"]),
                split=str(values["split"]),
                windows=int(values["windows"]),
            ),
        )


def save_record(run: Path, file: str, record) -> Path:
    """Write a frozen dataclass of ``bevjepa thresholds`` as ``RUN/file`` (JSON, atomically); returns its path."""
    path = Path(run) / file
    bevio.atomic_write_json(path, {key: getattr(record, key) for key in record.__dataclass_fields__})
    return path


def load_record(run: Path, file: str, what: str, build: Callable[[dict], T]) -> T | None:
    """``build`` applied to ``RUN/file``'s JSON; None when the run has no such file.

    Raises:
        ValueError: naming the file and ``what`` it should hold, where it is not JSON or ``build`` refuses it.
    """
    path = Path(run) / file
    if not path.is_file():
        return None
    try:
        return build(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not valid {what} ({error}); run `bevjepa thresholds` again") from error


class BinCounts:
    """Counts of the occupied and the free cells of each group (a class, or a step and a class) over value bins.

    A cell whose value falls at or above edge j - 1 lies in bin j or above (``np.digitize``), so ``iou_curve``'s
    column j is the IoU of counting as occupied every cell at or above ``edges[j - 1]``.
    """

    def __init__(self, groups: tuple[int, ...], edges: np.ndarray) -> None:
        self.groups, self.edges = tuple(groups), np.asarray(edges, dtype=np.float64)
        shape = (int(np.prod(self.groups)), len(self.edges) + 1)
        self.occupied = np.zeros(shape, dtype=np.int64)
        self.free = np.zeros(shape, dtype=np.int64)

    def add(self, values: np.ndarray, target: np.ndarray) -> None:
        """Count one batch: values [..., *groups, H, W] float and target of the same shape (0/1), any leading dims."""
        g, bins = self.occupied.shape
        k = len(self.groups)
        if values.shape != target.shape or values.ndim < k + 2 or values.shape[-k - 2 : -2] != self.groups:
            raise ValueError(
                f"{type(self).__name__}.add: values {values.shape} and target {target.shape}: "
                f"[..., {', '.join(map(str, self.groups))}, H, W]"
            )
        group = np.arange(g).reshape(self.groups)[..., None, None]  # [*groups, 1, 1]
        index = np.digitize(values, self.edges) + bins * group  # [..., *groups, H, W]
        occupied = target.astype(bool)
        self.occupied += np.bincount(index[occupied], minlength=g * bins).reshape(g, bins)
        self.free += np.bincount(index[~occupied], minlength=g * bins).reshape(g, bins)

    def iou_curve(self) -> np.ndarray:
        """[*groups, bins] IoU when the cells of bin j and above count as occupied (j = 0 … len(edges))."""
        hit = np.cumsum(self.occupied[:, ::-1], axis=1)[:, ::-1]  # occupied cells at or above bin j
        false = np.cumsum(self.free[:, ::-1], axis=1)[:, ::-1]
        missed = self.occupied.sum(axis=1, keepdims=True) - hit
        return (hit / np.maximum(hit + false + missed, 1)).reshape(*self.groups, -1)


class LogitCounts(BinCounts):
    """Counts of the occupied and the free cells of each class over the logit bins ``LOGIT_EDGES``."""

    def __init__(self, classes: int) -> None:
        super().__init__((classes,), LOGIT_EDGES)

    def thresholds(self, class_names: tuple[str, ...], split: str, windows: int) -> OccupancyThresholds:
        """The threshold of largest IoU per class, 0.5 or above; 0.5 for a class with no occupied cell counted.

        Only raised: positive weights of 1 or more only ever inflate the probabilities, so a bar below 0.5 would
        follow how well the model knows the windows it trained on, not the weighting (unbounded, a 30-minute run's
        cyclists chose 0.10 on ``mini_train``).
        """
        curve = self.iou_curve()  # [C, bins]
        half = int(np.argmin(np.abs(LOGIT_EDGES))) + 1  # the bin that the edge at logit 0 opens
        probability, chosen = [], []
        for c in range(len(class_names)):
            best = half + int(np.argmax(curve[c, half:-1])) if self.occupied[c].sum() > 0 else half
            probability.append(float(1.0 / (1.0 + np.exp(-LOGIT_EDGES[best - 1]))))
            chosen.append(float(curve[c, best]))
        return OccupancyThresholds(
            classes=tuple(class_names),
            probability=tuple(probability),
            iou_at_half=tuple(float(v) for v in curve[:, half]),
            iou_chosen=tuple(chosen),
            split=split,
            windows=windows,
        )
