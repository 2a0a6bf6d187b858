"""The worker pools, and the project's one way to start Ray: local Ray listens on loopback only, with no dashboard."""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

from bevjepa.datasets import workers


def _square(value: int) -> int:
    return value * value


def _ray_process_tree() -> dict[int, str]:
    """This process and all its descendants (Ray's GCS server, raylet, agents and workers): pid -> command line."""
    tree = {}
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            tree[process.pid] = " ".join(process.cmdline()) or process.name()
        except psutil.NoSuchProcess:
            continue
    return tree


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_make_pool_runs_one_worker_here_and_refuses_none():
    for address in (None, ""):
        pool = workers.make_pool(1, address)
        assert isinstance(pool, workers.SequentialPool)
        pool.close()  # does nothing, as a caller may close any pool
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        workers.make_pool(0)


def test_the_ray_pool_gives_the_sequential_results_listens_on_loopback_only_and_starts_no_dashboard():
    """One local Ray (starting it is most of the time) for both: the pools agree, and Ray exposes nothing."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        pytest.fail("Ray is already running in this test process; a test before this one did not shut it down")
    mode_before, env_before = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    items = list(range(7))
    sequential = sorted(workers.make_pool(1).map_unordered(_square, items))
    pool = workers.make_pool(2)  # more than one worker: Ray, started through workers.init_ray
    assert isinstance(pool, workers.RayPool)
    try:
        on_ray = sorted(pool.map_unordered(_square, items))
        assert on_ray == sequential == [(i, i * i) for i in items]
        tree = _ray_process_tree()
        # The workers run at this process's priority, not Ray's default of 15 below it.
        niceness = {pid: psutil.Process(pid).nice() for pid, command in tree.items() if command.startswith("ray::")}
        assert niceness and set(niceness.values()) == {psutil.Process().nice()}, (niceness, tree)
        assert os.environ.get("RAY_worker_niceness") is None  # the caller's environment as it was
        listeners = [
            (tree[c.pid], c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in tree
        ]
        # The GCS server, the raylet and the workers do listen (so this test sees them) ...
        assert any("gcs_server" in command for command, _, _ in listeners), listeners
        assert any("raylet" in command for command, _, _ in listeners), listeners
        assert len(listeners) >= 4, listeners
        # ... and every listener of the whole Ray process tree is on loopback.
        exposed = [(command[:80], ip, port) for command, ip, port in listeners if not _is_loopback(ip)]
        assert exposed == []
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        # No dashboard: no web UI address, and Ray's head process for usage statistics (dashboard.py --minimal
        # --disable-frontend, which Ray always starts) serves nothing.
        assert ray._private.worker.global_worker.node.webui_url in ("", None)
        assert not [port for command, _, port in listeners if "dashboard.py" in command or port == 8265]
        # Joining a running Ray neither starts another nor takes ownership of it.
        assert workers.init_ray(2) is False
        # The single-machine switch was this process's only while Ray started.
        assert ray_constants.ENABLE_RAY_CLUSTER == mode_before
        assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == env_before
    finally:
        pool.close()
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match="at least 1"):
        workers.start_local_ray(0)
