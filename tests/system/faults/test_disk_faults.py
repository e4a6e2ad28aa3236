"""A node's disk going bad under it: bytes flipped in its disk arena, the file
system filling up, a disk tier that does not fit. Each is a miss (the engine
recomputes) and a metric, never wrong bytes, never a crash."""

from __future__ import annotations

import random
import urllib.request

import pytest

from kvbm.connector.attach import Available, NodeAttachment, NodeError
from kvbm.disk_faults import corrupt_disk
from tests.harness.node_daemon import loads_exactly, spill, until
from tests.harness.ports import free_port
from tests.harness.support import GEOMETRY, Engine, fill_up


def metric(port: int, name: str, **labels: str) -> float:
    """One sample from the node's Prometheus endpoint."""
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
    return 0.0


def test_flipped_bytes_in_the_disk_arena_are_misses_counted_in_metrics(etcd, daemons, tmp_path):
    port = free_port("127.0.0.2")
    common = ["--etcd", etcd.endpoint, "--disk-admit-min-uses", "1", "--host-cache-mb", "1"]
    disk = ["--disk-cache-dir", str(tmp_path / "a-disk"), "--disk-cache-mb", "4"]
    a = daemons("a", "127.0.0.2", *common, *disk, "--metrics-port", str(port))
    b = daemons("b", "127.0.0.3", *common)
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host", "disk"])
    try:
        mine, theirs = eng_a.keys(list(range(100, 108))), eng_a.keys(list(range(200, 208)))
        spill(eng_a, mine + theirs)
        until(lambda: eng_b.lookup(theirs) == Available(0, 0, 8), 10, "B never saw them on disk")
        flipped = corrupt_disk(str(tmp_path / "a-disk"), random.Random(1), 10**6, GEOMETRY)
        assert flipped >= 16
        # A's own engine: a miss from the first block, nothing wrong copied
        got = Engine(8)
        got.fill(7.0)
        assert eng_a.load(got.kv, mine, list(range(8)))[0] == 0
        assert all(bool((layer == 7.0).all()) for layer in got.layers)
        # B's pull of A's disk blocks: A's staging rejects them, B gets none
        assert eng_b.load(Engine(8).kv, theirs, list(range(8)))[0] == 0
        assert metric(port, "kvbm_tier_checksum_failures_total", tier="disk") >= 2
        # A keeps serving what it holds in its host tier, bit-exact
        recent = eng_a.keys(list(range(50_000 + eng_a.num_slots, 50_000 + eng_a.num_slots + 8)))
        assert loads_exactly(eng_a, recent, "local_host")
        assert a.proc.poll() is None
    finally:
        eng_a.close()
        eng_b.close()


def test_a_file_system_filling_up_under_the_disk_tier(daemons, small_tmpfs):
    """The disk tier (2 MiB: 102 slots, sparse) has free slots left when its
    file system fills: the first writes to fail make the tier stop taking
    any for a while, so a store of 128 blocks costs fewer failed writes than
    blocks, and what reached the disk before still loads."""
    d = small_tmpfs(3 << 20)
    port = free_port("127.0.0.2")
    a = daemons(
        "a", "127.0.0.2", "--host-cache-mb", "1", "--disk-admit-min-uses", "1",
        "--disk-cache-dir", d, "--disk-cache-mb", "2", "--disk-preallocate", "false",
        "--metrics-port", str(port),
    )  # fmt: skip
    eng = NodeAttachment(a.socket, GEOMETRY)
    try:
        early = eng.keys(list(range(10, 14)))
        spill(eng, early)
        until(lambda: eng.stats()["tiers"]["disk"]["blocks"] >= 4, 10, "nothing reached disk")
        fill_up(d)  # something else fills the disk
        late = eng.keys(list(range(70_000, 70_000 + 2 * eng.num_slots)))
        big = Engine(len(late))
        assert eng.store(big.kv, late, big.compute(late)) == len(late)  # host tier still takes them

        def rejected(reason: str) -> float:
            return metric(port, "kvbm_tier_admissions_rejected_total", reason=reason, tier="disk")

        # writes to disk also go on in the background (ahead of eviction): on a
        # busy machine the tier may pause (no_space) a moment after the store, and
        # the batch whose write failed counts its io_error only once all of its
        # writes return, after a concurrent drain already counted no_space
        try:
            until(lambda: rejected("no_space") > 0 and rejected("io_error") > 0, 20, "")
        except AssertionError:
            counts = {r: rejected(r) for r in ("no_space", "io_error")}
            what = "the full disk never failed a write and paused the tier"
            raise AssertionError(f"{what}: {counts}") from None
        failed, spared = rejected("io_error"), rejected("no_space")
        assert 0 < failed < len(late) // 2 and spared > 0
        # what reached the disk before it filled still loads, bit-exact
        assert loads_exactly(eng, early, "local_disk")
        assert a.proc.poll() is None
    finally:
        eng.close()


def test_a_disk_tier_larger_than_its_file_system_is_a_clear_refusal(daemons, small_tmpfs):
    d = small_tmpfs(1 << 20)
    a = daemons("a", "127.0.0.2", "--disk-cache-dir", d, "--disk-cache-mb", "8")
    with pytest.raises(NodeError, match="no room"):
        NodeAttachment(a.socket, GEOMETRY)
    assert a.proc.poll() is None  # the node refuses the engine, and stays up
    assert a.stop() == 0
