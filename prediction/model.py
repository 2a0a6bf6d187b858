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

from dataclasses import dataclass, field

import torch
from torch import nn

from bevjepa.datasets import geometry, torch_dataset
from bevjepa.fusion import fuser
from bevjepa.perception import camera as camera_encoder
from bevjepa.perception import lidar as lidar_encoder
from bevjepa.prediction import heads, losses, world_model


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

    def __post_init__(self) -> None:
        if not (self.use_camera or self.use_lidar):
            raise ValueError("ModelConfig: use_camera and use_lidar cannot both be False")


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


class BevEncoder(nn.Module):
    """E: encode every frame in its own ego frame, fuse the modalities, warp into the reference frame."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.camera = camera_encoder.CameraEncoder(config.camera) if config.use_camera else None
        self.lidar = lidar_encoder.LidarEncoder(config.lidar) if config.use_lidar else None
        self.fuse = fuser.BevFuser(config.fuser)
        self.temporal = fuser.TemporalFuser(config.fuser)

    def own_frame_latents(self, frames: SensorFrames) -> torch.Tensor:
        """Every frame's fused latent in that frame's own ego frame: [B, S, C, H, W].

        A frame's own latent does not depend on the reference frame, so a stream of forecasts can encode each
        keyframe once and reuse it (``Forecaster(cache_frames=...)``).
        """
        b, s = frames.reference_from_ego.shape[:2]
        ego_from_reference = torch.linalg.inv(frames.reference_from_ego.reshape(b * s, 4, 4))  # [B*S, 4, 4]
        camera_bev = lidar_bev = None
        if self.camera is not None:
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
            xyz = torch.einsum("mij,mj->mi", transform[:, :3, :3], frames.points[:, :3]) + transform[:, :3, 3]
            points = torch.cat([xyz, frames.points[:, 3:]], dim=1)  # [M, 5] in each frame's own ego frame
            lidar_bev = self.lidar(points, owner, b * s)  # [B*S, Cl, H, W]
        fused = self.fuse(camera_bev, lidar_bev)  # [B*S, C, H, W]
        return fused.reshape(b, s, *fused.shape[1:])

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
        rollout: [B, F, C, H, W] ẑ_1..ẑ_F.
        occupancy_logits: [B, F + 1, classes, 128, 128] steps 0..F.
        modes: [B, A, K, T, 2] xy (m) of each agent's K trajectory modes.
        mode_logits: [B, A, K].
        heatmap_logits: [B, classes, 64, 64] detection heat-map at t0.
        regression: [B, 10, 64, 64] detection box regression at t0 (see ``heads.REGRESSION_CHANNELS``).
        own_latents: [B, P, C, H, W] the input frames' fused latents, each in its own ego frame.
    """

    latent: torch.Tensor
    rollout: torch.Tensor
    occupancy_logits: torch.Tensor
    modes: torch.Tensor
    mode_logits: torch.Tensor
    heatmap_logits: torch.Tensor
    regression: torch.Tensor
    own_latents: torch.Tensor


