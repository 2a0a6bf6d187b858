"""Open-loop evaluation on preprocessed windows: a model against the baselines, on the same agents and cells.

The baselines are constant velocity and persistence.
Trajectories are scored on the agents whose whole 6 s future is annotated (as the nuScenes prediction
challenge does): minADE_k, minFDE_k and MissRate_2_k. Occupancy is scored as IoU per class at every step, with
the model's probabilities thresholded at 0.5, counts summed over the split before dividing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bevjepa.datasets import categories, geometry, torch_dataset
from bevjepa.evaluation import baselines, metrics
from bevjepa.prediction import forecaster, train


def evaluate(data: Path, split: str, run: Path | None = None, batch_size: int = 4, threshold: float = 0.5) -> dict:
    """Score the model of ``run`` (if given) and the baselines on the windows of ``split``.

    Returns:
        ``{"windows": n, "agents": n, "models": {name: {"minADE_5": ..., "minFDE_5": ..., "MissRate_2_5": ...,
        "minADE_10": ..., "minFDE_10": ..., "iou": {class: [per step]}, "iou_2s_mean": ...}}}``.
    """
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=torch_dataset.collate)
    model = forecaster.Forecaster.from_checkpoint(run) if run is not None else None
    grid = model.net.config.grid if model is not None else geometry.GridSpec()
    trajectories: dict[str, list] = {"model": [], "constant_velocity": []}
    truths, windows_seen = [], 0
    counts: dict[str, list] = {"model": [], "constant_velocity": [], "persistence": []}
    with torch.no_grad():
        for batch in loader:
            forecasts = model.forecast_batch(batch) if model is not None else None
            for b in range(batch.batch_size):
                windows_seen += 1
                count = int(batch.agent_mask[b].sum())
                box = batch.agent_box[b, :count].numpy().astype(np.float64)
                cls = batch.agent_class[b, :count].numpy()
                future = batch.agent_future[b, :count].numpy().astype(np.float64)
                full = batch.agent_future_mask[b, :count].numpy().all(axis=1)
                velocity = baselines.agent_velocities(
                    batch.agent_velocity[b, :count].numpy(),
                    batch.agent_past[b, :count].numpy(),
                    batch.agent_past_mask[b, :count].numpy(),
                )
                cv_modes = baselines.constant_velocity_trajectories(box[:, :2], velocity, future.shape[1])
                trajectories["constant_velocity"].append((cv_modes[full], np.ones((int(full.sum()), 1))))
                truths.append(future[full])
                target = batch.occupancy[b].numpy()  # [S, C, H, W]
                steps = target.shape[0] - 1
                cv_occupancy = baselines.constant_velocity_occupancy(box, cls, velocity, grid, target.shape[1], steps)
                counts["constant_velocity"].append(metrics.iou_counts(cv_occupancy, target))
                counts["persistence"].append(
                    metrics.iou_counts(baselines.persistence_occupancy(target[0], steps), target)
                )
                if forecasts is not None:
                    forecast = forecasts[b]
                    trajectories["model"].append((forecast.trajectories[full], forecast.mode_probabilities[full]))
                    counts["model"].append(metrics.iou_counts(forecast.occupancy >= threshold, target))
    truth = np.concatenate(truths) if truths else np.zeros((0, 12, 2))
    result: dict = {"split": split, "windows": windows_seen, "agents": int(len(truth)), "models": {}}
    for name in counts:
        if not counts[name]:
            continue
        scores: dict = {}
        if trajectories.get(name):
            modes = np.concatenate([m for m, _ in trajectories[name]])
            probabilities = np.concatenate([p for _, p in trajectories[name]])
            for k in (1, 5, 10):
                ade, fde = metrics.min_ade_fde(modes, probabilities, truth, k)
                scores[f"minADE_{k}"] = float(ade.mean()) if len(ade) else float("nan")
                scores[f"minFDE_{k}"] = float(fde.mean()) if len(fde) else float("nan")
                scores[f"MissRate_2_{k}"] = (
                    float(metrics.miss_rate(modes, probabilities, truth, k).mean()) if len(ade) else float("nan")
                )
        intersection = np.sum([c[0] for c in counts[name]], axis=0)  # [S, C]
        union = np.sum([c[1] for c in counts[name]], axis=0)
        per_step = metrics.iou(intersection, union)  # [S, C]
        scores["iou"] = {cls: per_step[:, c].tolist() for c, cls in enumerate(categories.CLASSES)}
        scores["iou_2s_mean"] = float(np.nanmean(per_step[-1]))
        result["models"][name] = scores
    return result
