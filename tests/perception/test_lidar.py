"""Tests of ``bevjepa.perception.lidar``: points land in the pillar ``GridSpec`` names; empty sweeps are zeros."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevjepa.datasets import geometry
from bevjepa.perception import lidar


@pytest.fixture(scope="module")
def encoder() -> lidar.LidarEncoder:
    torch.manual_seed(0)
    return lidar.LidarEncoder(lidar.LidarEncoderConfig()).eval()


def object_points(x: float, y: float, n: int = 12, seed: int = 0) -> torch.Tensor:
    """[n, 5] points of a small object around (x, y, 1 m): +-0.1 m in xy, +-0.5 m in z."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 5, generator=g)
    return torch.stack(
        [x + 0.2 * u[:, 0] - 0.1, y + 0.2 * u[:, 1] - 0.1, 0.5 + u[:, 2], 255 * u[:, 3], 0.5 * u[:, 4]], dim=1
    ).float()


def occupied_cells(pseudo_image: torch.Tensor) -> list[list[int]]:
    """[b, i, j] of every non-zero pillar of a [B, C, H, W] pseudo-image."""
    return pseudo_image.abs().sum(1).nonzero().tolist()


# ---------------------------------------------------------------------------------------------------------
# The acceptance test: one object lands in the pillar GridSpec names for it.


@pytest.mark.parametrize(("x", "y"), [(10.25, -7.75), (-20.3, 14.2), (0.25, 0.25), (31.8, -31.8), (-31.85, 31.85)])
def test_object_lands_in_the_cell_gridspec_names(encoder, x, y) -> None:
    grid = encoder.config.pillar_grid
    points = torch.cat([object_points(x, y), object_points(-x, -y, seed=1)])  # a second object in sample 1
    points_batch = torch.tensor([0] * 12 + [1] * 12)
    pseudo_image = encoder.pillar_features(points, points_batch, batch_size=2)
    assert pseudo_image.shape == (2, encoder.config.pseudo_image_channels, *grid.shape)
    assert encoder.config.pseudo_image_channels == encoder.config.pointnet_width + lidar.PILLAR_STATS

    rows, cols, inside = grid.xy_to_index(np.array([[x, y], [-x, -y]]))
    assert inside.all()
    assert occupied_cells(pseudo_image) == [[0, rows[0], cols[0]], [1, rows[1], cols[1]]]


def test_pillar_statistics_count_the_points_their_heights_and_intensity(encoder) -> None:
    points = torch.tensor(
        [
            [4.1, 2.1, 0.1, 100.0, 0.0],
            [4.2, 2.2, 1.5, 50.0, 0.0],
            [4.3, 2.1, 0.9, 0.0, 0.1],
            [-9.9, 3.1, 0.0, 255.0, 0.0],
        ]
    )
    stats = encoder.pillar_features(points, torch.zeros(4, dtype=torch.int64), 1)[0, -lidar.PILLAR_STATS :]
    rows, cols, _ = encoder.config.pillar_grid.xy_to_index(np.array([[4.2, 2.2], [-9.9, 3.1]]))
    torch.testing.assert_close(
        stats[:, rows[0], cols[0]],
        torch.tensor([math.log(4.0), 1.5 / 2.0, 150.0 / 255.0 / 3.0, math.log(3.0)]),
    )
    torch.testing.assert_close(stats[:, rows[1], cols[1]], torch.tensor([math.log(2.0), 0.0, 1.0, 0.0]))
    assert int((stats[0] > 0).sum()) == 2  # empty pillars stay zero


def test_pillar_features_depend_only_on_their_own_points(encoder) -> None:
    """Points in other pillars, or in other samples, change nothing in a pillar (the scatter mean is per pillar)."""
    grid = encoder.config.pillar_grid
    alone = encoder.pillar_features(object_points(5.2, 3.1), torch.zeros(12, dtype=torch.int64), 1)
    crowd = torch.cat([object_points(5.2, 3.1), object_points(5.9, 3.1, seed=2), object_points(5.2, 3.1, seed=3)])
    crowd_batch = torch.tensor([0] * 24 + [1] * 12)
    together = encoder.pillar_features(crowd, crowd_batch, 2)
    rows, cols, _ = grid.xy_to_index(np.array([[5.2, 3.1]]))
    torch.testing.assert_close(together[0, :, rows[0], cols[0]], alone[0, :, rows[0], cols[0]])


# ---------------------------------------------------------------------------------------------------------
# Dropped points, empty sweeps, shapes, gradients


