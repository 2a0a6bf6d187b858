"""Closed loop: suite files, metrics on hand-made cases, episodes with every forecast source, suites on real Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from bevjepa.datasets import rasterize, workers
from bevjepa.evaluation.closed_loop import planner, runner, safety, sources, suite_files
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
    assert (config.layout, config.seed, config.parked) == ("intersection", 0, 4)


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
    # ci's intersection-crossing seed 4: driving on at cruise speed hits a vehicle about 3 s in.
    episode = suite_files.load_suite(CI).episodes[1]
    assert episode.episode_id == "intersection-crossing/4"
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
    assert sample.agent_count > 0 and sample.agent_past_mask[:, -1].all()
    assert float(sample.points[:, 4].max()) == pytest.approx(0.1, abs=1e-6)  # two sweeps, 0.1 s apart
    # Rolled out under each candidate: one forecast per candidate, and the actions change the rollout.
    rolled = sources.ModelSource(built, untrained_run, rollout_candidates=True)
    rolled.observe(built, state)
    plans = planner.SamplingPlanner().candidates(
        built.actors[0].path,
        float(state.s_m[0]),
        float(state.speed_mps[0]),
        9.0,
        world.ego_pose(built, state).inverse(),
    )
    forecasts = rolled.forecast(built, state, None, plans)
    assert len(forecasts) == len(plans)
    # The rolled-out latents differ (the latent head decodes them); the agents' modes read them too.
    assert not np.allclose(forecasts[0].latent_occupancy[-1], forecasts[-1].latent_occupancy[-1])
    assert not np.array_equal(forecasts[0].trajectories, forecasts[-1].trajectories)
    np.testing.assert_allclose(forecasts[0].occupancy[0], forecasts[-1].occupancy[0], atol=1e-5)


def test_window_sample_from_frames_matches_the_dataset(synthetic_windows):
    from bevjepa.datasets import torch_dataset, windows

    dataset = torch_dataset.WindowDataset(synthetic_windows)
    entry = dataset.entries[0]
    window = windows.load_window(synthetic_windows / entry["file"])
    frames = [dataset.frame(entry["scene"], str(t)) for t in window.keyframe_tokens]
    config = windows.WindowConfig()  # what the fixture was preprocessed with
    ours = sources.window_sample_from_frames(
        frames,
        window.agent_box,
        window.agent_class,
        window.agent_velocity,
        window.agent_past,
        window.agent_past_mask,
        [str(a) for a in window.agent_ids],
        config,
        dataset.image_hw,
        window.actions[config.past_keyframes - 1 : config.past_keyframes - 1 + config.occupancy_steps],
    )
    theirs = dataset[0]
    for name in ("points", "points_frame", "images", "camera_mask", "intrinsics", "t0_from_camera", "agent_box"):
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(theirs, name).numpy(), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(ours.t0_from_ego.numpy(), theirs.t0_from_ego.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.actions[:6].numpy(), theirs.actions[:6].numpy(), atol=1e-4)
    assert not ours.occupancy.any() and not ours.agent_future_mask.any()


# ------------------------------------------------------------------------------------------------- suites


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
    assert [f["episode_id"] for f in on_ray["failed"]] == ["broken/0"]
    assert "unknown layout 'roundabout'" in on_ray["failed"][0]["error"]
    assert "Traceback" in on_ray["failed"][0]["traceback"]
    assert sorted(e["episode_id"] for e in on_ray["episodes"]) == ["intersection-short/0", "straight-short/1"]
    assert on_ray["aggregate"]["episodes"] == 2.0 and on_ray["aggregate"]["failed"] == 1.0
    written = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert set(written) >= {"suite", "forecast", "episodes", "aggregate", "failed"}
    assert all(isinstance(v, float) for v in written["aggregate"].values())
    assert written["score_formula"] == safety.PDMS_FORMULA

    sequential = runner.run_suite(smoke, "cv", workers=1, progress=False)
    timing = {"wall_time_s", "forecast_time_s"}

    def strip(report):
        return sorted(
            ({k: v for k, v in e.items() if k not in timing} for e in report["episodes"]),
            key=lambda e: e["episode_id"],
        )

    assert strip(sequential) == strip(on_ray)
    assert sequential["aggregate"] == on_ray["aggregate"] | {"failed": 0.0}


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
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["forecast"] == "none" and len(report["episodes"]) == 2
    assert cli.main(["closed-loop", "--suite", str(tmp_path / "x.toml"), "--forecast", "cv", "--out", "o"]) == 2
