"""A single node's disk tier under faults that need processes or root: a process
killed inside a disk write or restarted on its tier, two processes on one tier,
a file system that fills up or refuses O_DIRECT (a small tmpfs or ramfs, root).
(Bad input and corruption in one process: tests/unit/test_faults.py.)"""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from discovery.records import Tier
from kvbm.connector.direct import onboard
from kvbm.disk_pool import PAGE, DiskPool
from kvbm.errors import DiskTierError
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from tests.harness.support import (
    DISK_KEY,
    GEOMETRY,
    Engine,
    fill_up,
    flip_byte,
    keys,
    push_to_disk,
    slot_offset,
    store,
)


# -- a disk that fills up --------------------------------------------------
def test_disk_tier_larger_than_the_file_system_is_a_clear_error(small_tmpfs):
    d = small_tmpfs(1 << 20)
    with pytest.raises(DiskTierError, match=r"no room .* lower the disk cache size"):
        DiskPool(GEOMETRY, d, 8 << 20, mac_key=DISK_KEY)
    assert os.listdir(d) == [] or os.path.getsize(os.path.join(d, os.listdir(d)[0])) == 0


def test_disk_filling_up_rejects_blocks_and_nothing_else_breaks(make_manager, small_tmpfs):
    d = small_tmpfs(1 << 20)
    # a thin-provisioned disk tier of 32 slots (528 KiB) on a 1 MiB file system ...
    mgr = make_manager(host_slots=4, disk_slots=32, disk_dir=d, preallocate=False)
    early = keys(0, 2)
    push_to_disk(mgr, early)
    # ... which something else then fills
    fill_up(d)
    late = keys(100, 4)
    store(mgr, late)
    # evicting `late` now fails to write (then the tier takes no writes for a
    # while): rejected, counted, no exception
    assert store(mgr, keys(200, 4)) == 4

    def rejected(reason: str) -> float:
        return mgr.metrics.value("kvbm_tier_admissions_rejected_total", tier="disk", reason=reason)

    assert rejected("io_error") >= 1
    assert rejected("io_error") + rejected("no_space") >= 4
    assert mgr.lookup(late).num_blocks == 0
    # G2 keeps serving
    assert mgr.lookup(keys(200, 4)).tiers == (Tier.HOST,) * 4
    # and the blocks written before the disk filled still load, bit-exact
    eng = Engine(2)
    assert onboard(mgr, eng.kv, early, [0, 1]) == 2
    assert eng.holds(early[0], 0) and eng.holds(early[1], 1)
    mgr.host.table.check()
    mgr.disk.table.check()


# -- restart ---------------------------------------------------------------
def _write_then_exit(directory: str, kill: bool) -> None:
    """Child process: fill G3 through the real drain path, then exit or die."""
    g = GEOMETRY
    host = HostPool(g, 4 * g.slot_bytes)
    disk = DiskPool(g, directory, PAGE + 16 * (PAGE + g.slot_bytes), mac_key=DISK_KEY)
    mgr = BlockManager(g, host, disk, admission=None)
    mgr.admission.min_count = 1
    push_to_disk(mgr, keys(0, 6))
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()


def _die_in_a_disk_write(directory: str, when: str) -> None:
    """Child process: six blocks drained to G3, then SIGKILL inside the next
    drain's disk write: halfway through its data ("mid-data"), or with its
    data written and its headers not ("before-headers")."""
    g = GEOMETRY
    host = HostPool(g, 4 * g.slot_bytes)
    disk = DiskPool(g, directory, PAGE + 16 * (PAGE + g.slot_bytes), mac_key=DISK_KEY)
    mgr = BlockManager(g, host, disk, admission=None)
    mgr.admission.min_count = 1
    push_to_disk(mgr, keys(0, 6))  # the four fillers stay in G2
    if when == "mid-data":

        def half_then_die(first: int, piece: list, host_pool: HostPool) -> list:
            data = memoryview(host_pool.slot_buffer(piece[0].src))
            half = data[: len(data) // 2]  # still aligned for O_DIRECT
            assert os.pwritev(disk.fd, [half], disk.data_offset(first)) == len(half)
            os.kill(os.getpid(), signal.SIGKILL)
            return []

        disk._write_data = half_then_die  # type: ignore[method-assign]
    else:
        disk._write_headers = lambda *_: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
    store(mgr, keys(20, 4))  # drains the fillers: the write the process dies in


@pytest.mark.parametrize("when", ["mid-data", "before-headers"])
def test_a_process_killed_inside_a_disk_write_recovers_only_whole_blocks(
    tmp_path, make_manager, when
):
    """Deterministic: the kill lands inside the write, not after it. The
    blocks of that write have no header yet (headers go after data), so a
    restart recovers the six earlier blocks, bit-exact, and nothing else."""
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_die_in_a_disk_write, args=(str(tmp_path), when))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    mgr = make_manager(host_slots=8, disk_slots=16, disk_dir=tmp_path)
    assert mgr.disk.recovered == 6
    assert mgr.lookup(keys(10_000, 4)).num_blocks == 0  # the fillers never landed
    ks = keys(0, 6)
    eng = Engine(6)
    assert onboard(mgr, eng.kv, ks, list(range(6))) == 6
    assert all(eng.holds(k, i) for i, k in enumerate(ks))


