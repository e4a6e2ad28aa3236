"""What the fleet learns of this node: its record and every change of its
tiers, published to the index (etcd, or in memory for one node). With
`index_layout` sharded, etcd holds the records and the locations go to
their owners (discovery/sharded.py) through the node's peer connections."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import numpy as np

from discovery.errors import DuplicateNode, IndexUnavailable
from discovery.etcd_index import EtcdIndex
from discovery.memory import MemoryIndex
from discovery.records import LookupResult, NodeRecord, Tier
from discovery.sharded import ShardedLocations
from discovery.signing import IndexSigner
from kvbm.block_key import BlockKey
from kvbm.config import KvbmConfig
from kvbm.key_view import REMOTE_DISK, REMOTE_HOST, KeyView
from kvbm.manager import BlockManager
from kvbm.node.peer_pool import PeerPool

log = logging.getLogger("kvbm.node")
PUBLISH_INTERVAL_S = 0.02  # the tiers' changes into the index's runs (no etcd write)
# At most one etcd write per changed run this often: a run's tier changes and
# evictions come in bursts (measured on `kvbm bench index --nodes 32`'s trace:
# 84 etcd writes per 1,000 blocks at 5 ms, 67 at 50 ms, 16-18 at 500 ms).
INDEX_FLUSH_S = 0.5
INDEX_RETRY_S = 2.0
REBUILD_S = 2.0  # how long the key view's peers' keys are not believed after a rebuild


class Publisher:
    """Invariants: `index` is None until the node has joined (local serving
    goes on meanwhile); the node joins when it starts, with a record that
    says it serves no engine yet, and `serve` publishes the full record and
    every block from then on: the index holds every block the tiers held
    when publishing began, plus every change since, in order."""

    def __init__(self, record: NodeRecord, cfg: KvbmConfig, signer: IndexSigner) -> None:
        self.signer = signer  # what the node writes is signed; only signed values are believed
        self.record = record
        self.namespace = cfg.namespace
        self.etcd_endpoints = cfg.etcd_endpoints
        self.etcd_tls = cfg.etcd_tls
        self.lease_ttl = cfg.lease_ttl
        self.publish_after = cfg.index_publish_after_ms / 1000
        # the node's share of a sharded index (its calls to owners once it serves)
        self.locations: ShardedLocations | None = None
        if cfg.index_layout == "sharded" and cfg.etcd_endpoints:
            self.locations = ShardedLocations(record.node_id)
        self.mgr: BlockManager | None = None
        self.index: EtcdIndex | MemoryIndex | None = None
        self._joined = asyncio.Event()
        self._tried = asyncio.Event()  # the first attempt to join has ended, either way
        self._join: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._join = asyncio.create_task(self._join_index())
        self._tasks.append(self._join)

    async def joined(self, timeout: float) -> bool:
        """Whether the node is in the index once its first attempt to join
        has ended (at most `timeout`: etcd away, it goes on in the background);
        raises what ended the join for good (DuplicateNode: another live node
        has this id)."""
        assert self._join is not None, "start() first"
        tried = asyncio.ensure_future(self._tried.wait())
        first = asyncio.FIRST_COMPLETED
        await asyncio.wait([self._join, tried], timeout=timeout, return_when=first)
        tried.cancel()
        if self._join.done() and not self._join.cancelled():
            self._join.result()
        return self._joined.is_set()

    async def serve(self, mgr: BlockManager, record: NodeRecord, peers: PeerPool) -> None:
        """The tiers exist: publish the node's full record and its blocks
        (and, sharded, reach the owners through `peers`)."""
        self.mgr, self.record = mgr, record
        if self.locations is not None:
            self.locations.send, self.locations.ask = peers.place, peers.locate
            self.locations.warm = peers.warm
            for node in self.locations.ring.nodes:  # the members known before serving
                if node != record.node_id:
                    self._tasks.append(asyncio.create_task(peers.warm(node)))
        mgr.track_changes()
        if self.index is not None:
            await self.index.set_record(record)
        self._tasks.append(asyncio.create_task(self._publish_changes(mgr)))

    # -- what the rest of the node reads -------------------------------------
    async def lookup(
        self, keys: list[bytes], anchors: np.ndarray | None = None
    ) -> LookupResult | None:
        """Who holds `keys`: from the mirror (no etcd round trip), or from
        their owners (sharded: by each key's group anchor); None before the join."""
        return await self.index.locate(keys, anchors) if self.index is not None else None

    def peer(self, node_id: str) -> NodeRecord | None:
        return self.index.mirror.nodes.get(node_id) if self.index is not None else None

    def peers(self) -> list[str]:
        return sorted(self.index.mirror.nodes) if self.index is not None else []

    def state(self) -> str:
        if self.index is None:
            return "none yet"
        if isinstance(self.index, MemoryIndex):
            return "memory"
        return "etcd up" if self.index.connected else "etcd down"

    # -- tasks ---------------------------------------------------------------
    async def _join_index(self) -> None:
        """Register in the index, retrying while etcd is away; a second live
        node with this id ends the join (and the node) instead."""
        while True:
            record = self.record
            index: EtcdIndex | MemoryIndex
            if self.etcd_endpoints:
                index = EtcdIndex(
                    self.etcd_endpoints,
                    self.namespace,
                    record,
                    self.lease_ttl,
                    flush_interval=INDEX_FLUSH_S,
                    publish_after=self.publish_after,
                    signer=self.signer,
                    tls=self.etcd_tls,
                    locations=self.locations,
                )
            else:
                index = MemoryIndex(self.namespace, record)
            try:
                await index.start()
                break
            except DuplicateNode as e:  # at start this ends the node; later, loudly, the join
                log.error("not joining the index: %s", e)
                raise
            except IndexUnavailable as e:
                log.warning("index unavailable, serving local tiers only: %s", e)
            except Exception:
                log.exception("index failed to start, serving local tiers only")
            self._tried.set()
            await asyncio.sleep(INDEX_RETRY_S)
        self.index = index
        if self.record != record:  # `serve` came while we joined
            await index.set_record(self.record)
        self._joined.set()

    async def _publish_changes(self, mgr: BlockManager) -> None:
        """Every change of the tiers, taken every tick (the shared key view
        learns then what left); once joined, every block held, then every
        change, into the index."""
        published = False
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                if published:
                    self._publish(mgr)
                elif self._joined.is_set():
                    self._first_publish(mgr)
                    published = True
                else:
                    mgr.take_changes()  # the index takes everything held when it joins
            except Exception:  # never let one bad batch stop every later one
                log.exception("publishing to the index failed")

    def _first_publish(self, mgr: BlockManager) -> None:
        assert self.index is not None
        mirror = self.index.mirror
        # values not believed: not signed by the fleet, or copies out of date
        rejected = lambda: mirror.rejected + mirror.stale  # noqa: E731
        mgr.metrics.watch_index(rejected, lambda: mirror.over_cap)
        mgr.take_changes()  # superseded by the full state below
        self._publish(mgr, everything=True)
        view, me = mgr.view, self.record.node_id
        if view is None or self.locations is not None:
            return  # sharded: the mirror holds none of peers' keys, engines ask the node
        if self.etcd_endpoints:
            mirror.follow(lambda changes, reset: _show_peers(view, me, changes, reset))
        view.peers_here()  # filled (follow tells everything at once): a miss is a miss

    def _publish(self, mgr: BlockManager, everything: bool = False) -> None:
        assert self.index is not None
        # sharded: the keys' group anchors, which the owners place them by
        anchors: dict[BlockKey, int] | None = {} if self.locations is not None else None
        changes = mgr.held(anchors) if everything else mgr.take_changes(anchors)
        if changes:
            self.index.publish(changes, anchors=anchors)

    async def close(self) -> None:
        """Stop the tasks, publish the last changes, revoke the lease."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)  # how each ended was said when it did
        if self.index is not None:
            if self.mgr is not None and self._joined.is_set():
                self._publish(self.mgr)
            await self.index.close()


def _show_peers(
    view: KeyView, me: str, changes: list[tuple[bytes, Mapping[str, Tier]]], reset: bool
) -> None:
    """The key view's REMOTE bits from the mirror's holders: what another
    node holds, in its host tier or on its disk."""
    if reset:  # until the peers' keys are all back, engines ask the node about them
        view.avoid_peers_until(time.monotonic() + REBUILD_S)
        view.unset_all(REMOTE_HOST | REMOTE_DISK)
    on: dict[int, list[bytes]] = {REMOTE_HOST: [], REMOTE_DISK: []}
    off: dict[int, list[bytes]] = {REMOTE_HOST: [], REMOTE_DISK: []}
    for key, holders in changes:
        bits = 0
        for node, tier in holders.items():
            if node != me:
                bits |= REMOTE_HOST if tier is Tier.HOST else REMOTE_DISK
        for bit in (REMOTE_HOST, REMOTE_DISK):
            (on if bits & bit else off)[bit].append(key)
    for bit in (REMOTE_HOST, REMOTE_DISK):
        view.set(on[bit], bit)
        if not reset:
            view.unset(off[bit], bit)
