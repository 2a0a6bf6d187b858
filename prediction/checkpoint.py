"""Checkpoints: weights as safetensors, everything else as JSON; loading never unpickles.

A run folder holds:

    config.json            the resolved ``ExperimentConfig``
    model.safetensors      the model's state (online and target encoders, predictor, heads)
    optimizer.safetensors  the optimizer's tensors (for --resume)
    state.json             step, optimizer hyper-parameters, RNG seeds, the config hash, the metrics so far
    occupancy_thresholds.json  the dense map's per-class decision thresholds (``bevjepa thresholds``; optional,
                           deleted when ``save`` rewrites the weights it was chosen for)
    forecast_bars.json     the forecast's bars per step and class (``bevjepa thresholds``; the same)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bevjepa.datasets import geometry, torch_dataset
from bevjepa.datasets import io as bevio
from bevjepa.prediction import config as experiment_config
from bevjepa.prediction import forecast_bars, model, occupancy_thresholds

FORMAT = "bevjepa-checkpoint"
FORMAT_VERSION = 1


def save(
    run: Path,
    config: experiment_config.ExperimentConfig,
    net: model.BevJepa,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
) -> None:
    """Write a checkpoint into ``run`` (each file atomically; ``state.json`` last, so it names a whole set)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    bevio.atomic_write_json(run / "config.json", experiment_config.to_dict(config))
    for chosen in (occupancy_thresholds.FILE, forecast_bars.FILE):  # chosen for the weights about to be replaced
        (run / chosen).unlink(missing_ok=True)
    weights = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {"format": FORMAT}
    bevio.atomic_write_with(run / "model.safetensors", lambda p: save_file(weights, str(p), metadata=metadata))
    groups = []
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        bevio.atomic_write_with(run / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
    full_state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": config.resume_hash(),
        "param_groups": groups,
        **state,
    }
    bevio.atomic_write_json(run / "state.json", full_state)


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint of this format (a run folder written before output folders were marked)."""
    try:
        return load_state(folder) is not None
    except (OSError, ValueError):
        return False


def load_config(run: Path) -> experiment_config.ExperimentConfig:
    """The configuration of a run folder."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run} is not a bevjepa run folder (train one with `bevjepa train --out RUN`)"
        )
    values = bevio.read_json_object(path, "run config")
    try:
        return experiment_config.from_dict(experiment_config.ExperimentConfig, values)  # type: ignore[return-value]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def load_state(run: Path) -> dict:
    """The run's ``state.json``, checked for format."""
    path = Path(run) / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} holds no checkpoint yet")
    state = bevio.read_json_object(path, "checkpoint state")
    if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {FORMAT_VERSION} checkpoint")
    return state


def load_model(
    run: Path, device: str | torch.device = "cpu"
) -> tuple[experiment_config.ExperimentConfig, model.BevJepa]:
    """Rebuild the model of a run folder from its config and weights (eval mode), with its occupancy thresholds."""
    config = load_config(run)
    load_state(run)
    net = model.BevJepa(config.model)
    weights = _read_tensors(Path(run) / "model.safetensors", device)
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:  # the weights of another version of the model
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(
            f"{Path(run) / 'model.safetensors'} does not fit this version of the model (written by an earlier "
            f"bevjepa?); retrain the run. {first}"
        ) from error
    net.set_occupancy_thresholds(occupancy_thresholds.OccupancyThresholds.load(run))
    return config, net.to(device).eval()


def check_windows(run: Path, config: model.ModelConfig, dataset: torch_dataset.WindowDataset) -> None:
    """Refuse windows whose grid or horizon is not the one the model of ``run`` forecasts.

    Raises:
        ValueError: another grid or horizon, naming both.
    """
    window = dataset.config["window"]
    grid, steps = geometry.GridSpec(**window["grid"]), int(window["occupancy_steps"])
    if config.grid != grid or config.occupancy_steps != steps:
        raise ValueError(
            f"{run} forecasts {config.occupancy_steps} steps on {config.grid}; the windows of {dataset.root} hold "
            f"{steps} steps on {grid}"
        )


def load_optimizer(run: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore an optimizer's state from a run folder."""
    state = load_state(run)
    tensors = _read_tensors(Path(run) / "optimizer.safetensors", "cpu")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    groups = state["param_groups"]
    current = optimizer.state_dict()
    for saved, live in zip(groups, current["param_groups"], strict=True):
        saved["params"] = live["params"]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def _read_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or damaged file is a ``ValueError`` that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run folder is incomplete; retrain or restore it")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own SafetensorError for truncated or foreign files
        raise ValueError(
            f"{path} is damaged ({type(error).__name__}: {error}); it is not a whole safetensors file: "
            "restore it or retrain the run"
        ) from None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{name}"] = tensor.detach().contiguous()
    groups = [
        {k: v for k, v in group.items() if k != "params"} | {"params": group["params"]}
        for group in state["param_groups"]
    ]
    return tensors, groups
