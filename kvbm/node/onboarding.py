"""Where an engine's lookup and load meet the tiers: the local prefix (G2,
and G3 staged into G2), then, where the engine allows remote tiers, the runs
that peers hold after it (from the index: its mirror, or the keys' owners), pulled
and verified into G2, all of it pinned until the engine has copied it out."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from discovery.index import PeerLookup
from discovery.records import PeerRun
from discovery.tier import Tier
from kvbm.block_key import BlockKey
from kvbm.engine_wire import Available
from kvbm.manager import BlockManager
from kvbm.node.peer_pool import PeerPool
from kvbm.peer_blocks import ManagerBlocks
from kvbm.plans import LoadPlan

log = logging.getLogger("kvbm.node")


class Source(StrEnum):
    """Where a block an engine loaded came from (a metric label, a stats key)."""

    LOCAL_HOST = "local_host"
    LOCAL_DISK = "local_disk"
    REMOTE_HOST = "remote_host"
    REMOTE_DISK = "remote_disk"

    @classmethod
    def of(cls, tier: Tier, remote: bool) -> Source:
        return cls(f"{'remote' if remote else 'local'}_{tier.value}")


@dataclass
class Loaded:
    """A load's pinned prefix, and where each of its blocks came from."""

    plan: LoadPlan
    sources: dict[Source, int]


class Onboarding:
    """Invariant: a block reaches the plan only from this node's tiers: pulled
    blocks are verified and registered by the sink before `prepare_load`
    pins them, so a peer's bytes are never handed to an engine unchecked.
    When a pull leaves a peer alone for a while, the key view is told, so
    that engines ask the node about peers' keys meanwhile."""

    def __init__(
        self,
        mgr: BlockManager,
        sink: ManagerBlocks,
        peers: PeerPool,
        index: PeerLookup,
        timeout_s: float,
    ) -> None:
        self.mgr = mgr
        self.sink = sink
        self.peers = peers
        self.index = index  # who holds what (no answer before the node joins)
        self.timeout_s = timeout_s

    async def lookup(
        self, keys: list[BlockKey], remote: frozenset[Tier], anchors: np.ndarray | None = None
    ) -> Available:
        """`anchors`: each key's group anchor (the engine names them; None:
        each key its own), which a sharded index places keys by."""
        local = self.mgr.lookup(keys).num_blocks
        counts = dict.fromkeys(Tier, 0)
        rest = None if anchors is None else anchors[local:]
        for run in await self._peer_runs(keys[local:], remote, rest):
            for t in run.tiers:
                counts[t] += 1
        return Available(local, counts[Tier.HOST], counts[Tier.DISK])

    async def _peer_runs(
        self, keys: list[BlockKey], remote: frozenset[Tier], anchors: np.ndarray | None
    ) -> list[PeerRun]:
        """Consecutive runs from keys[0] on, in the tiers the engine allows, from
        peers not left alone just now; each cut at the first tier not allowed."""
        if not remote or not keys:
            return []
        result = await self.index.lookup(keys, anchors)
        if result is None or result.local:
            return []  # no index yet, or a mirror behind on what this node holds: try later
        runs, pos, now = [], 0, time.monotonic()
        for run in result.runs:
            if run.start != pos or self.peers.avoiding(run.node_id, now):
                break
            n = next((i for i, t in enumerate(run.tiers) if t not in remote), run.length)
            if n == 0:
                break
            runs.append(PeerRun(run.node_id, pos, n, run.tiers[:n]))
            pos += n
            if n < run.length:
                break
        return runs

    async def load(
        self, keys: list[BlockKey], remote: frozenset[Tier], anchors: np.ndarray | None = None
    ) -> Loaded:
        """Pin the longest prefix available to this engine in G2, pulling from
        peers what only they hold (`anchors` as for `lookup`: pulled blocks
        keep theirs)."""
        local = self.mgr.lookup(keys)
        start = local.num_blocks
        pulled: list[Tier] = []
        rest = None if anchors is None else anchors[start:]
        for run in await self._peer_runs(keys[start:], remote, rest):
            first = start + run.start
            want = keys[first : first + run.length]
            staged = run.tiers[0] == Tier.DISK
            sink = self.sink
            if anchors is not None:
                theirs = anchors[first : first + run.length].tolist()
                sink = sink.landing(dict(zip(want, theirs, strict=True)))
            t0 = time.perf_counter()
            avoided = self.peers.avoided.get(run.node_id)
            got = await self.peers.pull(run.node_id, want, sink, self.timeout_s, staged)
            took = time.perf_counter() - t0
            until = self.peers.avoided.get(run.node_id)
            if until != avoided and until is not None and self.mgr.view is not None:
                # the key view's peers' keys name this peer: engines ask the node a while
                self.mgr.view.avoid_peers_until(until)
            self.mgr.metrics.pulls.labels(run.tiers[0]).observe(took)
            log.debug(
                "pulled peer=%s tier=%s blocks=%d of %d ms=%.2f",
                run.node_id,
                run.tiers[0],
                len(got),
                run.length,
                took * 1e3,
            )
            pulled += run.tiers[: len(got)]
            if len(got) < run.length:
                break
        plan = None
        if not pulled and Tier.DISK not in local.tiers:  # the common hit: all in G2
            plan = self.mgr.prepare_load(keys, stage=False)  # no I/O: no thread hop
            if plan.num_blocks < min(start, self.mgr.max_load_blocks):  # one left G2 meanwhile
                self.mgr.complete_load(plan)
                plan = None
        if plan is None:
            plan = await asyncio.to_thread(self.mgr.prepare_load, keys)
        sources = dict.fromkeys(Source, 0)
        for t in local.tiers[: plan.num_blocks]:
            sources[Source.of(t, remote=False)] += 1
        for t in pulled[: max(0, plan.num_blocks - start)]:
            sources[Source.of(t, remote=True)] += 1
        for source, n in sources.items():
            if n:
                self.mgr.metrics.engine_blocks.labels(source.value).inc(n)
        return Loaded(plan, sources)

    def pulls(self) -> dict[str, dict[str, float]]:
        """Pulls from peers since the start, by the tier of the run's first
        block: how many, and their seconds in all."""
        value = self.mgr.metrics.value
        name = "kvbm_peer_pull_seconds"
        return {
            t.value: {
                "count": int(value(f"{name}_count", tier=t.value)),
                "seconds": round(value(f"{name}_sum", tier=t.value), 6),
            }
            for t in Tier
        }

    def served(self) -> dict[str, int]:
        """Blocks handed to engines since the start, by source."""
        value = self.mgr.metrics.value
        return {s.value: int(value("kvbm_engine_blocks_total", source=s.value)) for s in Source}
