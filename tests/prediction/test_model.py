"""The assembled model, its training loop, checkpoints, the forecaster API, and the provisional evaluation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bevjepa.datasets import geometry, rasterize, torch_dataset
from bevjepa.evaluation import open_loop
from bevjepa.evaluation.report import eval_report
from bevjepa.fusion import fuser
from bevjepa.prediction import agent_occupancy, checkpoint, forecaster, heads, losses, model, train
from bevjepa.prediction import config as experiment_config
from bevjepa.tools import cli


def _tiny(steps: int = 2, **train_changes) -> experiment_config.ExperimentConfig:
    config = experiment_config.small()
    settings = {"steps": steps, "val_every": steps, "val_batches": 1, "loader_workers": 0, **train_changes}
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **settings))


@pytest.fixture(scope="module")
def batch(synthetic_windows: Path) -> torch_dataset.WindowBatch:
    dataset = torch_dataset.WindowDataset(synthetic_windows, future_inputs=True)
    return torch_dataset.collate([dataset[0], dataset[1]])


def test_the_velocity_area_term_joins_the_detection_term(batch):
    torch.manual_seed(0)
    config = dataclasses.replace(experiment_config.small().model, use_camera=False)
    net = model.BevJepa(config)
    output = net(batch)
    plain = model.compute_losses(net, batch, output, model.LossWeights(latent=0.0))
    area = model.compute_losses(net, batch, output, model.LossWeights(latent=0.0, detection_velocity_area=0.5))
    target, weight = heads.velocity_area_targets(
        batch.agent_box, batch.agent_velocity, batch.agent_class, batch.agent_mask, net.detection.grid
    )
    assert int((weight > 0).sum()) > int(batch.agent_mask.sum())  # more cells than agents
    v = heads.REGRESSION_CHANNELS.index("vx")
    expected = plain.detection + 0.5 * losses.velocity_area_loss(output.regression[:, v : v + 2], target, weight)
    torch.testing.assert_close(area.detection, expected)
    torch.testing.assert_close(area.total - plain.total, 0.5 * (area.detection - plain.detection))  # weight 0.5
    (area.detection - plain.detection).backward()
    grad = net.detection.regression[-1].weight.grad  # [R, width, 1, 1]
    assert grad[v : v + 2].abs().sum() > 0 and grad[:v].abs().sum() == 0  # the velocity channels alone


def test_forward_losses_and_gradients(batch):
    torch.manual_seed(0)
    net = model.BevJepa(experiment_config.small().model)
    output = net(batch)
    assert output.latent.shape == (2, 64, 32, 32) and output.rollout.shape == (2, 4, 64, 32, 32)
    assert output.occupancy_logits.shape == (2, 5, 3, 128, 128)
    assert output.modes.shape[2:] == (10, 12, 2)
    terms = model.compute_losses(net, batch, output, model.LossWeights(latent_steps=4))
    assert all(np.isfinite(v) for v in terms.scalars().values())
    terms.total.backward()
    assert all(p.grad is None for p in net.target_encoder.parameters())
    assert net.encoder.camera.lift_head.weight.grad.abs().sum() > 0
    assert (
        net.encoder.lidar.pillar_net[0].weight.grad.abs().sum() > 0
        if hasattr(net.encoder.lidar, "pillar_net")
        else True
    )
    before = [p.clone() for p in net.target_encoder.parameters()]
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)
    net.update_target(0.9)
    moved = [float((a - b).abs().max()) for a, b in zip(net.target_encoder.parameters(), before, strict=True)]
    assert max(moved) == pytest.approx(0.1, rel=1e-4)


def test_the_flow_loss_weighs_each_cell_by_its_class(batch):
    torch.manual_seed(0)
    net = model.BevJepa(experiment_config.small().model)
    with torch.no_grad():
        output = net(batch)  # the flow head starts at zero: every moving instance cell is an error

        def flow(weights: tuple[float, float, float]) -> float:
            # latent 0: the flow term does not read it, and each call would run the target encoder again
            loss_weights = model.LossWeights(flow_class_weight=weights, latent=0.0)
            return float(model.compute_losses(net, batch, output, loss_weights).flow)

    by_class = [flow(tuple(float(c == k) for c in range(3))) for k in range(3)]
    assert flow((1.0, 1.0, 1.0)) > 0 and flow((0.0, 0.0, 0.0)) == 0.0
    assert flow((3.0, 3.0, 3.0)) == pytest.approx(flow((1.0, 1.0, 1.0)))  # a weighted mean: only ratios matter
    assert min(by_class) <= flow((1.0, 10.0, 10.0)) <= max(by_class)


def test_the_refined_flow_starts_as_the_latent_flow_on_the_1_m_grid_and_learns(batch):
    torch.manual_seed(0)
    config = dataclasses.replace(experiment_config.small().model, use_camera=False, flow_refine=True)
    net = model.BevJepa(config)
    with torch.no_grad():
        net.flow.net[-1].bias.copy_(torch.tensor([0.1, -0.2]))  # a coarse flow that is not zero
    output = net(batch)
    b, f = batch.occupancy.shape[0], config.occupancy_steps
    assert output.flow.shape == (b, f + 1, 2, 64, 64)  # the 1 m grid of the 0.5 m targets
    assert float(output.flow[:, 0].detach().abs().max()) == 0.0  # t0 has not moved
    # The refiner's last layer starts at zero: the flow is the coarse flow, upsampled.
    torch.testing.assert_close(
        output.flow[:, 1:].detach(), torch.tensor([1.0, -2.0])[:, None, None].expand_as(output.flow[:, 1:])
    )
    losses_ = model.compute_losses(net, batch, output, model.LossWeights(latent=0.0))
    losses_.flow.backward()
    assert float(net.flow_refiner.net[-1].weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="flow_refine"):
        dataclasses.replace(config, world_model=False)
    with pytest.raises(ValueError, match="flow_refine_detached: needs flow_refine"):
        dataclasses.replace(config, flow_refine=False, flow_refine_detached=True)


@pytest.mark.parametrize("detached", [False, True])
def test_a_detached_refiner_passes_no_gradient_into_the_maps_or_through_its_residual_to_the_coarse_flow(detached):
    torch.manual_seed(0)
    refiner = heads.FlowRefiner(8, steps=4, detached=detached)
    with torch.no_grad():
        refiner.net[-1].weight.normal_()  # a residual that is not zero
    coarse = torch.randn(2, 3, 2, 4, 4, requires_grad=True)  # [N, S, 2, h, w]
    maps = torch.randn(2, 8, 8, 8, requires_grad=True)
    refiner(coarse, maps, [1, 2, 3]).square().sum().backward()
    assert (maps.grad is None) == detached
    # Detached, the coarse flow feels the loss only through the upsampled sum, as if the residual were a constant.
    residual = (refiner(coarse, maps, [1, 2, 3]) - _upsampled(coarse, 8)).detach()
    expected = torch.autograd.grad((_upsampled(coarse, 8) + residual).square().sum(), coarse)[0]
    assert torch.allclose(coarse.grad, expected, atol=1e-5) == detached


def _upsampled(coarse: torch.Tensor, size: int) -> torch.Tensor:
    flat = torch.nn.functional.interpolate(
        coarse.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False
    )
    return flat.unflatten(0, coarse.shape[:2])


@pytest.mark.parametrize("chained", [False, True])
def test_the_chained_flow_reads_each_step_against_the_one_before_and_composes_the_offsets(batch, chained):
    torch.manual_seed(0)
    config = dataclasses.replace(experiment_config.small().model, use_camera=False, chained_flow=chained)
    net = model.BevJepa(config)
    with torch.no_grad():
        net.flow.net[-1].bias.copy_(torch.tensor([0.2, 0.0]))  # every step: the content came from 2 m further in +x
    seen = []
    net.flow.register_forward_hook(lambda module, inputs, output: seen.append(inputs))
    output = net(batch)
    f, rows = config.occupancy_steps, config.fuser.grid.shape[0]
    z, before = seen[0]
    previous = [output.latent[:, None], output.rollout[:, :-1]] if chained else [output.latent[:, None]] * f
    expected = torch.cat(previous, dim=1)  # what each step's latent is read against
    torch.testing.assert_close(before, expected.flatten(0, 1))
    torch.testing.assert_close(z, output.rollout.flatten(0, 1))
    # The latent grid's cells are 2 m: chained, step k's content came from 2k m away (where that stays inside).
    inside = output.flow[:, 1:, 0, : rows - f].detach()  # [B, F, rows, W]
    per_step = torch.arange(1, f + 1, dtype=inside.dtype) * 2.0 if chained else torch.full((f,), 2.0)
    torch.testing.assert_close(inside, per_step[None, :, None, None].expand_as(inside))
    assert float(output.flow[:, 1:, 1].detach().abs().max()) == 0.0
    model.compute_losses(net, batch, output, model.LossWeights(latent=0.0)).flow.backward()
    assert float(net.flow.net[-1].weight.grad.abs().sum()) > 0


def test_decoder_step_film_decodes_every_step_and_learns_its_film(batch):
    torch.manual_seed(0)
    config = dataclasses.replace(experiment_config.small().model, use_camera=False, decoder_step_film=True)
    net = model.BevJepa(config)
    output = net(batch)
    assert output.occupancy_logits.shape == (2, 5, 3, 128, 128)
    model.compute_losses(net, batch, output, model.LossWeights(latent=0.0)).total.backward()
    assert all(float(film.grad.abs().sum()) > 0 for film in net.decoder.step_film)


def test_the_present_reading_starts_at_zero_adds_each_horizons_own_logits_and_learns(batch):
    config = dataclasses.replace(experiment_config.small().model, use_camera=False, present_occupancy=True)
    torch.manual_seed(0)
    net = model.BevJepa(config)
    plain = model.BevJepa(dataclasses.replace(config, present_occupancy=False))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("present_occupancy.")})
    torch.manual_seed(1)
    output = net(batch)
    torch.manual_seed(1)
    assert torch.equal(output.occupancy_logits, plain(batch).occupancy_logits)  # it starts at zero
    assert output.present_logits.shape == (2, 5, 3, 128, 128)
    assert float(output.present_logits.detach().abs().max()) == 0.0
    model.compute_losses(net, batch, output, model.LossWeights(latent=0.0)).total.backward()
    assert float(net.present_occupancy.decode.weight.grad.abs().sum()) > 0

    with torch.no_grad():
        net.present_occupancy.decode.weight.normal_(0.0, 0.1)
        net.present_occupancy.decode.bias.normal_(0.0, 0.1)
    net.eval()
    plain.eval()
    with torch.no_grad():
        drawn = net(batch, decode=(0, 2, 3))
        own = plain(batch, decode=(0, 2, 3))
        # each decoded step adds its own horizon's reading of t0's features, the same reading for every step
        torch.testing.assert_close(drawn.occupancy_logits, own.occupancy_logits + drawn.present_logits[:, [0, 2, 3]])
        assert not torch.equal(drawn.present_logits[:, 2], drawn.present_logits[:, 3])
        held = drawn.latent[:, None].expand(-1, 5, *drawn.latent.shape[1:])
        torch.testing.assert_close(
            net.occupancy_of(held, [0] * 5, drawn.skips, present=drawn.present_logits),
            plain.occupancy_of(held, [0] * 5, drawn.skips) + drawn.present_logits,
        )
        with pytest.raises(ValueError, match="present_logits"):
            net.occupancy_of(held, [0] * 5, drawn.skips)
        with pytest.raises(ValueError, match="present_logits"):
            plain.occupancy_of(held, [0] * 5, drawn.skips, present=drawn.present_logits)
    assert own.present_logits is None
    assert not config.direct_baseline().present_occupancy
    with pytest.raises(ValueError, match="present_occupancy"):
        dataclasses.replace(config, world_model=False)


def test_modalities_drop_only_in_training_and_never_in_the_target_encoder(batch):
    config = experiment_config.small().model
    config = dataclasses.replace(config, fuser=dataclasses.replace(config.fuser, modality_dropout=0.99))
    net = model.BevJepa(config).train()
    assert not net.target_encoder.training  # the EMA target encoder stays in eval mode
    frames = model.SensorFrames.past(batch)
    channels = config.fuser.camera_channels
    captured = []
    for encoder in (net.encoder, net.target_encoder):
        encoder.fuse.fuse.register_forward_pre_hook(lambda _, args: captured.append(args[0]))

    def alive() -> tuple[torch.Tensor, torch.Tensor]:
        x = captured.pop()
        return x[:, :channels].abs().sum(dim=(1, 2, 3)) > 0, x[:, channels:].abs().sum(dim=(1, 2, 3)) > 0

    torch.manual_seed(0)
    with torch.no_grad():
        net.encoder.encode_frames(frames)
        camera, lidar = alive()
        assert (camera | lidar).all() and not (camera & lidar).all()
        net.target_encoder.encode_frames(frames)
        assert all(bool(m.all()) for m in alive())
        net.eval()
        net.encoder.encode_frames(frames)
        assert all(bool(m.all()) for m in alive())


def test_the_direct_baseline_predicts_every_horizon_without_a_world_model(batch):
    torch.manual_seed(0)
    config = experiment_config.direct()
    net = model.BevJepa(config.model)
    assert net.predictor is None and net.encoder.camera is None
    output = net(batch)
    assert output.occupancy_logits.shape == (2, 5, 3, 128, 128)
    assert torch.equal(output.rollout[:, 0], output.latent) and torch.equal(output.rollout[:, -1], output.latent)
    terms = model.compute_losses(net, batch, output, config.train.weights)
    assert terms.latent.item() == 0.0 and np.isfinite(terms.total.item())
    terms.total.backward()
    assert net.occupancy.decode.weight.grad.abs().sum() > 0


def test_gradient_norms_at_the_shared_latent_name_every_head(batch):
    torch.manual_seed(0)
    net = model.BevJepa(experiment_config.small().model)
    output = net(batch)
    weights = model.LossWeights()
    norms = model.gradient_norms(model.compute_losses(net, batch, output, weights), output, weights)
    assert set(norms) == set(model.HEAD_TERMS)
    assert all(np.isfinite(v) for v in norms.values())
    assert all(v > 0 for name, v in norms.items() if name != "flow")
    assert norms["flow"] == 0.0  # the flow head starts at zero (nothing moves): no gradient reaches z_t0 yet


def test_rollout_depends_on_the_actions(batch):
    torch.manual_seed(0)
    net = model.BevJepa(experiment_config.small().model).eval()
    with torch.no_grad():
        braking = net(batch, actions=torch.zeros(2, 4, 3))
        driving = net(batch, actions=torch.tensor([5.0, 0.0, 0.0]).expand(2, 4, 3))
    assert not torch.allclose(braking.rollout, driving.rollout)
    torch.testing.assert_close(braking.latent, driving.latent)


def test_training_is_deterministic_and_resumes(synthetic_windows, tiny_checkpoint, tmp_path):
    # the other run is the shared one, trained earlier in another test with the same config (``_tiny(1)``)
    first = train.train(synthetic_windows, tmp_path / "a", _tiny(1), progress=False)
    assert first.steps == checkpoint.load_state(tiny_checkpoint)["step"] == 1
    a = checkpoint.load_model(tmp_path / "a")[1].state_dict()
    b = checkpoint.load_model(tiny_checkpoint)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").exists() and list((tmp_path / "a" / "tensorboard").iterdir())
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train.train(synthetic_windows, tmp_path / "a", _tiny(1), progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train.train(synthetic_windows, tmp_path / "a", _tiny(2, learning_rate=1e-4), resume=True, progress=False)
    state = checkpoint.load_state(tmp_path / "a")
    assert state["step"] == 1 and state["history"][0]["val"]["total"] > 0


def test_checkpoints_hold_no_pickle_and_reload_exactly(tiny_checkpoint, tmp_path, batch):
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tiny_checkpoint / name).read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream
    config, net = checkpoint.load_model(tiny_checkpoint)
    assert config == _tiny(1)  # the shared run: ``small`` trained one step
    again = checkpoint.load_model(tiny_checkpoint)[1]
    with torch.no_grad():
        torch.testing.assert_close(net(batch).occupancy_logits, again(batch).occupancy_logits)
    with pytest.raises(FileNotFoundError, match="not a bevjepa run folder"):
        checkpoint.load_model(tmp_path / "nothing")


def test_forecaster_api(synthetic_windows, tiny_checkpoint, tmp_path):
    model_forecaster = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, agents="annotated")
    sample = torch_dataset.WindowDataset(synthetic_windows)[0]
    forecast = model_forecaster.forecast(sample)
    assert forecast.occupancy.shape == (5, 3, 128, 128) and forecast.times_s.tolist() == [0, 0.5, 1, 1.5, 2]
    assert forecast.trajectories.shape == (len(sample.agent_ids), 10, 12, 2)
    np.testing.assert_allclose(forecast.mode_probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert forecast.timestamp_us == sample.timestamp_us and list(forecast.agent_ids) == list(sample.agent_ids)
    # The occupancy: the agents' boxes along their modes (certain at t0); the latent head's map beside it.
    agents = agent_occupancy.mode_occupancy(
        sample.agent_box.numpy(), sample.agent_class.numpy(), forecast.trajectories, forecast.mode_probabilities,
        forecast.grid, 3, 4,
    )  # fmt: skip
    np.testing.assert_array_equal(forecast.occupancy, agents)
    assert forecast.latent_occupancy.shape == agents.shape and 0 < forecast.latent_occupancy.min()
    t0_boxes, _ = rasterize.rasterize_boxes(
        forecast.grid, sample.agent_box[:, :2].numpy(), sample.agent_box[:, [3, 4]].numpy(),
        sample.agent_box[:, 6].numpy(), sample.agent_class.numpy(), 3,
    )  # fmt: skip
    assert t0_boxes.any() and forecast.occupancy[0][t0_boxes].min() == 1.0
    forecast.save(tmp_path / "forecast.npz")
    loaded = forecaster.OccupancyForecast.load(tmp_path / "forecast.npz")
    np.testing.assert_array_equal(loaded.occupancy, forecast.occupancy)
    np.testing.assert_array_equal(loaded.latent_occupancy, forecast.latent_occupancy)
    assert loaded.grid == forecast.grid
    baseline = dataclasses.replace(forecast, latent_occupancy=None)
    baseline.save(tmp_path / "baseline.npz")
    assert forecaster.OccupancyForecast.load(tmp_path / "baseline.npz").latent_occupancy is None
    # A version 1 file (no latent map) still loads; another version is refused by name.
    with np.load(tmp_path / "baseline.npz", allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    for version, name in ((1, "v1.npz"), (9, "v9.npz")):
        header = json.loads(str(arrays["header"]))
        np.savez(tmp_path / name, **{**arrays, "header": np.array(json.dumps({**header, "format_version": version}))})
    old = forecaster.OccupancyForecast.load(tmp_path / "v1.npz")
    assert old.latent_occupancy is None and np.array_equal(old.occupancy, forecast.occupancy)
    with pytest.raises(ValueError, match="v9.npz: not a bevjepa-occupancy-forecast file of version 1 to 3"):
        forecaster.OccupancyForecast.load(tmp_path / "v9.npz")
    braking = model_forecaster.forecast(sample, actions=np.zeros((4, 3)))
    assert not np.array_equal(
        braking.occupancy[1:],
        model_forecaster.forecast(sample, actions=np.tile([[4.0, 0.0, 0.0]], (4, 1))).occupancy[1:],
    )


def test_occupancy_queries_and_collision_probability():
    grid = geometry.GridSpec()
    occupancy = np.zeros((3, 3, 128, 128), dtype=np.float32)
    rows, cols, _ = grid.xy_to_index(np.array([[10.2, 0.2]]))
    occupancy[2, 0, rows[0], cols[0]] = 0.8  # a vehicle 10 m ahead at t = 1 s
    forecast = forecaster.OccupancyForecast(
        0,
        grid,
        ("vehicle", "pedestrian", "cyclist"),
        np.array([0.0, 0.5, 1.0], dtype=np.float32),
        occupancy,
        np.array([], dtype=str),
        np.zeros(0, dtype=np.int64),
        np.array([0.5]),
        np.zeros((0, 1, 1, 2)),
        np.zeros((0, 1)),
    )
    np.testing.assert_allclose(forecast.occupancy_at(np.array([[10.2, 0.2]]), 1.0), [0.8])
    np.testing.assert_allclose(forecast.occupancy_at(np.array([[10.2, 0.2]]), 0.75), [0.4])
    assert forecast.occupancy_at(np.array([[100.0, 0.0]]), 1.0)[0] == 0.0
    straight = np.array([[0.0, 0.0, 0.0], [4.5, 0.0, 0.0], [9.0, 0.0, 0.0]])
    swerve = np.array([[0.0, 0.0, 0.0], [4.5, 3.0, 0.0], [9.0, 6.0, 0.0]])
    times = np.array([0.0, 0.5, 1.0])
    assert forecast.collision_probability(straight, times) == pytest.approx(0.8)
    assert forecast.collision_probability(swerve, times) == 0.0
    # Beyond the last time only what stands over the last half second counts: the vehicle came at 1 s, so nothing.
    assert forecast.standing_collision_probability(straight) == 0.0
    occupancy[1, 0, rows[0], cols[0]] = 0.6  # it stood there from 0.5 s: the smaller of the two probabilities
    standing = dataclasses.replace(forecast, occupancy=occupancy)
    assert standing.standing_collision_probability(straight) == pytest.approx(0.6)
    assert standing.standing_collision_probability(swerve) == 0.0
    assert standing.standing_collision_probability(straight, held_s=0.0) == pytest.approx(0.8)  # the last map alone
    assert standing.standing_collision_probability(straight, held_s=1.0) == 0.0  # not there at t0
    with pytest.raises(ValueError, match="held_s must be >= 0"):
        standing.standing_collision_probability(straight, held_s=-1.0)


def test_cli_trains_resumes_and_evaluates(synthetic_windows, tmp_path, capsys, light_config_file):
    run = tmp_path / "run"
    common = [
        "train",
        "--data",
        str(synthetic_windows),
        "--out",
        str(run),
        "--config",
        str(light_config_file),  # any trained run will do: the LiDAR-only light one is the cheapest
        "--loader-workers",
        "0",
        "--batch-size",
        "2",
    ]
    assert cli.main([*common, "--steps", "1"]) == 0
    assert cli.main([*common, "--steps", "1"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 1
    out = tmp_path / "report"
    evaluate = ["eval", "--data", str(synthetic_windows), "--checkpoint", str(run), "--out", str(out)]
    assert cli.main([*evaluate, "--figures", "0", "--animation-windows", "0"]) == 0  # figures: tests/evaluation/report
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == set(eval_report.MODEL_ORDER) - {"direct"}  # every source but --direct's
    assert metrics["windows"] == 2


def test_baselines_reproduce_the_present_exactly(synthetic_windows):
    result = open_loop.evaluate(synthetic_windows, "mini_val")
    # 4 s scenes: no agent has a whole 6 s future, so no trajectory is scored.
    assert result["agents"] == 0 and np.isnan(result["models"]["constant_velocity"]["minADE_5"])
    # At t0 both baselines are the ground truth itself; later they drift.
    for name in ("constant_velocity", "persistence"):
        assert result["models"][name]["iou"]["vehicle"][0] == pytest.approx(1.0)
    assert result["models"]["persistence"]["iou"]["vehicle"][-1] < 1.0


@pytest.mark.slow
def test_data_parallel_training_on_ray_train_with_two_cpu_workers(synthetic_windows, tmp_path):
    from bevjepa.prediction import distributed

    summary = distributed.train_on_ray(synthetic_windows, tmp_path / "run", _tiny(2), "local", workers=2)
    assert summary.steps == 2
    assert checkpoint.load_state(tmp_path / "run")["step"] == 2


@pytest.mark.slow
def test_ray_train_workers_whose_clocks_disagree_stop_at_the_same_step(synthetic_windows, tmp_path):
    """With ``--minutes`` every worker takes the minutes from the latest clock: one whose clock stands still stops
    when the other runs out, instead of waiting for gradients that never come."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bevjepa.datasets import workers

    def worker(settings: dict) -> None:
        import json
        import time
        import types

        import ray.train

        from bevjepa.prediction import train as training

        rank = ray.train.get_context().get_world_rank()
        if rank == 0:  # this worker's clock stands still: alone, it would never run out of minutes
            frozen = time.perf_counter()
            training.time = types.SimpleNamespace(perf_counter=lambda: frozen)
        config = experiment_config.from_dict(experiment_config.ExperimentConfig, settings["config"])
        summary = training.training_loop(
            Path(settings["data"]), Path(settings["run"]), config, False, progress=False, distributed=True
        )
        (Path(settings["run"]) / f"rank{rank}.json").write_text(json.dumps({"steps": summary.steps}))

    run = tmp_path / "run"
    config = _tiny(50, max_minutes=1e-6, val_every=50)  # the other worker runs out after its first step
    started_here = workers.init_ray(2, "local")
    try:
        TorchTrainer(
            worker,
            train_loop_config={
                "data": str(synthetic_windows),
                "run": str(run),
                "config": experiment_config.to_dict(config),
            },
            # a worker left waiting fails after 10 minutes instead of gloo's default 30; in a passing run no worker
            # waits on a collective for longer than the other's step
            torch_config=TorchConfig(backend="gloo", timeout_s=600),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="train"),
        ).fit()
    finally:
        if started_here:
            import ray

            ray.shutdown()
    steps = [json.loads((run / f"rank{rank}.json").read_text())["steps"] for rank in (0, 1)]
    assert steps == [1, 1]
    assert checkpoint.load_state(run)["step"] == 1


