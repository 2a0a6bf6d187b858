"""LiDAR encoder: dynamic pillars (PointPillars without a cap on points per pillar) to a BEV latent.

Read top to bottom in ``LidarEncoder.forward``:

1. **Pillars.** Each point falls into the cell of ``pillar_grid`` that ``GridSpec`` names; points outside the
   grid or the height band are dropped. Cells are flattened per batch as ``b * H * W + i * W + j``.
2. **Point features.** x, y, z, intensity / 255, time lag, the offset from the mean of its pillar's points
   (a scatter mean) and the offset from the pillar's centre: 10 numbers per point.
3. **PointNet.** Linear-LayerNorm-ReLU twice, shared by all points (LayerNorm, not BatchNorm: any number of
   points, even one, trains the same).
4. **Pool and scatter.** Max over each pillar's points with ``scatter_reduce_(..., "amax")`` straight into the
   flat [B * H * W, C] pseudo-image; empty pillars stay zero. Four pillar statistics (``PILLAR_STATS``) join them.
5. **Backbone.** With ``fine_width``, a stage of two 3x3 conv-BN-ReLU blocks at the pillar resolution (shapes are
   read where the points are, before any downsampling); then per factor 2 between ``pillar_grid`` and
   ``out_grid`` a stage of two 3x3 conv-BN-ReLU blocks, the first with stride 2; then a 1x1 convolution.

Notation:
    M  points (all samples of the batch together)
    B  batch
    H, W  pillar-grid rows (along +x) and columns (along +y)
    F  point-feature width (10)
    P  PointNet width (``pointnet_width``); the pseudo-image has P + 4 channels (the pillar statistics)
    C  channels of the latent
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bevjepa.datasets import geometry

PILLAR_STATS = 4
"""Statistics appended to each pillar's learnt features: log(1 + points), highest z / 2 m, mean intensity / 255,
log(1 + points above ``OBSTACLE_HEIGHT_M``)."""
OBSTACLE_HEIGHT_M = 0.3
"""Points above this height (m, ego frame) are counted as standing above the road."""

POINT_FEATURES = 10
"""F: x, y, z, intensity / 255, lag, offset from the pillar mean (3), offset from the pillar centre (2)."""


@dataclass(frozen=True)
class LidarEncoderConfig:
    """Configuration of ``LidarEncoder``.

    Attributes:
        channels: C, channels of the output latent.
        pillar_grid: the grid of pillars (the pseudo-image).
        out_grid: the latent grid; same extent as ``pillar_grid``, a power-of-two multiple of its resolution.
        z_min_m: lowest height (m, BEV frame) of a kept point.
        z_max_m: height (m, BEV frame) from which points are dropped.
        pointnet_width: channels of the per-point PointNet (the pseudo-image adds ``PILLAR_STATS``).
        fine_width: channels of the stage at the pillar resolution (0: none, the pseudo-image goes straight to
            the first stride-2 stage and is the pyramid's finest map).
    """

    channels: int = 64
    pillar_grid: geometry.GridSpec = geometry.GridSpec()
    out_grid: geometry.GridSpec = geometry.GridSpec(-32.0, 32.0, -32.0, 32.0, 2.0)
    z_min_m: float = -3.0
    z_max_m: float = 5.0
    pointnet_width: int = 32
    fine_width: int = 0

    def __post_init__(self) -> None:
        if self.fine_width < 0:
            raise ValueError(f"LidarEncoderConfig: fine_width must be >= 0, got {self.fine_width}")
        if self.channels < 1 or self.pointnet_width < 1:
            raise ValueError(
                f"LidarEncoderConfig: channels ({self.channels}) and pointnet_width ({self.pointnet_width}) "
                "must be positive"
            )
        if not self.z_min_m < self.z_max_m:
            raise ValueError(f"LidarEncoderConfig: need z_min_m < z_max_m, got {self.z_min_m}, {self.z_max_m}")
        p, o = self.pillar_grid, self.out_grid
        if (p.x_min_m, p.x_max_m, p.y_min_m, p.y_max_m) != (o.x_min_m, o.x_max_m, o.y_min_m, o.y_max_m):
            raise ValueError(f"LidarEncoderConfig: pillar_grid {p} and out_grid {o} must cover the same extent")
        ratio = round(o.resolution_m / p.resolution_m)
        if abs(o.resolution_m / p.resolution_m - ratio) > 1e-6 or ratio < 1 or ratio & (ratio - 1):
            raise ValueError(
                f"LidarEncoderConfig: out_grid.resolution_m ({o.resolution_m}) must be a power-of-two multiple of "
                f"pillar_grid.resolution_m ({p.resolution_m})"
            )

    @property
    def pseudo_image_channels(self) -> int:
        """Channels of the pseudo-image: the PointNet's features and the pillar statistics (``PILLAR_STATS``)."""
        return self.pointnet_width + PILLAR_STATS

    @property
    def fine_channels(self) -> int:
        """Channels of the pyramid's finest map (``pyramid``): the fine stage's, or the pseudo-image's."""
        return self.fine_width or self.pseudo_image_channels

    @property
    def stride(self) -> int:
        """Pillars per latent cell along each axis."""
        return round(self.out_grid.resolution_m / self.pillar_grid.resolution_m)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A 3x3 convolution (padding 1), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class LidarEncoder(nn.Module):
    """A LiDAR sweep (points in the BEV frame) to a BEV latent by dynamic pillars (see the module docstring)."""

    def __init__(self, config: LidarEncoderConfig) -> None:
        super().__init__()
        self.config = config
        P, C = config.pointnet_width, config.channels
        self.pointnet = nn.Sequential(
            nn.Linear(POINT_FEATURES, P),
            nn.LayerNorm(P),
            nn.ReLU(inplace=True),
            nn.Linear(P, P),
            nn.LayerNorm(P),
            nn.ReLU(inplace=True),
        )
        self.fine = (
            nn.Sequential(
                _conv_bn_relu(config.pseudo_image_channels, config.fine_width, stride=1),
                _conv_bn_relu(config.fine_width, config.fine_width, stride=1),
            )
            if config.fine_width
            else nn.Identity()
        )
        blocks, in_channels = [], config.fine_channels
        for _ in range(int(math.log2(config.stride))):  # one stage per factor 2: [B, C, H/2^k, W/2^k]
            blocks += [_conv_bn_relu(in_channels, C, stride=2), _conv_bn_relu(C, C, stride=1)]
            in_channels = C
        if not blocks:  # out_grid == pillar_grid
            blocks = [_conv_bn_relu(config.fine_channels, C, stride=1)]
        self.backbone = nn.Sequential(*blocks, nn.Conv2d(C, C, kernel_size=1))
        h, w = config.pillar_grid.shape
        centers = torch.from_numpy(config.pillar_grid.cell_centers().reshape(h * w, 2)).float()  # [H*W, 2]
        self.register_buffer("pillar_centers_m", centers, persistent=False)

    def pillar_features(self, points: torch.Tensor, points_batch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The pseudo-image: PointNet features max-pooled per pillar, before the backbone.

        Args: as ``forward``.

        Returns:
            [B, pointnet_width + PILLAR_STATS, H, W] float — zero in pillars without a kept point.
        """
        return self._pillars(points, points_batch, batch_size)[0]

    def _pillars(
        self, points: torch.Tensor, points_batch: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pillar_features`` and [B] bool: whether each sample kept at least one point."""
        if points.ndim != 2 or points.shape[1] != 5:
            raise ValueError(f"points: expected shape [M, 5], got {tuple(points.shape)}")
        if points_batch.shape != points.shape[:1]:
            raise ValueError(f"points_batch: expected shape {tuple(points.shape[:1])}, got {tuple(points_batch.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        if points_batch.numel() and (int(points_batch.min()) < 0 or int(points_batch.max()) >= batch_size):
            raise ValueError(f"points_batch: values must lie in [0, {batch_size}), the batch size")
        grid = self.config.pillar_grid
        H, W = grid.shape
        P = self.config.pointnet_width
        points = points.to(self.pillar_centers_m.dtype)

        # Pillars: flat cell per point, dropping points outside the grid or the height band.
        cell, inside = grid.flat_index_torch(points[:, 0], points[:, 1])  # [M] each
        z = points[:, 2]  # [M]
        kept = (inside & (z >= self.config.z_min_m) & (z < self.config.z_max_m)).nonzero().squeeze(1)  # [M']
        points, cell = points[kept], cell[kept]  # [M', 5], [M']
        flat = points_batch[kept].long() * (H * W) + cell  # [M']

        # Point features: raw values, offset from the pillar's point mean, offset from the pillar centre.
        xyz = points[:, :3]  # [M', 3]
        sums = xyz.new_zeros(batch_size * H * W, 3).index_add_(0, flat, xyz)  # [B*H*W, 3]
        counts = torch.bincount(flat, minlength=batch_size * H * W)  # [B*H*W]
        filled_counts = counts.clamp(min=1)
        mean = sums[flat] / filled_counts[flat, None].to(xyz.dtype)  # [M', 3]
        center = self.pillar_centers_m[cell]  # [M', 2]
        per_point = torch.cat(
            [xyz, points[:, 3:4] / 255.0, points[:, 4:5], xyz - mean, xyz[:, :2] - center], dim=1
        )  # [M', F]
        with geometry.float32_geometry(per_point.device.type):  # raw metres: 0.25 m steps at 30 m in bfloat16
            per_point = self.pointnet(per_point)  # [M', P]

        # Max-pool per pillar into the flat pseudo-image; empty pillars keep their zero.
        pooled = per_point.new_zeros(batch_size * H * W, P).scatter_reduce_(
            0, flat[:, None].expand(-1, P), per_point, reduce="amax", include_self=False
        )  # [B*H*W, P]
        # Pillar statistics beside the learnt features: well-scaled from the first step, whatever the PointNet knows.
        filled = counts > 0
        raw = torch.bincount(flat, minlength=batch_size * H * W).to(xyz.dtype)  # [B*H*W]
        top = xyz.new_zeros(batch_size * H * W).scatter_reduce_(0, flat, z[kept], reduce="amax", include_self=False)
        intensity = xyz.new_zeros(batch_size * H * W).index_add_(0, flat, points[:, 3] / 255.0)
        above = torch.bincount(flat, weights=(z[kept] > OBSTACLE_HEIGHT_M).to(xyz.dtype), minlength=batch_size * H * W)
        stats = torch.stack(
            [torch.log1p(raw), top * filled / 2.0, intensity / raw.clamp(min=1), torch.log1p(above.to(xyz.dtype))],
            dim=1,
        )  # [B*H*W, PILLAR_STATS]
        pooled = torch.cat([pooled, stats], dim=1)  # [B*H*W, P + PILLAR_STATS]
        occupied = torch.bincount(points_batch[kept].long(), minlength=batch_size) > 0  # [B]
        channels = P + PILLAR_STATS
        return pooled.view(batch_size, H, W, channels).permute(0, 3, 1, 2), occupied  # [B, P + 4, H, W], [B]

    def forward(self, points: torch.Tensor, points_batch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Encode LiDAR sweeps into the BEV latent.

        Args:
            points: [M, 5] float — x, y, z (m, in the BEV frame), intensity (0-255), time lag (s); M may be 0.
            points_batch: [M] int64 — the sample of each point, in ``[0, batch_size)``.
            batch_size: B.

        Returns:
            [B, channels, *out_grid.shape] float — the BEV latent (rows along +x, columns along +y); zero for a
            sample without a point inside the grid (an empty sweep).
        """
        return self.pyramid(points, points_batch, batch_size)[-1]

    def pyramid(self, points: torch.Tensor, points_batch: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """The BEV features at every resolution, finest first: the pseudo-image, each stage's output, the latent.

        Args: as ``forward``.

        Returns:
            ``[fine [B, fine_channels, H, W], stage_1 [B, C, H/2, W/2], ..., latent [B, C, *out_grid.shape]]``: the
            fine stage's output (the pseudo-image without one) on ``pillar_grid``, each stride-2 stage's output, then
            ``forward``'s latent; all zero for a sample without a point inside the grid.
        """
        pseudo_image, occupied = self._pillars(points, points_batch, batch_size)  # [B, P + 4, H, W], [B]
        keep = occupied.to(pseudo_image.dtype)[:, None, None, None]
        x = self.fine(pseudo_image) * keep  # [B, fine_channels, H, W]
        levels = [x]
        blocks = list(self.backbone)
        for index, block in enumerate(blocks):
            x = block(x)
            if index % 2 == 1 and index < len(blocks) - 2:  # the end of a stage before the last one
                levels.append(x * keep)
        levels.append(x * keep)  # [B, C, *out_grid.shape]
        return levels
