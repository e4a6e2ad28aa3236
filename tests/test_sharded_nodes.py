"""The sharded index's calls between nodes over the real peer RPC (real
handshake, sealed frames, a real NIXL agent per node): a peer tells an
owner what it holds and asks it who holds what; a malformed call costs the
caller its connection, not the owner its table."""

from __future__ import annotations

import asyncio

import pytest

from discovery.owner_table import key_x
from discovery.owners import shard_of
from discovery.records import Tier
from discovery.sharded import ShardedLocations
from kvbm.peer_tiers import ManagerTiers
from tests.support import keys
from transport.errors import TransportError
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient, PeerServer, locate, place

SECRET = b"k" * 32


def agent_for(mgr, name: str) -> NixlAgent:
    return NixlAgent(name, mgr.host.arena.array.ctypes.data, mgr.host.arena.size)


async def _nothing(*_args):
    return None


def test_a_peer_places_its_keys_at_the_owner_and_locates_them(make_manager):
    a, b = make_manager(host_slots=2), make_manager(host_slots=2)
    owner = ShardedLocations("node-a", _nothing, _nothing)
    owner.set_members({"node-a": 3, "node-b": 7})  # b's record is under lease 7
    mine = owner.ring.shards_of("node-a")
    ks = [k for k in keys(0, 100) if mine[shard_of(key_x([k]))[0]]][:6]  # keys a owns

    async def scenario():
        agent_a, agent_b = agent_for(a, "node-a"), agent_for(b, "node-b")
        server = PeerServer(ManagerTiers(a), agent_a, SECRET, node_id="node-a", owner=owner)
        port = await server.start("127.0.0.1", 0)
        client = PeerClient(agent_b, SECRET, [a.geometry.fingerprint], "node-b")
        try:
            await client.connect("127.0.0.1", port)
            assert await place(client, 7, ks, ["host"] * 4 + ["disk", None], 5.0) is True
            got = await locate(client, ks, 5.0)
            assert got == [{"node-b": "host"}] * 4 + [{"node-b": "disk"}, {}]
            assert await place(client, 6, ks[:1], [None], 5.0) is False  # not b's record's lease
            # the node id is the one the handshake proved, whatever the body says
            assert owner.holders(ks[:1]) == [{"node-b": Tier.HOST}]
            # a tier that is not one: the call fails, the owner's table stands
            with pytest.raises(TransportError):
                await place(client, 7, ks[:1], ["tape"], 5.0)
            again = PeerClient(agent_b, SECRET, [a.geometry.fingerprint], "node-b")
            try:
                await again.connect("127.0.0.1", port)
                with pytest.raises(TransportError):  # one tier for two keys: closed
                    body = {"keys": ks[:2], "tiers": ["host"], "session": 7}
                    await again.call("place", body, 5)
            finally:
                await again.close()
            third = PeerClient(agent_b, SECRET, [a.geometry.fingerprint], "node-b")
            try:
                await third.connect("127.0.0.1", port)
                assert await locate(third, ks[:2], 5.0) == [{"node-b": "host"}] * 2
            finally:
                await third.close()
        finally:
            await client.close()
            await server.close()
            agent_a.close()
            agent_b.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_node_without_shards_refuses_index_calls(make_manager):
    a, b = make_manager(host_slots=2), make_manager(host_slots=2)

    async def scenario():
        agent_a, agent_b = agent_for(a, "node-a3"), agent_for(b, "node-b3")
        server = PeerServer(ManagerTiers(a), agent_a, SECRET)
        port = await server.start("127.0.0.1", 0)
        client = PeerClient(agent_b, SECRET, [a.geometry.fingerprint])
        try:
            await client.connect("127.0.0.1", port)
            with pytest.raises(TransportError):
                await locate(client, keys(0, 1), 5.0)
        finally:
            await client.close()
            await server.close()
            agent_a.close()
            agent_b.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
