"""``bevjepa train``: the training loop, on this machine or data-parallel on Ray Train.

One step: encode the input frames, roll the latent out under the ego's actions, decode every step with the
heads, and add the JEPA latent loss against the EMA target encoder's view of the observed future; then AdamW,
a cosine learning-rate schedule and the EMA update. TensorBoard scalars go to ``RUN/tensorboard``: every loss
term, the learning rate and the standard deviation of the latents (a collapse diagnostic: it falls toward 0
when the representation collapses). Validation runs every ``val_every`` steps, a checkpoint follows it.

Progress is never lost for long: a checkpoint is also written every ``checkpoint_minutes`` of wall time, and
SIGTERM or Ctrl-C stops the run after the step in flight with a checkpoint (a second Ctrl-C stops at once).
``--resume`` continues a run from its checkpoint; with a larger ``--steps`` it extends a finished run. The
learning rate is a function of (step, steps): resuming with the same ``steps`` continues the schedule exactly,
and with more steps the cosine is stretched over the new total, so the rate rises at the resume step to the
stretched schedule's value there (a warm restart, as in SGDR) and decays to 5 % at the new last step. With
``max_minutes`` the cosine also follows the wall time and ends at 5 % when the minutes run out, if that comes before
the last step: a budget in minutes trains to the end of its schedule on a slow machine as on a fast one. A resumed
run's minutes count from the resume, so its rate rises there to the step schedule's value and decays again.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from bevjepa.datasets import io as bevio
from bevjepa.datasets import preprocess, torch_dataset
from bevjepa.prediction import checkpoint, model
from bevjepa.prediction import config as experiment_config


@dataclass(frozen=True)
class TrainSummary:
    """What a training run did.

    Attributes:
        run: the run folder.
        steps: the step reached.
        wall_time_s: time spent in this call.
        step_time_s: median wall time of one optimizer step.
        final_losses: the last training step's loss terms.
        validation: the last validation's mean loss terms.
        stopped_by: the signal that stopped the run early (``"SIGTERM"``, ``"SIGINT"``), after a checkpoint;
            None when it ran to its last step or its time cap.
        step_times_s: the wall time of every step of this call (s), waiting for the data included.
    """

    run: Path
    steps: int
    wall_time_s: float
    step_time_s: float
    final_losses: dict[str, float]
    validation: dict[str, float]
    stopped_by: str | None = None
    step_times_s: tuple[float, ...] = ()


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[str]]:
    """Within the block, SIGTERM and a first Ctrl-C are recorded (in the yielded list) instead of stopping at once.

    The loop checks the list after each step, checkpoints and stops. A second Ctrl-C raises ``KeyboardInterrupt``
    as usual. Outside the main thread (a Ray Train worker) nothing is installed.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in received:
            raise KeyboardInterrupt
        received.append(name)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def split_scenes(data: Path, split: str) -> list[str]:
    """The scenes of a devkit split (or ``all``) that the windows folder holds.

    The manifest's ``splits`` name them; for windows written before the manifest recorded them, the devkit does
    (importing it costs seconds).
    """
    manifest_path = Path(data) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: --data must be a `bevjepa preprocess` output")
    manifest = json.loads(manifest_path.read_text())
    present = {w["scene"] for w in manifest["windows"]}
    splits = manifest.get("splits")
    if splits is not None and not (isinstance(splits, dict) and all(isinstance(v, list) for v in splits.values())):
        raise ValueError(
            f"{manifest_path}: 'splits' must map split names to lists of scenes; run `bevjepa preprocess` again"
        )
    if split == "all":
        names = sorted(present)
    else:
        if splits is None:
            from nuscenes.utils.splits import create_splits_scenes

            splits = create_splits_scenes()
        names = splits.get(split, [])
    scenes = [s for s in names if s in present]
    if not scenes:
        raise ValueError(f"{data} has no windows of split {split!r} (its scenes: {sorted(present)})")
    return scenes


