"""The sharded index's parts: an owner's table of locations (against a dict
model) and the rendezvous map of shards to owners."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.owner_table import OwnerTable
from discovery.owners import SHARDS, OwnerRing, places, shard_at
from discovery.tier import Tier

H, D = Tier.HOST, Tier.DISK
TAILS = (b"\x01fp-a", b"\x02fp-b")


def key(i: int, tail: bytes = TAILS[0]) -> bytes:
    return (i * 0x9E3779B97F4A7C15 % 2**64).to_bytes(16, "little") + tail


op = st.tuples(
    st.integers(0, 3),  # holder
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1), st.sampled_from([H, D, None]))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(op, st.integers(0, 3).map(lambda h: ("drop", h))), max_size=30))
def test_the_table_answers_as_a_dict_of_locations_would(ops):
    table = OwnerTable(min_delta=3)  # merges often
    model: dict[bytes, dict[int, Tier]] = {}
    for o in ops:
        if o[0] == "drop":
            gone = table.drop(o[1])
            assert gone == sum(o[1] in m for m in model.values())
            for m in model.values():
                m.pop(o[1], None)
            continue
        holder, changes = o
        keys = [key(i, TAILS[t]) for i, t, _ in changes]
        table.place(holder, places(keys), [tier for _, _, tier in changes])
        for k, (_, _, tier) in zip(keys, changes, strict=True):
            m = model.setdefault(k, {})
            if tier is None:
                m.pop(holder, None)
            else:
                m[holder] = tier
        asked = [key(i, t) for i in range(41) for t in TAILS]
        want = [model.get(k, {}) for k in asked]
        assert table.holders(places(asked)) == want
        runs = table.runs(places(asked))  # the same, in runs of equal holders
        assert [h for n, h in runs for _ in range(n)] == want
        assert all(a[1] != b[1] for a, b in itertools.pairwise(runs))
        assert len(table) == sum(len(m) for m in model.values())


def test_keys_with_the_same_head_and_another_tail_are_other_keys():
    table = OwnerTable()
    table.place(1, places([key(7, TAILS[0])]), [H])
    assert table.holders(places([key(7, TAILS[0]), key(7, TAILS[1])])) == [{1: H}, {}]
    assert len(set(places([key(7, TAILS[0]), key(7, TAILS[1])]).tolist())) == 2


def test_keys_anchored_together_share_a_shard_and_keep_their_own_low_bits():
    ks = [key(i) for i in range(200)]
    own = places(ks)
    assert len(set(shard_at(own).tolist())) > 150  # each key its own: spread
    anchored = places(ks, [7] * 100 + [0] * 100)  # 0: the key is its own
    assert len(set(shard_at(anchored[:100]).tolist())) == 1
    assert (anchored[100:] == own[100:]).all()
    low = (1 << 52) - 1
    assert [x & low for x in anchored.tolist()] == [x & low for x in own.tolist()]
    assert (places(ks[:3], [7] * 3) == places([key(0), key(1), key(2)], [7, 7, 7])).all()
    other = places([k[:16] + TAILS[1] for k in ks[:100]], [7] * 100)  # another tail: elsewhere
    assert len(set(shard_at(other).tolist())) == 1 and shard_at(other)[0] != shard_at(anchored)[0]


def test_a_location_costs_twelve_bytes_once_merged():
    table = OwnerTable()
    n = 50_000
    for holder in range(4):
        keys = [key(i) for i in range(holder * n, (holder + 1) * n)]
        table.place(holder, places(keys), [H] * n)
    table.drop(99)  # merges
    assert len(table) == 4 * n
    assert table.nbytes == 12 * 4 * n


def test_shards_spread_evenly_and_every_node_computes_the_same_owners():
    nodes = [f"node-{i}" for i in range(32)]
    ring = OwnerRing(nodes)
    counts = np.bincount(ring.owner, minlength=32)
    assert counts.min() > SHARDS / 32 * 0.6 and counts.max() < SHARDS / 32 * 1.4
    assert (OwnerRing(reversed(nodes)).owner == ring.owner).all()
    x = places([key(i) for i in range(1000)])
    owners = ring.owners_of(x)
    assert owners == [ring.nodes[ring.owner[s]] for s in shard_at(x)]


def test_a_node_joining_or_leaving_moves_only_its_own_shards():
    nodes = [f"node-{i}" for i in range(16)]
    before = OwnerRing(nodes)
    joined = OwnerRing([*nodes, "newcomer"])
    moved = joined.moved(before)
    assert (moved == joined.shards_of("newcomer")).all()  # all to the newcomer, nothing else
    assert 0 < moved.sum() < SHARDS / 16 * 1.5
    left = OwnerRing([n for n in nodes if n != "node-3"])
    assert (left.moved(before) == before.shards_of("node-3")).all()
    assert OwnerRing().owners_of(places([key(1)])) == []