class BevJepa(nn.Module):
    """The model: ``forward`` predicts; ``target_latents`` encodes the observed future with the EMA encoder."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = BevEncoder(config)
        self.target_encoder = world_model.copy_for_target(self.encoder)
        self.predictor = world_model.Predictor(config.predictor)
        channels = config.fuser.channels
        self.occupancy = heads.OccupancyHead(channels=channels, classes=config.classes)
        self.trajectory = heads.TrajectoryHead(
            channels=channels, modes=config.modes, steps=config.trajectory_steps, past_steps=config.fuser.past_frames
        )
        self.detection = heads.DetectionHead(channels=channels, classes=config.classes)

    def forward(
        self,
        batch: torch_dataset.WindowBatch,
        actions: torch.Tensor | None = None,
        own_latents: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Predict from a batch's input frames.

        Args:
            batch: the windows.
            actions: [B, F, 3] the ego actions to roll out under; None takes the batch's own future actions.
            own_latents: [B, P, C, H, W] the input frames' latents in their own ego frames, when already encoded
                (``BevEncoder.own_frame_latents``); None encodes the batch's sensors.
        """
        p, f = self.config.fuser.past_frames, self.config.occupancy_steps
        if own_latents is None:
            own_latents = self.encoder.own_frame_latents(SensorFrames.past(batch))
        latent = self.encoder.temporal(self.encoder.warp(own_latents, batch.t0_from_ego))  # [B, C, H, W]
        if actions is None:
            actions = batch.actions[:, p - 1 : p - 1 + f]  # [B, F, 3]
        rollout = self.predictor.rollout(latent, actions)  # [B, F, C, H, W]
        b, c, h, w = latent.shape
        sequence = torch.cat([latent[:, None], rollout], dim=1)  # [B, F + 1, C, H, W]
        occupancy = self.occupancy(sequence.reshape(b * (f + 1), c, h, w))  # [B*(F+1), classes, 128, 128]
        occupancy = occupancy.reshape(b, f + 1, *occupancy.shape[1:])
        agent_xy = batch.agent_box[..., :2]  # [B, A, 2]
        modes, mode_logits = self.trajectory(
            latent,
            agent_xy,
            batch.agent_past,
            batch.agent_past_mask,
            batch.agent_box[..., 6],
            batch.agent_class,
            rollout=rollout,
            ego_past=batch.t0_from_ego[:, :, :2, 3],
        )
        heatmap, regression = self.detection(latent)
        return ModelOutput(latent, rollout, occupancy, modes, mode_logits, heatmap, regression, own_latents)

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
        variance, covariance: the VICReg anti-collapse terms on z_t0 and the rollout.
        occupancy: per-class occupancy BCE over steps 0..F.
        trajectory: winner-takes-all regression of the trajectory modes.
        mode: mode classification.
        detection: the detection heat-map and box regression.
    """

    latent: float = 1.0
    latent_steps: int = 1
    variance: float = 1.0
    covariance: float = 0.04
    occupancy: float = 1.0
    trajectory: float = 1.0
    mode: float = 0.5
    detection: float = 0.5


@dataclass(frozen=True)
class Losses:
    """The loss terms (scalars) and their weighted total."""

    total: torch.Tensor
    latent: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor
    occupancy: torch.Tensor
    trajectory: torch.Tensor
    mode: torch.Tensor
    detection: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Every term as a float, for logging."""
        return {name: float(getattr(self, name).detach()) for name in self.__dataclass_fields__}


def compute_losses(
    model: BevJepa, batch: torch_dataset.WindowBatch, output: ModelOutput, weights: LossWeights
) -> Losses:
    """All loss terms of one batch; the latent term needs the batch's future inputs when its weight is not 0."""
    zero = output.latent.new_zeros(())
    if weights.latent > 0:
        f = output.rollout.shape[1]
        steps = sorted((torch.randperm(f)[: min(weights.latent_steps, f)] + 1).tolist())
        target = model.target_latents(batch, steps)  # [B, len(steps), C, H, W], no gradient
        latent = losses.latent_prediction_loss(output.rollout[:, [k - 1 for k in steps]], target)
    else:
        latent = zero
    b, f, c, h, w = output.rollout.shape
    everything = torch.cat([output.latent[:, None], output.rollout], dim=1).reshape(b * (f + 1), c, h, w)
    variance, covariance = losses.vicreg_regularizer(everything)
    occupancy = losses.occupancy_loss(output.occupancy_logits, batch.occupancy)
    trajectory, mode = losses.trajectory_loss(
        output.modes, output.mode_logits, batch.agent_future, batch.agent_future_mask, batch.agent_mask
    )
    heatmap_target, regression_target, regression_mask = heads.detection_targets(
        batch.agent_box, batch.agent_velocity, batch.agent_class, batch.agent_mask, model.detection.grid
    )
    detection = losses.detection_loss(
        output.heatmap_logits, output.regression, heatmap_target, regression_target, regression_mask
    )
    total = (
        weights.latent * latent
        + weights.variance * variance
        + weights.covariance * covariance
        + weights.occupancy * occupancy
        + weights.trajectory * trajectory
        + weights.mode * mode
        + weights.detection * detection
    )
    return Losses(total, latent, variance, covariance, occupancy, trajectory, mode, detection)
