"""A pulling node process for the network-namespace test: pulls the serving
node's blocks (tests/harness/transport_node.py) over the peer RPC and NIXL, checks
every byte, and prints one JSON line.
Run as `python -m tests.harness.transport_puller LOCAL PEER PORT N`."""

from __future__ import annotations

import asyncio
import json
import sys

from kvbm.admission import FrequencyFilter
from kvbm.connector.direct import onboard
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from kvbm.peer_blocks import ManagerBlocks
from tests.harness.support import GEOMETRY, Engine, keys
from tests.harness.transport_node import SECRET
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient, pull


async def main(local: str, peer: str, port: int, n: int) -> dict:
    g = GEOMETRY
    mgr = BlockManager(g, HostPool(g, 2 * n * g.slot_bytes), None, FrequencyFilter(1))
    agent = NixlAgent(f"node-{local}", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    client = PeerClient(agent, SECRET, [g.fingerprint])
    ks = keys(0, n)
    try:
        await client.connect(peer, port, local_host=local)
        arrived = await pull(client, list(ks), ManagerBlocks(mgr), timeout=60)
        eng = Engine(n)
        loaded = onboard(mgr, eng.kv, ks, list(range(n)))
        exact = sum(eng.holds(k, i) for i, k in enumerate(ks[:loaded]))
        return {"arrived": len(arrived), "loaded": loaded, "exact": exact}
    finally:
        await client.close()
        agent.close()
        mgr.close()


if __name__ == "__main__":
    local, peer, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(asyncio.run(main(local, peer, port, n))), flush=True)
