from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bevjepa.datasets import geometry
from bevjepa.evaluation import baselines
from bevjepa.fusion import fuser
from bevjepa.prediction import heads, losses

LATENT = fuser.latent_grid()


def agents_batch(B: int = 2, A: int = 3, P: int = 3, seed: int = 0):
    """Agents driving straight at a few m/s, with their past: (xy [B, A, 2], past, past_mask, yaw, class)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, A, 2, generator=g) * 40 - 20
    yaw = torch.rand(B, A, generator=g) * 2 * math.pi - math.pi
    speed = torch.rand(B, A, generator=g) * 8 + 1
    heading = torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)  # [B, A, 2]
    lag = torch.arange(P - 1, -1, -1, dtype=torch.float32) * 0.5  # [P] s before t0, t0 last
    past = xy[:, :, None] - (speed[..., None, None] * lag[:, None]) * heading[:, :, None]  # [B, A, P, 2]
    past_mask = torch.ones(B, A, P, dtype=torch.bool)
    cls = torch.randint(0, 3, (B, A), generator=g)
    return xy, past, past_mask, yaw, cls, speed, heading


# ---------------------------------------------------------------------------------------------------- occupancy


def test_occupancy_head_shapes():
    head = heads.OccupancyHead(width=8, classes=3)
    assert head(torch.randn(2, 8, 128, 128)).shape == (2, 1, 3, 128, 128)
    assert heads.OccupancyHead(width=8, classes=3, horizons=5)(torch.randn(2, 8, 128, 128)).shape == (2, 5, 3, 128, 128)
    assert head(torch.randn(1, 8, 128, 128)).mean().item() == pytest.approx(math.log(0.02 / 0.98), abs=0.5)


def test_decoder_reaches_the_target_grid_through_the_fine_maps():
    decoder = heads.BevDecoder(channels=8, skip_channels=(4, 6), widths=(8, 12), steps=5)
    z = torch.randn(3, 8, 32, 32)
    skips = [torch.randn(3, 4, 128, 128, requires_grad=True), torch.randn(3, 6, 64, 64, requires_grad=True)]
    fine, coarse = decoder(z, skips, torch.tensor([0, 1, 4]))
    assert fine.shape == (3, 8, 128, 128) and coarse.shape == (3, 12, 64, 64)
    fine.sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in skips)  # both fine maps reach the output
    # The step embedding tells the decoder which horizon it decodes.
    with torch.no_grad():
        decoder.step_embedding.normal_()
    same = z[:1].expand(2, -1, -1, -1)
    a, b = decoder(same, [s[:1].detach().expand(2, -1, -1, -1) for s in skips], torch.tensor([0, 3]))[0]
    assert not torch.allclose(a, b)
    # Without LiDAR there are no fine maps.
    bare = heads.BevDecoder(channels=8, skip_channels=(0, 0), widths=(8, 12), steps=1)
    assert bare(z, [], torch.zeros(3, dtype=torch.long))[0].shape == (3, 8, 128, 128)


# ---------------------------------------------------------------------------------------------------- trajectory


def test_sample_latent_picks_the_cell_the_grid_names():
    head = heads.TrajectoryHead(channels=2, modes=2, hidden=8)
    z = torch.zeros(1, 2, 32, 32)
    z[0, 0, 20, 7] = 5.0  # row 20 (x), column 7 (y)
    centre = LATENT.index_to_xy(np.array([20]), np.array([7]))  # [[9, -17]]
    assert centre.tolist() == [[9.0, -17.0]]
    picked = head.sample_latent(z, torch.tensor(centre, dtype=torch.float32)[None])  # [1, 1, 2]
    torch.testing.assert_close(picked, torch.tensor([[[5.0, 0.0]]]))
    swapped = head.sample_latent(z, torch.tensor([[[-17.0, 9.0]]]))
    assert swapped.abs().max() == 0
    # Anywhere inside the cell but off-centre the value is shared with neighbours, never with a far cell.
    near = head.sample_latent(z, torch.tensor([[[9.5, -17.0]]]))
    assert 0 < near[0, 0, 0] < 5.0


def test_sample_latent_at_every_centre_of_an_asymmetric_grid_returns_the_map():
    grid = geometry.GridSpec(-10.0, 30.0, -20.0, 16.0, 2.0)  # 20 rows, 18 columns
    head = heads.TrajectoryHead(channels=3, modes=2, hidden=8, grid=grid)
    z = torch.randn(2, 3, 20, 18)
    centres = torch.tensor(grid.cell_centers(), dtype=torch.float32).reshape(1, -1, 2).expand(2, -1, -1)
    picked = head.sample_latent(z, centres)  # [2, 360, 3]
    torch.testing.assert_close(picked.transpose(1, 2).reshape(2, 3, 20, 18), z)
    outside = head.sample_latent(z, torch.tensor([[[40.0, 0.0]], [[0.0, -30.0]]]))
    assert outside.abs().max() == 0


def test_trajectory_head_shapes_with_and_without_rollout():
    xy, past, past_mask, yaw, cls, *_ = agents_batch(B=2, A=5)
    head = heads.TrajectoryHead(channels=8, modes=10, steps=12, past_steps=3, hidden=16)
    modes, logits = head(torch.randn(2, 8, 32, 32), xy, past, past_mask, yaw, cls)
    assert modes.shape == (2, 5, 10, 12, 2) and logits.shape == (2, 5, 10)
    modes, logits = head(torch.randn(2, 8, 32, 32), xy, past, past_mask, yaw, cls, rollout=torch.randn(2, 4, 8, 32, 32))
    assert modes.shape == (2, 5, 10, 12, 2) and logits.shape == (2, 5, 10)
    assert torch.isfinite(modes).all()
    with pytest.raises(ValueError, match="agent_past"):
        head(torch.randn(2, 8, 32, 32), xy, past[:, :, :2], past_mask[:, :, :2], yaw, cls)


def test_masked_past_may_hold_nan():
    xy, past, past_mask, yaw, cls, *_ = agents_batch(B=1, A=2)
    past[0, 0, 0] = float("nan")
    past_mask[0, 0, 0] = False
    head = heads.TrajectoryHead(channels=4, modes=3, hidden=8)
    modes, logits = head(torch.randn(1, 4, 32, 32), xy, past, past_mask, yaw, cls)
    assert torch.isfinite(modes).all() and torch.isfinite(logits).all()


def test_past_motion_reads_only_the_past():
    nan = float("nan")
    accelerating = [[0.0, 0.0], [1.0, 0.0], [3.0, 1.0]]
    oldest_unknown = [[nan, 0.0], [1.0, 1.0], [2.0, 0.0]]
    middle_unknown = [[0.0, 0.0], [nan, nan], [1.0, 1.0]]
    past = torch.tensor([accelerating, oldest_unknown, middle_unknown])  # [A=3, P=3, 2], t0 last
    past_mask = torch.tensor([[True, True, True], [False, True, True], [True, False, True]])
    velocity, acceleration = heads.past_motion(past, past_mask)
    # (3 p0 - 4 p-1 + p-2) / (2 * 0.5 s) with three positions; the last step / 0.5 s with two; else 0.
    torch.testing.assert_close(velocity, torch.tensor([[5.0, 3.0], [2.0, -2.0], [0.0, 0.0]]))
    torch.testing.assert_close(acceleration, torch.tensor([[4.0, 4.0], [0.0, 0.0], [0.0, 0.0]]))
    # The anchor baseline takes the same velocities; the devkit-style one the last step's.
    np.testing.assert_allclose(baselines.anchor_velocities(past.numpy(), past_mask.numpy()), velocity.numpy())
    np.testing.assert_allclose(
        baselines.past_velocities(past.numpy(), past_mask.numpy()), [[4.0, 2.0], [2.0, -2.0], [0.0, 0.0]]
    )


def test_past_motion_is_exact_under_constant_acceleration():
    """Positions sampled from x(t) = x0 + v t + a t² / 2 give back v and a at t0 exactly."""
    v0, a = torch.tensor([3.0, -1.0]), torch.tensor([1.5, 0.5])
    t = torch.tensor([-1.0, -0.5, 0.0])[:, None]  # [P, 1] s
    past = (v0 * t + 0.5 * a * t**2)[None]  # [A=1, P, 2]
    velocity, acceleration = heads.past_motion(past, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(velocity[0], v0)
    torch.testing.assert_close(acceleration[0], a)


def test_modes_start_at_constant_velocity():
    """A fresh head's modes lie within centimetres of the constant-velocity path, and apart from each other."""
    xy, past, past_mask, yaw, cls, speed, heading = agents_batch(B=2, A=4)
    velocity = speed[..., None] * heading  # [B, A, 2], as the past shows it
    head = heads.TrajectoryHead(channels=8, modes=5, steps=12, hidden=32)
    modes, _ = head(torch.randn(2, 8, 32, 32), xy, past, past_mask, yaw, cls)
    t = torch.arange(1, 13, dtype=torch.float32) * 0.5
    constant_velocity = xy[:, :, None] + velocity[:, :, None] * t[:, None]  # [B, A, T, 2]
    gap = (modes - constant_velocity[:, :, None]).norm(dim=-1)  # [B, A, K, T]
    assert gap.max() < 0.5 and gap[..., 0].max() < 0.1
    assert (modes[:, :, 1] - modes[:, :, 2]).norm(dim=-1).min() > 0
    # Mode 0 is the constant-velocity anchor, whatever the weights.
    torch.testing.assert_close(modes[:, :, 0], constant_velocity)
    with torch.no_grad():
        head.displacement_out.bias.fill_(1.0)
    modes, _ = head(torch.randn(2, 8, 32, 32), xy, past, past_mask, yaw, cls)
    torch.testing.assert_close(modes[:, :, 0], constant_velocity)
    assert gap.max() < (modes[:, :, 1] - constant_velocity).norm(dim=-1).max()


