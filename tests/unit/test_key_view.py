"""The node's key view (kvbm/key_view.py): what a reader in another process
sees while the node writes, against a model; batches seen whole; the
overflow that makes a reader ask instead of answering "no"; and real nodes
keeping it in step with their tiers and their peers'."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.block_key import KeySpace
from kvbm.connector.attach import Available, NodeAttachment, NodeError
from kvbm.key_view import LOCAL, REMOTE_DISK, REMOTE_HOST, UNSURE, KeyView, KeyViewReader
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY, Engine, keys, store

SPACE = KeySpace("test", GEOMETRY.fingerprint)


def _keys(start: int, n: int, tp_rank: int = 0) -> list[bytes]:
    return KeySpace("test", GEOMETRY.fingerprint, tp_rank).keys(list(range(start, start + n)))


@pytest.fixture
def view(tmp_path):
    v = KeyView.create("kvbm-g2-test.keys", 256, str(tmp_path))
    yield v
    v.close()


def test_a_reader_sees_each_bit_set_and_unset(view):
    reader = KeyViewReader.of(view)
    ks = _keys(0, 12)
    assert reader.bits(ks).tolist() == [0] * 12
    view.set(ks[:8], LOCAL)
    view.set(ks[4:10], REMOTE_HOST)
    view.set(ks[9:], REMOTE_DISK)
    assert reader.bits(ks).tolist() == [1] * 4 + [3] * 4 + [2, 6, 4, 4]
    view.unset(ks[:6], LOCAL)
    assert reader.bits(ks).tolist() == [0] * 4 + [2, 2, 3, 3, 2, 6, 4, 4]
    view.unset_all(REMOTE_HOST | REMOTE_DISK)
    assert reader.bits(ks).tolist() == [0] * 6 + [1, 1] + [0] * 4
    assert view.count() == 2
    # another tensor-parallel rank's keys are other keys
    assert reader.bits(_keys(0, 12, tp_rank=1)).tolist() == [0] * 12
    reader.close()


def test_the_engines_mapping_is_read_only_and_knows_when_the_node_is_gone(view):
    reader = KeyViewReader.of(view)
    with pytest.raises(ValueError, match="read-only"):
        reader._lay.words[0, 0] = 1
    assert reader.alive()
    view.close()  # the node stops: the name is unlinked
    assert not reader.alive()
    reader.close()
    reader.close()


def _kept(v: KeyView, key: bytes) -> int:
    """What the writer keeps for `key` (in its bucket or spilled), 0 if nothing."""
    buckets, tags = v._lay.place(v._lay.hashes([key]))
    b, tag = int(buckets[0]), int(tags[0])
    for word in v._lay.words[b].tolist():
        if word & ~7 == tag:
            return word & 7
    return v._spill.get(b, {}).get(tag, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "unset", "unset_all"]),
            st.sampled_from([LOCAL, REMOTE_HOST, REMOTE_DISK]),
            st.lists(st.integers(0, 299), min_size=1, max_size=40),
        ),
        max_size=40,
    )
)
def test_a_key_held_is_never_answered_no_even_in_overflowing_buckets(tmp_path_factory, ops):
    """A tiny view (64 buckets of 8 ways, a spill of 32 peers' keys, for up
    to 300 keys): buckets overflow, peers' keys past the spill are not kept.
    Against a model: a held key reads as its exact bits or UNSURE, a key not
    held as 0 or UNSURE, and UNSURE only in an overflowing bucket; the
    node's own keys are always kept; the overflow bytes say exactly which
    buckets have keys outside their ways; rebuilding the peers' keys
    (`unset_all`) leaves nothing lost."""
    v = KeyView.create("kvbm-g2-prop.keys", 64, str(tmp_path_factory.mktemp("v")))
    reader = KeyViewReader.of(v)
    try:
        everything = _keys(0, 300)
        model = [0] * 300
        for what, bit, idx in ops:
            if what == "unset_all":
                v.unset_all(REMOTE_HOST | REMOTE_DISK)
                model = [m & LOCAL for m in model]
                continue
            picked = [everything[i] for i in idx]
            (v.set if what == "set" else v.unset)(picked, bit)
            for i in idx:
                model[i] = model[i] | bit if what == "set" else model[i] & ~bit
        got = reader.bits(everything).tolist()
        buckets, _ = reader._lay.place(reader._lay.hashes(everything))
        over = reader._lay.overflow
        for i, (want, seen) in enumerate(zip(model, got, strict=True)):
            assert seen in (want, UNSURE), (i, want, seen)
            if seen == UNSURE:
                assert over[buckets[i]]
            kept = _kept(v, everything[i])
            if buckets[i] not in v._lossy:
                assert kept == want, (i, want, kept)
            assert kept & LOCAL == want & LOCAL  # the node's own: always kept
        assert set(np.flatnonzero(over).tolist()) == set(v._spill) | v._lossy
        assert v._spilled == sum(len(s) for s in v._spill.values())
        assert sum(model) == 0 or any(got)  # the check can fail: something was seen
        v.unset_all(REMOTE_HOST | REMOTE_DISK)
        assert not v._lossy
        assert set(np.flatnonzero(over).tolist()) == set(v._spill)
    finally:
        reader.close()
        v.close()


def test_a_fleet_of_peers_keys_cannot_grow_the_nodes_memory_past_the_spill(view):
    """4,000 peers' keys into a view made for 256 (2,048 ways): the spill
    keeps at most its cap, the buckets past it are lossy (readers ask the
    node there), and the node's own keys, set after, are all kept."""
    reader = KeyViewReader.of(view)
    peers, mine = _keys(10_000, 4000), _keys(0, 200)
    view.set(peers, REMOTE_HOST)
    view.set(mine, LOCAL)
    assert view._lossy and view._spilled <= view._spill_max + len(mine)
    assert all(_kept(view, k) & LOCAL for k in mine)
    got = reader.bits(peers + mine)
    assert not (got == 0).any()  # every key set reads as held, or "ask the node"
    assert (got[len(peers) :] & LOCAL).sum() + (got[len(peers) :] == UNSURE).sum() == len(mine)
    reader.close()


