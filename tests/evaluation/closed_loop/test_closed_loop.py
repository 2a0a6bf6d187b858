"""Closed loop: suite files, metrics on hand-made cases, episodes with every forecast source, suites on real Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from bevjepa.datasets import rasterize, workers
from bevjepa.evaluation.closed_loop import planner, regress, runner, safety, sources, suite_files
from bevjepa.sim import layouts, scenario, world
from bevjepa.tools import cli

SMOKE = suite_files.SHIPPED_SUITES / "smoke.toml"
CI = suite_files.SHIPPED_SUITES / "ci.toml"


# ------------------------------------------------------------------------------------------------- suites


def test_shipped_suites_expand_into_episodes():
    smoke = suite_files.load_suite(SMOKE)
    assert smoke.name == "smoke" and len(smoke.episodes) == 2
    assert [e.episode_id for e in smoke.episodes] == ["straight-short/1", "intersection-short/0"]
    assert smoke.episodes[1].ego_speed_mps == 9.0 and smoke.episodes[0].ego_speed_mps is None
    ci = suite_files.load_suite(CI)
    assert 6 <= len(ci.episodes) <= 8
    assert all(e.duration_s == 10.0 and e.vehicles == 14 for e in ci.episodes)  # from [defaults]
    assert {e.layout for e in ci.episodes} == {"intersection", "t_junction", "straight"}
    assert suite_files.resolve_suite_path("smoke") == SMOKE
    config = ci.episodes[0].scenario_config()
    assert (config.layout, config.seed, config.parked) == ("intersection", 15, 4)


GOOD = """
name = "s"
[[scenario]]
name = "a"
layout = "straight"
seeds = [0, 1]
duration_s = 2.0
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('name = "s"\n', ""), "`name` is required"),
        (GOOD.replace("seeds = [0, 1]", "seeds = [0, 0]"), "scenario 'a': `seeds` repeats"),
        (GOOD.replace("seeds = [0, 1]", "seeds = []"), "scenario 'a': `seeds` must be a non-empty list"),
        (GOOD.replace('"straight"', '"roundabout"'), "scenario 'a': `layout` 'roundabout' is unknown"),
        (GOOD.replace("duration_s = 2.0", ""), "scenario 'a': `duration_s` is required"),
        (GOOD.replace("duration_s = 2.0", "duration_s = -1.0"), "`duration_s` must be positive"),
        (GOOD + "vehicle = 3\n", "scenario 'a': unknown key `vehicle`"),
        (GOOD + 'pedestrians = "many"\n', "scenario 'a': `pedestrians` must be int, got str"),
        (GOOD + "cyclists = -1\n", "`cyclists` must not be negative"),
        (GOOD + "ego_speed_mps = 50\n", "`ego_speed_mps` must lie in"),
        (GOOD.replace("[[scenario]]", "[defaults]\nseeds = [1]\n[[scenario]]"), r"\[defaults\]: unknown key `seeds`"),
        ('name = "s"\n', "needs at least one \\[\\[scenario\\]\\]"),
        (GOOD + GOOD.replace('name = "s"\n', ""), "another scenario has the same name"),
        ("name = [", "not valid TOML"),
    ],
)
def test_suite_errors_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(suite_files.SuiteError, match=message) as error:
        suite_files.load_suite(path)
    assert str(path) in str(error.value)


def test_a_missing_suite_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"a shipped suite's name \(ci, empty, smoke\)"):
        suite_files.load_suite(tmp_path / "nope.toml")


# ------------------------------------------------------------------------------------------------ metrics


def test_head_on_boxes_overlap_and_separated_ones_do_not():
    size = np.array([1.9, 4.6])
    ego = (np.array([0.0, 0.0]), size, 0.0)
    assert safety.boxes_overlap(*ego, np.array([4.0, 0.3]), size, np.pi)  # bumpers 0.6 m into each other
    assert not safety.boxes_overlap(*ego, np.array([4.7, 0.0]), size, np.pi)  # 0.1 m apart
    assert not safety.boxes_overlap(*ego, np.array([0.0, 2.0]), size, 0.0)  # side by side, 0.1 m apart
    # Rotated 45°: the corner reaches 1.9/2 + ... only the separating axes of the rotated box tell these apart.
    assert not safety.boxes_overlap(*ego, np.array([4.1, 2.6]), size, np.pi / 4)


