"""A road with nobody on it: the trajectory head, the losses, training and the forecast API with zero agents."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from bevjepa.datasets import torch_dataset
from bevjepa.prediction import forecaster, heads, losses, model

K, T, P = 4, 6, 3


def _head() -> heads.TrajectoryHead:
    torch.manual_seed(0)
    return heads.TrajectoryHead(channels=8, modes=K, steps=T, past_steps=P, hidden=16)


def _agents(B: int, A: int, seed: int = 0):
    """Agents driving straight: xy [B, A, 2], past [B, A, P, 2], past_mask [B, A, P], yaw [B, A], class [B, A]."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, A, 2, generator=g) * 40 - 20
    yaw = torch.rand(B, A, generator=g) * 2 * math.pi - math.pi
    speed = torch.rand(B, A, generator=g) * 8 + 1
    heading = torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)  # [B, A, 2]
    lag = torch.arange(P - 1, -1, -1, dtype=torch.float32) * 0.5  # [P] s before t0
    past = xy[:, :, None] - (speed[..., None, None] * lag[:, None]) * heading[:, :, None]  # [B, A, P, 2]
    future = xy[:, :, None] + (speed[..., None, None] * torch.arange(1, T + 1)[:, None] * 0.5) * heading[:, :, None]
    return xy, past, torch.ones(B, A, P, dtype=torch.bool), yaw, torch.randint(0, 3, (B, A), generator=g), future


def _without_agents(sample: torch_dataset.WindowSample, keep: list[int] | None = None) -> torch_dataset.WindowSample:
    """The window with only the agents ``keep`` (none by default): its sensors unchanged, no agent queries."""
    index = torch.as_tensor(keep or [], dtype=torch.long)
    fields = ("agent_class", "agent_box", "agent_velocity", "agent_past", "agent_past_mask", "agent_future")
    return dataclasses.replace(
        sample,
        agent_ids=tuple(sample.agent_ids[i] for i in keep or []),
        agent_future_mask=sample.agent_future_mask[index],
        **{name: getattr(sample, name)[index] for name in fields},
    )


# ------------------------------------------------------------------------------------------- head and losses


def test_trajectory_head_without_agents_gives_empty_modes_and_a_zero_gradient_to_every_parameter():
    head = _head()
    z0, rollout = torch.randn(2, 8, 32, 32), torch.randn(2, 4, 8, 32, 32)
    modes, logits = head(
        z0,
        torch.zeros(2, 0, 2),
        torch.zeros(2, 0, P, 2),
        torch.zeros(2, 0, P, dtype=torch.bool),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.long),
        rollout=rollout,
        ego_past=torch.zeros(2, P, 2),
    )
    assert modes.shape == (2, 0, K, T, 2) and logits.shape == (2, 0, K)
    regression, classification = losses.trajectory_loss(
        modes, logits, torch.zeros(2, 0, T, 2), torch.zeros(2, 0, T, dtype=torch.bool), torch.zeros(2, 0, dtype=bool)
    )
    assert regression.item() == 0.0 and classification.item() == 0.0
    (regression + classification).backward()
    # Every parameter is in the graph (data-parallel training needs it) and gets exactly nothing.
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None, name
        assert not parameter.grad.any(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        ade, fde = losses.min_ade_fde(modes, logits, torch.zeros(2, 0, T, 2), torch.zeros(2, 0, T, dtype=bool), k=2)
    assert ade.shape == (0,) and fde.shape == (0,)


def test_a_sample_without_agents_beside_one_with_agents_changes_nothing_for_the_other():
    head = _head()
    xy, past, past_mask, yaw, cls, future = _agents(B=2, A=3)
    agent_mask = torch.tensor([[True, True, True], [False, False, False]])
    # Sample 1 is padding only, as ``collate`` makes it: zeros, masks off, NaN futures.
    xy[1], past[1], yaw[1], cls[1] = 0.0, 0.0, 0.0, 0
    past_mask[1] = False
    future[1] = float("nan")
    future_mask = agent_mask[..., None].expand(2, 3, T).clone()
    z0 = torch.randn(2, 8, 32, 32)
    modes, logits = head(z0, xy, past, past_mask, yaw, cls)
    alone_modes, alone_logits = head(z0[:1], xy[:1], past[:1], past_mask[:1], yaw[:1], cls[:1])
    assert torch.isfinite(modes).all() and torch.isfinite(logits).all()
    torch.testing.assert_close(modes[:1], alone_modes)
    torch.testing.assert_close(logits[:1], alone_logits)

    both = losses.trajectory_loss(modes, logits, future, future_mask, agent_mask)
    alone = losses.trajectory_loss(alone_modes, alone_logits, future[:1], future_mask[:1], agent_mask[:1])
    assert all(torch.isfinite(term) for term in both) and both[0].item() > 0
    torch.testing.assert_close(both, alone)
    ade, _ = losses.min_ade_fde(modes, logits, future, future_mask, k=2, agent_mask=agent_mask)
    assert ade.shape == (3,) and torch.isfinite(ade).all()

    box = torch.cat([xy, torch.full((2, 3, 1), 0.8), torch.tensor([1.9, 4.5, 1.6]).expand(2, 3, 3), yaw[..., None]], -1)
    box[1] = float("nan")  # padding may hold anything
    velocity = torch.zeros(2, 3, 2)
    heatmap, regression, regression_mask = heads.detection_targets(box, velocity, cls, agent_mask)
    assert heatmap[0].max() == 1.0 and not heatmap[1].any() and not regression_mask[1].any()
    detection = losses.detection_loss(
        torch.randn(2, 3, 64, 64), torch.randn(2, 10, 64, 64), heatmap, regression, regression_mask
    )
    assert torch.isfinite(detection)


# ------------------------------------------------------------------------------------------------ the model


def test_the_model_trains_on_windows_without_agents(synthetic_windows, light_config):
    dataset = torch_dataset.WindowDataset(synthetic_windows, future_inputs=True)
    full = dataset[0]
    assert full.agent_count > 0
    # The whole model but the cameras (no camera reads an agent): every head, loss and the EMA target encoder.
    config = light_config
    torch.manual_seed(0)
    net = model.BevJepa(config.model)
    for samples in ([_without_agents(full), _without_agents(dataset[1])], [_without_agents(full), full]):
        batch = torch_dataset.collate(samples)
        net.zero_grad(set_to_none=True)
        output = net(batch)
        assert output.modes.shape[:2] == (2, batch.agent_box.shape[1])
        terms = model.compute_losses(net, batch, output, config.train.weights)
        assert all(math.isfinite(value) for value in terms.scalars().values()), terms.scalars()
        terms.total.backward()
        trained = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trained)
        if batch.agent_box.shape[1] == 0:
            assert terms.trajectory.item() == 0.0 and terms.mode.item() == 0.0
            assert not net.trajectory.mode_out.weight.grad.any()
        else:
            assert terms.trajectory.item() > 0.0


