"""The peer server's pin table, the one record of what peers hold pinned,
on a real block manager: a key pinned twice for one peer holds one pin; a
pin taken while the peer's table is emptied (its last unpin, the reaper)
still lands where an unpin, expiry or close finds it; pins taken at once
cannot pass the caps together."""

from __future__ import annotations

import asyncio
import threading

from kvbm.peer_blocks import ManagerBlocks
from tests.harness.support import keys, store
from transport.frames import Message
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerServer

SECRET = b"k" * 32


class GatedTiers(ManagerBlocks):
    """The manager's tiers, with a pin that waits for the test to let it go."""

    def __init__(self, mgr) -> None:
        super().__init__(mgr)
        self.gate = threading.Event()
        self.gate.set()

    def prepare_read(self, keys, ready_only=False):
        if ready_only:
            return []  # as if every block were on disk: the pin waits in a thread
        assert self.gate.wait(10)
        return super().prepare_read(keys)


def pin(key: bytes) -> Message:
    return Message("pin", 1, {"keys": [key]})


def expect_no_pins(mgr) -> None:
    assert not any(mgr.host.table.pins), "a pin outlived its peer server"


class CountedTiers(ManagerBlocks):
    """The manager's tiers, counting the pins taken in a thread, failing
    them on demand."""

    def __init__(self, mgr) -> None:
        super().__init__(mgr)
        self.threaded: list[list[bytes]] = []
        self.fail = False

    def prepare_read(self, keys, ready_only=False):
        if not ready_only:
            self.threaded.append(list(keys))
            if self.fail:
                raise OSError("the disk failed")
        return super().prepare_read(keys, ready_only)


def serve(mgr, scenario, tiers=GatedTiers, **caps: int) -> None:
    agent = NixlAgent("pins-test", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    try:
        server = PeerServer(tiers(mgr), agent, SECRET, **caps)
        asyncio.run(asyncio.wait_for(scenario(server), 30))
    finally:
        agent.close()


def test_a_key_pinned_twice_for_one_peer_holds_one_pin(make_manager):
    mgr = make_manager(host_slots=4)
    ks = keys(0, 1)
    store(mgr, ks)

    async def scenario(server: PeerServer) -> None:
        # pin [k] twice for peer p -> one entry, one pin in the table; unpin once -> none
        await server._call("p", pin(ks[0]))
        await server._call("p", pin(ks[0]))
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
        await server._call("p", pin(ks[0]))
        tiers = server.source
        assert isinstance(tiers, GatedTiers)
        tiers.gate.clear()
        pinning = asyncio.create_task(server._call("p", pin(ks[1])))
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


def test_pins_taken_at_once_share_the_caps(make_manager):
    mgr = make_manager(host_slots=16)
    ks = keys(0, 12)
    store(mgr, ks)

    async def scenario(server: PeerServer) -> None:
        # p asks for [k0..k3] and [k4..k7] at once, q for [k8..k11], all held up
        # in the tiers: each ask sees room before the others have pinned
        tiers = server.source
        assert isinstance(tiers, GatedTiers)
        tiers.gate.clear()
        asks = [
            asyncio.create_task(server._call(who, Message("pin", 1, {"keys": chunk})))
            for who, chunk in (("p", ks[0:4]), ("p", ks[4:8]), ("q", ks[8:12]))
        ]
        await asyncio.sleep(0.1)
        tiers.gate.set()
        got = [len((await a)["blocks"]) for a in asks]
        # a peer may hold 4, all peers 6: p gets 4 in all, q what is left
        assert len(server.pins["p"]) <= 4 and server.pinned_count <= 6, got
        assert sum(got) == server.pinned_count
        await server.close()

    serve(mgr, scenario, max_pins_per_peer=4, max_pins_total=6)
    expect_no_pins(mgr)


def test_ready_blocks_pin_on_the_loop_and_only_the_rest_in_a_thread(make_manager):
    mgr = make_manager(host_slots=16)
    ks = keys(0, 10)
    store(mgr, ks)
    assert mgr.checksum_newest(5) == 5  # k5..k9 sealed, k0..k4 not

    async def scenario(server: PeerServer) -> None:
        tiers = server.source
        assert isinstance(tiers, CountedTiers)
        got = await server._call("p", Message("pin", 1, {"keys": ks[5:]}))
        assert [b[0] for b in got["blocks"]] == ks[5:] and tiers.threaded == []
        got = await server._call("q", Message("pin", 1, {"keys": ks[5:] + ks[:3]}))
        # the sealed prefix on the loop, the unsummed rest summed in a thread
        assert [b[0] for b in got["blocks"]] == ks[5:] + ks[:3]
        assert tiers.threaded == [ks[:3]]
        table = mgr.host.table
        assert all(b[3] == table.checksums[table.get(b[0])] for b in got["blocks"])
        # a pin is never longer than one load step, however it was taken
        got = await server._call("r", Message("pin", 1, {"keys": ks[5:] + ks[:5]}))
        assert len(got["blocks"]) == mgr.max_load_blocks == 8
        await server.close()

    serve(mgr, scenario, CountedTiers)
    expect_no_pins(mgr)


def test_pins_taken_on_the_loop_are_given_back_when_the_rest_fails(make_manager):
    mgr = make_manager(host_slots=8)
    ks = keys(0, 4)
    store(mgr, ks)
    assert mgr.checksum_newest(2) == 2  # k2, k3

    async def scenario(server: PeerServer) -> None:
        tiers = server.source
        assert isinstance(tiers, CountedTiers)
        tiers.fail = True
        try:
            await server._call("p", Message("pin", 1, {"keys": ks[2:] + ks[:2]}))
        except OSError:
            pass
        else:
            raise AssertionError("the failed rest was not reported")
        assert tiers.threaded == [ks[:2]] and server.pinned_count == 0
        assert not server._asking
        expect_no_pins(mgr)  # k2, k3 were pinned on the loop, and given back
        await server.close()

    serve(mgr, scenario, CountedTiers)
