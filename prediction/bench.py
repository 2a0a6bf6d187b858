"""Benchmarks of the model: inference latency per frame, broken down by stage, and the training step time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bevjepa.datasets import categories, torch_dataset
from bevjepa.fusion import fuser
from bevjepa.prediction import agent_occupancy, checkpoint, forecaster, model
from bevjepa.prediction import config as experiment_config

CPU = torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA kernel returns before it is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device = CPU) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls on ``device``."""
    return _interleaved_ms({"fn": fn}, repeats, device)["fn"]


def _interleaved_ms(
    functions: dict[str, Callable[[], object]], repeats: int, device: torch.device = CPU
) -> dict[str, float]:
    """Median milliseconds of each function, called in turn ``repeats`` times, so that drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(spent)) for name, spent in times.items()}


@contextmanager
def reference_splat(net: model.BevJepa) -> Iterator[None]:
    """While the body runs, ``net``'s camera encoder splats as before the speed work (``splat_reference``)."""
    camera = net.encoder.camera
    if camera is None:
        yield
        return
    camera.splat = camera.splat_reference  # an instance attribute shadows the method
    try:
        yield
    finally:
        del camera.splat


def _with_reference_splat(net: model.BevJepa, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``reference_splat(net)``."""

    def run() -> object:
        with reference_splat(net):
            return fn()

    return run


@torch.no_grad()
def inference_latency(
    data: Path, preset: str = "small", repeats: int = 10, threads: int = 2, device: str = "cpu"
) -> dict:
    """Milliseconds to forecast one window (batch 1, eval mode), end to end and by stage.

    The stages run on the same window as the whole forward pass: cameras and LiDAR over the P input frames,
    fusion (modalities, warp into t0, temporal), the rollout of F steps, and the heads (occupancy at every
    step, trajectories, detection), and, outside the network, the rendering of the agents' boxes along their
    modes into the forecast's occupancy (numpy, ``agent_occupancy``). Weights are untrained: latency does not
    depend on them. ``end_to_end_reference_ms`` and ``cameras_reference_ms`` time the same with the splat as it
    was before its index was cached (``reference_splat``), interleaved with the current path in this run.
    ``device``: where to run (``cuda`` for a GPU; ``threads`` then only sets the host's).
    """
    torch.set_num_threads(threads)
    config = experiment_config.preset(preset)
    where = torch.device(device)
    net = model.BevJepa(config.model).eval().to(where)
    sample = torch_dataset.WindowDataset(data)[0]
    batch = torch_dataset.collate([sample]).to(where)
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
    skips = net.present_skips(own.fine, frames.reference_from_ego)

    def heads():
        sequence = torch.cat([latent[:, None], rolled], dim=1)
        fine, coarse = net.decode(sequence, list(range(sequence.shape[1])), skips)[:2]
        net.occupancy(fine.reshape(-1, *fine.shape[2:]))
        if net.present_occupancy is not None:
            net.present_occupancy(fine[:, 0])
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
    modes = output.modes[0, :count].cpu().numpy()
    probabilities = torch.softmax(output.mode_logits[0, :count], dim=-1).cpu().numpy()
    boxes, classes = batch.agent_box[0, :count].cpu().numpy(), batch.agent_class[0, :count].cpu().numpy()

    def render():
        agent_occupancy.mode_occupancy(
            boxes, classes, modes, probabilities,
            config.model.grid, len(categories.CLASSES), config.model.occupancy_steps,
        )  # fmt: skip

    for fn in (cameras, lidar, fusion, rollout, heads, render, lambda: net(batch)):
        fn()  # warm up
    paired = _interleaved_ms(
        {
            "end_to_end_reference_ms": _with_reference_splat(net, lambda: net(batch)),
            "end_to_end_ms": lambda: net(batch),
            "cameras_reference_ms": _with_reference_splat(net, cameras),
            "cameras_ms": cameras,
        },
        repeats,
        where,
    )
    result = {
        "preset": preset,
        "device": str(where),
        "threads": threads,
        "points": int(batch.points.shape[0]),
        "agents": int(batch.agent_mask.sum()),
        **paired,
        "end_to_end_speedup": paired["end_to_end_reference_ms"] / paired["end_to_end_ms"],
        "lidar_ms": _median_ms(lidar, repeats, where),
        "fusion_ms": _median_ms(fusion, repeats, where),
        "rollout_ms": _median_ms(rollout, repeats, where),
        "heads_ms": _median_ms(heads, repeats, where),
        "occupancy_render_ms": _median_ms(render, repeats, where),
    }
    result["frames_per_s"] = 1e3 / result["end_to_end_ms"]
    return result


def training_step_time(
    data: Path, preset: str = "small", repeats: int = 5, threads: int = 2, device: str = "cpu"
) -> dict:
    """Milliseconds of one training step (forward, losses with the JEPA target, backward, AdamW, EMA) on ``device``."""
    torch.set_num_threads(threads)
    config = experiment_config.preset(preset)
    torch.manual_seed(0)
    where = torch.device(device)
    net = model.BevJepa(config.model).train().to(where)
    dataset = torch_dataset.WindowDataset(data, future_inputs=True)
    batch = torch_dataset.collate([dataset[i % len(dataset)] for i in range(config.train.batch_size)]).to(where)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        output = net(batch, decode=model.draw_decoded_steps(config.model, config.train.weights))
        terms = model.compute_losses(net, batch, output, config.train.weights)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        net.update_target(config.train.ema_decay)

    step()
    return {
        "preset": preset,
        "device": str(where),
        "batch_size": config.train.batch_size,
        "step_ms": _median_ms(step, repeats, where),
    }


def decoded_steps_speed(
    data: Path, preset: str = "small", sensors: str = "lidar", repeats: int = 7, threads: int = 1
) -> dict:
    """A world-model training step decoding every step, against variants of it and the direct baseline's.

    The variants: t0 and 1 or 2 drawn future steps decoded, and every step under bfloat16 autocast.
    ``LossWeights.decoded_future_steps`` sets the drawn steps, ``TrainConfig.precision`` the autocast; the steps
    are interleaved, their medians reported in milliseconds. The world model trains without the latent loss, as the
    30-minute runs do; each variant is its own model with the same initialisation, stepping on the same batch.

    Args:
        data: a ``bevjepa preprocess`` output.
        preset: the world model's preset (or a config file); the direct baseline is its LiDAR-only, no-world-model
            variant.
        sensors: ``both``, ``lidar`` or ``camera``, as ``bevjepa train --sensors``.
        repeats: steps timed per variant (after one untimed step each).
        threads: torch threads (one by default; `bevjepa train` uses every core, two on the 2-core host).
    """
    import dataclasses

    from bevjepa.prediction import train

    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    config = experiment_config.preset(preset)
    config = dataclasses.replace(
        config,
        model=config.model.on_sensors(sensors),
    )
    direct = dataclasses.replace(  # the preset's LiDAR encoder and decoder, as ``config.direct`` builds from small
        config,
        model=config.model.direct_baseline(),
        train=dataclasses.replace(config.train, weights=dataclasses.replace(config.train.weights, latent=0.0)),
    )
    variants = {
        f"world_model_{name}": dataclasses.replace(
            config,
            train=dataclasses.replace(
                config.train,
                weights=dataclasses.replace(config.train.weights, latent=0.0, decoded_future_steps=future),
            ),
        )
        for name, future in (("every_step", None), ("1_future_step", 1), ("2_future_steps", 2))
    }
    every_step = variants["world_model_every_step"]
    variants["world_model_bfloat16"] = dataclasses.replace(
        every_step, train=dataclasses.replace(every_step.train, precision="bfloat16")
    )
    variants["direct"] = direct
    dataset = torch_dataset.WindowDataset(data)
    batch = torch_dataset.collate([dataset[i % len(dataset)] for i in range(config.train.batch_size)])
    steps = {}
    for name, variant in variants.items():
        torch.manual_seed(0)
        net = model.BevJepa(variant.model).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(net=net, optimizer=optimizer, variant=variant) -> None:
            with train.autocast(variant.train.precision, CPU):
                output = net(batch, decode=model.draw_decoded_steps(variant.model, variant.train.weights))
            terms = model.compute_losses(net, batch, model.heads_in_float32(output), variant.train.weights)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()

        step()
        steps[name] = step
    times = _interleaved_ms(steps, repeats)
    result: dict = {"preset": preset, "sensors": sensors, "threads": threads, "batch_size": config.train.batch_size}
    for name, ms in times.items():
        result[f"{name}_ms"] = ms
    every = times["world_model_every_step"]
    for name in ("world_model_1_future_step", "world_model_2_future_steps", "world_model_bfloat16", "direct"):
        result[f"{name}_speedup"] = every / times[name]
    return result


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
            model=config.model.on_sensors(sensors),
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
def evaluation_pass(
    data: Path,
    preset: str = "small",
    run: Path | None = None,
    windows: int = 12,
    batch_size: int = 4,
    threads: int = 2,
) -> dict:
    """Milliseconds per window of what ``bevjepa eval`` asks of the model on each batch, the scene shared or not.

    The evaluation tracks the agents of a batch, forecasts the tracks and forecasts the annotated agents. Shared:
    the scene is predicted once (``Forecaster.scene``) and handed to all three, as ``bevjepa eval`` does. Each its
    own: each call predicts the scene again (the tracker decoding t0 alone), as it did before. Both alternate on
    the same batches of ``windows`` windows (the first batch of each is a warm-up, left out), each with its own
    frame cache (so every keyframe is encoded once either way), and their forecasts must be the same
    (``max_occupancy_diff``). Untrained ``preset`` weights, or the model of ``run``.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = model.BevJepa(experiment_config.preset(preset).model) if run is None else checkpoint.load_model(run)[1]
    net = net.eval()
    dataset = torch_dataset.WindowDataset(data, cameras=net.config.use_camera)
    count = min(windows + batch_size, len(dataset))
    batches = [
        torch_dataset.collate([dataset[i] for i in range(first, min(first + batch_size, count))])
        for first in range(0, count, batch_size)
    ]

    def each_its_own(model_: forecaster.Forecaster, batch: torch_dataset.WindowBatch) -> list:
        tracks = model_.track(batch)
        return model_.forecast_batch(batch, tracks=tracks) + model_.using("annotated").forecast_batch(batch)

    def shared(model_: forecaster.Forecaster, batch: torch_dataset.WindowBatch) -> list:
        scene = model_.scene(batch)
        tracks = model_.track(batch, scene=scene)
        forecasts = model_.forecast_batch(batch, tracks=tracks, scene=scene)
        return forecasts + model_.using("annotated").forecast_batch(batch, scene=scene)

    paths = {"each_its_own": each_its_own, "shared": shared}
    forecasters = {name: forecaster.Forecaster(net, cache_frames=8 * batch_size) for name in paths}
    times: dict[str, list[float]] = {name: [] for name in paths}
    difference = 0.0
    for index, batch in enumerate(batches):
        outputs = {}
        for name, path in paths.items():
            start = time.perf_counter()
            outputs[name] = path(forecasters[name], batch)
            if index > 0:
                times[name].append(1e3 * (time.perf_counter() - start) / batch.batch_size)
        for before, now in zip(outputs["each_its_own"], outputs["shared"], strict=True):
            difference = max(difference, float(np.abs(before.occupancy - now.occupancy).max()))
    ms = {f"{name}_ms_per_window": float(np.median(spent)) for name, spent in times.items()}
    return {
        "model": preset if run is None else str(run),
        "threads": threads,
        "windows": sum(batch.batch_size for batch in batches[1:]),
        "batch_size": batch_size,
        **ms,
        "speedup": ms["each_its_own_ms_per_window"] / ms["shared_ms_per_window"],
        "max_occupancy_diff": difference,
    }


@torch.no_grad()
def stream_latency(
    data: Path,
    preset: str = "small",
    windows: int = 12,
    threads: int = 2,
    run: Path | None = None,
    baseline: Path | None = None,
) -> dict:
    """Milliseconds per forecast through the planner's API over consecutive windows of one scene, cold and streaming.

    Cold: every forecast encodes its P input keyframes. Streaming: ``Forecaster(cache_frames=...)`` encodes each
    keyframe once, so a forecast pays for one new frame's sensors (the first forecast of the stream, which
    encodes all P, is left out of every median). Both forecast from the sensors alone (``sensors_only`` windows,
    tracking included), each twice: as now, and by the path from before the speed work (``reference``:
    ``Forecaster(reference=True)`` under ``reference_splat``), whose cold forecasts must be the same
    (``max_occupancy_diff``; streaming, the current path reads each earlier keyframe's detection from the forecast
    where it was the present, which the reference path detects again from the window's frames). A fifth,
    streaming with the annotated agents, shows what tracking costs, and a sixth, streaming with the tracker's
    velocities (``velocity_from_points=False``), what the LiDAR velocity costs (``velocity_from_points_cost``,
    streaming ÷ that). All run the same weights on the same
    windows, alternating: untrained ``preset`` weights, or the model of ``run``
    (a trained model detects agents, so its tracking has work to do). With ``baseline``, the model of that run
    forecasts the same windows cold and streaming in the same alternation (``baseline_cold_ms``,
    ``baseline_streaming_ms``), so that two models are compared in one run, as the machine's load moves.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if run is None:
        net = model.BevJepa(experiment_config.preset(preset).model).eval()
    else:
        preset, net = str(run), checkpoint.load_model(run)[1].eval()
    other = None if baseline is None else checkpoint.load_model(baseline)[1].eval()
    cameras = net.config.use_camera or (other is not None and other.config.use_camera)
    dataset = torch_dataset.WindowDataset(data, cameras=cameras)
    scene = dataset.entries[0]["scene"]
    indices = [i for i, entry in enumerate(dataset.entries) if entry["scene"] == scene][:windows]
    samples = [dataset[i] for i in indices]
    cache = 2 * len(samples)
    runners = {
        "cold_reference": (forecaster.Forecaster(net, reference=True), True, True),
        "streaming_reference": (forecaster.Forecaster(net, cache_frames=cache, reference=True), True, True),
        "cold": (forecaster.Forecaster(net), True, False),
        "streaming": (forecaster.Forecaster(net, cache_frames=cache), True, False),
        "annotated_streaming": (forecaster.Forecaster(net, cache_frames=cache, agents="annotated"), False, False),
        "streaming_tracker_velocity": (
            forecaster.Forecaster(net, cache_frames=cache, velocity_from_points=False),
            True,
            False,
        ),
    }
    if other is not None:
        runners["baseline_cold"] = (forecaster.Forecaster(other), True, False)
        runners["baseline_streaming"] = (forecaster.Forecaster(other, cache_frames=cache), True, False)

    def run_one(name: str, sample: torch_dataset.WindowSample) -> forecaster.OccupancyForecast:
        runner, sensors_only, reference = runners[name]
        window = sample.sensors_only() if sensors_only else sample
        if reference:
            with reference_splat(net):
                return runner.forecast(window)
        return runner.forecast(window)

    for name in runners:  # warm up: the first forecast of each stream
        run_one(name, samples[0])
    times: dict[str, list[float]] = {name: [] for name in runners}
    agents, differences = [], [0.0]
    for sample in samples[1:]:
        forecasts = {}
        for name in runners:
            start = time.perf_counter()
            forecasts[name] = run_one(name, sample)
            times[name].append(1e3 * (time.perf_counter() - start))
        agents.append(forecasts["streaming"].agent_ids.size)
        differences.append(float(np.abs(forecasts["cold"].occupancy - forecasts["cold_reference"].occupancy).max()))
    ms = {f"{name}_ms": float(np.median(spent)) for name, spent in times.items()}
    return {
        "model": preset,
        "threads": threads,
        "forecasts": len(samples) - 1,
        "tracked_agents_per_forecast": float(np.mean(agents)),
        **ms,
        "streaming_per_s": 1e3 / ms["streaming_ms"],
        "speedup": ms["cold_ms"] / ms["streaming_ms"],
        "cold_speedup_over_reference": ms["cold_reference_ms"] / ms["cold_ms"],
        "streaming_speedup_over_reference": ms["streaming_reference_ms"] / ms["streaming_ms"],
        "max_occupancy_diff": max(differences),
        "velocity_from_points_cost": ms["streaming_ms"] / ms["streaming_tracker_velocity_ms"],
        **(
            {
                "baseline": str(baseline),
                "cold_over_baseline": ms["cold_ms"] / ms["baseline_cold_ms"],
                "streaming_over_baseline": ms["streaming_ms"] / ms["baseline_streaming_ms"],
            }
            if other is not None
            else {}
        ),
    }
