"""Heads that decode the BEV latent: per-class occupancy, K-mode agent trajectories, CenterPoint-style detection.

Everything is in the ego frame of the present keyframe t0. The latent lives on the latent grid
(``fuser.latent_grid()``, 32 x 32 cells of 2 m); occupancy is decoded onto the 0.5 m target grid (128 x 128),
detection onto ``detection_grid()`` (64 x 64 cells of 1 m). Every BEV map is ``[..., H, W]`` with rows along +x
and columns along +y, as ``geometry.GridSpec`` documents; the grids own the mapping between metres and cells.

Notation:
    B  samples          A  agents per sample (padded)     C  latent channels     H, W  BEV rows, columns
    K  trajectory modes  T  trajectory steps (0.5 s)       P  past keyframes (t0 last)
    L  latents a trajectory is read from (z0 and the F rolled-out ones)     S  sample points per agent
    N  detections (all samples)     R  regression channels (``REGRESSION_CHANNELS``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bevjepa.datasets import geometry
from bevjepa.fusion import fuser

REGRESSION_CHANNELS: tuple[str, ...] = (
    "dx",
    "dy",
    "z",
    "log_w",
    "log_l",
    "log_h",
    "sin_yaw",
    "cos_yaw",
    "vx",
    "vy",
)
"""The detection regression channels: centre offset from the cell centre (cells), centre height (m), log box
width, length and height (log m), heading as sin and cos, velocity (m/s) in t0."""


def detection_grid() -> geometry.GridSpec:
    """The detection heat-map grid: ±32 m at 1 m (64 x 64), stride 2 of the 0.5 m target grid."""
    return geometry.GridSpec(-32.0, 32.0, -32.0, 32.0, 1.0)


def _rotate(xy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [..., 2] vectors counter-clockwise by the angle whose cos and sin ([...]) are given."""
    x, y = xy.unbind(-1)
    return torch.stack([cos * x - sin * y, sin * x + cos * y], dim=-1)


def sample_bev(z: torch.Tensor, xy: torch.Tensor, grid: geometry.GridSpec) -> torch.Tensor:
    """Bilinear samples of a BEV map at metric points (zero outside the grid).

    ``grid_sample``'s last axis is (x, y) = (column, row) = (W, H): column index j follows the metric y, row
    index i the metric x. With ``align_corners=False`` the normalised -1 and 1 are the outer cell edges, so a
    cell centre ``x_min + (i + 0.5) * res`` lands exactly on row ``i``.

    Args:
        z: [B, D, H, W] float — a map on ``grid``.
        xy: [B, N, 2] float — x, y (m) in the grid's frame.
        grid: the map's grid.

    Returns:
        [B, N, D] the features at the points.
    """
    B, D, H, W = z.shape
    if (H, W) != grid.shape:
        raise ValueError(f"z: expected [B, D, {grid.shape[0]}, {grid.shape[1]}] on its grid, got {list(z.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)  # never bfloat16 coordinates (autocast)
    sampling = grid.sampling_coords_torch(xy.to(dtype))[:, :, None]  # [B, N, 1, 2] (W, H) order
    out = F.grid_sample(z.to(dtype), sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[..., 0].transpose(1, 2)  # [B, N, D]


class BevDecoder(nn.Module):
    """A U-Net's upward path: a latent on the 2 m grid back to the 0.5 m target grid, through the finer LiDAR maps.

    Each level narrows the features (1 x 1, at the coarser resolution), doubles the resolution (bilinear),
    concatenates the finer map of the present keyframe (``skips``:
    the LiDAR pyramid, ``LidarEncoder.pyramid``, coarsest last) and mixes them with two 3 x 3 convolutions. A
    learnt embedding of the step (0 for t0, k for the k-th rolled-out latent) is added at the input, so that the
    decoder knows how far the present keyframe's fine maps lie from the time it decodes. With ``step_film`` each
    level also scales and shifts its features by the step after its first convolution (FiLM, starting as the
    identity): the fine levels read the step directly, where a person's LiDAR points mean "here" at t0 and
    "near here, somewhere" a second later.

    Notation: N maps (samples × steps), L levels, D_l the width at level l (finest first).
    """

    def __init__(
        self,
        channels: int,
        skip_channels: tuple[int, ...],
        widths: tuple[int, ...],
        steps: int,
        step_film: bool = False,
    ) -> None:
        """Build the decoder.

        Args:
            channels: C, latent channels.
            skip_channels: channels of the finer maps, finest first (one per level; 0 where a level has none, as
                without LiDAR).
            widths: D_l, the width of each level, finest first (same length as ``skip_channels``).
            steps: how many step embeddings (F + 1).
            step_film: every level scales and shifts its features by the step (zeros: the identity at first).
        """
        super().__init__()
        if len(skip_channels) != len(widths) or not widths:
            raise ValueError(f"BevDecoder: one width per level, got {widths} for skips {skip_channels}")
        self.skip_channels, self.widths = tuple(skip_channels), tuple(widths)
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[-1], 3, padding=1), nn.GroupNorm(math.gcd(8, widths[-1]), widths[-1]), nn.SiLU()
        )
        self.step_embedding = nn.Parameter(torch.zeros(steps, widths[-1]))
        self.reduce = nn.ModuleList()
        self.levels = nn.ModuleList()
        coarser = widths[-1]
        for skip, width in reversed(list(zip(skip_channels, widths, strict=True))):  # coarsest level first
            self.reduce.append(nn.Conv2d(coarser, width, 1))  # at the coarser resolution, where it is cheap
            self.levels.append(
                nn.Sequential(
                    nn.Conv2d(width + skip, width, 3, padding=1),
                    nn.GroupNorm(math.gcd(8, width), width),
                    nn.SiLU(),
                    nn.Conv2d(width, width, 3, padding=1),
                    nn.GroupNorm(math.gcd(8, width), width),
                    nn.SiLU(),
                )
            )
            coarser = width
        # Per level, coarsest first as ``levels``: [steps, 2 * D_l] scales (minus 1) and shifts.
        self.step_film = (
            nn.ParameterList([nn.Parameter(torch.zeros(steps, 2 * w)) for w in reversed(widths)]) if step_film else None
        )

    def forward(
        self, z: torch.Tensor, skips: list[torch.Tensor], step: torch.Tensor, finest: int = 0
    ) -> list[torch.Tensor]:
        """Decode latents.

        Args:
            z: [N, C, H, W] float — latents.
            skips: the finer maps [N, skip_channels[l], H * 2^(L-l), W * 2^(L-l)], finest first; an empty list or
                None entries where ``skip_channels`` is 0.
            step: [N] int64 — the step each latent stands for (0: t0).
            finest: the finest level to decode (0: all); the finer ones, the costliest, are skipped.

        Returns:
            The features of the levels ``finest``..L-1, finest first: [N, D_l, H * 2^(L-l), W * 2^(L-l)].
        """
        h = self.stem(z) + self.step_embedding[step][:, :, None, None]  # [N, D_L, H, W]
        out = []
        for i, (level, reduce, block) in enumerate(
            zip(reversed(range(len(self.widths))), self.reduce, self.levels, strict=True)
        ):
            if level < finest:
                break
            h = F.interpolate(reduce(h), scale_factor=2.0, mode="bilinear", align_corners=False)
            if self.skip_channels[level]:
                h = torch.cat([h, skips[level]], dim=1)
            if self.step_film is None:
                h = block(h)
            else:  # the block's first convolution and norm, FiLM by the step, then the rest
                scale, shift = self.step_film[i][step][:, :, None, None].chunk(2, dim=1)  # [N, D_l, 1, 1] each
                h = block[2:](block[:2](h) * (1.0 + scale) + shift)
            out.append(h)
        return out[::-1]


