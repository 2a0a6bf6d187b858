from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bevjepa.datasets import geometry
from bevjepa.prediction import world_model


def tiny_config(**overrides) -> world_model.PredictorConfig:
    return world_model.PredictorConfig(**{"channels": 8, "hidden": 16, "blocks": 2, "groups": 4, **overrides})


@pytest.fixture
def predictor() -> world_model.Predictor:
    torch.manual_seed(0)
    return world_model.Predictor(tiny_config()).eval()


def test_step_and_rollout_shapes(predictor):
    z = torch.randn(2, 8, 32, 32)
    assert predictor.step(z, torch.randn(2, 3)).shape == (2, 8, 32, 32)
    assert predictor.rollout(z, torch.randn(2, 4, 3)).shape == (2, 4, 8, 32, 32)


def test_default_config_runs():
    net = world_model.Predictor()
    z = torch.randn(1, 64, 32, 32)
    out = net.rollout(z, torch.zeros(1, 2, 3))
    assert out.shape == (1, 2, 64, 32, 32)
    assert torch.isfinite(out).all()


def test_bad_shapes_raise(predictor):
    with pytest.raises(ValueError, match="z: expected"):
        predictor.step(torch.randn(2, 8, 16, 16), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="action"):
        predictor.step(torch.randn(2, 8, 32, 32), torch.zeros(2, 2))


def test_config_checks():
    with pytest.raises(ValueError, match="groups"):
        world_model.PredictorConfig(hidden=30, groups=8)
    with pytest.raises(ValueError, match="action_dim"):
        world_model.PredictorConfig(action_dim=2)


def test_rollout_equals_repeated_step_with_composed_poses(predictor):
    torch.manual_seed(1)
    z0 = torch.randn(2, 8, 32, 32)
    actions = torch.tensor(
        [[[4.0, 0.5, 0.1], [4.0, -0.2, 0.3], [3.0, 0.0, -0.2]], [[1.0, 0.0, 0.0], [0.5, 0.1, 0.5], [0.0, 0.0, 0.0]]]
    )
    rolled = predictor.rollout(z0, actions)
    z, pose = z0, torch.zeros(2, 3)
    for k in range(3):
        z = predictor.step(z, actions[:, k], pose)
        pose = world_model.compose_ego_pose(pose, actions[:, k])
        torch.testing.assert_close(rolled[:, k], z)
    # The first step's default pose is the origin.
    torch.testing.assert_close(predictor.step(z0, actions[:, 0]), rolled[:, 0])


def test_output_depends_on_action_and_on_pose(predictor):
    z = torch.randn(1, 8, 32, 32)
    still = predictor.step(z, torch.zeros(1, 3))
    moving = predictor.step(z, torch.tensor([[5.0, 0.0, 0.0]]))
    turning = predictor.step(z, torch.tensor([[5.0, 0.0, 0.2]]))
    assert (still - moving).abs().max() > 1e-3
    assert (moving - turning).abs().max() > 1e-3
    elsewhere = predictor.step(z, torch.zeros(1, 3), torch.tensor([[10.0, -4.0, 0.5]]))
    assert (still - elsewhere).abs().max() > 1e-3


def test_untrained_predictor_is_close_to_persistence(predictor):
    z = torch.randn(2, 8, 32, 32)
    change = (predictor.step(z, torch.randn(2, 3)) - z).abs().mean()
    assert change < 0.5 * z.abs().mean()


def test_compose_ego_pose_matches_rigid_transforms():
    rng = np.random.default_rng(0)
    poses = rng.uniform([-10, -10, -math.pi], [10, 10, math.pi], size=(20, 3))
    actions = rng.uniform([-5, -2, -0.5], [5, 2, 0.5], size=(20, 3))
    got = world_model.compose_ego_pose(torch.tensor(poses), torch.tensor(actions)).numpy()
    for pose, action, result in zip(poses, actions, got, strict=True):
        t0_from_ego = geometry.RigidTransform.from_pose_2d(*pose)
        ego_from_next = geometry.RigidTransform.from_pose_2d(*action)
        t0_from_next = t0_from_ego @ ego_from_next
        np.testing.assert_allclose(result[:2], t0_from_next.translation[:2], atol=1e-9)
        assert abs(geometry.wrap_angle(result[2] - t0_from_next.yaw_rad)) < 1e-9


def test_gradients_reach_z0_and_parameters(predictor):
    z0 = torch.randn(1, 8, 32, 32, requires_grad=True)
    predictor.rollout(z0, torch.randn(1, 3, 3)).square().mean().backward()
    assert z0.grad is not None and z0.grad.abs().sum() > 0
    assert all(p.grad is not None for p in predictor.parameters())


def test_ema_update_moves_target_by_the_right_amount():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
    target = world_model.copy_for_target(online)
    before = {name: t.clone() for name, t in target.state_dict().items()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(3, 2, 5, 5))  # train mode: running stats and the batch counter change
    world_model.ema_update(target, online, 0.9)
    after, new = target.state_dict(), online.state_dict()
    for name, old in before.items():
        if old.is_floating_point():
            torch.testing.assert_close(after[name], 0.9 * old + 0.1 * new[name])
        else:
            assert torch.equal(after[name], new[name])
    world_model.ema_update(target, online, 0.0)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, new[name])
    with pytest.raises(ValueError, match="decay"):
        world_model.ema_update(target, online, 1.5)


def test_ema_update_rejects_different_modules():
    with pytest.raises(ValueError, match="parameters"):
        world_model.ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_copy_for_target_is_a_frozen_deep_copy():
    online = nn.Linear(3, 2)
    target = world_model.copy_for_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    torch.testing.assert_close(target.weight, online.weight)
    with torch.no_grad():
        online.weight.add_(1.0)
    assert not torch.allclose(target.weight, online.weight)


def test_the_latent_loss_reaches_the_encoder_only_when_asked(synthetic_windows):
    import dataclasses

    from bevjepa.datasets import torch_dataset
    from bevjepa.prediction import config as experiment_config
    from bevjepa.prediction import model

    torch.manual_seed(0)
    config = experiment_config.small()
    net = model.BevJepa(dataclasses.replace(config.model, use_camera=False)).eval()
    dataset = torch_dataset.WindowDataset(synthetic_windows, future_inputs=True, cameras=False)
    batch = torch_dataset.collate([dataset[0]])
    silent = {name: 0.0 for name in ("variance", "covariance", "occupancy", "occupancy_dice", "flow")}
    only_latent = model.LossWeights(latent=1.0, trajectory=0.0, mode=0.0, detection=0.0, **silent)
    for into_encoder in (True, False):
        net.zero_grad()
        weights = dataclasses.replace(only_latent, latent_into_encoder=into_encoder)
        terms = model.compute_losses(net, batch, net(batch), weights)
        assert terms.latent.item() > 0
        terms.total.backward()
        reached = [
            any(p.grad is not None and bool(p.grad.any()) for p in part.parameters())
            for part in (net.encoder, net.predictor)
        ]
        assert reached == [into_encoder, True], into_encoder
