"""Experiment configuration: the model and its training, with the named presets ``small`` and ``base``.

Configs are frozen dataclasses; ``to_dict`` / ``from_dict`` turn them into the JSON written next to every
artifact and back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field

from bevjepa.datasets import geometry
from bevjepa.fusion import fuser
from bevjepa.perception import camera as camera_encoder
from bevjepa.perception import lidar as lidar_encoder
from bevjepa.prediction import model, world_model


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        steps: optimizer steps.
        batch_size: windows per step (per worker under Ray Train).
        learning_rate: AdamW learning rate (cosine-decayed to 5% over ``steps``).
        weight_decay: AdamW weight decay.
        ema_decay: decay of the target encoder's exponential moving average.
        grad_clip: gradient-norm clip.
        seed: seeds the model's initialisation, the data order and every random choice in training.
        val_every: steps between validations (also the checkpoint interval).
        val_batches: batches each validation scores (the first ones of the split, always the same); None: all.
        max_minutes: stop (with a checkpoint) once this much wall time has passed; None: run every step.
        loader_workers: DataLoader worker processes.
        train_split: devkit split of the training scenes.
        val_split: devkit split of the validation scenes.
        weights: the loss weights (``weights.latent = 0`` trains without the JEPA loss).
    """

    steps: int = 1500
    batch_size: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.99
    grad_clip: float = 5.0
    seed: int = 0
    val_every: int = 100
    val_batches: int | None = 8
    max_minutes: float | None = None
    loader_workers: int = 1
    train_split: str = "mini_train"
    val_split: str = "mini_val"
    weights: model.LossWeights = field(default_factory=model.LossWeights)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("TrainConfig: steps, batch_size and val_every must be positive")


@dataclass(frozen=True)
class ExperimentConfig:
    """A model and how to train it.

    Attributes:
        preset: the preset it started from.
        model: the model.
        train: the training.
    """

    preset: str
    model: model.ModelConfig
    train: TrainConfig

    def content_hash(self) -> str:
        """A short hash of the whole configuration."""
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:16]


def small() -> ExperimentConfig:
    """CPU-sized: 128 × 128 targets at 0.5 m, a 32 × 32 × 64 latent, cameras at 256 × 144; trains in minutes.

    The camera backbone is narrow and stops at stride 16 with 2 m depth bins, the PointNet is 16 wide, and two
    windows make a batch: about a second a step on two cores.
    """
    return ExperimentConfig(
        "small",
        model.ModelConfig(
            camera=camera_encoder.CameraEncoderConfig(
                feature_stride=16, depth_step_m=2.0, depth_max_m=44.0, backbone_width=16
            ),
            lidar=lidar_encoder.LidarEncoderConfig(pointnet_width=16),
        ),
        TrainConfig(batch_size=2),
    )


def base() -> ExperimentConfig:
    """GPU-sized, nuScenes scale: a 200 × 200 BEV at 0.5 m (±50 m), a 50 × 50 × 128 latent, cameras at 704 × 256.

    Windows for it are preprocessed with ``--image-width 704`` and a matching grid.
    """
    target = geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 0.5)
    latent = geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 2.0)
    channels = 128
    return ExperimentConfig(
        "base",
        model.ModelConfig(
            camera=camera_encoder.CameraEncoderConfig(
                channels=channels,
                splat_grid=geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 1.0),
                out_grid=latent,
                backbone_width=64,
            ),
            lidar=lidar_encoder.LidarEncoderConfig(
                channels=channels, pillar_grid=target, out_grid=latent, pointnet_width=64
            ),
            fuser=fuser.FuserConfig(camera_channels=channels, lidar_channels=channels, channels=channels, grid=latent),
            predictor=world_model.PredictorConfig(channels=channels, hidden=192, blocks=3),
            grid=target,
        ),
        TrainConfig(
            steps=40_000,
            batch_size=8,
            learning_rate=1e-3,
            loader_workers=8,
            train_split="train",
            val_split="val",
            val_every=2000,
        ),
    )


PRESETS: dict[str, typing.Callable[[], ExperimentConfig]] = {"small": small, "base": base}


def preset(name: str) -> ExperimentConfig:
    """The named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def to_dict(config: object) -> dict:
    """A config dataclass (nested) as JSON-ready values."""
    return dataclasses.asdict(config)  # type: ignore[call-overload]


def from_dict(cls: type, values: dict) -> object:
    """Rebuild a config dataclass of type ``cls`` from ``to_dict`` output, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        kwargs[f.name] = _from_value(hints[f.name], values[f.name])
    return cls(**kwargs)


def _from_value(hint: object, value: object) -> object:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _from_value(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value
