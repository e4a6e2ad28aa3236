"""Bad input and faults of a single node in one process: wrong geometry, bytes
corrupted on disk, disk errors, a tier reopened on an existing file. (Faults
that need processes or root: tests/system/faults/test_disk_tier_crashes.py.)"""

from __future__ import annotations

import logging
import os
import struct

import pytest
import xxhash

from discovery.tier import Tier
from kvbm.connector.direct import arena_blocks, offload, onboard
from kvbm.disk_pool import _HEADER, PAGE, SLOT_MAGIC, DiskPool
from kvbm.errors import DiskTierError, GeometryMismatch, KvbmError
from kvbm.host_pool import HostPool
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager
from tests.harness.support import (
    DISK_KEY,
    GEOMETRY,
    Engine,
    flip_byte,
    keys,
    push_to_disk,
    slot_offset,
    store,
)


# -- geometry --------------------------------------------------------------
def test_engine_of_another_geometry_is_refused(make_manager):
    mgr = make_manager(host_slots=8)
    other = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=32, block_size=32)
    eng = Engine(2, other)
    with pytest.raises(GeometryMismatch, match="does not match"):
        offload(mgr, eng.kv, [0, 1], keys(0, 2))
    with pytest.raises(GeometryMismatch):
        onboard(mgr, eng.kv, keys(0, 2), [0, 1])
    # nothing was reserved or registered by the refused calls
    assert mgr.host.table.free_count == 8
    mgr.host.table.check()


def test_tiers_of_another_geometry_are_refused(tmp_path):
    other = ModelGeometry(num_layers=4, num_kv_heads=2, head_dim=16, block_size=32)
    host = HostPool(other, 4 * other.slot_bytes)
    try:
        with pytest.raises(ValueError, match="geometry"):
            BlockManager(GEOMETRY, host)
    finally:
        host.close()


def test_bad_engine_block_ids_are_refused(make_manager):
    mgr = make_manager(host_slots=8)
    eng = Engine(2)
    with pytest.raises(ValueError, match="block ids"):
        offload(mgr, eng.kv, [0, 5], keys(0, 2))
    with pytest.raises(ValueError, match="equal length"):
        onboard(mgr, eng.kv, keys(0, 2), [0])
    assert mgr.host.table.free_count == 8


def test_disk_file_of_another_layout_starts_empty(make_manager, tmp_path, caplog):
    mgr = make_manager(host_slots=4, disk_slots=8, disk_dir=tmp_path)
    push_to_disk(mgr, keys(0, 2))
    mgr.close()
    # same model, other disk size -> the old file is not trusted: a warning, an empty tier
    with caplog.at_level(logging.WARNING, logger="kvbm.disk"):
        disk = DiskPool(
            GEOMETRY, str(tmp_path), PAGE + 16 * (PAGE + GEOMETRY.slot_bytes), mac_key=DISK_KEY
        )
    try:
        assert disk.recovered == 0
        assert "layout changed" in caplog.text
    finally:
        disk.close()


def test_foreign_file_is_never_overwritten(tmp_path):
    path = tmp_path / f"kvbm-g3-{GEOMETRY.fingerprint:016x}.arena"
    path.write_bytes(b"precious data, not ours" * 1000)
    path.chmod(0o600)  # this user's private file, but no disk arena
    with pytest.raises(DiskTierError, match="refusing to overwrite"):
        DiskPool(GEOMETRY, str(tmp_path), 1 << 20, mac_key=DISK_KEY)
    assert path.read_bytes().startswith(b"precious data")


# -- corruption ------------------------------------------------------------
def test_corrupted_disk_block_is_a_counted_miss(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=16)
    ks = keys(0, 4)
    push_to_disk(mgr, ks)
    # flip one byte in the data of block 2 on disk
    flip_byte(mgr.disk.path, slot_offset(mgr, ks[2]) + 123)
    eng = Engine(4)
    eng.fill(7.0)
    # load -> blocks 0 and 1 arrive, block 2 fails its checksum: the prefix ends there
    assert onboard(mgr, eng.kv, ks, [0, 1, 2, 3]) == 2
    assert eng.holds(ks[0], 0) and eng.holds(ks[1], 1)
    assert all(bool((layer[2:] == 7.0).all()) for layer in eng.layers), "bad bytes reached G1"
    assert mgr.metrics.value("kvbm_tier_checksum_failures_total", tier="disk") == 1
    # the corrupt block is forgotten; its neighbour after it is still on disk
    assert mgr.disk.table.get(ks[2]) is None
    assert mgr.lookup(ks[3:]).tiers == (Tier.DISK,)
    mgr.host.table.check()
    mgr.disk.table.check()


