"""The sharded index's calls between nodes over the real peer RPC (real
handshake, sealed frames, a real NIXL agent per node): a peer tells an
owner what it holds and asks it who holds what; a malformed call costs the
caller its connection, not the owner its table. And the index over a real
etcd: the fleet bench's nodes index every block they hold; an etcd writer
without the secret cannot move a node's session."""

from __future__ import annotations

import asyncio

import pytest

from discovery.etcd_index import EtcdIndex, sharded_index
from discovery.owners import places, shard_at
from discovery.records import NodeRecord
from discovery.schema import node_path
from discovery.sharded import ShardedLocations
from discovery.signing import IndexSigner
from discovery.tier import Tier
from kvbm.node.index_calls import INDEX_CALLS, locate, owner_calls, place
from kvbm.peer_blocks import ManagerBlocks
from tests.harness.support import keys
from transport.errors import TransportError
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient, PeerServer

SECRET = b"k" * 32


def agent_for(mgr, name: str) -> NixlAgent:
    return NixlAgent(name, mgr.host.arena.array.ctypes.data, mgr.host.arena.size)


async def _nothing(*_args):
    return None


class Pair:
    """Node a's peer RPC server (owning `owner`'s shards), and clients of b's."""

    def __init__(self, a, b, owner: ShardedLocations | None = None) -> None:
        self.a, self.b, self.owner = a, b, owner

    async def __aenter__(self) -> Pair:
        self.agent_a, self.agent_b = agent_for(self.a, "node-a"), agent_for(self.b, "node-b")
        calls = owner_calls(self.owner) if self.owner is not None else None
        self.server = PeerServer(
            ManagerBlocks(self.a), self.agent_a, SECRET, node_id="node-a", calls=calls
        )
        self.port = await self.server.start("127.0.0.1", 0)
        self.clients: list[PeerClient] = []
        return self

    async def client(self) -> PeerClient:
        c = PeerClient(self.agent_b, SECRET, [self.a.geometry.fingerprint], "node-b", INDEX_CALLS)
        self.clients.append(c)
        await c.connect("127.0.0.1", self.port)
        return c

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            await c.close()
        await self.server.close()
        self.agent_a.close()
        self.agent_b.close()


def test_a_peer_places_its_keys_at_the_owner_and_locates_them(make_manager):
    a, b = make_manager(host_slots=2), make_manager(host_slots=2)
    owner = ShardedLocations("node-a", _nothing, _nothing)
    owner.set_members({"node-a": 3, "node-b": 7})  # b's record is under lease 7
    mine = owner.ring.shards_of("node-a")
    xs = places(keys(0, 100))
    xs = xs[mine[shard_at(xs)]][:6]  # keys a owns

    async def scenario():
        async with Pair(a, b, owner) as pair:
            client = await pair.client()
            assert await place(client, 7, xs, ["host"] * 4 + ["disk", None], 5.0) is True
            got = await locate(client, xs, 5.0)  # runs of keys with the same holders
            assert got == [(4, {"node-b": "host"}), (1, {"node-b": "disk"}), (1, {})]
            assert await place(client, 6, xs[:1], [None], 5.0) is False  # not b's record's lease
            # the holder is the node id of the connection's hello, never one the body names
            assert owner.holders(xs[:1]) == [(1, {"node-b": Tier.HOST})]
            # a tier that is not one: the call fails, the owner's table stands
            with pytest.raises(TransportError):
                await place(client, 7, xs[:1], ["tape"], 5.0)
            for bad in (
                {"places": xs[:2].tobytes(), "tiers": ["host"], "session": 7},  # 1 tier, 2 keys
                {"places": xs[:2].tobytes()[:12], "tiers": ["host"], "session": 7},  # 1.5 keys
                {"places": [int(x) for x in xs[:1]], "tiers": ["host"], "session": 7},
            ):
                again = await pair.client()
                with pytest.raises(TransportError):  # closed
                    await again.call("place", bad, 5)
            third = await pair.client()
            assert await locate(third, xs[:2], 5.0) == [(2, {"node-b": "host"})]
            assert owner.holders(xs[:1]) == [(1, {"node-b": Tier.HOST})]

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_node_without_shards_refuses_index_calls(make_manager):
    a, b = make_manager(host_slots=2), make_manager(host_slots=2)

    async def scenario():
        async with Pair(a, b) as pair:
            client = await pair.client()
            with pytest.raises(TransportError):
                await locate(client, places(keys(0, 1)), 5.0)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_the_sharded_fleet_bench_indexes_every_block_its_nodes_hold(etcd):
    from kvbm.bench.index_sharded import sharded_fleet

    out = asyncio.run(sharded_fleet(etcd.endpoint, 3, 4, warmup_s=0.5, seconds=1.0, lookups=50))
    assert out["fleet_blocks_in_index"] == out["fleet_blocks_held"] > 0
    assert out["lookup_blocks_found_per_prompt"] > 0
    assert out["owner_locations_max_vs_mean"] < 2


