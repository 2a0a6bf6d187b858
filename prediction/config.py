"""Experiment configuration: the model and its training, with the named presets ``small`` and ``base``.

Configs are frozen dataclasses; ``to_dict`` / ``from_dict`` turn them into the JSON written next to every
artifact and back.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bevjepa.datasets import geometry
from bevjepa.fusion import fuser
from bevjepa.perception import camera as camera_encoder
from bevjepa.perception import lidar as lidar_encoder
from bevjepa.prediction import model, world_model

PRECISIONS = ("float32", "bfloat16")
"""``TrainConfig.precision``'s choices."""


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
        val_every: steps between validations (each followed by a checkpoint).
        val_batches: batches each validation scores (the first ones of the split, always the same); None: all.
        max_minutes: stop (with a checkpoint) once this much wall time has passed; the learning rate's cosine ends
            then too, if before the last step. None: run every step, the cosine over the steps.
        checkpoint_minutes: wall time between checkpoints besides those after validations (a killed run loses at
            most this much); 0: after every step. SIGTERM and Ctrl-C also write one before the run stops.
        loader_workers: DataLoader worker processes.
        train_split: devkit split of the training scenes.
        val_split: devkit split of the validation scenes.
        extra_train_data: more ``bevjepa preprocess`` outputs, of other synthetic worlds (other ``bevjepa synth
            --seed``s), whose windows all join the training set (every scene, whatever its split); validation stays
            on ``val_split`` of the main data. Never the world that is scored, nor a held-out one.
        weights: the loss weights (``weights.latent = 0`` trains without the JEPA loss).
        precision: ``float32``, or ``bfloat16``: the training forward pass under ``torch.autocast`` (convolutions
            and matrix products in bfloat16, the warps' coordinates, the losses and the weights in float32). On a
            CPU with native bfloat16 (AVX512-BF16, AMX) or a recent GPU a step is faster; elsewhere it may be slower
            (``bevjepa bench training`` times both). Validation, evaluation and forecasts run in float32.
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
    checkpoint_minutes: float = 5.0
    loader_workers: int = 1
    train_split: str = "mini_train"
    val_split: str = "mini_val"
    extra_train_data: tuple[str, ...] = ()
    weights: model.LossWeights = field(default_factory=model.LossWeights)
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("TrainConfig: steps, batch_size and val_every must be positive")
        if not math.isfinite(self.checkpoint_minutes) or self.checkpoint_minutes < 0:
            raise ValueError(f"TrainConfig: checkpoint_minutes must be finite and >= 0, got {self.checkpoint_minutes}")


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

    def resume_hash(self) -> str:
        """A short hash of what a resumed run must share with its checkpoint.

        Everything but ``RESUMABLE_FIELDS`` of ``train``: the step count (a finished run can be extended), the time
        caps, the loader processes and the precision (the weights stay float32) may change between a run and its
        ``--resume``.
        """
        values = to_dict(self)
        values["train"] = {k: v for k, v in values["train"].items() if k not in RESUMABLE_FIELDS}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


RESUMABLE_FIELDS = frozenset({"steps", "max_minutes", "checkpoint_minutes", "loader_workers", "precision"})
"""``TrainConfig`` fields that ``--resume`` may change."""


FLOW_CLASS_WEIGHT = (1.0, 10.0, 10.0)
"""The presets' flow-loss weights on vehicle, pedestrian and cyclist cells (with every cell weighing 1, a
pedestrian's few cells are about 4 % of the flow loss). A world-model ablation, 300 steps, seeds 0 and 1: pedestrian
IoU at 1 s 0.029 and 0.012 with weight 1, 0.049 and 0.043 with these; vehicles −0.036 to +0.031 over the
horizons (docs/train.md). The pedestrians' flow error itself stayed as large as their motion either way."""


def small() -> ExperimentConfig:
    """CPU-sized: 128 × 128 targets at 0.5 m, a 32 × 32 × 64 latent, cameras at 256 × 144; trains in minutes.

    The camera backbone is narrow and stops at stride 16 with 2 m depth bins, the PointNet is 16 wide, and two
    windows make a batch. The LiDAR is convolved at 0.5 m before it is pooled to the latent, and the decoder reads
    the 0.5 m and 1 m maps of all three input keyframes warped into t0 (the direct baseline, 400 steps, three
    seeds, before and after: pedestrian IoU at t0 0.25 -> 0.35, cyclist 0.05 -> 0.26, NDS 0.35 -> 0.43;
    docs/train.md, "The architecture ablation"). Every decoder level is told the step it decodes (FiLM): against the
    same configuration without it, two seeds at 650 steps gave vehicle IoU at 1 s 0.408 against 0.378 and one
    30-minute run each (1300 and 1176 steps) 0.481 against 0.451, pedestrians at t0 0.413 against 0.353
    (docs/train.md, "Telling the decoder and the flow which step they decode").
    """
    return ExperimentConfig(
        "small",
        model.ModelConfig(
            camera=camera_encoder.CameraEncoderConfig(
                feature_stride=16, depth_step_m=2.0, depth_max_m=44.0, backbone_width=16
            ),
            lidar=lidar_encoder.LidarEncoderConfig(pointnet_width=16, fine_width=32),
            decoder_widths=(32, 48),
            skip_frames=3,
            decoder_step_film=True,
        ),
        TrainConfig(batch_size=2, weights=model.LossWeights(flow_class_weight=FLOW_CLASS_WEIGHT)),
    )


def direct() -> ExperimentConfig:
    """The direct baseline: ``small``'s LiDAR encoder and decoder, every horizon's occupancy at once from z_t0.

    No cameras, no world model, no JEPA loss: what a plain BEV network on the LiDAR alone does at the same budget,
    the bar the world model must clear. Its trajectory head reads z_t0 for every step. It decodes z_t0 alone, so its
    decoder has no steps to tell apart (``decoder_step_film`` off).
    """
    config = small()
    return ExperimentConfig(
        "direct",
        config.model.direct_baseline(),
        dataclasses.replace(config.train, weights=dataclasses.replace(config.train.weights, latent=0.0)),
    )


def wide() -> ExperimentConfig:
    """``small`` on the devkit's detection range: the same network over ±50 m (200 × 200 targets, a 50 × 50 latent).

    nuScenes scores cars, pedestrians and bicycles out to 50, 40 and 40 m from the ego; ``small``'s ±32 m grid never
    sees a third of the scored cars, so its car AP cannot pass 0.46 on the synthetic ``mini_val``
    (``grid_ceiling_ap`` in the detection report). Every map has about 2.4 × ``small``'s cells; a LiDAR world-model
    training step costs 2.5 × ``small``'s on one thread and 1.6 × on both cores (docs/train.md, "The wide preset").
    Windows for it are preprocessed with ``--config wide``. A training step decodes t0 and two drawn future steps
    (``LossWeights.decoded_future_steps``), not every step: at the same 30 minutes on 2 cores that bought 1080 steps
    instead of 757, and two seeds of it beat the every-step run on vehicles, detection, tracking and trajectories
    (docs/train.md, "Two drawn future steps, the default"). t0 takes half the occupancy and Dice terms
    (``LossWeights.present_share``), not a fifth: over two seeds and two worlds every class at t0 gained in all four
    pairs (pedestrians 0.406-0.431 -> 0.429-0.455), tracking too, at a cost to the trajectory modes (docs/train.md,
    "Half the occupancy loss on t0, the default").
    """
    config = small()
    target = geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 0.5)
    latent = geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 2.0)
    return ExperimentConfig(
        "wide",
        dataclasses.replace(
            config.model,
            camera=dataclasses.replace(
                config.model.camera,
                depth_max_m=64.0,
                splat_grid=geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 1.0),
                out_grid=latent,
            ),
            lidar=dataclasses.replace(config.model.lidar, pillar_grid=target, out_grid=latent),
            fuser=dataclasses.replace(config.model.fuser, grid=latent),
            predictor=dataclasses.replace(config.model.predictor, grid=latent),
            grid=target,
        ),
        dataclasses.replace(
            config.train,
            weights=dataclasses.replace(config.train.weights, decoded_future_steps=2, present_share=0.5),
        ),
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
                channels=channels, pillar_grid=target, out_grid=latent, pointnet_width=64, fine_width=32
            ),
            fuser=fuser.FuserConfig(camera_channels=channels, lidar_channels=channels, channels=channels, grid=latent),
            predictor=world_model.PredictorConfig(channels=channels, hidden=192, blocks=3, grid=latent),
            grid=target,
            decoder_widths=(32, 64),
            skip_frames=3,
            decoder_step_film=True,
        ),
        TrainConfig(
            steps=40_000,
            batch_size=8,
            learning_rate=1e-3,
            loader_workers=8,
            train_split="train",
            val_split="val",
            val_every=2000,
            weights=model.LossWeights(flow_class_weight=FLOW_CLASS_WEIGHT),
        ),
    )


