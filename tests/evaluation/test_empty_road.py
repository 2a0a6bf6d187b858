"""A road with nobody on it, end to end: ``bevjepa eval`` over windows without agents, and a closed-loop episode
of the shipped ``empty`` suite driven by the model's forecast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bevjepa.evaluation.closed_loop import runner, safety, sources, suite_files
from bevjepa.sim import scenario
from bevjepa.tools import cli


@pytest.fixture(scope="module")
def empty_windows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Windows of a synthetic dataset without any agent: 2 scenes of 4 s (one in mini_train, one in mini_val)."""
    from bevjepa.datasets import preprocess
    from bevjepa.sim import synth

    root = tmp_path_factory.mktemp("empty-road")
    synth.synthesize(
        synth.SynthConfig(out=root / "mini", scenes=2, duration_s=4.0, seed=3, agents=(0, 0, 0, 0)), progress=False
    )
    preprocess.preprocess(preprocess.PreprocessConfig(dataroot=root / "mini", out=root / "windows"), progress=False)
    return root / "windows"


def test_eval_scores_windows_without_agents(empty_windows, light_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(
        [
            "eval",
            "--data",
            str(empty_windows),
            "--checkpoint",
            str(light_checkpoint),  # any trained world model: the light LiDAR-only one evaluates fastest
            "--out",
            str(out),
            "--figures",
            "1",
            "--animation-windows",
            "1",  # one empty window drawn over its horizon (several windows in one GIF: tests/evaluation/report)
        ]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0, printed
    assert printed[-1].startswith("2 windows, 0 failed, 0 agents")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["windows"] == 2 and metrics["agents"] == 0 and metrics["failed_windows"] == []
    models = metrics["models"]
    for name in ("model", "model_annotated"):
        assert models[name]["minADE_5"] is None, name  # no agent to score: null, not a crash and not a number
    assert models["model"]["detection_recall"] is None  # nobody to find
    # The occupancy is scored over the empty cells: the annotated agents' map is all zero, so its Brier score is
    # exactly 0; the sensor-only forecast and the latent head's map are real probability maps.
    assert models["model_annotated"]["brier_mean"] == 0.0
    for name in ("model", "model_latent"):
        assert 0.0 < models[name]["brier_mean"] < 1.0, name
    assert (out / "report.md").is_file() and (out / "figures" / "trajectories_1.png").is_file()
    assert (out / "figures" / "scene.gif").is_file()


def test_the_empty_suite_runs_closed_loop_on_the_model(tiny_checkpoint, tmp_path, capsys):
    suite = suite_files.load_suite(suite_files.resolve_suite_path("empty"))
    assert [e.episode_id for e in suite.episodes] == ["empty-straight/0"]
    built, _ = scenario.build_world(suite.episodes[0].scenario_config())
    assert len(built.actors) == 1  # the ego alone

    code = cli.main(
        ["closed-loop", "--suite", "empty", "--forecast", "model", "--checkpoint", str(tiny_checkpoint)]
        + ["--out", str(tmp_path)]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0, printed
    assert printed[-1].startswith("1 episodes, 0 failed")
    result = safety.SuiteResult.load(tmp_path / "metrics.json")
    assert result.failed == () and len(result.episodes) == 1 and result.forecast == sources.MODEL
    episode = result.episodes[0]
    assert episode.planning_steps == 2 and not episode.collision and episode.progress_m > 0


def test_every_forecast_source_forecasts_an_empty_road():
    episode = suite_files.load_suite(suite_files.resolve_suite_path("empty")).episodes[0]
    built, state = scenario.build_world(episode.scenario_config())
    for source in (sources.ConstantVelocitySource(), sources.OracleSource()):
        forecast = source.forecast(built, state, None, [])
        assert forecast.trajectories.shape[0] == 0 and forecast.agent_ids.shape == (0,)
        assert not forecast.occupancy.any(), source.name
    result = runner.run_suite(suite_files.resolve_suite_path("empty"), sources.ORACLE, progress=False)
    assert result.failed == () and result.aggregate.collision_rate == 0.0
    assert np.isfinite(result.aggregate.score)


def test_the_planner_api_forecasts_an_empty_road_from_its_sensors(empty_windows, tiny_checkpoint):
    from bevjepa.datasets import torch_dataset
    from bevjepa.prediction import forecaster

    window = torch_dataset.WindowDataset(empty_windows)[0].sensors_only()
    forecast = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, cache_frames=8).forecast(window)
    assert forecast.occupancy.shape == (5, 3, 128, 128) and forecast.latent_occupancy is not None
    assert forecast.agent_scores is not None and len(forecast.agent_scores) == len(forecast.agent_ids)
    straight = np.array([[0.0, 0.0, 0.0], [4.5, 0.0, 0.0], [9.0, 0.0, 0.0]])
    assert 0.0 <= forecast.collision_probability(straight, np.array([0.0, 0.5, 1.0])) <= 1.0
