"""A pull between two nodes' real tiers over the real peer RPC and real NIXL
(UCX): blocks from the peer's host and disk tiers arrive bit-exact, pins are
released, and a flipped byte on the peer is caught by the checksum."""

from __future__ import annotations

import asyncio

import pytest
import torch

from discovery.records import NodeRecord
from discovery.tier import Tier
from kvbm.connector.direct import onboard
from kvbm.node.peer_pool import PeerPool
from kvbm.peer_blocks import ManagerBlocks
from tests.harness.support import GEOMETRY, Engine, keys, store
from transport.errors import TransportError
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient, PeerServer, pull, round_blocks
from transport.peer_rpc import server as peer_server

SECRET = b"k" * 32


def agent_for(mgr, name: str) -> NixlAgent:
    return NixlAgent(name, mgr.host.arena.array.ctypes.data, mgr.host.arena.size)


def test_pull_from_a_peers_host_and_disk_tiers(make_manager, tmp_path):
    a = make_manager(host_slots=8, disk_slots=32, disk_dir=tmp_path / "a")
    b = make_manager(host_slots=16, disk_slots=0)
    on_disk, in_host = keys(0, 4), keys(4, 4)
    assert store(a, on_disk) == len(on_disk)
    assert store(a, keys(100, 8)) == len(keys(100, 8))  # pushes on_disk out to G3
    assert store(a, in_host) == len(in_host)
    wanted = on_disk + in_host
    assert a.lookup(wanted).tiers == (Tier.DISK,) * 4 + (Tier.HOST,) * 4

    async def scenario():
        agent_a, agent_b = agent_for(a, "node-a"), agent_for(b, "node-b")
        server = PeerServer(ManagerBlocks(a), agent_a, SECRET, pin_ttl=5)
        port = await server.start("127.0.0.1", 0)
        client = PeerClient(agent_b, SECRET, [a.geometry.fingerprint])
        try:
            await client.connect("127.0.0.1", port)
            arrived = await pull(client, list(wanted), ManagerBlocks(b))
            assert arrived == list(wanted)
            # the peer's pins are all released (unpins go out without waiting)
            for _ in range(200):
                if server.pins == {} and sum(a.host.table.pins) == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.pins == {} and sum(a.host.table.pins) == 0
        finally:
            await client.close()
            await server.close()
            agent_a.close()
            agent_b.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    # b now holds them in G2, bit-exact
    eng = Engine(8)
    assert onboard(b, eng.kv, wanted, list(range(8))) == 8
    assert all(eng.holds(k, i) for i, k in enumerate(wanted))


def test_a_flipped_byte_on_the_peer_is_rejected(make_manager):
    a = make_manager(host_slots=8)
    b = make_manager(host_slots=8)
    ks = keys(0, 3)
    assert store(a, ks) == len(ks)
    plan = a.prepare_load(ks)
    a.checksum_plan(plan)  # checksums taken, as for any block that left a's G2 before
    # then a byte of block 1 changes in a's arena
    view = a.host.block_view(plan.slots[1])
    view[10] = view[10] ^ 0xFF
    a.complete_load(plan)

    async def scenario():
        agent_a, agent_b = agent_for(a, "node-a2"), agent_for(b, "node-b2")
        server = PeerServer(ManagerBlocks(a), agent_a, SECRET)
        port = await server.start("127.0.0.1", 0)
        client = PeerClient(agent_b, SECRET, [a.geometry.fingerprint])
        try:
            await client.connect("127.0.0.1", port)
            return await pull(client, list(ks), ManagerBlocks(b))
        finally:
            await client.close()
            await server.close()
            agent_a.close()
            agent_b.close()

    arrived = asyncio.run(asyncio.wait_for(scenario(), 60))
    # block 1 is refused, counted, never registered: the usable prefix ends at it
    assert arrived == [ks[0]]
    assert b.host.table.get(ks[1]) is None
    assert b.metrics.value("kvbm_tier_checksum_failures_total", tier="peer") == 1
    assert b.lookup(ks).num_blocks == 1
    eng = Engine(1)
    assert onboard(b, eng.kv, ks[:1], [0]) == 1 and eng.holds(ks[0], 0)
    assert not torch.equal(eng.layers[0][0], torch.zeros_like(eng.layers[0][0]))


