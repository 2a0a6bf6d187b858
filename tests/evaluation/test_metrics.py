"""Trajectory metrics against the nuScenes devkit; occupancy IoU, VPQ, Brier and ECE on hand-computed grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.prediction import metrics as devkit
from nuscenes.eval.prediction.data_classes import Prediction

from bevjepa.datasets import windows
from bevjepa.evaluation import baselines, metrics

KS = [1, 5, 10]


def _devkit_scores(modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """The devkit's MinADEK, MinFDEK and MissRateTopK(2 m), one Prediction at a time, as [N, len(KS)]."""
    classes = {
        "ade": devkit.MinADEK(KS, [devkit.RowMean()]),
        "fde": devkit.MinFDEK(KS, [devkit.RowMean()]),
        "miss": devkit.MissRateTopK(KS, [devkit.RowMean()], tolerance=2.0),
    }
    out = {name: np.zeros((len(truth), len(KS))) for name in classes}
    for n in range(len(truth)):
        prediction = Prediction("instance", "sample", modes[n], probabilities[n])
        for name, metric in classes.items():
            out[name][n] = metric(truth[n], prediction)[0]
    return out


def _ours(modes: np.ndarray, probabilities: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    out = {"ade": [], "fde": [], "miss": []}
    for k in KS:
        ade, fde = metrics.min_ade_fde(modes, probabilities, truth, k)
        out["ade"].append(ade)
        out["fde"].append(fde)
        out["miss"].append(metrics.miss_rate(modes, probabilities, truth, k).astype(float))
    return {name: np.stack(values, axis=1) for name, values in out.items()}


@pytest.mark.parametrize("modes_count", [1, 3, 10, 12])
def test_trajectory_metrics_equal_the_devkit_on_random_arrays_with_ties(modes_count):
    rng = np.random.default_rng(modes_count)
    n, steps = 40, 12
    truth = np.cumsum(rng.normal(0, 1.0, (n, steps, 2)), axis=1)
    modes = truth[:, None] + rng.normal(0, 2.0, (n, modes_count, steps, 2))
    probabilities = rng.integers(0, 3, (n, modes_count)).astype(float)  # many ties, some all-equal rows
    probabilities[:5] = 1.0
    # A mode whose worst error is exactly the tolerance is a miss (>=), as in the devkit.
    modes[5, 0] = truth[5] + np.array([2.0, 0.0])
    ours, reference = _ours(modes, probabilities, truth), _devkit_scores(modes, probabilities, truth)
    for name in ("ade", "fde", "miss"):
        np.testing.assert_allclose(ours[name], reference[name], rtol=0, atol=1e-9, err_msg=name)
    # Direct calls of the devkit's functions on one agent agree too.
    stacked = devkit.stack_ground_truth(truth[7], modes_count)
    np.testing.assert_allclose(
        devkit.min_ade_k(modes[7], stacked, probabilities[7])[0, np.minimum(KS, modes_count) - 1],
        ours["ade"][7],
        atol=1e-9,
    )
    np.testing.assert_allclose(
        devkit.miss_rate_top_k(modes[7], stacked, probabilities[7], 2.0)[0, np.minimum(KS, modes_count) - 1],
        ours["miss"][7],
        atol=1e-9,
    )
    if modes_count == 1:
        assert ours["miss"][5, 0] == 1.0


def test_ties_are_broken_in_the_devkit_order():
    truth = np.zeros((1, 2, 2))
    modes = np.stack([np.full((2, 2), 5.0), np.zeros((2, 2))])[None]  # mode 0 bad, mode 1 perfect
    ade, _ = metrics.min_ade_fde(modes, np.array([[0.5, 0.5]]), truth, 1)
    reference = devkit.MinADEK([1], [devkit.RowMean()])(truth[0], Prediction("i", "s", modes[0], np.array([0.5, 0.5])))
    assert ade[0] == pytest.approx(reference[0, 0], abs=1e-12)
    assert ade[0] == 0.0  # argsort then flip puts the later of two equal modes first


def test_trajectory_metrics_equal_the_devkit_on_synthetic_windows(synthetic_windows: Path):
    rng = np.random.default_rng(0)
    truths, all_modes = [], []
    for path in sorted((synthetic_windows / "windows").rglob("*.npz")):
        window = windows.load_window(path)
        steps = 4  # every agent of the 4 s scenes is annotated 2 s ahead
        full = window.agent_future_mask[:, :steps].all(axis=1)
        truth = window.agent_future[full, :steps].astype(np.float64)
        velocity = baselines.agent_velocities(window.agent_velocity, window.agent_past, window.agent_past_mask)
        cv = baselines.constant_velocity_trajectories(window.agent_box[:, :2].astype(np.float64), velocity, steps)
        noisy = cv[full] + rng.normal(0, 1.5, (int(full.sum()), 6, steps, 2))
        truths.append(truth)
        all_modes.append(np.concatenate([cv[full], noisy], axis=1))  # [N, 7, T, 2]
    truth, modes = np.concatenate(truths), np.concatenate(all_modes)
    assert len(truth) >= 4
    probabilities = rng.dirichlet(np.ones(modes.shape[1]), len(truth))
    ours, reference = _ours(modes, probabilities, truth), _devkit_scores(modes, probabilities, truth)
    for name in ("ade", "fde", "miss"):
        np.testing.assert_allclose(ours[name], reference[name], rtol=0, atol=1e-9, err_msg=name)


def test_iou_counts_by_hand():
    predicted = np.zeros((1, 1, 4, 4), bool)
    target = np.zeros((1, 1, 4, 4), bool)
    predicted[0, 0, :2, :2] = True  # 4 cells
    target[0, 0, 1:3, 1:3] = True  # 4 cells, 1 shared
    intersection, union = metrics.iou_counts(predicted, target)
    assert intersection.tolist() == [[1]] and union.tolist() == [[7]]
    assert metrics.iou(intersection, union)[0, 0] == pytest.approx(1 / 7)
    assert np.isnan(metrics.iou(np.zeros((1, 1)), np.zeros((1, 1))))[0, 0]


def _grid(steps: int = 1, size: int = 8) -> np.ndarray:
    return np.zeros((steps, 1, size, size), dtype=np.int64)


def test_vpq_of_one_step_by_hand():
    truth, predicted = _grid(), _grid()
    truth[0, 0, 0:2, 0:2] = 1  # instance 1: 4 cells
    predicted[0, 0, 0:2, 0:2] = 7
    predicted[0, 0, 2, 0] = 7  # 5 cells, 4 shared: IoU 4/5 → true positive
    truth[0, 0, 5:7, 5:7] = 2  # missed: false negative
    predicted[0, 0, 5, 0:3] = 9  # nothing there: false positive
    truth[0, 0, 0:2, 5:7] = 3
    predicted[0, 0, 0, 5:7] = 4  # IoU 2/4 = 0.5 is not above 0.5: a false positive and a false negative
    counts = metrics.vpq_counts(predicted, truth)
    assert counts.true_positives.tolist() == [[1]]
    assert counts.false_positives.tolist() == [[2]] and counts.false_negatives.tolist() == [[2]]
    per_step, overall = counts.vpq()
    assert per_step[0, 0] == pytest.approx(0.8 / (1 + 1 + 1))
    assert overall[0] == pytest.approx(per_step[0, 0])


def test_vpq_counts_an_id_switch_as_a_false_positive_and_a_false_negative():
    truth, predicted = _grid(3), _grid(3)
    truth[:, 0, 2:4, 2:4] = 5  # one object, still, three steps
    predicted[0, 0, 2:4, 2:4] = 1
    predicted[1, 0, 2:4, 2:4] = 2  # perfect mask, new id: a switch
    predicted[2, 0, 2:4, 2:4] = 2  # consistent with step 1 again
    counts = metrics.vpq_counts(predicted, truth)
    assert counts.true_positives[:, 0].tolist() == [1, 0, 1]
    assert counts.false_positives[:, 0].tolist() == [0, 1, 0]
    assert counts.false_negatives[:, 0].tolist() == [0, 1, 0]
    per_step, overall = counts.vpq()
    assert per_step[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert overall[0] == pytest.approx(2 / 3)  # (1 + 0 + 1) / (1 + 1 + 1)
    summed = counts + counts
    assert summed.vpq()[1][0] == pytest.approx(2 / 3) and summed.true_positives.sum() == 4
    empty = metrics.vpq_counts(_grid(), _grid())
    assert np.isnan(empty.vpq()[0]).all()


def test_connected_instances_link_over_time_by_overlap():
    occupied = np.zeros((3, 1, 8, 8), bool)
    occupied[0, 0, 0:2, 0:3] = True  # A
    occupied[0, 0, 5:7, 5:7] = True  # B
    occupied[1, 0, 0:2, 1:4] = True  # A moved one column: overlaps A
    occupied[1, 0, 4:6, 0:2] = True  # C, new
    occupied[2, 0, 0:2, 1:3] = True  # A again, shrunk: overlaps A at step 1
    occupied[2, 0, 3, 1:4] = True  # below, overlapping nothing at step 1: new
    labels = metrics.connected_instances(occupied)
    a0, b0 = labels[0, 0, 0, 0], labels[0, 0, 5, 5]
    assert a0 > 0 and b0 > 0 and a0 != b0
    assert set(np.unique(labels[0, 0])) == {0, a0, b0}
    assert (labels[1, 0][occupied[1, 0, :, :]] > 0).all()
    assert labels[1, 0, 0, 3] == a0  # moved A keeps its id
    c1 = labels[1, 0, 4, 0]
    assert c1 not in (0, a0, b0)
    assert labels[2, 0, 0, 1] == a0 and labels[2, 0, 3, 1] not in (0, a0, b0, c1)


def test_connected_instances_give_a_split_id_to_the_larger_part():
    occupied = np.zeros((2, 1, 4, 8), bool)
    occupied[0, 0, 1, 0:7] = True  # one bar of 7 cells
    occupied[1, 0, 1, 0:2] = True  # splits into 2 cells ...
    occupied[1, 0, 1, 3:7] = True  # ... and 4 cells: the larger overlap keeps the id
    labels = metrics.connected_instances(occupied)
    bar = labels[0, 0, 1, 0]
    assert labels[1, 0, 1, 4] == bar and labels[1, 0, 1, 0] not in (0, bar)
    # Two classes are labelled independently.
    two = np.concatenate([occupied, occupied], axis=1)
    labels = metrics.connected_instances(two)
    assert labels[0, 0, 1, 0] != labels[0, 1, 1, 0]


def test_class_labels_split_an_instance_map_by_class():
    occupancy = np.zeros((1, 2, 4, 4), bool)
    instances = np.zeros((1, 4, 4), np.int64)
    instances[0, 0, :2] = 1
    occupancy[0, 0, 0, :2] = True  # instance 1 is class 0
    instances[0, 3, :3] = 2
    occupancy[0, 1, 3, :3] = True  # instance 2 is class 1
    occupancy[0, 0, 3, 0] = True  # one of its cells is also class 0 (boxes overlap): majority keeps it class 1
    labels = metrics.class_labels(occupancy, instances)
    assert labels[0, 0].tolist() == [[1, 1, 0, 0], [0] * 4, [0] * 4, [0] * 4]
    assert labels[0, 1, 3].tolist() == [2, 2, 2, 0] and labels[0, 1, :3].sum() == 0
    forced = metrics.class_labels(occupancy, instances, np.array([-1, 1, 1]))
    assert forced[0, 0].sum() == 0 and forced[0, 1, 3].tolist() == [2, 2, 2, 0]


def test_brier_and_expected_calibration_error_by_hand():
    probabilities = np.array([0.05, 0.15, 0.95, 0.95]).reshape(1, 1, 2, 2)
    target = np.array([0, 1, 1, 0], bool).reshape(1, 1, 2, 2)
    error, cells = metrics.brier_counts(probabilities, target)
    assert cells.tolist() == [[4]]
    assert error[0, 0] / cells[0, 0] == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.95**2) / 4)
    counts = metrics.calibration_counts(probabilities, target, bins=10)
    assert counts.shape == (1, 10, 3) and counts[0, :, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    # Bins: {0.05: 0}, {0.15: 1}, {0.95, 0.95: 1 of 2}: (0.05 + 0.85 + |1.9 - 1|) / 4.
    assert metrics.expected_calibration_error(counts)[0] == pytest.approx((0.05 + 0.85 + 0.9) / 4)
    # Probability 1 falls in the last bin; a perfect 0/1 map is perfectly calibrated.
    exact = metrics.calibration_counts(target.astype(float), target)
    assert exact[0, -1, 0] == 2 and metrics.expected_calibration_error(exact)[0] == 0.0
    assert np.isnan(metrics.expected_calibration_error(np.zeros((10, 3))))


def test_connected_instances_where_consecutive_steps_share_no_cell():
    occupied = np.zeros((2, 1, 6, 6), dtype=bool)
    occupied[0, 0, 0:2, 0:2] = True
    occupied[1, 0, 4:6, 4:6] = True  # the component moved away: no shared cell, so a new id
    labels = metrics.connected_instances(occupied)
    assert set(np.unique(labels[0])) == {0, 1} and set(np.unique(labels[1])) == {0, 2}
