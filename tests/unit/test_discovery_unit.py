"""The index's pieces without etcd: key schema, node records, the mirror's
lookup, and the in-memory index. The mirror is fed run records as nodes'
publishers make them (`Fleet`)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.memory import MemoryIndex
from discovery.mirror import IndexMirror
from discovery.records import LookupResult, NodeRecord, PeerRun
from discovery.runs import RunBook, RunRecord
from discovery.schema import node_path, parse_path, run_path
from discovery.tier import Tier

NS = "ns1"


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


class Fleet:
    """Feeds a mirror as the nodes' publishers would: a RunBook per node,
    each batch of changes applied as the records it makes."""

    def __init__(self, mirror: IndexMirror) -> None:
        self.m = mirror
        self.books: dict[str, RunBook] = {}

    def apply(self, node: str, changes: dict[bytes, Tier | None]) -> None:
        book = self.books.setdefault(node, RunBook())
        book.apply(changes)
        self.m.apply_runs(node, book.take_records())

    def put(self, node: str, i: int, tier: Tier = Tier.HOST) -> None:
        self.apply(node, {key(i): tier})

    def delete(self, node: str, i: int) -> None:
        self.apply(node, {key(i): None})


def mirror_with(holdings: dict[str, list[int]], tier: Tier = Tier.HOST) -> IndexMirror:
    """A mirror where each node holds the listed keys (one batch per node)."""
    return fleet_with(holdings, tier).m


def fleet_with(holdings: dict[str, list[int]], tier: Tier = Tier.HOST) -> Fleet:
    fleet = Fleet(IndexMirror(NS))
    for node, ks in holdings.items():
        fleet.m.put(node_path(NS, node), NodeRecord(node, "127.0.0.1", 7000).encode())
        fleet.apply(node, {key(i): tier for i in ks})
    return fleet


def test_paths_round_trip():
    p = run_path(NS, "node-1", 0xAB)
    assert p == b"/kvbm/v1/ns1/runs/node-1/ab"
    parsed = parse_path(b"/kvbm/v1/ns1/", p)
    assert (parsed.node_id, parsed.run_id) == ("node-1", 0xAB)
    assert parse_path(b"/kvbm/v1/ns1/", node_path(NS, "node-1")).run_id is None


@pytest.mark.parametrize(
    "path",
    [
        b"/kvbm/v1/ns1/runs/node-1/zz",  # not hex
        b"/kvbm/v1/ns1/runs/node-1/AB",  # not as written
        b"/kvbm/v1/ns1/runs/node-1/12345678123456781",  # past 64 bits
        b"/kvbm/v1/ns1/runs/node/1/extra",
        b"/kvbm/v1/ns1/blocks/00/node",  # the old per-block layout
        b"/kvbm/v1/ns1/other/thing",
        b"/kvbm/v1/ns1/nodes/../x",
        b"/kvbm/v1/ns2/nodes/a",
    ],
)
def test_foreign_paths_are_refused(path):
    with pytest.raises(ValueError):
        parse_path(b"/kvbm/v1/ns1/", path)


def test_node_record_round_trip_and_garbage():
    r = NodeRecord("n1", "10.0.0.1", 7001, "agent-n1", (1, 2), 100, 1000, "0.1.0")
    assert NodeRecord.decode(r.encode()) == r
    for bad in (b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x09"):
        with pytest.raises(ValueError):
            NodeRecord.decode(bad)
    with pytest.raises(ValueError):
        NodeRecord("bad/id", "x", 1)


def test_lookup_local_prefix_then_longest_runs_from_fewest_peers():
    # keys 0..9; local holds 0-1; A holds 2-4 and 7; B holds 3-8; C holds 2
    m = mirror_with({"local": [0, 1], "A": [2, 3, 4, 7], "B": [3, 4, 5, 6, 7, 8], "C": [2]})
    r = m.lookup([key(i) for i in range(10)], "local")
    assert r.local == 2
    # from 2: A reaches 4, C only 2 -> A; from 5: B reaches 8
    assert [(x.node_id, x.start, x.length) for x in r.runs] == [("A", 2, 3), ("B", 5, 4)]
    assert r.total == 9


def test_lookup_skips_peers_whose_record_is_gone():
    m = mirror_with({"A": [0, 1, 2], "B": [0, 1]})
    # A's node record vanished (dead node, lease expired first on the record)
    m.delete(node_path(NS, "A"))
    r = m.lookup([key(i) for i in range(3)], "me")
    assert r.runs == (PeerRun("B", 0, 2, (Tier.HOST, Tier.HOST)),)


def test_lookup_reports_each_blocks_tier():
    fleet = fleet_with({"A": [0]}, Tier.DISK)
    fleet.put("A", 1, Tier.HOST)
    assert fleet.m.lookup([key(0), key(1)], "me").runs[0].tiers == (Tier.DISK, Tier.HOST)


def test_delete_forgets_and_cleans_up():
    fleet = fleet_with({"A": [0], "B": [0]})
    fleet.delete("A", 0)
    assert fleet.m.holders(key(0)) == {"B": Tier.HOST}
    fleet.delete("B", 0)
    assert key(0) not in fleet.m.locations
    assert not fleet.m._runs  # both runs held nothing more: deleted


def test_malformed_entries_are_skipped_with_a_warning(caplog):
    m = mirror_with({"A": [0]})
    good = RunRecord.of([key(1)], [Tier.HOST]).encode()
    with caplog.at_level(logging.WARNING, logger="discovery.mirror"):
        m.put(run_path(NS, "A", 7), b"floppy")  # not a run record
        m.put(run_path(NS, "A", 8), good[:-1])  # cut short
        m.put(node_path(NS, "B"), b"\xff\xfe")  # not a record
        m.put(node_path(NS, "C"), NodeRecord("D", "x", 1).encode())  # another node's record
        m.put(b"/kvbm/v1/ns1/runs/A/nothex", good)
    assert m.malformed == 5
    assert "skipping malformed index entries" in caplog.text
    assert set(m.nodes) == {"A"} and set(m.locations) == {key(0)}


def test_memory_index_serves_a_single_node():
    async def scenario():
        idx = MemoryIndex(NS, NodeRecord("solo", "127.0.0.1", 7000))
        await idx.start()
        idx.publish({key(0): Tier.HOST, key(1): Tier.DISK})
        assert (await idx.lookup([key(0), key(1), key(2)])).local == 2
        idx.publish({}, [key(0)])
        assert (await idx.lookup([key(0), key(1)])).local == 0
        await idx.close()

    asyncio.run(scenario())


def test_blocks_with_the_same_holders_share_one_object():
    fleet = fleet_with({"A": list(range(100)), "B": list(range(50, 100))})
    m = fleet.m
    # 0..49 held by A alone, 50..99 by A and B: two shared holder sets in all
    assert len({id(h) for h in m.locations.values()}) == 2
    fleet.delete("B", 60)
    assert m.locations[key(60)] is m.locations[key(0)]
    assert m.holders(key(61)) == {"A": Tier.HOST, "B": Tier.HOST}


def test_lookup_handles_groups_that_change_tier_mid_run():
    fleet = fleet_with({"A": [0, 1, 2, 3]})
    fleet.put("A", 2, Tier.DISK)
    m = fleet.m
    r = m.lookup([key(i) for i in range(5)], "me")
    assert [(x.node_id, x.start, x.length) for x in r.runs] == [("A", 0, 4)]
    assert r.runs[0].tiers == (Tier.HOST, Tier.HOST, Tier.DISK, Tier.HOST)


def reference_lookup(
    model: dict[bytes, dict[str, Tier]], nodes: set[str], keys: list[bytes], local_node: str
) -> LookupResult:
    """The lookup's contract, key by key: the local prefix, then from each
    point the live peer with the longest run (the first such in holder order)."""
    i, n = 0, len(keys)
    while i < n and local_node in model.get(keys[i], {}):
        i += 1
    local, runs = i, []
    while i < n and keys[i] in model:
        best, best_end = None, i
        for node in model[keys[i]]:
            if node == local_node or node not in nodes:
                continue
            end = i + 1
            while end < n and node in model.get(keys[end], {}):
                end += 1
            if end > best_end:
                best, best_end = node, end
        if best is None:
            break
        tiers = tuple(model[keys[j]][best] for j in range(i, best_end))
        runs.append(PeerRun(best, i, best_end - i, tiers))
        i = best_end
    return LookupResult(local, tuple(runs))


NODES = ["me", "A", "B", "C"]
MIRROR_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "delete", "drop_node", "add_node"]),
        st.sampled_from(NODES),
        st.lists(st.integers(0, 11), min_size=1, max_size=5),  # one batch: a prompt's keys
        st.sampled_from([Tier.HOST, Tier.DISK]),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(MIRROR_OPS, st.lists(st.integers(0, 13), max_size=20))
def test_lookup_matches_a_key_by_key_model(ops, wanted):
    fleet = Fleet(IndexMirror(NS))
    m = fleet.m
    model: dict[bytes, dict[str, Tier]] = {}
    nodes: set[str] = set()
    for op, node, batch, tier in ops:
        if op == "put":
            fleet.apply(node, {key(i): tier for i in batch})
            for i in batch:
                model.setdefault(key(i), {})[node] = tier
        elif op == "delete":
            fleet.apply(node, {key(i): None for i in batch})
            for i in batch:
                model.get(key(i), {}).pop(node, None)
                if not model.get(key(i), True):
                    del model[key(i)]
        elif op == "add_node":
            m.put(node_path(NS, node), NodeRecord(node, "127.0.0.1", 7000).encode())
            nodes.add(node)
        else:
            m.delete(node_path(NS, node))
            nodes.discard(node)
    assert dict(m.locations.items()) == model
    assert len(m.locations) == len(model)
    for k in map(key, range(14)):
        assert m.holders(k) == model.get(k, {})
    for keys in ([key(i) for i in wanted], [key(i) for i in range(12)]):
        assert m.lookup(keys, "me") == reference_lookup(model, nodes, keys, "me")


# --- signed values, and the mirror's cap ---------------------------------------------------


def test_a_signed_value_opens_only_under_its_own_path_lease_and_secret():
    from discovery.signing import IndexSigner

    signer = IndexSigner(b"s" * 32)
    path = run_path(NS, "A", 1)
    data = signer.sign(path, b"host", lease=7, nonce=b"n" * 16, stamp=5, valid=9)
    opened = signer.open(path, data, lease=7)
    assert (opened.value, opened.session, opened.stamp, opened.valid) == (
        b"host",
        (7, b"n" * 16),
        5,
        9,
    )
    for bad_path, bad_data, lease in (
        (run_path(NS, "A", 2), data, 7),  # moved to another run
        (run_path(NS, "B", 1), data, 7),  # moved to another node
        (path, data, 8),  # put back under another lease
        (path, data[:-1] + bytes([data[-1] ^ 1]), 7),  # a flipped bit
        (path, data[:-40] + bytes([data[-40] ^ 1]) + data[-39:], 7),  # another stamp
        (path, b"host", 7),  # unsigned
        (path, b"", 7),
    ):
        with pytest.raises(ValueError):
            signer.open(bad_path, bad_data, lease)
    with pytest.raises(ValueError):
        IndexSigner(b"t" * 32).open(path, data, 7)  # another fleet's secret


class SignedFleet:
    """Values as nodes sign them, put into a signed mirror as etcd sends them."""

    def __init__(self) -> None:
        from discovery.signing import IndexSigner

        self.signer = IndexSigner(b"s" * 32)
        self.m = IndexMirror(NS, self.signer)
        self.now = 1_000_000
        self.m.clock = lambda: self.now

    def record(self, node: str, lease: int, nonce: bytes, stamp: int) -> tuple[bytes, bytes]:
        path = node_path(NS, node)
        value = NodeRecord(node, "127.0.0.1", 7000).encode()
        return path, self.signer.sign(path, value, lease, nonce, stamp, valid=10_000)

    def run(self, node: str, rid: int, keys: list[int], lease: int, nonce: bytes, stamp: int):
        path = run_path(NS, node, rid)
        value = RunRecord.of([key(i) for i in keys], [Tier.HOST] * len(keys)).encode()
        return path, self.signer.sign(path, value, lease, nonce, stamp)


def test_a_signed_mirror_drops_what_the_fleet_did_not_sign():
    f = SignedFleet()
    m = f.m
    path, data = f.record("A", 5, b"a" * 16, f.now)
    assert m.put(path, data, lease=5)
    good, forged = run_path(NS, "A", 1), run_path(NS, "A", 2)
    assert m.put(*f.run("A", 1, [1], 5, b"a" * 16, f.now), lease=5)
    m.put(forged, RunRecord.of([key(2)], [Tier.HOST]).encode(), lease=5)
    m.put(node_path(NS, "B"), NodeRecord("B", "127.0.0.1", 7000).encode())
    assert m.holders(key(1)) == {"A": Tier.HOST} and good in m._runs
    assert m.holders(key(2)) == {} and set(m.nodes) == {"A"}
    assert m.rejected == 2


def test_a_signed_mirror_believes_a_session_only_while_its_record_is_fresh():
    """What an etcd writer copies and puts back: under a lease of its own
    (refused: signed for another lease), under the dead node's lease id once
    its record is past its validity (refused: stale), an older copy of a run
    of a live session (refused); and a node's runs show only with its record."""
    f = SignedFleet()
    m, s1, s2 = f.m, b"1" * 16, b"2" * 16
    run = f.run("A", 0, [1, 2], 5, s1, f.now)
    assert m.put(*run, lease=5)  # before its record: kept, not shown
    assert m.holders(key(1)) == {} and m.lookup([key(1)], "me").total == 0
    rec = f.record("A", 5, s1, f.now)
    assert m.put(*rec, lease=5)
    assert m.holders(key(1)) == {"A": Tier.HOST}
    assert not m.put(*rec, lease=99)  # a copy under another lease
    newer = f.run("A", 0, [1], 5, s1, f.now + 1)
    assert m.put(*newer, lease=5) and m.holders(key(2)) == {}
    assert not m.put(*run, lease=5)  # the older copy of the run
    assert m.holders(key(2)) == {}
    # A stops refreshing: its record is past its validity, its runs go with it
    f.now += 10_000 + 2_001
    assert m.expire() == ["A"] and "A" not in m.nodes and m.holders(key(1)) == {}
    assert not m.put(*rec, lease=5)  # its last record put back under its old lease id
    assert "A" not in m.nodes and m.holders(key(1)) == {}
    # A restarts (a new nonce and lease): only the new session's runs show
    assert m.put(*f.record("A", 6, s2, f.now), lease=6)
    assert m.holders(key(1)) == {} and not m._runs
    assert not m.put(*newer, lease=5)  # the dead session's run
    assert m.put(*f.run("A", 0, [3], 6, s2, f.now), lease=6)
    assert m.holders(key(3)) == {"A": Tier.HOST} and m.holders(key(1)) == {}