def test_box_overlap_agrees_with_shapely():
    rng = np.random.default_rng(0)
    count = 400
    centers = rng.uniform(-4, 4, size=(count, 2, 2))
    sizes = rng.uniform(0.5, 5.0, size=(count, 2, 2))
    yaws = rng.uniform(-np.pi, np.pi, size=(count, 2))
    ours = safety.boxes_overlap(
        centers[:, 0], sizes[:, 0], yaws[:, 0], centers[:, 1], sizes[:, 1], yaws[:, 1]
    )  # [count]
    a = shapely.polygons(rasterize.box_footprints(centers[:, 0], sizes[:, 0], yaws[:, 0]))
    b = shapely.polygons(rasterize.box_footprints(centers[:, 1], sizes[:, 1], yaws[:, 1]))
    np.testing.assert_array_equal(ours, shapely.intersects(a, b))
    assert 0.2 < ours.mean() < 0.8  # both outcomes are exercised


def test_time_to_collision_of_two_approaching_boxes():
    size = np.array([2.0, 4.0])
    # Ego at 0 driving +x at 10 m/s; an agent 30 m ahead driving towards it at 5 m/s: 26 m of gap close at 15 m/s.
    ttc = safety.time_to_collision(
        np.array([[0.0, 0.0], [0.0, 0.0]]),
        np.array([0.0, 0.0]),
        np.array([10.0, 0.0]),
        size,
        np.array([[[30.0, 0.0]], [[30.0, 0.0]]]),
        np.array([[np.pi], [np.pi]]),
        np.array([[5.0], [0.0]]),
        size[None],
        np.array([[True], [True]]),
        dt_s=0.01,
    )
    assert ttc[0] == pytest.approx(26.0 / 15.0, abs=0.011)
    assert ttc[1] == safety.TTC_CAP_S  # neither moves: no collision ahead
    # Moving apart, or an agent that does not exist, never collides; overlapping already is 0.
    apart = safety.time_to_collision(
        np.zeros((1, 2)), np.zeros(1), np.array([5.0]), size, np.array([[[-10.0, 0.0]]]), np.array([[np.pi]]),
        np.array([[5.0]]), size[None], np.array([[True]]),
    )  # fmt: skip
    assert apart[0] == safety.TTC_CAP_S
    ghost = safety.time_to_collision(
        np.zeros((1, 2)), np.zeros(1), np.array([10.0]), size, np.array([[[8.0, 0.0]]]), np.zeros((1, 1)),
        np.zeros((1, 1)), size[None], np.array([[False]]),
    )  # fmt: skip
    assert ghost[0] == safety.TTC_CAP_S
    touching = safety.time_to_collision(
        np.zeros((1, 2)), np.zeros(1), np.zeros(1), size, np.array([[[3.0, 0.0]]]), np.zeros((1, 1)),
        np.zeros((1, 1)), size[None], np.array([[True]]),
    )  # fmt: skip
    assert touching[0] == 0.0


def test_drivable_area_compliance():
    layout = layouts.build_layout("straight", np.random.default_rng(0))  # road along x through (150, 150)
    size = (world.EGO_SIZE_WLH_M[0], world.EGO_SIZE_WLH_M[1])
    centers = np.array(
        [
            [150.0, 150.0 - 1.75],  # on the right lane
            [150.0, 150.0 - 8.25],  # on the parking strip (drivable, as nuScenes' drivable_area)
            [150.0, 150.0 - 7.0 - 2.5 - 1.5],  # on the sidewalk
            [150.0, 150.0 - 7.0 - 2.5],  # straddling the curb
            [150.0, 150.0 - 1.75],  # on the lane, turned across the road: still on it
        ]
    )
    yaws = np.array([0.0, 0.0, 0.0, 0.0, np.pi / 2])
    inside = safety.footprint_on_drivable(layout.surface, centers, yaws, size)
    np.testing.assert_array_equal(inside, [True, True, False, False, True])