def test_trajectories_are_absolute_in_t0_and_rotated_by_heading():
    head = heads.TrajectoryHead(channels=4, modes=3, steps=12, hidden=8, motion_scale_m=5.0)
    xy = torch.tensor([[[10.0, 5.0]]])
    past = xy[:, :, None].expand(1, 1, 3, 2).clone()
    args = (past, torch.ones(1, 1, 3, dtype=torch.bool))
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        head.displacement_out.weight.zero_()
        head.displacement_out.bias.zero_()
    modes, _ = head(z, xy, *args, torch.tensor([[0.7]]), torch.tensor([[0]]))
    torch.testing.assert_close(modes, torch.tensor([10.0, 5.0]).expand(1, 1, 3, 12, 2))
    # Zero residuals: the constant-velocity path; a past of 1 m per 0.5 s step along -x goes on so.
    moving = xy[:, :, None] + torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # [1, 1, 3, 2], t0 last
    modes, _ = head(z, xy, moving, args[1], torch.tensor([[0.7]]), torch.tensor([[0]]))
    steps = torch.arange(1, 13, dtype=torch.float32)
    torch.testing.assert_close(modes[0, 0, 2], torch.stack([10.0 - steps, torch.full((12,), 5.0)], -1))
    # One metre forward per step, in the heading frame: heading +y (yaw pi/2) moves along +y in t0.
    with torch.no_grad():
        head.displacement_out.bias.copy_(torch.tensor([1.0 / 5.0, 0.0]).repeat(3 * 12))
    modes, _ = head(z, xy, *args, torch.tensor([[math.pi / 2]]), torch.tensor([[0]]))
    want = torch.stack([torch.full((12,), 10.0), 5.0 + steps], -1)  # [12, 2]
    torch.testing.assert_close(modes[0, 0, 1], want, atol=1e-5, rtol=0)


