"""`kvbm bench index --nodes N --layout sharded`: the trace of index_fleet.py on
the sharded index, each simulated node with the node's own parts (its etcd
session, its share of the locations, a peer server that owns its shards);
this process asks the owners over the peer RPC, as a node does."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import time
import tracemalloc
from multiprocessing.connection import Connection

import msgpack
import numpy as np

from discovery.etcd_index import sharded_index
from discovery.owner_table import MERGE_SHIFT, OwnerTable
from discovery.owners import places
from discovery.records import NodeRecord
from discovery.schema import node_path
from discovery.sharded import ShardedLocations
from discovery.tier import Tier
from kvbm.bench.fleet_trace import NodeTrace, TraceShape
from kvbm.bench.index_etcd import NS, SIGNER, block_keys, etcd_refresh_capacity
from kvbm.bench.index_fleet import replay
from kvbm.block_key import GROUP_BLOCKS, Groups, KeySpace, anchor_of, seq_hash
from kvbm.config import KvbmConfig
from kvbm.layout import ModelGeometry
from kvbm.node.index_choice import INDEX_FLUSH_S


def _delta_bytes_per_location(n: int = 20_000) -> float:
    """What a change not merged yet costs an owner's table (its dicts), measured."""
    xs = places(block_keys(60_000_000, n))
    gc.collect()
    tracemalloc.start()
    table = OwnerTable(min_delta=2 * n)
    before = tracemalloc.get_traced_memory()[0]
    table.place(1, xs, [Tier.HOST] * n)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


class _SimNode:
    """One simulated node of the sharded fleet, with the node's own parts: its
    EtcdIndex (records and leases in etcd), its share of the locations, a
    peer RPC server that is also the owner of its shards (a real NIXL agent
    on a tiny arena, the real handshake and sealed frames), and a peer pool
    on its own loopback address carrying its calls to the other owners."""

    def __init__(self, endpoint: str, name: str, address: str, ttl: int, flush: float) -> None:
        from kvbm.admission import FrequencyFilter
        from kvbm.host_pool import HostPool
        from kvbm.manager import BlockManager
        from kvbm.node.index_calls import INDEX_CALLS, OwnerClient, owner_calls
        from kvbm.node.peer_pool import PeerPool
        from kvbm.peer_blocks import ManagerBlocks
        from transport.nixl_agent import NixlAgent
        from transport.peer_rpc import PeerServer

        g = _SIM_GEOMETRY
        self.name, self.address = name, address
        self.mgr = BlockManager(g, HostPool(g, 2 * g.slot_bytes), None, FrequencyFilter())
        arena = self.mgr.host.arena
        self.agent = NixlAgent(f"bench-{name}", arena.array.ctypes.data, arena.size)
        # No peer reads from these agents (they serve no blocks), and a node's
        # own agent drives itself in its child process (confined_agent.py):
        # without this, 32 servers would poll NIXL every 0.5 ms on this loop.
        self.agent.drives_itself = True
        self.endpoint, self.ttl, self.flush = endpoint, ttl, flush
        self.pool = PeerPool(
            name,
            SECRET,
            address,
            lambda peer: self.index.peer(peer),
            backoff_s=1,
            calls=INDEX_CALLS,
        )
        self.pool.open(self.agent, g.fingerprint)
        self.owners = OwnerClient(self.pool)
        self.calls = self.bytes = 0
        self.locations = ShardedLocations(name, self._send, self.owners.locate)
        self.server = PeerServer(
            ManagerBlocks(self.mgr),
            self.agent,
            SECRET,
            node_id=name,
            calls=owner_calls(self.locations),
        )

    async def start(self, owner: bool = True) -> None:
        """`owner` False: a node that only asks (no peer port: not in the ring)."""
        port = await self.server.start(self.address, 0) if owner else 0
        fingerprints = (_SIM_GEOMETRY.fingerprint,)
        record = NodeRecord(self.name, self.address, port, fingerprints=fingerprints)
        self.index = sharded_index(
            [self.endpoint],
            NS,
            record,
            self.locations,
            lease_ttl=self.ttl,
            flush_interval=self.flush,
            signer=SIGNER,
        )
        await self.index.start()

    async def _send(self, owner: str, session: int, xs: np.ndarray, tiers: list) -> bool:
        self.calls += 1
        names = [None if t is None else t.value for t in tiers]
        self.bytes += len(
            msgpack.packb({"places": xs.tobytes(), "tiers": names, "session": session})
        )
        return await self.owners.place(owner, session, xs, tiers)

    async def close(self) -> None:
        await self.index.close()
        await self.pool.close()
        await self.server.close()
        self.agent.close()
        self.mgr.close()


