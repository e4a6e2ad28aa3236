"""Fixtures: real host and disk pools, closed after each test, a small tmpfs
for a disk that really fills up, a real etcd, and `kvbm node` daemons."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvbm.admission import FrequencyFilter
from kvbm.config import quiet_native_logs
from kvbm.disk_pool import DiskPool
from kvbm.host_pool import HostPool
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager
from tests.harness.node_daemon import TEST_FLEET_SECRET, Daemon
from tests.harness.root import need_root
from tests.harness.support import DISK_KEY, GEOMETRY
from tests.harness.support_marks import MARK, Cell

quiet_native_logs()  # for the NIXL agents tests create in their own process
# the test fleet's operator secret, for what tests run on etcd (`kvbm status`,
# nodes started otherwise than through `daemons`); `daemons` decides per node
os.environ["KVBM_SECRET"] = TEST_FLEET_SECRET


# The longest modules (on 4 workers, 2026-12-07), started first: `scripts/test`
# hands whole modules to its workers in this order, the rest in file order.
FIRST = (
    "tests/system/test_vllm_connector.py",
    "tests/system/test_vllm_identity.py",
    "tests/system/test_vllm_models.py",
    "tests/system/faults/test_peer_killed.py",
    "tests/system/faults/test_soak.py",
)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARK}(architecture, feature, proof, refused=None): the cell of docs/models.md's "
        "support matrix this test proves (tests/harness/support_marks.py)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    """A support mark outside the matrix's vocabulary stops the run (the
    matrix would not show it). Across workers (pytest-xdist's `-n`), the
    longest modules go first, so none of them is the last to start."""
    for item in items:
        for mark in item.iter_markers(MARK):
            try:
                Cell(*mark.args, **mark.kwargs)
            except (TypeError, ValueError) as e:
                raise pytest.UsageError(f"{item.nodeid}: support mark: {e}") from e
    if getattr(config.option, "numprocesses", None):
        rank = {path: i for i, path in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(FIRST)))


@pytest.fixture
def make_manager(tmp_path) -> Iterator:
    """make_manager(host_slots, disk_slots=0, min_uses=1, **disk_kwargs) -> BlockManager,
    closed after the test."""
    made: list[BlockManager] = []

    def make(
        host_slots: int,
        disk_slots: int = 0,
        min_uses: int = 1,
        disk_dir=None,
        geometry: ModelGeometry = GEOMETRY,
        **disk_kwargs,
    ) -> BlockManager:
        g = geometry
        host = HostPool(g, host_slots * g.slot_bytes)
        disk = None
        if disk_slots:
            size = 4096 + disk_slots * (4096 + g.slot_bytes)
            disk_kwargs.setdefault("mac_key", DISK_KEY)
            disk = DiskPool(g, str(disk_dir or tmp_path / "g3"), size, **disk_kwargs)
        mgr = BlockManager(g, host, disk, FrequencyFilter(min_count=min_uses))
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        with contextlib.suppress(Exception):
            mgr.close()


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator:
    """small_tmpfs(size_bytes) -> a directory on a tmpfs of that size: a disk that
    really fills up (fs="ramfs": one that refuses O_DIRECT). Needs root, as CI has."""
    mounts: list[str] = []

    def make(size: int, fs: str = "tmpfs") -> str:
        need_root("mounts a small file system")
        path = tmp_path / f"{fs}{len(mounts)}"
        path.mkdir()
        opts = ["-o", f"size={size},mode=0700" if fs == "tmpfs" else "mode=0700"]
        subprocess.run(["mount", "-t", fs, *opts, fs, str(path)], check=True)
        mounts.append(str(path))
        return str(path)

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", path], check=False)


@pytest.fixture
def etcd() -> Iterator:
    """A real etcd server of its own, wiped and stopped after the test."""
    from discovery.etcd_server import EtcdServer

    with EtcdServer() as server:
        yield server


@pytest.fixture
def daemons(tmp_path) -> Iterator[Callable[..., Daemon]]:
    """daemons(name, host, *flags, command=, env=) -> a running `kvbm node`
    (`Daemon`), stopped after the test."""
    started: list[Daemon] = []

    def start(name: str, host: str, *flags: str, **how: Any) -> Daemon:
        started.append(Daemon(tmp_path, name, host, *flags, **how))
        return started[-1]

    yield start
    for d in started:
        d.stop()