def test_trajectory_head_overfits_one_batch():
    torch.manual_seed(0)
    B, A, T, K = 2, 4, 12, 3
    xy, past, past_mask, yaw, cls, speed, heading = agents_batch(B=B, A=A, seed=3)
    t = torch.arange(1, T + 1, dtype=torch.float32) * 0.5
    future = xy[:, :, None] + (speed[..., None, None] * t[:, None]) * heading[:, :, None]  # [B, A, T, 2]
    future[0, 1] += torch.stack([torch.zeros(T), 0.3 * t**2], -1)  # one agent turns
    future_mask = torch.ones(B, A, T, dtype=torch.bool)
    future_mask[1, 2, 8:] = False
    agent_mask = torch.ones(B, A, dtype=torch.bool)
    z = torch.randn(B, 8, 32, 32)
    head = heads.TrajectoryHead(channels=8, modes=K, steps=T, hidden=32, patch=1)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    history = []
    for _ in range(150):
        modes, logits = head(z, xy, past, past_mask, yaw, cls)
        regression, classification = losses.trajectory_loss(modes, logits, future, future_mask, agent_mask)
        loss = regression + classification
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 10, (history[0], history[-1])


def test_agent_interaction_refuses_a_width_its_heads_do_not_divide():
    with pytest.raises(ValueError, match="hidden=18 is not divisible by heads=4"):
        heads.AgentInteraction(18, heads=4)


def test_agents_see_their_neighbours_and_the_ego_but_not_padding():
    torch.manual_seed(0)
    xy, past, past_mask, yaw, cls, _, _ = agents_batch(B=1, A=4, seed=5)
    head = heads.TrajectoryHead(channels=4, modes=3, hidden=16)
    with torch.no_grad():  # lift the residual layer so that differences in the features show in the modes
        head.displacement_out.weight.mul_(100)
    z = torch.randn(1, 4, 32, 32)

    def modes_of(xy, past, past_mask, yaw, cls, **kwargs):
        return head(z, xy, past, past_mask, yaw, cls, **kwargs)

    modes, logits = modes_of(xy, past, past_mask, yaw, cls)
    # Padding (no valid past) changes nothing, whatever it holds.
    padded = [
        torch.cat([x, fill], dim=1)
        for x, fill in zip(
            (xy, past, past_mask, yaw, cls),
            (
                torch.full((1, 2, 2), 7.0),
                torch.full((1, 2, 3, 2), 3.0),
                torch.zeros(1, 2, 3, dtype=torch.bool),
                torch.ones(1, 2),
                torch.zeros(1, 2, dtype=torch.long),
            ),
            strict=True,
        )
    ]
    padded_modes, padded_logits = modes_of(*padded)
    torch.testing.assert_close(padded_modes[:, :4], modes)
    torch.testing.assert_close(padded_logits[:, :4], logits)
    # Moving agent 3 changes what agent 0 forecasts; the ego's motion does too.
    moved_xy, moved_past = xy.clone(), past.clone()
    moved_xy[0, 3] += torch.tensor([2.0, -1.0])
    moved_past[0, 3] += torch.tensor([2.0, -1.0])
    assert not torch.allclose(modes_of(moved_xy, moved_past, past_mask, yaw, cls)[0][0, 0], modes[0, 0])
    ego_past = torch.tensor([[[-8.0, 0.0], [-4.0, 0.0], [0.0, 0.0]]])  # 8 m/s along +x
    assert not torch.allclose(modes_of(xy, past, past_mask, yaw, cls, ego_past=ego_past)[0][0, 0], modes[0, 0])
    # A lone agent still forecasts (it attends to the ego alone).
    alone, alone_logits = modes_of(xy[:, :1], past[:, :1], past_mask[:, :1], yaw[:, :1], cls[:, :1])
    assert torch.isfinite(alone).all() and torch.isfinite(alone_logits).all()


