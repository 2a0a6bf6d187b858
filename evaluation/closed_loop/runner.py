"""Closed-loop evaluation: episodes of the simulator driven by a forecast and a sampling planner, run on Ray.

An episode (``run_episode``) steps the world of one scenario and seed. Every planning step of 0.5 s:

1. the forecast source gives an ``OccupancyForecast`` in the current ego frame (or none);
2. the planner (``planner.SamplingPlanner``) picks a candidate speed profile along the ego's path;
3. the ego applies the candidate's accelerations for 0.5 s, simulated in 0.1 s sub-steps
   (``world.step(..., ego_accel_mps2=...)``), the agents reacting to the ego through their IDM.

``run_suite`` runs one task per episode on a worker pool (Ray, or this process), records a crashed episode with
its traceback and goes on, and returns a ``safety.SuiteResult``, written as ``OUT/metrics.json`` atomically.

Forecast sources are in ``sources``, the metrics in ``safety``, the planner in ``planner``.

Notation:
    A  actors (index 0 is the ego)     K  sub-steps of an episode (0.1 s)     J  TTC projection times
    P  past keyframes of a model window     F  forecast steps (0.5 s)     S  occupancy times
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bevjepa.datasets import io as bevio
from bevjepa.datasets import workers as worker_pools
from bevjepa.evaluation.closed_loop import planner, safety, sources, suite_files
from bevjepa.sim import scenario, world


def run_episode(
    episode: suite_files.Episode,
    forecast_source: str,
    checkpoint: Path | str | None = None,
    planner_config: planner.PlannerConfig | None = None,
    **model_options,
) -> safety.EpisodeResult:
    """Run one episode closed loop and measure it (see the module docstring).

    Args:
        episode: the scenario and seed.
        forecast_source: one of ``sources.FORECASTS``.
        checkpoint: the run folder for ``model``.
        planner_config: the planner; default ``PlannerConfig()``.
        **model_options: ``ModelSource`` options (``image_width_px``, ``lidar_sweeps``, ``rollout_candidates``).
    """
    start = time.perf_counter()
    built, state = scenario.build_world(episode.scenario_config())
    ego = built.actors[0]
    source = sources.make_source(
        forecast_source,
        built,
        checkpoint,
        seed=episode.seed,
        name_prefix=f"{episode.suite}-{episode.scenario}-{episode.seed}",
        **model_options,
    )
    sampler = planner.SamplingPlanner(planner_config)
    steps = round(episode.duration_s / suite_files.PLANNING_STEP_S)  # >= 1: checked when the episode was made
    trace_s, trace_speed, trace_accel = [state.s_m.copy()], [state.speed_mps.copy()], [state.accel_mps2.copy()]
    trace_active = [state.active(built)]
    forecast_time = 0.0
    source.observe(built, state)
    previous: planner.Plan | None = None
    for _ in range(steps):
        global_from_ego = world.ego_pose(built, state)
        plans = sampler.candidates(
            ego.path,
            float(state.s_m[0]),
            float(state.speed_mps[0]),
            ego.desired_speed_mps,
            global_from_ego.inverse(),
            float(state.accel_mps2[0]),
        )
        tick = time.perf_counter()
        forecast = source.forecast(built, state, previous, plans)
        forecast_time += time.perf_counter() - tick
        choice = sampler.choose(plans, forecast, float(state.accel_mps2[0]))
        accel = choice.plan.accel_profile(suite_files.SUB_STEP_S, suite_files.SUB_STEPS)
        for k in range(suite_files.SUB_STEPS):
            state = world.step(built, state, suite_files.SUB_STEP_S, ego_accel_mps2=float(accel[k]))
            trace_s.append(state.s_m.copy())
            trace_speed.append(state.speed_mps.copy())
            trace_accel.append(state.accel_mps2.copy())
            trace_active.append(state.active(built))
            tick = time.perf_counter()
            source.observe(built, state)
            forecast_time += time.perf_counter() - tick
        previous = choice.plan
    s = np.stack(trace_s)  # [K, A]
    speed, accel_trace, active = np.stack(trace_speed), np.stack(trace_accel), np.stack(trace_active)
    metrics = safety.episode_metrics(built, s, speed, accel_trace, active, episode.duration_s)
    return safety.EpisodeResult(
        episode_id=episode.episode_id,
        suite=episode.suite,
        scenario=episode.scenario,
        seed=episode.seed,
        forecast=forecast_source,
        duration_s=steps * suite_files.PLANNING_STEP_S,
        planning_steps=steps,
        wall_time_s=time.perf_counter() - start,
        forecast_time_s=forecast_time,
        **metrics,
    )


def _episode_task(
    episode: suite_files.Episode, forecast: str, checkpoint: str | None, model_options: dict | None = None
) -> safety.EpisodeResult | safety.FailedEpisode:
    """Run one episode; a crash becomes a ``FailedEpisode`` with its traceback instead of an exception."""
    try:
        return run_episode(episode, forecast, checkpoint, **(model_options or {}))
    except Exception as error:  # noqa: BLE001 - a failed episode is recorded, the suite goes on
        return safety.FailedEpisode(episode.episode_id, f"{type(error).__name__}: {error}", traceback.format_exc())


def _make_pool(workers_count: int, address: str | None) -> worker_pools.SequentialPool | worker_pools.RayPool:
    return worker_pools.make_pool(workers_count, address)


def run_suite(
    suite_path_or_suite: Path | str | suite_files.Suite,
    forecast: str,
    checkpoint: Path | str | None = None,
    workers: int = 1,
    address: str | None = None,
    out: Path | str | None = None,
    progress: bool = True,
    model_options: dict | None = None,
    job: str = "closed-loop",
) -> safety.SuiteResult:
    """Run every episode of a suite, one task each, and aggregate.

    Args:
        suite_path_or_suite: a suite file (``scenarios.load_suite``), the name of a shipped suite (``ci``,
            ``smoke``, ``empty``: ``suite_files.SHIPPED_SUITES``), or a ``Suite``.
        forecast: one of ``sources.FORECASTS``.
        checkpoint: the run folder for ``model``.
        workers: parallel episodes; 1 without ``address`` runs in this process, otherwise one Ray task per episode.
        address: a Ray cluster's address (default: a local Ray with ``workers`` CPUs).
        out: if given, ``out/metrics.json`` is written (atomically); ``out`` must be empty, new, or ``job``'s own
            earlier output (checked before any episode runs).
        progress: show a progress bar.
        model_options: ``ModelSource`` options.
        job: the command that owns ``out`` (``closed-loop``, or ``regress`` when the gate runs the suite).

    Returns:
        The finished episodes, their aggregate and the failed episodes, each list in the suite's order;
        ``out/metrics.json`` holds its ``to_dict()``.
    """
    suite = (
        suite_path_or_suite
        if isinstance(suite_path_or_suite, suite_files.Suite)
        else suite_files.load_suite(suite_files.resolve_suite_path(suite_path_or_suite))
    )
    if out is not None:
        bevio.claim_output_folder(Path(out), job, own_files=lambda folder: (folder / "metrics.json").is_file())
    if forecast not in sources.FORECASTS:
        raise ValueError(f"unknown forecast source {forecast!r}; choose one of {list(sources.FORECASTS)}")
    if forecast in sources.MODEL_SOURCES:
        if checkpoint is None:
            raise ValueError(
                f"the {forecast} forecast needs a checkpoint: pass --checkpoint RUN (a `bevjepa train` folder)"
            )
        from bevjepa.prediction import checkpoint as checkpoint_io

        checkpoint_io.load_state(Path(checkpoint))  # a clear error now rather than in every episode
        checkpoint_io.load_config(Path(checkpoint))
    checkpoint_arg = None if checkpoint is None else str(Path(checkpoint).resolve())
    task = functools.partial(_episode_task, forecast=forecast, checkpoint=checkpoint_arg, model_options=model_options)
    start = time.perf_counter()
    outcomes: list[safety.EpisodeResult | safety.FailedEpisode | None] = [None] * len(suite.episodes)
    pool = _make_pool(workers, address)
    try:
        from tqdm import tqdm

        with tqdm(total=len(suite.episodes), desc=f"closed-loop {forecast}", disable=not progress) as bar:
            for index, outcome in pool.map_unordered(task, suite.episodes):
                outcomes[index] = outcome
                bar.update(1)
    finally:
        if isinstance(pool, worker_pools.RayPool):
            pool.close()
    finished = tuple(o for o in outcomes if isinstance(o, safety.EpisodeResult))
    failed = tuple(o for o in outcomes if isinstance(o, safety.FailedEpisode))
    result = safety.SuiteResult(
        suite=suite.name,
        forecast=forecast,
        checkpoint=checkpoint_arg,
        episodes=finished,
        aggregate=safety.aggregate(finished, len(failed)),
        failed=failed,
        workers=workers,
        wall_time_s=time.perf_counter() - start,
    )
    if out is not None:
        result.save(Path(out) / "metrics.json")
    return result


def format_table(result: safety.SuiteResult) -> str:
    """The aggregate of a suite run as a small text table, then one line per failed episode."""
    lines = [f"suite {result.suite}, forecast {result.forecast}: {result.score_formula}"]
    for key, value in result.aggregate.metrics().items():
        lines.append(f"  {key:24s} {value:10.3f}")
    for failure in result.failed:
        lines.append(f"  FAILED {failure.episode_id}: {failure.error}")
    return "\n".join(lines)


def _warm_up(_: int) -> int:
    """A trivial task that makes a Ray worker import the simulator and build a world (for ``throughput``)."""
    scenario.build_world(scenario.ScenarioConfig(layout="straight", duration_s=1.0, vehicles=1, parked=0))
    time.sleep(0.5)
    return os.getpid()


def throughput(
    suite: Path | str | suite_files.Suite,
    workers_list: Sequence[int] = (1, 2),
    forecast: str = sources.CONSTANT_VELOCITY,
    checkpoint: Path | str | None = None,
) -> dict:
    """Episodes per second of the same suite on local Ray with each worker count (Ray's start-up excluded).

    Each run starts its own local Ray (so Ray must not be running), warms its workers up with one small task each,
    then times the suite's episodes.

    Returns:
        A flat dict: ``suite``, ``forecast``, ``episodes``, for each worker count W ``workers_W_load_average``
        (the machine's 1-minute load before the run), ``workers_W_wall_s``, ``workers_W_episodes_per_s`` and
        ``workers_W_failed``, and ``ratio``: episodes/s of the last worker count over the first.
    """
    import ray

    if ray.is_initialized():
        raise ValueError("throughput starts its own local Ray for each worker count: call ray.shutdown() first")
    suite = (
        suite if isinstance(suite, suite_files.Suite) else suite_files.load_suite(suite_files.resolve_suite_path(suite))
    )
    checkpoint_arg = None if checkpoint is None else str(Path(checkpoint).resolve())
    task = functools.partial(_episode_task, forecast=forecast, checkpoint=checkpoint_arg)
    result: dict = {"suite": suite.name, "forecast": forecast, "episodes": len(suite.episodes)}
    rates = []
    for count in workers_list:
        result[f"workers_{count}_load_average"] = os.getloadavg()[0]  # other work on the machine skews the ratio
        pool = worker_pools.RayPool(count)
        try:
            list(pool.map_unordered(_warm_up, list(range(count))))
            start = time.perf_counter()
            outcomes = [o for _, o in pool.map_unordered(task, suite.episodes)]
            wall = time.perf_counter() - start
        finally:
            pool.close()
        rates.append(len(suite.episodes) / wall)
        result[f"workers_{count}_wall_s"] = wall
        result[f"workers_{count}_episodes_per_s"] = rates[-1]
        result[f"workers_{count}_failed"] = sum(isinstance(o, safety.FailedEpisode) for o in outcomes)
    result["ratio"] = rates[-1] / rates[0]
    return result