@pytest.mark.parametrize("kill", [False, True], ids=["clean-exit", "sigkill"])
def test_restarted_process_recovers_and_verifies_disk_blocks(tmp_path, make_manager, kill):
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_write_then_exit, args=(str(tmp_path), kill))
    child.start()
    child.join(60)
    assert child.exitcode == (-signal.SIGKILL if kill else 0)
    # a new process on the same directory finds the blocks and loads them bit-exact
    mgr = make_manager(host_slots=8, disk_slots=16, disk_dir=tmp_path)
    assert mgr.disk.recovered == 6
    ks = keys(0, 6)
    assert mgr.lookup(ks).tiers == (Tier.DISK,) * 6
    eng = Engine(6)
    assert onboard(mgr, eng.kv, ks[:3], [0, 1, 2]) == 3
    assert all(eng.holds(k, i) for i, k in enumerate(ks[:3]))
    # corrupt a recovered block on disk -> its load is refused by the checksum
    flip_byte(mgr.disk.path, slot_offset(mgr, ks[4]) + 5)
    assert onboard(mgr, eng.kv, ks[3:], [3, 4, 5]) == 1
    assert eng.holds(ks[3], 3)
    assert mgr.metrics.value("kvbm_tier_checksum_failures_total", tier="disk") == 1


def test_page_cache_fallback_where_o_direct_is_refused(make_manager, small_tmpfs):
    # ramfs refuses O_DIRECT: the tier still works, through the page cache
    mgr = make_manager(host_slots=4, disk_slots=8, disk_dir=small_tmpfs(0, fs="ramfs"))
    assert mgr.disk.direct_io is False
    push_to_disk(mgr, keys(0, 2))
    eng = Engine(2)
    assert onboard(mgr, eng.kv, keys(0, 2), [0, 1]) == 2
    assert eng.holds(keys(0, 2)[1], 1)


def _hold_disk(directory: str, conn) -> None:
    """Child process: open the disk tier, say so, hold it until killed."""
    DiskPool(GEOMETRY, directory, PAGE + 8 * (PAGE + GEOMETRY.slot_bytes), mac_key=DISK_KEY)
    conn.send("open")
    conn.recv()


def test_two_processes_never_share_one_disk_file(tmp_path):
    """Another process holds the disk tier: a second one pointed at the same
    directory is refused; once the holder is SIGKILLed its lock goes with it
    and the directory is usable again."""
    ctx = multiprocessing.get_context("spawn")
    parent, child_end = ctx.Pipe()
    holder = ctx.Process(target=_hold_disk, args=(str(tmp_path), child_end))
    holder.start()
    try:
        assert parent.poll(60) and parent.recv() == "open"
        with pytest.raises(DiskTierError, match="in use by another kvbm process"):
            DiskPool(
                GEOMETRY, str(tmp_path), PAGE + 8 * (PAGE + GEOMETRY.slot_bytes), mac_key=DISK_KEY
            )
    finally:
        holder.kill()
        holder.join(10)
    DiskPool(
        GEOMETRY, str(tmp_path), PAGE + 8 * (PAGE + GEOMETRY.slot_bytes), mac_key=DISK_KEY
    ).close()
