"""Checkpoints: weights as safetensors, everything else as JSON; loading never unpickles.

A run folder holds:

    config.json            the resolved ``ExperimentConfig``
    model.safetensors      the model's state (online and target encoders, predictor, heads)
    optimizer.safetensors  the optimizer's tensors (for --resume)
    state.json             step, optimizer hyper-parameters, RNG seeds, the config hash, the metrics so far
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bevjepa.prediction import config as experiment_config
from bevjepa.prediction import model

FORMAT = "bevjepa-checkpoint"
FORMAT_VERSION = 1


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
    _atomic(run / "config.json", lambda p: p.write_text(json.dumps(experiment_config.to_dict(config), indent=1)))
    weights = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    _atomic(run / "model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": FORMAT}))
    groups = []
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        _atomic(run / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
    full_state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": config.content_hash(),
        "param_groups": groups,
        **state,
    }
    _atomic(run / "state.json", lambda p: p.write_text(json.dumps(full_state, indent=1)))


def load_config(run: Path) -> experiment_config.ExperimentConfig:
    """The configuration of a run folder."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run} is not a bevjepa run folder (train one with `bevjepa train --out RUN`)"
        )
    return experiment_config.from_dict(experiment_config.ExperimentConfig, json.loads(path.read_text()))


def load_state(run: Path) -> dict:
    """The run's ``state.json``, checked for format."""
    path = Path(run) / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} holds no checkpoint yet")
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {FORMAT_VERSION} checkpoint")
    return state


def load_model(
    run: Path, device: str | torch.device = "cpu"
) -> tuple[experiment_config.ExperimentConfig, model.BevJepa]:
    """Rebuild the model of a run folder from its config and weights (eval mode)."""
    config = load_config(run)
    load_state(run)
    net = model.BevJepa(config.model)
    try:
        net.load_state_dict(load_file(str(Path(run) / "model.safetensors"), device=str(device)))
    except RuntimeError as error:  # the weights of another version of the model
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(
            f"{Path(run) / 'model.safetensors'} does not fit this version of the model (written by an earlier "
            f"bevjepa?); retrain the run. {first}"
        ) from error
    return config, net.to(device).eval()


def load_optimizer(run: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore an optimizer's state from a run folder."""
    state = load_state(run)
    tensors = load_file(str(Path(run) / "optimizer.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    groups = state["param_groups"]
    current = optimizer.state_dict()
    for saved, live in zip(groups, current["param_groups"], strict=True):
        saved["params"] = live["params"]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


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
