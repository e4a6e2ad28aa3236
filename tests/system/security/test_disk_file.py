"""Issue 31, finding 6: the disk tier's file. Another local user (a real
second uid) who plants the tier's directory, its file or a link under its
predictable name before the node starts finds it refused, never adopted;
someone who could write the node's own file while the node was stopped
cannot make it serve a block the node did not write (the sums are keyed with
the node's disk key, which the file's bytes do not give away)."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import xxhash

from discovery.tier import Tier
from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.connector.direct import onboard
from kvbm.disk_pool import _HEADER, _SUPER, PAGE, SLOT_MAGIC, DiskPool, arena_path
from kvbm.disk_seal import HEADER, SEAL_BYTES, DiskSeal
from kvbm.errors import DiskTierError, KvbmError
from kvbm.hashing import disk_key
from tests.harness.node_daemon import spill, until
from tests.harness.peer_attacks import write_secret
from tests.harness.second_user import as_nobody, need_root
from tests.harness.support import DISK_KEY, GEOMETRY, Engine, keys, store

PLANTED = b""  # an empty file: the node would make it the tier


@pytest.mark.parametrize(
    "how",
    [
        "their directory",  # the attacker made the tier's directory first
        "a directory open to all",  # the node's, but anyone may write into it
        "their file in the node's directory",  # planted while it was open
        "their link in the node's directory",  # same, a link to the attacker's file
    ],
)
def test_a_disk_file_planted_by_another_user_is_refused(daemons, shared_tmp, how):
    need_root()
    disk = os.path.join(shared_tmp, "kvbm-disk")
    path = arena_path(disk, GEOMETRY)  # a predictable name
    theirs = os.path.join(shared_tmp, "theirs")
    if how == "their directory":
        as_nobody(f"os.mkdir({disk!r}, 0o777)")
    else:
        os.mkdir(disk)
        os.chmod(disk, 0o777)
    if how.endswith("link in the node's directory"):
        as_nobody(f"open({theirs!r}, 'wb').write({PLANTED!r}); os.symlink({theirs!r}, {path!r})")
        planted = theirs
    else:
        as_nobody(f"open({path!r}, 'wb').write({PLANTED!r}); os.chmod({path!r}, 0o666)")
        planted = path
    if how.startswith("their") and "node's directory" in how:
        os.chmod(disk, 0o700)  # the operator closes the directory; the file stays
    flags = ("--disk-cache-dir", disk, "--disk-cache-mb", "4")
    engine = None
    try:
        if "directory" in how and "node's" not in how:
            # refused at the node's start: the directory is not the node's own
            with pytest.raises(KvbmError, match="not a private directory of this user"):
                daemons("node-a", "127.0.0.2", *flags)
        else:
            node = daemons("node-a", "127.0.0.2", *flags)
            with pytest.raises(NodeError, match="refusing it"):
                engine = NodeAttachment(node.socket, GEOMETRY, timeout=15)
            assert node.proc.poll() is None  # the engine is refused; the node stays up
    finally:
        if engine is not None:
            engine.close()
    with open(planted, "rb") as f:
        assert f.read() == PLANTED  # never written, never made the tier


FORGED = 1.5  # every value of the forged block


def forge(directory: str, key: bytes) -> None:
    """What whoever could write the file does while the node is stopped:
    rewrite the block named `key` with bytes of their own, and recompute every
    sum they can: the content checksum (xxh3), and the keyed ones under the
    best key they have (the node's id is public, its secret is not)."""
    guess = DiskSeal(disk_key(b"what the attacker guesses", "node-a"))
    path = arena_path(directory, GEOMETRY)
    with open(path, "r+b") as f:
        _, _, slot_bytes, num_slots, block_bytes, _ = _SUPER.unpack(f.read(_SUPER.size))
        for slot in range(num_slots):
            f.seek(PAGE + slot * PAGE)
            page = f.read(PAGE)
            magic, version, data_len, _, klen = _HEADER.unpack_from(page)
            if magic != SLOT_MAGIC or page[_HEADER.size : _HEADER.size + klen] != key:
                continue
            data = Engine(1).layers[0].new_full((block_bytes // 4,), FORGED).numpy().tobytes()
            f.seek(PAGE * (1 + num_slots) + slot * slot_bytes)
            f.write(data)
            rest = page[_HEADER.size : _HEADER.size + klen + 8]  # key, anchor
            head = _HEADER.pack(magic, version, data_len, xxhash.xxh3_64_intdigest(data), klen)
            head += rest + guess.seal(memoryview(data))
            f.seek(PAGE + slot * PAGE)
            f.write(head + guess.sum(HEADER, head))
            return
    raise AssertionError("the block to forge is not on disk")


def test_a_block_forged_in_the_disk_file_while_the_node_was_stopped_is_never_loaded(
    daemons, tmp_path
):
    disk = str(tmp_path / "disk")
    flags = ("--host-cache-mb", "1", "--disk-admit-min-uses", "1")
    flags += ("--disk-cache-dir", disk, "--disk-cache-mb", "4")
    flags += ("--secret-file", write_secret(tmp_path / "secret"))  # the same key after restart
    node = daemons("node-a", "127.0.0.2", *flags)
    eng = NodeAttachment(node.socket, GEOMETRY)
    try:
        ks = eng.keys(list(range(100, 108)))
        spill(eng, ks)
        until(lambda: eng.stats()["tiers"]["disk"]["blocks"] >= 8, 10, "nothing reached disk")
    finally:
        eng.close()
    assert node.stop() == 0
    forge(disk, ks[4])

    node = daemons("node-a", "127.0.0.2", *flags)
    eng = NodeAttachment(node.socket, GEOMETRY)
    try:
        got = Engine(8)
        got.fill(7.0)
        loaded, sources = eng.load(got.kv, ks, list(range(8)))
        # the four blocks before the forged one load from disk, bit-exact;
        # the forged one is a miss, and nothing of it reaches the engine
        assert not any(bool((layer[4] == FORGED).any()) for layer in got.layers)
        assert (loaded, sources.get("local_disk")) == (4, 4)
        assert all(got.holds(k, i) for i, k in enumerate(ks[:4]))
        assert all(bool((layer[4:] == 7.0).all()) for layer in got.layers)
    finally:
        eng.close()


# -- the disk pool itself ----------------------------------------------------
def push_to_disk(mgr, ks) -> None:
    store(mgr, ks)
    store(mgr, keys(10_000, mgr.host.num_slots))
    assert mgr.lookup(ks).tiers == (Tier.DISK,) * len(ks)


def test_the_disk_file_and_its_directory_are_made_private(make_manager, tmp_path):
    os.umask(old := os.umask(0))  # a permissive umask must not open them
    try:
        mgr = make_manager(host_slots=4, disk_slots=8, disk_dir=tmp_path / "disk")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "disk").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(mgr.disk.path).st_mode) == 0o600


@pytest.mark.parametrize("dir_mode,file_mode", [(0o775, 0o600), (0o700, 0o640), (0o700, 0o604)])
def test_a_disk_file_or_directory_open_to_others_is_refused(tmp_path, dir_mode, file_mode):
    directory = tmp_path / "disk"
    directory.mkdir()
    size = PAGE + 8 * (PAGE + GEOMETRY.slot_bytes)
    DiskPool(GEOMETRY, str(directory), size, mac_key=DISK_KEY).close()
    os.chmod(arena_path(str(directory), GEOMETRY), file_mode)
    directory.chmod(dir_mode)
    with pytest.raises(DiskTierError, match=r"not a private (directory|file) of this user"):
        DiskPool(GEOMETRY, str(directory), size, mac_key=DISK_KEY)


def test_a_link_named_like_the_disk_file_is_refused_even_to_a_file_of_ours(tmp_path):
    directory = tmp_path / "disk"
    directory.mkdir(mode=0o700)
    (tmp_path / "ours").write_bytes(b"")
    os.symlink(tmp_path / "ours", arena_path(str(directory), GEOMETRY))
    with pytest.raises(DiskTierError, match="symbolic link"):
        DiskPool(
            GEOMETRY, str(directory), PAGE + 8 * (PAGE + GEOMETRY.slot_bytes), mac_key=DISK_KEY
        )
    assert (tmp_path / "ours").read_bytes() == b""


def test_a_block_of_the_same_content_checksum_is_still_refused(make_manager, tmp_path):
    """Stands for a second preimage of xxh3 (feasible): `verify` passes
    whatever bytes come back, and other bytes in the block's place are still
    a miss, as they fail the data's seal under the node's key."""
    mgr = make_manager(4, 16, disk_dir=tmp_path, verify=lambda data, expected: True)
    ks = keys(0, 3)
    push_to_disk(mgr, ks)
    at = mgr.disk.data_offset(mgr.disk.table.get(ks[1]))
    with open(mgr.disk.path, "r+b") as f:
        f.seek(at)
        f.write(b"\x41" * GEOMETRY.block_bytes)
    got = Engine(3)
    got.fill(7.0)
    assert onboard(mgr, got.kv, ks, [0, 1, 2]) == 1  # the prefix stops at the forged block
    assert got.holds(ks[0], 0)
    assert all(bool((layer[1:] == 7.0).all()) for layer in got.layers)
    assert mgr.metrics.value("kvbm_tier_checksum_failures_total", tier="disk") == 1


def test_a_new_disk_key_drops_the_tier_with_a_warning(make_manager, tmp_path, caplog):
    mgr = make_manager(4, 16, disk_dir=tmp_path)
    ks = keys(0, 3)
    push_to_disk(mgr, ks)
    mgr.close()
    size = PAGE + 16 * (PAGE + GEOMETRY.slot_bytes)
    same = DiskPool(GEOMETRY, str(tmp_path), size, mac_key=DISK_KEY)
    assert same.recovered == 3  # control: the same key recovers every block
    same.close()
    rotated = disk_key(b"the operator's new secret", "node-a")
    with caplog.at_level(logging.WARNING, logger="kvbm.disk"):
        disk = DiskPool(GEOMETRY, str(tmp_path), size, mac_key=rotated)
    try:
        assert disk.recovered == 0 and all(disk.table.get(k) is None for k in ks)
        assert "sealed under another key" in caplog.text
    finally:
        disk.close()


def test_a_header_sealed_under_another_key_is_not_recovered(make_manager, tmp_path, caplog):
    """The superblock is the node's, one header is not (rewritten under a guessed key)."""
    mgr = make_manager(4, 16, disk_dir=tmp_path)
    ks = keys(0, 3)
    push_to_disk(mgr, ks)
    slot, path = mgr.disk.table.get(ks[1]), mgr.disk.path
    mgr.close()
    guess = DiskSeal(bytes(32))
    with open(path, "r+b") as f:
        f.seek(PAGE + slot * PAGE)
        page = f.read(PAGE)
        end = _HEADER.size + len(ks[1]) + 8 + SEAL_BYTES
        f.seek(PAGE + slot * PAGE)
        f.write(page[:end] + guess.sum(HEADER, page[:end]))
    size = PAGE + 16 * (PAGE + GEOMETRY.slot_bytes)
    with caplog.at_level(logging.WARNING, logger="kvbm.disk"):
        disk = DiskPool(GEOMETRY, str(tmp_path), size, mac_key=DISK_KEY)
    try:
        assert disk.recovered == 2 and disk.table.get(ks[1]) is None
        assert "fails its keyed sum" in caplog.text and "blocks=1" in caplog.text
    finally:
        disk.close()
