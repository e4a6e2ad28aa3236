"""A node process for the index tests: it registers, publishes a churn of block
locations (as runs), serves lookups from its mirror all along, and answers commands on
stdin, one per line: `churn on`, `churn off`, `flush`, `dump PATH`, `exit`.
Run as `python -m tests.harness.index_node ENDPOINT NAMESPACE NODE_ID TTL [sharded]`.

`sharded`: the sharded index (discovery/sharded.py) as a node runs it: the
node's peer RPC server (a real block manager's tiers, a real NIXL agent) is
also the owner of its shards, its peer pool carries its calls to the other
owners, and its dump's "owned" is its share of the locations, by place."""

from __future__ import annotations

import asyncio
import json
import random
import sys

from discovery.etcd_index import EtcdIndex, mirror_index, sharded_index
from discovery.records import NodeRecord
from discovery.sharded import ShardedLocations
from discovery.tier import Tier

SECRET = b"index-test-secret-0123456789abcdef"

KEYSPACE = 400


async def main(endpoint: str, namespace: str, node_id: str, ttl: int, sharded: bool) -> None:
    if sharded:
        idx, owner, close_peers = await _sharded(endpoint, namespace, node_id, ttl)
    else:
        idx = mirror_index(
            [endpoint], namespace, NodeRecord(node_id, "127.0.0.1", 7000), lease_ttl=ttl
        )
        owner, close_peers = None, None
    await idx.start()
    rng = random.Random(node_id)
    churning = True
    lookups = 0

    async def churn() -> None:
        nonlocal lookups
        while True:
            await asyncio.sleep(0.005)
            keys = [rng.randrange(KEYSPACE).to_bytes(16, "little") for _ in range(8)]
            if churning:
                adds = {k: rng.choice([Tier.HOST, Tier.DISK]) for k in keys[:5]}
                idx.publish(adds, keys[5:])
            # local serving never stops, etcd or not
            await idx.lookup(keys)
            lookups += 1

    task = asyncio.create_task(churn())
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "exit":
            break
        if line[0] == "churn":
            churning = line[1] == "on"
        elif line[0] == "flush":
            try:
                await idx.flush(timeout=20)
            except TimeoutError:
                print("flush timed out", _sharded_state(owner), file=sys.stderr, flush=True)
        elif line[0] == "dump":
            with open(line[1], "w") as f:
                json.dump(
                    {
                        "state": {k.hex(): t.value for k, t in held(idx, owner).items()},
                        "mirror": {
                            k.hex(): {n: t.value for n, t in holders.items()}
                            for k, holders in idx.mirror.locations.items()
                        },
                        "nodes": sorted(idx.mirror.nodes),
                        "lookups": lookups,
                        "connected": idx.connected,
                        "owned": owner.dump() if owner else {},
                        "sharded": _sharded_state(owner),
                    },
                    f,
                )
        print("ok", flush=True)
    task.cancel()
    await idx.close()
    if close_peers is not None:
        await close_peers()


def _sharded_state(loc: ShardedLocations | None) -> dict:
    if loc is None:
        return {}
    return {
        "session": loc.session,
        "ring": list(loc.ring.nodes),
        "pending": {o: len(b) for o, b in loc._pending.items()},
        "stale": loc.stale,
    }


def held(idx: EtcdIndex, owner: ShardedLocations | None) -> dict[bytes, Tier]:
    """What this node published as held: its runs, or (sharded, `owner`: its
    share of the index) its keys."""
    if owner is not None:
        return {k: t for k, (_, t) in owner.held.items()}
    return idx.layout.book.held()


async def _sharded(endpoint: str, namespace: str, node_id: str, ttl: int):
    from kvbm.admission import FrequencyFilter
    from kvbm.host_pool import HostPool
    from kvbm.manager import BlockManager
    from kvbm.node.index_calls import INDEX_CALLS, OwnerClient, owner_calls
    from kvbm.node.peer_pool import PeerPool
    from kvbm.peer_blocks import ManagerBlocks
    from tests.harness.support import GEOMETRY
    from transport.nixl_agent import NixlAgent
    from transport.peer_rpc import PeerServer

    host = HostPool(GEOMETRY, 4 * GEOMETRY.slot_bytes)
    mgr = BlockManager(GEOMETRY, host, None, FrequencyFilter())
    agent = NixlAgent(f"index-{node_id}", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    # the index is made below; its records are read when a peer is first called
    pool = PeerPool(node_id, SECRET, "127.0.0.1", lambda peer: idx.peer(peer), 1, INDEX_CALLS)
    pool.open(agent, GEOMETRY.fingerprint)
    owners = OwnerClient(pool)
    locations = ShardedLocations(node_id, owners.place, owners.locate)
    server = PeerServer(
        ManagerBlocks(mgr), agent, SECRET, node_id=node_id, calls=owner_calls(locations)
    )
    port = await server.start("127.0.0.1", 0)
    record = NodeRecord(node_id, "127.0.0.1", port, fingerprints=(GEOMETRY.fingerprint,))
    idx = sharded_index(
        [endpoint], namespace, record, locations, lease_ttl=ttl, flush_interval=0.05
    )

    async def close() -> None:
        await pool.close()
        await server.close()
        agent.close()
        mgr.close()

    return idx, locations, close


if __name__ == "__main__":
    sharded = sys.argv[5:] == ["sharded"]
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sharded))