# ---------------------------------------------------------------------------------------------------- detection


def boxes_batch():
    """Two samples: agents of each class, one with unknown velocity, one outside the grid, one padding."""
    box = torch.tensor(
        [
            [
                [10.3, -5.6, 0.8, 1.9, 4.5, 1.6, 0.3],
                [-20.2, 14.9, 0.9, 0.7, 0.8, 1.7, -2.0],
                [3.7, 3.2, 1.0, 0.8, 1.9, 1.5, 2.9],
                [50.0, 0.0, 1.0, 2.0, 4.0, 1.5, 0.0],
            ],
            [
                [-0.4, 0.6, 1.1, 2.5, 11.0, 3.4, -1.2],
                [25.0, -25.0, 0.7, 1.8, 4.2, 1.5, 1.0],
                [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
            ],
        ]
    )
    velocity = torch.tensor(
        [
            [[4.0, 1.0], [0.5, -0.3], [float("nan"), float("nan")], [1.0, 1.0]],
            [[-6.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    )
    cls = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return box, velocity, cls, mask


def test_detection_head_shapes():
    head = heads.DetectionHead(width=8, classes=3)
    heat, reg = head(torch.randn(2, 8, 64, 64))
    assert heat.shape == (2, 3, 64, 64) and reg.shape == (2, len(heads.REGRESSION_CHANNELS), 64, 64)
    assert head.grid.shape == (64, 64)
    with pytest.raises(ValueError, match="detection grid"):
        head(torch.randn(2, 8, 32, 32))


def test_detection_targets_peak_at_the_cell_the_grid_names():
    grid = heads.detection_grid()
    box, velocity, cls, mask = boxes_batch()
    heat, reg, reg_mask = heads.detection_targets(box, velocity, cls, mask, grid)
    assert heat.shape == (2, 3, 64, 64) and reg.shape == (2, 10, 64, 64) and reg_mask.shape == (2, 64, 64)
    assert heat.min() >= 0 and heat.max() <= 1
    centres = []
    for b, a in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        rows, cols, inside = grid.xy_to_index(box[b, a, :2].numpy()[None])
        assert inside[0]
        assert heat[b, cls[b, a], rows[0], cols[0]] == 1.0
        assert reg_mask[b, rows[0], cols[0]]
        centres.append((b, int(cls[b, a]), int(rows[0]), int(cols[0])))
    # Exactly those cells are 1, and they are the only regression cells (the outside agent and padding add nothing).
    ones = {tuple(i) for i in torch.nonzero(heat == 1.0).tolist()}
    assert ones == set(centres)
    assert int(reg_mask.sum()) == 5
    assert heat[1].sum() > 0 and heat[1, 1:].sum() == 0  # sample 1 has vehicles only
    # Splats fall off with distance and stop at the radius (min_radius 2 for boxes of a few metres).
    b, c, r, k = centres[3]
    assert 1 > heat[b, c, r + 1, k] > heat[b, c, r + 2, k] > 0 and heat[b, c, r + 3, k] == 0
    assert heat[b, c, r + 2, k + 2] > 0 and heat[b, c, r + 3, k + 2] == 0


def test_a_bigger_box_gets_a_wider_splat():
    box = torch.tensor([[[0.5, 0.5, 0.0, 1.8, 4.5, 1.5, 0.0], [20.5, 0.5, 0.0, 6.0, 30.0, 4.0, 0.0]]])
    radius = heads.gaussian_radius(box[0, :, 4], box[0, :, 3]).floor().clamp(min=2)
    assert radius.tolist()[0] == 2 and radius.tolist()[1] > 2
    heat, _, _ = heads.detection_targets(
        box, torch.zeros(1, 2, 2), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
    )
    widths = (heat[0, 0, [32, 52]] > 0).sum(dim=-1)  # along the centre rows
    assert widths.tolist() == [5, 2 * int(radius[1]) + 1]


def test_decode_of_the_targets_recovers_the_boxes():
    grid = heads.detection_grid()
    box, velocity, cls, mask = boxes_batch()
    heat, reg, _ = heads.detection_targets(box, velocity, cls, mask, grid)
    logits = torch.where(heat == 1.0, 10.0, -10.0)
    found = heads.decode_detections(logits, reg, grid, top_k=50, threshold=0.5)
    assert len(found.scores) == 5
    assert found.batch_index.tolist() == [0, 0, 0, 1, 1]
    for b, agents in ((0, [0, 1, 2]), (1, [0, 1])):
        mine = found.for_sample(b)
        for a in agents:
            distance = np.linalg.norm(mine.boxes[:, :2] - box[b, a, :2].numpy(), axis=1)
            j = int(distance.argmin())
            assert distance[j] < 1e-4  # exact up to float; "within a cell" with room to spare
            np.testing.assert_allclose(mine.boxes[j, 2:6], box[b, a, 2:6].numpy(), rtol=1e-5)
            assert abs(geometry.wrap_angle(mine.boxes[j, 6] - box[b, a, 6].item())) < 1e-5
            assert mine.classes[j] == cls[b, a]
            np.testing.assert_allclose(mine.velocity[j], velocity[b, a].numpy(), rtol=1e-5)  # NaN stays NaN


def test_decode_nms_and_threshold():
    grid = heads.detection_grid()
    logits = torch.full((1, 3, 64, 64), -10.0)
    logits[0, 0, 10, 10] = 3.0
    logits[0, 0, 10, 11] = 2.0  # suppressed by its neighbour
    logits[0, 2, 40, 40] = -1.0  # below the threshold
    found = heads.decode_detections(logits, torch.zeros(1, 10, 64, 64), grid, threshold=0.3)
    assert len(found.scores) == 1
    np.testing.assert_allclose(found.boxes[0, :2], grid.index_to_xy(np.array([10]), np.array([10]))[0])
    np.testing.assert_allclose(found.boxes[0, 3:6], 1.0)


def test_detections_check_shapes():
    with pytest.raises(ValueError, match="boxes"):
        heads.Detections(np.zeros((2, 6)), np.zeros((2, 2)), np.zeros(2), np.zeros(2, int), np.zeros(2, int))


# ---------------------------------------------------------------------------------------------------- losses


def test_vicreg_variance_is_zero_for_spread_latents_and_large_for_constant_ones():
    torch.manual_seed(0)
    spread = torch.randn(4, 16, 32, 32) * 2
    variance, covariance = losses.vicreg_regularizer(spread)
    assert variance.item() == 0.0
    unit, _ = losses.vicreg_regularizer(torch.randn(4, 16, 32, 32))
    assert unit.item() < 0.02
    constant, constant_cov = losses.vicreg_regularizer(torch.ones(4, 16, 32, 32))
    assert constant.item() > 0.95 and constant_cov.item() == 0.0
    base = torch.randn(4096, 1)
    correlated = torch.cat([base, base, torch.randn(4096, 2)], dim=1)
    _, corr_cov = losses.vicreg_regularizer(correlated)
    _, indep_cov = losses.vicreg_regularizer(torch.randn(4096, 4))
    assert corr_cov > 0.4 and indep_cov < 0.01


def test_latent_prediction_loss_stops_the_target_gradient():
    predicted = torch.randn(2, 3, 8, 4, 4, requires_grad=True)
    target = torch.randn(2, 3, 8, 4, 4, requires_grad=True)
    loss = losses.latent_prediction_loss(predicted, target)
    loss.backward()
    assert predicted.grad is not None and target.grad is None
    same = losses.latent_prediction_loss(target.detach() * 3 + 1, target.detach())  # per-cell scale is ignored
    assert same.item() < 1e-6
    mask = torch.tensor([[True, False, False], [False, False, False]])
    masked = losses.latent_prediction_loss(predicted, target, mask)
    full = losses.latent_prediction_loss(predicted[:1, :1], target[:1, :1])
    torch.testing.assert_close(masked, full)


def test_occupancy_loss_weights_positives_and_masks_steps():
    logits = torch.zeros(1, 2, 3, 4, 4)
    target = torch.zeros(1, 2, 3, 4, 4, dtype=torch.bool)
    target[0, 0, 0, 0, 0] = True
    plain = losses.occupancy_loss(logits, target, pos_weight=1.0)
    torch.testing.assert_close(plain, torch.tensor(math.log(2.0)))
    weighted = losses.occupancy_loss(logits, target, pos_weight=5.0)
    assert weighted > plain
    per_class = losses.occupancy_loss(logits, target, pos_weight=torch.tensor([5.0, 1.0, 1.0]))
    torch.testing.assert_close(per_class, weighted)
    only_second = losses.occupancy_loss(logits, target, mask=torch.tensor([[False, True]]), pos_weight=5.0)
    torch.testing.assert_close(only_second, torch.tensor(math.log(2.0)))
    focal = losses.occupancy_loss(logits, target, focal_gamma=2.0)
    assert focal < losses.occupancy_loss(logits, target)


def test_trajectory_loss_picks_the_closest_mode():
    T = 4
    future = torch.stack([torch.arange(1, T + 1, dtype=torch.float32), torch.zeros(T)], -1)  # [T, 2]
    modes = torch.stack(
        [future + torch.tensor([0.0, 3.0]), future + torch.tensor([0.0, -2.0]), future + torch.tensor([0.5, 0.0])]
    )  # [K=3, T, 2]: mode 2 is closest
    modes = modes[None, None].clone().requires_grad_(True)  # [1, 1, 3, T, 2]
    logits = torch.tensor([[[2.0, 1.0, 0.0]]], requires_grad=True)
    regression, classification = losses.trajectory_loss(
        modes, logits, future[None, None], torch.ones(1, 1, T, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)
    )
    torch.testing.assert_close(regression, torch.tensor(0.5 * 0.5**2))  # Huber of a 0.5 m error in x
    torch.testing.assert_close(classification, F.cross_entropy(logits[0], torch.tensor([2])))
    (regression + classification).backward()
    assert modes.grad[0, 0, :2].abs().sum() == 0 and modes.grad[0, 0, 2].abs().sum() > 0


def test_trajectory_loss_ignores_agents_without_future_and_handles_none():
    modes = torch.randn(1, 3, 2, 5, 2, requires_grad=True)
    logits = torch.randn(1, 3, 2, requires_grad=True)
    future = torch.randn(1, 3, 5, 2)
    future_mask = torch.ones(1, 3, 5, dtype=torch.bool)
    future_mask[0, 1] = False
    future[0, 1] = float("nan")
    agent_mask = torch.tensor([[True, True, False]])
    regression, classification = losses.trajectory_loss(modes, logits, future, future_mask, agent_mask)
    only = losses.trajectory_loss(modes[:, :1], logits[:, :1], future[:, :1], future_mask[:, :1], agent_mask[:, :1])
    torch.testing.assert_close(regression, only[0])
    torch.testing.assert_close(classification, only[1])
    none = losses.trajectory_loss(modes, logits, future, torch.zeros_like(future_mask), agent_mask)
    assert none[0].item() == 0 and none[1].item() == 0
    (none[0] + none[1]).backward()
    assert modes.grad is not None


def test_min_ade_fde_against_a_hand_computation():
    future = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [99.0, 99.0]])  # last step masked
    future_mask = torch.tensor([True, True, True, False])
    modes = torch.stack(
        [
            future + torch.tensor([0.0, 1.0]),  # ADE 1, FDE 1 (valid steps only)
            torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]),  # perfect (ADE 0, FDE 0), least probable
            future + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]]),  # ADE 1, FDE 3
        ]
    )  # [K=3, T=4, 2]
    logits = torch.tensor([0.5, -1.0, 2.0])
    shape = (1, 1)
    ade, fde = losses.min_ade_fde(
        modes.reshape(*shape, 3, 4, 2),
        logits.reshape(*shape, 3),
        future.reshape(*shape, 4, 2),
        future_mask.reshape(*shape, 4),
        k=2,
    )
    # Top-2 by probability: modes 2 and 0. ADE: min(1, 1) = 1; FDE at step 2: min(3, 1) = 1.
    torch.testing.assert_close(ade, torch.tensor([1.0]))
    torch.testing.assert_close(fde, torch.tensor([1.0]))
    ade, fde = losses.min_ade_fde(
        modes.reshape(*shape, 3, 4, 2),
        logits.reshape(*shape, 3),
        future.reshape(*shape, 4, 2),
        future_mask.reshape(*shape, 4),
        k=3,
    )
    torch.testing.assert_close(ade, torch.tensor([0.0]))
    torch.testing.assert_close(fde, torch.tensor([0.0]))
    # Agents with no valid step, or masked out, are left out.
    modes2 = modes.reshape(1, 1, 3, 4, 2).expand(1, 3, 3, 4, 2)
    mask2 = future_mask.reshape(1, 1, 4).expand(1, 3, 4).clone()
    mask2[0, 1] = False
    ade, fde = losses.min_ade_fde(
        modes2,
        logits.reshape(1, 1, 3).expand(1, 3, 3),
        future.reshape(1, 1, 4, 2).expand(1, 3, 4, 2),
        mask2,
        k=1,
        agent_mask=torch.tensor([[True, True, False]]),
    )
    assert ade.shape == (1,) and fde.shape == (1,)
    torch.testing.assert_close(fde, torch.tensor([3.0]))  # mode 2 alone: FDE 3 at the last valid step
    with pytest.raises(ValueError, match="k"):
        losses.min_ade_fde(
            modes2, logits.reshape(1, 1, 3).expand(1, 3, 3), future.reshape(1, 1, 4, 2).expand(1, 3, 4, 2), mask2, k=4
        )