def make_loader(
    sources: list[tuple[Path, list[str]]],
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    future: bool,
    cameras: bool = True,
) -> DataLoader:
    """A DataLoader of collated window batches, shuffled reproducibly from ``seed`` (``cameras``: decode them).

    ``sources`` are (windows folder, its scenes) pairs, read in that order and shuffled together. Each loader
    process keeps up to ``FRAME_CACHE_FRAMES`` decompressed frames of each folder: a shuffled order reads every
    frame of a window afresh otherwise, and decompressing the frames is most of a window's loading time.
    """
    datasets = [
        torch_dataset.WindowDataset(
            data, scenes=scenes, future_inputs=future, cameras=cameras, frame_cache_size=FRAME_CACHE_FRAMES
        )
        for data, scenes in sources
    ]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        datasets[0] if len(datasets) == 1 else ConcatDataset(datasets),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=torch_dataset.collate,
        num_workers=workers,
        generator=generator,
        persistent_workers=workers > 0,
        drop_last=False,
    )


def training_sources(data: Path, config: experiment_config.ExperimentConfig) -> list[tuple[Path, list[str]]]:
    """The (windows folder, scenes) the run trains on: ``train_split`` of ``data``, then every extra folder whole.

    Raises:
        ValueError: an extra folder that is ``data`` itself (its validation scenes would be trained on) or given
            twice, or whose windows lie on another grid than the model's.
        FileNotFoundError: an extra folder that is no ``bevjepa preprocess`` output.
    """
    sources = [(Path(data), split_scenes(data, config.train.train_split))]
    seen = {Path(data).resolve()}
    for extra in map(Path, config.train.extra_train_data):
        if extra.resolve() in seen:
            raise ValueError(
                f"--extra-data {extra}: already trained on (it is --data or was given twice); extra data must be "
                "other worlds, or the validation scenes of --data would be trained on"
            )
        seen.add(extra.resolve())
        check_windows_grid(extra, config, "--extra-data")
        sources.append((extra, split_scenes(extra, "all")))
    return sources


FRAME_CACHE_FRAMES = 1024
"""Decompressed frames each training loader process keeps (about 0.8 MB each in the ``small`` setting: the
synthetic v1.0-mini's 400 keyframes all fit)."""


def _cycle(loader: DataLoader):
    while True:
        yield from loader


def _learning_rate(config: experiment_config.TrainConfig, step: int, elapsed_s: float = 0.0) -> float:
    """Linear warm-up over 50 steps, then cosine decay to 5% of the peak.

    The cosine follows whichever budget runs out first: the steps, or with ``max_minutes`` the wall time
    (``elapsed_s``, seconds since this invocation's first step), so that a run stopped by its minutes ends at 5 %
    as one that does all its steps does, however fast the machine.
    """
    warmup = min(50, config.steps // 10)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.max_minutes is not None:
        progress = max(progress, elapsed_s / (60.0 * config.max_minutes))
    return config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def validate(
    net: model.BevJepa, loader: DataLoader, weights: model.LossWeights, max_batches: int | None = None
) -> dict[str, float]:
    """Mean loss terms over a loader (its first ``max_batches``), in eval mode."""
    was_training = net.training
    net.eval()
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        output = net(batch)
        terms = model.compute_losses(net, batch, output, weights).scalars()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value * batch.batch_size
        for name, value in latent_spread(output).items():
            totals[name] = totals.get(name, 0.0) + value * batch.batch_size
        count += batch.batch_size
    net.train(was_training)
    return {name: value / max(count, 1) for name, value in totals.items()}


def train(
    data: Path, run: Path, config: experiment_config.ExperimentConfig, resume: bool = False, progress: bool = True
) -> TrainSummary:
    """Train ``config`` on the windows in ``data``; checkpoints, TensorBoard and metrics go to ``run``.

    Args:
        data: a ``bevjepa preprocess`` output holding the training and validation splits' scenes.
        run: the run folder.
        config: the experiment.
        resume: continue from the checkpoint in ``run`` (same config) instead of starting afresh.
        progress: show a progress bar.
    """
    return training_loop(data, run, config, resume, progress, distributed=False)


def _check_run_folder(run: Path, config: experiment_config.ExperimentConfig, resume: bool) -> None:
    """Claim ``run`` for training and check that it fits: a new run needs no checkpoint, a resumed one its own."""
    bevio.claim_output_folder(run, "train", own_files=checkpoint.is_run_folder)
    if not resume:
        if (run / "state.json").exists():
            raise FileExistsError(
                f"--out {run} already holds a checkpoint; pass --resume to continue it or choose another folder"
            )
        return
    previous = checkpoint.load_state(run)
    if previous.get("config_hash") != config.resume_hash():
        raise ValueError(
            f"--resume: {run} was trained with another configuration (hash {previous.get('config_hash')}, this "
            f"one {config.resume_hash()}); only {', '.join(sorted(experiment_config.RESUMABLE_FIELDS))} may "
            "change when resuming"
        )
    if previous["step"] > config.train.steps:
        raise ValueError(
            f"--resume: {run} is already at step {previous['step']}; --steps {config.train.steps} would not extend "
            "it (pass a larger --steps)"
        )


def check_windows_grid(data: Path, config: experiment_config.ExperimentConfig, option: str = "--data") -> None:
    """Refuse windows whose targets lie on another grid than the model predicts on (e.g. ``small``'s for ``base``).

    ``option`` names the command-line option that gave ``data`` in the message.
    """
    grid = preprocess.window_grid(data)
    if grid != config.model.grid:

        def text(g) -> str:
            return f"x [{g.x_min_m}, {g.x_max_m}) m, y [{g.y_min_m}, {g.y_max_m}) m at {g.resolution_m} m"

        raise ValueError(
            f"{option} {data} holds windows on {text(grid)}, but the {config.preset} model predicts on "
            f"{text(config.model.grid)}: preprocess them with `bevjepa preprocess --config {config.preset}`"
        )


def _initial_model(
    run: Path, config: experiment_config.ExperimentConfig, resume: bool
) -> tuple[model.BevJepa, int, list[dict]]:
    """The model in training mode, seeded from the config, or restored from ``run``; its step and history."""
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)
    net = model.BevJepa(config.model)
    step, history = 0, []
    if resume:
        _, loaded = checkpoint.load_model(run)
        net.load_state_dict(loaded.state_dict())
        state = checkpoint.load_state(run)
        step, history = state["step"], state.get("history", [])
        torch.manual_seed(config.train.seed + step)
    return net.train(), step, history


