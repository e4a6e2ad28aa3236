"""A node process for the index tests: it registers, publishes a churn of block
locations (as runs), serves lookups from its mirror all along, and answers commands on
stdin, one per line: `churn on`, `churn off`, `flush`, `dump PATH`, `exit`.
Run as `python -m tests.index_node ENDPOINT NAMESPACE NODE_ID TTL`."""

from __future__ import annotations

import asyncio
import json
import random
import sys

from discovery.etcd_index import EtcdIndex
from discovery.records import NodeRecord, Tier

KEYSPACE = 400


async def main(endpoint: str, namespace: str, node_id: str, ttl: int) -> None:
    idx = EtcdIndex([endpoint], namespace, NodeRecord(node_id, "127.0.0.1", 7000), lease_ttl=ttl)
    await idx.start()
    rng = random.Random(node_id)
    churning = True
    lookups = 0

    async def churn() -> None:
        nonlocal lookups
        while True:
            await asyncio.sleep(0.005)
            keys = [rng.randrange(KEYSPACE).to_bytes(8, "little") for _ in range(8)]
            if churning:
                adds = {k: rng.choice([Tier.HOST, Tier.DISK]) for k in keys[:5]}
                idx.publish(adds, keys[5:])
            # local serving never stops, etcd or not
            idx.lookup(keys)
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
            await idx.flush(timeout=20)
        elif line[0] == "dump":
            with open(line[1], "w") as f:
                json.dump(
                    {
                        "state": {k.hex(): t.value for k, t in idx.book.held().items()},
                        "mirror": {
                            k.hex(): {n: t.value for n, t in holders.items()}
                            for k, holders in idx.mirror.locations.items()
                        },
                        "nodes": sorted(idx.mirror.nodes),
                        "lookups": lookups,
                        "connected": idx.connected,
                    },
                    f,
                )
        print("ok", flush=True)
    task.cancel()
    await idx.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
