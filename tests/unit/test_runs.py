"""Runs: a node's changes as the run records it publishes (discovery/runs.py),
and a mirror fed those records in any order etcd may deliver them."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.mirror import IndexMirror
from discovery.runs import MAX_RUN_KEYS, RunBook, RunRecord
from discovery.tier import Tier

NS = "ns1"
TAIL = b"\x01\x02tail"
H, D = Tier.HOST, Tier.DISK


def key(i: int, tail: bytes = TAIL) -> bytes:
    return i.to_bytes(16, "little") + tail


def records(book: RunBook) -> dict[int, list[tuple[bytes, Tier]] | None]:
    out = {}
    for phase in book.take_records():
        for rid, rec in phase:
            held = None if rec is None else zip(rec.block_keys(), rec.tiers(), strict=True)
            out[rid] = None if held is None else list(held)
    return out


def test_blocks_stored_one_after_another_share_a_run_up_to_its_cap():
    book = RunBook(max_run_keys=150)
    book.apply({key(i): H for i in range(100)})
    ((rid, run),) = records(book).items()
    assert run == [(key(i), H) for i in range(100)]
    book.apply({key(i): H for i in range(100, 120)})  # the next prompt: the same run
    assert records(book) == {rid: [(key(i), H) for i in range(120)]}
    book.apply({key(i): H for i in range(200, 260)})  # 30 fit, 30 start the next run
    got = records(book)
    assert [len(r) for r in got.values()] == [150, 30] and next(iter(got)) == rid


def test_a_prompt_that_continues_joins_its_predecessors_run():
    book = RunBook(max_run_keys=6)
    book.apply({key(0): H, key(1): H})  # run 0
    book.apply({key(0, b"other"): H})  # another key space: run 1, the newest
    book.apply({key(1): D, key(2): H})  # 2 follows 1, run 0's last member
    book.apply({key(9): H})  # follows nothing: the newest run, if its key space
    assert [book.member[key(i)] for i in (0, 1, 2, 9)] == [0, 0, 0, 2]
    assert book.member[key(0, b"other")] == 1


def test_keys_are_shown_once_old_enough():
    book = RunBook()
    book.apply({key(0): H, key(1): H}, now=10.0)
    book.apply({key(2): H}, now=11.0)
    ((rid, _),) = records(book).items()
    assert book.record(rid, cutoff=10.5).block_keys() == [key(0), key(1)]
    assert book.youngest_unshown(rid, cutoff=10.5) == 11.0
    assert book.record(rid, cutoff=9.0) is None and book.youngest_unshown(rid, 11.0) is None
    book.apply({key(0): None}, now=12.0)
    book.apply({key(0): D}, now=13.0)  # back: young again
    assert book.record(rid, cutoff=12.5).block_keys() == [key(1), key(2)]


def test_new_keys_after_a_runs_last_key_extend_it():
    book = RunBook()
    book.apply({key(0): H, key(1): H})
    ((rid, _),) = records(book).items()
    book.apply({key(1): D, key(2): H})  # key 1 moves to disk, key 2 follows it
    assert records(book) == {rid: [(key(0), H), (key(1), D), (key(2), H)]}


def test_eviction_rewrites_then_deletes_and_a_key_back_rejoins_its_run():
    book = RunBook()
    book.apply({key(i): H for i in range(4)})
    ((rid, _),) = records(book).items()
    book.apply({key(1): None})
    assert records(book) == {rid: [(key(0), H), (key(2), H), (key(3), H)]}
    book.apply({key(1): D})  # back (say, from disk): same run, same place
    assert records(book) == {rid: [(key(0), H), (key(1), D), (key(2), H), (key(3), H)]}
    book.apply(dict.fromkeys(map(key, range(4))))
    assert records(book) == {rid: None} and not book.member and not book.runs


def test_runs_split_at_their_cap_and_at_another_key_space():
    book = RunBook(max_run_keys=10)
    book.apply({key(i): H for i in range(25)} | {key(i, b"other"): H for i in range(3)})
    sizes = sorted(len(r) for r in records(book).values())
    assert sizes == [3, 5, 10, 10]


def test_a_record_round_trips_and_garbage_is_refused():
    rec = RunRecord.of([key(i) for i in range(9)], [H, D] * 4 + [D])
    again = RunRecord.decode(rec.encode())
    assert again == rec and again.tiers() == [H, D] * 4 + [D]
    with pytest.raises(ValueError):
        RunRecord.of([key(0), key(1, b"x")], [H, H])
    for bad in (
        b"",
        b"\xc1",
        rec.encode()[:-1],
        RunRecord(TAIL, b"123456789012345", b"\x00").encode(),  # a head cut short
        RunRecord(TAIL, b"", b"").encode(),  # empty
        RunRecord(TAIL, b"1234567890123456", b"\x00\x00").encode(),  # tier bits of another size
        RunRecord(TAIL, b"1234567890123456" * (MAX_RUN_KEYS + 1), b"\x00" * 129).encode(),
    ):
        with pytest.raises(ValueError):
            RunRecord.decode(bad)


def test_compaction_forgets_gone_members_and_goes_first():
    book = RunBook()
    book.apply({key(i): H for i in range(100)})
    records(book)
    book.apply(dict.fromkeys(map(key, range(60))))  # more than half gone
    (first, then) = book.take_records()
    ((rid, rec),) = first  # it lost members: written before any run that may take them
    assert then == [] and len(rec) == 40
    assert key(0) not in book.member and len(book.runs[rid].keys) < 100
    book.apply({key(3): H})  # no longer a member: it joins anew, at the newest run's end
    assert book.runs[book.member[key(3)]].keys[-1] == key(3)


BATCHES = st.lists(
    st.tuples(
        st.sampled_from(["A", "B"]),
        st.lists(st.tuples(st.integers(0, 7), st.sampled_from([H, D, None])), max_size=6),
        st.booleans(),  # a flush after this batch (else it coalesces with the next)
    ),
    max_size=40,
)


def feed(m: IndexMirror, node: str, book: RunBook, rng: random.Random) -> None:
    phases = book.take_records()
    for phase in phases:
        rng.shuffle(phase)
    m.apply_runs(node, phases)


@settings(max_examples=300, deadline=None)
@given(BATCHES, st.integers(0, 2**32))
def test_a_mirror_fed_records_in_any_order_within_a_phase_equals_the_model(batches, seed):
    """The etcd index writes a phase in concurrent transactions, so a mirror
    may see a phase's records in any order; what it ends with must equal the
    nodes' holdings key by key. Batches coalesce between two flushes (as
    between the etcd index's flushes), and runs of at most 3 keys are often
    emptied and dropped, so keys leave runs and join others often."""
    rng = random.Random(seed)
    m = IndexMirror(NS)
    books = {n: RunBook(max_run_keys=3) for n in "AB"}
    model: dict[bytes, dict[str, Tier]] = {}
    for node, changes, flush in batches:
        books[node].apply({key(i): t for i, t in changes})
        for i, t in changes:
            if t is None:
                model.get(key(i), {}).pop(node, None)
            else:
                model.setdefault(key(i), {})[node] = t
        if flush:
            feed(m, node, books[node], rng)
    for node, book in books.items():
        feed(m, node, book, rng)
    model = {k: v for k, v in model.items() if v}
    assert dict(m.locations.items()) == model
    for node, book in books.items():
        assert len(book) == sum(node in v for v in model.values())


def test_the_fleet_traces_changes_describe_its_tiers():
    """`kvbm bench index --nodes`' trace: its changes, applied to a RunBook,
    hold exactly what its two tiers hold, in the tier they hold it."""
    from kvbm.bench.fleet_trace import NodeTrace, TraceShape
    from kvbm.block_key import KeySpace

    trace = NodeTrace(3, KeySpace("ns1", 1), TraceShape(host_blocks=64, disk_blocks=128))
    book = RunBook()
    for _ in range(200):
        changes: dict = {}
        trace.request(changes)
        book.apply(changes)
    held = book.held()
    assert held == {k: H for k in trace.host} | {k: D for k in trace.disk}
    assert len(held) == trace.held() == 192 and trace.created > 192
