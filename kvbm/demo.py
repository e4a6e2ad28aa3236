"""`kvbm demo`: one node, embedded defaults, a synthetic engine.

Three turns over the same prompts. Turn 1 computes every block and stores it
(G1 -> G2); G2 is small, so older blocks are evicted, and having been used
once they are not admitted to disk. Turn 2, newest prompt first, finds the
recent prompts in G2 and recomputes the rest; that is every block's second
use, so from now on evicted blocks drain to G3. Turn 3 finds every prompt, in
G2 or G3, and every loaded block is checked bit-exact against the bytes the
engine computed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch

from kvbm.block_key import BlockKey, KeySpace
from kvbm.config import KvbmConfig, from_args
from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.layout import EngineKV, ModelGeometry
from kvbm.logs import setup_logging
from kvbm.manager import BlockManager, Tier, build_manager

DEMO_GEOMETRY = ModelGeometry(num_layers=4, num_kv_heads=4, head_dim=64, block_size=32)
DEMO_DEFAULTS = {"host_cache_mb": 32, "disk_cache_mb": 256, "disk_admit_min_uses": 2}


class SyntheticEngine:
    """Stands in for vLLM: per-layer KV tensors, and a 'forward pass' that fills a
    block with bytes derived from its key alone, so any reload can be checked."""

    def __init__(self, geometry: ModelGeometry, num_blocks: int) -> None:
        self.geometry = geometry
        self.layers = [
            torch.zeros(num_blocks, *geometry.layer_shape) for _ in range(geometry.num_layers)
        ]
        self.kv = EngineKV(geometry, self.layers)

    def expected(self, key: BlockKey) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(key.seq_hash & (2**63 - 1))
        return [torch.randn(self.geometry.layer_shape, generator=gen) for _ in self.layers]

    def compute(self, keys: list[BlockKey], block_ids: list[int]) -> None:
        for key, b in zip(keys, block_ids, strict=True):
            for layer, data in zip(self.layers, self.expected(key), strict=True):
                layer[b] = data

    def wipe(self) -> None:
        for layer in self.layers:
            layer.zero_()

    def matches(self, key: BlockKey, block_id: int) -> bool:
        return all(
            torch.equal(layer[block_id], data)
            for layer, data in zip(self.layers, self.expected(key), strict=True)
        )


@dataclass
class PathStats:
    blocks: int = 0
    seconds: float = 0.0


def main(args: argparse.Namespace) -> int:
    """The demo's own defaults (small tiers, a disk tier in a temporary directory)
    sit below the file, the environment and the flags."""
    with tempfile.TemporaryDirectory(prefix="kvbm-demo-") as tmp:
        cfg = from_args(args, defaults={**DEMO_DEFAULTS, "disk_cache_dir": tmp})
        setup_logging(cfg.log_level)
        return run(cfg, args.prompts, args.blocks_per_prompt)


def run(
    cfg: KvbmConfig, prompts: int = 24, blocks_per_prompt: int = 16, out: TextIO = sys.stdout
) -> int:
    g = DEMO_GEOMETRY
    mgr = build_manager(cfg, g)
    engine = SyntheticEngine(g, blocks_per_prompt)
    space = KeySpace(cfg.namespace, g.fingerprint)
    salt = salt_hash("kvbm-demo-model")
    rng = np.random.default_rng(7)
    requests = [
        space.keys(
            sequence_hashes(
                rng.integers(0, 32000, blocks_per_prompt * g.block_size), g.block_size, salt
            )
        )
        for _ in range(prompts)
    ]
    stats = {name: PathStats() for name in ("store", "host_hit", "disk_hit")}
    wrong = verified = 0
    ids = list(range(blocks_per_prompt))
    print(
        f"kvbm demo: {prompts} prompts x {blocks_per_prompt} blocks of {g.block_bytes >> 10} KiB; "
        f"G2 {cfg.host_cache_mb} MiB, G3 {cfg.disk_cache_mb} MiB at {cfg.disk_cache_dir or '-'}",
        file=out,
    )
    try:
        # Turn 2 walks the prompts backwards, so the ones still in G2 come first.
        for turn, order in ((1, requests), (2, requests[::-1]), (3, requests)):
            found = {"host": 0, "disk": 0, "computed": 0}
            for keys in order:
                engine.wipe()
                match = mgr.lookup(keys)
                t0 = time.perf_counter()
                n = mgr.onboard(engine.kv, keys, ids)
                dt = time.perf_counter() - t0
                from_disk = sum(1 for t in match.tiers[:n] if t == Tier.DISK)
                if n:
                    path = stats["disk_hit" if from_disk else "host_hit"]
                    path.blocks += n
                    path.seconds += dt
                found["disk"] += from_disk
                found["host"] += n - from_disk
                for i in range(n):
                    verified += 1
                    wrong += not engine.matches(keys[i], i)
                engine.compute(keys[n:], ids[n:])
                found["computed"] += len(keys) - n
                t0 = time.perf_counter()
                stats["store"].blocks += mgr.offload(engine.kv, ids, keys)
                stats["store"].seconds += time.perf_counter() - t0
            print(
                f"  turn {turn}: loaded {found['host']:4d} blocks from G2, "
                f"{found['disk']:4d} from G3, computed {found['computed']:4d}",
                file=out,
            )
        _summary(mgr, stats, g.block_bytes, out)
        print(
            f"\nverified {verified} loaded blocks against the engine's bytes: {wrong} wrong",
            file=out,
        )
        if not stats["disk_hit"].blocks:
            print("(no G3 hits: G2 held every prompt; lower --host-cache-mb to see G3)", file=out)
        return 1 if wrong else 0
    finally:
        mgr.close()


def _summary(mgr: BlockManager, stats: dict[str, PathStats], block_bytes: int, out: TextIO) -> None:
    m = mgr.metrics
    print("\npath                          blocks      MiB   seconds    GB/s", file=out)
    labels = {
        "store": "G1 -> G2 (store, with drains)",
        "host_hit": "G2 -> G1 (host hit)",
        "disk_hit": "G3 -> G2 -> G1 (disk hit)",
    }
    for name, label in labels.items():
        s = stats[name]
        mib = s.blocks * block_bytes / 2**20
        rate = s.blocks * block_bytes / s.seconds / 1e9 if s.seconds else 0.0
        print(f"{label:<29} {s.blocks:6d} {mib:8.1f} {s.seconds:9.3f} {rate:7.2f}", file=out)
    drained = m.value("kvbm_transfer_bytes_total", path="g2_to_g3") / block_bytes
    mib = drained * block_bytes / 2**20
    print(f"{'G2 -> G3 (drained on evict)':<29} {int(drained):6d} {mib:8.1f}", file=out)
    print(
        "\ntier  capacity  held  hits  misses  evictions  not admitted  checksum failures", file=out
    )
    for tier in ("host", "disk"):
        rejected = sum(
            m.value("kvbm_tier_admissions_rejected_total", tier=tier, reason=r)
            for r in ("frequency", "full", "io_error")
        )
        print(
            f"{tier:<5} {int(m.value('kvbm_tier_capacity_blocks', tier=tier)):8d} "
            f"{int(m.value('kvbm_tier_blocks', tier=tier)):5d} "
            f"{int(m.value('kvbm_tier_hits_total', tier=tier)):5d} "
            f"{int(m.value('kvbm_tier_misses_total', tier=tier)):7d} "
            f"{int(m.value('kvbm_tier_evictions_total', tier=tier)):10d} "
            f"{int(rejected):13d} "
            f"{int(m.value('kvbm_tier_checksum_failures_total', tier=tier)):18d}",
            file=out,
        )
