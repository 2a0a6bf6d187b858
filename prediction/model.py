"""The BEV JEPA model, top to bottom: encoder E (perception + fusion), EMA target encoder, predictor, heads.

    frames (own ego frames) ─ camera Lift-Splat ─┐
                            └ LiDAR pillars ─────┴ fuse ─ warp into t0 ─ temporal fuse ─ z_t0
    z_t0 ─ predictor(a_1) ─ ẑ_1 ─ predictor(a_2) ─ … ─ ẑ_F          (actions: the ego's motion per step)
    heads: occupancy on z_t0, ẑ_1..ẑ_F · trajectories (K modes) from z_t0 and the rollout · detection on z_t0
    JEPA: ẑ_k against z̄_k = Ē(frames k-P+1..k), the EMA target encoder on the observed future, in t0's frame

Notation:
    B  batch      P  past frames (t0 last)     F  rollout steps      T  trajectory steps     K  modes
    A  agents     C  latent channels           H, W  latent grid (32 × 32)   M  points
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from bevjepa.datasets import geometry, torch_dataset
from bevjepa.fusion import fuser
from bevjepa.perception import camera as camera_encoder
from bevjepa.perception import lidar as lidar_encoder
from bevjepa.prediction import heads, losses, occupancy_thresholds, world_model


@dataclass(frozen=True)
class ModelConfig:
    """The whole model.

    Attributes:
        camera: the camera encoder.
        lidar: the LiDAR encoder.
        fuser: fusion and temporal alignment.
        predictor: the action-conditioned predictor.
        use_camera: encode the cameras (False: LiDAR only).
        use_lidar: encode the LiDAR (False: cameras only).
        occupancy_steps: F, rollout steps (0.5 s each).
        trajectory_steps: T, trajectory steps (0.5 s each).
        modes: K, trajectory modes.
        classes: predicted classes.
        grid: the target grid that occupancy is predicted on.
        world_model: roll the latent out with the predictor (False: the direct baseline, which decodes every
            horizon's occupancy at once from z_t0 and has no predictor and no JEPA loss).
        decoder_widths: widths of the decoder's levels, finest first (0.5 m, 1 m): ``heads.BevDecoder``.
        skip_frames: the input keyframes, newest last, whose finer LiDAR maps the decoder reads (1: the present
            keyframe's alone; at most ``fuser.past_frames``): each is warped into the present ego frame and a
            1 x 1 convolution adds what they show to the present keyframe's maps (``BevJepa.present_skips``).
        flow_refine: refine the world model's flow on the 1 m grid from the LiDAR maps there
            (``heads.FlowRefiner``); False: the flow of the 2 m latent, upsampled.
        flow_refine_detached: the refiner reads the maps and the coarse flow detached, so that its residual learns
            without pulling on the LiDAR encoder (whose 1 m maps the detection head shares) or the latent's flow.
        decoder_step_film: every decoder level scales and shifts its features by the step it decodes
            (``heads.BevDecoder``); False: the step embedding at the decoder's input alone.
        chained_flow: the flow head reads each rolled-out latent against the step before it, and the steps' offsets
            are composed into the offset from t0 (``BevJepa.flow_of``): each step's motion (at most a few metres)
            stays within the head's reach of ±3 latent cells; False: every step read against z_t0 directly.
        present_occupancy: every step's occupancy logits add a reading of t0's finest decoder features, one 1 x 1
            convolution with an output per horizon (the direct baseline's head inside the world model; it starts
            at zero): what the sensors saw sharply at t0 reaches every horizon unwarped, and the rolled-out latent
            decodes what moved (``BevJepa.scene``). False: each step from its own latent alone.
    """

    camera: camera_encoder.CameraEncoderConfig = field(default_factory=camera_encoder.CameraEncoderConfig)
    lidar: lidar_encoder.LidarEncoderConfig = field(default_factory=lidar_encoder.LidarEncoderConfig)
    fuser: fuser.FuserConfig = field(default_factory=fuser.FuserConfig)
    predictor: world_model.PredictorConfig = field(default_factory=world_model.PredictorConfig)
    use_camera: bool = True
    use_lidar: bool = True
    occupancy_steps: int = 4
    trajectory_steps: int = 12
    modes: int = 10
    classes: int = 3
    grid: geometry.GridSpec = field(default_factory=geometry.GridSpec)
    world_model: bool = True
    decoder_widths: tuple[int, int] = (16, 32)
    skip_frames: int = 1
    flow_refine: bool = False
    flow_refine_detached: bool = False
    decoder_step_film: bool = False
    chained_flow: bool = False
    present_occupancy: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.skip_frames <= self.fuser.past_frames:
            raise ValueError(
                f"ModelConfig.skip_frames: between 1 and fuser.past_frames ({self.fuser.past_frames}), "
                f"got {self.skip_frames}"
            )
        if not (self.use_camera or self.use_lidar):
            raise ValueError("ModelConfig: use_camera and use_lidar cannot both be False")
        if len(self.decoder_widths) != 2 or min(self.decoder_widths) < 1:
            raise ValueError(f"ModelConfig.decoder_widths: two positive widths (0.5 m, 1 m), got {self.decoder_widths}")
        if self.flow_refine and not (self.world_model and self.use_lidar):
            raise ValueError("ModelConfig.flow_refine: needs the world model and the LiDAR's 1 m maps")
        if self.flow_refine_detached and not self.flow_refine:
            raise ValueError("ModelConfig.flow_refine_detached: needs flow_refine")
        if self.present_occupancy and not self.world_model:
            raise ValueError("ModelConfig.present_occupancy: needs the world model (the direct baseline reads t0 only)")
        grids = {
            "grid": self.grid,
            "camera.splat_grid": self.camera.splat_grid,
            "camera.out_grid": self.camera.out_grid,
            "lidar.pillar_grid": self.lidar.pillar_grid,
            "lidar.out_grid": self.lidar.out_grid,
            "fuser.grid": self.fuser.grid,
            "predictor.grid": self.predictor.grid,
        }
        extent = _extent(self.grid)
        for name, grid in grids.items():
            if _extent(grid) != extent:
                raise ValueError(
                    f"ModelConfig.{name}: spans {_extent(grid)} m but grid spans {extent} m; every grid of a model "
                    "covers the same area (x_min, x_max, y_min, y_max)"
                )
        latents = {name: grids[name] for name in ("camera.out_grid", "lidar.out_grid", "predictor.grid")}
        for name, grid in latents.items():
            if grid != self.fuser.grid:
                raise ValueError(
                    f"ModelConfig.{name}: must be the latent grid fuser.grid ({self.fuser.grid}), got {grid}"
                )

    def on_sensors(self, sensors: str) -> ModelConfig:
        """The same model on ``both`` sensors, the ``lidar`` or the ``camera`` alone (``bevjepa train --sensors``).

        Without the LiDAR there are no 1 m maps to refine the flow on, so the refiner goes with it.
        """
        if sensors not in ("both", "lidar", "camera"):
            raise ValueError(f"ModelConfig.on_sensors: both, lidar or camera, got {sensors!r}")
        lidar = sensors != "camera"
        return replace(
            self,
            use_camera=sensors != "lidar",
            use_lidar=lidar,
            flow_refine=self.flow_refine and lidar,
            flow_refine_detached=self.flow_refine_detached and lidar,
        )

    def direct_baseline(self) -> ModelConfig:
        """The direct baseline of this model: its LiDAR encoder and decoder, every horizon at once from z_t0.

        No cameras, and nothing that belongs to the rollout: no flow to refine, no steps for the decoder to tell
        apart (``decoder_step_film``).
        """
        return replace(
            self,
            use_camera=False,
            use_lidar=True,
            world_model=False,
            decoder_step_film=False,
            flow_refine=False,
            flow_refine_detached=False,
            present_occupancy=False,
        )


def _extent(grid: geometry.GridSpec) -> tuple[float, float, float, float]:
    return (grid.x_min_m, grid.x_max_m, grid.y_min_m, grid.y_max_m)


@dataclass(frozen=True)
class SensorFrames:
    """Sensor inputs of S frames per sample, everything in one reference frame (t0).

    Attributes:
        points: [M, 5] float32 — x, y, z (m, reference frame), intensity, time lag (s).
        points_frame: [M] int64 — the frame (0..S-1) of each point.
        points_batch: [M] int64 — the sample (0..B-1) of each point.
        images: [B, S, 6, 3, Hc, Wc] uint8.
        camera_mask: [B, S, 6] bool.
        intrinsics: [B, S, 6, 3, 3] float32.
        reference_from_camera: [B, S, 6, 4, 4] float32.
        reference_from_ego: [B, S, 4, 4] float32 — each frame's ego pose in the reference frame.
    """

    points: torch.Tensor
    points_frame: torch.Tensor
    points_batch: torch.Tensor
    images: torch.Tensor
    camera_mask: torch.Tensor
    intrinsics: torch.Tensor
    reference_from_camera: torch.Tensor
    reference_from_ego: torch.Tensor

    @staticmethod
    def past(batch: torch_dataset.WindowBatch) -> SensorFrames:
        """The window's P input frames."""
        return SensorFrames(
            batch.points,
            batch.points_frame,
            batch.points_batch,
            batch.images,
            batch.camera_mask,
            batch.intrinsics,
            batch.t0_from_camera,
            batch.t0_from_ego,
        )

    @staticmethod
    def observed_sequence(batch: torch_dataset.WindowBatch) -> SensorFrames:
        """The P input frames followed by the F future ones (the target encoder's view), S = P + F."""
        future = batch.future
        if future is None:
            raise ValueError("the batch has no future inputs: load the dataset with future_inputs=True")
        p = batch.images.shape[1]
        return SensorFrames(
            points=torch.cat([batch.points, future.points]),
            points_frame=torch.cat([batch.points_frame, future.points_frame + p]),
            points_batch=torch.cat([batch.points_batch, future.points_batch]),
            images=torch.cat([batch.images, future.images], dim=1),
            camera_mask=torch.cat([batch.camera_mask, future.camera_mask], dim=1),
            intrinsics=torch.cat([batch.intrinsics, future.intrinsics], dim=1),
            reference_from_camera=torch.cat([batch.t0_from_camera, future.t0_from_camera], dim=1),
            reference_from_ego=torch.cat([batch.t0_from_ego, future.t0_from_ego], dim=1),
        )


@dataclass(frozen=True)
class FrameEncoding:
    """Every frame's encoding, each in its own ego frame.

    Attributes:
        latents: [B, S, C, H, W] float — the fused latents on the latent grid.
        fine: the LiDAR's finer maps, finest first (``LidarEncoder.pyramid`` without its latent): the 0.5 m
            map [B, S, Cf, 4H, 4W] and the 1 m stage [B, S, Cl, 2H, 2W]; empty without LiDAR.
    """

    latents: torch.Tensor
    fine: tuple[torch.Tensor, ...] = ()

    def frame(self, index: int) -> FrameEncoding:
        """Frame ``index`` of every sample, S = 1."""
        return FrameEncoding(self.latents[:, index : index + 1], tuple(f[:, index : index + 1] for f in self.fine))

    def sample(self, index: int) -> FrameEncoding:
        """Sample ``index`` alone, B = 1."""
        return FrameEncoding(self.latents[index : index + 1], tuple(f[index : index + 1] for f in self.fine))

    @staticmethod
    def stack(frames: list[FrameEncoding], dim: int = 1) -> FrameEncoding:
        """Encodings concatenated along ``dim`` (1: frames, 0: samples)."""
        return FrameEncoding(
            torch.cat([f.latents for f in frames], dim=dim),
            tuple(torch.cat(level, dim=dim) for level in zip(*(f.fine for f in frames), strict=True)),
        )


class BevEncoder(nn.Module):
    """E: encode every frame in its own ego frame, fuse the modalities, warp into the reference frame."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.camera = camera_encoder.CameraEncoder(config.camera) if config.use_camera else None
        self.lidar = lidar_encoder.LidarEncoder(config.lidar) if config.use_lidar else None
        self.fuse = fuser.BevFuser(config.fuser)
        self.temporal = fuser.TemporalFuser(config.fuser)
        self.modality_dropout = True
        """Whether training drops modalities (``FuserConfig.modality_dropout``); the EMA target encoder never does."""

    def encode_frames(self, frames: SensorFrames, fine: bool = True) -> FrameEncoding:
        """Every frame's fused latent, and the LiDAR's finer maps (``fine``), in that frame's own ego frame.

        A frame's own encoding does not depend on the reference frame, so a stream of forecasts can encode each
        keyframe once and reuse it (``Forecaster(cache_frames=...)``).
        """
        b, s = frames.reference_from_ego.shape[:2]
        ego_from_reference = torch.linalg.inv(frames.reference_from_ego.reshape(b * s, 4, 4))  # [B*S, 4, 4]
        camera_bev = lidar_bev = None
        levels: list[torch.Tensor] = []
        if self.camera is not None:
            with geometry.float32_geometry(ego_from_reference.device.type):
                own_from_camera = ego_from_reference[:, None] @ frames.reference_from_camera.reshape(b * s, 6, 4, 4)
            camera_bev = self.camera(
                frames.images.reshape(b * s, *frames.images.shape[2:]),  # [B*S, 6, 3, Hc, Wc]
                frames.intrinsics.reshape(b * s, 6, 3, 3),
                own_from_camera,
                frames.camera_mask.reshape(b * s, 6),
            )  # [B*S, Cc, H, W]
        if self.lidar is not None:
            owner = frames.points_batch * s + frames.points_frame  # [M] index into B*S
            transform = ego_from_reference[owner]  # [M, 4, 4]
            with geometry.float32_geometry(transform.device.type):
                xyz = torch.einsum("mij,mj->mi", transform[:, :3, :3], frames.points[:, :3]) + transform[:, :3, 3]
            points = torch.cat([xyz, frames.points[:, 3:]], dim=1)  # [M, 5] in each frame's own ego frame
            *levels, lidar_bev = self.lidar.pyramid(points, owner, b * s)  # finest first; [B*S, Cl, H, W]
        if self.training and self.modality_dropout and self.config.fuser.modality_dropout > 0:
            keep_camera, keep_lidar = fuser.drop_modalities(
                b * s, self.config.fuser.modality_dropout, frames.points.device
            )
            if camera_bev is not None:
                camera_bev = camera_bev * keep_camera[:, None, None, None]
            if lidar_bev is not None:
                lidar_bev = lidar_bev * keep_lidar[:, None, None, None]
                levels = [level * keep_lidar[:, None, None, None] for level in levels]
        fused = self.fuse(camera_bev, lidar_bev)  # [B*S, C, H, W]
        kept = tuple(level.reshape(b, s, *level.shape[1:]) for level in levels) if fine else ()
        return FrameEncoding(fused.reshape(b, s, *fused.shape[1:]), kept)

    def own_frame_latents(self, frames: SensorFrames) -> torch.Tensor:
        """Every frame's fused latent in that frame's own ego frame: [B, S, C, H, W]."""
        return self.encode_frames(frames, fine=False).latents

    def warp(self, own_latents: torch.Tensor, reference_from_ego: torch.Tensor) -> torch.Tensor:
        """Own-frame latents [B, S, C, H, W] warped into the reference frame by ``reference_from_ego`` [B, S, 4, 4]."""
        b, s = own_latents.shape[:2]
        warped = fuser.warp_to_reference(
            own_latents.reshape(b * s, *own_latents.shape[2:]),
            reference_from_ego.reshape(b * s, 4, 4),
            self.config.fuser.grid,
        )  # [B*S, C, H, W]
        return warped.reshape(b, s, *warped.shape[1:])

    def frame_latents(self, frames: SensorFrames) -> torch.Tensor:
        """Every frame's fused latent, warped into the reference frame: [B, S, C, H, W]."""
        return self.warp(self.own_frame_latents(frames), frames.reference_from_ego)

    def forward(self, frames: SensorFrames) -> torch.Tensor:
        """The latent of the last P frames: [B, C, H, W] (S must equal P)."""
        return self.temporal(self.frame_latents(frames))


def select_frames(frames: SensorFrames, keep: list[int]) -> SensorFrames:
    """The frames ``keep`` (indices into S) of every sample, renumbered 0..len(keep)-1 in that order."""
    s = frames.reference_from_ego.shape[1]
    renumber = torch.full((s,), -1, dtype=torch.long, device=frames.points.device)
    renumber[keep] = torch.arange(len(keep), device=frames.points.device)
    new_frame = renumber[frames.points_frame]  # [M]
    kept = new_frame >= 0
    index = torch.as_tensor(keep, device=frames.points.device)
    return SensorFrames(
        frames.points[kept],
        new_frame[kept],
        frames.points_batch[kept],
        frames.images[:, index],
        frames.camera_mask[:, index],
        frames.intrinsics[:, index],
        frames.reference_from_camera[:, index],
        frames.reference_from_ego[:, index],
    )


@dataclass(frozen=True)
class ModelOutput:
    """What the model predicts for a batch (all in the t0 ego frame).

    Attributes:
        latent: [B, C, H, W] z_t0.
        rollout: [B, F, C, H, W] ẑ_1..ẑ_F (without a world model: z_t0 repeated).
        occupancy_logits: [B, S, classes, 128, 128] the steps ``decoded`` (all F + 1 unless training drew fewer).
        modes: [B, A, K, T, 2] xy (m) of each agent's K trajectory modes.
        mode_logits: [B, A, K].
        heatmap_logits: [B, classes, 64, 64] detection heat-map at t0.
        regression: [B, 10, 64, 64] detection box regression at t0 (see ``heads.REGRESSION_CHANNELS``).
        own: the input frames' encodings, each in its own ego frame (P frames).
        skips: the finer LiDAR maps the decoder reads, in t0 (``BevJepa.present_skips``), finest first.
        flow: [B, F + 1, 2, H, W] where each cell's content was at t0 (x, y m; ``BevJepa.flow_of``: on the latent
            grid, or the 1 m grid with ``ModelConfig.flow_refine``), zero at step 0; None without a world model.
        decoded: the S steps of ``occupancy_logits`` (0: t0), ascending; None: every step 0..F.
        present_logits: [B, F + 1, classes, 128, 128] the part of every horizon's occupancy logits read from t0's
            features (``ModelConfig.present_occupancy``; ``occupancy_logits`` include it); None without it.
    """

    latent: torch.Tensor
    rollout: torch.Tensor
    occupancy_logits: torch.Tensor
    modes: torch.Tensor
    mode_logits: torch.Tensor
    heatmap_logits: torch.Tensor
    regression: torch.Tensor
    own: FrameEncoding
    skips: tuple[torch.Tensor, ...]
    flow: torch.Tensor | None = None
    decoded: tuple[int, ...] | None = None
    present_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class SceneOutput:
    """What the model predicts before it reads any agent: ``ModelOutput`` without the trajectory modes.

    The forecaster tracks the agents from this output's t0 detection, then runs the trajectory head on them
    (``BevJepa.agent_modes``), so that the scene is encoded, rolled out and decoded once. Fields as in
    ``ModelOutput``.
    """

    latent: torch.Tensor
    rollout: torch.Tensor
    occupancy_logits: torch.Tensor
    heatmap_logits: torch.Tensor
    regression: torch.Tensor
    own: FrameEncoding
    skips: tuple[torch.Tensor, ...]
    flow: torch.Tensor | None = None
    decoded: tuple[int, ...] | None = None
    present_logits: torch.Tensor | None = None


class BevJepa(nn.Module):
    """The model: ``forward`` predicts; ``target_latents`` encodes the observed future with the EMA encoder."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = BevEncoder(config)
        self.target_encoder = world_model.copy_for_target(self.encoder)
        self.target_encoder.modality_dropout = False
        self.predictor = world_model.Predictor(config.predictor) if config.world_model else None
        self.flow = heads.FlowHead(config.fuser.channels) if config.world_model else None
        channels, f = config.fuser.channels, config.occupancy_steps
        skip_channels = (
            (config.lidar.fine_channels, config.lidar.channels) if config.use_lidar else (0, 0)
        )  # the LiDAR's 0.5 m map and 1 m stage
        fine, coarse = config.decoder_widths
        self.decoder = heads.BevDecoder(
            channels,
            skip_channels,
            config.decoder_widths,
            steps=f + 1,
            step_film=config.decoder_step_film,
        )
        self.flow_refiner = (
            heads.FlowRefiner(skip_channels[1], steps=f, detached=config.flow_refine_detached)
            if config.flow_refine
            else None
        )
        self.skip_mix = nn.ModuleList()
        if config.skip_frames > 1 and config.use_lidar:  # without LiDAR there are no fine maps to mix
            for c in skip_channels:
                mix = nn.Conv2d(c * config.skip_frames, c, 1)
                nn.init.zeros_(mix.weight)  # starts as the present keyframe's maps alone
                nn.init.zeros_(mix.bias)
                self.skip_mix.append(mix)
        self.occupancy = heads.OccupancyHead(fine, classes=config.classes, horizons=1 if config.world_model else f + 1)
        self.present_occupancy = None
        if config.present_occupancy:
            self.present_occupancy = heads.OccupancyHead(fine, classes=config.classes, horizons=f + 1)
            nn.init.zeros_(self.present_occupancy.decode.weight)  # starts as the world model without it
            nn.init.zeros_(self.present_occupancy.decode.bias)
        self.trajectory = heads.TrajectoryHead(
            channels=channels,
            modes=config.modes,
            steps=config.trajectory_steps,
            past_steps=config.fuser.past_frames,
            grid=config.fuser.grid,
        )
        self.detection = heads.DetectionHead(width=coarse, classes=config.classes, grid=self.level_grid(1))
        # [C] each class's decision threshold as a logit (``occupancy_thresholds``); not part of the weights
        self.register_buffer("occupancy_logit_shift", torch.zeros(config.classes), persistent=False)

    def occupancy_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """The published occupancy probabilities [..., C, H, W] of logits [..., C, H, W].

        Each class's logits are shifted by its decision threshold's logit (``occupancy_thresholds``), so that 0.5
        is the threshold; with none chosen, the plain sigmoid.
        """
        return torch.sigmoid(logits - self.occupancy_logit_shift.to(logits.dtype)[:, None, None])

    def set_occupancy_thresholds(self, thresholds: occupancy_thresholds.OccupancyThresholds | None) -> None:
        """Use ``thresholds`` in ``occupancy_probability`` (None: back to 0.5 for every class).

        Raises:
            ValueError: thresholds for other classes than the model's.
        """
        if thresholds is None:
            self.occupancy_logit_shift.zero_()
            return
        if len(thresholds.classes) != self.config.classes:
            raise ValueError(
                f"occupancy thresholds for {len(thresholds.classes)} classes; the model has {self.config.classes}"
            )
        self.occupancy_logit_shift.copy_(torch.as_tensor(thresholds.logit_shift()))

    def train(self, mode: bool = True) -> BevJepa:
        """As ``nn.Module.train``; the EMA target encoder always stays in eval mode (running statistics, no dropout)."""
        super().train(mode)
        self.target_encoder.eval()
        return self

    def present_skips(
        self, fine: tuple[torch.Tensor, ...], present_from_frame: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The finer LiDAR maps the decoder reads, in the present keyframe's ego frame (``ModelConfig.skip_frames``).

        Args:
            fine: the levels of ``FrameEncoding.fine`` of S frames, newest (the present) last: [N, S, Ck, Hk, Wk],
                each frame in its own ego frame.
            present_from_frame: [N, S, 4, 4] each frame's ego pose in the present one's.

        Returns:
            Per level [N, Ck, Hk, Wk]: the present keyframe's maps, plus a learnt mix of the last ``skip_frames``
            frames' maps warped into its frame.
        """
        q = self.config.skip_frames
        skips = []
        for level, maps in enumerate(fine):
            present = maps[:, -1]  # [N, Ck, Hk, Wk]
            if q > 1:
                n = maps.shape[0]
                past = fuser.warp_to_reference(  # the present keyframe is in its own frame already
                    maps[:, -q:-1].flatten(0, 1), present_from_frame[:, -q:-1].flatten(0, 1), self.level_grid(level)
                ).unflatten(0, (n, q - 1))  # [N, q - 1, Ck, Hk, Wk]
                stacked = torch.cat([past.flatten(1, 2), present], dim=1)  # [N, q * Ck, Hk, Wk], oldest first
                present = present + self.skip_mix[level](stacked)
            skips.append(present)
        return tuple(skips)

    def decode(
        self,
        latents: torch.Tensor,
        steps: list[int],
        skips: tuple[torch.Tensor, ...],
        flow: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The decoder's features of latents in the t0 frame, with the present keyframe's finer LiDAR maps.

        Args:
            latents: [B, S, C, H, W] float — z_t0, rolled-out or target latents.
            steps: S step indices (0: t0, k: k steps ahead), one per latent.
            skips: the finer maps in t0 (``present_skips``), finest first: [B, Ck, Hk, Wk] each; empty without
                LiDAR.
            flow: [B, S, 2, H, W] source offsets (m) that warp the fine maps for each latent (``heads.FlowHead``);
                None: the fine maps as they were at t0.

        Returns:
            The features of every level, finest first: [B, S, D_l, H_l, W_l].
        """
        b, s = latents.shape[:2]
        per_latent = []
        for level, present in enumerate(skips):
            maps = present.repeat_interleave(s, dim=0)  # [B*S, Ck, Hk, Wk]
            if flow is not None:
                maps = heads.warp_by_offset(maps, flow.reshape(b * s, *flow.shape[2:]), self.level_grid(level))
            per_latent.append(maps)
        step = torch.as_tensor(steps, device=latents.device).repeat(b)  # [B*S]
        features = self.decoder(latents.reshape(b * s, *latents.shape[2:]), per_latent, step)
        return [f.reshape(b, s, *f.shape[1:]) for f in features]

    def level_grid(self, level: int) -> geometry.GridSpec:
        """The grid of the decoder's level ``level`` (0: the target grid; each next level twice as coarse)."""
        g = self.config.grid
        return geometry.GridSpec(g.x_min_m, g.x_max_m, g.y_min_m, g.y_max_m, g.resolution_m * 2**level)

    def flow_of(self, latents: torch.Tensor, z0: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Source offsets (m) of steps 0..S: zero at t0, then where each cell of a rolled-out latent was at t0.

        Without ``ModelConfig.chained_flow`` the head reads every latent against z_t0. With it, the head reads each
        latent z_k against z_{k-1}, and the offsets compose: a cell at x in step k came from x + d_k(x) in step
        k - 1, which came from there plus D_{k-1} at that point, so D_k(x) = d_k(x) + D_{k-1}(x + d_k(x)).

        Args:
            latents: [B, S, C, H, W] the latents of steps 1..S.
            z0: [B, C, H, W] z_t0.
            skips: the finer maps in t0, as ``present_skips`` returns them (read with ``ModelConfig.flow_refine``).

        Returns:
            [B, S + 1, 2, h, w]: on the latent grid, or the 1 m grid with ``ModelConfig.flow_refine``.
        """
        b, s = latents.shape[:2]
        if self.config.chained_flow:
            before = torch.cat([z0[:, None], latents[:, :-1]], dim=1)  # [B, S, C, H, W]: z_{k-1} of each step
        else:
            before = z0[:, None].expand(-1, s, *z0.shape[1:])
        offsets = self.flow(latents.flatten(0, 1), before.flatten(0, 1)).unflatten(0, (b, s))  # [B, S, 2, H, W]
        if self.config.chained_flow:
            composed = [offsets[:, 0]]
            for k in range(1, s):
                step = offsets[:, k]
                composed.append(step + heads.warp_by_offset(composed[-1], step, self.config.fuser.grid))
            offsets = torch.stack(composed, dim=1)
        if self.flow_refiner is not None:
            offsets = self.flow_refiner(offsets, skips[1], list(range(1, s + 1)))
        return torch.cat([torch.zeros_like(offsets[:, :1]), offsets], dim=1)

    def occupancy_of(
        self,
        latents: torch.Tensor,
        steps: list[int],
        skips: tuple[torch.Tensor, ...],
        flow: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Occupancy logits [B, S, classes, 128, 128] decoded from latents [B, S, C, H, W] (world model only).

        The diagnostics of the open-loop report decode the held z_t0 and the target encoder's latents this way;
        ``skips`` and ``flow`` as ``decode`` takes them (``ModelOutput.skips``). ``present``: [B, S, classes, 128,
        128] the logits read from t0's features for the horizon each latent stands for (``ModelOutput.
        present_logits``), added as ``scene`` adds them; needed with ``ModelConfig.present_occupancy``.

        Raises:
            ValueError: the direct baseline; ``present`` missing with ``ModelConfig.present_occupancy``.
        """
        if not self.config.world_model:
            raise ValueError("occupancy_of: the direct baseline decodes every horizon from z_t0 at once")
        if (present is None) != (self.present_occupancy is None):
            raise ValueError(
                "occupancy_of: pass present (ModelOutput.present_logits) exactly when the model reads the present "
                f"(ModelConfig.present_occupancy={self.config.present_occupancy})"
            )
        fine = self.decode(latents, steps, skips, flow)[0]  # [B, S, D0, 128, 128]
        b, s = fine.shape[:2]
        logits = self.occupancy(fine.reshape(b * s, *fine.shape[2:])).reshape(b, s, *self._occupancy_shape())
        return logits if present is None else logits + present

    def _occupancy_shape(self) -> tuple[int, int, int]:
        return (self.config.classes, *self.config.grid.shape)

    def forward(
        self,
        batch: torch_dataset.WindowBatch,
        actions: torch.Tensor | None = None,
        own: FrameEncoding | None = None,
        decode: tuple[int, ...] | None = None,
    ) -> ModelOutput:
        """Predict from a batch's input frames: ``scene``, then ``agent_modes`` on the batch's agents.

        Args:
            batch: the windows.
            actions: [B, F, 3] the ego actions to roll out under; None takes the batch's own future actions.
            own: the input frames' encodings in their own ego frames, when already encoded
                (``BevEncoder.encode_frames``); None encodes the batch's sensors.
            decode: the steps whose occupancy the world model decodes, ascending and starting with 0 (training
                draws a few: ``decoded_steps``); None decodes every step 0..F. The direct baseline decodes them all.
        """
        scene = self.scene(batch, actions, own, decode)
        modes, mode_logits = self.agent_modes(batch, scene)
        return ModelOutput(
            scene.latent, scene.rollout, scene.occupancy_logits, modes, mode_logits, scene.heatmap_logits,
            scene.regression, scene.own, scene.skips, scene.flow, scene.decoded, scene.present_logits,
        )  # fmt: skip

    def scene(
        self,
        batch: torch_dataset.WindowBatch,
        actions: torch.Tensor | None = None,
        own: FrameEncoding | None = None,
        decode: tuple[int, ...] | None = None,
    ) -> SceneOutput:
        """Everything ``forward`` predicts that reads no agent: z_t0, the rollout, occupancy and t0 detection.

        Args: as ``forward``.
        """
        if decode is not None and (not decode or decode[0] != 0 or list(decode) != sorted(set(decode))):
            raise ValueError(f"decode: ascending steps starting with 0 (t0), got {decode}")
        p, f = self.config.fuser.past_frames, self.config.occupancy_steps
        if own is None:
            own = self.encoder.encode_frames(SensorFrames.past(batch))
        latent = self.encoder.temporal(self.encoder.warp(own.latents, batch.t0_from_ego))  # [B, C, H, W]
        skips = self.present_skips(own.fine, batch.t0_from_ego)
        b = latent.shape[0]
        if self.predictor is not None:
            if actions is None:
                actions = batch.actions[:, p - 1 : p - 1 + f]  # [B, F, 3]
            rollout = self.predictor.rollout(latent, actions)  # [B, F, C, H, W]
            sequence = torch.cat([latent[:, None], rollout], dim=1)  # [B, F + 1, C, H, W]
            flow = self.flow_of(rollout, latent, skips)  # [B, F + 1, 2, h, w]
            steps = list(range(f + 1)) if decode is None else list(decode)
            fine, coarse = self.decode(sequence[:, steps], steps, skips, flow[:, steps])[:2]
            occupancy = self.occupancy(fine.reshape(b * len(steps), *fine.shape[2:])).reshape(
                b, len(steps), *self._occupancy_shape()
            )
            present = None
            if self.present_occupancy is not None:  # decoded steps start with t0: fine[:, 0] is t0's features
                present = self.present_occupancy(fine[:, 0])  # [B, F + 1, classes, 128, 128]
                occupancy = occupancy + present[:, steps]
        else:
            rollout = latent[:, None].expand(b, f, *latent.shape[1:])  # no world model: z_t0 held
            flow = present = None
            fine, coarse = self.decode(latent[:, None], [0], skips)[:2]
            occupancy = self.occupancy(fine[:, 0])  # [B, F + 1, classes, 128, 128]
            decode = None
        heatmap, regression = self.detection(coarse[:, 0])
        return SceneOutput(latent, rollout, occupancy, heatmap, regression, own, skips, flow, decode, present)

    def agent_modes(self, batch: torch_dataset.WindowBatch, scene: SceneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The trajectory head on the batch's agents (annotated or tracked): modes [B, A, K, T, 2], logits [B, A, K]."""
        return self.trajectory(
            scene.latent,
            batch.agent_box[..., :2],
            batch.agent_past,
            batch.agent_past_mask,
            batch.agent_box[..., 6],
            batch.agent_class,
            rollout=scene.rollout,
            ego_past=batch.t0_from_ego[:, :, :2, 3],
        )

    def detect_frames(
        self, own: FrameEncoding, t0_from_ego: torch.Tensor, frames: list[int], finest: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The detection head on input keyframes other than t0, each seen as the present of its own ego frame.

        Keyframe k's latent fuses the frames k-P+1..k warped into k's ego frame, the window's oldest frame
        standing in for those before it; the decoder reads k's finer LiDAR maps (``present_skips``). For k = P-1
        this is exactly ``forward``'s t0 detection.

        Args:
            own: the window's P input frames' encodings (``BevEncoder.encode_frames``).
            t0_from_ego: [B, P, 4, 4] each keyframe's ego pose in the t0 frame.
            frames: the keyframe indices k (0: oldest, P-1: t0).
            finest: the finest decoder level to decode: 1, the detection head's (0 decodes the 0.5 m level too,
                as before the speed work: ``Forecaster(reference=True)``).

        Returns:
            heat-map logits [B, len(frames), classes, 64, 64] and regressions [B, len(frames), 10, 64, 64], each
            keyframe in its own ego frame (``heads.decode_detections`` reads them).
        """
        b, p = t0_from_ego.shape[:2]
        n = len(frames)
        histories = [[max(0, k - p + 1 + i) for i in range(p)] for k in frames]  # n x P frame indices
        k_from_t0 = torch.linalg.inv(t0_from_ego[:, frames])  # [B, n, 4, 4]
        with geometry.float32_geometry(k_from_t0.device.type):
            k_from_history = k_from_t0[:, :, None] @ t0_from_ego[:, histories]  # [B, n, P, 4, 4]
        history_latents = own.latents[:, histories]  # [B, n, P, C, H, W]
        # The n keyframes side by side as one batch of B*n: one temporal fusion, one decoder pass, one head pass.
        latent = self.encoder.temporal(
            self.encoder.warp(history_latents.flatten(0, 1), k_from_history.flatten(0, 1))
        )  # [B*n, C, H, W]
        skips = list(
            self.present_skips(
                tuple(fine[:, histories].flatten(0, 1) for fine in own.fine), k_from_history.flatten(0, 1)
            )
        )  # [B*n, Ck, Hk, Wk] in each keyframe's own frame
        step = torch.zeros(b * n, dtype=torch.long, device=latent.device)
        coarse = self.decoder(latent, skips, step, finest=finest)[1 - finest]  # the detection head's level
        heatmap, regression = self.detection(coarse)  # [B*n, classes, 64, 64], [B*n, 10, 64, 64]
        return heatmap.unflatten(0, (b, n)), regression.unflatten(0, (b, n))

    @torch.no_grad()
    def target_latents(self, batch: torch_dataset.WindowBatch, steps: list[int] | None = None) -> torch.Tensor:
        """z̄_k: the EMA encoder on the observed frames k-P+1..k, in t0's frame: [B, len(steps), C, H, W].

        Args:
            batch: windows loaded with their future inputs.
            steps: the rollout steps k (1..F) to encode; None encodes all F.
        """
        frames = SensorFrames.observed_sequence(batch)
        steps = list(range(1, self.config.occupancy_steps + 1)) if steps is None else steps
        p = self.config.fuser.past_frames
        needed = sorted({s for k in steps for s in range(k, k + p)})  # frame indices in the P + F sequence
        latents = self.target_encoder.frame_latents(select_frames(frames, needed))  # [B, len(needed), C, H, W]
        position = {s: i for i, s in enumerate(needed)}
        return torch.stack(
            [self.target_encoder.temporal(latents[:, [position[s] for s in range(k, k + p)]]) for k in steps], dim=1
        )

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """Move the target encoder toward the online one (exponential moving average)."""
        world_model.ema_update(self.target_encoder, self.encoder, decay)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    Attributes:
        latent: the JEPA latent prediction loss (0 turns JEPA off).
        latent_steps: rollout steps whose target latent is encoded per iteration, drawn at random among 1..F
            (the target encoder's cost grows with it; the expected loss is the same up to scale).
        latent_into_encoder: whether the latent loss's gradient reaches the online encoder (through z_t0). False
            rolls the predictor out again from a detached z_t0 for the latent loss: the encoder learns from the
            heads alone, the predictor from the heads and the latent loss (one more predictor rollout per step).
        variance, covariance: the VICReg anti-collapse terms on z_t0 and the rollout.
        occupancy: per-class occupancy BCE over steps 0..F (a mean over every cell, hence small).
        occupancy_pos_weight: the BCE's weight on occupied cells, per class (vehicle, pedestrian, cyclist).
        occupancy_dice: the soft Dice term of the occupancy (``losses.soft_dice_loss``).
        unobserved_weight: the BCE's weight at t0 on cells the LiDAR did not observe (``WindowBatch.observed``):
            what no sensor could see is a guess, not a miss.
        flow: the source offsets against the annotated instances' motion (``losses.flow_loss``).
        flow_class_weight: the flow loss's weight on each class's cells (vehicle, pedestrian, cyclist); a
            cell's class is its target's (the largest weight where classes overlap).
        decoded_future_steps: rollout steps whose occupancy the world model decodes per training iteration, drawn
            at random among 1..F besides t0 (``draw_decoded_steps``; the 0.5 m decoder is most of a step's cost);
            the drawn steps' mean stands for the mean over all F future steps in expectation, weighed against t0 by
            ``present_share``. None: every step, every iteration. Validation always decodes every step.
        present_share: t0's share of the occupancy and Dice terms, the future steps' mean taking the rest; None:
            1 / (F + 1), every step weighing the same. A larger share trains the features the present is decoded
            from harder, as the direct baseline's every horizon does.
        trajectory: winner-takes-all regression of the trajectory modes.
        mode: mode classification.
        detection: the detection heat-map and box regression.
        detection_velocity_area: the velocity regressed over each agent's whole heat-map splat, weighed by it
            (``losses.velocity_area_loss``), added to the detection term; 0: the centre cells alone, as before.
    """

    latent: float = 1.0
    latent_steps: int = 1
    latent_into_encoder: bool = True
    variance: float = 1.0
    covariance: float = 0.04
    occupancy: float = 10.0
    occupancy_pos_weight: tuple[float, float, float] = (2.0, 10.0, 10.0)
    occupancy_dice: float = 1.0
    unobserved_weight: float = 0.3
    flow: float = 1.0
    flow_class_weight: tuple[float, float, float] = (1.0, 1.0, 1.0)
    decoded_future_steps: int | None = None
    present_share: float | None = None
    trajectory: float = 1.0
    mode: float = 0.5
    detection: float = 0.5
    detection_velocity_area: float = 0.0

    def __post_init__(self) -> None:
        if self.present_share is not None and not 0.0 <= self.present_share <= 1.0:
            raise ValueError(f"LossWeights: present_share must lie in [0, 1], got {self.present_share}")


@dataclass(frozen=True)
class Losses:
    """The loss terms (scalars) and their weighted total."""

    total: torch.Tensor
    latent: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor
    occupancy: torch.Tensor
    dice: torch.Tensor
    flow: torch.Tensor
    trajectory: torch.Tensor
    mode: torch.Tensor
    detection: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Every term as a float, for logging."""
        return {name: float(getattr(self, name).detach()) for name in self.__dataclass_fields__}


def draw_decoded_steps(config: ModelConfig, weights: LossWeights) -> tuple[int, ...] | None:
    """The steps a training iteration decodes (``LossWeights.decoded_future_steps``), or None: all of them.

    t0 and that many future steps, drawn without replacement from torch's global generator (which training seeds).
    """
    f, n = config.occupancy_steps, weights.decoded_future_steps
    if n is None or n >= f or not config.world_model:
        return None
    return (0, *sorted((torch.randperm(f)[:n] + 1).tolist()))


HEAD_TERMS = ("latent", "occupancy", "dice", "flow", "trajectory", "detection")
"""The terms whose gradients at the shared latent z_t0 training logs (``gradient_norms``)."""


def heads_in_float32(output: ModelOutput) -> ModelOutput:
    """``output`` with every head's prediction in float32; the same object when nothing needs a cast.

    A forward pass under bfloat16 autocast leaves them in bfloat16; the losses, their sigmoids and sums over 16,384
    cells, need float32. z_t0 stays as it is: the gradient norms are taken at it (``gradient_norms``), and
    ``compute_losses`` casts it for the regularizer.
    """
    names = (
        "rollout",
        "occupancy_logits",
        "modes",
        "mode_logits",
        "heatmap_logits",
        "regression",
        "flow",
        "present_logits",
    )
    changes = {
        name: value.float()
        for name in names
        if (value := getattr(output, name)) is not None and value.dtype != torch.float32
    }
    return replace(output, **changes) if changes else output


def compute_losses(
    model: BevJepa, batch: torch_dataset.WindowBatch, output: ModelOutput, weights: LossWeights
) -> Losses:
    """All loss terms of one batch; the latent term needs the batch's future inputs when its weight is not 0."""
    zero = output.latent.new_zeros((), dtype=torch.float32)
    if weights.latent > 0 and model.predictor is not None:
        f = output.rollout.shape[1]
        steps = sorted((torch.randperm(f)[: min(weights.latent_steps, f)] + 1).tolist())
        target = model.target_latents(batch, steps)  # [B, len(steps), C, H, W], no gradient
        rollout = output.rollout
        if not weights.latent_into_encoder:
            p = model.config.fuser.past_frames
            actions = batch.actions[:, p - 1 : p - 1 + max(steps)]  # [B, max(steps), 3]
            rollout = model.predictor.rollout(output.latent.detach().float(), actions)  # [B, max(steps), C, H, W]
        latent = losses.latent_prediction_loss(rollout[:, [k - 1 for k in steps]], target)
    else:
        latent = zero
    if model.predictor is not None:
        b, f, c, h, w = output.rollout.shape
        everything = torch.cat([output.latent[:, None].float(), output.rollout], dim=1).reshape(b * (f + 1), c, h, w)
        variance, covariance = losses.vicreg_regularizer(everything)
    else:
        variance, covariance = losses.vicreg_regularizer(output.latent.float())
    logits = output.occupancy_logits  # [B, S, classes, H, W], the steps decoded (t0 first)
    decoded = list(range(logits.shape[1])) if output.decoded is None else list(output.decoded)
    target = batch.occupancy[:, decoded]
    cell_weight = torch.ones_like(logits[:, :, :1])  # [B, S, 1, H, W]
    cell_weight[:, 0, 0] = torch.where(batch.observed, 1.0, weights.unobserved_weight)
    pos_weight = torch.as_tensor(weights.occupancy_pos_weight, dtype=logits.dtype, device=logits.device)
    present = 1.0 / (model.config.occupancy_steps + 1) if weights.present_share is None else weights.present_share

    def over_steps(term: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """t0's term and the decoded future steps' mean, weighed ``present : 1 - present``."""
        if len(decoded) == 1:
            return term(slice(0, 1))
        return present * term(slice(0, 1)) + (1.0 - present) * term(slice(1, None))

    occupancy = over_steps(
        lambda s: losses.occupancy_loss(
            logits[:, s], target[:, s], pos_weight=pos_weight, cell_weight=cell_weight[:, s]
        )
    )
    dice = over_steps(lambda s: losses.soft_dice_loss(logits[:, s], target[:, s]))
    if output.flow is not None:
        b, s = output.flow.shape[:2]
        predicted = F.interpolate(
            output.flow.reshape(b * s, *output.flow.shape[2:]), size=model.config.grid.shape, mode="bilinear"
        ).reshape(b, s, 2, *model.config.grid.shape)  # [B, F + 1, 2, H, W] on the target grid
        cell_xy = torch.as_tensor(model.config.grid.cell_centers(), dtype=predicted.dtype, device=predicted.device)
        target, mask = losses.instance_flow_targets(batch.instances, cell_xy)
        class_weight = torch.as_tensor(weights.flow_class_weight, dtype=predicted.dtype, device=predicted.device)
        cell_weight = (batch.occupancy.to(predicted.dtype) * class_weight[:, None, None]).amax(dim=2)  # [B, S, H, W]
        flow = losses.flow_loss(predicted, target, mask, cell_weight=cell_weight)
    else:
        flow = zero
    trajectory, mode = losses.trajectory_loss(
        output.modes, output.mode_logits, batch.agent_future, batch.agent_future_mask, batch.agent_mask
    )
    heatmap_target, regression_target, regression_mask = heads.detection_targets(
        batch.agent_box, batch.agent_velocity, batch.agent_class, batch.agent_mask, model.detection.grid
    )
    detection = losses.detection_loss(
        output.heatmap_logits, output.regression, heatmap_target, regression_target, regression_mask
    )
    if weights.detection_velocity_area:
        velocity_target, velocity_weight = heads.velocity_area_targets(
            batch.agent_box, batch.agent_velocity, batch.agent_class, batch.agent_mask, model.detection.grid
        )
        v = heads.REGRESSION_CHANNELS.index("vx")
        detection = detection + weights.detection_velocity_area * losses.velocity_area_loss(
            output.regression[:, v : v + 2], velocity_target, velocity_weight
        )
    total = (
        weights.latent * latent
        + weights.variance * variance
        + weights.covariance * covariance
        + weights.occupancy * occupancy
        + weights.occupancy_dice * dice
        + weights.flow * flow
        + weights.trajectory * trajectory
        + weights.mode * mode
        + weights.detection * detection
    )
    return Losses(total, latent, variance, covariance, occupancy, dice, flow, trajectory, mode, detection)


def gradient_norms(losses_: Losses, output: ModelOutput, weights: LossWeights) -> dict[str, float]:
    """The norm of each weighted head term's gradient at the shared latent z_t0 (``HEAD_TERMS``).

    A term whose gradient is orders of magnitude below the others' teaches the shared encoder nothing; these
    norms say whether the weights balance the heads. Costs one backward pass per term through the heads.
    """
    norms = {}
    for name in HEAD_TERMS:
        term = getattr(losses_, name) * getattr(weights, "occupancy_dice" if name == "dice" else name)
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        (grad,) = torch.autograd.grad(term, output.latent, retain_graph=True, allow_unused=True)
        norms[name] = 0.0 if grad is None else float(grad.norm())
    return norms
