"""Worker pools: run a function over items sequentially or as Ray tasks, behind one small interface.

Unit tests of the work itself need no Ray; one test runs the same job through both pools and compares outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class WorkerPool(Protocol):
    """Maps a function over items, yielding ``(index, result)`` as each finishes (any order)."""

    def map_unordered(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[tuple[int, Result]]:
        """Run ``fn`` on every item."""
        ...


class SequentialPool:
    """Runs everything in this process, in order."""

    def map_unordered(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[tuple[int, Result]]:
        """Run ``fn`` on every item, one after the other."""
        for index, item in enumerate(items):
            yield index, fn(item)


class RayPool:
    """Runs one Ray task per item on a local Ray instance (``workers`` CPUs) or an existing cluster (``address``).

    Ray is started without its dashboard. A pool that started Ray shuts it down on ``close``.
    """

    def __init__(self, workers: int, address: str | None = None) -> None:
        import ray

        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            self._started = True
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


def _call(fn: Callable[[Item], Result], item: Item) -> Result:
    return fn(item)
