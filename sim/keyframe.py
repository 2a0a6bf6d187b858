"""Live keyframes: the simulator's world state and the sensors rendered from it, as the keyframe a dataset gives.

The closed loop's model source sees what a car sees: a LiDAR sweep rendered from the ego's pose after every world
sub-step and the six cameras at each planning step. This adapter turns them into the same
``nuscenes_source.Keyframe`` that the nuScenes source reads from disk, its LiDAR aggregated by the same code
(``nuscenes_source.aggregate_sweeps``, with the dataset's close-point filter ``SourceConfig.min_point_distance_m``),
and then into the same ``windows.Frame`` that preprocessing stores (``windows.build_frame``), so that nothing
downstream knows which one it got.

What still differs from a dataset keyframe, by design: the sweeps are the last ``lidar_sweeps`` observed (one per
``observe`` call, i.e. per 0.1 s sub-step in the closed loop, where the dataset has 10 sweeps at 20 Hz), each
instantaneous (no motion during the spin, as the synthetic dataset's); the cameras are rendered at the keyframe's
time; the keyframe's token is ``<scene name>-<timestamp_us>``; nothing is ever a bad input.

Notation:
    N  LiDAR points of a keyframe (all its sweeps)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bevjepa.datasets import geometry, nuscenes_source, types, windows
from bevjepa.sim import layouts, sensors, world, writer


def timestamp_us(state: world.WorldState) -> int:
    """The world's time as a nuScenes timestamp (µs)."""
    return int(round(state.time_s * 1e6))


@dataclass(frozen=True)
class LiveSensorConfig:
    """What the live sensors render and how a keyframe aggregates them.

    Attributes:
        image_width_px: camera width (pixels); the height keeps the nuScenes 16:9 aspect (``image_hw``), as the
            nuScenes source resizes.
        lidar_sweeps: sweeps aggregated per keyframe: the last ones observed.
        min_point_distance_m: the aggregation's close-point filter (m): points with |x| and |y| below it in their
            sensor frame are dropped; by default the dataset's (``nuscenes_source.SourceConfig``).
        annotation_range_m: agents whose centre lies within this distance (m) of the ego are the keyframe's boxes,
            as the dataset writer annotates.
    """

    image_width_px: int = 256
    lidar_sweeps: int = 5
    min_point_distance_m: float = nuscenes_source.SourceConfig.min_point_distance_m
    annotation_range_m: float = writer.ANNOTATION_RANGE_M

    def __post_init__(self) -> None:
        if self.image_width_px < 8:
            raise ValueError(f"LiveSensorConfig.image_width_px must be at least 8, got {self.image_width_px}")
        if self.lidar_sweeps < 1:
            raise ValueError(f"LiveSensorConfig.lidar_sweeps must be at least 1, got {self.lidar_sweeps}")
        if not self.min_point_distance_m >= 0:
            raise ValueError(
                f"LiveSensorConfig.min_point_distance_m must not be negative, got {self.min_point_distance_m}"
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the rendered camera images (pixels)."""
        height = round(self.image_width_px * sensors.NATIVE_HEIGHT_PX / sensors.NATIVE_WIDTH_PX)
        return height, self.image_width_px


def keyframe_from_sensors(
    scene_name: str,
    timestamp_us: int,
    global_from_ego: geometry.RigidTransform,
    sweeps: Sequence[types.LidarSweep],
    cameras: Sequence[types.CameraImage],
    boxes: Sequence[types.Box3D],
    config: LiveSensorConfig,
) -> nuscenes_source.Keyframe:
    """The keyframe of rendered sensors, as the nuScenes source makes one of recorded files.

    Args:
        scene_name: the keyframe's scene; its token is ``<scene_name>-<timestamp_us>``.
        timestamp_us: the keyframe's time (µs); the sweeps' time lags are measured behind it.
        global_from_ego: the ego pose at ``timestamp_us``.
        sweeps: the sweeps to aggregate (points in their sensor frame), in the order their points are to appear.
        cameras: the camera images.
        boxes: the agents (global frame); those within ``config.annotation_range_m`` of the ego become the
            keyframe's boxes, in its ego frame.
        config: the close-point filter and the annotation range.

    Returns:
        the keyframe; ``lidar_points`` [N, 5] float32 as ``nuscenes_source.aggregate_sweeps`` gives them.
    """
    ego_from_global = global_from_ego.inverse()
    near = [
        b.transformed(ego_from_global)
        for b in boxes
        if np.linalg.norm(b.center_m[:2] - global_from_ego.translation[:2]) <= config.annotation_range_m
    ]
    return nuscenes_source.Keyframe(
        sample_token=f"{scene_name}-{timestamp_us}",
        scene_name=scene_name,
        timestamp_us=timestamp_us,
        global_from_ego=global_from_ego,
        lidar_points=nuscenes_source.aggregate_sweeps(
            sweeps, global_from_ego, timestamp_us, config.min_point_distance_m
        ),
        cameras=tuple(cameras),
        boxes=tuple(near),
        bad_inputs=(),
    )


class LiveSensors:
    """The ego's sensors in a running world: a LiDAR sweep per ``observe``, a keyframe or frame when asked.

    Args:
        layout: the world's road layout (meshed once for rendering).
        config: what to render and how to aggregate it.
        seed: seeds the LiDAR's drops and noise.
        scene_name: the keyframes' scene name and token prefix.
    """

    def __init__(
        self, layout: layouts.RoadLayout, config: LiveSensorConfig, seed: int = 0, scene_name: str = "live"
    ) -> None:
        self.config = config
        self.scene_name = scene_name
        height, width = config.image_hw
        self.renderer = sensors.SensorRenderer(
            layout, sensors.LidarConfig(), sensors.CameraConfig(width_px=width, height_px=height)
        )
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC105ED]))
        self.sweeps: deque[types.LidarSweep] = deque(maxlen=config.lidar_sweeps)

    def observe(self, built: world.World, state: world.WorldState) -> None:
        """Render one LiDAR sweep from the ego's pose now (the oldest beyond ``lidar_sweeps`` is dropped)."""
        boxes, _ = world.agent_boxes(built, state)
        sweep, _ = self.renderer.lidar_sweep(boxes, world.ego_pose(built, state), timestamp_us(state), self.rng)
        self.sweeps.append(sweep)

    def keyframe(self, built: world.World, state: world.WorldState) -> nuscenes_source.Keyframe:
        """The keyframe of now: the observed sweeps aggregated into the ego frame, the six cameras, the agents."""
        timestamp = timestamp_us(state)
        global_from_ego = world.ego_pose(built, state)
        boxes, _ = world.agent_boxes(built, state)
        images, _ = self.renderer.camera_images(boxes, global_from_ego, timestamp)
        return keyframe_from_sensors(
            self.scene_name, timestamp, global_from_ego, list(self.sweeps), images, boxes, self.config
        )

    def frame(self, built: world.World, state: world.WorldState, config: windows.WindowConfig) -> windows.Frame:
        """The stored inputs of now, as preprocessing makes them (``windows.build_frame`` of ``keyframe``)."""
        return windows.build_frame(self.keyframe(built, state), config)