def test_detection_loss_is_small_for_perfect_predictions_and_ignores_unknown_velocity():
    box, velocity, cls, mask = boxes_batch()
    heat, reg, reg_mask = heads.detection_targets(box, velocity, cls, mask)
    perfect = torch.where(heat == 1.0, 12.0, -12.0)
    good = losses.detection_loss(perfect, torch.nan_to_num(reg), heat, reg, reg_mask)
    assert torch.isfinite(good) and good.item() < 1e-3
    bad = losses.detection_loss(torch.zeros_like(heat), torch.zeros_like(reg), heat, reg, reg_mask)
    assert bad > 1.0


def test_velocity_area_targets_spread_each_agents_velocity_over_its_splat():
    grid = heads.detection_grid()
    box, velocity, cls, mask = boxes_batch()
    heat, _, _ = heads.detection_targets(box, velocity, cls, mask, grid)
    target, weight = heads.velocity_area_targets(box, velocity, cls, mask, grid)
    assert target.shape == (2, 2, 64, 64) and weight.shape == (2, 64, 64)
    # The weight is the splats' maximum over the classes, so exactly the heat-map's, cell by cell.
    torch.testing.assert_close(weight, heat.amax(dim=1))
    for b, a in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # every cell of these agents' splats holds their velocity
        rows, cols, _ = grid.xy_to_index(box[b, a, :2].numpy()[None])
        r, c = int(rows[0]), int(cols[0])
        assert weight[b, r, c] == 1.0
        for dr, dc in [(0, 0), (1, 0), (-2, 1)]:
            assert 0 < weight[b, r + dr, c + dc] <= 1
            torch.testing.assert_close(target[b, :, r + dr, c + dc], velocity[b, a])
    rows, cols, _ = grid.xy_to_index(box[0, 2, :2].numpy()[None])  # unknown velocity: NaN, left out by the loss
    assert torch.isnan(target[0, :, int(rows[0]), int(cols[0])]).all()
    assert (target.permute(0, 2, 3, 1)[weight == 0] == 0).all()  # outside every splat: 0
    # The outside agent and the padding add nothing: the splats' cells are all the weighted ones.
    assert int((weight > 0).sum()) == int((heat.amax(dim=1) > 0).sum())