def test_the_mirror_keeps_at_most_max_locations():
    fleet = Fleet(IndexMirror(NS, max_locations=3))
    m = fleet.m
    for i in range(5):
        fleet.put(f"N{i}", i)  # a run each
    assert len(m.locations) == 3 and m.over_cap == 2
    fleet.put("B", 0, Tier.DISK)  # a known key gains a holder: kept
    assert m.holders(key(0)) == {"N0": Tier.HOST, "B": Tier.DISK}
    fleet.delete("N1", 1)  # room again
    fleet.put("N5", 5)
    assert m.holders(key(5)) == {"N5": Tier.HOST}
    fleet.put("N4", 6)  # the run values kept are full too (6 keys): N4's grown run is refused
    assert m.holders(key(6)) == {} and m.over_cap == 3
    assert m.holders(key(0)) == {"N0": Tier.HOST, "B": Tier.DISK}  # what it had stays


def test_the_run_values_a_mirror_keeps_are_capped_too():
    """Many runs of the same keys cost the table nothing new (one location a
    key) but cost the mirror each run's value: those are capped at twice the
    table's cap, so a flood of runs (a fleet member gone bad) ends there."""
    fleet = Fleet(IndexMirror(NS, max_locations=3))
    for i in range(7):
        fleet.put(f"N{i}", 0)
    assert len(fleet.m.holders(key(0))) == 6 and fleet.m.over_cap == 1
    fleet.delete("N0", 0)  # room again
    fleet.put("N7", 1)
    assert fleet.m.holders(key(1)) == {"N7": Tier.HOST}


