"""Data-parallel training on Ray Train: one ``TorchTrainer`` worker per process, DDP over gloo on CPUs.

Every worker runs ``train.training_loop`` with ``distributed=True``: the model is wrapped in
``DistributedDataParallel``, the training data sharded by a ``DistributedSampler``; the worker of rank 0 validates
and writes the checkpoints into the run folder, which must be on storage that it can reach.
"""

from __future__ import annotations

from pathlib import Path

from bevjepa.datasets import io as bevio
from bevjepa.datasets import workers as worker_pools
from bevjepa.prediction import config as experiment_config
from bevjepa.prediction import train


def _worker(settings: dict) -> None:
    config = experiment_config.from_dict(experiment_config.ExperimentConfig, settings["config"])
    train.training_loop(
        Path(settings["data"]), Path(settings["run"]), config, settings["resume"], progress=False, distributed=True
    )


def train_on_ray(
    data: Path,
    run: Path,
    config: experiment_config.ExperimentConfig,
    address: str | None,
    workers: int = 2,
    resume: bool = False,
) -> train.TrainSummary:
    """Train with ``workers`` Ray Train workers on the cluster at ``address`` (``local``: start Ray here).

    Ray is started or joined through ``datasets.workers.init_ray`` (a local Ray listens on loopback only); one that
    already runs in this process is used and left running.
    """
    import time

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bevjepa.prediction import checkpoint

    # Claimed here, before Ray Train writes its own records into run/ray, so that rank 0 finds it this job's own.
    bevio.claim_output_folder(Path(run), "train", own_files=checkpoint.is_run_folder)
    started_here = worker_pools.init_ray(workers, address)  # local: loopback only, no dashboard
    start = time.perf_counter()
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "data": str(Path(data).absolute()),
                "run": str(Path(run).absolute()),
                "config": experiment_config.to_dict(config),
                "resume": resume,
            },
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(Path(run).absolute() / "ray"), name="train"),
        )
        trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    state = checkpoint.load_state(run)
    last = state["history"][-1] if state.get("history") else {"train": {}, "val": {}}
    return train.TrainSummary(Path(run), state["step"], time.perf_counter() - start, 0.0, last["train"], last["val"])