def test_velocity_area_loss_is_zero_when_right_and_leaves_unknown_velocity_out():
    box, velocity, cls, mask = boxes_batch()
    target, weight = heads.velocity_area_targets(box, velocity, cls, mask)
    right = torch.nan_to_num(target)
    assert losses.velocity_area_loss(right, target, weight).item() == 0.0
    unknown = torch.isnan(target)
    assert unknown.any() and (weight[unknown.any(dim=1)] > 0).all()  # the agent without a velocity has a splat
    anything_there = torch.where(unknown, torch.full_like(right, 5.0), right)  # wrong only where nothing is known
    assert losses.velocity_area_loss(anything_there, target, weight).item() == 0.0
    wrong = right + torch.tensor([1.0, 0.0])[None, :, None, None]  # 1 m/s off along x everywhere
    torch.testing.assert_close(losses.velocity_area_loss(wrong, target, weight), torch.tensor(1.0))
    nothing = torch.zeros_like(weight)
    assert losses.velocity_area_loss(wrong, target, nothing).item() == 0.0


def test_all_losses_finite_and_backprop_through_the_heads():
    torch.manual_seed(0)
    B, A, C = 2, 4, 8
    z0 = torch.randn(B, C, 32, 32, requires_grad=True)
    rollout = torch.randn(B, 2, C, 32, 32, requires_grad=True)
    decoder = heads.BevDecoder(channels=C, skip_channels=(0, 0), widths=(8, 16), steps=3)
    occ_head = heads.OccupancyHead(width=8)
    traj_head = heads.TrajectoryHead(channels=C, modes=4, steps=6, hidden=16)
    det_head = heads.DetectionHead(width=16)
    xy, past, past_mask, yaw, cls, speed, heading = agents_batch(B=B, A=A)
    sequence = torch.cat([z0[:, None], rollout], 1)
    fine, coarse = decoder(sequence.reshape(B * 3, C, 32, 32), [], torch.arange(3).repeat(B))
    occupancy = occ_head(fine).reshape(B, 3, 3, 128, 128)
    occ_target = torch.rand(occupancy.shape) > 0.97
    modes, logits = traj_head(z0, xy, past, past_mask, yaw, cls, rollout=rollout)
    future = xy[:, :, None] + torch.arange(1, 7).float()[:, None] * heading[:, :, None]
    heat, reg = det_head(coarse.reshape(B, 3, 16, 64, 64)[:, 0])
    box, velocity, box_cls, box_mask = boxes_batch()
    targets = heads.detection_targets(box, velocity, box_cls, box_mask)
    terms = [
        losses.latent_prediction_loss(rollout, torch.randn_like(rollout)),
        *losses.vicreg_regularizer(sequence.reshape(-1, C, 32, 32)),
        losses.occupancy_loss(occupancy, occ_target, focal_gamma=2.0),
        losses.soft_dice_loss(occupancy, occ_target),
        *losses.trajectory_loss(
            modes, logits, future, torch.ones(B, A, 6, dtype=torch.bool), torch.ones(B, A, dtype=torch.bool)
        ),
        losses.detection_loss(heat, reg, *targets),
    ]
    assert all(torch.isfinite(t) and t.dim() == 0 for t in terms)
    sum(terms).backward()
    for module in (decoder, occ_head, traj_head, det_head):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert torch.isfinite(z0.grad).all() and z0.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- flow


