"""The moves between a node's host tier (G2) and its disk tier (G3), for the
block manager (kvbm/manager.py): room made in G2 by eviction, evicted blocks
drained to disk, the coldest blocks written ahead to disk before they are
evicted, and disk blocks staged back into G2 for a load.

The manager's invariants hold here too, under the manager's own lock (given
at construction): every table change happens under it and no I/O does; bytes
move only into or out of slots the mover owns (FILLING slots it reserved,
DRAINING slots it evicted, blocks it pinned); and every slot taken is settled
before the call that took it returns, error or not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from discovery.tier import Tier
from kvbm.admission import FrequencyFilter
from kvbm.block_key import BlockKey
from kvbm.disk_pool import DiskPool, DiskRead, DiskWrite
from kvbm.host_pool import HostPool
from kvbm.metrics import TierMetrics
from kvbm.slot_table import Registered, Victim

log = logging.getLogger("kvbm.manager")


class TierMoves:
    """G2 <-> G3 moves of one block manager. `on_disk(keys)` is told of the
    keys a drain has just registered on disk (they were in neither tier's
    index while written); it is called under the lock."""

    def __init__(
        self,
        host: HostPool,
        disk: DiskPool | None,
        admission: FrequencyFilter,
        metrics: TierMetrics,
        lock: threading.RLock,
        on_disk: Callable[[list[BlockKey]], None],
    ) -> None:
        self.host = host
        self.disk = disk
        self.admission = admission
        self.metrics = metrics
        self._lock = lock
        self._on_disk = on_disk
        self._owed = 0  # host blocks evicted that `write_ahead` has not matched yet
        self._block_bytes = host.geometry.block_bytes

    def reserve_host(self, n: int) -> list[int]:
        """Up to `n` FILLING host slots, draining LRU blocks to make room."""
        if n == 0:
            return []
        with self._lock:
            table = self.host.table
            slots = table.allocate(n)
            victims = table.take_victims(n - len(slots))
            self._owed += len(victims)
        if victims:
            self._drain(victims)
            with self._lock:
                slots += self.host.table.allocate(n - len(slots))
        return slots

    def stage(
        self, keys: Sequence[BlockKey], host_slots: list[int | None], disk_slots: dict[int, int]
    ) -> None:
        """Fill host_slots[i] for every i in disk_slots (key i's pinned disk
        slot), verified, pinned in G2; or leave it None (end of prefix). The
        disk pins are released."""
        assert self.disk is not None
        positions = sorted(disk_slots)
        fresh = self.reserve_host(len(positions))
        with self._lock:
            found = self.disk.table.registered(disk_slots[i] for i in positions[: len(fresh)])
        reads = [
            DiskRead(keys[i], r.checksum, r.slot, slot)
            for i, r, slot in zip(positions, found, fresh, strict=False)
        ]
        ok = self._disk_io(self.disk.read, reads)
        with self._lock:
            host, dt = self.host.table, self.disk.table
            broken = False
            for n, (r, good) in enumerate(zip(reads, ok, strict=True)):
                i = positions[n]
                dt.unpin(r.src)
                if good is False:  # the bytes are wrong: forget the block
                    self.metrics.checksum_failures.labels(Tier.DISK).inc()
                    dt.drop(r.key)
                elif good is None:  # the read failed: the block may be fine
                    self.metrics.io_errors.labels(Tier.DISK).inc()
                if broken or not good:
                    broken = True
                    host.abort(r.dst)
                    continue
                # If another writer registered the key meanwhile, ours is freed: use theirs.
                host.register(r.dst, r.key, r.checksum, found[n].anchor)
                slot = host.get(r.key)
                assert slot is not None
                host.pin(slot)
                host_slots[i] = slot
            for n in range(len(reads), len(positions)):
                dt.unpin(disk_slots[positions[n]])  # no host room for these
        self.metrics.moved.labels("g3_to_g2").inc(ok.count(True) * self._block_bytes)

    def write_ahead(self, reach: int, limit: int) -> int:
        """See `BlockManager.write_ahead`."""
        if self.disk is None or reach <= 0 or limit <= 0 or not self.disk.has_room():
            return 0
        with self._lock:
            host, dt = self.host.table, self.disk.table
            self._owed = min(self._owed, reach)
            if not self._owed:
                return 0
            todo: list[Registered] = []
            for block in host.oldest(reach):
                if len(todo) == min(limit, self._owed):
                    break
                if block.key not in dt.held and self.admission.admit(block.key):
                    todo.append(block)
            self._owed = 0 if len(todo) < limit else self._owed - len(todo)
            dslots = self._disk_slots(len(todo))
        writes = [
            DiskWrite(b.key, b.checksum, b.slot, d, b.anchor)
            for b, d in zip(todo, dslots, strict=False)
        ]
        sums = self._disk_io(self.disk.write, writes)
        written = 0
        with self._lock:
            host, dt = self.host.table, self.disk.table
            for b, w, c in zip(todo, writes, sums, strict=False):
                if c is None or not host.holds(b.slot, b.serial):
                    dt.abort(w.dst)
                    continue
                host.record_checksum(b.slot, b.serial, c)  # no-op where it was summed already
                written += dt.register(w.dst, w.key, c, w.anchor)
        # a failed write is a block the disk tier did not take, as in a drain
        # (the block stays in G2: its eviction may try the disk again)
        self.metrics.rejected.labels(Tier.DISK, "io_error").inc(sums.count(None))
        self.metrics.moved.labels("g2_to_g3").inc(written * self._block_bytes)
        return written

    def _drain(self, victims: list[Victim]) -> None:
        """Evicted host blocks -> disk (those the filter admits), then free their slots."""
        self.metrics.evictions.labels(Tier.HOST).inc(len(victims))
        writes: list[DiskWrite] = []
        if self.disk is not None and not self.disk.has_room():
            with self._lock:
                dropped = sum(1 for v in victims if v.key not in self.disk.table.held)
            self.metrics.rejected.labels(Tier.DISK, "no_space").inc(dropped)
        elif self.disk is not None:
            with self._lock:
                on_disk = self.disk.table.held
                admitted = [
                    v for v in victims if v.key not in on_disk and self.admission.admit(v.key)
                ]
                refused = sum(1 for v in victims if v.key not in on_disk) - len(admitted)
                self.metrics.rejected.labels(Tier.DISK, "frequency").inc(refused)
                dslots = self._disk_slots(len(admitted))
                self.metrics.rejected.labels(Tier.DISK, "full").inc(len(admitted) - len(dslots))
            # DRAINING slots are ours alone: the write reads (and checksums) them unlocked.
            writes = [
                DiskWrite(v.key, v.checksum, v.slot, d, v.anchor)
                for v, d in zip(admitted, dslots, strict=False)
            ]
        sums = self._disk_io(self.disk.write, writes) if self.disk else []
        with self._lock:
            for w, c in zip(writes, sums, strict=True):
                if c is not None:
                    self.disk.table.register(w.dst, w.key, c, w.anchor)
                else:
                    self.disk.table.abort(w.dst)
            # out of G2 since `take_victims`: a `take_changes` meanwhile let them go
            self._on_disk([w.key for w, c in zip(writes, sums, strict=True) if c is not None])
            failed = sums.count(None)
            self.metrics.rejected.labels(Tier.DISK, "io_error").inc(failed)
            for v in victims:
                self.host.table.release(v.slot)
        self.metrics.moved.labels("g2_to_g3").inc((len(sums) - failed) * self._block_bytes)

    def _disk_slots(self, n: int) -> list[int]:
        """Up to `n` FILLING disk slots, forgetting the disk's LRU blocks for
        room (a disk eviction only forgets). Under the lock."""
        assert self.disk is not None
        dt = self.disk.table
        slots = dt.allocate(n)
        if len(slots) < n:
            dropped = dt.take_victims(n - len(slots))
            for d in dropped:
                dt.release(d.slot)
            self.metrics.evictions.labels(Tier.DISK).inc(len(dropped))
            slots += dt.allocate(n - len(slots))
        return slots

    def _disk_io(self, call: Callable[[list, HostPool], list], items: list) -> list:
        """A disk read or write whose every item fails on any error, so the slots
        it holds are always settled afterwards: the node serves on, the block
        is a miss. (The pool turns OSErrors into per-piece failures itself.)"""
        if not items:
            return []
        try:
            return call(items, self.host)
        except Exception:
            log.exception("disk tier call failed blocks=%d", len(items))
            return [None] * len(items)
