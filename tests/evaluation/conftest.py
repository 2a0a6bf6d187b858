"""Fixtures of the evaluation tests: a direct-baseline run beside ``tiny_checkpoint``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_direct_checkpoint(synthetic_windows: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of the ``direct`` baseline trained one step on ``synthetic_windows`` (shared: do not write)."""
    import dataclasses

    from bevjepa.prediction import config as experiment_config
    from bevjepa.prediction import train

    preset = experiment_config.direct()
    settings = {"steps": 1, "val_every": 1, "val_batches": 1, "loader_workers": 0}
    config = dataclasses.replace(preset, train=dataclasses.replace(preset.train, **settings))
    run = tmp_path_factory.mktemp("tiny-direct") / "run"
    train.train(synthetic_windows, run, config, progress=False)
    return run
