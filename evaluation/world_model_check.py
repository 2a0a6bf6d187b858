"""Does the world model earn its place? Occupancy decoded from three kinds of latent, on the same windows.

For each window the model's occupancy decoder reads, at every horizon k = 0..F:

* ``rollout``: ẑ_k, the latent the predictor rolled out under the ego's actions (what a forecast uses), with the
  fine maps of t0 warped by its flow;
* ``rollout_unwarped``: the same ẑ_k with the fine maps of t0 as they were (no flow): what the rolled-out latent
  itself carries to the decoder; its gap to ``rollout`` is what the flow brings;
* ``held``: z_t0 decoded as the present (step 0, no flow) for every horizon: the world standing still, the bar a
  rollout must clear;
* ``observed``: z̄_k, the EMA target encoder's latent of the frames that really came, warped into t0 (needs the
  windows' future sensors), with its own flow: a bound on what the decoder can make of a perfect prediction.

With ``ModelConfig.present_occupancy`` every source adds, at each horizon, the same reading of t0's features the
forecast adds (``ModelOutput.present_logits``): ``held`` is then the world model's own direct baseline, and the
rollout's gap to it is what rolling out brings beyond it.

IoU per class and horizon, counts summed over the split, the map thresholded at ``threshold``. Beside it, the
rollout's flow against the annotated instances' motion (``losses.instance_flow_targets``): the mean error (m) on
each class's cells per horizon, next to the mean motion itself (a flow that learnt nothing errs by the motion).
A window that cannot be loaded is left out and counted (``failed_windows``), as the open-loop scoring does. The
direct baseline (``ModelConfig.world_model = False``) has no latent to roll out: ``check`` refuses it.

Notation:
    B  windows in a batch   F  rolled-out steps   C  classes   H, W  target grid rows, columns
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bevjepa.datasets import categories, torch_dataset
from bevjepa.evaluation import metrics, open_loop
from bevjepa.prediction import losses, model, train

SOURCES = ("rollout", "rollout_unwarped", "held", "observed")
"""The latents decoded, in the report's order."""


@dataclass(frozen=True)
class WorldModelCheck:
    """Occupancy IoU decoded from each kind of latent.

    Attributes:
        windows: windows scored.
        failed_windows: windows left out because they could not be loaded.
        threshold: the occupancy probability from which a cell counts as occupied.
        iou: {source: {class: [F + 1] IoU per horizon, NaN where nothing was occupied or predicted}}.
        flow_error_m: {class: [F + 1]} the rollout flow's mean error (m) on the class's instance cells (NaN: none).
        motion_m: {class: [F + 1]} the mean motion (m) of those cells since t0, the error of a flow of zero.
    """

    windows: int
    failed_windows: int
    threshold: float
    iou: dict[str, dict[str, list[float]]]
    flow_error_m: dict[str, list[float]]
    motion_m: dict[str, list[float]]

    def ratio(self, numerator: str, denominator: str, class_name: str, step: int) -> float:
        """IoU of ``numerator`` over ``denominator`` for a class at a horizon (NaN when undefined)."""
        a, b = self.iou[numerator][class_name][step], self.iou[denominator][class_name][step]
        return float(a / b) if b > 0 else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return {
            "windows": self.windows,
            "failed_windows": self.failed_windows,
            "threshold": self.threshold,
            "iou": self.iou,
            "flow_error_m": self.flow_error_m,
            "motion_m": self.motion_m,
        }


