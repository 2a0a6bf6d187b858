"""The planner's API: ``Forecaster.from_checkpoint(RUN).forecast(window) -> OccupancyForecast``.

An ``OccupancyForecast`` is plain numpy in the ego frame of the present keyframe t0 (x forward, y left, z up,
origin at the rear axle; metres, seconds after t0), so a planner needs neither torch nor the model to use it.

Notation:
    S  occupancy times (t0 and the F rollout steps)     C  classes     H, W  the target grid (``GridSpec`` layout)
    A  agents     K  modes     T  trajectory steps      N  query points
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, geometry, torch_dataset
from bevjepa.prediction import agent_occupancy, checkpoint, model

FORECAST_FORMAT = "bevjepa-occupancy-forecast"
FORECAST_VERSION = 2
"""Version 2 added the optional ``latent_occupancy``; ``load`` still reads version 1 files."""
STEP_S = 0.5


@dataclass(frozen=True)
class OccupancyForecast:
    """Future occupancy and agent trajectories around the ego, in the t0 ego frame.

    Attributes:
        timestamp_us: t0 (µs).
        grid: the occupancy grid (metric bounds and resolution; rows along +x, columns along +y).
        classes: the class names of the occupancy channels.
        times_s: [S] float32 — seconds after t0 of each occupancy map (0, 0.5, ..., 2.0).
        occupancy: [S, C, H, W] float32 — probability that each cell is occupied by an agent of each class: the
            agents' t0 boxes moved along their trajectory modes, weighted by the modes' probabilities
            (``agent_occupancy.mode_occupancy``; 1 at t0).
        agent_ids: [A] str — the agents' instance tokens.
        agent_classes: [A] int64 — class index of each agent.
        trajectory_times_s: [T] float32 — seconds after t0 of each trajectory step (0.5 ... 6.0).
        trajectories: [A, K, T, 2] float32 — x, y (m) of each agent's K modes.
        mode_probabilities: [A, K] float32 — each mode's probability (rows sum to 1).
        latent_occupancy: [S, C, H, W] float32 or None — the latent occupancy head's map alone (what the world
            model's latent holds, tracked agents or not); None for forecasts that have no latent (baselines).
    """

    timestamp_us: int
    grid: geometry.GridSpec
    classes: tuple[str, ...]
    times_s: np.ndarray
    occupancy: np.ndarray
    agent_ids: np.ndarray
    agent_classes: np.ndarray
    trajectory_times_s: np.ndarray
    trajectories: np.ndarray
    mode_probabilities: np.ndarray
    latent_occupancy: np.ndarray | None = None

    def occupancy_at(self, xy: np.ndarray, time_s: float | np.ndarray) -> np.ndarray:
        """Probability that points are occupied by any class at given times.

        Args:
            xy: [N, 2] float — x, y (m, t0 ego frame).
            time_s: scalar or [N] seconds after t0; linear in time between maps, clamped to the forecast's span.

        Returns:
            [N] float64 in [0, 1]; 0 outside the grid.
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        time_s = np.broadcast_to(np.asarray(time_s, dtype=np.float64), (len(xy),))
        any_class = 1.0 - np.prod(1.0 - self.occupancy.astype(np.float64), axis=1)  # [S, H, W]
        rows, cols, inside = self.grid.xy_to_index(xy)
        position = np.clip(np.interp(time_s, self.times_s, np.arange(len(self.times_s))), 0, len(self.times_s) - 1)
        lower = np.floor(position).astype(np.int64)
        upper = np.minimum(lower + 1, len(self.times_s) - 1)
        frac = position - lower
        value = (1 - frac) * any_class[lower, rows, cols] + frac * any_class[upper, rows, cols]
        return np.where(inside, value, 0.0)

    def collision_probability(
        self,
        ego_trajectory: np.ndarray,
        times_s: np.ndarray,
        length_m: float = 4.08,
        width_m: float = 1.73,
        rear_axle_to_center_m: float = 1.34,
        samples: int = 5,
    ) -> float:
        """The probability that a candidate ego trajectory overlaps occupied space.

        The ego's footprint (a ``length_m`` × ``width_m`` box whose centre lies ``rear_axle_to_center_m`` ahead
        of the pose) is sampled on a ``samples`` × ``samples`` lattice at every pose; the result is the largest
        occupancy probability met, over the footprint and over time (a conservative bound for one obstacle).

        Args:
            ego_trajectory: [N, 3] float — x, y (m), yaw (rad) of the rear axle in the t0 ego frame.
            times_s: [N] seconds after t0 of each pose.
        """
        ego_trajectory = np.asarray(ego_trajectory, dtype=np.float64).reshape(-1, 3)
        along = np.linspace(-length_m / 2, length_m / 2, samples) + rear_axle_to_center_m
        across = np.linspace(-width_m / 2, width_m / 2, samples)
        local = np.stack(np.meshgrid(along, across, indexing="ij"), axis=-1).reshape(-1, 2)  # [Q, 2]
        cos, sin = np.cos(ego_trajectory[:, 2]), np.sin(ego_trajectory[:, 2])  # [N]
        x = ego_trajectory[:, None, 0] + cos[:, None] * local[None, :, 0] - sin[:, None] * local[None, :, 1]
        y = ego_trajectory[:, None, 1] + sin[:, None] * local[None, :, 0] + cos[:, None] * local[None, :, 1]
        times = np.repeat(np.asarray(times_s, dtype=np.float64), local.shape[0])
        probabilities = self.occupancy_at(np.stack([x.ravel(), y.ravel()], axis=1), times)
        return float(probabilities.max()) if probabilities.size else 0.0

    def save(self, path: Path) -> None:
        """Write the forecast as an ``.npz`` (format ``bevjepa-occupancy-forecast`` version 2; no pickle)."""
        header = {
            "format": FORECAST_FORMAT,
            "format_version": FORECAST_VERSION,
            "timestamp_us": self.timestamp_us,
            "grid": asdict(self.grid),
            "classes": list(self.classes),
        }
        np.savez_compressed(
            path,
            header=np.array(json.dumps(header)),
            times_s=self.times_s,
            occupancy=self.occupancy,
            agent_ids=self.agent_ids,
            agent_classes=self.agent_classes,
            trajectory_times_s=self.trajectory_times_s,
            trajectories=self.trajectories,
            mode_probabilities=self.mode_probabilities,
            **({} if self.latent_occupancy is None else {"latent_occupancy": self.latent_occupancy}),
        )

    @staticmethod
    def load(path: Path) -> OccupancyForecast:
        """Read a forecast written by ``save``."""
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            version = header.get("format_version")
            if header.get("format") != FORECAST_FORMAT or version not in (1, FORECAST_VERSION):
                raise ValueError(f"{path}: not a {FORECAST_FORMAT} file of version 1 or {FORECAST_VERSION}")
            arrays = {
                name: data[name]
                for name in (
                    "times_s",
                    "occupancy",
                    "agent_ids",
                    "agent_classes",
                    "trajectory_times_s",
                    "trajectories",
                    "mode_probabilities",
                )
            }
            arrays["latent_occupancy"] = data["latent_occupancy"] if "latent_occupancy" in data.files else None
        return OccupancyForecast(
            timestamp_us=int(header["timestamp_us"]),
            grid=geometry.GridSpec(**header["grid"]),
            classes=tuple(header["classes"]),
            **arrays,
        )