@pytest.mark.slow
def test_the_small_model_overfits_four_windows(synthetic_windows, tmp_path):
    config = _tiny(150, batch_size=4, val_every=10, train_split="all", val_split="all")
    summary = train.train(synthetic_windows, tmp_path / "run", config, progress=False)
    first = checkpoint.load_state(tmp_path / "run")["history"][0]["train"]["total"]
    assert summary.final_losses["total"] < 0.1 * first, (first, summary.final_losses)


def test_train_and_eval_refuse_data_that_is_not_windows(synthetic_windows, tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert "must be a `bevjepa preprocess` output" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "report")]) == 2
    assert "must be a `bevjepa preprocess` output" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(synthetic_windows), "--split", "test", "--out", str(tmp_path / "r")]) == 2
    assert "has no windows of split 'test'" in capsys.readouterr().err


def test_a_stream_of_forecasts_encodes_each_keyframe_once_and_gives_the_same_forecasts(
    synthetic_windows, tiny_checkpoint
):
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    scene = dataset[0].scene_name
    stream = [dataset[i] for i in range(len(dataset)) if dataset[i].scene_name == scene]
    assert len(stream) >= 2 and stream[0].frame_tokens[1:] == stream[1].frame_tokens[:-1]
    cold = forecaster.Forecaster.from_checkpoint(tiny_checkpoint)
    streaming = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, cache_frames=8)
    encoded = []
    original = streaming.net.encoder.encode_frames
    streaming.net.encoder.encode_frames = lambda frames: encoded.append(frames.images.shape[1]) or original(frames)
    for sample in stream:
        expected, got = cold.forecast(sample), streaming.forecast(sample)
        np.testing.assert_allclose(got.occupancy, expected.occupancy, atol=1e-4)
        np.testing.assert_allclose(got.trajectories, expected.trajectories, atol=1e-4)
    assert encoded == [3] + [1] * (len(stream) - 1)


