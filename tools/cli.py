"""The ``bevjepa`` command line: one subcommand per job, each a thin layer over one importable function."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bevjepa.evaluation.closed_loop import forecast_names


def _synth(args: argparse.Namespace) -> int:
    from bevjepa.sim import sensors, synth

    config = synth.SynthConfig(
        out=Path(args.out),
        scenes=args.scenes,
        seed=args.seed,
        duration_s=args.duration,
        version=args.version,
        layouts=tuple(args.layouts.split(",")),
        workers=args.workers,
        address=args.address,
        cameras=sensors.CameraConfig(width_px=args.image_width, height_px=round(args.image_width * 9 / 16)),
    )
    report = synth.synthesize(config)
    print(
        f"wrote {report.out}: {len(report.scene_names)} scenes, {report.keyframes} keyframes, {report.sweeps} "
        f"LiDAR sweeps ({report.lidar_returns / max(report.sweeps, 1):,.0f} returns each), {report.images} "
        f"images in {report.wall_time_s:.1f} s"
    )
    if args.check:
        from bevjepa.sim import inspect

        print(inspect.describe(report.out, report.version))
    return 0


def _preset_grid(preset: str):
    """The target grid of a model preset (``small``, ``base``, or a config JSON), for its windows."""
    from bevjepa.prediction import config as experiment_config

    return experiment_config.preset(preset).model.grid


def _preprocess(args: argparse.Namespace) -> int:
    from bevjepa.datasets import preprocess, windows

    config = preprocess.PreprocessConfig(
        dataroot=Path(args.dataroot),
        out=Path(args.out),
        version=args.version,
        split=args.split,
        workers=args.workers,
        address=args.address,
        strict=args.strict,
        image_width_px=args.image_width,
        lidar_sweeps=args.sweeps,
        window=windows.WindowConfig(voxel_size_m=args.voxel_size, grid=_preset_grid(args.config)),
    )
    try:
        manifest = preprocess.preprocess(config)
    except preprocess.StrictModeError as error:
        print(f"bevjepa preprocess: --strict: {error}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    print(
        f"wrote {counts['windows']} windows of {counts['scenes']} scenes to {args.out} "
        f"({(counts['window_bytes'] + counts['frame_bytes']) / 1e6:.1f} MB); {counts['failed_windows']} failed, "
        f"{counts['sensorless_windows']} sensorless (no LiDAR point and no camera in any input keyframe: not "
        f"written), {counts['bad_inputs']} bad inputs (see {Path(args.out) / 'manifest.json'})"
    )
    for failed in manifest["failed_scenes"]:
        print(f"bevjepa preprocess: {failed['error']}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from bevjepa.prediction import checkpoint, train
    from bevjepa.prediction import config as experiment_config

    out = Path(args.out)
    if args.resume:  # the run's own configuration; only what is given here changes
        config = checkpoint.load_config(out)
        changes: dict = {}
    else:
        config = experiment_config.preset(args.config)
        changes = {"seed": 0}
    given = {
        "seed": args.seed,
        "max_minutes": args.minutes,
        "loader_workers": args.loader_workers,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoint_minutes": args.checkpoint_minutes,
        "extra_train_data": tuple(str(Path(p).resolve()) for p in args.extra_data) if args.extra_data else None,
        "precision": args.precision,
    }
    changes.update({name: value for name, value in given.items() if value is not None})
    if args.no_jepa:
        changes["weights"] = dataclasses.replace(config.train.weights, latent=0.0)
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, **changes),
        # ``both`` (the default) keeps the preset's sensors: the direct baseline stays on the LiDAR alone
        model=config.model if args.sensors == "both" else config.model.on_sensors(args.sensors),
    )
    if args.address:
        from bevjepa.prediction import distributed

        summary = distributed.train_on_ray(Path(args.data), out, config, args.address, args.workers)
    else:
        summary = train.train(Path(args.data), out, config, resume=args.resume)
    if summary.stopped_by is not None:
        print(
            f"bevjepa train: stopped by {summary.stopped_by} at step {summary.steps} of {config.train.steps}; "
            f"checkpoint in {summary.run}: continue with `bevjepa train --resume --out {summary.run} ...`",
            file=sys.stderr,
        )
        return 128 + int(signal.Signals[summary.stopped_by])
    print(
        f"trained {summary.steps} steps in {summary.wall_time_s:.0f} s ({summary.step_time_s * 1e3:.0f} ms a step);"
        f" validation loss {summary.validation.get('total', float('nan')):.3f}; checkpoint in {summary.run}"
    )
    return 0


def _thresholds(args: argparse.Namespace) -> int:
    from bevjepa.prediction import threshold_fit

    chosen = threshold_fit.fit(
        Path(args.checkpoint), Path(args.data), split=args.split, windows=args.windows, progress=True
    )
    print(f"occupancy thresholds of {args.checkpoint}, chosen on {chosen.windows} windows of {chosen.split}:")
    for name, p, before, after in zip(
        chosen.classes, chosen.probability, chosen.iou_at_half, chosen.iou_chosen, strict=True
    ):
        print(f"  {name:12s} {p:.3f}  IoU there {after:.3f} (at 0.5: {before:.3f})")
    bars = threshold_fit.fit_forecast_bars(
        Path(args.checkpoint), Path(args.data), split=args.split, windows=args.windows, progress=True
    )
    print(f"the forecast's bars, chosen on {bars.windows} windows of {bars.split} (IoU there; at 0.5):")
    rows = list(zip(bars.times_s, bars.bars, bars.iou_chosen, bars.iou_at_half, strict=True))
    for c, name in enumerate(bars.classes):
        cells = (f"{t:g} s {bar[c]:.2f} ({after[c]:.3f}; {half[c]:.3f})" for t, bar, after, half in rows)
        print(f"  {name:12s} " + ", ".join(cells))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from bevjepa.evaluation.report import eval_report

    config = eval_report.EvalConfig(
        out=Path(args.out),
        split=args.split,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        data=Path(args.data) if args.data else None,
        dataroot=Path(args.dataroot) if args.dataroot else None,
        version=args.version,
        workers=args.workers,
        address=args.address,
        figure_windows=args.figures,
        animation_windows=args.animation_windows,
        direct_checkpoint=Path(args.direct) if args.direct else None,
    )
    if args.rerun:
        from bevjepa.evaluation.report import rerun_recording

        rerun_recording.check_output(Path(args.rerun))  # before the evaluation: the extra and a .rrd path
    result = eval_report.run(config)
    metrics = result.metrics
    for name, scores in metrics["models"].items():
        cells = [
            f"{key} {eval_report.format_value(scores.get(key)):>6s}" for key in ("minADE_5", "minFDE_5", "iou_2s_mean")
        ]
        print(f"{name:26s} " + "  ".join(cells))
    for line in eval_report.world_model_verdicts(metrics):
        print(line.removeprefix("- "))
    if args.rerun:
        recording = rerun_recording.record_scene(result.windows, args.split, config.checkpoint, Path(args.rerun))
        print(f"Rerun recording: {recording} (open it with `rerun {recording}`)")
    failed = metrics.get("failed_windows") or []
    for failure in failed:
        print(f"  FAILED window {failure['scene']}/{failure['sample_token']} ({failure['stage']}): {failure['error']}")
    print(
        f"{metrics['windows']} windows, {len(failed)} failed, {metrics['agents']} agents with a full 6 s future; "
        f"{result.metrics_path}, {result.report_path}, {len(result.figures)} figures"
    )
    return 1 if failed else 0  # the results are written either way; a failed window fails the run


def _inspect(args: argparse.Namespace) -> int:
    from bevjepa.sim import inspect

    dataroot = Path(args.dataroot)
    if not (dataroot / args.version).is_dir():
        raise FileNotFoundError(
            f"--dataroot {dataroot} has no {args.version}/ tables folder; check the path and --version"
        )
    print(inspect.describe(dataroot, args.version))
    return 0


def _bench(args: argparse.Namespace) -> int:
    # Each branch imports only what it times: `bench model` on a GPU machine needs neither open3d nor the devkit.
    from bevjepa.datasets import io as bevio

    if args.what == "lidar":
        from bevjepa.sim import bench

        print(bevio.format_report(bench.lidar_throughput(sweeps=args.sweeps)))
    elif args.what == "cameras":
        from bevjepa.sim import bench

        print(bevio.format_report(bench.camera_throughput()))
    elif args.what == "preprocess":
        import tempfile

        from bevjepa.datasets import bench as dataset_bench
        from bevjepa.sim import synth

        if args.dataroot:
            print(bevio.format_report(dataset_bench.preprocess_throughput(Path(args.dataroot), args.version)))
        else:
            with tempfile.TemporaryDirectory(prefix="bevjepa-bench-data-") as folder:
                data = Path(folder) / "mini"
                synth.synthesize(
                    synth.SynthConfig(out=data, scenes=args.scenes, duration_s=args.duration, workers=args.workers)
                )
                print(bevio.format_report(dataset_bench.preprocess_throughput(data)))
    elif args.what == "model":
        import torch

        from bevjepa.perception import bench as perception_bench
        from bevjepa.prediction import bench as model_bench

        if not args.data:
            raise ValueError("bench model needs --data (a `bevjepa preprocess` output)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"bench model --device {args.device}: no CUDA device here (torch {torch.__version__})")
        data, preset = Path(args.data), args.config
        print(bevio.format_report(model_bench.inference_latency(data, preset, device=args.device)), end="\n\n")
        print(bevio.format_report(model_bench.training_step_time(data, preset, device=args.device)), end="\n\n")
        if args.device != "cpu":  # the rest times the CPU path a 2-core machine runs
            return 0
        for sensors in ("both", "lidar"):
            print(bevio.format_report(model_bench.training_throughput(Path(args.data), sensors=sensors)), end="\n\n")
        run = None if args.checkpoint is None else Path(args.checkpoint)
        baseline = None if args.baseline_checkpoint is None else Path(args.baseline_checkpoint)
        print(bevio.format_report(model_bench.stream_latency(Path(args.data), run=run, baseline=baseline)), end="\n\n")
        print(bevio.format_report(perception_bench.pooling_speed()))
    elif args.what == "training":
        from bevjepa.prediction import bench as model_bench

        if not args.data:
            raise ValueError("bench training needs --data (a `bevjepa preprocess` output)")
        print(
            bevio.format_report(
                model_bench.decoded_steps_speed(Path(args.data), args.config, args.sensors, threads=args.threads)
            )
        )
    elif args.what == "evaluation":
        from bevjepa.prediction import bench as model_bench

        if not args.data:
            raise ValueError("bench evaluation needs --data (a `bevjepa preprocess` output)")
        run = None if args.checkpoint is None else Path(args.checkpoint)
        print(bevio.format_report(model_bench.evaluation_pass(Path(args.data), args.config, run=run)))
    elif args.what == "closed-loop":
        from bevjepa.evaluation.closed_loop import runner

        print(bevio.format_report(runner.throughput(args.suite, workers_list=(1, args.workers))))
    elif args.what == "synth":
        from bevjepa.sim import bench

        print(
            bevio.format_report(
                bench.synth_wall_time(scenes=args.scenes, duration_s=args.duration, workers=args.workers)
            )
        )
    return 0


def _closed_loop(args: argparse.Namespace) -> int:
    from bevjepa.evaluation.closed_loop import runner

    result = runner.run_suite(
        args.suite,
        args.forecast,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        workers=args.workers,
        address=args.address,
        out=Path(args.out),
        model_options={"rollout_candidates": True} if args.rollout_candidates else None,
    )
    print(runner.format_table(result))
    print(f"{len(result.episodes)} episodes, {len(result.failed)} failed; {Path(args.out) / 'metrics.json'}")
    return 1 if result.failed else 0  # the results are written either way; a failed episode fails the run


def _regress(args: argparse.Namespace) -> int:
    from bevjepa.evaluation.closed_loop import regress

    config = regress.RegressConfig(
        suite=args.suite,
        baseline=Path(args.baseline),
        forecast=args.forecast,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        tolerances=regress.parse_overrides(args.tolerance),
        workers=args.workers,
        address=args.address,
        junit=Path(args.junit) if args.junit else None,
        out=Path(args.out) if args.out else None,
        update_baseline=args.update_baseline,
    )
    report = regress.regress(config)
    if report.comparison is None:
        print(f"bevjepa regress: error: {report.text}", file=sys.stderr)
    else:
        print(report.text)
    return report.exit_code


def _demo(args: argparse.Namespace) -> int:
    from bevjepa.tools import demo

    kwargs = {"suite": Path(args.suite)} if args.suite else {}
    if args.rerun:
        kwargs["rerun"] = Path(args.rerun)
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.minutes is not None:
        kwargs["minutes"] = args.minutes
    result = demo.run(demo.DemoConfig(out=Path(args.out), workers=args.workers, **kwargs))
    print(f"report: {result.report}")
    return 0


def _add_synth_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa synth`` to ``commands``."""
    synth = commands.add_parser(
        "synth",
        help="write a synthetic dataset in the nuScenes format",
        description="Simulate driving scenes and write them as a nuScenes dataset that the nuscenes-devkit loads.",
    )
    synth.add_argument("--out", required=True, help="dataset root to create (must not exist, or be empty)")
    synth.add_argument("--scenes", type=int, default=10, help="number of scenes (default 10)")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    synth.add_argument("--duration", type=float, default=20.0, help="seconds per scene (default 20)")
    synth.add_argument("--version", default="v1.0-mini", help="v1.0-mini or v1.0-trainval (default v1.0-mini)")
    synth.add_argument(
        "--layouts",
        default="intersection,straight,t_junction",
        help="comma-separated layouts to cycle through (default all three)",
    )
    synth.add_argument("--image-width", type=int, default=400, help="camera image width in pixels (default 400)")
    synth.add_argument("--workers", type=int, default=1, help="parallel scene writers on Ray (default 1)")
    synth.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    synth.add_argument("--check", action="store_true", help="load the result with the devkit and describe it")
    synth.set_defaults(run=_synth)


