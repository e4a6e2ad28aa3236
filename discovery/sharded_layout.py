"""The sharded layout of the etcd index: etcd carries only the node records,
which the index's watch mirrors (who is live: the owners' ring, with the
lease each record is under), and block locations go to their owners over
the node's peer calls (discovery/sharded.py), never through etcd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from discovery.etcd_session import EtcdSession
from discovery.mirror import Follower, IndexMirror
from discovery.records import LookupResult
from discovery.schema import nodes_prefix
from discovery.sharded import ShardedLocations
from discovery.tier import Tier

log = logging.getLogger("discovery.etcd")


class ShardedLayout:
    """Invariant: `leases` holds, for each node whose record the watch has
    seen, the lease its record is under; the ring of `locations` is made of
    those that serve and share one of this node's fingerprints."""

    # No runs are written, so the revisions move too little to tell a wiped
    # etcd (whose revisions start again) from the one it had: the node
    # records (few) are read again after every break.
    resync_after_break = True

    def __init__(
        self, session: EtcdSession, locations: ShardedLocations, flush_interval: float = 0.005
    ) -> None:
        self.session = session
        self.locations = locations
        self.flush_interval = flush_interval
        self.watch_prefix = nodes_prefix(session.namespace)  # the node records only
        self.leases: dict[str, int] = {}  # node -> the lease of its record
        self.dirty = asyncio.Event()  # wakes the sender

    def publish(
        self, changes: dict[bytes, Tier | None], anchors: Mapping[bytes, int] | None
    ) -> None:
        """To the keys' owners at the next flush (`anchors`: where keys are
        placed, discovery/owners.places)."""
        self.locations.publish(changes, anchors)
        self.dirty.set()

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None, mirror: IndexMirror
    ) -> LookupResult:
        """From the keys' owners (`anchors`: each key's, as `publish` takes them)."""
        return await self.locations.lookup(keys, mirror.nodes, anchors)

    def new_lease(self, lease: int) -> int:
        """Owners replace everything this node told them under an older lease."""
        self.locations.new_session(lease)
        self.dirty.set()
        return 0  # nothing in etcd to write again

    def record_seen(self, path: bytes, lease: int | None) -> bool:
        """The lease a node's record is under (None: the record went). True
        when this node's own record went, or is under a lease not ours (an
        etcd writer deleted it, or put it back under a lease of its own),
        while our lease stands: the index puts the record back, and the
        owners get everything again (they dropped it with the session they
        saw end)."""
        if not path.startswith(self.watch_prefix):
            return False
        node = path[len(self.watch_prefix) :].decode(errors="replace")
        if lease:
            self.leases[node] = lease
        else:
            self.leases.pop(node, None)
        ours, session = self.session.lease, self.session
        if node == session.node.node_id and ours and lease != ours and not session.closing:
            log.warning("this node's record was changed by someone else; putting it back")
            self.leases[node] = ours  # as it will be
            self.locations.new_session(ours)
            self.dirty.set()
            return True
        return False

    def reread(self) -> None:
        """The watch reads every record again: the leases are seen anew."""
        self.leases.clear()

    def records_changed(self, mirror: IndexMirror) -> None:
        """The ring from the node records the mirror believes: every node that
        serves (has a peer port) and shares one of this node's fingerprints,
        with the lease its record is under."""
        mine = set(self.session.node.fingerprints)
        self.locations.set_members(
            {
                n: self.leases[n]
                for n, r in mirror.nodes.items()
                if r.rpc_port and n in self.leases and (not mine or mine & set(r.fingerprints))
            }
        )
        if self.locations.pending:  # moved shards' keys for their new owners
            self.dirty.set()

    def follow(self, mirror: IndexMirror, follower: Follower) -> bool:
        """The mirror holds node records only: engines ask the node."""
        return False

    def stats(self, mirror: IndexMirror) -> dict:
        return {"index_shard": self.locations.stats()}

    async def flush(self) -> None:
        """Until every change so far has reached its owner."""
        while self.locations.pending:
            await self.locations.flush()
            if self.locations.pending:
                await asyncio.sleep(self.flush_interval)

    def recover(self) -> None:
        """The sender failed unexpectedly: what it had not sent is still pending."""

    async def run(self, reconnect: Callable[[], Awaitable[None]]) -> None:
        """The changes to their owners, every `flush_interval` (etcd up or
        not: owners are reached directly, so `reconnect` is not needed)."""
        locations = self.locations
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # at least every second: kept shards expire
                    await self.dirty.wait()
            locations.expire()
            if not self.dirty.is_set():
                continue
            self.dirty.clear()
            await asyncio.sleep(self.flush_interval)  # let a burst coalesce
            await locations.flush()
            if locations.pending:
                self.dirty.set()  # what failed goes again
