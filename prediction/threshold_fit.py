"""``bevjepa thresholds``: choose a run's per-class occupancy thresholds on windows it trained on.

Decodes the dense occupancy of evenly spaced windows of a split (every step, from the sensors), counts the occupied
and free cells over the logits (``occupancy_thresholds.LogitCounts``), and writes the threshold of largest IoU per
class into the run folder. Then it forecasts the same windows from the sensors (a world model: tracked agents and the
fused map; the direct baseline: its dense map, the only forecast it makes) and writes the bars at which that
forecast reads as occupied, per step and class (``forecast_bars``), so that both read their maps as cells by the
same rule. Choose them on the training split: the split you score must stay unseen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bevjepa.datasets import categories, torch_dataset
from bevjepa.prediction import checkpoint, forecast_bars, forecaster, model, occupancy_thresholds, train

WINDOWS = 120
"""Windows counted by default (about 2 M cells per class and step on the ``small`` 128 × 128 grid)."""


@torch.no_grad()
def fit(
    run: Path,
    data: Path,
    split: str = "mini_train",
    windows: int = WINDOWS,
    batch_size: int = 4,
    progress: bool = False,
) -> occupancy_thresholds.OccupancyThresholds:
    """Choose and save the occupancy thresholds of ``run`` on ``windows`` windows of ``split`` of ``data``.

    Args:
        run: a run folder (``bevjepa train``); its thresholds file is replaced.
        data: a ``bevjepa preprocess`` output with the run's grid and horizon.
        split: the devkit split counted (the training split: the scored one must stay unseen).
        windows: how many windows, evenly spaced over the split (all when it has fewer).
        batch_size: windows per forward pass.
        progress: show a progress bar.

    Raises:
        ValueError: ``windows`` below 1, or windows of another grid or horizon than the run's.
    """
    _, net = checkpoint.load_model(run)
    net.set_occupancy_thresholds(None)  # count the raw logits
    dataset, indices = _spaced_windows(run, net, data, split, windows)
    counts = occupancy_thresholds.LogitCounts(net.config.classes)
    for batch in _batches(dataset, indices, batch_size, "thresholds", progress):
        logits = net.scene(batch).occupancy_logits  # [B, S, C, H, W]
        counts.add(logits.float().numpy(), batch.occupancy.numpy())
    thresholds = counts.thresholds(categories.CLASSES, split, len(indices))
    thresholds.save(run)
    return thresholds


@torch.no_grad()
def fit_forecast_bars(
    run: Path,
    data: Path,
    split: str = "mini_train",
    windows: int = WINDOWS,
    batch_size: int = 4,
    progress: bool = False,
) -> forecast_bars.ForecastBars:
    """Choose and save the forecast bars of ``run`` on ``windows`` windows of ``split``.

    A world model forecasts each window on its own from its sensors (``WindowSample.sensors_only``, tracked agents,
    the run's occupancy thresholds as saved), and its fused map is counted against the window's occupancy at every
    step. The direct baseline's forecast is its dense map (published at its occupancy thresholds), decoded
    ``batch_size`` windows at a time.

    Raises:
        ValueError: ``windows`` below 1, or windows of another grid or horizon than the run's.
    """
    _, net = checkpoint.load_model(run)
    dataset, indices = _spaced_windows(run, net, data, split, windows)
    if net.config.world_model:
        maps = _fused_maps(forecaster.Forecaster(net), dataset, indices, progress)
    else:
        maps = _direct_maps(net, dataset, indices, batch_size, progress)
    counted, steps = None, 0
    for probability, target in maps:  # [S, C, H, W] each
        if counted is None:
            steps = probability.shape[0]
            counted = forecast_bars.counts(*probability.shape[:2])
        counted.add(probability, target)
    times_s = tuple(float(k * forecaster.STEP_S) for k in range(steps))
    bars = forecast_bars.choose(counted, categories.CLASSES, times_s, split, len(indices))
    bars.save(run)
    return bars


def _fused_maps(
    world_model: forecaster.Forecaster, dataset: torch_dataset.WindowDataset, indices: np.ndarray, progress: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each window's sensor-only forecast (the fused map, [S, C, H, W]) and its occupancy, forecast one by one."""
    for i in tqdm(indices, desc="forecast bars", unit="window", disable=not progress):
        window = dataset[int(i)]
        yield world_model.forecast(window.sensors_only()).occupancy, window.occupancy.numpy()


def _direct_maps(
    net: model.BevJepa,
    dataset: torch_dataset.WindowDataset,
    indices: np.ndarray,
    batch_size: int,
    progress: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each window's dense map as the net publishes it ([S, C, H, W]) and its occupancy, ``batch_size`` at a time."""
    for batch in _batches(dataset, indices, batch_size, "forecast bars", progress):
        probability = net.occupancy_probability(net.scene(batch).occupancy_logits).float().numpy()  # [B, S, C, H, W]
        yield from zip(probability, batch.occupancy.numpy(), strict=True)


def _batches(
    dataset: torch_dataset.WindowDataset, indices: np.ndarray, batch_size: int, desc: str, progress: bool
) -> Iterator[torch_dataset.WindowBatch]:
    """The windows ``indices`` of ``dataset``, ``batch_size`` to a batch, under a progress bar named ``desc``."""
    for first in tqdm(range(0, len(indices), batch_size), desc=desc, unit="batch", disable=not progress):
        yield torch_dataset.collate([dataset[int(i)] for i in indices[first : first + batch_size]])


def _spaced_windows(
    run: Path, net, data: Path, split: str, windows: int
) -> tuple[torch_dataset.WindowDataset, np.ndarray]:
    """The windows of ``split`` the run's net reads, and ``windows`` indices evenly spaced over them (all if fewer).

    Raises:
        ValueError: ``windows`` below 1, or windows of another grid or horizon than the run's.
    """
    if windows < 1:
        raise ValueError(f"windows must be at least 1, got {windows}")
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split), cameras=net.config.use_camera)
    checkpoint.check_windows(run, net.config, dataset)
    return dataset, np.unique(np.linspace(0, len(dataset) - 1, min(windows, len(dataset))).round().astype(int))
