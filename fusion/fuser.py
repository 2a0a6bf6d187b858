"""BEV fusion: camera and LiDAR features into one latent, modality dropout, and past latents warped into t0.

Notation:
    B  batch       C  channels       H, W  latent rows (along +x) and columns (along +y), ``GridSpec`` layout
    P  past frames (t0 last)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bevjepa.datasets import geometry


def latent_grid() -> geometry.GridSpec:
    """The latent grid of the ``small`` preset: ±32 m at 2 m (32 × 32), stride 4 of the 0.5 m target grid."""
    return geometry.GridSpec(-32.0, 32.0, -32.0, 32.0, 2.0)


@dataclass(frozen=True)
class FuserConfig:
    """The fuser.

    Attributes:
        camera_channels: channels of the camera BEV features.
        lidar_channels: channels of the LiDAR BEV features.
        channels: channels of the fused latent.
        past_frames: P, the frames the temporal fuser combines (t0 included).
        modality_dropout: in training, the chance that a sample loses one of its two modalities (either with
            equal odds), so that each sensor alone still works.
        grid: the latent grid (both inputs and the output live on it).
    """

    camera_channels: int = 64
    lidar_channels: int = 64
    channels: int = 64
    past_frames: int = 3
    modality_dropout: float = 0.2
    grid: geometry.GridSpec = field(default_factory=latent_grid)

    def __post_init__(self) -> None:
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"FuserConfig.modality_dropout must be in [0, 1), got {self.modality_dropout}")


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BevFuser(nn.Module):
    """Concatenate camera and LiDAR BEV features and convolve; a missing modality is zeros."""

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        self.config = config
        self.fuse = nn.Sequential(
            _conv_block(config.camera_channels + config.lidar_channels, config.channels),
            nn.Conv2d(config.channels, config.channels, 3, padding=1),
        )

    def forward(self, camera: torch.Tensor | None, lidar: torch.Tensor | None) -> torch.Tensor:
        """Fuse one frame's features (modality dropout is the caller's: ``drop_modalities``).

        Args:
            camera: [B, Cc, H, W] camera BEV features, or None when there are no cameras.
            lidar: [B, Cl, H, W] LiDAR BEV features, or None.

        Returns:
            [B, C, H, W] the fused latent.
        """
        reference = camera if camera is not None else lidar
        if reference is None:
            raise ValueError("BevFuser needs at least one modality")
        b, _, h, w = reference.shape
        if camera is None:
            camera = reference.new_zeros(b, self.config.camera_channels, h, w)
        if lidar is None:
            lidar = reference.new_zeros(b, self.config.lidar_channels, h, w)
        return self.fuse(torch.cat([camera, lidar], dim=1))  # [B, C, H, W]


def drop_modalities(
    samples: int, probability: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality dropout: which samples keep their camera and their LiDAR features.

    Each sample loses one of its two modalities with chance ``probability`` (either with equal odds), so that each
    sensor alone still works; never both.

    Returns:
        keep_camera: [samples] float, 1 or 0.
        keep_lidar: [samples] float, 1 or 0.
    """
    drop = torch.rand(samples, device=device) < probability  # [B]
    drop_camera = drop & (torch.rand(samples, device=device) < 0.5)
    drop_lidar = drop & ~drop_camera
    return (~drop_camera).float(), (~drop_lidar).float()


def warp_to_reference(
    latent: torch.Tensor, reference_from_frame: torch.Tensor, grid: geometry.GridSpec
) -> torch.Tensor:
    """Resample BEV maps expressed in their own ego frames into a reference ego frame (the ego-motion warp).

    Each output cell centre (x, y) of the reference frame reads the input at ``frame_from_reference @ (x, y)``
    (bilinear; zeros outside the input's extent).

    Args:
        latent: [B, C, H, W] maps, each in its own frame, on ``grid``.
        reference_from_frame: [B, 4, 4] each map's frame in the reference frame (only the planar part is used).
        grid: the grid of both input and output.

    Returns:
        [B, C, H, W] the maps in the reference frame, float32 at least (a bfloat16 input under autocast too).
    """
    b = latent.shape[0]
    latent = latent.to(torch.promote_types(latent.dtype, torch.float32))
    centers = torch.as_tensor(grid.cell_centers(), dtype=latent.dtype, device=latent.device)  # [H, W, 2]
    h, w, _ = centers.shape
    frame_from_reference = torch.linalg.inv(reference_from_frame.to(latent.dtype))  # [B, 4, 4]
    rotation, translation = frame_from_reference[:, :2, :2], frame_from_reference[:, :2, 3]  # [B, 2, 2], [B, 2]
    with geometry.float32_geometry(latent.device.type):
        source = torch.einsum("bij,hwj->bhwi", rotation, centers) + translation[:, None, None, :]  # [B, H, W, 2]
    sampling = grid.sampling_coords_torch(source)  # [B, H, W, 2] (column, row)
    assert sampling.shape == (b, h, w, 2)
    return F.grid_sample(latent, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)


class TemporalFuser(nn.Module):
    """Combine P latents already warped into the reference frame (oldest first) into one.

    The frames are concatenated and mixed by 3 x 3 convolutions of growing dilation (1, 2, 4): each output cell
    sees ±7 cells (±14 m on the 2 m grid) of every frame, so a car that moved 10 m over the past second is still
    in view of where it is now, and its motion can be read.
    """

    DILATIONS = (1, 2, 4)

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [_conv_block(c * config.past_frames, c)]
        for dilation in self.DILATIONS[1:]:
            layers += [
                nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(c, c, 3, padding=1))
        self.mix = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, P, C, H, W] → [B, C, H, W]; the newest latent passes through a residual path."""
        b, p, c, h, w = latents.shape
        if p != self.config.past_frames:
            raise ValueError(f"TemporalFuser expects {self.config.past_frames} frames, got {p}")
        return latents[:, -1] + self.mix(latents.reshape(b, p * c, h, w))  # [B, C, H, W]