def test_a_pull_of_many_rounds_keeps_the_prefix_order(make_manager):
    """40 blocks in rounds of 8, first with the peer's cap at 6 pins (short
    rounds, asked again once unpinned) and at 8, then with a byte flipped in
    block 20: the pull stops there, whatever later rounds brought."""
    n = 40
    round_bytes = 8 * GEOMETRY.block_bytes
    assert round_blocks(GEOMETRY.block_bytes, round_bytes) == 8
    a = make_manager(host_slots=n)
    ks = keys(0, n)
    assert store(a, ks) == n

    async def pull_all(b, **server_kw):
        async with Pair(a, b, **server_kw) as p:
            return await pull(p.client, list(ks), ManagerBlocks(b), round_bytes=round_bytes)

    b = make_manager(host_slots=n)
    assert asyncio.run(asyncio.wait_for(pull_all(b, max_pins_per_peer=6), 60)) == ks
    # a cap of one round: each next round, pinned while ours is held, comes
    # back empty, and is asked again once ours is released
    b8 = make_manager(host_slots=n)
    assert asyncio.run(asyncio.wait_for(pull_all(b8, max_pins_per_peer=8), 60)) == ks
    eng = Engine(n)
    assert onboard(b, eng.kv, ks, list(range(n))) == n
    assert all(eng.holds(k, i) for i, k in enumerate(ks))

    plan = a.prepare_load(ks[20:21])
    a.checksum_plan(plan)
    view = a.host.block_view(plan.slots[0])
    view[3] = view[3] ^ 0x01
    a.complete_load(plan)
    c = make_manager(host_slots=n)
    assert asyncio.run(asyncio.wait_for(pull_all(c), 60)) == ks[:20]
    assert c.host.table.get(ks[20]) is None
    assert c.lookup(ks).num_blocks == 20


def test_a_pull_into_a_full_host_tier_reports_only_what_arrived(make_manager):
    """b's host tier is 4 slots, 2 of them pinned by a reader: 2 of a's 6
    blocks fit, and the pull says so (the rest are not "held here")."""
    a = make_manager(host_slots=8)
    b = make_manager(host_slots=4)
    ks = keys(0, 6)
    assert store(a, ks) == 6
    mine = keys(100, 2)
    assert store(b, mine) == 2
    reading = b.prepare_load(mine)  # pinned: b cannot evict them
    try:

        async def scenario():
            async with Pair(a, b) as p:
                return await pull(p.client, list(ks), ManagerBlocks(b))

        arrived = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        b.complete_load(reading)
    assert arrived == ks[:2]
    assert b.lookup(ks).num_blocks == 2
    b.host.table.check()


class Pair:
    """Node a serving over the peer RPC, node b's client connected to it."""

    def __init__(self, a, b, **server_kw) -> None:
        self.a, self.b, self.server_kw = a, b, server_kw

    async def __aenter__(self):
        self.agent_a = agent_for(self.a, f"a-{id(self)}")
        self.agent_b = agent_for(self.b, f"b-{id(self)}")
        self.server = PeerServer(ManagerBlocks(self.a), self.agent_a, SECRET, **self.server_kw)
        self.port = await self.server.start("127.0.0.1", 0)
        self.client = PeerClient(self.agent_b, SECRET, [self.a.geometry.fingerprint])
        await self.client.connect("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await self.server.close()
        self.agent_a.close()
        self.agent_b.close()


def test_bad_input_closes_only_that_connection(make_manager, caplog):
    import logging
    import os

    a, b = make_manager(host_slots=8), make_manager(host_slots=8)
    ks = keys(0, 2)
    assert store(a, ks) == len(ks)

    async def scenario():
        async with Pair(a, b) as p:
            for junk in (os.urandom(64), b"\xff\xff\xff\xff", b"\x00\x00\x00\x40" + b"x" * 10):
                reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
                writer.write(junk)
                await writer.drain()
                if junk.startswith(b"\x00\x00\x00\x40"):
                    writer.write_eof()  # a truncated frame
                # the server hangs up on this connection
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            # ... and goes on serving the well-behaved peer
            return await pull(p.client, list(ks), ManagerBlocks(b))

    with caplog.at_level(logging.WARNING, logger="transport.rpc"):
        arrived = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert arrived == list(ks)
    assert "closing peer connection" in caplog.text


def test_pins_of_a_requester_that_vanished_expire(make_manager):
    a, b = make_manager(host_slots=8), make_manager(host_slots=8)
    ks = keys(0, 3)
    assert store(a, ks) == len(ks)

    async def scenario():
        async with Pair(a, b, pin_ttl=0.4, max_pins_per_peer=2) as p:
            # a pin, never unpinned (the requester "dies"); the cap allows two
            reply = await p.client.call("pin", {"keys": list(ks)}, 5)
            assert len(reply["blocks"]) == 2
            assert sum(a.host.table.pins) == 2
            await asyncio.sleep(1.0)
            # expired: released, the blocks evictable again
            assert p.server.pins == {} and sum(a.host.table.pins) == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))
    a.host.table.check()