def _offset_layers(hidden: int, *middle: nn.Module) -> list[nn.Module]:
    """The offset heads' layers on ``hidden`` channels, ending in 2 offsets that start at zero (nothing moves).

    GroupNorm, SiLU, ``middle``, a dilated 3 × 3 convolution, SiLU and a 1 × 1 convolution whose weights are zeroed;
    the convolutions are made in that order, so that a seed draws the weights it drew before this helper.
    """
    dilated = nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2)
    out = nn.Conv2d(hidden, 2, 1)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
    return [nn.GroupNorm(math.gcd(8, hidden), hidden), nn.SiLU(), *middle, dilated, nn.SiLU(), out]


class FlowHead(nn.Module):
    """Where each cell's content was at t0: a source offset per cell of a rolled-out latent, read against z_t0.

    The decoder warps the present keyframe's fine LiDAR maps by it (``warp_by_offset``), so that what the sensors
    saw sharply at t0 is drawn where the world model says it went. Trained on the annotated instances' motion
    (``losses.instance_flow_targets``); it starts at zero (nothing moves).
    """

    def __init__(self, channels: int, hidden: int = 64, scale_m: float = 10.0) -> None:
        """``channels``: C of the latents; ``hidden``: the width; ``scale_m``: metres per unit of the last layer."""
        super().__init__()
        self.scale_m = scale_m
        self.net = nn.Sequential(nn.Conv2d(2 * channels, hidden, 3, padding=1), *_offset_layers(hidden))

    def forward(self, z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """Source offsets [N, 2, H, W] (x, y in m, t0 frame) of latents z [N, C, H, W] against z_t0 [N, C, H, W]."""
        return self.net(torch.cat([z, z0], dim=1)) * self.scale_m


class FlowRefiner(nn.Module):
    """The latent's flow made sharp on a finer grid, from the LiDAR maps there (the input keyframes' motion).

    ``FlowHead`` reads 2 m latent cells, larger than a person, whose half-second walk is a fraction of one. The
    1 m maps the decoder reads (``BevJepa.present_skips``) mix the three input keyframes warped into t0, so a moving
    person leaves a trail across their cells. This head adds to the upsampled coarse flow a residual read from those
    maps, the coarse flow and the step; its last layer starts at zero, so it starts as the coarse flow.
    """

    def __init__(
        self, map_channels: int, steps: int, hidden: int = 32, scale_m: float = 10.0, detached: bool = False
    ) -> None:
        """A refiner of F = ``steps`` rolled-out steps' flow from maps of ``map_channels`` channels.

        ``scale_m``: metres per unit of the last layer. ``detached``: read the maps and the coarse flow without
        passing gradient back into them (the residual learns alone; the coarse flow still feels the loss through
        the sum).
        """
        super().__init__()
        self.scale_m = scale_m
        self.detached = detached
        self.from_maps = nn.Conv2d(map_channels, hidden, 3, padding=1)  # once per sample, shared by its steps
        self.from_flow = nn.Conv2d(2, hidden, 1)
        self.step_embedding = nn.Parameter(torch.zeros(steps + 1, hidden))
        self.net = nn.Sequential(*_offset_layers(hidden, nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()))

    def forward(self, coarse_m: torch.Tensor, maps: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """Refined source offsets.

        Args:
            coarse_m: [N, S, 2, h, w] float — ``FlowHead``'s offsets (m) of S rolled-out steps.
            maps: [N, D, H, W] float — the finer maps in t0 (H, W a multiple of h, w).
            steps: the S step indices (1..F).

        Returns:
            [N, S, 2, H, W] float — source offsets (m) on the finer grid.
        """
        n, s = coarse_m.shape[:2]
        up = F.interpolate(coarse_m.flatten(0, 1), size=maps.shape[-2:], mode="bilinear", align_corners=False)
        step = self.step_embedding[torch.as_tensor(steps, device=maps.device)].repeat(n, 1)  # [N*S, hidden]
        read_maps, read_up = (maps.detach(), up.detach()) if self.detached else (maps, up)
        hidden = (
            self.from_maps(read_maps).repeat_interleave(s, dim=0)
            + self.from_flow(read_up / self.scale_m)
            + step[:, :, None, None]
        )
        return (up + self.net(hidden) * self.scale_m).unflatten(0, (n, s))


def warp_by_offset(maps: torch.Tensor, offset_m: torch.Tensor, grid: geometry.GridSpec) -> torch.Tensor:
    """Resample maps so that each cell reads the map at its centre plus its offset (bilinear, zeros outside).

    Args:
        maps: [N, D, H, W] float — maps on ``grid``.
        offset_m: [N, 2, h, w] float — source offsets x, y (m) on any coarser grid of the same extent (upsampled
            bilinearly to ``grid``).
        grid: the maps' grid.

    Returns:
        [N, D, H, W] the warped maps, float32 at least.

    Runs in float32 at least, whatever the inputs' precision: under bfloat16 autocast a cell centre 30 m out would
    round to 0.25 m, half a target cell.
    """
    h, w = grid.shape
    dtype = torch.promote_types(maps.dtype, torch.float32)
    offset_m = offset_m.to(dtype)
    if offset_m.shape[-2:] != (h, w):
        offset_m = F.interpolate(offset_m, size=(h, w), mode="bilinear", align_corners=False)
    centres = torch.as_tensor(grid.cell_centers(), dtype=dtype, device=maps.device)  # [H, W, 2]
    source = centres + offset_m.permute(0, 2, 3, 1)  # [N, H, W, 2] x, y (m)
    return F.grid_sample(
        maps.to(dtype), grid.sampling_coords_torch(source), mode="bilinear", padding_mode="zeros", align_corners=False
    )


class OccupancyHead(nn.Module):
    """Per-class occupancy logits on the target grid from the decoder's finest features.

    ``horizons`` > 1 emits every horizon's maps at once from one set of features (the direct baseline without a
    world model): ``classes * horizons`` channels.
    """

    def __init__(self, width: int, classes: int = 3, horizons: int = 1, prior_probability: float = 0.02) -> None:
        """Build the head: ``width`` input channels, ``classes`` per horizon, the initial occupancy probability."""
        super().__init__()
        self.classes, self.horizons = classes, horizons
        self.decode = nn.Conv2d(width, classes * horizons, 1)
        with torch.no_grad():
            self.decode.bias.fill_(float(np.log(prior_probability / (1 - prior_probability))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N, horizons, classes, H, W] of features [N, width, H, W]."""
        logits = self.decode(features)
        return logits.reshape(logits.shape[0], self.horizons, self.classes, *logits.shape[2:])


def past_motion(past: torch.Tensor, past_mask: torch.Tensor, step_s: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Each agent's velocity and acceleration at t0 from its past positions alone.

    Causal: no annotation that looks ahead enters (the devkit's ``box_velocity`` is a centred difference over the
    neighbouring annotations, so it sees the next keyframe). The last displacement over ``step_s`` is the velocity
    at the middle of the last step; with a third position the velocity at t0 is the second-order backward
    difference ``(3 p0 - 4 p-1 + p-2) / (2 step_s)``, the last step's velocity carried half a step on by the
    acceleration (exact for constant acceleration).

    Args:
        past: [..., A, P, 2] float — past positions (m, t0 frame), t0 last; anything at masked steps.
        past_mask: [..., A, P] bool — valid past positions.
        step_s: time between keyframes (s).

    Returns:
        velocity: [..., A, 2] — at t0 (m/s): the second-order difference with three valid positions, else the
            last displacement / ``step_s``, else 0.
        acceleration: [..., A, 2] — the change of the last two step velocities / ``step_s`` (m/s²); 0 without
            three valid positions.
    """
    zeros = torch.zeros_like(past[..., 0, :])
    if past.shape[-2] < 2:
        return zeros, zeros.clone()
    clean = torch.where(past_mask[..., None], past, 0.0)
    valid2 = (past_mask[..., -1] & past_mask[..., -2])[..., None]
    last_step = torch.where(valid2, (clean[..., -1, :] - clean[..., -2, :]) / step_s, zeros)
    if past.shape[-2] < 3:
        return last_step, zeros
    valid3 = valid2 & past_mask[..., -3, None]
    before = (clean[..., -2, :] - clean[..., -3, :]) / step_s
    acceleration = torch.where(valid3, (last_step - before) / step_s, zeros)
    return last_step + acceleration * (step_s / 2), acceleration


class AgentInteraction(nn.Module):
    """One round of attention from every agent to the other agents and the ego, on their relative motion.

    An agent's next seconds depend on its neighbours: IDM traffic brakes behind a slower leader or the ego, a
    vehicle waits for a crossing pedestrian. Each agent's feature attends (multi-head) to the features of the
    other valid agents and to a learnt ego token; each pair also carries the other's position, velocity and
    heading relative to the agent, in the agent's heading frame, added to its key and value. The result is added
    to the agent's feature (a residual).

    Notation: N = A + 1 tokens (the agents, then the ego).
    """

    PAIR_FEATURES = 7
    """dx, dy (over ``distance_scale_m``), dvx, dvy (m per step over ``motion_scale_m``), cos and sin of the
    relative heading, 1 for the ego."""

    def __init__(
        self, hidden: int, heads: int = 4, distance_scale_m: float = 20.0, motion_scale_m: float = 5.0
    ) -> None:
        """Build the layer: ``hidden`` features (divisible by ``heads``), the two input scales in metres."""
        super().__init__()
        if hidden % heads:
            raise ValueError(f"AgentInteraction: hidden={hidden} is not divisible by heads={heads}")
        self.heads, self.distance_scale_m, self.motion_scale_m = heads, distance_scale_m, motion_scale_m
        self.pair = nn.Sequential(nn.Linear(self.PAIR_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.ego_token = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden))

    def forward(
        self,
        h: torch.Tensor,
        xy: torch.Tensor,
        yaw: torch.Tensor,
        velocity_step: torch.Tensor,
        valid: torch.Tensor,
        ego_velocity_step: torch.Tensor,
    ) -> torch.Tensor:
        """Agent features after attending to the others.

        Args:
            h: [B, A, D] float — agent features.
            xy: [B, A, 2] float — positions at t0 (m, t0 frame; the ego is at the origin, heading +x).
            yaw: [B, A] float — headings (rad).
            velocity_step: [B, A, 2] float — velocities times the step (m per step, t0 frame).
            valid: [B, A] bool — real agents (padding is never attended to).
            ego_velocity_step: [B, 2] float — the ego's velocity times the step (m per step, t0 frame).

        Returns:
            [B, A, D] float.
        """
        B, A, D = h.shape
        E = D // self.heads
        origin = torch.zeros_like(xy[:, :1])
        all_xy = torch.cat([xy, origin], dim=1)  # [B, N, 2]
        all_yaw = torch.cat([yaw, torch.zeros_like(yaw[:, :1])], dim=1)  # [B, N]
        all_velocity = torch.cat([velocity_step, ego_velocity_step[:, None]], dim=1)  # [B, N, 2]
        is_ego = torch.zeros_like(all_yaw)
        is_ego[:, -1] = 1.0
        cos, sin = torch.cos(yaw)[..., None], torch.sin(yaw)[..., None]  # [B, A, 1]
        offset = _rotate(all_xy[:, None] - xy[:, :, None], cos, -sin) / self.distance_scale_m  # [B, A, N, 2]
        motion = _rotate(all_velocity[:, None] - velocity_step[:, :, None], cos, -sin) / self.motion_scale_m
        turn = all_yaw[:, None] - yaw[:, :, None]  # [B, A, N]
        pair = torch.cat(
            [
                offset,
                motion,
                torch.cos(turn)[..., None],
                torch.sin(turn)[..., None],
                is_ego[:, None, :, None].expand(B, A, -1, 1),
            ],
            dim=-1,
        )  # [B, A, N, 7]
        edge = self.pair(pair)  # [B, A, N, D]
        tokens = torch.cat([h, self.ego_token.expand(B, 1, D)], dim=1)  # [B, N, D]
        query = self.query(h).reshape(B, A, 1, self.heads, E)
        key = (self.key(tokens)[:, None] + edge).reshape(B, A, A + 1, self.heads, E)
        value = (self.value(tokens)[:, None] + edge).reshape(B, A, A + 1, self.heads, E)
        logits = (query * key).sum(dim=-1) / E**0.5  # [B, A, N, heads]
        others = ~torch.eye(A, A + 1, dtype=torch.bool, device=h.device)  # [A, N]: not itself
        attend = others[None] & torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)[:, None]  # [B, A, N]
        weights = torch.softmax(logits.masked_fill(~attend[..., None], float("-inf")), dim=2)  # the ego: never empty
        mixed = (weights[..., None] * value).sum(dim=2).reshape(B, A, D)
        return h + self.out(mixed)


class TrajectoryHead(nn.Module):
    """K trajectory modes per agent: constant-velocity motion plus residuals read from the latent and the past.

    For each agent: a heading-aligned ``patch x patch`` square of points around its position is sampled from z0
    and from every rolled-out latent (``sample_latent``); each latent's samples are projected and a GRU runs over
    the L latents in time order. The agent's past positions, relative to its current position and in its heading
    frame, go through an MLP. Both, with its position, heading and velocity in t0 and a class embedding, make the
    agent's feature, which then attends to the other agents' and the ego's (``AgentInteraction``) and feeds an
    MLP that emits per-step residual displacements in the heading frame and one logit per mode. A mode is the
    agent's constant-velocity path (its velocity at t0 from the past positions, ``past_motion``; the acceleration
    of its past is an input too) plus its cumulated residuals (rotated into t0): the head starts as the
    constant-velocity baseline (its residual layer starts near zero) and learns where motion departs from it.
    Mode 0 keeps no residual: it is the constant-velocity path itself, an anchor whose probability the head
    learns, so that an agent that keeps its velocity is forecast exactly (the other modes are free).
    """

    def __init__(
        self,
        channels: int = 64,
        modes: int = 10,
        steps: int = 12,
        past_steps: int = 3,
        classes: int = 3,
        hidden: int = 128,
        patch: int = 3,
        patch_spacing_m: float = 2.0,
        motion_scale_m: float = 5.0,
        grid: geometry.GridSpec | None = None,
        step_s: float = 0.5,
        residual_init_scale: float = 0.01,
    ) -> None:
        """Build the head.

        Args:
            channels: C, latent channels.
            modes: K, trajectory modes (10: minADE_5 and minADE_10 both read off the top modes by probability).
            steps: T, future steps (0.5 s each).
            past_steps: P, past positions per agent (t0 last).
            classes: agent classes (for the class embedding).
            hidden: width of the MLPs and the GRU.
            patch: side of the square of sample points around each agent (1: its position only).
            patch_spacing_m: spacing of those points (m).
            motion_scale_m: metres per unit of the net's past-position inputs and per-step displacement outputs.
            grid: the latent's grid; None: ``fuser.latent_grid()``.
            step_s: time per trajectory step (s).
            residual_init_scale: factor on the residual layer's initial weights, so that the modes start within
                centimetres of constant velocity but distinct (winner-takes-all needs them apart).
        """
        super().__init__()
        if min(channels, modes, steps, past_steps, classes, hidden, patch) < 1:
            raise ValueError("TrajectoryHead: channels, modes, steps, past_steps, classes, hidden, patch must be >= 1")
        self.grid = grid if grid is not None else fuser.latent_grid()
        self.modes, self.steps, self.past_steps, self.classes = modes, steps, past_steps, classes
        self.motion_scale_m = motion_scale_m
        self.register_buffer(
            "step_times", torch.arange(1, steps + 1, dtype=torch.float32) * step_s, persistent=False
        )  # [T] (s)
        residual_mask = torch.ones(modes, 1, 1)
        residual_mask[0] = 0.0 if modes > 1 else 1.0
        self.register_buffer("residual_mask", residual_mask, persistent=False)  # [K, 1, 1]
        self.position_scale_m = max(
            abs(self.grid.x_min_m), abs(self.grid.x_max_m), abs(self.grid.y_min_m), abs(self.grid.y_max_m)
        )
        k = (torch.arange(patch, dtype=torch.float32) - (patch - 1) / 2) * patch_spacing_m  # [patch]
        along, across = torch.meshgrid(k, k, indexing="ij")
        self.register_buffer(
            "patch_offsets", torch.stack([along, across], -1).reshape(-1, 2), persistent=False
        )  # [S, 2] (m) in the agent's heading frame

        self.latent_proj = nn.Sequential(nn.Linear(patch * patch * channels, hidden), nn.LayerNorm(hidden), nn.SiLU())
        self.temporal = nn.GRU(hidden, hidden, batch_first=True)
        self.past_mlp = nn.Sequential(nn.Linear(past_steps * 3, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(classes, hidden)
        self.fuse = nn.Linear(2 * hidden + 8, hidden)
        self.interaction = AgentInteraction(hidden, motion_scale_m=motion_scale_m)
        self.trunk = nn.Sequential(
            nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.displacement_out = nn.Linear(hidden, modes * steps * 2)
        with torch.no_grad():
            self.displacement_out.weight.mul_(residual_init_scale)
            self.displacement_out.bias.mul_(residual_init_scale)
        self.mode_out = nn.Linear(hidden, modes)

    def sample_latent(self, z: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Latent features at metric points: z [B, D, H, W] on the latent grid, xy [B, N, 2] (m, t0) → [B, N, D]."""
        return sample_bev(z, xy, self.grid)

    def forward(
        self,
        z0: torch.Tensor,
        agent_xy: torch.Tensor,
        agent_past: torch.Tensor,
        agent_past_mask: torch.Tensor,
        agent_yaw: torch.Tensor,
        agent_class: torch.Tensor,
        rollout: torch.Tensor | None = None,
        ego_past: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trajectory modes of every agent.

        Args:
            z0: [B, C, H, W] float — the latent at t0.
            agent_xy: [B, A, 2] float — agents' positions (m) at t0, t0 frame; finite (padding: 0).
            agent_past: [B, A, P, 2] float — their past positions (m, t0 frame), oldest first, t0 last.
            agent_past_mask: [B, A, P] bool — valid past positions (others are ignored, even if NaN).
            agent_yaw: [B, A] float — their heading (rad) at t0 in the t0 frame.
            agent_class: [B, A] int — class index (clamped into range, so padding may hold anything).
            rollout: [B, F, C, H, W] float — the rolled-out latents ẑ_1..ẑ_F, also read; None: z0 only. A head
                trained with a rollout must be called with one.
            ego_past: [B, P, 2] float — the ego's past positions (m, t0 frame, t0 last: the origin), whose motion
                the agents see; None: an ego at rest.

        Returns:
            modes: [B, A, K, T, 2] float — xy (m) in the t0 frame at each future step.
            mode_logits: [B, A, K] float — unnormalised mode log-probabilities.

        A = 0 (a road with nobody on it, or a batch whose samples all have no agent) gives modes [B, 0, K, T, 2]
        and logits [B, 0, K]: the head runs on one padding agent per sample (at the origin, no valid past) and
        drops it, so that every parameter stays in the autograd graph (a zero gradient, which data-parallel
        training needs) and no kernel sees an empty batch.
        """
        B, C, H, W = z0.shape
        A = agent_xy.shape[1]
        P = self.past_steps
        if agent_xy.shape != (B, A, 2) or agent_yaw.shape != (B, A) or agent_class.shape != (B, A):
            raise ValueError(
                f"agent_xy [B, A, 2], agent_yaw [B, A], agent_class [B, A] expected with B={B}, got "
                f"{list(agent_xy.shape)}, {list(agent_yaw.shape)}, {list(agent_class.shape)}"
            )
        if agent_past.shape != (B, A, P, 2) or agent_past_mask.shape != (B, A, P):
            raise ValueError(
                f"agent_past: expected [{B}, {A}, {P}, 2] and mask [{B}, {A}, {P}], got "
                f"{list(agent_past.shape)} and {list(agent_past_mask.shape)}"
            )
        if A == 0:
            modes, mode_logits = self(
                z0,
                agent_xy.new_zeros(B, 1, 2),
                agent_past.new_zeros(B, 1, P, 2),
                agent_past_mask.new_zeros(B, 1, P),
                agent_yaw.new_zeros(B, 1),
                agent_class.new_zeros(B, 1),
                rollout=rollout,
                ego_past=ego_past,
            )  # [B, 1, K, T, 2], [B, 1, K]: the padding agent
            return modes[:, :0], mode_logits[:, :0]  # [B, 0, K, T, 2], [B, 0, K]
        latents = z0[:, None] if rollout is None else torch.cat([z0[:, None], rollout], dim=1)  # [B, L, C, H, W]
        L = latents.shape[1]
        cos, sin = torch.cos(agent_yaw), torch.sin(agent_yaw)  # [B, A]

        # Latent features: a heading-aligned square around each agent, sampled from every latent.
        S = self.patch_offsets.shape[0]
        points = agent_xy[:, :, None] + _rotate(
            self.patch_offsets.to(agent_xy.dtype), cos[..., None], sin[..., None]
        )  # [B, A, S, 2] (m, t0)
        samples = self.sample_latent(latents.reshape(B, L * C, H, W), points.reshape(B, A * S, 2))  # [B, A*S, L*C]
        samples = samples.reshape(B, A, S, L, C).permute(0, 1, 3, 2, 4).reshape(B * A, L, S * C)  # [B*A, L, S*C]
        per_latent = self.latent_proj(samples)  # [B*A, L, D]
        _, last = self.temporal(per_latent)  # [1, B*A, D]
        latent_h = last[0].reshape(B, A, -1)  # [B, A, D]

        # Past motion: relative to the current position, in the heading frame; invalid steps zeroed.
        relative = _rotate(agent_past - agent_xy[:, :, None], cos[..., None], -sin[..., None])  # [B, A, P, 2]
        relative = torch.where(agent_past_mask[..., None], relative / self.motion_scale_m, 0.0)
        past_in = torch.cat([relative, agent_past_mask[..., None].to(relative.dtype)], dim=-1)  # [B, A, P, 3]
        past_h = self.past_mlp(past_in.reshape(B, A, P * 3))  # [B, A, D]

        step_s = self.step_times[0]
        agent_velocity, agent_acceleration = past_motion(agent_past, agent_past_mask, float(step_s))  # [B, A, 2] each
        motion = (
            torch.cat(  # heading frame, metres per step and per step² over the motion scale
                [_rotate(agent_velocity, cos, -sin) * step_s, _rotate(agent_acceleration, cos, -sin) * step_s**2],
                dim=-1,
            )
            / self.motion_scale_m
        )
        pose = torch.cat([agent_xy / self.position_scale_m, torch.stack([cos, sin], dim=-1), motion], dim=-1)
        h = self.fuse(torch.cat([latent_h, past_h, pose], dim=-1))  # [B, A, D]
        h = h + self.class_embedding(agent_class.long().clamp(0, self.classes - 1))
        if ego_past is None:
            ego_velocity = torch.zeros_like(agent_xy[:, 0])  # [B, 2]
        else:
            ego_velocity = past_motion(ego_past, torch.ones_like(ego_past[..., 0], dtype=torch.bool), float(step_s))[0]
        h = self.interaction(
            h, agent_xy, agent_yaw, agent_velocity * step_s, agent_past_mask[..., -1], ego_velocity * step_s
        )
        h = self.trunk(h)  # [B, A, D]

        K, T = self.modes, self.steps
        steps = self.displacement_out(h).reshape(B, A, K, T, 2) * self.motion_scale_m  # per-step (m), heading frame
        steps = steps * self.residual_mask  # mode 0: the constant-velocity anchor
        offsets = steps.cumsum(dim=3)  # [B, A, K, T, 2] residuals to constant velocity
        constant_velocity = agent_xy[:, :, None] + agent_velocity[:, :, None] * self.step_times[None, None, :, None]
        modes = constant_velocity[:, :, None] + _rotate(offsets, cos[..., None, None], sin[..., None, None])
        return modes, self.mode_out(h)  # [B, A, K, T, 2], [B, A, K]


class DetectionHead(nn.Module):
    """CenterPoint-style detection at t0: a per-class centre heat-map and box regression on ``detection_grid()``.

    It reads the decoder's features of t0 at the heat-map's resolution (1 m: ``BevDecoder``'s second finest level).
    """

    def __init__(self, width: int = 48, classes: int = 3, grid: geometry.GridSpec | None = None) -> None:
        """Build the head.

        Args:
            width: channels of the features it reads.
            classes: detected classes (heat-map channels).
            grid: the heat-map grid; None: ``detection_grid()``. The features must have its shape.
        """
        super().__init__()
        self.grid = grid if grid is not None else detection_grid()
        self.classes = classes
        self.heatmap = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, classes, 1))
        self.regression = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, len(REGRESSION_CHANNELS), 1)
        )
        with torch.no_grad():
            self.heatmap[-1].bias.fill_(-2.19)  # initial centre probability 0.1, as CenterNet and CenterPoint

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heat-map logits [B, classes, Hd, Wd] and regression [B, R, Hd, Wd] of features [B, width, Hd, Wd]."""
        if tuple(features.shape[-2:]) != self.grid.shape:
            raise ValueError(f"features: expected the detection grid's {self.grid.shape}, got {list(features.shape)}")
        return self.heatmap(features), self.regression(features)


def gaussian_radius(length_cells: torch.Tensor, width_cells: torch.Tensor, min_overlap: float = 0.1) -> torch.Tensor:
    """CenterNet's heat-map radius (cells) for boxes of the given size, as CenterPoint computes it.

    The smallest radius of the three cases (both corners inside, both outside, one of each) for which a box
    displaced by it still overlaps the true one by ``min_overlap``; kept with CenterNet's formula as published.
    """
    h, w, o = length_cells, width_cells, min_overlap
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 + torch.sqrt((b1**2 - 4 * c1).clamp(min=0))) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 + torch.sqrt((b2**2 - 16 * c2).clamp(min=0))) / 2
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + torch.sqrt((b3**2 - 4 * a3 * c3).clamp(min=0))) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass(frozen=True)
class _Splats:
    """Each agent's Gaussian splat on the heat-map grid (``detection_targets``), Q = (2R + 1)² cells an agent.

    Attributes:
        rows, cols: [B, A] int64 — the centre cells.
        centres: [B, A, 2] float — the centre cells' xy (m).
        valid: [B, A] bool — the agents that splat.
        cls: [B, A] int64 — class index (clamped into range).
        value: [B, A, Q] float — the splat's value at each of its cells (0 outside its radius or the grid).
        cell: [B, A, Q] int64 — those cells' flat index into H * W.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    centres: torch.Tensor
    valid: torch.Tensor
    cls: torch.Tensor
    value: torch.Tensor
    cell: torch.Tensor


def _splats(
    agent_box: torch.Tensor,
    agent_class: torch.Tensor,
    agent_mask: torch.Tensor,
    grid: geometry.GridSpec,
    classes: int,
    min_radius: int,
    min_overlap: float,
) -> _Splats:
    """The agents' splats (see ``detection_targets`` for the rule); arguments as there."""
    B, A, _ = agent_box.shape
    H, W = grid.shape
    device, dtype = agent_box.device, agent_box.dtype
    res = grid.resolution_m
    rows_np, cols_np, inside_np = grid.xy_to_index(agent_box[..., :2].detach().double().cpu().numpy().reshape(-1, 2))
    centres = torch.as_tensor(grid.index_to_xy(rows_np, cols_np), dtype=dtype, device=device).reshape(B, A, 2)
    rows = torch.as_tensor(rows_np, device=device).reshape(B, A)
    cols = torch.as_tensor(cols_np, device=device).reshape(B, A)
    cls = agent_class.long()
    valid = (
        agent_mask
        & torch.as_tensor(inside_np, device=device).reshape(B, A)
        & (cls >= 0)
        & (cls < classes)
        & torch.isfinite(agent_box).all(-1)
    )  # [B, A]
    cls = cls.clamp(0, classes - 1)

    # Gaussian splats over a (2R + 1)² window around each centre, R the largest radius in the batch.
    size = torch.nan_to_num(agent_box[..., 3:5], nan=0.0).clamp(min=0) / res  # [B, A, 2] width, length (cells)
    radius = gaussian_radius(size[..., 1], size[..., 0], min_overlap).floor().clamp(min=min_radius)  # [B, A]
    radius = torch.where(valid, radius, torch.zeros_like(radius))
    R = int(radius.max().item()) if valid.any() else 0
    k = torch.arange(-R, R + 1, device=device)
    di, dj = torch.meshgrid(k, k, indexing="ij")
    di, dj = di.reshape(-1), dj.reshape(-1)  # [Q], Q = (2R + 1)²
    sigma = (2 * radius + 1) / 6  # [B, A]
    splat = torch.exp(-(di**2 + dj**2).to(dtype) / (2 * sigma[..., None] ** 2))  # [B, A, Q]
    r_i, r_j = rows[..., None] + di, cols[..., None] + dj  # [B, A, Q]
    keep = (
        valid[..., None]
        & (di.abs() <= radius[..., None])
        & (dj.abs() <= radius[..., None])
        & (r_i >= 0)
        & (r_i < H)
        & (r_j >= 0)
        & (r_j < W)
    )
    splat = torch.where(keep, splat, torch.zeros_like(splat))
    cell = r_i.clamp(0, H - 1) * W + r_j.clamp(0, W - 1)  # [B, A, Q]
    return _Splats(rows, cols, centres, valid, cls, splat, cell)


def detection_targets(
    agent_box: torch.Tensor,
    agent_velocity: torch.Tensor,
    agent_class: torch.Tensor,
    agent_mask: torch.Tensor,
    grid: geometry.GridSpec | None = None,
    classes: int = 3,
    min_radius: int = 2,
    min_overlap: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterPoint targets: Gaussian centre splats per class, and box regression at the centre cells.

    Each valid agent (masked in, of a class in range, centre inside the grid, finite box) splats
    ``exp(-d² / (2 σ²))`` over the cells within ``radius`` (Chebyshev, in cells) of its centre cell, σ = (2r + 1) / 6
    and r = max(``min_radius``, floor(``gaussian_radius``(length, width))); a class channel keeps the maximum of
    its splats, so the centre cell holds exactly 1. Where two agents share a centre cell one of them (either) gives
    the regression target.

    Args:
        agent_box: [B, A, 7] float — x, y, z, width, length, height (m), yaw (rad), t0 frame.
        agent_velocity: [B, A, 2] float — vx, vy (m/s), t0 frame; NaN where unknown.
        agent_class: [B, A] int — class index.
        agent_mask: [B, A] bool — real agents (False: padding).
        grid: the heat-map grid; None: ``detection_grid()``.
        classes: heat-map channels.
        min_radius: the smallest splat radius (cells).
        min_overlap: the IoU ``gaussian_radius`` keeps.

    Returns:
        heatmap: [B, classes, H, W] float in [0, 1].
        regression: [B, R, H, W] float — ``REGRESSION_CHANNELS`` at centre cells, 0 elsewhere; vx, vy are NaN
            where the velocity is unknown (``losses.detection_loss`` leaves non-finite targets out).
        regression_mask: [B, H, W] bool — the centre cells.
    """
    grid = grid if grid is not None else detection_grid()
    B, A, _ = agent_box.shape
    H, W = grid.shape
    dtype = agent_box.dtype
    splats = _splats(agent_box, agent_class, agent_mask, grid, classes, min_radius, min_overlap)
    flat = splats.cls[..., None] * (H * W) + splats.cell  # [B, A, Q] into classes*H*W
    heatmap = torch.zeros(B, classes * H * W, dtype=dtype, device=agent_box.device)
    heatmap = heatmap.scatter_reduce(1, flat.reshape(B, -1), splats.value.reshape(B, -1), reduce="amax")
    heatmap = heatmap.reshape(B, classes, H, W)

    # Regression at the centre cells.
    box, valid, rows, cols = agent_box, splats.valid, splats.rows, splats.cols
    values = torch.cat(
        [
            (box[..., :2] - splats.centres) / grid.resolution_m,
            box[..., 2:3],
            torch.log(box[..., 3:6].clamp(min=1e-3)),
            torch.sin(box[..., 6:7]),
            torch.cos(box[..., 6:7]),
            agent_velocity.to(dtype),
        ],
        dim=-1,
    )  # [B, A, R]
    batch_index = torch.arange(B, device=box.device)[:, None].expand(B, A)
    regression = torch.zeros(B, H, W, len(REGRESSION_CHANNELS), dtype=dtype, device=box.device)
    regression[batch_index[valid], rows[valid], cols[valid]] = values[valid]
    regression_mask = torch.zeros(B, H, W, dtype=torch.bool, device=box.device)
    regression_mask[batch_index[valid], rows[valid], cols[valid]] = True
    return heatmap, regression.permute(0, 3, 1, 2), regression_mask


def velocity_area_targets(
    agent_box: torch.Tensor,
    agent_velocity: torch.Tensor,
    agent_class: torch.Tensor,
    agent_mask: torch.Tensor,
    grid: geometry.GridSpec | None = None,
    classes: int = 3,
    min_radius: int = 2,
    min_overlap: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity targets over each agent's whole heat-map splat, not its centre cell alone.

    The centre-cell regression trains the velocity on one cell per agent (a few pedestrians a batch). Here every
    cell of an agent's splat (``detection_targets``) holds that agent's velocity, weighed by the splat's value
    there, as TTFNet regresses its boxes over the Gaussian area: the cells around a centre learn the same
    velocity, so the head sees many times the samples; a decoded box still reads its peak cell. Where splats
    overlap, the larger one's agent owns the cell (either, on a tie); the class does not matter.

    Args: as ``detection_targets``.

    Returns:
        velocity: [B, 2, H, W] float — vx, vy (m/s, t0 frame); 0 outside every splat, NaN where the owner's
            velocity is unknown.
        weight: [B, H, W] float in [0, 1] — the owner's splat value there, 0 outside every splat.
    """
    grid = grid if grid is not None else detection_grid()
    B, A, _ = agent_box.shape
    H, W = grid.shape
    splats = _splats(agent_box, agent_class, agent_mask, grid, classes, min_radius, min_overlap)
    value, cell = splats.value, splats.cell  # [B, A, Q]
    Q = value.shape[-1]
    weight = torch.zeros(B, H * W, dtype=value.dtype, device=value.device)
    weight = weight.scatter_reduce(1, cell.reshape(B, -1), value.reshape(B, -1), reduce="amax")  # [B, H*W]
    owner = (value > 0) & (value == weight.gather(1, cell.reshape(B, -1)).reshape(B, A, Q))  # [B, A, Q]
    velocity = agent_velocity.to(value.dtype)[:, :, None].expand(B, A, Q, 2)[owner]  # [M, 2]
    batch_index = torch.arange(B, device=value.device)[:, None, None].expand(B, A, Q)[owner]
    target = torch.zeros(B, H * W, 2, dtype=value.dtype, device=value.device)
    target[batch_index, cell[owner]] = velocity
    return target.permute(0, 2, 1).reshape(B, 2, H, W), weight.reshape(B, H, W)


@dataclass(frozen=True)
class Detections:
    """Decoded detections of a batch, in the t0 ego frame.

    Attributes:
        boxes: [N, 7] float32 — x, y, z, width, length, height (m), yaw (rad).
        velocity: [N, 2] float32 — vx, vy (m/s).
        scores: [N] float32 — heat-map peak probability.
        classes: [N] int64 — class index.
        batch_index: [N] int64 — the sample each detection belongs to.
    """

    boxes: np.ndarray
    velocity: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    batch_index: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        for name, shape in (
            ("boxes", (n, 7)),
            ("velocity", (n, 2)),
            ("scores", (n,)),
            ("classes", (n,)),
            ("batch_index", (n,)),
        ):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                raise ValueError(
                    f"Detections.{name}: expected an array of shape {shape}, got "
                    f"{getattr(value, 'shape', type(value).__name__)}"
                )

    def for_sample(self, b: int) -> Detections:
        """The detections of sample ``b``."""
        keep = self.batch_index == b
        return Detections(
            self.boxes[keep], self.velocity[keep], self.scores[keep], self.classes[keep], self.batch_index[keep]
        )


@torch.no_grad()
def decode_detections(
    heatmap_logits: torch.Tensor,
    regression: torch.Tensor,
    grid: geometry.GridSpec | None = None,
    top_k: int = 100,
    threshold: float = 0.1,
) -> Detections:
    """Boxes from the heat-map peaks: 3 x 3 max-pool NMS, the ``top_k`` best per sample, those above ``threshold``.

    Args:
        heatmap_logits: [B, classes, H, W] float.
        regression: [B, R, H, W] float — ``REGRESSION_CHANNELS``.
        grid: the heat-map grid; None: ``detection_grid()``.
        top_k: the most detections per sample.
        threshold: the lowest score kept.

    Returns:
        ``Detections`` ordered by sample, then by decreasing score.
    """
    grid = grid if grid is not None else detection_grid()
    B, C, H, W = heatmap_logits.shape
    if (H, W) != grid.shape or regression.shape != (B, len(REGRESSION_CHANNELS), H, W):
        raise ValueError(
            f"heatmap_logits [B, C, {grid.shape[0]}, {grid.shape[1]}] and regression "
            f"[B, {len(REGRESSION_CHANNELS)}, H, W] expected, got {list(heatmap_logits.shape)} and "
            f"{list(regression.shape)}"
        )
    scores = torch.sigmoid(heatmap_logits.float())  # [B, C, H, W]
    peaks = F.max_pool2d(scores, kernel_size=3, stride=1, padding=1)
    scores = torch.where(scores == peaks, scores, torch.zeros_like(scores))
    top_scores, index = scores.reshape(B, C * H * W).topk(min(top_k, C * H * W), dim=1)  # [B, k]
    cls, cell = index // (H * W), index % (H * W)  # [B, k]
    R = regression.shape[1]
    reg = regression.float().reshape(B, R, H * W).gather(2, cell[:, None].expand(B, R, cell.shape[1]))  # [B, R, k]
    reg = reg.transpose(1, 2)  # [B, k, R]
    centres = torch.as_tensor(grid.cell_centers(), dtype=torch.float32, device=reg.device).reshape(H * W, 2)
    xy = centres[cell] + reg[..., 0:2] * grid.resolution_m  # [B, k, 2]
    size = torch.exp(reg[..., 3:6].clamp(max=8.0))  # [B, k, 3] width, length, height (m)
    yaw = torch.atan2(reg[..., 6], reg[..., 7])  # [B, k]
    boxes = torch.cat([xy, reg[..., 2:3], size, yaw[..., None]], dim=-1)  # [B, k, 7]
    keep = top_scores > threshold  # [B, k]
    batch_index = torch.arange(B, device=reg.device)[:, None].expand_as(cls)
    return Detections(
        boxes=boxes[keep].cpu().numpy().astype(np.float32),
        velocity=reg[..., 8:10][keep].cpu().numpy().astype(np.float32),
        scores=top_scores[keep].cpu().numpy().astype(np.float32),
        classes=cls[keep].cpu().numpy().astype(np.int64),
        batch_index=batch_index[keep].cpu().numpy().astype(np.int64),
    )