def test_negative_control_same_flow_without_corruption_loads_everything(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=16)
    ks = keys(0, 4)
    push_to_disk(mgr, ks)
    eng = Engine(4)
    assert onboard(mgr, eng.kv, ks, [0, 1, 2, 3]) == 4
    assert mgr.metrics.value("kvbm_tier_checksum_failures_total", tier="disk") == 0


def test_corrupted_header_is_not_recovered(make_manager, tmp_path):
    mgr = make_manager(host_slots=4, disk_slots=16, disk_dir=tmp_path)
    ks = keys(0, 3)
    push_to_disk(mgr, ks)
    header = mgr.disk.header_offset(mgr.disk.table.get(ks[1]))
    path = mgr.disk.path
    mgr.close()
    flip_byte(path, header + 30)  # inside the encoded key
    disk = DiskPool(
        GEOMETRY, str(tmp_path), PAGE + 16 * (PAGE + GEOMETRY.slot_bytes), mac_key=DISK_KEY
    )
    try:
        assert disk.recovered == 2  # `ks` less block 1
        assert disk.table.get(ks[1]) is None
        assert disk.table.get(ks[0]) is not None
    finally:
        disk.close()


def anchors_of(mgr, ks) -> dict:
    """The group anchors the manager hands the index with its blocks, of `ks`."""
    got: dict = {}
    mgr.held(got)
    return {k: a for k, a in got.items() if k in ks}


def test_a_blocks_group_anchor_goes_with_it_to_disk_through_a_restart_and_back(
    make_manager, tmp_path, caplog
):
    mgr = make_manager(host_slots=4, disk_slots=16, disk_dir=tmp_path)
    ks = keys(0, 4)
    anchors = {k: a for k, a in zip(ks, [11, 11, 2**64 - 1, 0], strict=True)}  # 0: not known
    eng = Engine(4)
    plan = mgr.prepare_store(ks, list(anchors.values()))
    arena_blocks(mgr).gather(eng.kv, eng.compute(ks), plan.slots)
    assert mgr.complete_store(plan) == 4
    known = {k: a for k, a in anchors.items() if a}
    assert anchors_of(mgr, ks) == known
    store(mgr, keys(10_000, mgr.host.num_slots))  # drains `ks` to G3
    assert mgr.lookup(ks).tiers == (Tier.DISK,) * 4 and anchors_of(mgr, ks) == known
    # An older node's header (version 3, keys of 8-byte heads) is dropped at
    # recovery, with a log line: never read as a key of today's layout.
    disk = mgr.disk
    old = disk.table.get(ks[1])
    head = _HEADER.pack(SLOT_MAGIC, 3, GEOMETRY.block_bytes, disk.table.checksums[old], len(ks[1]))
    head += ks[1] + struct.pack("<Q", 11)
    with open(disk.path, "r+b") as f:
        f.seek(disk.header_offset(old))
        f.write(head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)))
    mgr.close()
    with caplog.at_level(logging.WARNING, logger="kvbm.disk"):
        again = make_manager(host_slots=4, disk_slots=16, disk_dir=tmp_path)
    assert "older key version blocks=1" in caplog.text
    assert again.disk.recovered == 3
    del known[ks[1]]
    assert anchors_of(again, ks) == known
    assert again.lookup(ks).tiers == (Tier.DISK,)  # ks[1] is gone: the prefix stops there
    rest = [ks[0], ks[2], ks[3]]
    got = Engine(3)
    assert onboard(again, got.kv, rest, [0, 1, 2]) == 3  # staged into G2, bit-exact
    assert all(got.holds(k, i) for i, k in enumerate(rest))
    assert anchors_of(again, rest) == known


def test_direct_io_can_be_turned_off(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=8, direct_io=False)
    assert mgr.disk.direct_io is False
    push_to_disk(mgr, keys(0, 2))
    assert onboard(mgr, Engine(2).kv, keys(0, 2), [0, 1]) == 2


def test_errors_share_one_root():
    assert issubclass(GeometryMismatch, KvbmError)
    assert issubclass(DiskTierError, KvbmError)


def test_an_unexpected_disk_error_is_a_miss_and_leaks_nothing(make_manager, monkeypatch):
    mgr = make_manager(host_slots=4, disk_slots=16)
    ks = keys(0, 2)
    push_to_disk(mgr, ks)

    def broken(items, host):
        raise RuntimeError("injected: a bug below the manager")

    # a read that blows up -> the load is a miss, every pin and slot is settled
    monkeypatch.setattr(mgr.disk, "read", broken)
    eng = Engine(2)
    assert onboard(mgr, eng.kv, ks, [0, 1]) == 0
    # a write that blows up -> the drained blocks are not admitted, G2 keeps serving
    monkeypatch.setattr(mgr.disk, "write", broken)
    assert store(mgr, keys(50, 4)) == 4
    assert (
        mgr.metrics.value("kvbm_tier_admissions_rejected_total", tier="disk", reason="io_error") > 0
    )
    mgr.host.table.check()
    mgr.disk.table.check()
    assert sum(mgr.host.table.pins) == 0 and sum(mgr.disk.table.pins) == 0
    assert mgr.host.table.free_count + mgr.host.table.registered_count == 4