def test_a_block_draining_to_disk_stays_in_view_whatever_runs_meanwhile(make_manager, tmp_path):
    """A drain takes blocks out of G2 and writes them to G3 unlocked: the
    publisher's `take_changes` may run in between, when the blocks are in
    neither tier. They must show again once on disk (found by review: they
    did not)."""
    mgr = make_manager(host_slots=8, disk_slots=32)
    view = KeyView.create("kvbm-g2-drain.keys", 64, str(tmp_path))
    reader = KeyViewReader.of(view)
    try:
        mgr.share_keys(view)
        write = mgr.disk.write

        def write_while_published(items, host):
            mgr.take_changes()  # the publisher's tick, in the middle of the write
            return write(items, host)

        mgr.disk.write = write_while_published
        first = keys(0, 8)
        store(mgr, first)
        store(mgr, keys(100, 8))  # drains `first` to disk
        assert set(mgr.held()) >= set(first)
        assert reader.bits(first).tolist() == [LOCAL] * 8
    finally:
        reader.close()
        view.close()


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


def test_a_new_view_sends_readers_to_the_node_until_peers_keys_are_in(tmp_path):
    """A view is made at the first engine's hello and filled from the index
    mirror at the publisher's next tick: in between, a key it lacks may be
    a peer's, and readers must ask the node, not hear "held nowhere" (a new
    node's first request would miss the fleet)."""
    view = KeyView.create("kvbm-g2-new.keys", 256, str(tmp_path))
    reader = KeyViewReader.of(view)
    try:
        assert reader.peers_elsewhere()
        view.peers_here()  # what the publisher does once the mirror has filled it
        assert not reader.peers_elsewhere()
        view.peers_elsewhere()  # a sharded index: for good
        assert reader.peers_elsewhere()
    finally:
        reader.close()
        view.close()