# ----------------------------------------------------------------------------------------------- episodes


def _episode(**changes) -> suite_files.Episode:
    """The smoke suite's first episode (a straight road, 2 s), with ``changes``."""
    return dataclasses.replace(suite_files.load_suite(SMOKE).episodes[0], **changes)


def test_episodes_are_deterministic_and_measured():
    episode = _episode()
    first = runner.run_episode(episode, "cv")
    again = runner.run_episode(episode, "cv")
    timing = {"wall_time_s", "forecast_time_s"}
    assert {k: v for k, v in first.to_dict().items() if k not in timing} == {
        k: v for k, v in again.to_dict().items() if k not in timing
    }
    assert first.planning_steps == 4 and first.duration_s == 2.0
    assert 0 < first.progress_m <= first.expected_progress_m + 1e-6
    assert 0 <= first.score <= 1 and first.dac == 1.0 and first.drivable_compliance == 1.0
    assert first.min_ttc_s <= safety.TTC_CAP_S


def test_forecasts_keep_the_ego_out_of_a_crash_that_the_blind_planner_drives_into():
    # ci's intersection-crossing seed 15: driving on at cruise speed hits a crossing vehicle.
    episode = suite_files.load_suite(CI).episodes[0]
    assert episode.episode_id == "intersection-crossing/15"
    blind = runner.run_episode(episode, "none")
    assert blind.collision and blind.collided_with.startswith("vehicle") and blind.score == 0.0
    for source in ("cv", "oracle"):
        careful = runner.run_episode(episode, source)
        assert not careful.collision, source
        assert careful.progress_m < blind.progress_m and careful.min_ttc_s > 0


