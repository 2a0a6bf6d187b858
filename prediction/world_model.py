"""The JEPA world model's predictor: the BEV latent stepped forward under the ego's motion, plus the EMA target.

The latent ``z`` lives on the latent grid (``fuser.latent_grid()``) in the ego frame of the present keyframe t0
and stays in that frame for the whole rollout (the target encoder's future latents are warped into t0 too). The
ego moves inside that fixed frame, so ``rollout`` carries the ego's pose in t0 (``t0_from_ego``: x, y, yaw) from
step to step and ``step`` is told where the ego is at the start of the step: the net sees every cell's position
both in t0 and in the current ego frame, and the step's action (FiLM in every block, and broadcast as input
channels).

    z_1 = step(z_0, a_0, pose_0),  pose_1 = compose_ego_pose(pose_0, a_0),  z_2 = step(z_1, a_1, pose_1), ...

Notation:
    B  samples      C  latent channels      H, W  latent rows (along +x) and columns (along +y)
    F  rolled-out steps (0.5 s each)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from bevjepa.datasets import geometry
from bevjepa.fusion import fuser


@dataclass(frozen=True)
class PredictorConfig:
    """The predictor P: ẑ_{t+1} = P(ẑ_t, a_t).

    Attributes:
        channels: C, latent channels (input and output).
        action_dim: entries of an action; must be 3 (dx, dy in m, dyaw in rad, in the frame of the step's start).
        hidden: width of the residual blocks.
        blocks: action-conditioned residual blocks per step.
        groups: GroupNorm groups; must divide ``hidden``.
        action_scale: what (dx m, dy m, dyaw rad) are divided by before the net sees them (about one step's size).
        output_init_scale: the output projection's initial weights are scaled by this, so that an untrained
            predictor starts close to persistence (z_next ≈ z).
        grid: the latent's grid; its cell centres give the coordinate channels.
    """

    channels: int = 64
    action_dim: int = 3
    hidden: int = 96
    blocks: int = 2
    groups: int = 8
    action_scale: tuple[float, float, float] = (5.0, 5.0, 0.25)
    output_init_scale: float = 0.1
    grid: geometry.GridSpec = field(default_factory=fuser.latent_grid)

    def __post_init__(self) -> None:
        if self.action_dim != 3:
            raise ValueError(f"PredictorConfig.action_dim must be 3 (dx, dy, dyaw), got {self.action_dim}")
        for name in ("channels", "hidden", "blocks", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"PredictorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.groups:
            raise ValueError(f"PredictorConfig.groups ({self.groups}) must divide hidden ({self.hidden})")
        if len(self.action_scale) != 3 or min(self.action_scale) <= 0:
            raise ValueError(f"PredictorConfig.action_scale must be three positive numbers, got {self.action_scale}")


def compose_ego_pose(t0_from_ego: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """The ego's pose in t0 after one step.

    Args:
        t0_from_ego: [..., 3] float — the ego's pose at the step's start in t0: x, y (m), yaw (rad).
        action: [..., 3] float — the motion over the step in the frame of its start: dx, dy (m), dyaw (rad).

    Returns:
        [..., 3] the pose at the step's end in t0, yaw wrapped into [-pi, pi).
    """
    x, y, yaw = t0_from_ego.unbind(-1)
    dx, dy, dyaw = action.unbind(-1)
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    new_yaw = torch.remainder(yaw + dyaw + torch.pi, 2 * torch.pi) - torch.pi
    return torch.stack([x + cos * dx - sin * dy, y + sin * dx + cos * dy, new_yaw], dim=-1)


class _FiLMBlock(nn.Module):
    """Pre-norm residual block whose middle activations are scaled and shifted by the action (FiLM)."""

    def __init__(self, hidden: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, hidden)
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)

    def forward(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """h: [B, D, H, W]; scale, shift: [B, D] → [B, D, H, W]."""
        y = self.conv1(torch.nn.functional.silu(self.norm1(h)))
        y = self.norm2(y) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        y = self.conv2(torch.nn.functional.silu(y))
        return h + y


class Predictor(nn.Module):
    """Action-conditioned residual conv net: ``step(z, action) -> z_next`` on the latent grid, in the t0 frame."""

    def __init__(self, config: PredictorConfig = PredictorConfig()) -> None:
        super().__init__()
        self.config = config
        c, d = config.channels, config.hidden
        coord_channels, action_channels = 4, 3  # (x, y) in t0 and in the current ego frame; (dx, dy, dyaw)
        self.stem = nn.Conv2d(c + coord_channels + action_channels, d, 3, padding=1)
        self.film = nn.Sequential(nn.Linear(action_channels, d), nn.SiLU(), nn.Linear(d, config.blocks * 2 * d))
        self.blocks = nn.ModuleList(_FiLMBlock(d, config.groups) for _ in range(config.blocks))
        self.out_norm = nn.GroupNorm(config.groups, d)
        self.out = nn.Conv2d(d, c, 1)
        with torch.no_grad():
            self.out.weight.mul_(config.output_init_scale)
            self.out.bias.zero_()

        grid = config.grid
        centers = torch.as_tensor(grid.cell_centers(), dtype=torch.float32).permute(2, 0, 1)  # [2, H, W] x, y (m)
        self.register_buffer("cell_xy", centers, persistent=False)
        self.coord_scale_m = max(abs(grid.x_min_m), abs(grid.x_max_m), abs(grid.y_min_m), abs(grid.y_max_m))
        self.register_buffer("action_scale", torch.tensor(config.action_scale, dtype=torch.float32), persistent=False)

    def step(self, z: torch.Tensor, action: torch.Tensor, t0_from_ego: torch.Tensor | None = None) -> torch.Tensor:
        """One step (0.5 s) of the latent.

        Args:
            z: [B, C, H, W] float — the latent at the step's start, in t0.
            action: [B, 3] float — the ego's motion over the step: dx, dy (m), dyaw (rad) in the frame of its start.
            t0_from_ego: [B, 3] float — the ego's pose (x, y m, yaw rad) in t0 at the step's start; None: at the
                origin (the first step). ``rollout`` passes it, composed with ``compose_ego_pose``.

        Returns:
            [B, C, H, W] the latent at the step's end, in t0.
        """
        B, C, H, W = z.shape
        if (C, H, W) != (self.config.channels, *self.config.grid.shape):
            raise ValueError(
                f"z: expected [B, {self.config.channels}, {self.config.grid.shape[0]}, "
                f"{self.config.grid.shape[1]}], got {list(z.shape)}"
            )
        if action.shape != (B, 3):
            raise ValueError(f"action: expected [{B}, 3], got {list(action.shape)}")
        if t0_from_ego is None:
            t0_from_ego = z.new_zeros(B, 3)
        if t0_from_ego.shape != (B, 3):
            raise ValueError(f"t0_from_ego: expected [{B}, 3], got {list(t0_from_ego.shape)}")

        # Coordinate channels: each cell centre in t0, and in the ego frame at the step's start.
        t0_xy = self.cell_xy.to(z.dtype).expand(B, 2, H, W)  # [B, 2, H, W]
        rel = t0_xy - t0_from_ego[:, :2, None, None]  # [B, 2, H, W] ego → cell, in t0 axes
        cos = torch.cos(t0_from_ego[:, 2])[:, None, None]  # [B, 1, 1]
        sin = torch.sin(t0_from_ego[:, 2])[:, None, None]
        ego_x = cos * rel[:, 0] + sin * rel[:, 1]  # [B, H, W]
        ego_y = -sin * rel[:, 0] + cos * rel[:, 1]
        coords = torch.cat([t0_xy, ego_x[:, None], ego_y[:, None]], dim=1) / self.coord_scale_m  # [B, 4, H, W]

        a = action / self.action_scale.to(z.dtype)  # [B, 3]
        x = torch.cat([z, coords, a[:, :, None, None].expand(B, 3, H, W)], dim=1)  # [B, C + 7, H, W]
        h = self.stem(x)  # [B, D, H, W]
        film = self.film(a).view(B, self.config.blocks, 2, self.config.hidden)  # [B, blocks, (scale, shift), D]
        for k, block in enumerate(self.blocks):
            h = block(h, film[:, k, 0], film[:, k, 1])
        return z + self.out(torch.nn.functional.silu(self.out_norm(h)))  # [B, C, H, W]

    def rollout(self, z0: torch.Tensor, actions: torch.Tensor, t0_from_ego: torch.Tensor | None = None) -> torch.Tensor:
        """F steps of ``step`` from z0, the ego's pose composed along the way.

        Args:
            z0: [B, C, H, W] float — the latent at t0.
            actions: [B, F, 3] float — the ego's motion over each step (dx, dy m, dyaw rad) in the step's start frame.
            t0_from_ego: [B, 3] float — the ego's pose in t0 at z0; None: the origin (z0 is the t0 latent).

        Returns:
            [B, F, C, H, W] the latents at steps 1..F, in t0.
        """
        B, F, _ = actions.shape
        pose = z0.new_zeros(B, 3) if t0_from_ego is None else t0_from_ego
        z = z0
        out = []
        for k in range(F):
            z = self.step(z, actions[:, k], pose)
            pose = compose_ego_pose(pose, actions[:, k])
            out.append(z)
        return torch.stack(out, dim=1)  # [B, F, C, H, W]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """Move ``target`` toward ``online`` in place: ``t = decay * t + (1 - decay) * o``.

    Applies to every parameter and every floating-point buffer (integer buffers, such as BatchNorm's batch
    counter, are copied). The two modules must have the same parameter and buffer names.

    Args:
        target: the EMA copy (from ``copy_for_target``).
        online: the module trained by gradient descent.
        decay: in [0, 1]; 1 leaves the target as it is, 0 copies the online module.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for kind, t_items, o_items in (
        ("parameters", dict(target.named_parameters()), dict(online.named_parameters())),
        ("buffers", dict(target.named_buffers()), dict(online.named_buffers())),
    ):
        if t_items.keys() != o_items.keys():
            raise ValueError(f"ema_update: target and online {kind} differ: {sorted(set(t_items) ^ set(o_items))[:5]}")
        for name, t in t_items.items():
            o = o_items[name].detach()
            if t.is_floating_point():
                t.lerp_(o.to(t.dtype), 1.0 - decay)
            else:
                t.copy_(o)


def copy_for_target(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad`` off everywhere: the EMA target encoder's starting point.

    The copy keeps the module's train/eval mode; call ``.eval()`` on it if its normalisation layers should stop
    updating running statistics.
    """
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target
