"""The node's key view (kvbm/key_view.py) across processes: batches seen whole
by a reader in another process, and real nodes keeping it in step with their
tiers and their peers'. (The view alone is in tests/unit/test_key_view.py.)"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from kvbm.block_key import KeySpace
from kvbm.connector.attach import Available, NodeAttachment, NodeError
from kvbm.key_view import LOCAL, KeyView, KeyViewReader
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY, Engine


def _keys(start: int, n: int, rank: int = 0) -> list[bytes]:
    return KeySpace("test", GEOMETRY.fingerprint, rank).keys(list(range(start, start + n)))


def _watch(name: str, size: int, directory: str, n: int, out) -> None:
    """Another process reading all of `n` keys over and over: how often it saw
    some of them set and others not (a batch seen half written)."""
    reader = KeyViewReader(name, size, directory)
    ks, torn, reads = _keys(0, n), 0, 0
    while reads < 3000:
        bits = reader.bits(ks)
        if bits is None:
            continue
        reads += 1
        torn += 0 < int(np.count_nonzero(bits)) < n
    out.send((reads, torn))
    reader.close()


@pytest.mark.parametrize("checked", [True, False])
def test_a_batch_is_seen_whole_or_not_at_all(tmp_path, checked, monkeypatch):
    """The writer sets and unsets one batch of 256 keys over and over; a
    reader in another process sees all of them or none. The control turns
    the writer's sequence counter off (and shows the test can fail)."""
    v = KeyView.create("kvbm-g2-seq.keys", 4096, str(tmp_path))
    if not checked:
        monkeypatch.setattr(v, "_begin", lambda: None)
        monkeypatch.setattr(v, "_end", lambda: None)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_watch, args=(v.name, v.size, str(tmp_path), 256, child))
    proc.start()
    try:
        ks = _keys(0, 256)
        while not parent.poll():
            v.set(ks, LOCAL)
            v.unset(ks, LOCAL)
        reads, torn = parent.recv()
    finally:
        proc.join(30)
        v.close()
    assert reads == 3000
    if checked:
        assert torn == 0
    else:
        assert torn > 0


# -- real nodes ---------------------------------------------------------------


def test_a_nodes_view_follows_its_tiers_and_never_misses_a_held_block(daemons):
    """Store more than the host tier holds: every block the node holds shows
    in the engine's view at every moment it is asked, and what the node let
    go leaves the view within moments."""
    a = daemons("a", "127.0.0.2", "--host-cache-mb", "1")  # 64 blocks
    eng = NodeAttachment(a.socket, GEOMETRY)
    try:
        assert eng.view is not None
        made = Engine(16)
        for n in range(12):
            ks = eng.keys(list(range(n * 16, (n + 1) * 16)))
            assert eng.store(made.kv, ks, made.compute(ks)) == 16
            assert eng.seen(ks) == Available(16)  # at once: the store has returned
        every = eng.keys(list(range(12 * 16)))
        truth = [eng.lookup([k], ask_node=True).local for k in every]
        assert sum(truth) == 64
        seen = [eng.seen([k]).local for k in every]
        assert all(s >= t for s, t in zip(seen, truth, strict=True))
        until(lambda: [eng.seen([k]).local for k in every] == truth, 5, "evicted keys stay in view")
    finally:
        eng.close()


def test_a_peers_blocks_show_in_the_view_and_leave_it_with_them(etcd, daemons, tmp_path):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "1")
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "4")
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    local_only = NodeAttachment(b.socket, GEOMETRY)
    try:
        ks = eng_a.keys(list(range(500, 508)))
        made = Engine(8)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == 8
        until(lambda: eng_b.seen(ks) == Available(0, 8), 10, "B's view never showed A's blocks")
        assert local_only.seen(ks) == Available(0)  # an engine that loads from no peer
        # A lets them go (its host tier refilled): B's view follows A's index
        filler = eng_a.keys(list(range(10_000, 10_000 + 80)))
        big = Engine(80)
        eng_a.store(big.kv, filler, big.compute(filler))
        until(lambda: eng_b.seen(ks) == Available(0), 10, "B's view kept A's evicted blocks")
        # killed, A's records go with its lease: its blocks leave B's view
        seen_now = eng_b.seen(filler[-8:])
        assert seen_now == Available(0, 8)
        a.proc.kill()
        a.proc.wait()
        until(lambda: eng_b.seen(filler[-8:]) == Available(0), 15, "a dead peer stays in view")
    finally:
        for e in (eng_a, eng_b, local_only):
            e.close()


def test_the_view_of_a_killed_node_is_not_read(daemons):
    a = daemons("a", "127.0.0.2", "--host-cache-mb", "1")
    eng = NodeAttachment(a.socket, GEOMETRY)
    try:
        ks = eng.keys(list(range(8)))
        made = Engine(8)
        eng.store(made.kv, ks, made.compute(ks))
        assert eng.seen(ks) == Available(8)
        a.proc.kill()
        a.proc.wait()
        assert eng.seen(ks) is None  # frozen: ask the node, which is gone
        with pytest.raises(NodeError):
            eng.lookup(ks)
    finally:
        eng.close()