def test_weights_of_another_model_version_are_refused_by_name(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_checkpoint, tmp_path / "run")  # a copy: the shared run stays whole
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    weights["occupancy.retired.weight"] = weights.pop(next(k for k in weights if k.startswith("occupancy.")))
    save_file(weights, str(tmp_path / "run" / "model.safetensors"))
    with pytest.raises(ValueError, match="does not fit this version of the model"):
        checkpoint.load_model(tmp_path / "run")


@pytest.mark.parametrize("preset, channels", [("base", 128), ("wide", 64)])
def test_the_50_m_presets_predict_on_their_own_grids(synthetic_windows, preset, channels):
    """``base`` and ``wide`` (±50 m, a 50 × 50 latent): every head reads the grids of its own config, not
    ``small``'s."""
    config = experiment_config.preset(preset).model
    torch.manual_seed(0)
    net = model.BevJepa(config).eval()
    batch = torch_dataset.collate([torch_dataset.WindowDataset(synthetic_windows)[0]])
    with torch.no_grad():
        output = net(batch)
    assert output.latent.shape == (1, channels, 50, 50)
    assert output.occupancy_logits.shape == (1, config.occupancy_steps + 1, config.classes, 200, 200)
    assert output.heatmap_logits.shape[-2:] == net.detection.grid.shape == (100, 100)
    assert torch.isfinite(output.modes).all() and torch.isfinite(output.occupancy_logits).all()