def test_instance_flow_points_back_to_where_each_instance_was_at_t0():
    grid = geometry.GridSpec(-4.0, 4.0, -4.0, 4.0, 1.0)
    instances = torch.zeros(1, 3, *grid.shape, dtype=torch.long)
    instances[0, 0, 2:4, 2] = 1  # instance 1 at t0: rows 2-3, column 2
    instances[0, 1, 4:6, 2] = 1  # moved +2 m along x
    instances[0, 2, 4:6, 5] = 1  # and +3 m along y
    instances[0, 2, 0, 0] = 2  # instance 2 appears later: no t0 position, not scored
    cell_xy = torch.as_tensor(grid.cell_centers(), dtype=torch.float32)
    offset, mask = losses.instance_flow_targets(instances, cell_xy)
    assert offset.shape == (1, 3, 2, 8, 8) and mask.shape == (1, 3, 8, 8)
    assert int(mask[0, 0].sum()) == 2 and offset[0, 0].abs().max() == 0
    torch.testing.assert_close(offset[0, 1, :, 4, 2], torch.tensor([-2.0, 0.0]))
    torch.testing.assert_close(offset[0, 2, :, 5, 5], torch.tensor([-2.0, -3.0]))
    assert not mask[0, 2, 0, 0] and int(mask[0, 2].sum()) == 2
    perfect = losses.flow_loss(offset, offset, mask)
    assert perfect.item() == 0.0 and losses.flow_loss(torch.zeros_like(offset), offset, mask).item() > 0