@torch.no_grad()
def check(
    net: model.BevJepa,
    data: Path,
    split: str = "mini_val",
    threshold: float = 0.5,
    batch_size: int = 2,
    max_windows: int | None = None,
    progress: bool = False,
) -> WorldModelCheck:
    """Score the rollout, the held latent and the observed future's latents on a split's windows.

    Args:
        net: the model (put in eval mode here).
        data: a ``bevjepa preprocess`` output holding the split.
        split: the devkit split scored.
        threshold: occupancy probability from which a cell counts as occupied.
        batch_size: windows per forward pass.
        max_windows: score only the first windows (None: all).
        progress: show a progress bar.

    Raises:
        ValueError: a model without a world model (the direct baseline).
    """
    if not net.config.world_model:
        raise ValueError("the world-model check needs a model with a world model (this is the direct baseline)")
    net.eval()
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split), future_inputs=True)
    count = len(dataset) if max_windows is None else min(max_windows, len(dataset))
    f = net.config.occupancy_steps
    steps = list(range(f + 1))
    counts = {name: np.zeros((2, f + 1, net.config.classes), dtype=np.int64) for name in SOURCES}
    flow_sums = np.zeros((3, f + 1, net.config.classes))  # error, motion, cells
    cell_xy = torch.as_tensor(net.config.grid.cell_centers(), dtype=torch.float32)
    failed: list[dict] = []
    scored = 0
    for first in tqdm(range(0, count, batch_size), desc="world-model check", unit="batch", disable=not progress):
        loaded = open_loop.load_windows(dataset, range(first, min(first + batch_size, count)), failed)
        if not loaded:
            continue
        batch = torch_dataset.collate([sample for _, sample in loaded])
        scored += len(loaded)
        output = net(batch)
        held = output.latent[:, None].expand(-1, f + 1, *output.latent.shape[1:])  # [B, F + 1, C, h, w]
        future = net.target_latents(batch)  # [B, F, C, h, w]
        observed = torch.cat([output.latent[:, None], future], dim=1)  # [B, F + 1, C, h, w]
        observed_flow = net.flow_of(future, output.latent, output.skips)
        rolled = torch.cat([output.latent[:, None], output.rollout], dim=1)  # [B, F + 1, C, h, w]
        present = output.present_logits  # every horizon's reading of t0's features, or None
        logits = {
            "rollout": output.occupancy_logits,
            "rollout_unwarped": net.occupancy_of(rolled, steps, output.skips, present=present),
            "held": net.occupancy_of(held, [0] * (f + 1), output.skips, present=present),
            "observed": net.occupancy_of(observed, steps, output.skips, observed_flow, present=present),
        }
        target = batch.occupancy.numpy()  # [B, F + 1, C, H, W]
        for name, value in logits.items():
            predicted = net.occupancy_probability(value).numpy() >= threshold
            intersection, union = metrics.iou_counts(predicted, target)  # [B, F + 1, C] each
            counts[name][0] += intersection.sum(axis=0)
            counts[name][1] += union.sum(axis=0)
        flow_sums += _flow_sums(output.flow, batch, cell_xy)
    iou = {
        name: {
            class_name: [float(v) for v in metrics.iou(counts[name][0][:, c], counts[name][1][:, c])]
            for c, class_name in enumerate(categories.CLASSES)
        }
        for name in SOURCES
    }
    error, motion = (np.where(flow_sums[2] > 0, v / np.maximum(flow_sums[2], 1), np.nan) for v in flow_sums[:2])
    per_class = lambda values: {c: [float(v) for v in values[:, i]] for i, c in enumerate(categories.CLASSES)}  # noqa: E731
    return WorldModelCheck(scored, len(failed), threshold, iou, per_class(error), per_class(motion))


def _flow_sums(flow: torch.Tensor, batch: torch_dataset.WindowBatch, cell_xy: torch.Tensor) -> np.ndarray:
    """[3, F + 1, C]: summed flow error (m), summed motion (m) and cells, per step and class, on the target grid.

    Args:
        flow: [B, F + 1, 2, h, w] the rollout's source offsets (m; ``ModelOutput.flow``).
        batch: the windows (``instances`` and ``occupancy`` on the target grid [B, F + 1, (C,) H, W]).
        cell_xy: [H, W, 2] the target grid's cell centres (m).
    """
    b, s = flow.shape[:2]
    h, w = cell_xy.shape[:2]
    predicted = torch.nn.functional.interpolate(flow.flatten(0, 1), size=(h, w), mode="bilinear").unflatten(0, (b, s))
    target, mask = losses.instance_flow_targets(batch.instances, cell_xy)
    error = torch.linalg.vector_norm(predicted - target, dim=2)  # [B, F + 1, H, W]
    motion = torch.linalg.vector_norm(target, dim=2)
    cells = batch.occupancy.bool() & mask[:, :, None]  # [B, F + 1, C, H, W]
    return (
        torch.stack(
            [
                (cells * error[:, :, None]).sum(dim=(0, 3, 4)),
                (cells * motion[:, :, None]).sum(dim=(0, 3, 4)),
                cells.sum(dim=(0, 3, 4)),
            ]
        )
        .double()
        .numpy()
    )