_SIM_GEOMETRY = ModelGeometry(num_layers=1, num_kv_heads=1, head_dim=16, block_size=16)
SECRET = b"bench-fleet-peer-secret-0123456789"


async def sharded_fleet(
    endpoint: str,
    ttl: int,
    nodes: int,
    warmup_s: float = 6.0,
    seconds: float = 10.0,
    rate: int = 1000,
    flush_interval: float = INDEX_FLUSH_S,
    lookups: int = 2000,
) -> dict:
    """The trace of `fleet`, on the sharded index: the fleet runs in a child
    process (`_sharded_fleet_child`), and this process is a node that asks:
    it looks up the trace's prompts by asking their owners over the peer
    RPC (the remote hop), as a node does on an engine's scheduling path,
    with the owners' work on the other side of a socket, off its loop."""
    mp = multiprocessing.get_context("spawn")
    conn, theirs = mp.Pipe()
    args = (endpoint, ttl, nodes, warmup_s, seconds, rate, flush_interval, lookups, theirs)
    proc = mp.Process(target=_sharded_fleet_child, args=args)
    proc.start()
    theirs.close()  # the child's end: a child that dies is an EOF here
    asker = _SimNode(endpoint, "asker", "127.0.2.1", max(ttl, 60), flush_interval)
    try:
        try:
            out, prompts = await asyncio.to_thread(conn.recv)
        except EOFError:
            raise RuntimeError("the simulated fleet ended before it reported") from None
        await asker.start(owner=False)
        deadline = time.monotonic() + 60
        while len(asker.locations.ring.nodes) < nodes:
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError("the asker never saw the whole fleet")
            await asyncio.sleep(0.05)
        await asyncio.gather(*(asker.owners.warm(n) for n in asker.locations.ring.nodes))
        times, found = [], 0
        for prompt in prompts:
            req = [bytes(k) for k in prompt]  # fresh objects, as an engine hands them over
            groups = Groups.of([seq_hash(k) for k in prompt], 0, len(prompt))  # the engine's
            t1 = time.perf_counter()
            result = await asker.index.lookup(req, groups.per_key(len(req)))
            times.append(time.perf_counter() - t1)
            found += result.total
        times.sort()
        out.update(
            {
                "lookup_p50_us": round(times[len(times) // 2] * 1e6, 1),
                "lookup_p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
                "lookup_prompts": len(times),
                "lookup_blocks_found_per_prompt": round(found / max(1, len(times)), 1),
            }
        )
    finally:
        with contextlib.suppress(OSError):
            conn.send("done")
        with contextlib.suppress(Exception):  # it may not have started
            await asker.close()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    # etcd holds records and leases only: a node costs it a lease refresh every
    # TTL / 3 (its record is written when it joins; etcd_writes_per_1000_blocks)
    out.update(await etcd_refresh_capacity(endpoint))
    per_node = 3 / KvbmConfig().lease_ttl
    out["etcd_refreshes_per_s_per_node"] = round(per_node, 2)
    out["fleet_nodes_per_etcd"] = round(out["etcd_lease_refreshes_per_s"] / per_node)
    return out


def _sharded_fleet_child(
    endpoint: str,
    ttl: int,
    nodes: int,
    warmup_s: float,
    seconds: float,
    rate: int,
    flush_interval: float,
    lookups: int,
    conn: Connection,
) -> None:
    """Child process: the fleet of `sharded_fleet`, with the node's own parts
    (`_SimNode`) against a real etcd: each node sends each owner its changes
    every `flush_interval` over the peer RPC; then the owners' tables are
    measured. Sends (figures, prompts to look up), then serves until told."""

    async def run() -> None:
        space = KeySpace(NS, 0x5EED)
        shape = TraceShape(host_blocks=1024, disk_blocks=4096)
        traces = [NodeTrace(i, space, shape) for i in range(nodes)]
        sims = [
            _SimNode(endpoint, f"sim{i}", f"127.0.1.{i + 1}", max(ttl, 60), flush_interval)
            for i in range(nodes)
        ]
        try:
            for n in sims:
                await n.start()
            names = {n.name for n in sims}
            while any(set(n.locations.ring.nodes) != names for n in sims):  # every record seen
                await asyncio.sleep(0.05)
            client = sims[0].index.session.live()

            async def revision() -> int:
                got = await client.get(node_path(NS, sims[0].name))
                return got.header.revision

            def totals() -> tuple[int, ...]:
                return (
                    sum(n.calls for n in sims),
                    sum(t.created for t in traces),
                    sum(n.bytes for n in sims),
                )

            rev0 = await revision()  # the whole run's etcd writes, warm-up included
            indexes = [n.index for n in sims]
            window, measured = await replay(traces, indexes, totals, warmup_s, seconds, rate)
            calls, created, sent = window
            etcd_writes = await revision() - rev0
            etcd_blocks = sum(t.created for t in traces)
            await asyncio.gather(*(n.index.flush(timeout=120) for n in sims))
            held = sum(t.held() for t in traces)
            tables = [n.locations.table for n in sims]
            for t in tables:
                t.merge()  # the delta folded in: the arrays alone
            locations = sum(len(t) for t in tables)
            biggest = max(tables, key=len)
            per_delta = _delta_bytes_per_location()
            # the biggest owner, with its delta at the most it holds before a merge (at
            # scale: here the tables are below the floor of a merge, _MIN_DELTA)
            worst = biggest.nbytes + len(biggest) / (1 << MERGE_SHIFT) * per_delta
            prompts = [c[:128] for t in traces for c in t.convs][:lookups]
            # what an owner spends on its part of a lookup (a group), no network
            own = sims[0].locations
            answer = []
            for p in prompts[:500]:
                group = p[:GROUP_BLOCKS]
                xs = places(group, [anchor_of(seq_hash(group[0]))] * len(group))
                t1 = time.perf_counter()
                own.holders(xs)
                answer.append(time.perf_counter() - t1)
            answer.sort()
            out = {
                "fleet_layout": "sharded",
                "fleet_nodes": nodes,
                "fleet_blocks_per_s_per_node": round(created / measured / nodes),
                "fleet_flush_interval_s": flush_interval,
                "etcd_writes_per_1000_blocks": round(etcd_writes / etcd_blocks * 1000, 2),
                "owner_calls_per_s_per_node": round(calls / measured / nodes, 1),
                "owner_bytes_per_block": round(sent / created, 1),
                "fleet_blocks_held": held,
                "fleet_blocks_in_index": locations,
                "owner_locations_max_vs_mean": round(len(biggest) / (locations / nodes), 2),
                "owner_bytes_per_location": round(worst / len(biggest), 1),
                "mirror_mb_per_million_fleet_blocks": round(worst / held, 2),
                "owner_answer_p50_us": round(answer[len(answer) // 2] * 1e6, 1),
            }
            conn.send((out, [[bytes(k) for k in p] for p in prompts]))
            await asyncio.to_thread(conn.recv)  # the asker is done
        finally:
            for n in sims:
                with contextlib.suppress(Exception):
                    await n.close()

    asyncio.run(run())
