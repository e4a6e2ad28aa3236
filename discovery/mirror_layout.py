"""The mirror layout of the etcd index: this node's block locations written
to etcd as runs (discovery/runs.py), under the session's lease, and every
node's read back by the index's watch into its mirror, where a lookup is a
local read.

The writer coalesces: every change reaches `book` at once and etcd at a
later flush (every `flush_interval`, so that a burst of changes to one run
costs one write), in transactions of at most MAX_TXN_OPS operations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import aetcd

from discovery.etcd_session import EtcdSession
from discovery.mirror import Follower, IndexMirror
from discovery.records import LookupResult
from discovery.runs import RunBook
from discovery.schema import namespace_prefix, run_path
from discovery.tier import Tier

log = logging.getLogger("discovery.etcd")

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class MirrorLayout:
    """Invariants: `book` holds everything this node publishes, as runs; its
    `dirty` runs are those etcd may not have as they are now, and `_ripening`
    those whose records leave out keys too young to publish, with the time
    the youngest comes of age. A key is published once the node has held it
    `publish_after` seconds: what lives shorter is not worth sharing and
    costs nothing. A run etcd never got is never deleted there. Runs that
    lost keys are written before the others (in transactions that have
    committed), so no mirror sees a key leave a run after it joined
    another."""

    resync_after_break = False  # the mirror's revision tells whether etcd's history is ours

    def __init__(
        self, session: EtcdSession, flush_interval: float = 0.005, publish_after: float = 0.0
    ) -> None:
        self.session = session
        self.flush_interval = flush_interval
        self.publish_after = publish_after
        self.watch_prefix = namespace_prefix(session.namespace)  # records and runs
        self.book = RunBook()
        self.writes = 0  # etcd put/delete operations sent (for the bench)
        self.bytes_written = 0  # keys and values put
        self.dirty = asyncio.Event()  # wakes the flusher
        self._in_etcd: set[int] = set()  # runs etcd holds for us, as far as we know
        self._inflight: tuple[set[int], set[int]] = (set(), set())  # (first, then)
        self._hurry = False  # flush(): every key now, however young
        self._ripening: dict[int, float] = {}  # run id -> when its youngest key is due
        self._wakeup: asyncio.TimerHandle | None = None

    # -- what the index asks -------------------------------------------------
    def publish(
        self, changes: dict[bytes, Tier | None], anchors: Mapping[bytes, int] | None
    ) -> None:
        """Into the book now; etcd gets the runs at the next flush (`anchors`
        place keys in a sharded index: not used here)."""
        self.book.apply(changes)
        if self.book.dirty:
            self.dirty.set()

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None, mirror: IndexMirror
    ) -> LookupResult:
        """From the mirror: no etcd round trip."""
        return mirror.lookup(keys, self.session.node.node_id)

    def new_lease(self, lease: int) -> int:
        """The old lease is gone, and with it every key etcd held for us:
        everything is written again. Returns how many runs."""
        self._in_etcd.clear()
        self.book.dirty = self.book.everything()
        self._ripening.clear()
        self.dirty.set()
        return len(self.book.dirty)

    def record_seen(self, path: bytes, lease: int | None) -> bool:
        """A node record's lease, as the watch saw it: nothing to do here (the
        mirror believes records by their signature)."""
        return False

    def reread(self) -> None:
        """The watch reads the namespace again: nothing to do here."""

    def records_changed(self, mirror: IndexMirror) -> None:
        """The records the mirror believes changed: nothing to do here."""

    def follow(self, mirror: IndexMirror, follower: Follower) -> bool:
        mirror.follow(follower)
        return True

    def stats(self, mirror: IndexMirror) -> dict:
        return {"index_mirror_keys": len(mirror.locations)}

    async def flush(self) -> None:
        """Until every change so far is in etcd, young runs included."""
        self._hurry = True
        try:
            while self.book.dirty or self._ripening or any(self._inflight):
                self.dirty.set()
                await asyncio.sleep(self.flush_interval)
        finally:
            self._hurry = False

    def recover(self) -> None:
        """The flusher failed unexpectedly: a batch it had taken goes back."""
        if any(self._inflight):
            self._retry(*self._inflight)
            self._inflight = (set(), set())

    # -- the flusher -----------------------------------------------------------
    async def run(self, reconnect: Callable[[], Awaitable[None]]) -> None:
        """Write the runs that changed, a burst at a time, until cancelled
        (`reconnect`: the index's, which returns once etcd is back)."""
        session = self.session
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            await asyncio.sleep(self.flush_interval)  # let a burst coalesce
            if not self.book.dirty and not self._ripening:
                continue
            if not session.up.is_set():
                await reconnect()
            first, then = self._inflight = self._take()
            try:
                if not await session.attempt(self._write(first, then)):
                    self._retry(first, then)
            finally:
                self._inflight = (set(), set())
                self._wake_when_ripe()

    def _take(self) -> tuple[set[int], set[int]]:
        """The dirty runs (and the ripening ones now due), split into those
        that lost keys (written first) and the rest; the flusher is woken
        when the next young key comes of age."""
        book, now = self.book, time.monotonic()
        for rid, due in list(self._ripening.items()):
            if due <= now or self._hurry:
                del self._ripening[rid]
                book.dirty.add(rid)
        first = {rid for rid in book.dirty if book.shrunk(rid)}
        then = book.dirty - first
        book.take(first | then)
        return first, then

    def _wake_when_ripe(self) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
        if self._ripening:
            delay = min(self._ripening.values()) - time.monotonic()
            self._wakeup = asyncio.get_running_loop().call_later(delay, self.dirty.set)

    def _cutoff(self) -> float:
        return time.monotonic() - (0.0 if self._hurry else self.publish_after)

    def _retry(self, first: set[int], then: set[int]) -> None:
        """A failed write may have committed in part: every run in it may be in
        etcd now, and each goes back to dirty, to be written as it stands then
        (a later change, or a new lease's republish, is never undone by old
        values); the runs that lost keys still go first."""
        self._in_etcd.update(first | then)
        self.book.dirty |= first | then
        for rid in first:
            self.book.mark_shrunk(rid)
        self.dirty.set()

    async def _write(self, first: set[int], then: set[int]) -> None:
        """Both phases' operations are built before the first await: the
        records are one snapshot of the book, in which no key is in two runs
        (a publish() while phase one is in flight must not reach phase two)."""
        client = self.session.live()
        phases = [self._ops(client, phase) for phase in (first, then)]
        for ops, sent in phases:
            chunks = [ops[i : i + MAX_TXN_OPS] for i in range(0, len(ops), MAX_TXN_OPS)]
            # A few transactions in flight at once: etcd batches them to disk together.
            for i in range(0, len(chunks), 4):
                await asyncio.gather(
                    *(
                        client.transaction(compare=[], success=c, failure=[])
                        for c in chunks[i : i + 4]
                    )
                )
            self.writes += len(ops)
            for rid, put in sent:
                if put:
                    self._in_etcd.add(rid)
                else:
                    self._in_etcd.discard(rid)

    def _ops(self, client: aetcd.Client, rids: set[int]) -> tuple[list, list[tuple[int, bool]]]:
        """The puts and deletes that bring etcd to these runs' records now, and
        (run, put or not) for each; runs holding keys too young are noted
        as ripening."""
        session = self.session
        tx, book, lease, cutoff = client.transactions, self.book, session.lease, self._cutoff()
        ops, sent = [], []
        for rid in rids:
            record = book.record(rid, cutoff)
            young = book.youngest_unshown(rid, cutoff)
            if young is not None:
                self._ripening[rid] = young + self.publish_after
            else:
                self._ripening.pop(rid, None)
            path = run_path(session.namespace, session.node.node_id, rid)
            if record is not None:
                value = session.value(path, record.encode(), lease)
                ops.append(tx.put(path, value, lease=lease))
                self.bytes_written += len(path) + len(value)
            elif rid in self._in_etcd:
                ops.append(tx.delete(path))
            else:
                continue
            sent.append((rid, record is not None))
        return ops, sent