def _add_preprocess_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa preprocess`` to ``commands``."""
    prep = commands.add_parser(
        "preprocess",
        help="turn a nuScenes dataset into training windows on Ray",
        description="Build training windows (inputs and targets) from a nuScenes dataset, "
        "one Ray task per scene; resumable; bad inputs recorded.",
    )
    prep.add_argument("--dataroot", required=True, help="the nuScenes dataset root")
    prep.add_argument("--version", default="v1.0-mini", help="table version (default v1.0-mini)")
    prep.add_argument("--split", default=None, help="devkit split (mini_train, mini_val, train, val, ...)")
    prep.add_argument("--out", required=True, help="output folder (an interrupted run is resumed)")
    prep.add_argument("--workers", type=int, default=1, help="Ray workers (default 1: this process)")
    prep.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    prep.add_argument("--strict", action="store_true", help="stop at the first bad input or failed window")
    prep.add_argument("--image-width", type=int, default=256, help="camera width after resizing (default 256)")
    prep.add_argument(
        "--config", default="small", help="the model preset the windows are for: its target grid (default small)"
    )
    prep.add_argument("--sweeps", type=int, default=10, help="LiDAR sweeps per keyframe (default 10)")
    prep.add_argument(
        "--voxel-size",
        type=float,
        default=0.2,
        help="voxel downsampling in m (default 0.2, under a 0.5 m pillar); 0 keeps every point",
    )
    prep.set_defaults(run=_preprocess)


def _add_train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa train`` to ``commands``."""
    trainer = commands.add_parser("train", help="train the BEV JEPA world model on preprocessed windows")
    trainer.add_argument("--data", required=True, help="a `bevjepa preprocess` output")
    trainer.add_argument(
        "--config",
        default="small",
        help="config preset: small (CPU), direct (the LiDAR baseline without a world model) or base (GPU), or a "
        "JSON config file",
    )
    trainer.add_argument("--out", required=True, help="the run folder (checkpoints, TensorBoard, config)")
    trainer.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    trainer.add_argument("--batch-size", type=int, default=None, help="windows per step (default: the preset's)")
    trainer.add_argument("--minutes", type=float, default=None, help="stop, with a checkpoint, after this long")
    trainer.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=None,
        help="wall time between checkpoints (default: the preset's, 5; 0: every step)",
    )
    trainer.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    trainer.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in --out with its own config (a larger --steps extends a finished run)",
    )
    trainer.add_argument(
        "--extra-data",
        nargs="+",
        default=None,
        metavar="WINDOWS",
        help="`bevjepa preprocess` outputs of other synthetic worlds (`bevjepa synth --seed N`), trained on in "
        "full beside --data's training split; validation stays on --data",
    )
    trainer.add_argument("--no-jepa", action="store_true", help="train without the latent (JEPA) loss")
    trainer.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default=None,
        help="the training forward pass's precision (default: the preset's, float32); bfloat16 autocasts "
        "convolutions and matrix products, faster where the CPU or GPU has native bfloat16 "
        "(`bevjepa bench training` times both)",
    )
    trainer.add_argument(
        "--sensors",
        choices=["both", "lidar", "camera"],
        default="both",
        help="which sensors the model sees (default both)",
    )
    trainer.add_argument(
        "--loader-workers", type=int, default=None, help="DataLoader worker processes (default: the preset's)"
    )
    trainer.add_argument("--address", default=None, help="train data-parallel on this Ray cluster (Ray Train)")
    trainer.add_argument("--workers", type=int, default=2, help="Ray Train workers with --address (default 2)")
    trainer.set_defaults(run=_train)


