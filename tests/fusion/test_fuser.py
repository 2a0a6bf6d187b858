"""Fusion: the ego-motion warp lands cells where GridSpec says, modality dropout, temporal fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bevjepa.datasets import geometry
from bevjepa.fusion import fuser

GRID = fuser.latent_grid()


def _hot(x: float, y: float) -> torch.Tensor:
    latent = torch.zeros(1, 1, *GRID.shape)
    rows, cols, _ = GRID.xy_to_index(np.array([[x, y]]))
    latent[0, 0, rows[0], cols[0]] = 1.0
    return latent


@pytest.mark.parametrize(
    ("pose", "point", "expected"),
    [
        ((0.0, 0.0, 0.0), (9.0, 5.0), (9.0, 5.0)),
        ((4.0, -2.0, 0.0), (9.0, 5.0), (13.0, 3.0)),
        ((0.0, 0.0, np.pi / 2), (9.0, 5.0), (-5.0, 9.0)),
        ((2.0, 6.0, -np.pi / 2), (-3.0, 11.0), (13.0, 9.0)),
    ],
)
def test_warp_moves_a_cell_to_where_the_pose_sends_it(pose, point, expected):
    reference_from_frame = torch.as_tensor(geometry.RigidTransform.from_pose_2d(*pose).matrix, dtype=torch.float32)
    warped = fuser.warp_to_reference(_hot(*point), reference_from_frame[None], GRID)
    rows, cols, _ = GRID.xy_to_index(np.array([expected]))
    peak = np.unravel_index(int(warped[0, 0].argmax()), GRID.shape)
    assert peak == (rows[0], cols[0])
    assert float(warped[0, 0].max()) > 0.99


def test_modality_dropout_drops_at_most_one_sensor():
    torch.manual_seed(0)
    keep_camera, keep_lidar = fuser.drop_modalities(4096, 0.9)
    assert set(keep_camera.unique().tolist()) == {0.0, 1.0} and set(keep_lidar.unique().tolist()) == {0.0, 1.0}
    assert ((keep_camera + keep_lidar) >= 1).all()  # never both
    assert abs(float((keep_camera + keep_lidar == 1).float().mean()) - 0.9) < 0.03
    none_dropped = fuser.drop_modalities(64, 0.0)
    assert all(bool((keep == 1).all()) for keep in none_dropped)


def test_a_missing_modality_is_zeros_and_temporal_fusion_checks_frames():
    net = fuser.BevFuser(fuser.FuserConfig()).eval()
    assert net(None, torch.randn(2, 64, 32, 32)).shape == (2, 64, 32, 32)
    with pytest.raises(ValueError, match="at least one modality"):
        net(None, None)
    temporal = fuser.TemporalFuser(fuser.FuserConfig())
    assert temporal(torch.randn(2, 3, 64, 32, 32)).shape == (2, 64, 32, 32)
    with pytest.raises(ValueError, match="expects 3 frames"):
        temporal(torch.randn(2, 2, 64, 32, 32))
