"""The etcd index against a real etcd server: mirrors across nodes, leases on
node death, namespaces, hostile entries, and etcd itself dying under a running
cluster of node processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from discovery.errors import IndexUnavailable
from discovery.etcd_index import EtcdIndex, mirror_index
from discovery.etcd_server import EtcdServer, etcd_binary
from discovery.owners import places
from discovery.records import LookupResult, NodeRecord
from discovery.schema import run_path
from discovery.signing import IndexSigner
from discovery.tier import Tier
from tests.harness.ports import free_port

NS = "ns1"


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def node(endpoint: str, node_id: str, ns: str = NS, ttl: int = 10) -> EtcdIndex:
    return mirror_index([endpoint], ns, NodeRecord(node_id, "127.0.0.1", 7000), lease_ttl=ttl)


def seen(idx: EtcdIndex, keys: list[bytes]) -> LookupResult:
    """What `idx`'s mirror says of `keys` now (a lookup with no await)."""
    return idx.mirror.lookup(keys, idx.node.node_id)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_a_port_taken_before_the_first_start_is_exchanged_for_a_free_one():
    # a CI run lost a test to this: a port found free was bound by someone else
    # before etcd bound it, and etcd exited at start
    import socket

    server = EtcdServer()
    server.peer_port = taken_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", taken_port))
        taken.listen()
        with server:
            assert server.peer_port != taken_port
            assert server.proc.poll() is None


def test_a_publish_reaches_every_mirror(etcd):
    async def scenario():
        a, b = node(etcd.endpoint, "a"), node(etcd.endpoint, "b")
        await a.start()
        await b.start()
        try:
            ks = [key(i) for i in range(300)]
            # a publishes 300 blocks -> b's mirror sees them, lookup names a
            a.publish({k: Tier.HOST for k in ks[:200]} | {k: Tier.DISK for k in ks[200:]})
            await until(lambda: len(b.mirror.locations) == 300)
            r = seen(b, ks)
            assert r.local == 0 and [(x.node_id, x.length) for x in r.runs] == [("a", 300)]
            assert r.runs[0].tiers[199:201] == (Tier.HOST, Tier.DISK)
            # a's own view: all local
            await until(lambda: seen(a, ks).local == 300)
            # a drops 100 -> gone from b's mirror
            a.publish({}, ks[:100])
            await until(lambda: len(b.mirror.locations) == 200)
            assert seen(b, ks[:1]).total == 0
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_an_add_and_a_remove_inside_one_flush_cost_no_write(etcd):
    async def scenario():
        a = node(etcd.endpoint, "a")
        await a.start()
        try:
            a.publish({key(1): Tier.HOST})
            a.publish({}, [key(1)])
            await a.flush(timeout=5)
            assert a.layout.writes == 0
            # a repeated add of the same tier is no change either
            a.publish({key(2): Tier.HOST})
            await a.flush(timeout=5)
            a.publish({key(2): Tier.HOST})
            await a.flush(timeout=5)
            assert a.layout.writes == 1
        finally:
            await a.close()

    run(scenario())


def test_namespaces_never_see_each_other(etcd):
    async def scenario():
        a, c = node(etcd.endpoint, "a", "model-x"), node(etcd.endpoint, "c", "model-y")
        b = node(etcd.endpoint, "b", "model-x")
        for n in (a, b, c):
            await n.start()
        try:
            a.publish({key(1): Tier.HOST})
            c.publish({key(1): Tier.HOST, key(2): Tier.HOST})
            await a.flush(timeout=5)
            await c.flush(timeout=5)
            await until(lambda: key(1) in b.mirror.locations)
            await asyncio.sleep(0.2)
            assert b.mirror.holders(key(1)) == {"a": Tier.HOST}
            assert key(2) not in b.mirror.locations
            assert set(b.mirror.nodes) == {"a", "b"}
        finally:
            for n in (a, b, c):
                await n.close()

    run(scenario())