def _add_eval_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa eval`` to ``commands``."""
    evaluator = commands.add_parser(
        "eval",
        help="score a checkpoint and the baselines; write metrics.json, report.md and figures",
        description="Open-loop evaluation of a checkpoint against the baselines on one split: metrics.json, a "
        "Markdown report with tables and PNG panels, an animated GIF. Without --data the split of --dataroot is "
        "preprocessed into OUT/windows first (resumable).",
    )
    evaluator.add_argument("--data", default=None, help="a `bevjepa preprocess` output (default: preprocess)")
    evaluator.add_argument("--dataroot", default=None, help="the nuScenes dataset root (without --data)")
    evaluator.add_argument("--version", default="v1.0-mini", help="table version of --dataroot (default v1.0-mini)")
    evaluator.add_argument("--split", default="mini_val", help="devkit split to score (default mini_val)")
    evaluator.add_argument("--checkpoint", default=None, help="a run folder; without it only the baselines")
    evaluator.add_argument(
        "--direct",
        default=None,
        metavar="RUN",
        help="a run of the direct baseline (`bevjepa train --config direct`) scored beside the model",
    )
    evaluator.add_argument("--out", required=True, help="report folder (metrics.json, report.md, figures/)")
    evaluator.add_argument("--workers", type=int, default=1, help="Ray workers for preprocessing (default 1)")
    evaluator.add_argument("--address", default=None, help="Ray cluster address for preprocessing")
    evaluator.add_argument("--figures", type=int, default=2, help="windows drawn as PNG panels (default 2)")
    evaluator.add_argument(
        "--animation-windows", type=int, default=6, help="consecutive windows in figures/scene.gif (default 6; 0: none)"
    )
    evaluator.add_argument(
        "--rerun", default=None, metavar="FILE.rrd", help="also write a Rerun recording of one scene (extra: rerun)"
    )
    evaluator.set_defaults(run=_eval)


def _add_thresholds_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa thresholds`` to ``commands``."""
    from bevjepa.prediction import threshold_fit

    fitter = commands.add_parser(
        "thresholds",
        help="choose a run's per-class occupancy thresholds on its training windows",
        description="Count the dense occupancy of a run on windows of its training split and write, per class, the "
        "threshold of largest IoU into RUN/occupancy_thresholds.json; forecasts and `bevjepa eval` then publish "
        "probabilities shifted so that 0.5 is that threshold. Then the run forecasts the same windows from their "
        "sensors (a world model: the fused map; the direct baseline: its dense map) and writes the bars of largest "
        "IoU of that forecast, per step and class, into RUN/forecast_bars.json; `bevjepa eval` scores the forecast "
        "at them beside 0.5. Training the run further "
        "deletes both files.",
    )
    fitter.add_argument("--checkpoint", required=True, help="the run folder")
    fitter.add_argument("--data", required=True, help="a `bevjepa preprocess` output holding --split")
    fitter.add_argument("--split", default="mini_train", help="the split counted (default mini_train)")
    fitter.add_argument(
        "--windows", type=int, default=threshold_fit.WINDOWS, help=f"windows counted (default {threshold_fit.WINDOWS})"
    )
    fitter.set_defaults(run=_thresholds)


