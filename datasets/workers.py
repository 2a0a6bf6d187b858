"""Worker pools behind one small interface, and the one place where the project starts or joins Ray.

The pools run a function over items sequentially or as Ray tasks; ``init_ray`` starts or joins Ray for them and
for everything else in the project that uses Ray.

Unit tests of the work itself need no Ray; one test runs the same job through both pools and compares outputs.

Ray that the project starts for local work listens on loopback only and starts no dashboard. Ray chooses one
"node IP address" and every listener follows it: the GCS server, the raylet, each worker's and the driver's gRPC
server bind to 127.0.0.1 when it is loopback and to all interfaces otherwise (the runtime-env and dashboard agents
likewise). On Linux ``ray.init`` never picks loopback by itself: it replaces a ``_node_ip_address`` of
``127.0.0.1`` with the address it would use to reach other machines (``services.resolve_ip_for_localhost``). Only
Ray's single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by ``ray_constants.ENABLE_RAY_CLUSTER``,
the default on macOS and Windows) makes it use 127.0.0.1, so ``start_local_ray`` switches that mode on while Ray
starts. A cluster run (``--address``) joins the cluster as the user set it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
"""Where a locally started Ray may listen."""

_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between cluster mode (node IP reachable from other machines) and single-machine mode (loopback)."""

_WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""The niceness the raylet adds to the worker processes it starts (Ray's default: 15)."""


def start_local_ray(num_cpus: int) -> None:
    """Start Ray on this machine for local work: ``num_cpus`` CPUs, no dashboard, every listener on loopback.

    Ray's processes (GCS server, raylet, workers, agents) inherit the single-machine switch, so they all use
    127.0.0.1; this process's own setting is restored afterwards, so that a later ``init_ray(address=...)`` in the
    same process joins a cluster as usual.

    The workers run at this process's priority (``RAY_worker_niceness`` 0 unless the caller set it). Ray's
    default of 15 suits a cluster whose workers share a node with its control processes. Here the workers do
    the job's own work, and at 15 any other busy process on the machine starves them: at the default, the
    closed-loop crash test took 17 s with one of 2 cores busy and 183 s with both busy.

    Raises:
        ValueError: ``num_cpus`` is below 1, or Ray is already running in this process.
        RuntimeError: Ray started on an address other than loopback (a Ray version that no longer honours the
            switch); Ray is shut down again before this is raised.
    """
    import ray
    from ray._private import ray_constants  # the switch as services.get_node_ip_address reads it

    if num_cpus < 1:
        raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
    if ray.is_initialized():
        raise ValueError("Ray is already running in this process; call ray.shutdown() first or use init_ray")
    previous_env = {name: os.environ.get(name) for name in (_SINGLE_MACHINE_ENV, _WORKER_NICENESS_ENV)}
    previous_mode = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    os.environ.setdefault(_WORKER_NICENESS_ENV, "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_mode
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    node_ip = context.address_info.get("node_ip_address")
    if node_ip not in LOOPBACK_ADDRESSES:
        ray.shutdown()
        raise RuntimeError(
            f"Ray {ray.__version__} started on {node_ip}, not on loopback, so it would listen on every interface; "
            "it was shut down again. Start Ray yourself (ray start --head) and pass its --address, or use --workers 1"
        )


def init_ray(workers: int, address: str | None = None) -> bool:
    """Make Ray ready for a job: join ``address``, or start it locally with ``workers`` CPUs (``start_local_ray``).

    Args:
        workers: CPUs of a local Ray (ignored when joining a cluster).
        address: a Ray cluster (``auto``, ``host:port``, ``ray://...``) to join as the user set it up; None, ``""``
            or ``local`` start Ray on this machine, listening on loopback only.

    Returns:
        True if this call started or joined Ray (the caller shuts it down when done); False if Ray was already
        running in this process (it is used as it is and left running).
    """
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        start_local_ray(workers)
    else:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return True


Item = TypeVar("Item")
Result = TypeVar("Result")


class WorkerPool(Protocol):
    """Maps a function over items, yielding ``(index, result)`` as each finishes (any order)."""

    def map_unordered(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[tuple[int, Result]]:
        """Run ``fn`` on every item."""
        ...

    def close(self) -> None:
        """Release what the pool holds (a Ray it started)."""
        ...


class SequentialPool:
    """Runs everything in this process, in order."""

    def map_unordered(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[tuple[int, Result]]:
        """Run ``fn`` on every item, one after the other."""
        for index, item in enumerate(items):
            yield index, fn(item)

    def close(self) -> None:
        """Nothing to release (as ``RayPool.close``, so that a caller may close any pool)."""


class RayPool:
    """Runs one Ray task per item on a local Ray instance (``workers`` CPUs) or an existing cluster (``address``).

    Ray is started or joined by ``init_ray`` (local: loopback only, no dashboard) unless it already runs in this
    process. A pool that started Ray shuts it down on ``close``.
    """

    def __init__(self, workers: int, address: str | None = None) -> None:
        import ray

        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._ray = ray
        self._started = init_ray(workers, address)
        self.workers = workers

    def map_unordered(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[tuple[int, Result]]:
        """Run one task per item, at most ``workers`` at a time, yielding results as tasks finish.

        A task whose worker process dies, or that raises, is retried (up to 3 times) before its error is raised here.
        """
        remote = self._ray.remote(num_cpus=1, max_retries=3, retry_exceptions=True)(_call)
        fn_ref = self._ray.put(fn)
        queue = list(enumerate(items))[::-1]
        pending: dict = {}
        while queue or pending:
            while queue and len(pending) < self.workers:
                index, item = queue.pop()
                pending[remote.remote(fn_ref, item)] = index
            done, _ = self._ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), self._ray.get(ref)

    def close(self) -> None:
        """Shut Ray down if this pool started it."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def make_pool(workers: int, address: str | None = None) -> SequentialPool | RayPool:
    """The pool of a job's ``--workers`` and ``--address``: the one place that chooses between the two.

    Args:
        workers: parallel tasks; 1 without ``address`` runs everything in this process.
        address: a Ray cluster to run on (``auto``, ``host:port``, ``ray://...``); None or ``""`` starts no cluster
            connection (a local Ray with ``workers`` CPUs when ``workers`` is above 1).

    Returns:
        ``SequentialPool()`` for one worker without an address, otherwise ``RayPool(workers, address)`` (close it
        when done; ``SequentialPool.close`` does nothing, so callers may close either).

    Raises:
        ValueError: ``workers`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1 and not address:
        return SequentialPool()
    return RayPool(workers, address)


def _call(fn: Callable[[Item], Result], item: Item) -> Result:
    return fn(item)
