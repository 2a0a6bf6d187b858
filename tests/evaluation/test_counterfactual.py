"""The counterfactual test of the world model: braking against accelerating, for agents that follow the ego."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bevjepa.datasets import torch_dataset
from bevjepa.evaluation import counterfactual


def test_speed_profiles_by_hand():
    braking = counterfactual.speed_profile_actions(4.0, -4.0, 3)  # 4 → 2 → 0 → 0 m/s
    np.testing.assert_allclose(braking[:, 0], [1.5, 0.5, 0.0])
    accelerating = counterfactual.speed_profile_actions(4.0, 2.0, 2)  # 4 → 5 → 6 m/s
    np.testing.assert_allclose(accelerating[:, 0], [2.25, 2.75])
    assert not braking[:, 1:].any()


def test_followers_are_behind_in_lane_same_heading_and_moving(synthetic_windows):
    sample = torch_dataset.WindowDataset(synthetic_windows)[0]
    boxes = torch.tensor(
        [
            [-10.0, 0.5, 0, 2, 4.5, 1.6, 0.05],  # follows
            [10.0, 0.0, 0, 2, 4.5, 1.6, 0.0],  # ahead
            [-10.0, 5.0, 0, 2, 4.5, 1.6, 0.0],  # next lane
            [-10.0, 0.0, 0, 2, 4.5, 1.6, np.pi],  # oncoming
            [-10.0, 0.0, 0, 2, 4.5, 1.6, 0.0],  # parked
        ]
    )
    velocity = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [-5.0, 0.0], [0.0, 0.0]])
    count = len(boxes)
    sample = dataclasses.replace(
        sample,
        agent_ids=tuple(f"a{i}" for i in range(count)),
        agent_box=boxes,
        agent_velocity=velocity,
        agent_class=torch.zeros(count, dtype=torch.int64),
        agent_past=torch.zeros(count, sample.agent_past.shape[1], 2),
        agent_past_mask=torch.zeros(count, sample.agent_past.shape[1], dtype=torch.bool),
        agent_future=torch.zeros(count, sample.agent_future.shape[1], 2),
        agent_future_mask=torch.zeros(count, sample.agent_future.shape[1], dtype=torch.bool),
    )
    assert counterfactual.followers(sample).tolist() == [True, False, False, False, False]


def test_follower_response_counts_on_a_trained_checkpoint(synthetic_windows, light_checkpoint):
    result = counterfactual.follower_response(light_checkpoint, synthetic_windows, split="all")  # any trained run
    assert result["windows"] == len(torch_dataset.WindowDataset(synthetic_windows))
    assert 0 <= result["right_way"] <= result["followers"]
    if result["followers"]:
        assert result["fraction"] == pytest.approx(result["right_way"] / result["followers"])
    else:
        assert np.isnan(result["fraction"])
