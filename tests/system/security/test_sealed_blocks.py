"""Issue 31, finding 2, against real `kvbm node` processes: a holder of the
fleet secret gets node A's NIXL metadata through the handshake, as any peer
does, and issues NIXL WRITEs of its own bytes over the whole of A's arena.
Before, the WRITE landed (UCX on one host and on TCP checks bounds on the
reader's side only, and A's agent process mapped the arena read-write): A's
own engine then loaded the attacker's bytes, and A served them to peers as
its own. Now the agent whose metadata peers get maps the arena read-only:
on CMA (one host) the WRITE fails with EFAULT in the kernel, on TCP it
faults the serving process, which the node replaces. Either way A's engine
and B, pulling from A, get the bytes A's engine computed, bit-exact (or
nothing, while A's serving process restarts: a recompute), never the
attacker's."""

from __future__ import annotations

import asyncio

import pytest

from tests.harness.node_daemon import loads_exactly, until
from tests.harness.peer_attacks import raw_session, two_nodes
from tests.harness.support import Engine
from tests.system.security.test_confinement import Attacker

CHUNK = 1 << 20  # what the attacker writes at a time (its agent's memory)
FORGED = bytes([0x5A]) * CHUNK


@pytest.mark.slow
@pytest.mark.parametrize("tls", [None, "tcp,self"], ids=["ucx-default-cma", "ucx-tcp"])
def test_a_secret_holder_cannot_write_a_nodes_blocks(etcd, daemons, tmp_path, monkeypatch, tls):
    if tls is not None:
        monkeypatch.setenv("UCX_TLS", tls)  # the nodes' (and their agents') and ours
    with two_nodes(etcd, daemons, tmp_path, 8, "--host-cache-mb", "8") as n:
        attacker = Attacker()
        try:

            async def attack() -> int:
                _, writer, _, reply = await raw_session(n.host, n.port)
                try:
                    peer = attacker.agent.add_peer(reply["nixl"])
                    base, size = reply["arena"], reply["arena_bytes"]
                    for at in range(0, size, CHUNK):
                        part = FORGED[: min(CHUNK, size - at)]
                        await asyncio.to_thread(attacker.write, peer, base + at, part)
                    return size
                finally:
                    writer.close()

            assert asyncio.run(asyncio.wait_for(attack(), 120)) > 0
        finally:
            attacker.close()
        # A's own engine: the blocks it stored, as its engine computed them
        assert loads_exactly(n.eng_a, n.keys, "local_host")
        # under CMA the kernel refused the WRITE and A's serving process lives
        # on; under TCP that process faulted on it and A started another
        generation = 0 if tls is None else 1
        until(lambda: serving(n.eng_a, generation), 60, "not the serving process expected")
        # B pulling from A: what A's engine computed, or nothing (a recompute
        # while A replaces a serving process the WRITE faulted), never forged;
        # and A serves on: B gets the whole prompt (then holds it itself)
        until(lambda: exact_or_nothing(n.eng_b, n.keys), 60, "B never pulled A's blocks")
        assert n.a.proc.poll() is None and n.b.proc.poll() is None


def serving(engine, generation: int) -> bool:
    """Whether the node's serving NIXL agent process, as its status tells
    it, is up and of `generation`."""
    state = engine.stats()["nixl_agent"]["serving"]
    return state != "restarting" and state["generation"] == generation


def exact_or_nothing(engine, keys: list) -> bool:
    """Whether `engine` loaded all of `keys`; fails at once on a block loaded
    with other bytes than its engine computed."""
    got = Engine(len(keys))
    loaded, _ = engine.load(got.kv, keys, list(range(len(keys))))
    assert all(got.holds(k, i) for i, k in enumerate(keys[:loaded])), "forged bytes loaded"
    return loaded == len(keys)