def test_flow_loss_weighs_cells_by_their_weight():
    """A small instance's cells count as much as a large one's once weighted (``LossWeights.flow_class_weight``)."""
    target = torch.zeros(1, 1, 2, 1, 5)
    target[0, 0, 0, 0, 4] = 5.0  # the last cell moved 5 m, the other four stood still
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    still = torch.zeros_like(target)  # predicts no motion: wrong on the last cell only
    plain = losses.flow_loss(still, target, mask)
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0]).reshape(1, 1, 1, 5)
    weighted = losses.flow_loss(still, target, mask, cell_weight=weight)
    error = torch.nn.functional.smooth_l1_loss(torch.tensor(1.0), torch.tensor(0.0))  # 5 m at 5 m per unit
    torch.testing.assert_close(plain, error / 5)
    torch.testing.assert_close(weighted, 4 * error / 8)
    assert losses.flow_loss(still, target, mask, cell_weight=torch.zeros_like(weight)).item() == 0.0


def test_warp_by_offset_reads_each_cell_from_its_source():
    grid = geometry.GridSpec(-4.0, 4.0, -4.0, 4.0, 0.5)
    maps = torch.zeros(1, 1, *grid.shape)
    rows, cols, _ = grid.xy_to_index(np.array([[1.25, -0.75]]))
    maps[0, 0, rows[0], cols[0]] = 1.0
    offset = torch.zeros(1, 2, 4, 4)  # a coarser grid of the same extent, upsampled inside
    offset[:, 0], offset[:, 1] = -2.0, 1.0  # every cell reads 2 m behind in x and 1 m to the left in y
    warped = heads.warp_by_offset(maps, offset, grid)
    rows, cols, _ = grid.xy_to_index(np.array([[3.25, -1.75]]))
    assert float(warped[0, 0, rows[0], cols[0]]) == pytest.approx(1.0) and float(warped.sum()) == pytest.approx(1.0)


def test_step_film_starts_as_the_plain_decoder_and_tells_the_steps_apart_where_it_is_set():
    torch.manual_seed(0)
    plain = heads.BevDecoder(16, (4, 8), (8, 12), steps=5)
    film = heads.BevDecoder(16, (4, 8), (8, 12), steps=5, step_film=True)
    film.load_state_dict(plain.state_dict(), strict=False)  # the same weights, FiLM at zero
    z, skips, step = (
        torch.randn(2, 16, 8, 8),
        [torch.randn(2, 4, 32, 32), torch.randn(2, 8, 16, 16)],
        torch.tensor([0, 3]),
    )
    with torch.no_grad():
        reference = plain(z, skips, step)
        torch.testing.assert_close(film(z, skips, step), reference)  # the identity at first
        film.step_film[-1][3].normal_()  # the finest level's FiLM (the list runs coarsest first), step 3 alone
        fine, coarse = film(z, skips, step)
    torch.testing.assert_close(coarse, reference[1])  # the coarser level is untouched
    torch.testing.assert_close(fine[0], reference[0][0])  # and so is step 0
    assert not torch.allclose(fine[1], reference[0][1])