class InProcessFleet:
    """EtcdIndexes with sharded locations against a real etcd, the calls
    between them made in process (the peer RPC is tested above)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.nodes: dict[str, ShardedLocations] = {}

    def index(self, name: str) -> EtcdIndex:
        async def send(owner, session, ks, ts):
            return self.nodes[owner].place(name, session, ks, ts)

        self.nodes[name] = ShardedLocations(name, send)
        record = NodeRecord(name, "127.0.0.1", 7000, fingerprints=(1,))
        return sharded_index(
            [self.endpoint],
            "ns",
            record,
            self.nodes[name],
            flush_interval=0.05,
            signer=IndexSigner(SECRET),
        )

    def total(self) -> int:
        return sum(len(n.table) for n in self.nodes.values())

    async def until(self, what, timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.05)):
            if what():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("not within the time")


def test_a_joining_owner_gets_its_share_from_an_idle_holder_and_a_replayed_record_heals(etcd):
    fleet = InProcessFleet(etcd.endpoint)

    async def scenario():
        a, b = fleet.index("node-a"), fleet.index("node-b")
        await a.start()
        await b.start()
        c = None
        try:
            b.publish(dict.fromkeys(keys(0, 64), Tier.HOST))
            await fleet.until(lambda: fleet.total() == 64)
            # c joins; b publishes nothing more: c's share still reaches c
            c = fleet.index("node-c")
            await c.start()
            await fleet.until(lambda: len(fleet.nodes["node-c"].table) > 0 and fleet.total() == 64)
            # an etcd writer without the secret puts b's own signed record back
            # under a lease of its own: signed for b's lease, it is not believed
            # (owners keep b's session), and b's next keepalive puts it back
            client = a.session.live()
            path = node_path("ns", "node-b")
            got = await client.get(path)
            forged = await client.lease(30)
            await client.put(path, got.value, lease=forged.id)
            await fleet.until(lambda: a.mirror.rejected >= 1, 5)
            assert a.layout.leases.get("node-b") == b.session.lease and fleet.total() == 64

            async def back() -> bool:
                return (await client.get(path)).lease == b.session.lease

            for _ in range(int(b.session.lease_ttl / 3 / 0.05) + 40):
                if await back():
                    break
                await asyncio.sleep(0.05)
            assert await back()
            assert a.layout.leases.get("node-b") == b.session.lease and fleet.total() == 64
        finally:
            for idx in (a, b, c):
                if idx is not None:
                    await idx.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_an_unsigned_record_under_a_members_id_does_not_move_its_session(etcd):
    """An etcd writer without the secret rewrites node-b's record under a
    lease of its own: owners keep node-b's session and its locations."""
    signer = IndexSigner(SECRET)
    nodes: dict[str, ShardedLocations] = {}

    def index(name: str) -> EtcdIndex:
        async def send(owner, session, ks, ts):
            return nodes[owner].place(name, session, ks, ts)

        nodes[name] = ShardedLocations(name, send)
        record = NodeRecord(name, "127.0.0.1", 7000, fingerprints=(1,))
        return sharded_index(
            [etcd.endpoint], "ns", record, nodes[name], flush_interval=0.05, signer=signer
        )

    async def scenario():
        a, b = index("node-a"), index("node-b")
        await a.start()
        await b.start()
        try:
            ks = keys(0, 64)
            b.publish(dict.fromkeys(ks, Tier.HOST))
            for _ in range(100):
                if sum(len(n.table) for n in nodes.values()) == 64:
                    break
                await asyncio.sleep(0.05)
            lease = a.layout.leases["node-b"]
            client = a.session.live()
            forged = await client.lease(30)
            path = node_path("ns", "node-b")
            fake = NodeRecord("node-b", "127.0.0.9", 7000, fingerprints=(1,)).encode()
            await client.put(path, fake, lease=forged.id)
            await asyncio.sleep(0.5)  # the watch has delivered it
            assert a.mirror.rejected >= 1  # seen, and refused
            assert a.layout.leases["node-b"] == lease
            assert sum(len(n.table) for n in nodes.values()) == 64
        finally:
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
