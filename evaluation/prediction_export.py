"""Forecasts as nuScenes prediction-challenge submissions, scored by the devkit's own code.

A submission is a JSON list of ``nuscenes.eval.prediction.data_classes.Prediction.serialize()`` records, one per
(agent, sample): ``{"instance": token, "sample": token, "prediction": [K, T, 2] global xy (m),
"probabilities": [K]}``, what ``nuscenes/eval/prediction/compute_metrics.py`` reads. Forecasts are made in the
t0 ego frame; ``global_xy`` moves them to the global frame with the t0 pose of the window's stored frame
(``WindowDataset.frame(scene, sample_token).global_from_ego``). Trajectories are planar, so each point is lifted
at the agent's t0 height before the move (on a tilted ego pose the height enters the global xy).

Notation:
    A  agents     K  modes (at most 25, the devkit's limit)     T  steps (0.5 s)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from nuscenes.eval.prediction.data_classes import Prediction
from torch.utils.data import DataLoader

from bevjepa.datasets import io as bevio
from bevjepa.datasets import torch_dataset
from bevjepa.evaluation import baselines, open_loop
from bevjepa.prediction import forecaster, train

SUBMISSION_FILE = "prediction_submission.json"
"""The file name `bevjepa eval` gives the prediction challenge's submission."""
SOURCES = ("model", "constant_velocity", "ctrv", "persistence")
"""What ``export`` can write: the model of a run, or a trajectory baseline."""


def global_xy(xy: np.ndarray, global_from_ego: np.ndarray, z_m: np.ndarray | float = 0.0) -> np.ndarray:
    """Points of the t0 ego frame in the global frame.

    Args:
        xy: [..., 2] float — x, y (m, t0 ego frame).
        global_from_ego: [4, 4] float — the t0 ego pose.
        z_m: height (m, t0 ego frame) of the points, broadcast against ``xy[..., 0]``.

    Returns:
        [..., 2] float64 global x, y (m).
    """
    xy = np.asarray(xy, dtype=np.float64)
    pose = np.asarray(global_from_ego, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"global_from_ego: expected shape (4, 4), got {pose.shape}")
    z = np.broadcast_to(np.asarray(z_m, dtype=np.float64), xy.shape[:-1])
    points = np.stack([xy[..., 0], xy[..., 1], z], axis=-1)  # [..., 3]
    return (points @ pose[:3, :3].T + pose[:3, 3])[..., :2]


