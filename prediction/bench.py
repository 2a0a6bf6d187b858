"""Benchmarks of the model: inference latency per frame, broken down by stage, and the training step time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, torch_dataset
from bevjepa.fusion import fuser
from bevjepa.prediction import agent_occupancy, checkpoint, forecaster, model
from bevjepa.prediction import config as experiment_config


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


@torch.no_grad()
def inference_latency(data: Path, preset: str = "small", repeats: int = 10, threads: int = 2) -> dict:
    """Milliseconds to forecast one window (batch 1, eval mode), end to end and by stage.

    The stages run on the same window as the whole forward pass: cameras and LiDAR over the P input frames,
    fusion (modalities, warp into t0, temporal), the rollout of F steps, and the heads (occupancy at every
    step, trajectories, detection), and, outside the network, the rendering of the agents' boxes along their
    modes into the forecast's occupancy (numpy, ``agent_occupancy``). Weights are untrained: latency does not
    depend on them.
    """
    torch.set_num_threads(threads)
    config = experiment_config.preset(preset)
    net = model.BevJepa(config.model).eval()
    sample = torch_dataset.WindowDataset(data)[0]
    batch = torch_dataset.collate([sample])
    frames = model.SensorFrames.past(batch)
    encoder = net.encoder
    b, s = frames.reference_from_ego.shape[:2]
    ego_from_reference = torch.linalg.inv(frames.reference_from_ego.reshape(b * s, 4, 4))
    own_from_camera = ego_from_reference[:, None] @ frames.reference_from_camera.reshape(b * s, 6, 4, 4)
    owner = frames.points_batch * s + frames.points_frame
    transform = ego_from_reference[owner]
    xyz = torch.einsum("mij,mj->mi", transform[:, :3, :3], frames.points[:, :3]) + transform[:, :3, 3]
    points = torch.cat([xyz, frames.points[:, 3:]], dim=1)
    images = frames.images.reshape(b * s, *frames.images.shape[2:])

    def cameras():
        return encoder.camera(
            images, frames.intrinsics.reshape(b * s, 6, 3, 3), own_from_camera, frames.camera_mask.reshape(b * s, 6)
        )

    def lidar():
        return encoder.lidar(points, owner, b * s)

    camera_bev, lidar_bev = cameras(), lidar()

    def fusion():
        fused = encoder.fuse(camera_bev, lidar_bev)
        warped = fuser.warp_to_reference(
            fused, frames.reference_from_ego.reshape(b * s, 4, 4), encoder.config.fuser.grid
        )
        return encoder.temporal(warped.reshape(b, s, *warped.shape[1:]))

    latent = fusion()
    actions = batch.actions[:, s - 1 : s - 1 + config.model.occupancy_steps]

    def rollout():
        return net.predictor.rollout(latent, actions)

    rolled = rollout()

    own = encoder.encode_frames(frames)

    def heads():
        sequence = torch.cat([latent[:, None], rolled], dim=1)
        fine, coarse = net.decode(sequence, list(range(sequence.shape[1])), own)[:2]
        net.occupancy(fine.reshape(-1, *fine.shape[2:]))
        net.trajectory(
            latent,
            batch.agent_box[..., :2],
            batch.agent_past,
            batch.agent_past_mask,
            batch.agent_box[..., 6],
            batch.agent_class,
            rollout=rolled,
            ego_past=batch.t0_from_ego[:, :, :2, 3],
        )
        net.detection(coarse[:, 0])

    with torch.no_grad():
        output = net(batch)
    count = int(batch.agent_mask[0].sum())
    modes = output.modes[0, :count].numpy()
    probabilities = torch.softmax(output.mode_logits[0, :count], dim=-1).numpy()

    def render():
        agent_occupancy.mode_occupancy(
            batch.agent_box[0, :count].numpy(), batch.agent_class[0, :count].numpy(), modes, probabilities,
            config.model.grid, len(categories.CLASSES), config.model.occupancy_steps,
        )  # fmt: skip

    for fn in (cameras, lidar, fusion, rollout, heads, render, lambda: net(batch)):
        fn()  # warm up
    result = {
        "preset": preset,
        "threads": threads,
        "points": int(batch.points.shape[0]),
        "agents": int(batch.agent_mask.sum()),
        "end_to_end_ms": _median_ms(lambda: net(batch), repeats),
        "cameras_ms": _median_ms(cameras, repeats),
        "lidar_ms": _median_ms(lidar, repeats),
        "fusion_ms": _median_ms(fusion, repeats),
        "rollout_ms": _median_ms(rollout, repeats),
        "heads_ms": _median_ms(heads, repeats),
        "occupancy_render_ms": _median_ms(render, repeats),
    }
    result["frames_per_s"] = 1e3 / result["end_to_end_ms"]
    return result


def training_step_time(data: Path, preset: str = "small", repeats: int = 5, threads: int = 2) -> dict:
    """Milliseconds of one training step (forward, losses with the JEPA target, backward, AdamW, EMA)."""
    torch.set_num_threads(threads)
    config = experiment_config.preset(preset)
    torch.manual_seed(0)
    net = model.BevJepa(config.model).train()
    dataset = torch_dataset.WindowDataset(data, future_inputs=True)
    batch = torch_dataset.collate([dataset[i % len(dataset)] for i in range(config.train.batch_size)])
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        output = net(batch)
        terms = model.compute_losses(net, batch, output, config.train.weights)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        net.update_target(config.train.ema_decay)

    step()
    return {"preset": preset, "batch_size": config.train.batch_size, "step_ms": _median_ms(step, repeats)}


def training_throughput(data: Path, preset: str = "small", steps: int = 30, sensors: str = "both") -> dict:
    """Training windows per second of the real training loop (data loading, JEPA targets, validation left out).

    Runs ``train.train`` for ``steps`` steps into a temporary folder, the first ``steps // 3`` (warm-up, a cold
    frame cache) left out of the median step time.

    Args:
        data: a ``bevjepa preprocess`` output with ``mini_train`` windows.
        preset: the config preset.
        steps: optimizer steps timed.
        sensors: ``both``, ``lidar`` or ``camera``, as ``bevjepa train --sensors``.
    """
    import dataclasses
    import tempfile

    from bevjepa.prediction import train

    config = experiment_config.preset(preset)
    if sensors != "both":
        config = dataclasses.replace(
            config,
            model=dataclasses.replace(config.model, use_camera=sensors == "camera", use_lidar=sensors == "lidar"),
        )
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, steps=steps, val_every=10 * steps, checkpoint_minutes=1e6)
    )
    with tempfile.TemporaryDirectory() as folder:
        summary = train.train(data, Path(folder) / "run", config, progress=False)
    median_s = float(np.median(summary.step_times_s[steps // 3 :]))
    return {
        "preset": preset,
        "sensors": sensors,
        "steps": summary.steps,
        "batch_size": config.train.batch_size,
        "step_ms": 1e3 * median_s,
        "windows_per_s": config.train.batch_size / median_s,
    }


@torch.no_grad()
def stream_latency(
    data: Path, preset: str = "small", windows: int = 12, threads: int = 2, run: Path | None = None
) -> dict:
    """Milliseconds per forecast through the planner's API over consecutive windows of one scene, cold and streaming.

    Cold: every forecast encodes its P input keyframes. Streaming: ``Forecaster(cache_frames=...)`` encodes each
    keyframe once, so a forecast pays for one new frame's sensors (the first forecast of the stream, which
    encodes all P, is left out of both medians). Both forecast from the sensors alone (``sensors_only`` windows,
    tracking included); a third, streaming with the annotated agents, shows what tracking costs. All run the same
    weights on the same windows, alternating: untrained ``preset`` weights, or the model of ``run`` (a trained
    model detects agents, so its tracking has work to do).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if run is None:
        net = model.BevJepa(experiment_config.preset(preset).model).eval()
    else:
        preset, net = str(run), checkpoint.load_model(run)[1].eval()
    dataset = torch_dataset.WindowDataset(data, cameras=net.config.use_camera)
    scene = dataset.entries[0]["scene"]
    indices = [i for i, entry in enumerate(dataset.entries) if entry["scene"] == scene][:windows]
    samples = [dataset[i] for i in indices]
    cache = 2 * len(samples)
    cold, streaming = forecaster.Forecaster(net), forecaster.Forecaster(net, cache_frames=cache)
    annotated = forecaster.Forecaster(net, cache_frames=cache, agents="annotated")
    runners = ((cold, True), (streaming, True), (annotated, False))
    for runner, blind in runners:  # warm up
        runner.forecast(samples[0].sensors_only() if blind else samples[0])
    times: list[list[float]] = [[], [], []]
    agents = []
    for sample in samples[1:]:
        blind = sample.sensors_only()
        for (runner, sensors_only), spent in zip(runners, times, strict=True):
            start = time.perf_counter()
            forecast = runner.forecast(blind if sensors_only else sample)
            spent.append(1e3 * (time.perf_counter() - start))
            if runner is streaming:
                agents.append(forecast.agent_ids.size)
    cold_ms, stream_ms, annotated_ms = (float(np.median(t)) for t in times)
    return {
        "model": preset,
        "threads": threads,
        "forecasts": len(samples) - 1,
        "tracked_agents_per_forecast": float(np.mean(agents)),
        "cold_ms": cold_ms,
        "streaming_ms": stream_ms,
        "streaming_per_s": 1e3 / stream_ms,
        "speedup": cold_ms / stream_ms,
        "annotated_streaming_ms": annotated_ms,
    }