def test_a_peer_without_the_secret_or_the_layout_is_refused(make_manager):
    from kvbm.layout import ModelGeometry

    a, b = make_manager(host_slots=8), make_manager(host_slots=8)

    async def scenario():
        agent_a, agent_b = agent_for(a, "a-refuse"), agent_for(b, "b-refuse")
        server = PeerServer(ManagerBlocks(a), agent_a, SECRET)
        port = await server.start("127.0.0.1", 0)
        try:
            wrong_key = PeerClient(agent_b, b"w" * 32, [a.geometry.fingerprint])
            other = ModelGeometry(num_layers=9, num_kv_heads=2, head_dim=16, block_size=32)
            wrong_layout = PeerClient(agent_b, SECRET, [other.fingerprint])
            for client in (wrong_key, wrong_layout):
                try:  # the server hangs up on the hello, before saying anything
                    with pytest.raises(TransportError, match="hung up during the handshake"):
                        await client.connect("127.0.0.1", port, timeout=5)
                finally:
                    await client.close()
        finally:
            await server.close()
            agent_a.close()
            agent_b.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_an_authenticated_peer_sending_bad_keys_is_cut_off_alone(make_manager):
    a, b = make_manager(host_slots=8), make_manager(host_slots=8)
    ks = keys(0, 2)
    assert store(a, ks) == len(ks)

    async def scenario():
        async with Pair(a, b) as p:
            # a peer with the key asks for a key that is not a block key
            rogue = PeerClient(agent_for(b, "rogue"), SECRET, [a.geometry.fingerprint])
            await rogue.connect("127.0.0.1", p.port)
            try:  # the server closes this connection: the call fails with it
                with pytest.raises(TransportError, match="closed the connection"):
                    await rogue.call("pin", {"keys": [b"\x01not-a-block-key"]}, 5)
            finally:
                await rogue.close()
                rogue.agent.close()
            # the server goes on serving the well-behaved peer
            return await pull(p.client, list(ks), ManagerBlocks(b))

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == list(ks)


def test_blocks_already_here_are_not_read_again(make_manager):
    a, b = make_manager(host_slots=16), make_manager(host_slots=16)
    ks = keys(0, 6)
    assert store(a, ks) == len(ks)
    assert store(b, ks[:2]) == len(ks[:2])  # b computed the first two itself

    async def scenario():
        async with Pair(a, b) as p:
            return await pull(p.client, list(ks), ManagerBlocks(b))

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == list(ks)
    # only the four b lacked crossed the wire
    assert (
        b.metrics.value("kvbm_transfer_bytes_total", path="peer_to_g2")
        == 4 * b.geometry.block_bytes
    )
    eng = Engine(6)
    assert onboard(b, eng.kv, ks, list(range(6))) == 6
    assert all(eng.holds(k, i) for i, k in enumerate(ks))


def test_a_pull_on_a_connection_the_peer_closed_as_idle_goes_again(make_manager, monkeypatch):
    # A peer at its cap closes the connection idle longest for a new peer. A
    # pull whose pin went out on it at that moment finds it closed: it pulls
    # again on a new connection, and does not leave the peer alone.
    a, b = make_manager(host_slots=8), make_manager(host_slots=16)
    ks = keys(0, 4)
    store(a, ks)
    monkeypatch.setattr(peer_server, "IDLE_CLOSE_S", 0.2)

    async def scenario():
        agent_a, agent_b = agent_for(a, "node-a"), agent_for(b, "node-b")
        server = PeerServer(ManagerBlocks(a), agent_a, SECRET, node_id="node-a")
        port = await server.start("127.0.0.1", 0)
        record = NodeRecord("node-a", "127.0.0.1", port, fingerprints=(a.geometry.fingerprint,))
        fingerprint = a.geometry.fingerprint
        pool = PeerPool("node-b", SECRET, "127.0.0.1", {"node-a": record}.get, 30)
        pool.open(agent_b, fingerprint)
        try:
            assert await pool.pull("node-a", ks[:1], ManagerBlocks(b), 5) == ks[:1]
            await asyncio.sleep(0.3)
            # closed by the server; the pull's pin goes out before the client
            # has read the close (no await in between)
            assert server._close_idlest()
            assert await pool.pull("node-a", ks, ManagerBlocks(b), 5) == ks
            assert not pool.avoided and server.closed_idle == 1
        finally:
            await pool.close()
            await server.close()
            agent_a.close()
            agent_b.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
