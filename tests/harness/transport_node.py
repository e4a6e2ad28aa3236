"""A serving node process for the transport tests: real tiers holding known
blocks (some pushed to disk), served over the peer RPC on the given address.
Prints its port, then serves until stdin closes.
Run as `python -m tests.harness.transport_node HOST DISK_DIR N_BLOCKS`."""

from __future__ import annotations

import asyncio
import sys

from kvbm.admission import FrequencyFilter
from kvbm.connector.direct import offload
from kvbm.disk_pool import DiskPool
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from kvbm.peer_blocks import ManagerBlocks
from tests.harness.support import DISK_KEY, GEOMETRY, Engine, keys
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerServer

SECRET = b"k" * 32


async def main(host: str, disk_dir: str, n: int) -> None:
    g = GEOMETRY
    mgr = BlockManager(
        g,
        HostPool(g, 2 * n * g.slot_bytes),
        DiskPool(g, disk_dir, 4096 + 4 * n * (4096 + g.slot_bytes), mac_key=DISK_KEY),
        FrequencyFilter(1),
    )
    eng = Engine(n)
    ks = keys(0, n)
    offload(mgr, eng.kv, eng.compute(ks), ks)
    # the first half goes on to disk: store filler until it drains
    filler = keys(1_000_000, 2 * n)
    eng2 = Engine(2 * n)
    offload(mgr, eng2.kv, list(range(2 * n)), filler)
    offload(mgr, eng.kv, eng.compute(ks[n // 2 :]), ks[n // 2 :])
    agent = NixlAgent(f"node-{host}", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    server = PeerServer(ManagerBlocks(mgr), agent, SECRET)
    port = await server.start(host, 0)
    tiers = mgr.lookup(ks).tiers
    print(port, sum(t == "disk" for t in tiers), sum(t == "host" for t in tiers), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()
    agent.close()
    mgr.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