PRESETS: dict[str, typing.Callable[[], ExperimentConfig]] = {
    "small": small,
    "direct": direct,
    "wide": wide,
    "base": base,
}


def preset(name: str) -> ExperimentConfig:
    """The named preset, or the configuration in a JSON file (e.g. a run's ``config.json``, edited).

    Raises:
        ValueError: an unknown preset name, or a file that is not a whole ``ExperimentConfig`` (an unknown or
            misspelt field is named).
    """
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON ({error})") from None
        try:
            return from_dict(ExperimentConfig, values)  # type: ignore[return-value]
        except (TypeError, ValueError) as error:
            raise ValueError(f"config file {path}: {error}") from None
    raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)} or give a JSON config file")


def to_dict(config: object) -> dict:
    """A config dataclass (nested) as JSON-ready values."""
    return dataclasses.asdict(config)  # type: ignore[call-overload]


def from_dict(cls: type, values: dict, where: str = "config") -> object:
    """Rebuild a config dataclass of type ``cls`` from ``to_dict`` output, nested dataclasses included.

    Fields absent from ``values`` take their defaults; a key that names no field is an error (a misspelt field
    would otherwise fall back to its default without a word), as is a section that is not a JSON object.

    Raises:
        ValueError: names the key (``where`` is its path, e.g. ``config.train``) and the nearest field names.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, 1)
            described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        hints = "; ".join(described)
        raise ValueError(f"{where}: unknown field {hints}; {cls.__name__} has {', '.join(names)}")
    hints_by_name = typing.get_type_hints(cls)
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _from_value(hints_by_name[name], values[name], f"{where}.{name}")
    return cls(**kwargs)


def _from_value(hint: object, value: object, where: str) -> object:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _from_value(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value