def test_the_decoder_reads_past_keyframes_fine_maps_warped_into_the_present(batch):
    config = dataclasses.replace(
        experiment_config.small().model,
        use_camera=False,
        lidar=dataclasses.replace(experiment_config.small().model.lidar, fine_width=8),
        skip_frames=3,
    )
    torch.manual_seed(0)
    net = model.BevJepa(config).eval()
    with torch.no_grad():
        own = net.encoder.encode_frames(model.SensorFrames.past(batch))
        assert own.fine[0].shape == (2, 3, 8, 128, 128)  # the fine stage's width at 0.5 m
        # The mix starts at zero: the present keyframe's maps alone, as with skip_frames=1.
        skips = net.present_skips(own.fine, batch.t0_from_ego)
        assert all(torch.equal(s, f[:, -1]) for s, f in zip(skips, own.fine, strict=True))
        # A mix that copies the oldest frame's maps adds them as the present frame sees them: warped by the ego motion.
        for level, mix in enumerate(net.skip_mix):
            c = own.fine[level].shape[2]
            mix.weight.zero_()
            mix.weight[:, :c, 0, 0] = torch.eye(c)
            skips = net.present_skips(own.fine, batch.t0_from_ego)
            oldest = fuser.warp_to_reference(own.fine[level][:, 0], batch.t0_from_ego[:, 0], net.level_grid(level))
            torch.testing.assert_close(skips[level], own.fine[level][:, -1] + oldest)
            assert not torch.equal(oldest, own.fine[level][:, 0])  # the ego moved between the keyframes
        output = net(batch)
        assert output.occupancy_logits.shape == (2, 5, 3, 128, 128)
    with pytest.raises(ValueError, match="skip_frames"):
        dataclasses.replace(config, skip_frames=4)