def test_points_outside_the_grid_or_height_band_are_dropped(encoder) -> None:
    config = encoder.config
    outside = torch.tensor(
        [
            [32.0, 0.0, 1.0, 10.0, 0.0],  # x_max is exclusive
            [-32.01, 0.0, 1.0, 10.0, 0.0],
            [0.0, 40.0, 1.0, 10.0, 0.0],
            [3.0, 3.0, config.z_max_m, 10.0, 0.0],  # z_max is exclusive
            [3.0, 3.0, config.z_min_m - 0.1, 10.0, 0.0],
            [float("nan"), 3.0, 1.0, 10.0, 0.0],
        ]
    )
    batch = torch.zeros(len(outside), dtype=torch.int64)
    assert not encoder.pillar_features(outside, batch, 1).any()
    assert not encoder(outside, batch, 1).any()
    # Next to one kept point, the dropped ones still leave no trace.
    points = torch.cat([outside, object_points(-4.25, 2.25)])
    pseudo_image = encoder.pillar_features(points, torch.zeros(len(points), dtype=torch.int64), 1)
    rows, cols, _ = config.pillar_grid.xy_to_index(np.array([[-4.25, 2.25]]))
    assert occupied_cells(pseudo_image) == [[0, rows[0], cols[0]]]


@pytest.mark.parametrize("fine_width", [0, 8])
@pytest.mark.parametrize("train", [False, True])
def test_empty_sweep_gives_zeros(train, fine_width) -> None:
    torch.manual_seed(0)
    encoder = lidar.LidarEncoder(lidar.LidarEncoderConfig(fine_width=fine_width)).train(train)
    levels = encoder.pyramid(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), batch_size=2)
    assert levels[0].shape == (2, fine_width or 36, 128, 128) and levels[-1].shape == (2, 64, 32, 32)
    assert not any(level.any() for level in levels)  # the fine stage's batch norm adds no offset either


def test_sample_with_an_empty_sweep_gives_zeros_next_to_a_full_one(encoder) -> None:
    points = object_points(3.0, -3.0, n=50)
    out = encoder(points, torch.ones(50, dtype=torch.int64), batch_size=2)
    assert not out[0].any()
    assert out[1].abs().sum() > 0


def test_output_shape_and_gradients() -> None:
    torch.manual_seed(0)
    encoder = lidar.LidarEncoder(lidar.LidarEncoderConfig()).train()
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5000, 5, generator=g)
    points = torch.stack([u[:, 0] * 80 - 40, u[:, 1] * 80 - 40, u[:, 2] * 6 - 2.5, u[:, 3] * 255, u[:, 4] * 0.5], 1)
    points_batch = torch.randint(0, 3, (5000,), generator=g)
    out = encoder(points, points_batch, batch_size=3)
    assert out.shape == (3, 64, 32, 32) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    grad = encoder.pointnet[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bad_inputs_are_named(encoder) -> None:
    points = object_points(1.0, 1.0)
    with pytest.raises(ValueError, match="points_batch"):
        encoder(points, torch.full((12,), 2, dtype=torch.int64), batch_size=2)
    with pytest.raises(ValueError, match="points"):
        encoder(points[:, :4], torch.zeros(12, dtype=torch.int64), batch_size=1)
    with pytest.raises(ValueError, match="fine_width must be >= 0"):
        lidar.LidarEncoderConfig(fine_width=-1)
    with pytest.raises(ValueError, match="power-of-two"):
        lidar.LidarEncoderConfig(
            pillar_grid=geometry.GridSpec(-24.0, 24.0, -24.0, 24.0, 0.5),
            out_grid=geometry.GridSpec(-24.0, 24.0, -24.0, 24.0, 1.5),
        )


# ---------------------------------------------------------------------------------------------------------
# The torch index of GridSpec


def test_flat_index_torch_agrees_with_xy_to_index() -> None:
    grid = geometry.GridSpec()
    h, w = grid.shape
    rng = np.random.default_rng(0)
    xy = np.concatenate(
        [
            rng.uniform(-40, 40, size=(2000, 2)),
            grid.cell_centers().reshape(-1, 2)[:50],
            [[-32.0, -32.0], [31.75, 31.75], [32.0, 0.0], [0.0, -32.0], [np.nan, 0.0], [np.inf, 1.0]],
        ]
    )
    rows, cols, inside = grid.xy_to_index(xy)
    flat, inside_t = grid.flat_index_torch(torch.from_numpy(xy[:, 0]), torch.from_numpy(xy[:, 1]))
    assert flat.dtype == torch.int64 and inside_t.dtype == torch.bool
    np.testing.assert_array_equal(inside_t.numpy(), inside)
    np.testing.assert_array_equal(flat.numpy()[inside], (rows * w + cols)[inside])
    assert ((flat >= 0) & (flat < h * w)).all()  # in range even where outside, so it can index safely
