"""A peer that holds the fleet's secret and lies: real tiers holding real
blocks, registered in etcd like any node (it signs its record and
locations: it has the secret), served over the real peer RPC and NIXL, but
every pin it grants names a wrong length or offset, or the NIXL metadata it
answers `auth` with is damaged. Prints its port once its blocks are in the
index, then serves until stdin closes.

Run as `python -m tests.harness.lying_peer ETCD HOST SECRET_FILE LIE N`,
LIE one of: long (four slots), negative (-1), outside (past its arena),
metadata (the memory type of its registration list set to 255, which
crashes NIXL where it is loaded). `liar(...)` runs it for a test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Iterator

from discovery.etcd_index import mirror_index
from discovery.records import NodeRecord
from discovery.signing import IndexSigner
from discovery.tier import Tier
from kvbm.connector.direct import offload
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from kvbm.peer_blocks import ManagerBlocks
from tests.harness.support import GEOMETRY, SPACE, Engine, keys
from transport.block_ports import PinnedBlock
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerServer
from transport.secret import load_secret


class LyingTiers(ManagerBlocks):
    def __init__(self, mgr: BlockManager, lie: str) -> None:
        super().__init__(mgr)
        self.lie = lie

    def prepare_read(self, keys: list[bytes], ready_only: bool = False) -> list[PinnedBlock]:
        return [self._lie_about(b) for b in super().prepare_read(keys, ready_only)]

    def complete_read(self, blocks: list[PinnedBlock]) -> None:
        super().complete_read([b for b in blocks if 0 <= b.offset < self.arena_size])

    def _lie_about(self, b: PinnedBlock) -> PinnedBlock:
        if self.lie == "long":
            return dataclasses.replace(b, length=4 * GEOMETRY.slot_bytes)
        if self.lie == "negative":
            return dataclasses.replace(b, length=-1)
        if self.lie == "outside":
            return dataclasses.replace(b, offset=self.arena_size)
        return b


class DamagedAgent(NixlAgent):
    @property
    def metadata(self) -> bytes:
        return damaged(super().metadata)


def damaged(metadata: bytes) -> bytes:
    """The metadata with the memory type of its registration list set to 255."""
    tag = b"nixlSDList|t"
    at = metadata.index(tag) + len(tag) + 8  # after the field's 8-byte length
    return metadata[:at] + b"\xff" + metadata[at + 1 :]


@contextlib.contextmanager
def liar(etcd: str, host: str, secret_file: str, lie: str, n: int) -> Iterator[int]:
    """The lying peer in a process of its own, for as long as the block; its port."""
    args = [etcd, host, secret_file, lie, str(n)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.lying_peer", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert port.isdigit(), "the lying peer did not start"
        yield int(port)
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def main(etcd: str, host: str, secret_file: str, lie: str, n: int) -> None:
    mgr = BlockManager(GEOMETRY, HostPool(GEOMETRY, 4 * n * GEOMETRY.slot_bytes))
    eng = Engine(n)
    ks = keys(0, n)
    offload(mgr, eng.kv, eng.compute(ks), ks)
    kind = DamagedAgent if lie == "metadata" else NixlAgent
    agent = kind(f"kvbm-liar-{lie}", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    secret = load_secret(secret_file, True, "", env={})  # the file given, as a fleet node
    server = PeerServer(LyingTiers(mgr, lie), agent, secret, node_id="liar")
    port = await server.start(host, 0)
    record = NodeRecord(
        "liar", host, port, nixl_agent=agent.name, fingerprints=(GEOMETRY.fingerprint,)
    )
    index = mirror_index([etcd], SPACE.namespace, record, lease_ttl=5, signer=IndexSigner(secret))
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