def test_the_oracle_forecast_is_the_simulators_future():
    built, state = scenario.build_world(
        scenario.ScenarioConfig(layout="intersection", seed=3, duration_s=5.0, vehicles=8, parked=0, pedestrians=0)
    )
    forecast = sources.OracleSource().forecast(built, state, None, [])
    # Stepping the world 2 s at the ego's current speed and rasterizing gives the last map.
    future = state
    for _ in range(20):
        future = world.step(built, future, 0.1, ego_accel_mps2=0.0)
    ego_from_global = world.ego_pose(built, state).inverse()
    agents = sources.agents_in_frame(built, future, ego_from_global)
    expected, _ = rasterize.rasterize_boxes(
        forecast.grid, agents.xy, agents.size_wlh[:, :2], agents.yaw, agents.classes, 3
    )
    np.testing.assert_array_equal(forecast.occupancy[-1] > 0.5, expected)
    assert forecast.occupancy.shape[0] == 5 and set(np.unique(forecast.occupancy)) <= {0.0, 1.0}
    cv = sources.ConstantVelocitySource().forecast(built, state, None, [])
    np.testing.assert_array_equal(cv.occupancy[0], forecast.occupancy[0])  # both start from the truth of now


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A run folder holding an untrained ``small`` model (a real checkpoint; nothing here needs it to be good)."""
    import torch

    from bevjepa.prediction import checkpoint, model
    from bevjepa.prediction import config as experiment_config

    torch.manual_seed(0)
    config = experiment_config.small()
    run = tmp_path_factory.mktemp("closed-loop-run")
    checkpoint.save(run, config, model.BevJepa(config.model), None, {"step": 0, "history": []})
    return run


def test_model_source_renders_and_forecasts(untrained_run):
    episode = _episode(duration_s=1.0)
    result = runner.run_episode(episode, "model", untrained_run)
    assert result.planning_steps == 2 and result.forecast == "model"
    # The sample the model saw: P frames with points and six cameras at the checkpoint's image size.
    built, state = scenario.build_world(episode.scenario_config())
    source = sources.ModelSource(built, untrained_run, lidar_sweeps=2)
    source.observe(built, state)
    state = world.step(built, state, 0.1)
    source.observe(built, state)
    sample = source.sample(built, state, None)
    assert sample.images.shape == (3, 6, 3, 144, 256) and sample.camera_mask.all()
    assert sample.points.shape[0] > 1000 and set(sample.points_frame.unique().tolist()) == {0, 1, 2}
    np.testing.assert_allclose(sample.t0_from_ego[-1].numpy(), np.eye(4), atol=1e-6)
    assert sample.agent_count == 0  # what a car has: no actor of the simulator
    assert float(sample.points[:, 4].max()) == pytest.approx(0.1, abs=1e-6)  # two sweeps, 0.1 s apart
    given = sources.ModelSource(built, untrained_run, lidar_sweeps=2, agents="annotated")
    given.observe(built, state)
    annotated = given.sample(built, state, None)
    assert given.name == "model_annotated" and annotated.agent_count > 0 and annotated.agent_past_mask[:, -1].all()
    # Rolled out under each candidate: one forecast per candidate, and the actions change the rollout.
    tracked = sources.ModelSource(built, untrained_run, rollout_candidates=True)
    tracked.observe(built, state)
    rolled = sources.ModelSource(built, untrained_run, rollout_candidates=True, agents="annotated")
    rolled.observe(built, state)
    # Three candidates (the hardest braking, coasting, the strongest acceleration) rather than the default eight: each
    # candidate is one more window through the whole model, and three show one forecast per candidate all the same.
    three = planner.PlannerConfig(accelerations_mps2=(-6.0, 0.0, 1.5))
    plans = planner.SamplingPlanner(three).candidates(
        built.actors[0].path,
        float(state.s_m[0]),
        float(state.speed_mps[0]),
        9.0,
        world.ego_pose(built, state).inverse(),
    )
    forecasts = rolled.forecast(built, state, None, plans)
    assert len(forecasts) == len(plans) == 3
    from_sensors = tracked.forecast(built, state, None, plans)  # one tracking step: the same agents for each
    assert len({tuple(f.agent_ids.tolist()) for f in from_sensors}) == 1
    # The rolled-out latents differ (the latent head decodes them); the agents' modes read them too.
    assert not np.allclose(forecasts[0].latent_occupancy[-1], forecasts[-1].latent_occupancy[-1])
    assert not np.array_equal(forecasts[0].trajectories, forecasts[-1].trajectories)
    np.testing.assert_allclose(forecasts[0].occupancy[0], forecasts[-1].occupancy[0], atol=1e-5)


def test_smoke_suite_on_ray_records_a_crash_and_matches_the_sequential_run(tmp_path):
    import ray

    smoke = suite_files.load_suite(SMOKE)
    broken = suite_files.Episode(smoke.name, "broken", 0, "roundabout", 2.0)  # fails when its world is built
    suite = suite_files.Suite(smoke.name, (smoke.episodes[0], broken, smoke.episodes[1]))
    workers.start_local_ray(2)
    try:
        on_ray = runner.run_suite(suite, "cv", workers=2, out=tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    assert [f.episode_id for f in on_ray.failed] == ["broken/0"]
    assert "unknown layout 'roundabout'" in on_ray.failed[0].error
    assert "Traceback" in on_ray.failed[0].traceback
    assert [e.episode_id for e in on_ray.episodes] == ["straight-short/1", "intersection-short/0"]  # suite order
    assert on_ray.aggregate.episodes == 2 and on_ray.aggregate.failed == 1
    written = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert list(written) == [
        "suite",
        "forecast",
        "checkpoint",
        "score_formula",
        "metric_definitions",
        "episodes",
        "aggregate",
        "failed",
        "workers",
        "wall_time_s",
    ]
    assert written == on_ray.to_dict()
    assert list(written["aggregate"]) == list(safety.METRIC_DEFINITIONS)
    assert all(isinstance(v, float) for v in written["aggregate"].values())  # the counts too, as before
    assert written["failed"][0] == {"episode_id": "broken/0", "error": on_ray.failed[0].error} | {
        "traceback": on_ray.failed[0].traceback
    }
    assert written["score_formula"] == safety.PDMS_FORMULA

    sequential = runner.run_suite(smoke, "cv", workers=1, progress=False)
    timing = {"wall_time_s", "forecast_time_s"}

    def strip(result: safety.SuiteResult) -> list[dict]:
        return [{k: v for k, v in e.to_dict().items() if k not in timing} for e in result.episodes]

    assert strip(sequential) == strip(on_ray)
    assert sequential.aggregate == dataclasses.replace(on_ray.aggregate, failed=0)


def test_run_suite_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown forecast source 'psychic'"):
        runner.run_suite(SMOKE, "psychic", progress=False)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        runner.run_suite(SMOKE, "model", progress=False)
    with pytest.raises(FileNotFoundError, match="not a bevjepa run folder|holds no checkpoint"):
        runner.run_suite(SMOKE, "model", checkpoint=tmp_path, progress=False)


def test_cli_closed_loop(tmp_path, capsys):
    code = cli.main(["closed-loop", "--suite", "smoke", "--forecast", "none", "--workers", "1", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "collision_rate" in printed and "score" in printed
    result = safety.SuiteResult.load(tmp_path / "metrics.json")
    assert result.forecast == sources.NONE and len(result.episodes) == 2 and result.failed == ()
    assert runner.format_table(result) in printed
    assert cli.main(["closed-loop", "--suite", str(tmp_path / "x.toml"), "--forecast", "cv", "--out", "o"]) == 2


# ------------------------------------------------------------------------------------------ suite results


def _episode_result(**changes) -> safety.EpisodeResult:
    fields = {
        "episode_id": "merge/3",
        "suite": "hand-made",
        "scenario": "merge",
        "seed": 3,
        "forecast": sources.CONSTANT_VELOCITY,
        "duration_s": 4.0,
        "planning_steps": 8,
        "collision": True,
        "collision_time_s": 2.3,
        "collided_with": "vehicle-4",
        "progress_m": 31.5,
        "expected_progress_m": 40.0,
        "progress_ratio": 0.7875,
        "min_ttc_s": 0.0,
        "ttc": 0.0,
        "drivable_compliance": 1.0,
        "dac": 1.0,
        "comfort": 0.0,
        "max_abs_lon_accel_mps2": 3.5,
        "max_abs_lon_jerk_mps3": 6.0,
        "score": 0.0,
        "mean_speed_mps": 7.875,
        "wall_time_s": 1.25,
        "forecast_time_s": 0.5,
    }
    return safety.EpisodeResult(**(fields | changes))


def _suite_result(*episodes: safety.EpisodeResult) -> safety.SuiteResult:
    failed = (safety.FailedEpisode("broken/0", "RuntimeError: the simulator fell over", "Traceback (most recent..."),)
    return safety.SuiteResult(
        suite="hand-made",
        forecast=sources.CONSTANT_VELOCITY,
        checkpoint=None,
        episodes=episodes,
        aggregate=safety.aggregate(episodes, len(failed)),
        failed=failed,
        workers=2,
        wall_time_s=3.5,
    )


def test_suite_results_round_trip_through_metrics_json(tmp_path):
    assert [f.name for f in dataclasses.fields(safety.SuiteAggregate)] == list(safety.METRIC_DEFINITIONS)
    result = _suite_result(_episode_result(), _episode_result(episode_id="merge/4", seed=4, collision=False, score=0.9))
    path = result.save(tmp_path / "metrics.json")
    assert json.loads(path.read_text()) == result.to_dict()
    loaded = safety.SuiteResult.load(path)
    assert loaded == result
    assert isinstance(loaded.episodes, tuple) and isinstance(loaded.episodes[0], safety.EpisodeResult)
    assert loaded.aggregate.episodes == 2 and loaded.aggregate.collision_rate == 0.5
    assert regress.run_metrics(loaded) == loaded.aggregate.metrics()
    assert regress.run_metrics(loaded)["failed"] == 1.0

    # NaN (no collision, so no collision time; no finished episode, so no means) is written as null and read as NaN
    nan = _suite_result(_episode_result(collision=False, collision_time_s=float("nan")))
    again = safety.SuiteResult.load(nan.save(tmp_path / "nan" / "metrics.json"))
    assert again.to_dict() == nan.to_dict() and np.isnan(again.episodes[0].collision_time_s)
    assert again.to_dict()["episodes"][0]["collision_time_s"] is None
    nothing = dataclasses.replace(nan, episodes=(), aggregate=safety.aggregate((), 1))
    empty = safety.SuiteResult.load(nothing.save(tmp_path / "none" / "metrics.json"))
    assert np.isnan(empty.aggregate.score) and empty.aggregate.episodes == 0
    assert empty.save(tmp_path / "again.json").read_bytes() == (tmp_path / "none" / "metrics.json").read_bytes()


def _malformed(data: dict) -> list[tuple[object, str]]:
    """(file content, what the error says) of broken copies of a metrics.json."""
    no_aggregate = {k: v for k, v in data.items() if k != "aggregate"}
    word_score = data | {"aggregate": data["aggregate"] | {"score": "high"}}
    no_collision = data | {"episodes": [{k: v for k, v in data["episodes"][0].items() if k != "collision"}]}
    miscounted = data | {"aggregate": data["aggregate"] | {"episodes": 5.0}}
    return [
        ("{not json", "is not valid JSON"),
        ([1, 2], "the file is a JSON list, not an object"),
        (no_aggregate, "the file: missing ['aggregate']"),
        (data | {"aggregates": {}}, "unknown ['aggregates']"),
        (word_score, "aggregate.score is 'high', not a number or null"),
        (no_collision, "episodes[0]: missing ['collision']"),
        (data | {"failed": {"episode_id": "x"}}, "'failed' is a dict, not a list"),
        (miscounted, "counts 5 finished and 1 failed episodes, but the result lists 1 and 1"),
    ]


def test_a_malformed_metrics_json_is_refused_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="closed-loop metrics .*missing.json not found"):
        safety.SuiteResult.load(tmp_path / "missing.json")
    for i, (content, message) in enumerate(_malformed(_suite_result(_episode_result()).to_dict())):
        path = tmp_path / f"metrics-{i}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError) as error:
            safety.SuiteResult.load(path)
        assert f"closed-loop metrics {path} " in str(error.value) and message in str(error.value), error.value


def test_the_forecast_names_are_defined_once():
    from bevjepa.tools import demo

    assert sources.FORECASTS == (
        sources.MODEL,
        sources.MODEL_ANNOTATED,
        sources.CONSTANT_VELOCITY,
        sources.ORACLE,
        sources.NONE,
    )
    assert sources.CONSTANT_VELOCITY == "cv"  # what users type, and what metrics.json and baselines record
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("closed-loop", "regress"):
        forecast = next(a for a in commands[command]._actions if a.dest == "forecast")
        assert tuple(forecast.choices) == sources.FORECASTS, command
        assert "cv" in forecast.choices and "constant_velocity" not in forecast.choices
    assert set(demo.COMPARED_FORECASTS) < set(sources.FORECASTS)
    assert not hasattr(regress, "FORECASTS") and not hasattr(demo, "FORECASTS") and not hasattr(runner, "FORECASTS")
    classes = (sources.ModelSource, sources.ConstantVelocitySource, sources.OracleSource, sources.NoForecast)
    assert tuple(c.name for c in classes) == tuple(f for f in sources.FORECASTS if f != sources.MODEL_ANNOTATED)
    with pytest.raises(ValueError, match="RegressConfig.forecast must be one of"):
        regress.RegressConfig(suite="smoke", baseline=Path("b.json"), forecast="constant_velocity")
