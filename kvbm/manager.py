"""One node's block manager: G1 (engine tensors) <-> G2 (host arena) <-> G3 (disk arena).

Every move is two-phase. A store reserves host slots (`prepare_store`), the
bytes are copied in, and `complete_store` registers them; only then can a lookup
see them. A block's checksum is taken off the store path: in the background
(`checksum_newest`), or at the latest when it first leaves G2 (drained to disk,
or pinned for a peer), and verified wherever it comes back. A load pins the
prefix it found (`prepare_load`), staging disk-only blocks into host slots and
verifying them, the bytes are copied out, and `complete_load` unpins.
Bookkeeping runs under one lock; bytes move outside it, on slots that no one
else can touch (FILLING, DRAINING or pinned), so the engine path and the
network path can use one manager at once.

When the host tier is full, its least recently used unpinned blocks drain to
disk if the admission filter lets them, and are dropped otherwise; the node
usually has them on disk already (`write_ahead`), so the drain only frees.
Those moves between G2 and G3 are kvbm/tier_moves.py's; this module keeps
the engine's and the peers' moves and what the index learns of the tiers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from discovery.tier import Tier
from kvbm.admission import FrequencyFilter
from kvbm.block_key import BlockKey
from kvbm.disk_pool import DiskPool
from kvbm.hashing import Verify, content_matches
from kvbm.host_pool import HostPool
from kvbm.key_view import LOCAL, KeyView
from kvbm.layout import ModelGeometry
from kvbm.metrics import TierMetrics
from kvbm.plans import LoadPlan, PrefixMatch, StorePlan
from kvbm.tier_moves import TierMoves


class BlockManager:
    """Invariants (on top of each tier's SlotTable invariants):

    - every table change happens under `self._lock`; no I/O or copy does;
    - bytes move only into or out of slots the mover owns: FILLING slots it
      reserved, DRAINING slots it evicted, or blocks it pinned;
    - every reserved, evicted or pinned slot is settled (registered, freed or
      unpinned) before the call that took it returns, error or not, except
      the pins of a LoadPlan, which `complete_load` settles;
    - a block reaches G1 from G3 only after its bytes matched its checksum;
    - with a key view shared (`share_keys`), every held key shows in it as
      LOCAL from the moment the call that registered it returns (a drain
      that moves a block from G2 to G3 sets it again: it was in neither
      index while written); a key let go leaves it at the next
      `take_changes` (so a view may still show a key just let go, never
      miss one held).
    """

    def __init__(
        self,
        geometry: ModelGeometry,
        host: HostPool,
        disk: DiskPool | None = None,
        admission: FrequencyFilter | None = None,
        metrics: TierMetrics | None = None,
        verify: Verify = content_matches,
    ) -> None:
        for pool in (host, disk):
            if pool is not None and pool.geometry != geometry:
                raise ValueError("every tier must share the manager's geometry")
        self.geometry = geometry
        self.host = host
        self.disk = disk
        self.admission = admission or FrequencyFilter()
        self.metrics = metrics or TierMetrics()
        self._verify = verify
        self._lock = threading.RLock()
        # Half of G2 per load or store step: the other half can drain or stage.
        self.max_load_blocks = max(1, host.num_slots // 2)
        self.view: KeyView | None = None
        self._moves = TierMoves(host, disk, self.admission, self.metrics, self._lock, self._show)
        m = self.metrics
        m.watch_tier(
            Tier.HOST, lambda: host.table.registered_count, geometry.block_bytes, host.num_slots
        )
        if disk is not None:
            m.watch_tier(
                Tier.DISK, lambda: disk.table.registered_count, geometry.block_bytes, disk.num_slots
            )

    # -- what changed (for the index) ----------------------------------------
    def track_changes(self) -> None:
        """Start recording which keys enter or leave the tiers (see `take_changes`)."""
        with self._lock:
            for pool in (self.host, self.disk):
                if pool is not None:
                    pool.table.track_changes()

    def take_changes(
        self, anchors: dict[BlockKey, int] | None = None
    ) -> dict[BlockKey, Tier | None]:
        """Where each key that changed since the last call is now: host, disk or
        gone, in the order the changes came (a prompt's blocks in prompt order:
        the index publishes them as one run). A key that came and went in
        between is reported once, as it is now. The keys gone leave the
        shared key view here. `anchors` gets the group anchors known of the
        keys held, read at the same moment (a block drained a moment later
        is in neither tier while it is written)."""
        with self._lock:
            host, disk = self.host.table, self.disk.table if self.disk else None
            dirty = host.take_changes()
            if disk is not None:
                dirty |= disk.take_changes()
            on_host, on_disk = host.held, disk.held if disk else {}
            now = {
                k: Tier.HOST if k in on_host else Tier.DISK if k in on_disk else None for k in dirty
            }
            if self.view is not None:
                self.view.unset([k for k, t in now.items() if t is None], LOCAL)
                self.view.set([k for k, t in now.items() if t is not None], LOCAL)
            if anchors is not None:
                self._anchors_of([k for k, t in now.items() if t is not None], anchors)
            return now

    def share_keys(self, view: KeyView) -> None:
        """Keep `view` showing every held key (see the class invariants);
        changes are tracked from now on, so `take_changes` must be called."""
        self.track_changes()
        with self._lock:
            self.view = view
            view.set(list(self.held()), LOCAL)

    def held(self, anchors: dict[BlockKey, int] | None = None) -> dict[BlockKey, Tier]:
        """Every block held, and where (host wins over disk): a full republish
        (`anchors` as for `take_changes`)."""
        with self._lock:
            out = dict.fromkeys(self.disk.table.held, Tier.DISK) if self.disk else {}
            out.update(dict.fromkeys(self.host.table.held, Tier.HOST))
            if anchors is not None:
                self._anchors_of(out, anchors)
            return out

    def _anchors_of(
        self, keys: Iterable[BlockKey], out: dict[BlockKey, int]
    ) -> dict[BlockKey, int]:
        """Under the lock. A key's anchor is the one kept in the tier that
        holds it (host first), where one is known."""
        found = self.host.table.anchors_of(keys)
        if self.disk is not None:
            found = self.disk.table.anchors_of(k for k in keys if k not in found) | found
        out.update((k, a) for k, a in found.items() if a)
        return out

    def usage(self) -> dict[str, dict[str, int]]:
        """Blocks held and capacity per tier (and the host blocks not summed yet)."""
        with self._lock:
            out = {
                Tier.HOST.value: {
                    "blocks": self.host.table.registered_count,
                    "capacity": self.host.num_slots,
                    "unsummed": self.host.table.unsummed_count,
                }
            }
            if self.disk is not None:
                out[Tier.DISK.value] = {
                    "blocks": self.disk.table.registered_count,
                    "capacity": self.disk.num_slots,
                }
            return out

    # -- lookup ------------------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> PrefixMatch:
        """Longest prefix of `keys` held in G2 or G3 (no pins; it may change at once)."""
        with self._lock:
            host = self.host.table.held
            held = keys[: self._prefix_len(keys)]
            return PrefixMatch(tuple(Tier.HOST if k in host else Tier.DISK for k in held))

    def _prefix_len(self, keys: Sequence[BlockKey]) -> int:
        """Length of the prefix held in G2 or G3; the caller holds the lock."""
        host, disk = self.host.table.held, self.disk.table.held if self.disk else {}
        n = 0
        for k in keys:
            if k not in host and k not in disk:
                break
            n += 1
        return n

    # -- store: G1 -> G2 ---------------------------------------------------
    def prepare_store(
        self, keys: Sequence[BlockKey], anchors: Sequence[int] | None = None
    ) -> StorePlan:
        """Reserve host slots for the keys not already held; the caller fills them.
        `anchors`: each key's group anchor, kept with the block (slot_table.py).

        Blocks already in G2 are skipped (and count as a use). When G2 is full
        and every block is pinned, the tail of `keys` is not stored: caching is
        best effort, and a rejected block is counted, never an error.
        """
        with self._lock:
            self.admission.record(keys)
            table, seen = self.host.table, set()
            positions = []
            for i, k in enumerate(keys):
                slot = table.get(k)
                if slot is not None:
                    table.touch(slot)
                elif k not in seen:
                    seen.add(k)
                    positions.append(i)
        slots = self._moves.reserve_host(len(positions))
        cut = None
        if len(slots) < len(positions):
            self.metrics.rejected.labels(Tier.HOST, "full").inc(len(positions) - len(slots))
            cut = positions[len(slots)]
            positions = positions[: len(slots)]
        kept = None if anchors is None else [int(anchors[i]) for i in positions]
        return StorePlan([keys[i] for i in positions], slots, positions, cut=cut, anchors=kept)

    def complete_store(
        self, plan: StorePlan, success: bool = True, checksums: list[int] | None = None
    ) -> int:
        """Register the filled slots (or free them). Returns blocks added.

        `checksums`, when the caller has them, are recorded; otherwise the
        checksum is taken later, off the store path (`checksum_newest`, `checksum_plan`).
        """
        if plan.done:
            raise ValueError("store plan already committed")
        plan.done = True
        sums = checksums if checksums is not None else [None] * len(plan.slots)
        anchors = plan.anchors or [0] * len(plan.slots)
        added = 0
        with self._lock:
            table = self.host.table
            for i, slot in enumerate(plan.slots):
                if not success:
                    table.abort(slot)
                elif table.register(slot, plan.keys[i], sums[i], anchors[i]):
                    added += 1
            if self.view is not None and success:
                self.view.set(plan.keys, LOCAL)
        self.metrics.moved.labels("g1_to_g2").inc(added * self.geometry.block_bytes)
        return added

    # -- load: G3 -> G2 -> G1 ----------------------------------------------
    def prepare_load(self, keys: Sequence[BlockKey], stage: bool = True) -> LoadPlan:
        """Pin the longest prefix of `keys` in G2, staging disk-only blocks into G2.

        At most `max_load_blocks` keys are considered, so that staging always
        finds room in G2. A disk block that fails its checksum ends the prefix there: it is
        dropped, counted, and the caller recomputes from that block on.
        `stage=False`: the prefix ends at the first block only on disk, so
        the call does no I/O (an event loop may make it).
        """
        host_slots: list[int | None] = []
        disk_slots: dict[int, int] = {}  # position -> pinned disk slot
        with self._lock:
            host, disk = self.host.table, self.disk.table if self.disk else None
            # Mark the whole held prefix as just used, so that the evictions
            # this step causes take other blocks than the ones the next steps load.
            for k in reversed(keys[: self._prefix_len(keys)]):
                for table in (host, disk):
                    slot = table.get(k) if table else None
                    if slot is not None:
                        table.touch(slot)
            asked, keys = len(keys), keys[: self.max_load_blocks]
            for i, k in enumerate(keys):
                slot = host.get(k)
                if slot is not None:
                    host.pin(slot)
                    host_slots.append(slot)
                    continue
                dslot = disk.get(k) if disk and stage else None
                if dslot is None:
                    break
                disk.pin(dslot)
                disk_slots[i] = dslot
                host_slots.append(None)
            hits_host = len(host_slots) - len(disk_slots)
            self.metrics.hits.labels(Tier.HOST).inc(hits_host)
            self.metrics.misses.labels(Tier.HOST).inc(len(keys) - hits_host)
            if self.disk:
                self.metrics.hits.labels(Tier.DISK).inc(len(disk_slots))
                self.metrics.misses.labels(Tier.DISK).inc(len(keys) - len(host_slots))
        if disk_slots:
            self._moves.stage(keys, host_slots, disk_slots)
        n = host_slots.index(None) if None in host_slots else len(host_slots)
        with self._lock:
            for slot in host_slots[n:]:
                if slot is not None:
                    self.host.table.unpin(slot)
        slots = [s for s in host_slots[:n] if s is not None]
        return LoadPlan(list(keys[:n]), slots, more=n == self.max_load_blocks < asked)

    def complete_load(self, plan: LoadPlan) -> None:
        """Unpin the plan's blocks. Safe to call twice (it runs in `finally` blocks)."""
        if plan.done:
            return
        plan.done = True
        with self._lock:
            for slot in plan.slots:
                self.host.table.unpin(slot)
            self.admission.record(plan.keys)

    def checksum_plan(self, plan: LoadPlan) -> list[int]:
        """Checksums of a load plan's pinned blocks, taken now where not yet known.

        A block's checksum is not taken when it is stored (that would halve
        G1 -> G2 bandwidth) but in the background, or at the latest when it
        first leaves G2: to disk, or to a peer through this call.
        """
        if plan.done:
            raise ValueError("load plan already finished: its slots may hold other blocks now")
        with self._lock:
            known = self.host.table.checksums_of(plan.slots)
        todo = [s for s, c in zip(plan.slots, known, strict=True) if c is None]
        taken = dict(zip(todo, self.host.checksums(todo), strict=True))
        with self._lock:
            for slot, c in taken.items():
                self.host.table.set_checksum(slot, c)
        return [taken.get(s, c) for s, c in zip(plan.slots, known, strict=True)]  # type: ignore[misc]

    def checksum_newest(self, limit: int) -> int:
        """Take the checksums of up to `limit` of the newest host blocks that have
        none, without pinning them (a pin would reorder the LRU); a block
        evicted meanwhile keeps none. Returns how many blocks were summed.

        The node runs this in the background, so a block is usually summed
        before a peer pins it or it drains to disk: the checksum then costs
        neither of those paths a pass over the bytes.
        """
        with self._lock:
            todo = self.host.table.newest_unsummed(limit)
        if not todo:
            return 0
        sums = self.host.checksums([slot for slot, _ in todo])
        with self._lock:
            for (slot, serial), c in zip(todo, sums, strict=True):
                self.host.table.record_checksum(slot, serial, c)
        return len(todo)

    def write_ahead(self, reach: int, limit: int) -> int:
        """Copy to disk up to `limit` of the `reach` least recently used host
        blocks that the disk lacks and the admission filter admits, leaving
        them in G2 where they are in its LRU order: the load or store that
        evicts them later frees their slots without waiting on a disk write.
        As many as G2 evicted since (at most `reach` owed): writes follow the
        churn, and a full G2 that evicts nothing costs no disk writes.
        Returns how many blocks were written.

        Like `checksum_newest` it reads blocks it does not pin (a pin would
        reorder the LRU): a copy counts only if the slot still holds the same
        registration afterwards, so its bytes did not change under the write.
        """
        return self._moves.write_ahead(reach, limit)

    # -- for peers (the transport's BlockSource / BlockSink) -----------------
    def prepare_peer_read(
        self, keys: Sequence[BlockKey], ready_only: bool = False
    ) -> list[tuple[BlockKey, int, int]]:
        """Pin the longest held prefix for a peer to read: (key, slot, checksum).
        The caller owns the pins and releases them with `complete_peer_read`.
        `ready_only`: the prefix ends at the first block not in G2 or not
        summed yet, so the call reads no disk and sums no bytes (an event
        loop may make it; the caller asks again, in a thread, for the rest)."""
        if ready_only:
            return self._pin_ready(keys)
        plan = self.prepare_load(keys)
        try:
            sums = self.checksum_plan(plan)
        except BaseException:
            self.complete_load(plan)
            raise
        plan.done = True  # the pins now belong to the caller
        return list(zip(plan.keys, plan.slots, sums, strict=True))

    def _pin_ready(self, keys: Sequence[BlockKey]) -> list[tuple[BlockKey, int, int]]:
        """Counts hits for what it pins only: the caller's second ask counts the rest."""
        with self._lock:
            host, disk = self.host.table, self.disk.table if self.disk else None
            got = host.summed_prefix(keys[: self.max_load_blocks])
            for k, slot, _ in reversed(got):  # a pin takes a G2 block out of its LRU
                host.pin(slot)
                copy = disk.get(k) if disk else None
                if copy is not None:  # a copy written ahead: used too, as `prepare_load` marks it
                    disk.touch(copy)  # type: ignore[union-attr]
            self.metrics.hits.labels(Tier.HOST).inc(len(got))
        return got

    def complete_peer_read(self, slots: Sequence[int]) -> None:
        with self._lock:
            for slot in slots:
                self.host.table.unpin(slot)

    def complete_pull(self, plan: StorePlan, expected: Sequence[int] | None) -> list[BlockKey]:
        """Register the filled slots whose bytes match `expected` (bytes that came
        from a peer), free the rest. Returns the keys registered."""
        if plan.done:
            raise ValueError("store plan already committed")
        plan.done = True
        view, verify = self.host.block_view, self._verify
        good = [verify(view(s), e) for s, e in zip(plan.slots, expected or (), strict=False)]
        added: list[BlockKey] = []
        anchors = plan.anchors or [0] * len(plan.slots)
        with self._lock:
            table = self.host.table
            for i, slot in enumerate(plan.slots):
                if expected is not None and good[i]:
                    if table.register(slot, plan.keys[i], expected[i], anchors[i]):
                        added.append(plan.keys[i])
                else:
                    if expected is not None:
                        self.metrics.checksum_failures.labels("peer").inc()
                    table.abort(slot)
            if self.view is not None:
                self.view.set(added, LOCAL)
        self.metrics.moved.labels("peer_to_g2").inc(len(added) * self.geometry.block_bytes)
        return added

    def _show(self, keys: list[BlockKey]) -> None:
        """Show `keys`, held again, in the shared key view (under the lock)."""
        if self.view is not None:
            self.view.set(keys, LOCAL)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
        self.host.close()