def test_forecast_of_an_empty_window_is_complete_with_annotated_agents(synthetic_windows, tiny_checkpoint, tmp_path):
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    full = dataset[0]
    empty = _without_agents(full)
    model_forecaster = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, agents="annotated")
    forecast = model_forecaster.forecast(empty)
    assert forecast.agent_ids.shape == (0,) and forecast.agent_classes.shape == (0,)
    assert forecast.trajectories.shape == (0, 10, 12, 2) and forecast.mode_probabilities.shape == (0, 10)
    assert forecast.occupancy.shape == (5, 3, 128, 128) and not forecast.occupancy.any()  # no agent, no box
    latent = forecast.latent_occupancy
    assert latent is not None and latent.shape == (5, 3, 128, 128) and 0 < latent.min() and latent.max() < 1
    straight = np.array([[0.0, 0.0, 0.0], [4.5, 0.0, 0.0], [9.0, 0.0, 0.0]])
    assert forecast.collision_probability(straight, np.array([0.0, 0.5, 1.0])) == 0.0
    path = forecast.save(tmp_path / "empty")
    assert path == tmp_path / "empty.npz"
    loaded = forecaster.OccupancyForecast.load(path)
    assert loaded.trajectories.shape == (0, 10, 12, 2)
    np.testing.assert_array_equal(loaded.latent_occupancy, latent)

    # In one batch with a window that has agents: each gets what it gets alone.
    forecasts = model_forecaster.forecast_batch(torch_dataset.collate([empty, full]))
    assert forecasts[0].trajectories.shape == (0, 10, 12, 2)
    alone = model_forecaster.forecast(full)
    assert forecasts[1].trajectories.shape == (full.agent_count, 10, 12, 2)
    np.testing.assert_allclose(forecasts[1].trajectories, alone.trajectories, atol=1e-4)
    np.testing.assert_allclose(forecasts[0].latent_occupancy, latent, atol=1e-5)


# ------------------------------------------------------------------------------------ non-finite agent inputs


def test_an_agent_with_a_nan_box_or_past_is_refused_by_name(synthetic_windows, tiny_checkpoint):
    sample = torch_dataset.WindowDataset(synthetic_windows)[0]
    assert sample.agent_count >= 2
    model_forecaster = forecaster.Forecaster.from_checkpoint(tiny_checkpoint, agents="annotated")
    bad_id = sample.agent_ids[1]

    box = sample.agent_box.clone()
    box[1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"agent '{bad_id}' \(index 1\) has a non-finite t0 box") as error:
        model_forecaster.forecast(dataclasses.replace(sample, agent_box=box))
    assert f"{sample.scene_name}/{sample.sample_token}" in str(error.value)

    past, mask = sample.agent_past.clone(), sample.agent_past_mask.clone()
    past[1, 0] = float("inf")
    mask[1, 0] = True
    with pytest.raises(ValueError, match=rf"agent '{bad_id}' \(index 1\) has a non-finite past position"):
        model_forecaster.forecast(dataclasses.replace(sample, agent_past=past, agent_past_mask=mask))
    # A masked past step may hold anything: the forecast stays finite.
    mask[1, 0] = False
    forecast = model_forecaster.forecast(dataclasses.replace(sample, agent_past=past, agent_past_mask=mask))
    assert np.isfinite(forecast.trajectories).all()

    with pytest.raises(ValueError, match="actions .* must be finite"):
        model_forecaster.forecast(sample, actions=np.full((4, 3), np.nan))