def _add_inspect_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa inspect`` to ``commands``."""
    inspect = commands.add_parser("inspect", help="describe a nuScenes dataset as the devkit loads it")
    inspect.add_argument("--dataroot", required=True, help="the dataset root (holds v1.0-*/, samples/, maps/)")
    inspect.add_argument("--version", default="v1.0-mini", help="table version (default v1.0-mini)")
    inspect.set_defaults(run=_inspect)


def _add_bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa bench`` to ``commands``."""
    bench = commands.add_parser("bench", help="measure throughput (simulator, sensors, preprocessing)")
    bench.add_argument(
        "what", choices=["lidar", "cameras", "synth", "preprocess", "model", "training", "evaluation", "closed-loop"]
    )
    bench.add_argument("--suite", default="ci", help="suite to time (closed-loop; default the shipped ci suite)")
    bench.add_argument("--data", default=None, help="windows to time the model on (model, training, evaluation)")
    bench.add_argument(
        "--sensors",
        default="lidar",
        choices=["both", "lidar", "camera"],
        help="the world model's inputs (training; default lidar, as the 30-minute runs)",
    )
    bench.add_argument(
        "--checkpoint",
        default=None,
        help="a trained run whose forecasts to time (model, evaluation; default: untrained weights)",
    )
    bench.add_argument(
        "--baseline-checkpoint",
        default=None,
        help="another trained run timed beside --checkpoint in the same run (model; ratios against it)",
    )
    bench.add_argument(
        "--config", default="small", help="preset of the model to time (model, training: small, base, ...)"
    )
    bench.add_argument(
        "--device", default="cpu", help="where the model runs (model: cpu, or cuda for the inference and step times)"
    )
    bench.add_argument("--dataroot", default=None, help="dataset to preprocess (preprocess; default: a synthetic one)")
    bench.add_argument("--version", default="v1.0-mini", help="table version of --dataroot (preprocess)")
    bench.add_argument("--sweeps", type=int, default=40, help="sweeps to time (lidar)")
    bench.add_argument("--scenes", type=int, default=10, help="scenes to write (synth, preprocess)")
    bench.add_argument("--duration", type=float, default=20.0, help="seconds per scene (synth, preprocess)")
    bench.add_argument("--workers", type=int, default=2, help="Ray workers (synth)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (training; default 1)")
    bench.set_defaults(run=_bench)


