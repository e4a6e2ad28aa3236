"""`kvbm bench index --nodes N` on the mirror layout: N simulated nodes replay
a prompt trace (kvbm/bench/fleet_trace.py) into their own etcd indexes;
etcd's writes and one node's mirror of the fleet are measured."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Callable

from discovery.etcd_index import snapshot
from kvbm.bench.fleet_trace import NodeTrace, TraceShape
from kvbm.bench.index_etcd import NS, SIGNER, etcd_put_capacity, open_index
from kvbm.block_key import KeySpace
from kvbm.config import KvbmConfig
from kvbm.node.index_choice import INDEX_FLUSH_S


async def replay(
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
        open_index(
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

        window, measured = await replay(traces, pubs, totals, warmup_s, seconds, rate)
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