class Forecaster:
    """A trained model behind the forecast API.

    With ``cache_frames`` > 0 the forecaster keeps the encoded latents of the last ``cache_frames`` keyframes
    (by scene and sample token, ``WindowSample.frame_tokens``), so a stream of forecasts, each over the last P
    keyframes, encodes every keyframe once: a new forecast pays for one frame's cameras and LiDAR instead of P.
    The result is the same as without the cache (a frame's own-frame latent does not depend on t0).
    """

    def __init__(self, net, device: str | torch.device = "cpu", cache_frames: int = 0) -> None:
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.cache_frames = cache_frames
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    @staticmethod
    def from_checkpoint(run: Path, device: str | torch.device = "cpu", cache_frames: int = 0) -> Forecaster:
        """Load the model of a run folder (safetensors and JSON; nothing is unpickled)."""
        _, net = checkpoint.load_model(run, device)
        return Forecaster(net, device, cache_frames)

    def _own_latents(self, batch: torch_dataset.WindowBatch) -> torch.Tensor | None:
        """[B, P, C, H, W] the input frames' own-frame latents, encoding only those not in the cache."""
        if self.cache_frames <= 0 or not batch.frame_tokens or not all(batch.frame_tokens):
            return None
        keys = [
            [(scene, token) for token in tokens]
            for scene, tokens in zip(batch.scene_names, batch.frame_tokens, strict=True)
        ]
        missing = sorted({p for row in keys for p, key in enumerate(row) if key not in self._cache})
        if missing:
            frames = model.SensorFrames.past(batch)
            if len(missing) < frames.reference_from_ego.shape[1]:
                frames = model.select_frames(frames, missing)
            encoded = self.net.encoder.own_frame_latents(frames)  # [B, len(missing), C, H, W]
            for b, row in enumerate(keys):
                for i, p in enumerate(missing):
                    self._cache.setdefault(row[p], encoded[b, i])
        latents = torch.stack([torch.stack([self._cache[key] for key in row]) for row in keys])
        for row in keys:
            for key in row:
                self._cache.move_to_end(key)
        while len(self._cache) > max(self.cache_frames, len(keys[0]) * len(keys)):
            self._cache.popitem(last=False)
        return latents

    @torch.no_grad()
    def forecast_batch(
        self, batch: torch_dataset.WindowBatch, actions: torch.Tensor | None = None
    ) -> list[OccupancyForecast]:
        """Forecasts for every window of a batch; ``actions`` [B, F, 3] overrides the ego's future motion."""
        batch = batch.to(self.device)
        output = self.net(batch, actions=actions, own_latents=self._own_latents(batch))
        latent = torch.sigmoid(output.occupancy_logits).cpu().numpy().astype(np.float32)  # [B, S, C, H, W]
        probabilities = torch.softmax(output.mode_logits, dim=-1).cpu().numpy().astype(np.float32)  # [B, A, K]
        modes = output.modes.cpu().numpy().astype(np.float32)  # [B, A, K, T, 2]
        config = self.net.config
        S, C = latent.shape[1:3]
        steps = np.arange(S, dtype=np.float32) * STEP_S
        trajectory_times = np.arange(1, config.trajectory_steps + 1, dtype=np.float32) * STEP_S
        results = []
        boxes = batch.agent_box.cpu().numpy().astype(np.float64)  # [B, A, 7]
        agent_classes = batch.agent_class.cpu().numpy()
        for b in range(batch.batch_size):
            count = int(batch.agent_mask[b].sum())
            agents = agent_occupancy.mode_occupancy(
                boxes[b, :count], agent_classes[b, :count], modes[b, :count], probabilities[b, :count], config.grid,
                C, S - 1,
            )  # fmt: skip
            results.append(
                OccupancyForecast(
                    timestamp_us=batch.timestamps_us[b],
                    grid=self.net.config.grid,
                    classes=categories.CLASSES,
                    times_s=steps,
                    occupancy=agents,
                    agent_ids=np.array(batch.agent_ids[b], dtype=str).reshape(-1),
                    agent_classes=agent_classes[b, :count],
                    trajectory_times_s=trajectory_times,
                    trajectories=modes[b, :count],
                    mode_probabilities=probabilities[b, :count],
                    latent_occupancy=latent[b],
                )
            )
        return results

    def forecast(self, window: torch_dataset.WindowSample, actions: np.ndarray | None = None) -> OccupancyForecast:
        """The forecast of one window; ``actions`` [F, 3] (dx, dy, dyaw per 0.5 s step) overrides the ego's motion."""
        batch = torch_dataset.collate([window])
        override = None if actions is None else torch.as_tensor(actions, dtype=torch.float32)[None]
        return self.forecast_batch(batch, override)[0]
