"""Training may decode t0 and a few drawn future steps (``LossWeights.decoded_future_steps``): the decoded maps are
the full forward's, the occupancy terms keep their expectation, and validation decodes every step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bevjepa.datasets import torch_dataset
from bevjepa.prediction import bench, model, train
from bevjepa.tools import cli


@pytest.fixture(scope="module")
def net_and_batch(light_config, synthetic_windows: Path):
    dataset = torch_dataset.WindowDataset(synthetic_windows)
    batch = torch_dataset.collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    return model.BevJepa(light_config.model).eval(), batch


def test_the_decoded_steps_are_those_of_the_full_forward(net_and_batch):
    net, batch = net_and_batch
    with torch.no_grad():
        full = net(batch)
        part = net(batch, decode=(0, 3))
    assert full.decoded is None and full.occupancy_logits.shape[1] == 5
    assert part.decoded == (0, 3) and part.occupancy_logits.shape[1] == 2
    torch.testing.assert_close(part.occupancy_logits, full.occupancy_logits[:, [0, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.heatmap_logits, full.heatmap_logits)
    torch.testing.assert_close(part.rollout, full.rollout)


@pytest.mark.parametrize("decode", [(1, 2), (0, 2, 2), (0, 3, 1), ()])
def test_steps_that_skip_t0_or_are_not_ascending_are_refused(net_and_batch, decode):
    net, batch = net_and_batch
    with pytest.raises(ValueError, match="ascending steps starting with 0"):
        net(batch, decode=decode)


def test_over_every_draw_the_occupancy_terms_average_to_the_full_ones(net_and_batch):
    net, batch = net_and_batch
    weights = model.LossWeights(latent=0.0)
    with torch.no_grad():
        full = model.compute_losses(net, batch, net(batch), weights)
        draws = [model.compute_losses(net, batch, net(batch, decode=(0, k)), weights) for k in range(1, 5)]
        pairs = [model.compute_losses(net, batch, net(batch, decode=(0, 1, k)), weights) for k in range(2, 5)]
    for term in ("occupancy", "dice"):
        mean = sum(float(getattr(d, term)) for d in draws) / len(draws)
        assert mean == pytest.approx(float(getattr(full, term)), rel=1e-5)
        assert len({round(float(getattr(d, term)), 6) for d in draws}) > 1  # the draws do differ
    # with t0 and two future steps the mean over the drawn pair stands for the future's mean
    one_k = {k: float(draws[k - 1].occupancy) for k in range(1, 5)}
    for k, pair in zip(range(2, 5), pairs, strict=True):
        assert float(pair.occupancy) == pytest.approx((one_k[1] + one_k[k]) / 2, rel=1e-5)
    assert float(draws[0].flow) == pytest.approx(float(full.flow), rel=1e-6)  # the flow is read at every step


def test_draws_are_seeded_and_off_by_default(light_config):
    weights = model.LossWeights()
    assert model.draw_decoded_steps(light_config.model, weights) is None
    one = dataclasses.replace(weights, decoded_future_steps=1)
    two = dataclasses.replace(weights, decoded_future_steps=2)
    torch.manual_seed(3)
    first = [model.draw_decoded_steps(light_config.model, one) for _ in range(40)]
    torch.manual_seed(3)
    assert [model.draw_decoded_steps(light_config.model, one) for _ in range(40)] == first
    assert {d[1] for d in first} == {1, 2, 3, 4} and all(len(d) == 2 and d[0] == 0 for d in first)
    pair = model.draw_decoded_steps(light_config.model, two)
    assert len(pair) == 3 and pair[0] == 0 and pair[1] < pair[2] <= 4
    every = dataclasses.replace(weights, decoded_future_steps=light_config.model.occupancy_steps)
    assert model.draw_decoded_steps(light_config.model, every) is None
    direct = dataclasses.replace(light_config.model, world_model=False)
    assert model.draw_decoded_steps(direct, one) is None


def test_training_with_one_drawn_step_runs_and_validation_decodes_every_step(
    light_config, synthetic_windows, net_and_batch, tmp_path
):
    weights = dataclasses.replace(light_config.train.weights, decoded_future_steps=1, latent=0.0)
    config = dataclasses.replace(
        light_config, train=dataclasses.replace(light_config.train, steps=1, val_every=1, weights=weights)
    )
    summary = train.train(synthetic_windows, tmp_path / "run", config, progress=False)
    assert summary.steps == 1 and all(torch.isfinite(torch.tensor(v)) for v in summary.final_losses.values())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["weights"]["decoded_future_steps"] == 1
    net, batch = net_and_batch
    scenes = sorted(set(batch.scene_names))  # the loader's first batch is the fixture's
    loader = train.make_loader([(synthetic_windows, scenes)], 2, shuffle=False, seed=0, workers=0, future=False)
    validated = train.validate(net, loader, weights, max_batches=1)
    with torch.no_grad():
        full = model.compute_losses(net, batch, net(batch), weights)
    assert validated["occupancy"] == pytest.approx(float(full.occupancy), rel=1e-5)


def test_the_training_bench_times_every_variant_on_the_same_model(light_config_file, synthetic_windows, capsys):
    result = bench.decoded_steps_speed(synthetic_windows, str(light_config_file), repeats=1)
    names = ("every_step", "1_future_step", "2_future_steps", "bfloat16")
    for name in (*(f"world_model_{name}" for name in names), "direct"):
        assert result[f"{name}_ms"] > 0
    assert result["world_model_1_future_step_speedup"] == pytest.approx(
        result["world_model_every_step_ms"] / result["world_model_1_future_step_ms"]
    )
    assert cli.main(["bench", "training"]) == 2
    assert "bench training needs --data" in capsys.readouterr().err
    assert cli.main(["bench", "training", "--data", str(synthetic_windows), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_the_present_share_weighs_t0_against_the_futures_mean(net_and_batch):
    net, batch = net_and_batch
    with torch.no_grad():
        output = net(batch)
        terms = {
            share: model.compute_losses(net, batch, output, model.LossWeights(latent=0.0, present_share=share))
            for share in (None, 0.0, 0.2, 0.5, 1.0)
        }
    for term in ("occupancy", "dice"):
        present, future = float(getattr(terms[1.0], term)), float(getattr(terms[0.0], term))
        assert abs(present - future) > 1e-4  # t0 and the future do differ
        assert float(getattr(terms[0.5], term)) == pytest.approx((present + future) / 2, rel=1e-5)
        # the default weighs every one of the F + 1 steps the same: t0 a fifth
        assert float(getattr(terms[None], term)) == pytest.approx(float(getattr(terms[0.2], term)), rel=1e-5)
    assert float(terms[1.0].detection) == float(terms[0.0].detection)  # the other heads are untouched


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_present_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match=r"present_share must lie in \[0, 1\]"):
        model.LossWeights(present_share=share)
