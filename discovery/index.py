"""The index's contracts, in one place: what a node's index does for the
node (`BlockIndex`: the in-memory index, discovery/memory.py, and the etcd
index, discovery/etcd_index.py, meet it), and how the etcd index carries
block locations (`LocationLayout`: discovery/mirror_layout.py writes runs to
etcd and mirrors everyone's; discovery/sharded_layout.py sends them to the
keys' owners). The words, as used in every method below:

- a *record* is a node's NodeRecord (its address, peer port, fingerprints);
- a *location* is (key -> node, tier): a node holds a block there;
- *publish* is recording this node's own changes; they reach the other
  nodes later (a flush), never while the caller waits;
- *lookup* is asking who holds a prompt's keys, in order: a LookupResult
  (the prefix this node holds, then peers' runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol

from discovery.mirror import Follower, IndexMirror
from discovery.records import LookupResult, NodeRecord
from discovery.tier import Tier


class BlockIndex(Protocol):
    """One node's index of the fleet's blocks. Invariant: every change given
    to `publish` reaches the index in the order given, and a lookup never
    waits on etcd (a mirror, or the keys' owners directly)."""

    async def start(self) -> None:
        """Join: this node's record in the index, the other nodes' read.
        Raises IndexUnavailable when the index cannot be reached now, and
        DuplicateNode when a live node holds this node's id."""
        ...

    async def set_record(self, record: NodeRecord) -> None:
        """This node's record changed (its peer port, once it serves)."""
        ...

    def publish(
        self,
        changes: Mapping[bytes, Tier | None],
        removes: Iterable[bytes] = (),
        anchors: Mapping[bytes, int] | None = None,
    ) -> None:
        """Record this node's changes now (key -> tier, or None: gone, in the
        order they happened; `removes`: more keys gone). Never blocks.
        `anchors`: where a sharded index places keys (discovery/owners.places)."""
        ...

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult:
        """Who holds `keys`, a prompt's blocks in order (`anchors`: each
        key's, as `publish` takes them)."""
        ...

    def peer(self, node_id: str) -> NodeRecord | None:
        """A node's record, as the index has it now (None: not a live node)."""
        ...

    def peers(self) -> list[str]:
        """The nodes the index knows now, this one included, sorted."""
        ...

    def follow(self, follower: Follower) -> bool:
        """Tell `follower` of every key whose holders change (see
        IndexMirror.follow). False: this index keeps no peers' locations
        here, and engines must ask the node (a sharded index)."""
        ...

    @property
    def state(self) -> str:
        """ "memory", "etcd up" or "etcd down" (for `kvbm status`)."""
        ...

    @property
    def refused(self) -> tuple[int, int]:
        """Values not believed (not signed by the fleet, or out of date), and
        locations not kept at the mirror's cap: counts since the start."""
        ...

    def stats(self) -> dict:
        """The layout's figures for `kvbm status`."""
        ...

    async def flush(self, timeout: float | None = None) -> None:
        """Until every change so far has left this node (TimeoutError past
        `timeout`)."""
        ...

    async def close(self) -> None:
        """Flush what can be flushed, leave the index, stop every task."""
        ...


class PeerLookup(Protocol):
    """What onboarding asks: who holds a prompt's keys; None while the node
    has no index yet (it has not joined)."""

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult | None: ...


class LocationLayout(Protocol):
    """How the etcd index carries block locations; the index keeps the lease
    (discovery/etcd_session.py), the node records and the watch, and calls
    these as they happen."""

    watch_prefix: bytes  # what the index's watch mirrors
    resync_after_break: bool  # re-read the watched keys after every break of the watch
    dirty: asyncio.Event  # wakes `run`: something to send

    def publish(
        self, changes: dict[bytes, Tier | None], anchors: Mapping[bytes, int] | None
    ) -> None: ...

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None, mirror: IndexMirror
    ) -> LookupResult: ...

    def new_lease(self, lease: int) -> int:
        """The session took a new lease (the old one's keys are gone);
        returns how many runs are to be written again (for the log)."""
        ...

    def record_seen(self, path: bytes, lease: int | None) -> bool:
        """The watch saw a node record under `lease` (None: deleted); True
        when the index must put this node's own record back."""
        ...

    def reread(self) -> None:
        """The watch reads every watched key again (each is seen anew)."""
        ...

    def records_changed(self, mirror: IndexMirror) -> None:
        """The records the mirror believes changed (a node came or went)."""
        ...

    def follow(self, mirror: IndexMirror, follower: Follower) -> bool:
        """As BlockIndex.follow, for the index's mirror."""
        ...

    def stats(self, mirror: IndexMirror) -> dict: ...

    async def run(self, reconnect: Callable[[], Awaitable[None]]) -> None:
        """The layout's one task: what was published, out to where it goes
        (`reconnect`: the index's, which returns once etcd is back)."""
        ...

    async def flush(self) -> None:
        """Until every change so far is out."""
        ...

    def recover(self) -> None:
        """`run` failed unexpectedly and is about to restart: nothing it had
        taken may be lost."""
        ...
