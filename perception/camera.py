"""Camera encoder: a small image backbone and the Lift-Splat view transform into the bird's-eye view.

Lift-Splat (Philion & Fidler, ECCV 2020), read top to bottom in ``CameraEncoder.forward``:

1. **Backbone.** Each camera image goes through a few strided conv-BN-ReLU blocks to ``feature_stride``.
2. **Lift.** A 1x1 head gives, per feature pixel, ``D`` depth logits and ``C`` context features; the outer
   product ``softmax(depth) x features`` places the features along the pixel's ray, weighted by depth.
3. **Splat.** Every (pixel, depth) frustum point ``d * K^-1 [u, v, 1]`` (camera frame, depth along z) is moved
   into the BEV frame by ``ego_from_camera`` and sum-pooled into the cell of ``splat_grid`` that ``GridSpec``
   names; points outside the grid (or its height band) and points of missing cameras contribute nothing.
   Where a point lands depends on the calibration alone, so (BEVPoolv2's idea, in plain torch) the landing
   cells are computed once per camera rig and kept as a sparse cells x pixels matrix (``SplatIndex``); the
   splat is then that matrix, holding the depth probabilities, times the pixels' features, and the
   [P, C] outer product of the paper is never built.
4. **BEV block.** A few convolutions, one with stride ``out_grid.resolution / splat_grid.resolution``, take
   the splat to the latent grid.

Notation:
    B  batch
    N  cameras per sample
    H, W  image rows and columns (pixels)
    h, w  feature rows and columns (``ceil(H / stride)``, ``ceil(W / stride)``)
    D  depth bins
    C  channels
    P  frustum points (``B * N * D * h * w``)
    K  kept frustum points (inside the grid and its height band, of a present camera)
    U  (cell, feature pixel) pairs that at least one kept point joins
    X, Y  splat-grid rows (along +x) and columns (along +y); the latent grid is ``out_grid.shape``
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from bevjepa.datasets import geometry

IMAGE_MEAN = 0.5
"""Image normalisation: ``(pixel / 255 - IMAGE_MEAN) / IMAGE_STD``."""
IMAGE_STD = 0.25
SPLAT_INDEX_CACHE_SIZE = 32
"""Camera rigs (one sample's intrinsics, poses and camera mask) whose ``SplatIndex`` a ``CameraEncoder`` keeps."""


@dataclass(frozen=True)
class CameraEncoderConfig:
    """Configuration of ``CameraEncoder``.

    Attributes:
        channels: C, context-feature channels of the lift and of the output latent.
        depth_min_m: nearest depth bin (m, along the camera's optical axis).
        depth_max_m: end of the depth range (m, exclusive): bins at ``depth_min_m + k * depth_step_m < max``.
        depth_step_m: spacing of the depth bins (m); the defaults give 41 bins, 4 .. 44 m, as Lift-Splat.
        feature_stride: image pixels per feature pixel; a power of two (one stride-2 block per factor 2).
        splat_grid: the BEV grid the frustum points are pooled into.
        out_grid: the latent grid; same extent as ``splat_grid``, a whole multiple of its resolution.
        backbone_width: channels of the first backbone block; each stride-2 block doubles them.
        z_min_m: lowest height (m, BEV frame) of a frustum point that is pooled, as Lift-Splat's z bound.
        z_max_m: height (m, BEV frame) from which frustum points are dropped.
    """

    channels: int = 64
    depth_min_m: float = 4.0
    depth_max_m: float = 45.0
    depth_step_m: float = 1.0
    feature_stride: int = 8
    splat_grid: geometry.GridSpec = geometry.GridSpec(-32.0, 32.0, -32.0, 32.0, 1.0)
    out_grid: geometry.GridSpec = geometry.GridSpec(-32.0, 32.0, -32.0, 32.0, 2.0)
    backbone_width: int = 32
    z_min_m: float = -10.0
    z_max_m: float = 10.0

    def __post_init__(self) -> None:
        if self.channels < 1 or self.backbone_width < 1:
            raise ValueError(
                f"CameraEncoderConfig: channels ({self.channels}) and backbone_width ({self.backbone_width}) "
                "must be positive"
            )
        if not (0 < self.depth_min_m < self.depth_max_m and self.depth_step_m > 0):
            raise ValueError(
                "CameraEncoderConfig: need 0 < depth_min_m < depth_max_m and depth_step_m > 0, got "
                f"{self.depth_min_m}, {self.depth_max_m}, {self.depth_step_m}"
            )
        bins = (self.depth_max_m - self.depth_min_m) / self.depth_step_m
        if abs(bins - round(bins)) > 1e-6:
            raise ValueError(
                f"CameraEncoderConfig: the depth range [{self.depth_min_m}, {self.depth_max_m}) must be a whole "
                f"number of {self.depth_step_m} m steps"
            )
        if self.feature_stride < 2 or self.feature_stride & (self.feature_stride - 1):
            raise ValueError(
                f"CameraEncoderConfig.feature_stride must be a power of two >= 2, got {self.feature_stride}"
            )
        if not self.z_min_m < self.z_max_m:
            raise ValueError(f"CameraEncoderConfig: need z_min_m < z_max_m, got {self.z_min_m}, {self.z_max_m}")
        s, o = self.splat_grid, self.out_grid
        if (s.x_min_m, s.x_max_m, s.y_min_m, s.y_max_m) != (o.x_min_m, o.x_max_m, o.y_min_m, o.y_max_m):
            raise ValueError(f"CameraEncoderConfig: splat_grid {s} and out_grid {o} must cover the same extent")
        ratio = o.resolution_m / s.resolution_m
        if ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(
                f"CameraEncoderConfig: out_grid.resolution_m ({o.resolution_m}) must be a whole multiple of "
                f"splat_grid.resolution_m ({s.resolution_m})"
            )

    @property
    def depth_bins(self) -> int:
        """D, the number of depth bins."""
        return round((self.depth_max_m - self.depth_min_m) / self.depth_step_m)

    @property
    def bev_stride(self) -> int:
        """Splat cells per latent cell along each axis."""
        return round(self.out_grid.resolution_m / self.splat_grid.resolution_m)


def lift_splat_pool(features: torch.Tensor, flat_index: torch.Tensor, inside: torch.Tensor, cells: int) -> torch.Tensor:
    """Sum-pool frustum-point features into flat BEV cells: the splat of Lift-Splat.

    One ``index_add_`` over the kept points: on CPU it beats the sort + cumsum "QuickCumsum" of the paper
    (which pays for the sort and a [P, C] cumsum) and its backward is a plain ``index_select``.

    Args:
        features: [P, C] float — features of the frustum points.
        flat_index: [P] int64 — flat cell of each point (``b * X * Y + i * Y + j``), any value where not inside.
        inside: [P] bool — False for points that contribute nothing (outside the grid, missing camera).
        cells: number of flat cells (``B * X * Y``).

    Returns:
        [cells, C] float — per-cell sums; zero where no point landed.
    """
    kept = inside.nonzero().squeeze(1)  # [P']
    pooled = features.new_zeros(cells, features.shape[1])  # [cells, C]
    return pooled.index_add_(0, flat_index.index_select(0, kept), features.index_select(0, kept))


def naive_scatter_pool(
    features: torch.Tensor, flat_index: torch.Tensor, inside: torch.Tensor, cells: int
) -> torch.Tensor:
    """The same sums as ``lift_splat_pool``, written the straightforward way: a baseline for the benchmark.

    Zero the features of dropped points and ``scatter_add_`` every point with its index broadcast over the
    channels (``torch_scatter.scatter_sum``'s recipe, here in core torch): no compaction, and an index per
    element rather than per row.

    Args and Returns: as ``lift_splat_pool``.
    """
    P, C = features.shape
    index = torch.where(inside, flat_index, 0)[:, None].expand(P, C)  # [P, C]
    values = features * inside[:, None].to(features.dtype)  # [P, C]
    return features.new_zeros(cells, C).scatter_add_(0, index, values)


@dataclass(frozen=True)
class SplatIndex:
    """Where the frustum points of a camera rig land in the splat grid, as a sparse cells x pixels matrix.

    It depends on the calibration and the feature size only, never on the images, so it is built once per rig
    (``CameraEncoder`` caches it) and reused. Row ``cell`` of the matrix holds, at column ``pixel``, the summed
    depth probability of the pixel's depth bins whose points land in ``cell``; the splat is the matrix times the
    pixels' features. Pairs are sorted by cell (CSR), so that ``torch.sparse_csr_tensor`` takes them as they are.

    Fields (one sample, or a batch after ``concatenate``; cells and pixels are then flat over the batch):
        crow_indices: [cells + 1] int64 — CSR row pointers: the pairs of cell ``r`` are ``crow[r]:crow[r + 1]``.
        col_indices: [U] int64 — each pair's feature pixel, flat ``(n * h + v) * w + u`` (plus ``b * N * h * w``).
        point_index: [K] int64 — each kept point, flat in the depth probabilities ``[N, D, h, w]`` (plus
            ``b * N * D * h * w``).
        pair_index: [K] int64 — the pair (position in ``col_indices``) each kept point adds its probability to.
        pixels: number of feature pixels, the matrix's columns (``N * h * w`` per sample).
        points: number of frustum points, kept or not (``N * D * h * w`` per sample).
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    point_index: torch.Tensor
    pair_index: torch.Tensor
    pixels: int
    points: int

    def __post_init__(self) -> None:
        if self.col_indices.ndim != 1 or int(self.crow_indices[-1]) != self.col_indices.shape[0]:
            raise ValueError(
                f"col_indices: expected [{int(self.crow_indices[-1])}] (crow_indices[-1]), "
                f"got {tuple(self.col_indices.shape)}"
            )
        if self.pair_index.shape != self.point_index.shape:
            raise ValueError(
                f"pair_index: expected shape {tuple(self.point_index.shape)}, got {tuple(self.pair_index.shape)}"
            )

    @property
    def cells(self) -> int:
        """Rows of the matrix: the flat cells."""
        return self.crow_indices.shape[0] - 1

    @staticmethod
    def build(cell: torch.Tensor, keep: torch.Tensor, cells: int, pixels: int) -> SplatIndex:
        """The index of one rig from where its frustum points land.

        Args:
            cell: [N, D, h, w] int64 — flat splat cell of each frustum point (any value where not kept).
            keep: [N, D, h, w] bool — points that contribute (inside the grid and height band, camera present).
            cells: flat cells of the grid (``X * Y``).
            pixels: ``N * h * w``.
        """
        N, D, h, w = cell.shape
        point_index = keep.reshape(-1).nonzero().squeeze(1)  # [K]
        n, pixel = point_index // (D * h * w), point_index % (h * w)  # [K] each
        pair_key = cell.reshape(-1)[point_index] * pixels + n * (h * w) + pixel  # [K]: sorts by cell, then pixel
        pairs, pair_index = torch.unique(pair_key, sorted=True, return_inverse=True)  # [U], [K]
        counts = torch.bincount(pairs // pixels, minlength=cells)  # [cells]
        crow_indices = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [cells + 1]
        return SplatIndex(crow_indices, pairs % pixels, point_index, pair_index, pixels, N * D * h * w)

    @staticmethod
    def concatenate(indices: list[SplatIndex]) -> SplatIndex:
        """The block-diagonal index of a batch: sample ``b``'s cells, pixels and points follow those before it."""
        if len(indices) == 1:
            return indices[0]
        crows, cols, points, pairs = [], [], [], []
        pair_offset = pixel_offset = point_offset = 0
        for index in indices:
            crows.append(index.crow_indices[:-1] + pair_offset)
            cols.append(index.col_indices + pixel_offset)
            points.append(index.point_index + point_offset)
            pairs.append(index.pair_index + pair_offset)
            pair_offset += index.col_indices.shape[0]
            pixel_offset += index.pixels
            point_offset += index.points
        crows.append(crows[0].new_full((1,), pair_offset))
        return SplatIndex(
            torch.cat(crows), torch.cat(cols), torch.cat(points), torch.cat(pairs), pixel_offset, point_offset
        )


def sparse_splat(features: torch.Tensor, depth_probs: torch.Tensor, index: SplatIndex) -> torch.Tensor:
    """Lift and splat in one sparse product: ``S(depth_probs) @ features``, never building the [P, C] lift.

    Differentiable in ``features`` and ``depth_probs``; the result equals ``lift_splat_pool`` of the outer
    product up to float summation order.

    Args:
        features: [pixels, C] float — context features per feature pixel (``index.col_indices``' order).
        depth_probs: [points] float — depth probability per frustum point (``index.point_index``' order).
        index: where the points land.

    Returns:
        [index.cells, C] float — per-cell sums; zero where no point landed.
    """
    return _SparseProduct.apply(pair_values(depth_probs, index), features, index.crow_indices, index.col_indices)


def pair_values(depth_probs: torch.Tensor, index: SplatIndex) -> torch.Tensor:
    """The splat matrix's values: [U] float, each (cell, pixel) pair's summed depth probability.

    Args:
        depth_probs: [points] float — depth probability per frustum point (``index.point_index``' order).
        index: where the points land.
    """
    return depth_probs.new_zeros(index.col_indices.shape[0]).index_add(
        0, index.pair_index, depth_probs.index_select(0, index.point_index)
    )


def csr_matrix(
    values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, columns: int
) -> torch.Tensor:
    """The sparse CSR matrix [rows, columns] of ``values`` [U] at ``crow_indices`` / ``col_indices``.

    The indices are ``SplatIndex``'s, valid by construction, so torch's invariant checks and its beta warnings are
    left out.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(
            crow_indices, col_indices, values, (crow_indices.shape[0] - 1, columns), check_invariants=False
        )


class _SparseProduct(torch.autograd.Function):
    """``S @ features`` for the CSR matrix ``S`` of ``values``, with a backward that stays sparse.

    torch's own backward of a sparse CSR times dense product forms the dense [cells, pixels] gradient of ``S``
    and then masks it to the pattern: on `base` at batch 2 an 80 GB allocation. Here each of the U pairs gets its
    gradient as the dot product of its cell's output gradient and its pixel's features ([U, C] at most).
    """

    @staticmethod
    def forward(ctx, values, features, crow_indices, col_indices):  # noqa: D102 (see the class)
        ctx.save_for_backward(values, features, crow_indices, col_indices)
        return csr_matrix(values, crow_indices, col_indices, features.shape[0]) @ features  # [cells, C]

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        values, features, crow_indices, col_indices = ctx.saved_tensors
        cells = crow_indices.shape[0] - 1
        rows = torch.repeat_interleave(torch.arange(cells, device=values.device), crow_indices.diff())  # [U]
        grad_rows = grad_output.index_select(0, rows)  # [U, C]
        grad_values = grad_features = None
        if ctx.needs_input_grad[0]:
            grad_values = (grad_rows * features.index_select(0, col_indices)).sum(1)  # [U]
        if ctx.needs_input_grad[1]:
            grad_features = torch.zeros_like(features).index_add_(0, col_indices, grad_rows * values[:, None])
        return grad_values, grad_features, None, None


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A 3x3 convolution (padding 1), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CameraEncoder(nn.Module):
    """Surround camera images to a BEV latent by Lift-Splat (see the module docstring)."""

    def __init__(self, config: CameraEncoderConfig) -> None:
        super().__init__()
        self.config = config
        C, D = config.channels, config.depth_bins
        blocks, width, in_channels = [], config.backbone_width, 3
        for _ in range(int(math.log2(config.feature_stride))):
            blocks.append(_conv_bn_relu(in_channels, width, stride=2))
            in_channels, width = width, width * 2
        blocks.append(_conv_bn_relu(in_channels, in_channels, stride=1))
        self.backbone = nn.Sequential(*blocks)
        self.lift_head = nn.Conv2d(in_channels, D + C, kernel_size=1)
        self.bev_block = nn.Sequential(
            _conv_bn_relu(C, C, stride=1),
            _conv_bn_relu(C, C, stride=config.bev_stride),
            nn.Conv2d(C, C, kernel_size=1),
        )
        depths = config.depth_min_m + config.depth_step_m * torch.arange(D, dtype=torch.float32)  # [D]
        self.register_buffer("depths_m", depths, persistent=False)
        self._frustum_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._splat_index_cache: OrderedDict[tuple, SplatIndex] = OrderedDict()

    def frustum(self, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Frustum points of a feature map in homogeneous pixel coordinates scaled by depth, cached per size.

        Feature pixel ``(u, v)`` stands for image pixel ``((u + 0.5) * s, (v + 0.5) * s)``; its point at depth
        ``d`` is ``(x_px * d, y_px * d, d)``, so that ``K^-1`` of it is the camera-frame point at depth ``d``.

        Args:
            h: feature rows.
            w: feature columns.
            dtype: dtype of the result.

        Returns:
            [D, h, w, 3] float — ``(x_px * d, y_px * d, d)`` per depth bin and feature pixel.
        """
        key = (h, w, self.depths_m.device, dtype)
        if key not in self._frustum_cache:
            s = self.config.feature_stride
            depths = self.depths_m.to(dtype)[:, None, None]  # [D, 1, 1]
            xs = ((torch.arange(w, dtype=dtype, device=depths.device) + 0.5) * s)[None, None, :]  # [1, 1, w]
            ys = ((torch.arange(h, dtype=dtype, device=depths.device) + 0.5) * s)[None, :, None]  # [1, h, 1]
            shape = (depths.shape[0], h, w)
            self._frustum_cache[key] = torch.stack(
                [(xs * depths).expand(shape), (ys * depths).expand(shape), depths.expand(shape)], dim=-1
            )  # [D, h, w, 3]
        return self._frustum_cache[key]

    def frustum_points(
        self, h: int, w: int, intrinsics: torch.Tensor, ego_from_camera: torch.Tensor, camera_mask: torch.Tensor
    ) -> torch.Tensor:
        """Frustum points in the BEV frame: ``ego_from_camera @ (d * K^-1 [x_px, y_px, 1])``.

        Args:
            h: feature rows.
            w: feature columns.
            intrinsics: [B, N, 3, 3] float — pinhole matrices (pixels, at the image's resolution).
            ego_from_camera: [B, N, 4, 4] float — camera poses in the BEV frame.
            camera_mask: [B, N] bool — False for missing cameras, whose (possibly singular) K is replaced by
                the identity so that no NaN appears; their points are dropped by the caller.

        Returns:
            [B, N, D, h, w, 3] float — x, y, z (m) in the BEV frame.
        """
        eye = torch.eye(3, dtype=intrinsics.dtype, device=intrinsics.device)
        safe_k = torch.where(camera_mask[..., None, None], intrinsics, eye)  # [B, N, 3, 3]
        ego_from_pixel = ego_from_camera[..., :3, :3] @ torch.linalg.inv(safe_k)  # [B, N, 3, 3]
        frustum = self.frustum(h, w, intrinsics.dtype)  # [D, h, w, 3]
        points = torch.einsum("bnij,dhwj->bndhwi", ego_from_pixel, frustum)  # [B, N, D, h, w, 3]
        return points + ego_from_camera[:, :, None, None, None, :3, 3]  # [B, N, D, h, w, 3]

    def splat_index(
        self, h: int, w: int, intrinsics: torch.Tensor, ego_from_camera: torch.Tensor, camera_mask: torch.Tensor
    ) -> SplatIndex:
        """Where a batch's frustum points land, from each sample's cached ``SplatIndex``.

        The cache is keyed by the exact values of a sample's intrinsics, poses and camera mask (and the feature
        size, dtype and device), so a changed calibration builds a fresh index and never reuses a stale one; it
        keeps the ``SPLAT_INDEX_CACHE_SIZE`` rigs used last.

        Args:
            h: feature rows.
            w: feature columns.
            intrinsics: [B, N, 3, 3] float — pinhole matrices (pixels, at the image's resolution).
            ego_from_camera: [B, N, 4, 4] float — camera poses in the BEV frame.
            camera_mask: [B, N] bool — False for missing cameras, whose points are not kept.

        Returns:
            the block-diagonal index of the batch (cells ``B * X * Y``, pixels ``B * N * h * w``).
        """
        B, N = camera_mask.shape
        grid = self.config.splat_grid
        cells = grid.shape[0] * grid.shape[1]
        rigs = torch.cat(
            [
                intrinsics.reshape(B, -1),
                ego_from_camera.reshape(B, -1),
                camera_mask.reshape(B, -1).to(intrinsics.dtype),
            ],
            dim=1,
        ).cpu()  # [B, N * 26]
        indices = []
        for b in range(B):
            key = (h, w, intrinsics.dtype, intrinsics.device, rigs[b].numpy().tobytes())
            index = self._splat_index_cache.get(key)
            if index is None:
                points = self.frustum_points(
                    h, w, intrinsics[b : b + 1], ego_from_camera[b : b + 1], camera_mask[b : b + 1]
                )[0]  # [N, D, h, w, 3]
                cell, keep = self._landing_cells(points, camera_mask[b])  # [N, D, h, w] each
                index = SplatIndex.build(cell, keep, cells, N * h * w)
                self._splat_index_cache[key] = index
                if len(self._splat_index_cache) > SPLAT_INDEX_CACHE_SIZE:
                    self._splat_index_cache.popitem(last=False)
            else:
                self._splat_index_cache.move_to_end(key)
            indices.append(index)
        return SplatIndex.concatenate(indices)

    def _landing_cells(self, points: torch.Tensor, camera_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``splat_grid`` cell [...] int64 of frustum points [..., N, D, h, w, 3], and whether each is kept.

        A point is kept when it lies inside the grid, within the height band, and its camera ([..., N] bool
        ``camera_mask``) is present.
        """
        cell, inside = self.config.splat_grid.flat_index_torch(points[..., 0], points[..., 1])  # [..., N, D, h, w]
        z = points[..., 2]  # [..., N, D, h, w]
        present = camera_mask[..., None, None, None]  # [..., N, 1, 1, 1]
        return cell, inside & present & (z >= self.config.z_min_m) & (z < self.config.z_max_m)

    def splat(
        self,
        features: torch.Tensor,
        depth_probs: torch.Tensor,
        intrinsics: torch.Tensor,
        ego_from_camera: torch.Tensor,
        camera_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Lift features along their rays by depth probabilities and sum-pool them into ``splat_grid``.

        One sparse product with the rig's cached ``SplatIndex`` (``sparse_splat``); ``splat_reference`` computes
        the same by the paper's outer product, for tests and the benchmark.

        Args:
            features: [B, N, C, h, w] float — context features per feature pixel.
            depth_probs: [B, N, D, h, w] float — depth distribution per feature pixel (a softmax in forward).
            intrinsics: [B, N, 3, 3] float — pinhole matrices (pixels, at the image's resolution).
            ego_from_camera: [B, N, 4, 4] float — camera poses in the BEV frame (camera x right, y down, z fwd).
            camera_mask: [B, N] bool — False for missing cameras, which contribute nothing.

        Returns:
            [B, C, X, Y] float — the splat on ``splat_grid`` (rows along +x, columns along +y).
        """
        B, N, C, h, w = features.shape
        self._check_depth_probs(depth_probs, (B, N, self.config.depth_bins, h, w))
        X, Y = self.config.splat_grid.shape
        index = self.splat_index(h, w, intrinsics, ego_from_camera, camera_mask)
        pixels = features.permute(0, 1, 3, 4, 2).reshape(B * N * h * w, C)  # [B*N*h*w, C]
        pooled = sparse_splat(pixels, depth_probs.reshape(-1), index)  # [B*X*Y, C]
        return pooled.view(B, X, Y, C).permute(0, 3, 1, 2)  # [B, C, X, Y]

    def splat_reference(
        self,
        features: torch.Tensor,
        depth_probs: torch.Tensor,
        intrinsics: torch.Tensor,
        ego_from_camera: torch.Tensor,
        camera_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``splat`` as the paper writes it: landing cells computed afresh, the [P, C] outer product pooled.

        The reference the tests hold ``splat`` to and the benchmark's "before". Args and Returns: as ``splat``.
        """
        B, N, C, h, w = features.shape
        D = self.config.depth_bins
        self._check_depth_probs(depth_probs, (B, N, D, h, w))
        X, Y = self.config.splat_grid.shape
        points = self.frustum_points(h, w, intrinsics, ego_from_camera, camera_mask)  # [B, N, D, h, w, 3]
        cell, keep = self._landing_cells(points, camera_mask)  # [B, N, D, h, w] each
        batch_offset = torch.arange(B, device=cell.device)[:, None, None, None, None] * (X * Y)  # [B, 1, 1, 1, 1]
        flat = (cell + batch_offset).reshape(-1)  # [P]

        # The outer product, laid out channels-last so that the flattening below copies nothing.
        channels_last = features.permute(0, 1, 3, 4, 2).contiguous()  # [B, N, h, w, C]
        lifted = depth_probs[..., None] * channels_last[:, :, None]  # [B, N, D, h, w, C]
        lifted = lifted.reshape(B * N * D * h * w, C)  # [P, C]
        pooled = lift_splat_pool(lifted, flat, keep.reshape(-1), B * X * Y)  # [B*X*Y, C]
        return pooled.view(B, X, Y, C).permute(0, 3, 1, 2)  # [B, C, X, Y]

    @staticmethod
    def _check_depth_probs(depth_probs: torch.Tensor, expected: tuple[int, ...]) -> None:
        """Raise ``ValueError`` where ``depth_probs`` is not [B, N, D, h, w] with this encoder's D."""
        if tuple(depth_probs.shape) != expected:
            raise ValueError(f"depth_probs: expected shape {expected}, got {tuple(depth_probs.shape)}")

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        ego_from_camera: torch.Tensor,
        camera_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Encode surround images into the BEV latent.

        Args:
            images: [B, N, 3, H, W] uint8 — RGB images.
            intrinsics: [B, N, 3, 3] float — pinhole matrices (pixels, at the images' resolution).
            ego_from_camera: [B, N, 4, 4] float — each camera's pose in the BEV frame (camera frame: x right,
                y down, z forward).
            camera_mask: [B, N] bool — False for missing cameras: their images, intrinsics and poses are
                ignored. A sample with no camera at all gets a zero latent.

        Returns:
            [B, channels, *out_grid.shape] float — the BEV latent (rows along +x, columns along +y).
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images: expected shape [B, N, 3, H, W], got {tuple(images.shape)}")
        B, N, _, H, W = images.shape
        _check_shape("intrinsics", intrinsics, (B, N, 3, 3))
        _check_shape("ego_from_camera", ego_from_camera, (B, N, 4, 4))
        _check_shape("camera_mask", camera_mask, (B, N))
        if images.dtype != torch.uint8:
            raise ValueError(f"images: expected dtype uint8, got {images.dtype}")
        C, D = self.config.channels, self.config.depth_bins
        dtype = self.lift_head.weight.dtype
        camera_mask = camera_mask.to(torch.bool)

        # Backbone and lift head, on the present cameras only.
        present = camera_mask.reshape(B * N).nonzero().squeeze(1)  # [N']
        x = images.reshape(B * N, 3, H, W)[present].to(dtype)  # [N', 3, H, W]
        x = (x / 255.0 - IMAGE_MEAN) / IMAGE_STD
        x = self.lift_head(self.backbone(x))  # [N', D + C, h, w]
        h, w = x.shape[-2:]
        head = x.new_zeros(B * N, D + C, h, w).index_copy(0, present, x)  # [B*N, D + C, h, w]
        head = head.view(B, N, D + C, h, w)  # [B, N, D + C, h, w]
        depth_probs = head[:, :, :D].softmax(dim=2)  # [B, N, D, h, w]
        features = head[:, :, D:]  # [B, N, C, h, w]

        with geometry.float32_geometry(images.device.type):  # the rays' geometry and the sparse product
            bev = self.splat(
                features.to(dtype), depth_probs.to(dtype), intrinsics.to(dtype), ego_from_camera.to(dtype), camera_mask
            )  # [B, C, X, Y]
        bev = self.bev_block(bev)  # [B, C, *out_grid.shape]
        return bev * camera_mask.any(dim=1).to(dtype)[:, None, None, None]  # [B, C, *out_grid.shape]


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` where ``tensor`` is not of shape ``expected``."""
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")
