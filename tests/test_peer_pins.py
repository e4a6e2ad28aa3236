"""The peer server's pin table, the one record of what peers hold pinned,
on a real block manager: a key pinned twice for one peer holds one pin, and
a pin taken while the peer's table is emptied (its last unpin, the reaper)
still lands where an unpin, expiry or close finds it."""

from __future__ import annotations

import asyncio
import threading

from kvbm.peer_tiers import ManagerTiers
from tests.support import keys, store
from transport.frames import Message
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerServer

SECRET = b"k" * 32


class GatedTiers(ManagerTiers):
    """The manager's tiers, with a pin that waits for the test to let it go."""

    def __init__(self, mgr) -> None:
        super().__init__(mgr)
        self.gate = threading.Event()
        self.gate.set()

    def prepare_read(self, keys):
        assert self.gate.wait(10)
        return super().prepare_read(keys)


def pin(key: bytes) -> Message:
    return Message("pin", 1, {"keys": [key]})


def expect_no_pins(mgr) -> None:
    assert not any(mgr.host.table.pins), "a pin outlived its peer server"


def serve(mgr, scenario) -> None:
    agent = NixlAgent("pins-test", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    try:
        asyncio.run(asyncio.wait_for(scenario(PeerServer(GatedTiers(mgr), agent, SECRET)), 30))
    finally:
        agent.close()


def test_a_key_pinned_twice_for_one_peer_holds_one_pin(make_manager):
    mgr = make_manager(host_slots=4)
    ks = keys(0, 1)
    store(mgr, ks)

    async def scenario(server: PeerServer) -> None:
        # pin [k] twice for peer p -> one entry, one pin in the table; unpin once -> none
        await server._pin("p", pin(ks[0]))
        await server._pin("p", pin(ks[0]))
        assert server.pinned_count == 1
        slot = mgr.host.table.get(ks[0])
        assert mgr.host.table.pins[slot] == 1
        server._release("p", ks)
        assert server.pinned_count == 0
        expect_no_pins(mgr)

    serve(mgr, scenario)


def test_a_pin_that_races_the_peers_last_unpin_is_still_recorded(make_manager):
    mgr = make_manager(host_slots=4)
    ks = keys(0, 2)
    store(mgr, ks)

    async def scenario(server: PeerServer) -> None:
        # p holds [k0]; its pin of [k1] waits in the tiers while p unpins k0,
        # which empties p's table and drops it
        await server._pin("p", pin(ks[0]))
        tiers = server.source
        assert isinstance(tiers, GatedTiers)
        tiers.gate.clear()
        pinning = asyncio.create_task(server._pin("p", pin(ks[1])))
        await asyncio.sleep(0.1)
        server._release("p", [ks[0]])
        assert "p" not in server.pins
        tiers.gate.set()
        await pinning
        # the new pin is in the live table (a table captured before the wait
        # would hold it where nothing ever releases it)
        assert server.pinned_count == 1 and ks[1] in server.pins["p"]
        await server.close()  # gives back every pin it knows

    serve(mgr, scenario)
    expect_no_pins(mgr)
