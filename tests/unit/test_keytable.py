"""The mirror's key table: a plain dict is the model. Single operations,
growth and shrinking, bucket overflow into the stash, keys that share a head
or a tail, the batch probe, and random operation sequences (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import keytable
from discovery.keytable import KeyTable

MULT_INV = pow(keytable._MULT, -1, 1 << 64)
TAIL = b"\x11" * 16  # every key of a mirror shares a tail like this (fingerprint, rank, namespace)


def key(i: int, tail: bytes = TAIL, y: int | None = None) -> bytes:
    """A key whose x is i (before a tail's mix); its y (the head's second 8
    bytes) follows from i unless given."""
    y = (i * 0x2545F4914F6CDD1D + 7) % 2**64 if y is None else y
    return i.to_bytes(8, "little") + y.to_bytes(8, "little") + tail


def same_bucket_keys(n: int, tail: bytes = TAIL) -> list[bytes]:
    """Keys whose heads hash to bucket 0 at every table size (the first tail
    of a table mixes with 0): x * MULT has its top bits clear."""
    return [key((y * MULT_INV) & ((1 << 64) - 1), tail) for y in range(1, n + 1)]


def check(t: KeyTable, model: dict[bytes, int], probe: list[bytes]) -> None:
    assert len(t) == len(model)
    assert list(t.items()) == list(model.items())  # insertion order, as a dict keeps it
    assert sorted(t.values()) == sorted(model.values())
    assert set(t.keys()) == set(model)
    for k in probe:
        assert t.get(k) == model.get(k)
        assert (k in t) == (k in model)
    want = [model.get(k, -1) for k in probe]
    assert t.find(probe).tolist() == want
    prefix = want.index(-1) if -1 in want else len(want)
    assert t.find(probe, prefix=True).tolist() == want[:prefix]


def test_set_get_overwrite_pop():
    t = KeyTable()
    assert t.get(key(1)) is None and t.pop(key(1)) is None and len(t) == 0
    t.set(key(1), 5)
    t.set(key(2), 0)
    t.set(key(1), 7)
    assert t.get(key(1)) == 7 and t.get(key(2)) == 0 and len(t) == 2
    assert t.pop(key(1)) == 7 and t.get(key(1)) is None and len(t) == 1
    assert t.get(key(1), -3) == -3
    check(t, {key(2): 0}, [key(1), key(2), key(3)])


def test_values_are_32_bit():
    t = KeyTable()
    t.set(key(1), 2**32 - 1)
    assert t.get(key(1)) == 2**32 - 1
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            t.set(key(2), bad)
    assert len(t) == 1


def test_keys_too_large_for_a_slot_live_in_the_stash():
    t, model = KeyTable(), {}
    for i in range(100):
        t.set(key(i), i)
        model[key(i)] = i
    t.set(key(5), 2**24)  # a value past a slot's 24 bits: the key moves to the stash
    model[key(5)] = 2**24
    assert (5, int.from_bytes(key(5)[8:16], "little"), 1) in t._stash  # (x, y, tail id)
    check(t, model, [key(i) for i in range(100)])
    t.set(key(5), 6)
    model[key(5)] = 6
    check(t, model, [key(i) for i in range(100)])
    # 300 tails: ids past a slot's 8 bits
    for j in range(300):
        k = key(j, b"tail %d" % j)
        t.set(k, j)
        model[k] = j
    assert len(t._stash) > 40
    check(t, model, [key(j, b"tail %d" % j) for j in range(300)])
    check(t, model, [key(7, b"tail %d" % j) for j in range(300)])
    for j in range(0, 300, 3):
        assert t.pop(key(j, b"tail %d" % j)) == model.pop(key(j, b"tail %d" % j))
    check(t, model, list(model))


def test_keys_of_any_length_and_shared_heads_stay_apart():
    keys = [b"", b"\x00", b"\x00" * 7, b"\x00" * 8, b"\x00" * 9, b"\x01" * 3, b"\x01" * 8]
    keys += [b"\x00" * 15, b"\x00" * 16, b"\x00" * 17, b"\x01" * 12]
    keys += [key(9, b""), key(9, b"a"), key(9, b"b"), key(9, b"ab"), key(9, TAIL)]
    t = KeyTable()
    model = {}
    for i, k in enumerate(keys):
        t.set(k, i)
        model[k] = i
    check(t, model, [*keys, b"\x00" * 10, key(9, b"c")])
    for k in keys[::2]:
        assert t.pop(k) == model.pop(k)
    check(t, model, keys)


def test_grows_and_shrinks_with_every_key_kept():
    t, model = KeyTable(), {}
    for i in range(20_000):
        t.set(key(i * 7919), i)
        model[key(i * 7919)] = i
    assert len(t._tab) * keytable._B >= 2 * len(t)  # at most half full
    check(t, model, [key(i * 7919) for i in range(0, 40_000, 3)])
    for i in range(19_900):
        assert t.pop(key(i * 7919)) == model.pop(key(i * 7919))
    assert len(t._tab) <= 128 and len(t._ent) <= 1024  # shrunk back (from 4096 and 32768)
    check(t, model, [key(i * 7919) for i in range(19_800, 20_000)])


def test_a_full_bucket_overflows_into_the_stash():
    crowd = same_bucket_keys(30)
    t = KeyTable()
    for i, k in enumerate(crowd):
        t.set(k, i)
    assert len(t._stash) == 30 - keytable._B  # the rest of the bucket went to the stash
    model = {k: i for i, k in enumerate(crowd)}
    check(t, model, crowd + same_bucket_keys(40)[30:])
    # freeing bucket slots leaves stashed keys reachable; new keys fill the slots
    for k in crowd[:4]:
        assert t.pop(k) == model.pop(k)
    extra = same_bucket_keys(34)[30:]
    for i, k in enumerate(extra):
        t.set(k, 100 + i)
        model[k] = 100 + i
    check(t, model, crowd + extra)
    for k in crowd[10:]:
        assert t.pop(k) == model.pop(k)
    check(t, model, crowd + extra)


def test_growth_and_compaction_carry_stashed_keys_along():
    t, model = KeyTable(), {}
    crowd = same_bucket_keys(20)
    for i, k in enumerate(crowd):
        t.set(k, i)
        model[k] = i
    t.set(key(0), 99)  # the zero head: always stashed
    model[key(0)] = 99
    buckets = len(t._tab)
    for i in range(1, 3000):  # doublings split buckets; holes come and go
        t.set(key(i * 7919), i)
        model[key(i * 7919)] = i
        if i % 3 == 0:
            assert t.pop(key((i - 1) * 7919)) == model.pop(key((i - 1) * 7919))
    assert len(t._tab) > buckets and t._stash
    check(t, model, list(model))
    for i in range(1, 3000):  # many holes: compaction moves every entry
        if key(i * 7919) in model and i % 5:
            assert t.pop(key(i * 7919)) == model.pop(key(i * 7919))
    check(t, model, list(model) + crowd)


def test_a_crowded_stash_makes_the_table_grow():
    # Heads y << 40 share their bucket while the table has fewer than 2**24
    # buckets: past 64 + len/16 stashed keys the table doubles (it may, since
    # it is not sparse yet), and every key stays reachable.
    t, model = KeyTable(), {}
    for i in range(100):
        t.set(key(i), i)
        model[key(i)] = i
    before = len(t._tab)
    for y in range(1, 90):
        k = key(((y << 40) * MULT_INV) & ((1 << 64) - 1))
        t.set(k, y)
        model[k] = y
    assert len(t._tab) > before
    check(t, model, list(model))


def test_a_zero_head_never_matches_a_hole():
    zero = key(0)  # x == 0 for the table's first tail, like a removed entry
    t = KeyTable()
    t.set(key(5), 1)
    t.set(key(6), 2)
    t.pop(key(6))  # a hole right after key 5
    assert t.find([key(5), zero], prefix=True).tolist() == [1]
    assert t.find([zero]).tolist() == [-1] and t.get(zero) is None
    t.set(zero, 3)
    check(t, {key(5): 1, zero: 3}, [zero, key(5), zero, key(6)])
    assert t.pop(zero) == 3
    check(t, {key(5): 1}, [zero, key(5)])


def test_batch_probe_with_several_tails_checks_each_keys_tail():
    # tensor-parallel ranks: one head under several tails, not all present
    t = KeyTable()
    model = {}
    for i in range(50):
        for rank in range(3):
            if (i + rank) % 4:
                k = key(i, bytes([rank]) * 16)
                t.set(k, i * 10 + rank)
                model[k] = i * 10 + rank
    for rank in range(4):
        check(t, model, [key(i, bytes([rank]) * 16) for i in range(50)])
    mixed = [key(i, bytes([i % 3]) * 16) for i in range(50)]
    check(t, model, mixed)


def test_batch_probe_edge_cases():
    t = KeyTable()
    assert t.find([]).tolist() == [] and t.find([], prefix=True).tolist() == []
    assert t.find([key(1)]).tolist() == [-1]
    t.set(key(1), 3)
    assert t.find([key(1, b"other tail------")]).tolist() == [-1]  # a tail no key has
    assert t.find([key(1), key(1)], prefix=True).tolist() == [3, 3]  # repeats are fine
    assert isinstance(t.find([key(1)]), np.ndarray)


def test_lookups_follow_runs_across_holes_and_moved_keys():
    t, model = KeyTable(), {}
    for i in range(1000):
        t.set(key(i), i)
        model[key(i)] = i
    # one run; then holes every 50 keys; then a key moved to the end
    check(t, model, [key(i) for i in range(200, 328)])
    for i in range(0, 1000, 50):
        del model[key(i)]
        t.pop(key(i))
    check(t, model, [key(i) for i in range(1, 50)] + [key(i) for i in range(51, 100)])
    t.pop(key(7))
    t.set(key(7), 77)
    model[key(7)] = model.pop(key(7)) * 0 + 77
    check(t, model, [key(i) for i in range(1, 20)])
    # more runs than are followed one by one: the rest goes through the index
    scattered = [key(i) for i in range(1, 1000, 97)]
    assert t.find(scattered, prefix=True).tolist() == [model[k] for k in scattered]
    # a missing key ends the prefix wherever it falls
    assert t.find([key(1), key(2), key(50), key(3)], prefix=True).tolist() == [1, 2]
    assert t.find([key(50)], prefix=True).tolist() == []


def test_each_way_through_a_batch_gives_the_same_answer():
    t, model = KeyTable(), {}
    for block in (range(0, 1000), range(2000, 2100), range(1000, 1100)):
        for i in block:
            t.set(key(i), i)
            model[key(i)] = i

    def span(a: int, n: int) -> list[bytes]:
        return [key(i) for i in range(a, a + n)]

    for batch in (
        span(0, 128),  # one run
        span(0, 30) + span(2000, 30) + span(1000, 30),  # three long runs
        span(0, 10) + span(2000, 10) + span(1000, 10),  # a short run: the rest via the table
        (span(0, 20) + span(2000, 20) + span(1000, 20)) * 2,  # more runs than are followed
        span(0, 5) + span(5000, 3),  # a short run, then a missing key ends the prefix
        span(990, 20),  # a run that meets keys stored elsewhere
        span(1090, 20),  # a run that meets the end of the entries
    ):
        check(t, model, batch)


def test_a_full_entry_array_with_many_holes_is_compacted_on_insert():
    t, model = KeyTable(), {}
    for i in range(keytable._MIN_ENTRIES):  # fills the first entry array
        t.set(key(i), i)
        model[key(i)] = i
    for i in range(0, keytable._MIN_ENTRIES, 4):  # keep one in four
        for j in (i + 1, i + 2, i + 3):
            assert t.pop(key(j)) == model.pop(key(j))
    t.set(key(1000), 1)  # no room at the end, mostly holes: compacted, not grown
    model[key(1000)] = 1
    assert t._used == len(t) == len(model) and len(t._ent) == keytable._MIN_ENTRIES
    check(t, model, list(model))


def test_compaction_keeps_order_and_contents():
    t, model = KeyTable(), {}
    for i in range(30_000):
        t.set(key(i), i)
        model[key(i)] = i
    for i in range(30_000):
        if i % 10:
            t.pop(key(i))
            del model[key(i)]
    # holes were squeezed out along the way: never more than max(live, 4096)
    assert len(t._ent) < 30_000 and t._used - len(t) <= 4096
    check(t, model, list(model))
    check(t, model, [key(i) for i in range(0, 30_000, 5)])


def test_clear_forgets_everything():
    t = KeyTable()
    for i in range(1000):
        t.set(key(i), i)
    t.clear()
    check(t, {}, [key(i) for i in range(10)])
    t.set(key(3), 1)
    check(t, {key(3): 1}, [key(3)])


def test_keys_that_share_x_and_differ_in_y_stay_apart():
    """A head is 16 bytes and the table finds a key by its first 8 (x): keys
    equal there (a crafted pair, or 2**-64 bad luck) must still be told apart,
    in the table, in the stash, and in runs."""
    crowd = same_bucket_keys(12)  # x in bucket 0: the last ones go to the stash
    twins = [
        k[:8] + (int.from_bytes(k[8:16], "little") ^ 1).to_bytes(8, "little") + k[16:]
        for k in crowd
    ]
    t, model = KeyTable(), {}
    for i, k in enumerate(crowd):
        t.set(k, i)
        model[k] = i
    check(t, model, twins + crowd)
    assert t.find(twins).tolist() == [-1] * len(twins)
    assert t.find(twins, prefix=True).tolist() == []
    for i, k in enumerate(twins):
        t.set(k, 100 + i)
        model[k] = 100 + i
    check(t, model, crowd + twins)
    for k in crowd[::2]:
        assert t.pop(k) == model.pop(k)
    check(t, model, crowd + twins)
    for n in (100, 1000):  # growth and shrinking keep them apart
        more = [key(i) for i in range(1000, 1000 + n)]
        for i, k in enumerate(more):
            t.set(k, i)
            model[k] = i
        check(t, model, crowd + twins + more[:50])
        for k in more:
            assert t.pop(k) == model.pop(k)
        check(t, model, crowd + twins)


# Random operation sequences over a small universe of keys, so that the same
# key is set, overwritten, removed and set again; the universe mixes ordinary
# keys, keys crowding one bucket, short keys, a second tail and the zero head.
UNIVERSE = (
    [key(i * 0x9E3779B1) for i in range(40)]
    + same_bucket_keys(20)
    + [bytes([i]) * (i % 8) for i in range(8)]
    + [key(i, b"rank-1") for i in range(10)]
    + [key(0)]
    + [key(i * 0x9E3779B1, y=1) for i in range(5)]  # an x of the first 40, another y
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "pop"]), st.sampled_from(UNIVERSE), st.integers(0, 2**32 - 1)
    ),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.lists(st.sampled_from(UNIVERSE), max_size=40))
def test_random_operations_match_a_dict(ops, probe):
    t, model = KeyTable(), {}
    for op, k, v in ops:
        if op == "set":
            t.set(k, v)
            model[k] = v
        else:
            assert t.pop(k) == model.pop(k, None)
    check(t, model, probe)
    check(t, model, UNIVERSE)
    stored = list(model)  # the entries' order: runs to follow, with holes between
    check(t, model, stored)
    check(t, model, stored[len(stored) // 3 :] + probe)