def _train_step(
    net: torch.nn.Module,
    core: model.BevJepa,
    batch: torch_dataset.WindowBatch,
    optimizer: torch.optim.Optimizer,
    settings: experiment_config.TrainConfig,
    step: int,
    elapsed_s: float = 0.0,
) -> dict[str, float]:
    """One optimizer step at ``step`` (0-based) and the EMA update; returns the loss terms and the latents' spread.

    ``elapsed_s``: the run's wall time at the end of the step before (``_learning_rate``), the same on every worker.

    ``net`` is what runs the batch (``core`` itself, or its DistributedDataParallel wrapper).
    """
    for group in optimizer.param_groups:
        group["lr"] = _learning_rate(settings, step, elapsed_s)
    with autocast(settings.precision, batch.occupancy.device):
        output = net(batch, decode=model.draw_decoded_steps(core.config, settings.weights))
    output = model.heads_in_float32(output)  # the losses in float32 under any precision
    terms = model.compute_losses(core, batch, output, settings.weights)
    norms = model.gradient_norms(terms, output, settings.weights) if step % GRADIENT_NORM_EVERY == 0 else {}
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    torch.nn.utils.clip_grad_norm_(core.parameters(), settings.grad_clip)
    optimizer.step()
    core.update_target(settings.ema_decay)
    scalars = terms.scalars()
    scalars.update(latent_spread(output))
    scalars.update({f"grad_at_latent_{name}": value for name, value in norms.items()})
    return scalars


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The training forward pass's context for ``TrainConfig.precision``: bfloat16 autocast, or nothing."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


GRADIENT_NORM_EVERY = 25
"""Steps between the logged gradient norms of the head terms at the shared latent (``model.gradient_norms``)."""


def latent_spread(output: model.ModelOutput) -> dict[str, float]:
    """The latents' spread: standard deviation over samples and cells, mean over channels.

    ``latent_std`` is z_t0's (it falls toward 0 when the representation collapses), ``rollout_std`` the rolled-out
    latents' (a rollout that fades toward a blur has a shrinking spread).
    """

    def spread(z: torch.Tensor) -> float:  # [B, C, H, W]
        return float(z.detach().float().std(dim=(0, 2, 3)).mean())

    rollout = output.rollout.detach()
    return {"latent_std": spread(output.latent), "rollout_std": spread(rollout.reshape(-1, *rollout.shape[2:]))}


