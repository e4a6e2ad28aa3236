"""`kvbm bench tiers`: bandwidth of every move between G1, G2 and G3, each timed
round by round beside memcpy and raw O_DIRECT disk I/O of the same bytes."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import random
import tempfile
import time

import numpy as np
import torch

from kvbm.admission import FrequencyFilter
from kvbm.bench.reference import Memcpy, RawDiskIO, gbps, interleaved
from kvbm.block_key import KeySpace
from kvbm.connector.direct import offload, onboard
from kvbm.connector.engine_kv import EngineKV, new_caches
from kvbm.disk_pool import IO_PIECE_BYTES, DiskPool, DiskRead, DiskWrite
from kvbm.host_pool import HostPool
from kvbm.layout import KV_LAYOUTS, PAGE, VLLM_CPU_LAYOUT, ModelGeometry
from kvbm.manager import BlockManager

# The e2e model's geometry: 8 layers, 8 KV heads of 64, block 32, fp32 -> 1 MiB blocks.
BENCH_GEOMETRY = ModelGeometry(num_layers=8, num_kv_heads=8, head_dim=64, block_size=32)
# MLA's latent (DeepSeek's 512 + 64 rope dims, one "head", no V), block 64 -> 1.1 MiB.
MLA_GEOMETRY = ModelGeometry(
    num_layers=8, num_kv_heads=1, head_dim=576, head_dim_v=0, block_size=64, kv_layout="LBNHC"
)
LAYOUTS = (*KV_LAYOUTS, "MLA")


def geometry_for(layout: str) -> ModelGeometry:
    if layout == "MLA":
        return MLA_GEOMETRY
    return dataclasses.replace(BENCH_GEOMETRY, kv_layout=layout)


def run(
    blocks: int = 256, reps: int = 7, directory: str | None = None, layout: str = VLLM_CPU_LAYOUT
) -> dict:
    g = geometry_for(layout)
    out: dict = {
        "bench": "tiers",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30),
            "platform": platform.platform(),
        },
        "blocks": blocks,
        "layout": layout,
        "block_bytes": g.block_bytes,
        "reps": reps,
    }
    with tempfile.TemporaryDirectory(dir=directory, prefix="kvbm-bench-") as d:
        out.update(_tier_moves(g, blocks, reps, d))
    out["bookkeeping_us_per_block"] = bookkeeping_us_per_block()
    out["g1_to_g2_vs_memcpy"] = round(out["g1_to_g2_gbps"] / out["memcpy_gbps"], 3)
    out["g2_to_g1_vs_memcpy"] = round(out["g2_to_g1_gbps"] / out["memcpy_gbps"], 3)
    for way in ("g1_to_g2", "g2_to_g1"):
        ratio = out[f"{way}_scattered_gbps"] / out["memcpy_gbps"]
        out[f"{way}_scattered_vs_memcpy"] = round(ratio, 3)
    out["g2_to_g3_vs_disk"] = round(out["g2_to_g3_gbps"] / out["disk_write_gbps"], 3)
    out["g3_to_g2_vs_disk"] = round(out["g3_to_g2_gbps"] / out["disk_read_gbps"], 3)
    return out


def _tier_moves(g: ModelGeometry, blocks: int, reps: int, directory: str) -> dict:
    nbytes = blocks * g.block_bytes
    space = KeySpace("bench", g.fingerprint)
    # Every store writes fresh keys, so G2 holds all of them without evicting.
    host = HostPool(g, (2 * reps + 6) * blocks * g.slot_bytes)
    disk = DiskPool(g, directory, PAGE + blocks * (PAGE + g.slot_bytes), mac_key=os.urandom(32))
    mgr = BlockManager(g, host, disk, FrequencyFilter(min_count=1))
    memcpy = Memcpy(nbytes)
    try:
        # Engine caches as vLLM allocates them, twice the batch: the batch's
        # blocks are consecutive (ids) or a random pick (scattered), as a
        # request's blocks are after the engine's cache has churned.
        src_caches = new_caches(g, 2 * blocks)
        for t in src_caches:
            t.copy_(torch.randn(t.shape))
        src, dst = EngineKV(g, src_caches), EngineKV(g, new_caches(g, 2 * blocks))
        ids = list(range(blocks))
        scattered = sorted(random.Random(7).sample(range(2 * blocks), blocks))
        random.Random(8).shuffle(scattered)
        batch = iter(range(10**9))
        loaded = space.keys(list(range(blocks)))
        offload(mgr, src, ids, loaded)
        loaded_scattered = space.keys(list(range(2**60, 2**60 + blocks)))
        offload(mgr, src, scattered, loaded_scattered)

        def store(block_ids: list[int]) -> None:
            b = next(batch) + 1
            fresh = space.keys(list(range(b * blocks, (b + 1) * blocks)))
            _expect(offload(mgr, src, block_ids, fresh))

        def load() -> None:
            _expect(onboard(mgr, dst, loaded, ids))

        def load_scattered() -> None:
            _expect(onboard(mgr, dst, loaded_scattered, scattered))

        # G2 <-> G3 through the calls the manager's drain and staging make; a
        # drain takes the checksum of each block as it leaves G2, so that is timed too.
        slots = [host.table.get(k) for k in loaded]

        writes = [
            DiskWrite(k, None, s, i) for i, (k, s) in enumerate(zip(loaded, slots, strict=True))
        ]

        def drain() -> None:
            _expect(sum(c is not None for c in disk.write(writes, host)))

        drain()
        sums = host.checksums(slots)
        staging = host.table.allocate(blocks)
        raw = RawDiskIO(
            disk.fd,
            disk.data_offset(0),
            _region(host, slots),
            _region(host, staging),
            IO_PIECE_BYTES,
        )
        pairs = enumerate(zip(loaded, sums, staging, strict=True))
        reads = [DiskRead(k, c, i, f) for i, (k, c, f) in pairs]

        def stage() -> None:
            _expect(disk.read(reads, host).count(True))

        t = interleaved(
            {
                "memcpy": memcpy,
                "g1_to_g2": lambda: store(ids),
                "g2_to_g1": load,
                "g1_to_g2_scattered": lambda: store(scattered),
                "g2_to_g1_scattered": load_scattered,
                "disk_write": raw.write,
                "g2_to_g3": drain,
                "disk_read": raw.read,
                "g3_to_g2": stage,
            },
            reps,
        )
        moved = torch.tensor(sorted(set(ids) | set(scattered)))
        for x, y in zip(src.parts, dst.parts, strict=True):
            if not torch.equal(x.engine.index_select(0, moved), y.engine.index_select(0, moved)):
                raise RuntimeError("bench round trip G1 -> G2 -> G1 was not bit-exact")
        for s in staging:
            host.table.abort(s)
        res = {f"{name}_gbps": gbps(nbytes, secs) for name, secs in t.items()}
        res["disk_direct_io"] = disk.direct_io
        res["disk_io_bytes"] = IO_PIECE_BYTES
        return res
    finally:
        mgr.close()


def _region(host: HostPool, slots: list[int]) -> np.ndarray:
    """The arena bytes of consecutive slots, as one buffer."""
    if slots != list(range(slots[0], slots[0] + len(slots))):
        raise RuntimeError("bench expects consecutive slots")
    return host.arena.array[
        slots[0] * host.geometry.slot_bytes : (slots[-1] + 1) * host.geometry.slot_bytes
    ]


def bookkeeping_us_per_block(n: int = 4096, reps: int = 7) -> float:
    """Register + lookup + pin + unpin of an n-block batch, per block, with no
    data movement (4 KiB blocks, no checksums)."""
    g = ModelGeometry(num_layers=1, num_kv_heads=1, head_dim=16, block_size=32)
    space = KeySpace("bench", g.fingerprint)
    host = HostPool(g, (reps + 2) * n * g.slot_bytes)
    mgr = BlockManager(g, host)
    try:
        times = []
        for r in range(reps + 1):
            keys = space.keys(list(range(r * n, (r + 1) * n)))
            t0 = time.perf_counter()
            plan = mgr.prepare_store(keys)
            mgr.complete_store(plan)
            if mgr.lookup(keys).num_blocks != n:
                raise RuntimeError("bookkeeping bench lost blocks")
            mgr.complete_load(mgr.prepare_load(keys))
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times[1:])) / n * 1e6, 3)
    finally:
        mgr.close()


def _expect(got: int, want: int | None = None) -> None:
    if got == 0 or (want is not None and got != want):
        raise RuntimeError(f"bench moved {got} blocks, expected {want or 'some'}")
