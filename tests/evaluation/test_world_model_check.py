"""The world-model check: occupancy decoded from the rollout, the held z_t0 and the observed future's latents."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from bevjepa.datasets import categories, torch_dataset
from bevjepa.evaluation import metrics, world_model_check
from bevjepa.prediction import checkpoint


def test_each_latent_is_scored_per_class_and_horizon(light_checkpoint, synthetic_windows):
    _, net = checkpoint.load_model(light_checkpoint)  # any trained world model: the light LiDAR-only one
    result = world_model_check.check(net, synthetic_windows, "all", batch_size=1)
    assert result.windows == len(torch_dataset.WindowDataset(synthetic_windows)) and result.failed_windows == 0
    assert set(result.iou) == set(world_model_check.SOURCES)
    for source in world_model_check.SOURCES:
        assert set(result.iou[source]) == set(categories.CLASSES)
        assert all(len(values) == net.config.occupancy_steps + 1 for values in result.iou[source].values())
    vehicle = categories.CLASSES[0]
    # At t0 all four decode the same latent z_t0 as the present.
    at_t0 = {result.iou[source][vehicle][0] for source in world_model_check.SOURCES}
    assert len(at_t0) == 1
    # The rollout's IoU is the IoU of the model's own occupancy output on the same windows.
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    batch = torch_dataset.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = net.eval()(batch).occupancy_logits
    intersection, union = metrics.iou_counts(torch.sigmoid(logits).numpy() >= 0.5, batch.occupancy.numpy())
    expected = metrics.iou(intersection.sum(0)[:, 0], union.sum(0)[:, 0])
    np.testing.assert_allclose(result.iou["rollout"][vehicle], expected, rtol=1e-6)
    assert result.to_dict()["iou"] == result.iou
    # The flow's error and the motion it should explain, per class and horizon: both zero at t0, where nothing moved.
    for values in (result.flow_error_m, result.motion_m):
        assert set(values) == set(categories.CLASSES)
        assert all(
            len(v) == net.config.occupancy_steps + 1 and (math.isnan(v[0]) or v[0] == 0) for v in values.values()
        )
    assert any(v > 0 for v in result.motion_m[vehicle][1:]) and all(v >= 0 for v in result.flow_error_m[vehicle][1:])
    ratio = result.ratio("rollout", "held", vehicle, 0)
    assert math.isnan(ratio) or ratio == pytest.approx(1.0)


def test_the_direct_baseline_is_refused_and_a_broken_window_is_left_out(
    light_checkpoint, tiny_direct_checkpoint, synthetic_windows, tmp_path
):
    _, direct = checkpoint.load_model(tiny_direct_checkpoint)
    with pytest.raises(ValueError, match="direct baseline"):
        world_model_check.check(direct, synthetic_windows, "all")
    windows = tmp_path / "windows"
    shutil.copytree(synthetic_windows, windows)
    first = torch_dataset.WindowDataset(windows).entries[0]["file"]
    (windows / first).write_bytes(b"not a window")
    _, net = checkpoint.load_model(light_checkpoint)
    result = world_model_check.check(net, windows, "all", batch_size=1)
    assert result.failed_windows == 1 and result.windows == len(torch_dataset.WindowDataset(windows)) - 1