def test_a_malformed_entry_written_by_hand_is_skipped(etcd, caplog):
    async def scenario():
        b = node(etcd.endpoint, "b")
        await b.start()
        try:
            etcdctl = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
            bad = {
                run_path(NS, "a", 1).decode(): "not-a-run",
                "/kvbm/v1/ns1/nodes/x": "garbage",
                "/kvbm/v1/ns1/runs/a/zz": "host",
            }
            for path, value in bad.items():
                subprocess.run(
                    [etcdctl, f"--endpoints={etcd.endpoint}", "put", path, value],
                    check=True,
                    capture_output=True,
                )
            await until(lambda: b.mirror.malformed == 3)
            assert b.mirror.locations == {}
            assert "x" not in b.mirror.nodes
            # the mirror goes on working
            a = node(etcd.endpoint, "a")
            await a.start()
            a.publish({key(5): Tier.DISK})
            await until(lambda: seen(b, [key(5)]).total == 1)
            await a.close()
        finally:
            await b.close()

    with caplog.at_level(logging.WARNING, logger="discovery.mirror"):
        run(scenario())
    assert "skipping malformed index entries" in caplog.text


def test_a_closed_node_vanishes_at_once(etcd):
    async def scenario():
        a, b = node(etcd.endpoint, "a"), node(etcd.endpoint, "b")
        await a.start()
        await b.start()
        a.publish({key(i): Tier.HOST for i in range(50)})
        await until(lambda: len(b.mirror.locations) == 50)
        # a revokes its lease on close: far sooner than its 10 s TTL
        await a.close()
        took = await until(lambda: not b.mirror.locations and "a" not in b.mirror.nodes, 3)
        assert took < 3
        await b.close()

    run(scenario())


def test_unreachable_etcd_at_start_is_a_clear_error():
    async def scenario():
        a = mirror_index(["127.0.0.1:1"], NS, NodeRecord("a", "127.0.0.1", 1), timeout=1)
        with pytest.raises(IndexUnavailable, match="cannot reach etcd"):
            await a.start()

    run(scenario())