def _agreed_elapsed(elapsed_s: float, distributed: bool) -> float:
    """The run's wall time (s) that every worker acts on: under DDP the largest of the workers' clocks.

    Each Ray Train worker reads its own clock. The learning rate follows the minutes and the minutes end the run, so
    workers that read them apart would step the same gradients with different rates (their weights drift apart) or
    stop at different steps (the one left waits on the other's gradients). One all-reduce a step makes them agree.
    """
    if not distributed:
        return elapsed_s
    import torch.distributed

    shared = torch.tensor([elapsed_s], dtype=torch.float64)
    torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
    return float(shared[0])


def training_loop(
    data: Path, run: Path, config: experiment_config.ExperimentConfig, resume: bool, progress: bool, distributed: bool
) -> TrainSummary:
    """The loop behind ``train``.

    With ``distributed`` it runs inside a Ray Train worker (DDP, sharded data), and only the worker of rank 0
    validates and writes checkpoints and TensorBoard.
    """
    from torch.utils.tensorboard import SummaryWriter

    run = Path(run)
    settings = config.train
    rank = 0
    if distributed:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
    check_windows_grid(data, config)
    sources = training_sources(data, config)
    if rank == 0:
        _check_run_folder(run, config, resume)
    net, step, history = _initial_model(run, config, resume)
    future = settings.weights.latent > 0 and config.model.world_model
    cameras = config.model.use_camera
    train_loader = make_loader(
        sources, settings.batch_size, True, settings.seed + step, settings.loader_workers,
        future, cameras,
    )  # fmt: skip
    val_loader = make_loader(
        [(data, split_scenes(data, settings.val_split))], settings.batch_size, False, 0, 0, future, cameras
    )
    core = net
    if distributed:
        import ray.train.torch

        net = ray.train.torch.prepare_model(net)  # DistributedDataParallel; ``core`` stays the bare model
        train_loader = ray.train.torch.prepare_data_loader(train_loader, move_to_device=False)
    optimizer = torch.optim.AdamW(
        [p for p in core.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    if resume:
        checkpoint.load_optimizer(run, optimizer)
    writer = SummaryWriter(str(run / "tensorboard")) if rank == 0 else None
    batches = _cycle(train_loader)
    start = last_checkpoint = time.perf_counter()
    step_times: list[float] = []
    last: dict[str, float] = {}
    validation: dict[str, float] = {}
    bar = tqdm(total=settings.steps, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    stops = contextlib.ExitStack()
    stop_signals = stops.enter_context(_stop_requests())
    elapsed_s = 0.0  # the run's wall time at the end of the last step, the same on every worker
    try:
        while step < settings.steps:
            tick = time.perf_counter()
            last = _train_step(net, core, next(batches), optimizer, settings, step, elapsed_s)
            step += 1
            step_times.append(time.perf_counter() - tick)
            if writer is not None:
                for name, value in last.items():
                    writer.add_scalar(f"train/{name}", value, step)
                writer.add_scalar("train/learning_rate", optimizer.param_groups[0]["lr"], step)
            bar.update()
            bar.set_postfix(loss=f"{last['total']:.3f}")
            now = time.perf_counter()
            elapsed_s = _agreed_elapsed(now - start, distributed)
            out_of_time = settings.max_minutes is not None and elapsed_s > 60 * settings.max_minutes
            validating = step % settings.val_every == 0 or step == settings.steps or out_of_time
            if rank == 0 and validating:
                validation = validate(core, val_loader, settings.weights, settings.val_batches)
                for name, value in validation.items():
                    writer.add_scalar(f"val/{name}", value, step)
                history.append({"step": step, "train": last, "val": validation})
            if rank == 0 and (validating or stop_signals or now - last_checkpoint >= 60 * settings.checkpoint_minutes):
                checkpoint.save(run, config, core, optimizer, {"step": step, "history": history})
                last_checkpoint = time.perf_counter()
            if distributed and validating:
                import ray.train

                ray.train.report({"step": step, **{f"train_{k}": v for k, v in last.items()}})
            if out_of_time or stop_signals:
                break
    finally:
        stops.close()
        bar.close()
        if writer is not None:
            writer.close()
    median_step_s = float(np.median(step_times)) if step_times else 0.0
    stopped_by = stop_signals[0] if stop_signals else None
    return TrainSummary(
        run, step, time.perf_counter() - start, median_step_s, last, validation, stopped_by, tuple(step_times)
    )