def to_predictions(
    instance_tokens: list[str] | np.ndarray,
    sample_token: str,
    trajectories: np.ndarray,
    probabilities: np.ndarray,
    global_from_ego: np.ndarray,
    z_m: np.ndarray | None = None,
) -> list[Prediction]:
    """The devkit ``Prediction`` records of one sample's agents.

    Args:
        instance_tokens: [A] the agents' instance tokens.
        sample_token: the t0 sample.
        trajectories: [A, K, T, 2] float — x, y (m, t0 ego frame).
        probabilities: [A, K] float — mode probabilities.
        global_from_ego: [4, 4] float — the t0 ego pose.
        z_m: [A] float — the agents' t0 heights (m, t0 ego frame); None: 0.

    Returns:
        A ``Prediction`` per agent, trajectories in global xy (m).
    """
    trajectories = np.asarray(trajectories, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    A = len(instance_tokens)
    if trajectories.ndim != 4 or trajectories.shape[0] != A or probabilities.shape != trajectories.shape[:2]:
        raise ValueError(
            f"sample {sample_token}: trajectories [A, K, T, 2] and probabilities [A, K] with A={A} expected, got "
            f"{list(trajectories.shape)} and {list(probabilities.shape)}"
        )
    z = np.zeros(A) if z_m is None else np.asarray(z_m, dtype=np.float64)
    moved = global_xy(trajectories, global_from_ego, z[:, None, None])  # [A, K, T, 2]
    return [
        Prediction(str(token), str(sample_token), moved[a], probabilities[a]) for a, token in enumerate(instance_tokens)
    ]


def write_predictions(predictions: list[Prediction], path: Path) -> None:
    """Write a submission JSON atomically (a temporary file in the same folder, then a rename)."""
    bevio.atomic_write_json(Path(path), [p.serialize() for p in predictions], indent=None)


def read_predictions(path: Path) -> list[Prediction]:
    """Read a submission JSON as devkit ``Prediction`` records.

    Raises:
        ValueError: the file is not a JSON list of prediction records (the error names the file and the record).
    """
    path = Path(path)
    content = json.loads(path.read_text())
    if not isinstance(content, list):
        raise ValueError(f"{path}: a prediction submission is a JSON list of records, got {type(content).__name__}")
    records = []
    for i, record in enumerate(content):
        try:
            records.append(Prediction.deserialize(record))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: record {i} is not a nuScenes prediction ({error})") from error
    return records


def export(
    data: Path,
    split: str,
    out: Path,
    source: str = "constant_velocity",
    run: Path | None = None,
    trajectory_seconds: float | None = None,
    batch_size: int = 4,
) -> list[Prediction]:
    """Write the predictions of ``source`` for the agents ``open_loop.evaluate`` scores, and return them.

    Args:
        data: a ``bevjepa preprocess`` output.
        split: a devkit split or ``all``.
        out: the submission JSON to write.
        source: one of ``SOURCES``; ``model`` needs ``run``.
        run: a run folder.
        trajectory_seconds: the horizon (s); None: the windows' T steps (6 s: the challenge's).
        batch_size: windows per model forward.

    Returns:
        The records written, in window order, agents in window order.
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: choose one of {SOURCES}")
    if source == "model" and run is None:
        raise ValueError("source 'model' needs a run folder (run=...)")
    dataset = torch_dataset.WindowDataset(data, scenes=train.split_scenes(data, split))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=torch_dataset.collate)
    model = forecaster.Forecaster.from_checkpoint(run, agents="annotated") if source == "model" else None
    window_steps = int(dataset.config["window"]["trajectory_steps"])
    steps = window_steps if trajectory_seconds is None else round(trajectory_seconds / baselines.STEP_S)
    predictions: list[Prediction] = []
    with torch.no_grad():
        for batch in loader:
            forecasts = model.forecast_batch(batch) if model is not None else None
            for b in range(batch.batch_size):
                count = int(batch.agent_mask[b].sum())
                full = open_loop.scored_agents(batch.agent_future_mask[b, :count].numpy(), steps)
                box = batch.agent_box[b, :count].numpy().astype(np.float64)
                if forecasts is not None:
                    modes = forecasts[b].trajectories[:, :, :steps]
                    probabilities = forecasts[b].mode_probabilities
                else:
                    past = batch.agent_past[b, :count].numpy().astype(np.float64)
                    past_mask = batch.agent_past_mask[b, :count].numpy()
                    velocity = baselines.agent_velocities(batch.agent_velocity[b, :count].numpy(), past, past_mask)
                    if source == "ctrv":
                        yaw_rate = baselines.yaw_rate_from_past(past, past_mask)
                        modes = baselines.ctrv_trajectories(box[:, :2], velocity, yaw_rate, steps)
                    else:
                        moving = velocity if source == "constant_velocity" else np.zeros_like(velocity)
                        modes = baselines.constant_velocity_trajectories(box[:, :2], moving, steps)
                    probabilities = np.ones((count, 1))
                pose = dataset.frame(batch.scene_names[b], batch.sample_tokens[b]).global_from_ego
                predictions += to_predictions(
                    np.asarray(batch.agent_ids[b])[full],
                    batch.sample_tokens[b],
                    modes[full],
                    probabilities[full],
                    pose,
                    box[full, 2],
                )
    write_predictions(predictions, out)
    return predictions
