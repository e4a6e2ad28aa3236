"""`kvbm bench index`: the etcd-backed block-location index against a real etcd
started for the run. Keys are real block keys (`KeySpace.keys`)."""

from __future__ import annotations

import asyncio
import datetime
import gc
import multiprocessing
import os
import signal
import time
import tracemalloc
from multiprocessing.connection import Connection

from discovery.etcd_index import EtcdIndex
from discovery.etcd_server import EtcdServer
from discovery.mirror import IndexMirror
from discovery.records import NodeRecord, Tier
from discovery.schema import block_path, node_path
from discovery.signing import IndexSigner
from kvbm.block_key import KeySpace

NS = "bench"
SIGNER = IndexSigner(b"bench-fleet-secret-0123456789")  # nodes sign what they publish


def block_keys(start: int, n: int, rank: int = 0) -> list[bytes]:
    return KeySpace(NS, 0x5EED, rank).keys(list(range(start, start + n)))


def _index(endpoint: str, node_id: str, ttl: int, watch: bool = True) -> EtcdIndex:
    record = NodeRecord(node_id, "127.0.0.1", 7000, nixl_agent=node_id)
    return EtcdIndex([endpoint], NS, record, lease_ttl=ttl, watch=watch, signer=SIGNER)


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
    move host -> disk. Writes counted after coalescing."""
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
        return {"etcd_writes_per_block": round(a.writes / blocks, 3), "churn_blocks": blocks}
    finally:
        await a.close()


async def mirror_lag(endpoint: str, ttl: int, rate: int = 1000, seconds: float = 3.0) -> dict:
    """Node A publishes one location every 1/rate s; the lag is publish -> seen in
    node B's mirror (another client, another watch), polled every 0.5 ms."""
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
    `nodes` nodes (filled directly: the same dicts the watch fills)."""
    m = IndexMirror(NS)
    per_node = locations // nodes
    for n in range(nodes):
        m.put(node_path(NS, f"n{n}"), NodeRecord(f"n{n}", "127.0.0.1", 7000).encode())
    # Node n holds a stretch of consecutive keys, as prefixes make it.
    keys = block_keys(0, per_node * nodes)
    for n in range(nodes):
        value = b"host" if n % 2 else b"disk"
        for k in keys[n * per_node : (n + 1) * per_node]:
            m.put(block_path(NS, k, f"n{n}"), value)
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


def apply_cost(n: int = 100_000) -> dict:
    """CPU per watch event applied to a mirror, with and without checking the
    fleet's signature on its value (what a node pays per location published)."""
    paths = [block_path(NS, k, "n1") for k in block_keys(50_000_000, n)]
    out = {}
    for name, signer in (("mirror_apply_us", None), ("mirror_apply_signed_us", SIGNER)):
        m = IndexMirror(NS, signer)
        values = [b"host" if signer is None else signer.sign(p, b"host") for p in paths]
        t0 = time.perf_counter()
        for p, v in zip(paths, values, strict=True):
            m.put(p, v)
        out[name] = round((time.perf_counter() - t0) / n * 1e6, 2)
        assert len(m.locations) == n
    return out


def mirror_bytes_per_million(n: int = 200_000) -> int:
    """Python heap bytes a mirror spends per million locations (tracemalloc)."""
    keys = block_keys(40_000_000, n)
    gc.collect()
    tracemalloc.start()
    m = IndexMirror(NS)
    before = tracemalloc.get_traced_memory()[0]
    for i, k in enumerate(keys):
        m.put(block_path(NS, k, f"n{i % 32}"), b"host")
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return round(used * 1_000_000 / n)


async def scale(endpoint: str, ttl: int, nodes: int, seconds: float = 5.0, rate: int = 500) -> dict:
    """`nodes` simulated publishers (no mirrors) at `rate` updates/s each, and one
    observer mirror: etcd writes/s sustained, and how far the observer keeps up."""
    pubs = [_index(endpoint, f"sim{i}", ttl, watch=False) for i in range(nodes)]
    observer = _index(endpoint, "observer", ttl)
    for p in pubs:
        await p.start()
    await observer.start()
    try:
        per_tick = max(1, rate // 100)
        t0 = time.perf_counter()
        tick = 0
        while time.perf_counter() - t0 < seconds:
            for i, p in enumerate(pubs):
                base = 50_000_000 + i * 1_000_000 + tick * per_tick
                p.publish(dict.fromkeys(block_keys(base, per_tick), Tier.HOST))
            tick += 1
            await asyncio.sleep(max(0.0, t0 + tick / 100 - time.perf_counter()))
        await asyncio.gather(*(p.flush(timeout=120) for p in pubs))
        elapsed = time.perf_counter() - t0
        writes = sum(p.writes for p in pubs)
        expected = tick * per_tick * nodes
        t1 = time.perf_counter()
        while len(observer.mirror.locations) < expected and time.perf_counter() - t1 < 60:
            await asyncio.sleep(0.05)
        return {
            "scale_nodes": nodes,
            "scale_offered_updates_per_s": nodes * per_tick * 100,
            "scale_etcd_writes_per_s": round(writes / elapsed),
            "scale_observer_locations": len(observer.mirror.locations),
            "scale_observer_caught_up_s": round(time.perf_counter() - t1, 2),
        }
    finally:
        for p in pubs:
            await p.close()
        await observer.close()


def run(nodes: int = 0, ttl: int = 3) -> dict:
    out: dict = {
        "bench": "index",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
    }
    with EtcdServer() as etcd:

        async def all_async() -> None:
            if nodes:
                out.update(await scale(etcd.endpoint, ttl, nodes))
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