def test_a_model_on_other_sensors_or_as_the_direct_baseline_drops_what_it_cannot_use():
    refined = dataclasses.replace(experiment_config.small().model, flow_refine=True, flow_refine_detached=True)
    assert refined.on_sensors("lidar") == dataclasses.replace(refined, use_camera=False)
    camera = refined.on_sensors("camera")  # no 1 m LiDAR maps to refine the flow on
    assert camera == dataclasses.replace(refined, use_lidar=False, flow_refine=False, flow_refine_detached=False)
    assert refined.on_sensors("both") == dataclasses.replace(refined, use_camera=True, use_lidar=True)
    with pytest.raises(ValueError, match="radar"):
        refined.on_sensors("radar")
    direct = refined.direct_baseline()
    assert not (direct.world_model or direct.use_camera or direct.flow_refine or direct.decoder_step_film)
    assert experiment_config.small().model.direct_baseline() == experiment_config.direct().model


def test_a_camera_only_model_has_no_fine_maps_to_mix(batch):
    config = experiment_config.small().model.on_sensors("camera")
    assert config.skip_frames == 3  # the preset's, which a camera-only model keeps without fine maps
    torch.manual_seed(0)
    net = model.BevJepa(config)
    assert len(net.skip_mix) == 0 and net.encoder.lidar is None
    output = net(batch)
    assert output.skips == () and output.occupancy_logits.shape == (2, 5, 3, 128, 128)
    terms = model.compute_losses(net, batch, output, model.LossWeights())
    assert np.isfinite(terms.total.item())


def test_a_model_whose_grids_disagree_is_refused_by_name():
    """Growing ``grid`` alone in a hand-edited config would fail deep in the decoder; the config names the grid."""
    small = experiment_config.preset("small").model
    with pytest.raises(ValueError, match=r"camera\.splat_grid: spans \(-32\.0, 32\.0, -32\.0, 32\.0\) m"):
        dataclasses.replace(small, grid=geometry.GridSpec(-50.0, 50.0, -50.0, 50.0, 0.5))
    coarser = geometry.GridSpec(-32.0, 32.0, -32.0, 32.0, 4.0)
    with pytest.raises(ValueError, match=r"lidar\.out_grid: must be the latent grid"):
        dataclasses.replace(small, lidar=dataclasses.replace(small.lidar, out_grid=coarser))
