"""Closed-loop forecast sources: what the planner is told about the future at each planning step.

Forecast sources (``make_source``):

- ``model``: the world model of a checkpoint, from what a car has. At every sub-step a LiDAR sweep is rendered from
  the ego's actual pose; at every planning step the six cameras are rendered at the checkpoint's image size
  (``image_width_px``, 256 for the ``small`` preset) and the last ``lidar_sweeps`` sweeps (default 5, one per 0.1 s
  sub-step, i.e. 0.4 s; the dataset aggregates 10 sweeps at 20 Hz over 0.45 s) are aggregated into the keyframe's ego
  frame by the dataset's own code, with its close-point filter (``sim.keyframe.LiveSensors``, the simulator's
  adapter). The keyframe becomes a ``windows.Frame`` (``windows.build_frame``, as preprocessing does), the last P
  frames a ``WindowSample`` (``windows.inference_window``, then ``torch_dataset.sample_from_window``) without any
  agent or target, and the previous plan's motion as the rollout's actions; before P keyframes exist, the oldest one
  is repeated. The forecaster tracks the model's own detections, over the window's keyframes and across the episode's
  planning steps (one stream per episode), and forecasts those tracks; the simulator's actors are never read.
- ``model_annotated``: the same, but the window carries the true agents within the annotation range and their
  pasts as the trajectory head's queries (perfect perception; the prediction challenge's protocol).
- Both model sources: with ``rollout_candidates`` the model is rolled out under each candidate's actions (one batched
  forward pass; each keyframe is still encoded once, through the ``Forecaster``'s latent cache) and each candidate is
  scored against its own forecast. It is off by default: with the 8 default candidates a planning step's forecast took
  0.94 s instead of 0.25 s (``small`` preset, one torch thread, the shared 2-core machine).
- ``cv``: the ground-truth boxes of now moved at constant velocity and rasterized (probabilities 0 or 1).
- ``oracle``: the simulator's own future: a copy of the state stepped 2 s ahead with the ego following its
  previous plan (the agents reacting to it), the true boxes rasterized every 0.5 s.
- ``none``: no forecast; the planner drives at its cruise speed.

Only ``model`` renders sensors.

Notation:
    A  actors (index 0 is the ego)     K  sub-steps of an episode (0.1 s)     J  TTC projection times
    P  past keyframes of a model window     F  forecast steps (0.5 s)     S  occupancy times
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bevjepa.datasets import categories, geometry, rasterize, torch_dataset, windows
from bevjepa.evaluation import baselines
from bevjepa.evaluation.closed_loop import planner, suite_files
from bevjepa.evaluation.closed_loop.forecast_names import (  # re-exported: sources.MODEL, ...
    CONSTANT_VELOCITY,
    FORECASTS,
    MODEL,
    MODEL_ANNOTATED,
    MODEL_SOURCES,
    NONE,
    ORACLE,
)
from bevjepa.prediction import forecaster as forecaster_api
from bevjepa.sim import keyframe, world

FORECAST_STEPS = 4
"""cv and oracle forecasts: 0.5 s steps after t0 (2 s, as the model's occupancy)."""


@dataclass(frozen=True)
class AgentArrays:
    """The agents that exist now (the ego excluded), as arrays in one frame.

    Attributes:
        index: [A] int64 — actor index in ``world.actors``.
        ids: [A] str — instance ids.
        classes: [A] int64 — class index (``categories.CLASSES``).
        xy: [A, 2] float64 — box centres (m).
        yaw: [A] float64 — headings (rad).
        size_wlh: [A, 3] float64 — width, length, height (m).
        velocity: [A, 2] float64 — vx, vy (m/s).
    """

    index: np.ndarray
    ids: np.ndarray
    classes: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray
    size_wlh: np.ndarray
    velocity: np.ndarray

    def boxes7(self) -> np.ndarray:
        """[A, 7] float32 x, y, z, width, length, height (m), yaw (rad), as ``WindowSample.agent_box``."""
        z = world.BOX_BOTTOM_Z_M + self.size_wlh[:, 2] / 2
        return np.concatenate([self.xy, z[:, None], self.size_wlh, self.yaw[:, None]], axis=1).astype(np.float32)


def _actor_classes(built: world.World) -> np.ndarray:
    """[A] int64 the class index of every actor (the ego's too)."""
    return np.array([categories.class_index(a.category) for a in built.actors], dtype=np.int64)


def agents_in_frame(
    built: world.World, state: world.WorldState, frame_from_global: geometry.RigidTransform
) -> AgentArrays:
    """The agents that exist in ``state`` (the ego excluded), moved into a frame (usually the ego frame of now)."""
    xy, yaw = world.actor_poses(built, state)
    index = np.flatnonzero(state.active(built))
    index = index[index != 0]
    rotation = frame_from_global.rotation[:2, :2]
    local = xy[index] @ rotation.T + frame_from_global.translation[:2]  # [A, 2]
    heading = geometry.wrap_angle(yaw[index] + frame_from_global.yaw_rad)
    velocity = state.speed_mps[index, None] * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return AgentArrays(
        index=index,
        ids=np.array([built.actors[i].instance_id for i in index], dtype=str).reshape(-1),
        classes=_actor_classes(built)[index],
        xy=local,
        yaw=np.asarray(heading, dtype=np.float64).reshape(-1),
        size_wlh=built.table.sizes_wlh_m[index],
        velocity=velocity,
    )


def _rasterize(grid: geometry.GridSpec, agents: AgentArrays) -> np.ndarray:
    """[C, H, W] float32 occupancy (0 or 1) of the agents' boxes."""
    occupancy, _ = rasterize.rasterize_boxes(
        grid, agents.xy, agents.size_wlh[:, :2], agents.yaw, agents.classes, len(categories.CLASSES)
    )
    return occupancy.astype(np.float32)


class ForecastSource(Protocol):
    """Gives the planner a forecast in the current ego frame; sees the world after every sub-step."""

    name: str

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Called at the start and after every sub-step (only the model source renders sensors here)."""
        ...

    def forecast(
        self,
        built: world.World,
        state: world.WorldState,
        previous: planner.Plan | None,
        candidates: Sequence[planner.Plan],
    ) -> forecaster_api.OccupancyForecast | list[forecaster_api.OccupancyForecast] | None:
        """One forecast for every candidate, one per candidate, or None (the planner then ignores collisions)."""
        ...


class NoForecast:
    """The ``none`` source: the planner ignores everything and drives at its cruise speed."""

    name = NONE

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Nothing to see."""

    def forecast(self, built, state, previous, candidates) -> None:
        """No forecast."""
        return None


class ConstantVelocitySource:
    """The ``cv`` source: today's true boxes moved at constant velocity, rasterized (probabilities 0 or 1)."""

    name = CONSTANT_VELOCITY

    def __init__(self, grid: geometry.GridSpec | None = None) -> None:
        self.grid = geometry.GridSpec() if grid is None else grid

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Nothing to render."""

    def forecast(self, built, state, previous, candidates) -> forecaster_api.OccupancyForecast:
        """The constant-velocity forecast of the agents that exist now."""
        ego_from_global = world.ego_pose(built, state).inverse()
        agents = agents_in_frame(built, state, ego_from_global)
        occupancy = baselines.constant_velocity_occupancy(
            agents.boxes7(), agents.classes, agents.velocity, self.grid, len(categories.CLASSES), FORECAST_STEPS
        ).astype(np.float32)  # [S, C, H, W]
        trajectories = baselines.constant_velocity_trajectories(agents.xy, agents.velocity, 12)  # [A, 1, T, 2]
        return _forecast(state, self.grid, occupancy, agents, trajectories.astype(np.float32))


class OracleSource:
    """The ``oracle`` source: the simulator's own future under the ego's previous plan, rasterized."""

    name = ORACLE

    def __init__(self, grid: geometry.GridSpec | None = None) -> None:
        self.grid = geometry.GridSpec() if grid is None else grid

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Nothing to render."""

    def forecast(self, built, state, previous, candidates) -> forecaster_api.OccupancyForecast:
        """Step a copy of the world 2 s ahead (the ego following ``previous``, shifted by 0.5 s) and rasterize."""
        ego_from_global = world.ego_pose(built, state).inverse()
        steps = FORECAST_STEPS * suite_files.SUB_STEPS
        if previous is None:
            accel = np.zeros(steps)  # hold the current speed
        else:
            accel = previous.accel_profile(suite_files.SUB_STEP_S, steps + suite_files.SUB_STEPS)[
                suite_files.SUB_STEPS :
            ]
        now = agents_in_frame(built, state, ego_from_global)
        maps = [_rasterize(self.grid, now)]
        positions = {i: np.zeros((FORECAST_STEPS, 2)) for i in now.index}
        future = state
        for k in range(steps):
            future = world.step(built, future, suite_files.SUB_STEP_S, ego_accel_mps2=float(accel[k]))
            if (k + 1) % suite_files.SUB_STEPS == 0:
                agents = agents_in_frame(built, future, ego_from_global)
                maps.append(_rasterize(self.grid, agents))
                step = (k + 1) // suite_files.SUB_STEPS - 1
                for i, xy in zip(agents.index, agents.xy, strict=True):  # agents, not points or cells
                    if i in positions:
                        positions[i][step:] = xy
        trajectories = np.stack([positions[i] for i in now.index])[:, None] if len(now.index) else None
        return _forecast(state, self.grid, np.stack(maps), now, trajectories)


def _forecast(
    state: world.WorldState,
    grid: geometry.GridSpec,
    occupancy: np.ndarray,
    agents: AgentArrays,
    trajectories: np.ndarray | None,
) -> forecaster_api.OccupancyForecast:
    """An ``OccupancyForecast`` from occupancy [S, C, H, W] and one trajectory mode [A, 1, T, 2] per agent."""
    count = len(agents.index)
    if trajectories is None:
        trajectories = np.zeros((count, 1, FORECAST_STEPS, 2), dtype=np.float32)
    steps = trajectories.shape[2]
    return forecaster_api.OccupancyForecast(
        timestamp_us=keyframe.timestamp_us(state),
        grid=grid,
        classes=categories.CLASSES,
        times_s=np.arange(len(occupancy), dtype=np.float32) * np.float32(suite_files.PLANNING_STEP_S),
        occupancy=occupancy.astype(np.float32),
        agent_ids=agents.ids,
        agent_classes=agents.classes,
        trajectory_times_s=np.arange(1, steps + 1, dtype=np.float32) * np.float32(suite_files.PLANNING_STEP_S),
        trajectories=trajectories.astype(np.float32),
        mode_probabilities=np.ones((count, 1), dtype=np.float32),
    )


_FORECASTERS: dict[str, tuple] = {}
"""Loaded checkpoints of this process (a Ray worker runs many episodes): run folder -> (config, Forecaster)."""
FRAME_CACHE = 8
"""Encoded keyframes the model source's ``Forecaster`` keeps: each planning step encodes one new keyframe."""


def load_forecaster(run: Path | str):
    """The ``Forecaster`` and ``ExperimentConfig`` of a run folder, loaded once per process."""
    from bevjepa.prediction import checkpoint

    key = str(Path(run).resolve())
    if key not in _FORECASTERS:
        config, net = checkpoint.load_model(Path(run))
        _FORECASTERS[key] = (config, forecaster_api.Forecaster(net, cache_frames=FRAME_CACHE))
    return _FORECASTERS[key]


class ModelSource:
    """The ``model`` source: sensors rendered from the ego's pose, the world model's forecast (module docstring).

    Args:
        built: the episode's world.
        run: the checkpoint's run folder.
        image_width_px: camera width the model was trained on (height keeps the nuScenes 16:9 aspect).
        lidar_sweeps: sweeps aggregated per keyframe, one per 0.1 s sub-step (``keyframe.LiveSensorConfig``).
        rollout_candidates: roll the model out under every candidate's actions (one batched forward pass).
        torch_threads: torch's intra-op threads during a forecast (restored after). One: on the shared two-core
            machine a forecast took 0.25 s with one thread and 2.4 s with two (the other core was busy).
        seed: seeds the LiDAR's drops and noise.
        name_prefix: the keyframes' scene name and token prefix (a random suffix keeps runs apart).
        agents: ``tracked`` (the ``model`` source: the model's own tracks) or ``annotated`` (``model_annotated``:
            the true agents within the annotation range).
    """

    name = MODEL

    def __init__(
        self,
        built: world.World,
        run: Path | str,
        image_width_px: int = 256,
        lidar_sweeps: int = 5,
        rollout_candidates: bool = False,
        torch_threads: int = 1,
        seed: int = 0,
        name_prefix: str = "closed-loop",
        agents: str = "tracked",
    ) -> None:
        config, shared = load_forecaster(run)
        self.forecaster = shared.using(agents)
        self.name = MODEL if agents == "tracked" else MODEL_ANNOTATED
        model_config = config.model
        self.window_config = windows.WindowConfig(
            past_keyframes=model_config.fuser.past_frames,
            occupancy_steps=model_config.occupancy_steps,
            trajectory_steps=model_config.trajectory_steps,
            grid=model_config.grid,
        )
        self.rollout_candidates = rollout_candidates
        self.torch_threads = torch_threads
        # A fresh scene name per run: the forecaster's latent cache must never mix two runs' frames.
        self.name_prefix = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        self.sensors = keyframe.LiveSensors(
            built.layout,
            keyframe.LiveSensorConfig(image_width_px=image_width_px, lidar_sweeps=lidar_sweeps),
            seed=seed,
            scene_name=self.name_prefix,
        )
        self.image_hw = self.sensors.config.image_hw
        self.frames: deque[windows.Frame] = deque(maxlen=self.window_config.past_keyframes)
        self.history: deque[tuple[geometry.RigidTransform, dict[int, np.ndarray]]] = deque(
            maxlen=self.window_config.past_keyframes
        )

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Render one LiDAR sweep from the ego's pose now."""
        self.sensors.observe(built, state)

    def sample(self, built: world.World, state: world.WorldState, future_actions: np.ndarray | None):
        """The ``WindowSample`` of now (renders the cameras; keeps the last P frames)."""
        self.frames.append(self.sensors.frame(built, state, self.window_config))
        global_from_ego = world.ego_pose(built, state)
        ego_from_global = global_from_ego.inverse()
        xy_all, _ = world.actor_poses(built, state)
        agents = agents_in_frame(built, state, ego_from_global)
        near = np.linalg.norm(agents.xy, axis=1) <= self.sensors.config.annotation_range_m
        if self.forecaster.agents == "tracked":  # what a car has: no actor of the simulator is read
            near[:] = False
        agents = AgentArrays(*(getattr(agents, f)[near] for f in AgentArrays.__dataclass_fields__))
        self.history.append((global_from_ego, {int(i): xy_all[i] for i in agents.index}))
        p_count = self.window_config.past_keyframes
        frames = [self.frames[0]] * (p_count - len(self.frames)) + list(self.frames)  # repeat the oldest
        history = [self.history[0]] * (p_count - len(self.history)) + list(self.history)
        past = np.zeros((len(agents.index), p_count, 2))
        past_mask = np.zeros((len(agents.index), p_count), dtype=bool)
        for p, (_, positions) in enumerate(history):  # P keyframes × A agents
            for a, i in enumerate(agents.index):
                if int(i) in positions:
                    past[a, p] = ego_from_global.apply(np.array([*positions[int(i)], 0.0]))[:2]
                    past_mask[a, p] = True
        window = windows.inference_window(
            frames,
            agents.boxes7(),
            agents.classes,
            agents.velocity,
            past,
            past_mask,
            list(agents.ids),
            self.window_config,
            future_actions,
        )
        return torch_dataset.sample_from_window(window, frames, self.image_hw)

    def forecast(self, built, state, previous, candidates):
        """The model's forecast (one per candidate with ``rollout_candidates``)."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            return self._forecast(built, state, previous, candidates)
        finally:
            torch.set_num_threads(threads)

    def _forecast(self, built, state, previous, candidates):
        steps = self.window_config.occupancy_steps
        previous_actions = None if previous is None else _shifted_actions(previous, steps)
        sample = self.sample(built, state, previous_actions)
        if not self.rollout_candidates or not candidates:
            return self.forecaster.forecast(sample)
        import torch

        batch = torch_dataset.collate([sample] * len(candidates))
        actions = torch.from_numpy(np.stack([c.actions(steps) for c in candidates]))  # [N, F, 3]
        if self.forecaster.agents == "annotated":
            return self.forecaster.forecast_batch(batch, actions)
        tracks = self.forecaster.track(torch_dataset.collate([sample]))  # once: one stream step, whatever N
        return self.forecaster.forecast_batch(batch, actions, tracks=tracks * len(candidates))


def _shifted_actions(plan: planner.Plan, steps: int) -> np.ndarray:
    """[F, 3] the previous plan's actions from 0.5 s on (its last one repeated): the motion the ego will continue."""
    actions = plan.actions(steps)
    return np.concatenate([actions[1:], actions[-1:]], axis=0)


def make_source(
    forecast: str,
    built: world.World,
    checkpoint: Path | str | None = None,
    seed: int = 0,
    name_prefix: str = "closed-loop",
    **model_options,
) -> ForecastSource:
    """The forecast source named ``forecast`` (one of ``FORECASTS``) for one episode's world.

    Raises:
        ValueError: an unknown name, or ``model`` without a checkpoint.
    """
    if forecast == NONE:
        return NoForecast()
    if forecast == CONSTANT_VELOCITY:
        return ConstantVelocitySource()
    if forecast == ORACLE:
        return OracleSource()
    if forecast in MODEL_SOURCES:
        if checkpoint is None:
            raise ValueError(
                f"the {forecast} forecast needs a checkpoint: pass --checkpoint RUN (a `bevjepa train` folder)"
            )
        agents = "tracked" if forecast == MODEL else "annotated"
        return ModelSource(built, checkpoint, seed=seed, name_prefix=name_prefix, agents=agents, **model_options)
    raise ValueError(f"unknown forecast source {forecast!r}; choose one of {list(FORECASTS)}")