def _add_closed_loop_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa closed-loop`` to ``commands``."""
    loop = commands.add_parser(
        "closed-loop",
        help="run a closed-loop scenario suite: simulator, forecast, sampling planner; one Ray task per episode",
    )
    loop.add_argument("--suite", required=True, help="a suite file, or a shipped suite's name: ci, smoke, empty")
    loop.add_argument("--forecast", choices=forecast_names.FORECASTS, required=True, help="forecast source")
    loop.add_argument("--checkpoint", default=None, help="run folder of the model (--forecast model)")
    loop.add_argument("--workers", type=int, default=1, help="parallel episodes on Ray (default 1: this process)")
    loop.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    loop.add_argument("--out", required=True, help="output folder (metrics.json)")
    loop.add_argument(
        "--rollout-candidates", action="store_true", help="model: roll the world model out under every candidate"
    )
    loop.set_defaults(run=_closed_loop)


def _add_regress_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa regress`` to ``commands``."""
    gate = commands.add_parser(
        "regress",
        help="CI regression gate: run a closed-loop suite and compare it with a baseline",
        description="Run a closed-loop scenario suite, compare its aggregate metrics with a baseline file, print "
        "a per-metric diff, and exit 1 when a metric regressed beyond its tolerance (or the baseline is missing).",
    )
    gate.add_argument("--suite", required=True, help="a suite file, or a shipped suite's name (ci, smoke, empty)")
    gate.add_argument("--baseline", required=True, help="baseline JSON file (written with --update-baseline)")
    gate.add_argument(
        "--forecast",
        choices=forecast_names.FORECASTS,
        default=None,
        help="forecast source (default: the baseline's; cv without one, model with --checkpoint)",
    )
    gate.add_argument("--checkpoint", default=None, help="run folder for --forecast model (default: the baseline's)")
    gate.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="override a tolerance: absolute (collision_rate=0.05), relative (progress=5%%) or both (pdms=0.01,2%%)",
    )
    gate.add_argument("--workers", type=int, default=1, help="Ray workers, one episode per task (default 1)")
    gate.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    gate.add_argument("--junit", default=None, help="write JUnit XML here")
    gate.add_argument("--out", default=None, help="folder for the suite's outputs, diff.txt and regress.json")
    gate.add_argument("--update-baseline", action="store_true", help="write the baseline from this run; exit 0")
    gate.set_defaults(run=_regress)


