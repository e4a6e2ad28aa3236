"""`kvbm bench index`: the etcd-backed block-location index against a real etcd
started for the run. Keys are real block keys (`KeySpace.keys`); `--nodes N`
runs a fleet of N simulated nodes on a prompt trace (kvbm/bench/fleet_trace.py),
with every node mirroring the fleet from etcd (`--layout mirror`, what nodes
run today), or the sharded index (`--layout sharded`, discovery/sharded.py:
owners by ring; the calls between nodes made in process through the wire
codec, no sockets)."""

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

from discovery.etcd_server import EtcdServer
from discovery.mirror import IndexMirror
from discovery.records import NodeRecord
from discovery.runs import MAX_RUN_KEYS, RunRecord
from discovery.schema import node_path, run_path
from discovery.signing import wall_ms
from discovery.tier import Tier
from kvbm.bench.index_etcd import NS, SIGNER, block_keys, open_index
from kvbm.bench.index_fleet import fleet
from kvbm.bench.index_sharded import sharded_fleet


def _put_runs(m: IndexMirror, node: str, keys: list[bytes], tier: Tier, first_id: int = 0) -> None:
    """Fill a mirror directly with a node's keys, in runs as a publisher writes them."""
    for i in range(0, len(keys), MAX_RUN_KEYS):
        part = keys[i : i + MAX_RUN_KEYS]
        record = RunRecord.of(part, [tier] * len(part))
        m.put(run_path(NS, node, first_id + i // MAX_RUN_KEYS), record.encode())


async def publish_rate(endpoint: str, ttl: int, total: int = 100_000) -> dict:
    """One node publishes `total` new locations as fast as the engine could hand
    them over (bursts of 1,000); the clock stops when etcd has them all."""
    a = open_index(endpoint, "pub", ttl, watch=False)
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
    a = open_index(endpoint, "churn", ttl, watch=False)
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
    a, b = open_index(endpoint, "lag-a", ttl, watch=False), open_index(endpoint, "lag-b", ttl)
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
        node = open_index(endpoint, "doomed", ttl, watch=False)
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
    b = open_index(endpoint, "survivor", ttl)
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
