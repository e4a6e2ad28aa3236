"""`kvbm bench index`: the etcd-backed block-location index against a real etcd
started for the run. Keys are real block keys (`KeySpace.keys`); `--nodes N`
runs a fleet of N simulated nodes on a prompt trace (kvbm/bench/fleet_trace.py),
with every node mirroring the fleet from etcd (`--layout mirror`, what nodes
run today), or the sharded index (`--layout sharded`, discovery/sharded.py:
owners by ring; the calls between nodes made in process through the wire
codec, no sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import multiprocessing
import os
import signal
import time
import tracemalloc
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgpack
import numpy as np

from discovery.etcd_index import EtcdIndex, mirror_index, sharded_index, snapshot
from discovery.etcd_server import EtcdServer
from discovery.mirror import IndexMirror
from discovery.owner_table import MERGE_SHIFT, OwnerTable
from discovery.owners import places
from discovery.records import NodeRecord
from discovery.runs import MAX_RUN_KEYS, RunRecord
from discovery.schema import node_path, run_path
from discovery.sharded import ShardedLocations
from discovery.signing import IndexSigner, wall_ms
from discovery.tier import Tier
from kvbm.bench.fleet_trace import NodeTrace, TraceShape
from kvbm.block_key import GROUP_BLOCKS, Groups, KeySpace, anchor_of, seq_hash
from kvbm.config import KvbmConfig
from kvbm.layout import ModelGeometry
from kvbm.node.index_choice import INDEX_FLUSH_S

NS = "bench"
SIGNER = IndexSigner(b"bench-fleet-secret-0123456789")  # nodes sign what they publish


def block_keys(start: int, n: int, rank: int = 0) -> list[bytes]:
    return KeySpace(NS, 0x5EED, rank).keys(list(range(start, start + n)))


def _index(endpoint: str, node_id: str, ttl: int, watch: bool = True, **kw) -> EtcdIndex:
    record = NodeRecord(node_id, "127.0.0.1", 7000, nixl_agent=node_id)
    return mirror_index([endpoint], NS, record, lease_ttl=ttl, watch=watch, signer=SIGNER, **kw)


def _put_runs(m: IndexMirror, node: str, keys: list[bytes], tier: Tier, first_id: int = 0) -> None:
    """Fill a mirror directly with a node's keys, in runs as a publisher writes them."""
    for i in range(0, len(keys), MAX_RUN_KEYS):
        part = keys[i : i + MAX_RUN_KEYS]
        record = RunRecord.of(part, [tier] * len(part))
        m.put(run_path(NS, node, first_id + i // MAX_RUN_KEYS), record.encode())


async def publish_rate(endpoint: str, ttl: int, total: int = 100_000) -> dict:
    """One node publishes `total` new locations as fast as the engine could hand
    them over (bursts of 1,000); the clock stops when etcd has them all."""
    a = _index(endpoint, "pub", ttl, watch=False)
    await a.start()
    try:
        keys = block_keys(0, total)
        t0 = time.perf_counter()
        for i in range(0, total, 1000):
            a.publish(dict.fromkeys(keys[i : i + 1000], Tier.HOST))
            await asyncio.sleep(0)
        await a.flush(timeout=300)
        seconds = time.perf_counter() - t0
        return {"publish_updates_per_s": round(total / seconds), "publish_updates": total}
    finally:
        await a.close()


async def writes_per_block(endpoint: str, ttl: int, blocks: int = 20_000) -> dict:
    """Engine-like churn: blocks arrive in bursts of 100 per ms; a third are
    evicted again within the same burst window (short-lived), a third later
    move host -> disk. Writes counted after coalescing (etcd index defaults:
    5 ms flushes, no age limit; the node's settings are in `fleet`)."""
    a = _index(endpoint, "churn", ttl, watch=False)
    await a.start()
    try:
        keys = block_keys(10_000_000, blocks)
        for i in range(0, blocks, 100):
            burst = keys[i : i + 100]
            a.publish(dict.fromkeys(burst, Tier.HOST))
            a.publish({}, burst[::3])
            await asyncio.sleep(0.001)
        await a.flush(timeout=120)
        a.publish(dict.fromkeys(keys[1::3], Tier.DISK))
        await a.flush(timeout=120)
        return {"etcd_writes_per_block": round(a.layout.writes / blocks, 3), "churn_blocks": blocks}
    finally:
        await a.close()


async def mirror_lag(endpoint: str, ttl: int, rate: int = 1000, seconds: float = 3.0) -> dict:
    """Node A publishes one location every 1/rate s; the lag is publish -> seen in
    node B's mirror (another client, another watch), polled every 0.5 ms. The
    etcd index's defaults (5 ms flushes, no age limit): what the index itself
    adds; a node waits `index_publish_after_ms` more on purpose."""
    a, b = _index(endpoint, "lag-a", ttl, watch=False), _index(endpoint, "lag-b", ttl)
    await a.start()
    await b.start()
    try:
        keys = block_keys(20_000_000, int(rate * seconds))
        sent: dict[bytes, float] = {}
        lags: list[float] = []

        async def watcher() -> None:
            while len(lags) < len(keys):
                now = time.perf_counter()
                for k in [k for k in sent if k in b.mirror.locations]:
                    lags.append(now - sent.pop(k))
                await asyncio.sleep(0.0005)

        check = asyncio.create_task(watcher())
        t0 = time.perf_counter()
        for i, k in enumerate(keys):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[k] = time.perf_counter()
            a.publish({k: Tier.HOST})
        await asyncio.wait_for(check, 30)
        lags.sort()
        return {
            "mirror_lag_p50_ms": round(lags[len(lags) // 2] * 1e3, 2),
            "mirror_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1e3, 2),
            "mirror_lag_rate_per_s": rate,
        }
    finally:
        await a.close()
        await b.close()


def _doomed_node(endpoint: str, ttl: int, ready: Connection) -> None:
    """Child process: a node that publishes 1,000 locations, then is killed."""

    async def run() -> None:
        node = _index(endpoint, "doomed", ttl, watch=False)
        await node.start()
        node.publish(dict.fromkeys(block_keys(30_000_000, 1000), Tier.HOST))
        await node.flush(timeout=30)
        ready.send(True)
        await asyncio.sleep(3600)

    asyncio.run(run())


async def dead_node_cleanup(endpoint: str, ttl: int) -> dict:
    """SIGKILL of a node process -> its record and locations gone from a peer's mirror."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_doomed_node, args=(endpoint, ttl, child)
    )
    proc.start()
    b = _index(endpoint, "survivor", ttl)
    try:
        if not await asyncio.to_thread(parent.poll, 60):
            raise RuntimeError("doomed node never became ready")
        await b.start()
        while len(b.mirror.locations) < 1000:
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        while b.mirror.locations or "doomed" in b.mirror.nodes:
            if time.perf_counter() - t0 > ttl * 3 + 10:
                raise RuntimeError("dead node's entries never left the mirror")
            await asyncio.sleep(0.01)
        return {"dead_node_cleanup_s": round(time.perf_counter() - t0, 2), "lease_ttl_s": ttl}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        await b.close()


def lookup_latency(locations: int = 1_000_000, nodes: int = 32, samples: int = 2000) -> dict:
    """128-key lookups against a mirror holding `locations` locations over
    `nodes` nodes (filled directly: the same records the watch delivers)."""
    m = IndexMirror(NS)
    per_node = locations // nodes
    for n in range(nodes):
        m.put(node_path(NS, f"n{n}"), NodeRecord(f"n{n}", "127.0.0.1", 7000).encode())
    # Node n holds a stretch of consecutive keys, as prefixes make it.
    keys = block_keys(0, per_node * nodes)
    for n in range(nodes):
        tier = Tier.HOST if n % 2 else Tier.DISK
        _put_runs(m, f"n{n}", keys[n * per_node : (n + 1) * per_node], tier)
    times = []
    for s in range(samples):
        start = (s * 7919) % (len(keys) - 128)
        req = block_keys(start, 128)  # fresh objects, as an engine hands them over
        t0 = time.perf_counter()
        m.lookup(req, "n0")
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "lookup_p50_us": round(times[len(times) // 2] * 1e6, 1),
        "lookup_p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
        "lookup_mirror_locations": per_node * nodes,
    }


def apply_cost(n: int = 100_000, run: int = 64) -> dict:
    """CPU per location when a mirror applies new runs of `run` keys, with and
    without checking the fleet's signature on each run (what a node pays per
    location another node publishes)."""
    keys = block_keys(50_000_000, n)
    parts = [keys[i : i + run] for i in range(0, n, run)]
    paths = [run_path(NS, "n1", i) for i in range(len(parts))]
    raw = [RunRecord.of(p, [Tier.HOST] * len(p)).encode() for p in parts]
    out = {}
    for name, signer in (("mirror_apply_us", None), ("mirror_apply_signed_us", SIGNER)):
        m = IndexMirror(NS, signer)
        if signer is not None:  # a node's runs show with its record, fresh
            rec, n1 = node_path(NS, "n1"), NodeRecord("n1", "127.0.0.1", 1).encode()
            m.put(rec, signer.sign(rec, n1, stamp=wall_ms(), valid=3_600_000))
        values = (
            raw if signer is None else [signer.sign(*pv) for pv in zip(paths, raw, strict=True)]
        )
        t0 = time.perf_counter()
        for p, v in zip(paths, values, strict=True):
            m.put(p, v)
        out[name] = round((time.perf_counter() - t0) / n * 1e6, 2)
        assert len(m.locations) == n
    return out


def mirror_bytes_per_million(n: int = 200_000) -> int:
    """Python heap bytes a mirror spends per million locations (tracemalloc):
    32 nodes, runs of 1,024 keys."""
    keys = block_keys(40_000_000, n)
    gc.collect()
    tracemalloc.start()
    m = IndexMirror(NS)
    before = tracemalloc.get_traced_memory()[0]
    per = n // 32
    for i in range(32):
        _put_runs(m, f"n{i}", keys[i * per : (i + 1) * per], Tier.HOST)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return round(used * 1_000_000 / (per * 32))


async def etcd_put_capacity(endpoint: str, value_bytes: int, seconds: float = 3.0) -> dict:
    """etcd's sustained puts/s for values of `value_bytes` (run records of the
    fleet's mean size): transactions of 128 puts, four in flight, as a node
    writes them. The reference for `fleet_nodes_per_etcd`."""
    idx = _index(endpoint, "capacity", 60, watch=False)
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
    idx = _index(endpoint, "refresh-capacity", 60, watch=False)
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


async def _replay(
    traces: list[NodeTrace],
    publishers: list,
    totals: Callable[[], tuple[int, ...]],
    warmup_s: float,
    seconds: float,
    rate: int,
) -> tuple[tuple[int, ...], float]:
    """Replay each node's trace at `rate` new blocks/s into its publisher
    (anything with `publish(changes, anchors=)`), in 20 ms ticks, for `warmup_s`
    then `seconds`; returns what `totals()` counted over the measured
    window, and the window's length."""
    t0, tick = time.perf_counter(), 0
    base: tuple[int, ...] | None = None
    while True:
        elapsed = time.perf_counter() - t0
        if base is None and elapsed >= warmup_s:
            base, t_measure = totals(), time.perf_counter()
        if elapsed >= warmup_s + seconds:
            break
        for t, p in zip(traces, publishers, strict=True):
            changes: dict = {}
            while t.created < rate * elapsed:
                t.request(changes)
            p.publish(changes, anchors=t.anchors)
        tick += 1
        await asyncio.sleep(max(0.0, t0 + tick * 0.02 - time.perf_counter()))
    assert base is not None
    measured = time.perf_counter() - t_measure
    return tuple(x - b for x, b in zip(totals(), base, strict=True)), measured


async def fleet(
    endpoint: str,
    ttl: int,
    nodes: int,
    warmup_s: float = 6.0,
    seconds: float = 10.0,
    rate: int = 1000,
    flush_interval: float = INDEX_FLUSH_S,
    publish_after: float = KvbmConfig().index_publish_after_ms / 1000,
    lookups: int = 2000,
) -> dict:
    """`nodes` simulated nodes, each storing `rate` new blocks/s of a prompt
    trace into G2/G3 tiers that evict (kvbm/bench/fleet_trace.py), each
    publishing its tier changes through its own EtcdIndex with the node's
    settings; writes are counted over `seconds` after `warmup_s` (the tiers
    full, so blocks are evicted as fast as they come). Then one node's mirror
    of the fleet is read back and measured: bytes, and lookups of the trace's
    own prompts; and etcd's put rate for values of the runs' mean size, the
    reference of `fleet_nodes_per_etcd`."""
    space = KeySpace(NS, 0x5EED)
    shape = TraceShape(host_blocks=1024, disk_blocks=4096)
    traces = [NodeTrace(i, space, shape) for i in range(nodes)]
    # A long lease: the simulation keeps the event loop busy, and a lease that
    # lapsed would republish everything (and count it).
    pubs = [
        _index(
            endpoint,
            f"sim{i}",
            max(ttl, 60),
            watch=False,
            flush_interval=flush_interval,
            publish_after=publish_after,
        )
        for i in range(nodes)
    ]
    for p in pubs:
        await p.start()
    try:

        def totals() -> tuple[int, ...]:
            return (
                sum(p.layout.writes for p in pubs),
                sum(t.created for t in traces),
                sum(p.layout.bytes_written for p in pubs),
            )

        window, measured = await _replay(traces, pubs, totals, warmup_s, seconds, rate)
        writes, created, written = window
        held = sum(t.held() for t in traces)
        await asyncio.gather(*(p.flush(timeout=120) for p in pubs))
        # One node's mirror of the fleet, as a watch would have built it.
        gc.collect()
        tracemalloc.start()
        mirror = await snapshot([endpoint], NS, SIGNER)
        mirror_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        locations = sum(len(h) for h in mirror.locations.values())  # (block, node) pairs
        prompts = [c[:128] for t in traces for c in t.convs][:lookups]
        times = []
        for prompt in prompts:
            req = [bytes(k) for k in prompt]  # fresh objects, as an engine hands them over
            t1 = time.perf_counter()
            mirror.lookup(req, "observer")
            times.append(time.perf_counter() - t1)
        times.sort()
        per_node_writes_s = writes / measured / nodes
        mean_value = written / max(1, writes)
        out = {
            "fleet_nodes": nodes,
            "fleet_blocks_per_s_per_node": round(created / measured / nodes),
            "fleet_flush_interval_s": flush_interval,
            "fleet_publish_after_s": publish_after,
            "etcd_writes_per_1000_blocks": round(writes / created * 1000, 1),
            "etcd_writes_per_s_per_node": round(per_node_writes_s, 1),
            "etcd_bytes_per_block": round(written / created, 1),
            "etcd_mean_write_bytes": round(mean_value),
            "fleet_blocks_held": held,
            "fleet_blocks_in_index": locations,
            "mirror_mb_per_million_fleet_blocks": round(mirror_bytes / held, 1),
            "mirror_mb_per_million_locations": round(mirror_bytes / locations, 1),
            "lookup_p50_us": round(times[len(times) // 2] * 1e6, 1),
            "lookup_p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
            "lookup_prompts": len(times),
        }
    finally:
        for p in pubs:
            await p.close()
    out.update(await etcd_put_capacity(endpoint, round(mean_value)))
    out["fleet_nodes_per_etcd"] = round(out["etcd_puts_per_s"] / per_node_writes_s)
    # Every mirror receives every run written: arithmetic from the measured
    # bytes a node writes, at a fleet of 500.
    inbound = 500 * per_node_writes_s * mean_value
    out["mirror_inbound_mb_per_s_at_500_nodes"] = round(inbound / 1e6, 1)
    out["etcd_watch_out_gb_per_s_at_500_nodes"] = round(500 * inbound / 1e9, 1)
    return out


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
        from kvbm.peer_tiers import ManagerTiers
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
            ManagerTiers(self.mgr),
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
            window, measured = await _replay(traces, indexes, totals, warmup_s, seconds, rate)
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


def run(nodes: int = 0, ttl: int = 3, layout: str = "mirror") -> dict:
    out: dict = {
        "bench": "index",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
    }
    with EtcdServer() as etcd:

        async def all_async() -> None:
            if nodes and layout == "sharded":
                out.update(await sharded_fleet(etcd.endpoint, ttl, nodes))
                return
            if nodes:
                out.update(await fleet(etcd.endpoint, ttl, nodes))
                out.update(await dead_node_cleanup(etcd.endpoint, ttl))
                return
            out.update(await publish_rate(etcd.endpoint, ttl))
            out.update(await writes_per_block(etcd.endpoint, ttl))
            out.update(await mirror_lag(etcd.endpoint, ttl))
            out.update(await dead_node_cleanup(etcd.endpoint, ttl))

        asyncio.run(all_async())
    if not nodes:
        out.update(lookup_latency())
        out.update(apply_cost())
    out["mirror_bytes_per_million_locations"] = mirror_bytes_per_million()
    return out