def test_a_cancelled_step_stops_its_task_whatever_the_etcd_client_raises():
    """The etcd client turns a cancellation inside a watch into its own
    connection error. A session step that took that for a lost connection
    went on reconnecting, and `EtcdIndex.close`, which awaits its cancelled
    tasks, waited forever (a test after another in one process took 120 s)."""
    import aetcd.exceptions

    from discovery.etcd_session import EtcdSession

    async def scenario() -> None:
        session = EtcdSession(["127.0.0.1:1"], "ns", NodeRecord("a", "127.0.0.1", 1))
        started = asyncio.Event()

        async def watch_like() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                raise aetcd.exceptions.ConnectionFailedError("watch cancelled") from None

        went_on = False

        async def task_body() -> None:
            nonlocal went_on
            while not await session.attempt(watch_like()):  # reconnects after a loss
                went_on = True  # a lost connection, it thought: stop the test's task
                return

        task = asyncio.create_task(task_body())
        await started.wait()
        task.cancel()
        await asyncio.wait([task], timeout=5)
        assert not went_on, "the cancelled task went on (a lost connection, it thought)"
        assert task.cancelled()

        async def lost() -> None:
            raise aetcd.exceptions.ConnectionFailedError("etcd gone")

        assert await session.attempt(lost()) is False  # not cancelled: a lost connection

    asyncio.run(scenario())
