"""What the fleet learns of this node: its record and every change of its
tiers, published to the index (discovery/index.py: etcd with either
layout, or in memory for one node; kvbm/node/index_choice.py picks one)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from discovery.errors import DuplicateNode, IndexUnavailable
from discovery.index import BlockIndex
from discovery.records import LookupResult, NodeRecord
from discovery.tier import Tier
from kvbm.block_key import BlockKey
from kvbm.key_view import REMOTE_DISK, REMOTE_HOST, KeyView
from kvbm.manager import BlockManager

log = logging.getLogger("kvbm.node")
PUBLISH_INTERVAL_S = 0.02  # the tiers' changes into the index's runs (no etcd write)
INDEX_RETRY_S = 2.0
REBUILD_S = 2.0  # how long the key view's peers' keys are not believed after a rebuild


class Publisher:
    """Invariants: `index` is None until the node has joined (local serving
    goes on meanwhile); the node joins when it starts, with a record that
    says it serves no engine yet, and `serve` publishes the full record and
    every block from then on: the index holds every block the tiers held
    when publishing began, plus every change since, in order."""

    def __init__(
        self,
        record: NodeRecord,
        open_index: Callable[[NodeRecord], BlockIndex],
        places_by_anchor: bool = False,
    ) -> None:
        """`open_index`: a new index of this node's record, for each attempt to
        join. `places_by_anchor`: the index places keys by their group's anchor
        (a sharded index): each change carries it."""
        self.record = record
        self.open_index = open_index
        self.places_by_anchor = places_by_anchor
        self.mgr: BlockManager | None = None
        self.index: BlockIndex | None = None
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

    async def serve(self, mgr: BlockManager, record: NodeRecord) -> None:
        """The tiers exist: publish the node's full record and its blocks."""
        self.mgr, self.record = mgr, record
        mgr.track_changes()
        if self.index is not None:
            await self.index.set_record(record)
        self._tasks.append(asyncio.create_task(self._publish_changes(mgr)))

    # -- what the rest of the node reads -------------------------------------
    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult | None:
        """Who holds `keys` (`anchors`: each key's group anchor, which a
        sharded index places keys by); None before the join."""
        return await self.index.lookup(keys, anchors) if self.index is not None else None

    def peer(self, node_id: str) -> NodeRecord | None:
        return self.index.peer(node_id) if self.index is not None else None

    def peers(self) -> list[str]:
        return self.index.peers() if self.index is not None else []

    def state(self) -> str:
        return self.index.state if self.index is not None else "none yet"

    def stats(self) -> dict:
        """The index layout's figures for `kvbm status` (none before the join)."""
        return self.index.stats() if self.index is not None else {}

    # -- tasks ---------------------------------------------------------------
    async def _join_index(self) -> None:
        """Register in the index, retrying while etcd is away; a second live
        node with this id ends the join (and the node) instead."""
        while True:
            record = self.record
            index = self.open_index(record)
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
        index = self.index
        assert index is not None
        # values not believed: not signed by the fleet, or copies out of date
        mgr.metrics.watch_index(lambda: index.refused[0], lambda: index.refused[1])
        mgr.take_changes()  # superseded by the full state below
        self._publish(mgr, everything=True)
        view, me = mgr.view, self.record.node_id
        if view is None:
            return
        # sharded: the index holds none of peers' keys here, and engines ask the node
        if index.follow(lambda changes, reset: _show_peers(view, me, changes, reset)):
            view.peers_here()  # filled (follow tells everything at once): a miss is a miss

    def _publish(self, mgr: BlockManager, everything: bool = False) -> None:
        assert self.index is not None
        # sharded: the keys' group anchors, which the owners place them by
        anchors: dict[BlockKey, int] | None = {} if self.places_by_anchor else None
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
