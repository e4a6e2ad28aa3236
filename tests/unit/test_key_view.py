"""The node's key view (kvbm/key_view.py): what a reader sees while the node
writes, against a model; the overflow that makes a reader ask instead of
answering "no". (Readers in other processes and real nodes:
tests/integration/test_key_view_nodes.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.block_key import KeySpace
from kvbm.key_view import LOCAL, REMOTE_DISK, REMOTE_HOST, UNSURE, KeyView, KeyViewReader
from tests.harness.support import GEOMETRY, keys, store

SPACE = KeySpace("test", GEOMETRY.fingerprint)


def _keys(start: int, n: int, rank: int = 0) -> list[bytes]:
    return KeySpace("test", GEOMETRY.fingerprint, rank).keys(list(range(start, start + n)))


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
    assert reader.bits(_keys(0, 12, rank=1)).tolist() == [0] * 12
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
