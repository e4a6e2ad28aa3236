"""Issue 14, finding 9 (a peer's identity was the NIXL agent name it chose):
a node loaded every client's NIXL metadata, and NIXL loads one agent per
name, so a holder of the secret who connected first under another node's
agent name ("kvbm-node-b") locked that node out: its connections failed
(NIXL_ERR_NOT_ALLOWED) and it recomputed for as long as the squatter stayed.
Now a server loads no client's metadata (a READ needs only the target's) and
a peer is the node id of its signed hello. Against real nodes: while a
squatter holds a connection to A under B's agent name and B's node id, B
pulls A's prompt bit-exact. And a client that reaches another node than the
one the index names at that address refuses it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.harness.node_daemon import loads_exactly
from tests.harness.peer_attacks import SECRET, two_nodes
from tests.harness.support import GEOMETRY
from transport.errors import AuthError
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient


def test_a_squatter_under_another_nodes_name_does_not_lock_it_out(etcd, daemons, tmp_path):
    with two_nodes(etcd, daemons, tmp_path, 8) as n:
        memory = np.zeros(1 << 20, dtype=np.uint8)
        squatter = NixlAgent("kvbm-node-b", memory.ctypes.data, memory.size)  # B's agent name
        try:

            async def scenario() -> None:
                client = PeerClient(squatter, SECRET, [GEOMETRY.fingerprint], "node-b")
                await client.connect(n.host, n.port, expect="node-a")
                try:  # held open while B pulls
                    assert await asyncio.to_thread(loads_exactly, n.eng_b, n.keys, "remote_host")
                finally:
                    await client.close()

            asyncio.run(asyncio.wait_for(scenario(), 60))
        finally:
            squatter.close()


def test_a_client_refuses_another_node_at_the_address_it_was_given(etcd, daemons, tmp_path):
    with two_nodes(etcd, daemons, tmp_path, 1) as n:
        memory = np.zeros(1 << 20, dtype=np.uint8)
        agent = NixlAgent("kvbm-client", memory.ctypes.data, memory.size)
        try:

            async def connect(expect: str) -> None:
                client = PeerClient(agent, SECRET, [GEOMETRY.fingerprint], "client")
                try:
                    await client.connect(n.host, n.port, expect=expect)
                finally:
                    await client.close()

            asyncio.run(connect("node-a"))
            with pytest.raises(AuthError, match="is 'node-a', not 'node-c'"):
                asyncio.run(connect("node-c"))
        finally:
            agent.close()
