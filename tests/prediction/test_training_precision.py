"""Training under bfloat16 autocast (``TrainConfig.precision``): the geometry stays float32, the losses are taken in
float32, and a step of the whole model (cameras, LiDAR, the JEPA target) trains as a float32 step does."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from bevjepa.datasets import geometry, torch_dataset
from bevjepa.fusion import fuser
from bevjepa.prediction import config as experiment_config
from bevjepa.prediction import heads, model, train

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def test_the_geometry_context_keeps_products_in_float32_under_autocast():
    a, b = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    with torch.autocast(**BF16):
        assert (a @ b).dtype == torch.bfloat16  # what autocast does to a product
        with geometry.float32_geometry("cpu"):
            inside = a @ b
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, a @ b, rtol=0, atol=0)


def test_the_ego_motion_warp_is_exact_under_autocast():
    grid = experiment_config.small().model.fuser.grid
    latent = torch.randn(2, 4, *grid.shape)
    yaw = torch.tensor([0.3, -1.1])
    pose = torch.eye(4).repeat(2, 1, 1)
    pose[:, 0, 0], pose[:, 0, 1], pose[:, 1, 0], pose[:, 1, 1] = yaw.cos(), -yaw.sin(), yaw.sin(), yaw.cos()
    pose[:, :2, 3] = torch.tensor([[7.31, -3.17], [-12.9, 5.55]])
    plain = fuser.warp_to_reference(latent, pose, grid)
    with torch.autocast(**BF16):
        cast = fuser.warp_to_reference(latent, pose, grid)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)


def test_bfloat16_maps_are_sampled_and_warped_at_float32_coordinates():
    config = experiment_config.small().model
    coarse, fine = config.fuser.grid, config.grid
    z = torch.randn(1, 3, *coarse.shape).to(torch.bfloat16)
    xy = torch.tensor([[[29.87, -30.41], [0.13, 17.77], [-21.2, 3.3]]])  # far out: 0.25 m steps in bfloat16
    torch.testing.assert_close(heads.sample_bev(z, xy, coarse), heads.sample_bev(z.float(), xy, coarse))
    maps = torch.randn(2, 3, *fine.shape).to(torch.bfloat16)
    offset = torch.randn(2, 2, *coarse.shape) * 3.0
    warped = heads.warp_by_offset(maps, offset.to(torch.bfloat16), fine)
    assert warped.dtype == torch.float32
    expected = heads.warp_by_offset(maps.float(), offset.to(torch.bfloat16).float(), fine)
    torch.testing.assert_close(warped, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def both_sensors(light_config, synthetic_windows: Path):
    """``light_config`` on cameras and LiDAR with the JEPA target, and a batch with its future inputs."""
    config = dataclasses.replace(light_config, model=light_config.model.on_sensors("both"))
    assert config.train.weights.latent > 0
    dataset = torch_dataset.WindowDataset(synthetic_windows, future_inputs=True)
    return config, torch_dataset.collate([dataset[0], dataset[1]])


def _one_step(config: experiment_config.ExperimentConfig, batch, precision: str) -> tuple[dict, model.BevJepa, dict]:
    torch.manual_seed(0)
    net = model.BevJepa(config.model).train()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    settings = dataclasses.replace(config.train, precision=precision)
    torch.manual_seed(1)
    return train._train_step(net, net, batch, optimizer, settings, step=0), net, before


def test_a_bfloat16_step_trains_the_whole_model_as_a_float32_step_does(both_sensors):
    config, batch = both_sensors
    full, _, _ = _one_step(config, batch, "float32")
    half, net, before = _one_step(config, batch, "bfloat16")
    for name in ("total", "occupancy", "dice", "flow", "trajectory", "detection", "latent"):
        assert math.isfinite(half[name]) and half[name] == pytest.approx(full[name], rel=0.05), name
    assert half["grad_at_latent_occupancy"] > 0  # the gradient norms reach z_t0 through the bfloat16 heads
    changed = [name for name, p in net.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(name.startswith("encoder.camera.") for name in changed)
    assert any(name.startswith("encoder.lidar.") for name in changed)


def test_the_head_outputs_reach_the_losses_in_float32(both_sensors):
    config, batch = both_sensors
    torch.manual_seed(0)
    net = model.BevJepa(config.model).train()
    with torch.no_grad(), train.autocast("bfloat16", torch.device("cpu")):
        output = net(batch)
    assert output.occupancy_logits.dtype == torch.bfloat16
    cast = model.heads_in_float32(output)
    for name in ("rollout", "occupancy_logits", "modes", "mode_logits", "heatmap_logits", "regression", "flow"):
        assert getattr(cast, name).dtype == torch.float32, name
    assert cast.latent is output.latent  # where the gradient norms are taken
    plain = model.heads_in_float32(cast)
    assert plain is cast  # nothing left to cast


def test_an_unknown_precision_is_refused_and_a_resume_may_change_it():
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, got 'float16'"):
        experiment_config.TrainConfig(precision="float16")
    config = experiment_config.small()
    half = dataclasses.replace(config, train=dataclasses.replace(config.train, precision="bfloat16"))
    assert half.resume_hash() == config.resume_hash() and half.content_hash() != config.content_hash()