# -- real node processes -----------------------------------------------------
class NodeProcess:
    def __init__(self, endpoint: str, node_id: str, ttl: int, layout: str = "mirror") -> None:
        self.node_id = node_id
        args = [endpoint, NS, node_id, str(ttl)] + (["sharded"] if layout == "sharded" else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.index_node", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def ask(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", f"{self.node_id} did not answer"

    def dump(self, path: str) -> dict:
        self.ask(f"dump {path}")
        with open(path) as f:
            return json.load(f)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []
    yield started
    for n in started:
        n.stop()


def test_a_killed_node_vanishes_from_mirrors_within_its_ttl(etcd, nodes):
    ttl = 2
    dead = NodeProcess(etcd.endpoint, "doomed", ttl)
    nodes.append(dead)
    time.sleep(0.3)  # publish for a while
    dead.ask("churn off")
    dead.ask("flush")

    async def scenario():
        b = node(etcd.endpoint, "b")
        await b.start()
        try:
            assert "doomed" in b.mirror.nodes and b.mirror.locations
            os.kill(dead.proc.pid, signal.SIGKILL)
            took = await until(
                lambda: not b.mirror.locations and not b.mirror.nodes.keys() - {"b"}, ttl + 5
            )
            # the lease expires ~TTL after the last refresh, which was up to TTL/3 before death
            assert took <= ttl + 1
        finally:
            await b.close()

    run(scenario())


def truth_of(dumps: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Who holds what, from each node's own state."""
    truth: dict[str, dict[str, str]] = {}
    for name, d in dumps.items():
        for k, tier in d["state"].items():
            truth.setdefault(k, {})[name] = tier
    return truth


def assert_index_is_the_truth(dumps: dict[str, dict], layout: str) -> None:
    """Mirror: every node's mirror equals the truth, key by key. Sharded: the
    owners' shares together equal it, key (x) by key, each key at one owner."""
    truth = truth_of(dumps)
    assert truth, "the churn published nothing"
    if layout == "mirror":
        for name, d in dumps.items():
            assert d["mirror"] == truth, f"{name}'s mirror differs from the published truth"
        return
    by_x = {f"{int(places([bytes.fromhex(k)])[0]):016x}": h for k, h in truth.items()}
    owned: dict[str, dict[str, str]] = {}
    for d in dumps.values():
        for x, holders in d["owned"].items():
            assert x not in owned, f"{x} has two owners"
            owned[x] = holders
    assert owned == by_x, "the owners' shares differ from the published truth"
    assert all(d["owned"] for d in dumps.values()), "a node owns nothing"


def test_a_killed_sharded_nodes_locations_leave_the_owners_within_its_ttl(etcd, nodes, tmp_path):
    ttl = 2
    for name in ("n1", "n2", "doomed"):
        nodes.append(NodeProcess(etcd.endpoint, name, ttl, layout="sharded"))
    time.sleep(0.5)  # churn: every node's locations reach their owners
    for n in nodes:
        n.ask("churn off")
    for n in nodes:
        n.ask("flush")
    live, (doomed,) = nodes[:2], nodes[2:]

    def doomed_at_owners() -> int:
        dumps = [n.dump(str(tmp_path / f"{n.node_id}.json")) for n in live]
        return sum("doomed" in h for d in dumps for h in d["owned"].values())

    assert doomed_at_owners() > 0
    os.kill(doomed.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while doomed_at_owners():
        assert time.monotonic() - t0 < ttl + 5, "the dead node's locations stayed"
        time.sleep(0.05)
    # the lease expires ~TTL after the last refresh, which was up to TTL/3 before death
    assert time.monotonic() - t0 <= ttl + 1


@pytest.mark.parametrize("layout", ["mirror", "sharded"])
def test_etcd_killed_and_restarted_under_a_running_cluster(etcd, nodes, tmp_path, layout):
    for name in ("n1", "n2", "n3"):
        nodes.append(NodeProcess(etcd.endpoint, name, ttl=10, layout=layout))
    time.sleep(1.0)  # churn with etcd up
    etcd.kill()
    before = {n.node_id: n.dump(str(tmp_path / f"{n.node_id}-down.json")) for n in nodes}
    time.sleep(2.0)  # churn with etcd down: changes buffer, lookups go on
    during = {n.node_id: n.dump(str(tmp_path / f"{n.node_id}-down2.json")) for n in nodes}
    etcd.start()
    time.sleep(1.5)  # churn with etcd back
    for n in nodes:
        n.ask("churn off")
    for n in nodes:
        n.ask("flush")
    time.sleep(0.5)  # the last events reach every watch
    after = {n.node_id: n.dump(str(tmp_path / f"{n.node_id}.json")) for n in nodes}

    for n in nodes:
        assert n.proc.poll() is None, f"{n.node_id} crashed"
    for name in after:
        # local serving went on while etcd was down
        assert during[name]["lookups"] > before[name]["lookups"]
        assert not during[name]["connected"]
        assert after[name]["connected"]
        assert after[name]["nodes"] == ["n1", "n2", "n3"]
    assert_index_is_the_truth(after, layout)


@pytest.mark.parametrize("layout", ["mirror", "sharded"])
def test_a_wiped_etcd_gets_every_node_back(etcd, nodes, tmp_path, layout):
    # etcd comes back empty (a replaced cluster): leases and history are gone, so
    # every node must take a new lease, republish its state, and re-read the index
    for name in ("n1", "n2"):
        nodes.append(NodeProcess(etcd.endpoint, name, ttl=10, layout=layout))
    time.sleep(1.0)
    etcd.kill()
    etcd.wipe()
    etcd.start()
    time.sleep(2.0)
    for n in nodes:
        n.ask("churn off")
    for n in nodes:
        n.ask("flush")
    time.sleep(0.5)
    after = {n.node_id: n.dump(str(tmp_path / f"{n.node_id}.json")) for n in nodes}
    for d in after.values():
        assert d["nodes"] == ["n1", "n2"]
    assert_index_is_the_truth(after, layout)


def test_a_hostile_node_record_is_skipped_and_nobody_crashes(etcd, caplog):
    import aetcd
    import msgpack

    async def scenario():
        raw = aetcd.Client(host=etcd.host, port=etcd.client_port)
        await raw.connect()
        # a record whose port overflows any integer conversion
        evil = msgpack.packb({"v": 1, "node_id": "evil", "address": "x", "rpc_port": float("inf")})
        await raw.put(b"/kvbm/v1/ns1/nodes/evil", evil)
        b = node(etcd.endpoint, "b")
        await b.start()  # the range read meets it: skipped
        a = node(etcd.endpoint, "a")
        await a.start()
        await raw.put(b"/kvbm/v1/ns1/nodes/evil2", evil)  # the watch meets it: skipped
        a.publish({key(9): Tier.HOST})
        await until(lambda: seen(b, [key(9)]).total == 1)
        assert "evil" not in b.mirror.nodes and "evil2" not in b.mirror.nodes
        assert b.mirror.malformed >= 2
        await raw.close()
        await a.close()
        await b.close()

    with caplog.at_level(logging.WARNING, logger="discovery.mirror"):
        run(scenario())


def test_a_large_namespace_loads_past_grpcs_default_message_cap(etcd):
    async def scenario():
        a = node(etcd.endpoint, "a")
        await a.start()
        # ~60,000 locations: a range read of about 6 MB, over gRPC's 4 MiB default
        a.publish({i.to_bytes(26, "little"): Tier.HOST for i in range(60_000)})
        await a.flush(timeout=60)
        b = node(etcd.endpoint, "b")
        await b.start()
        assert len(b.mirror.locations) == 60_000
        await a.close()
        await b.close()

    run(scenario())


def test_a_write_that_committed_but_lost_its_reply_leaves_nothing_stale(etcd, monkeypatch):
    import aetcd
    import aetcd.exceptions

    real = aetcd.Client.transaction
    calls = {"n": 0}

    async def commits_then_fails(self, *args, **kwargs):
        calls["n"] += 1
        result = await real(self, *args, **kwargs)
        if calls["n"] == 1:
            raise aetcd.exceptions.ConnectionFailedError("injected: reply lost after commit")
        return result

    async def scenario():
        a, b = node(etcd.endpoint, "a"), node(etcd.endpoint, "b")
        await a.start()
        await b.start()
        monkeypatch.setattr(aetcd.Client, "transaction", commits_then_fails)
        a.publish({key(1): Tier.HOST})
        await until(lambda: calls["n"] >= 1)
        # the add reached etcd, though a was told it failed; now the block goes
        a.publish({}, [key(1)])
        await a.flush(timeout=10)
        await until(lambda: key(1) not in b.mirror.locations, 5)
        raw = aetcd.Client(host=etcd.host, port=etcd.client_port)
        await raw.connect()
        assert await raw.get(run_path(NS, "a", 0)) is None
        await raw.close()
        await a.close()
        await b.close()

    run(scenario())


def test_a_namespace_larger_than_a_message_is_read_in_pages(etcd):
    """An etcd writer filled the namespace with 80 values of 1 MiB (more than
    the 64 MiB a node accepts in one message) and 12,000 small ones: one
    range read of it all is refused by the cap, while a node's paged read
    gets every key (the big ones in smaller pages) and its mirror drops them
    all (unsigned)."""
    from aetcd import rpc

    from discovery.etcd_client import MAX_MESSAGE_BYTES, PAGE_KEYS, open_client, read_prefix
    from discovery.schema import namespace_prefix

    prefix = namespace_prefix(NS)
    big, small = 80, PAGE_KEYS + 2000
    assert big << 20 > MAX_MESSAGE_BYTES

    async def scenario() -> None:
        client = open_client(etcd.endpoint, 10.0)
        try:
            for i in range(big):
                await client.put(prefix + b"loc/%06d" % i, os.urandom(1 << 20))
            for start in range(0, small, 128):
                puts = [
                    client.transactions.put(prefix + b"nodes/x%06d" % i, b"junk")
                    for i in range(start, min(small, start + 128))
                ]
                await client.transaction(compare=[], success=puts, failure=[])
            whole = rpc.RangeRequest(key=prefix, range_end=prefix[:-1] + b"0")
            with pytest.raises(rpc.AioRpcError) as refused:
                await client.kvstub.Range(whole, timeout=30)
            assert refused.value.code().name == "RESOURCE_EXHAUSTED"
            _, _, kvs = await read_prefix(client, prefix)
            assert len(kvs) == big + small
            assert len({kv.key for kv in kvs}) == big + small
        finally:
            await client.close()
        record = NodeRecord("reader", "127.0.0.1", 7000)
        idx = mirror_index([etcd.endpoint], NS, record, signer=IndexSigner(os.urandom(32)))
        await idx.start()
        try:
            assert idx.mirror.rejected >= big + small  # unsigned: none reached the mirror
            assert not idx.mirror.locations
        finally:
            await idx.close()

    asyncio.run(scenario())
