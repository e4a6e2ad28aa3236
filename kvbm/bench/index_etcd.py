"""What one etcd takes, measured for `kvbm bench index`: its sustained puts
and lease refreshes, the references of `fleet_nodes_per_etcd`; and the
bench's namespace, signer and keys, shared by the single-node measures and
the fleets."""

from __future__ import annotations

import asyncio
import os
import time

from discovery.etcd_index import EtcdIndex, mirror_index
from discovery.records import NodeRecord
from discovery.signing import IndexSigner
from kvbm.block_key import KeySpace

NS = "bench"
SIGNER = IndexSigner(b"bench-fleet-secret-0123456789")  # nodes sign what they publish


def block_keys(start: int, n: int, rank: int = 0) -> list[bytes]:
    return KeySpace(NS, 0x5EED, rank).keys(list(range(start, start + n)))


def open_index(endpoint: str, node_id: str, ttl: int, watch: bool = True, **kw) -> EtcdIndex:
    record = NodeRecord(node_id, "127.0.0.1", 7000, nixl_agent=node_id)
    return mirror_index([endpoint], NS, record, lease_ttl=ttl, watch=watch, signer=SIGNER, **kw)


async def etcd_put_capacity(endpoint: str, value_bytes: int, seconds: float = 3.0) -> dict:
    """etcd's sustained puts/s for values of `value_bytes` (run records of the
    fleet's mean size): transactions of 128 puts, four in flight, as a node
    writes them. The reference for `fleet_nodes_per_etcd`."""
    idx = open_index(endpoint, "capacity", 60, watch=False)
    await idx.start()
    try:
        client, lease = idx.session.live(), idx.session.lease
        value, puts, t0 = os.urandom(value_bytes), 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            txns = [
                client.transaction(
                    compare=[],
                    success=[
                        client.transactions.put(
                            b"/bench/capacity/%d" % (puts + i * 128 + j), value, lease=lease
                        )
                        for j in range(128)
                    ],
                    failure=[],
                )
                for i in range(4)
            ]
            await asyncio.gather(*txns)
            puts += 4 * 128
        return {"etcd_puts_per_s": round(puts / (time.perf_counter() - t0))}
    finally:
        await idx.close()


async def etcd_refresh_capacity(endpoint: str, seconds: float = 3.0, in_flight: int = 64) -> dict:
    """etcd's sustained lease refreshes/s (`in_flight` at once): what a node
    of the sharded layout costs etcd, which holds only records and leases
    there. The reference for that layout's `fleet_nodes_per_etcd`."""
    idx = open_index(endpoint, "refresh-capacity", 60, watch=False)
    await idx.start()
    try:
        client, lease = idx.session.live(), idx.session.lease
        done, t0 = 0, time.perf_counter()

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() - t0 < seconds:
                await client.refresh_lease(lease)
                done += 1

        await asyncio.gather(*(loop() for _ in range(in_flight)))
        return {"etcd_lease_refreshes_per_s": round(done / (time.perf_counter() - t0))}
    finally:
        await idx.close()