def _add_demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bevjepa demo`` to ``commands``."""
    runner = commands.add_parser(
        "demo",
        help="the whole system on this machine: synthetic data, Ray preprocessing, training, open and closed loop",
    )
    runner.add_argument("--out", default="out/demo", help="output folder (a rerun reuses what is done)")
    runner.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget (default 23); the model and the direct baseline share what is left, half each",
    )
    runner.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train the model and the direct baseline exactly this many steps each (default: what the budget allows)",
    )
    runner.add_argument("--workers", type=int, default=2, help="Ray workers")
    runner.add_argument("--suite", default=None, help="closed-loop scenario suite (default: the shipped ci)")
    runner.add_argument(
        "--rerun", default=None, metavar="FILE.rrd", help="also write a Rerun recording of a mini_val scene"
    )
    runner.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="bevjepa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth_parser(commands)
    _add_preprocess_parser(commands)
    _add_train_parser(commands)
    _add_thresholds_parser(commands)
    _add_eval_parser(commands)
    _add_inspect_parser(commands)
    _add_bench_parser(commands)
    _add_closed_loop_parser(commands)
    _add_regress_parser(commands)
    _add_demo_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bevjepa`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"bevjepa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only or vanished folder: what the system said, on one line
        where = f" ({error.filename})" if error.filename else ""
        print(
            f"bevjepa {args.command}: error: {error.strerror or error}{where}; files written so far are whole "
            "(each is written to a temporary file and renamed)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"bevjepa {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
