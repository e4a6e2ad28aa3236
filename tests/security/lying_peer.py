"""A peer that holds the fleet's secret and lies in its pin replies: real
tiers holding real blocks, registered in etcd like any node (it signs its
record and locations: it has the secret), served over
the real peer RPC and NIXL, but every pin it grants names a wrong length or
offset. Prints its port once its blocks are in the index, then serves until
stdin closes.

Run as `python -m tests.security.lying_peer ETCD HOST SECRET_FILE LIE N`,
LIE one of: long (four slots), negative (-1), outside (past its arena)."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from discovery.etcd_index import EtcdIndex
from discovery.records import NodeRecord, Tier
from discovery.signing import IndexSigner
from kvbm.bench.direct import offload
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from kvbm.peer_tiers import ManagerTiers
from tests.support import GEOMETRY, SPACE, Engine, keys
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerServer
from transport.secret import load_secret
from transport.tiers import PinnedBlock


class LyingTiers(ManagerTiers):
    def __init__(self, mgr: BlockManager, lie: str) -> None:
        super().__init__(mgr)
        self.lie = lie

    def prepare_read(self, keys: list[bytes]) -> list[PinnedBlock]:
        return [self._lie_about(b) for b in super().prepare_read(keys)]

    def complete_read(self, blocks: list[PinnedBlock]) -> None:
        super().complete_read([b for b in blocks if 0 <= b.offset < self.arena_size])

    def _lie_about(self, b: PinnedBlock) -> PinnedBlock:
        if self.lie == "long":
            return dataclasses.replace(b, length=4 * GEOMETRY.slot_bytes)
        if self.lie == "negative":
            return dataclasses.replace(b, length=-1)
        return dataclasses.replace(b, offset=self.arena_size)  # "outside"


async def main(etcd: str, host: str, secret_file: str, lie: str, n: int) -> None:
    mgr = BlockManager(GEOMETRY, HostPool(GEOMETRY, 4 * n * GEOMETRY.slot_bytes))
    eng = Engine(n)
    ks = keys(0, n)
    offload(mgr, eng.kv, eng.compute(ks), ks)
    agent = NixlAgent(f"kvbm-liar-{lie}", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    secret = load_secret(secret_file, host)
    server = PeerServer(LyingTiers(mgr, lie), agent, secret)
    port = await server.start(host, 0)
    record = NodeRecord(
        "liar", host, port, nixl_agent=agent.name, fingerprints=(GEOMETRY.fingerprint,)
    )
    index = EtcdIndex([etcd], SPACE.namespace, record, lease_ttl=5, signer=IndexSigner(secret))
    await index.start()
    index.publish(dict.fromkeys(ks, Tier.HOST), [])
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await index.close()
    await server.close()
    agent.close()
    mgr.close()


if __name__ == "__main__":
    etcd_, host_, secret_, lie_, n_ = sys.argv[1:]
    asyncio.run(main(etcd_, host_, secret_, lie_, int(n_)))