def test_a_failed_write_ahead_counts_an_io_error_and_keeps_the_block(make_manager, monkeypatch):
    """A write ahead of eviction that fails (a full file system, say) is a block
    the disk tier did not take, counted as a drain's is: the first failed write
    may as well be a write ahead as a drain's (tests/system/faults/test_disk_faults.py)."""
    mgr = make_manager(host_slots=8, disk_slots=32, min_uses=1)
    store(mgr, keys(0, 8))
    store(mgr, keys(100, 2))  # evicts keys 0, 1 (written at eviction): two owed ahead
    monkeypatch.setattr(mgr.disk, "write", lambda items, host: [None] * len(items))
    assert mgr.write_ahead(reach=4, limit=16) == 0
    rejected = mgr.metrics.value(
        "kvbm_tier_admissions_rejected_total", tier="disk", reason="io_error"
    )
    assert rejected == 2
    assert mgr.disk.table.registered_count == 2  # keys 0, 1 only
    eng = Engine(2)
    assert onboard(mgr, eng.kv, keys(2, 2), [0, 1]) == 2  # still in G2, bit-exact
    assert eng.holds(keys(2, 2)[0], 0) and eng.holds(keys(2, 2)[1], 1)
    mgr.host.table.check()
    mgr.disk.table.check()


def test_a_failed_piece_waits_for_its_siblings_before_slots_are_reused(make_manager, monkeypatch):
    import time

    import kvbm.disk_pool as disk_pool

    mgr = make_manager(host_slots=4, disk_slots=16)
    ks = keys(0, 2)
    push_to_disk(mgr, ks)
    # one block per I/O piece: piece 0 fails at once, piece 1 is slow and lands late
    monkeypatch.setattr(disk_pool, "IO_PIECE_BYTES", 1)
    real = type(mgr.disk)._read_piece

    def uneven(self, first, piece, host):
        if first == self.table.get(ks[0]):
            raise RuntimeError("injected: first piece fails")
        time.sleep(0.3)
        return real(self, first, piece, host)

    monkeypatch.setattr(type(mgr.disk), "_read_piece", uneven)
    assert onboard(mgr, Engine(2).kv, ks, [0, 1]) == 0
    # the slow read had finished before the load gave its slots back, so fresh
    # blocks stored into those slots now stay as they were written
    fresh = keys(500, 2)
    store(mgr, fresh)
    time.sleep(0.4)
    eng = Engine(2)
    assert onboard(mgr, eng.kv, fresh, [0, 1]) == 2
    assert eng.holds(fresh[0], 0) and eng.holds(fresh[1], 1)
    assert mgr.metrics.value("kvbm_tier_checksum_failures_total", tier="disk") == 0
    mgr.disk.table.check()


def test_a_read_error_keeps_the_block_and_counts_an_io_error(make_manager, monkeypatch):
    mgr = make_manager(host_slots=4, disk_slots=16)
    ks = keys(0, 2)
    push_to_disk(mgr, ks)
    real = os.preadv
    calls = {"n": 0}

    def flaky(fd, bufs, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "injected EIO")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    # the first read fails: a miss, counted as an I/O error, the blocks stay on disk
    assert onboard(mgr, Engine(2).kv, ks, [0, 1]) == 0
    assert mgr.metrics.value("kvbm_tier_io_errors_total", tier="disk") == 2
    assert mgr.metrics.value("kvbm_tier_checksum_failures_total", tier="disk") == 0
    assert mgr.lookup(ks).tiers == (Tier.DISK, Tier.DISK)
    # the next read succeeds
    eng = Engine(2)
    assert onboard(mgr, eng.kv, ks, [0, 1]) == 2
    assert eng.holds(ks[1], 1)


def test_a_crash_while_creating_the_disk_file_is_recovered_from(tmp_path):
    size = PAGE + 8 * (PAGE + GEOMETRY.slot_bytes)
    DiskPool(GEOMETRY, str(tmp_path), size, mac_key=DISK_KEY).close()
    path = tmp_path / f"kvbm-g3-{GEOMETRY.fingerprint:016x}.arena"
    # what a crash between the superblock and the reservation leaves behind
    with open(path, "r+b") as f:
        f.truncate(PAGE)
    disk = DiskPool(GEOMETRY, str(tmp_path), size, mac_key=DISK_KEY)
    try:
        assert disk.recovered == 0
        assert os.path.getsize(path) == disk.size
    finally:
        disk.close()
