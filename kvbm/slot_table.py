"""Bookkeeping of one tier's fixed-size slots: states, keys, checksums, pins.

Not thread-safe: the block manager serialises every call under its lock and
moves bytes outside it, on slots that are FILLING, DRAINING or pinned. The
manager reads a table through its methods (batches where it asks about many
slots or keys) and the read-only `held` mapping, never its arrays.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import NamedTuple

from kvbm.block_key import BlockKey
from kvbm.lru import LruPolicy


class SlotState(IntEnum):
    FREE = 0
    FILLING = 1  # reserved for a write in flight; not visible to lookups
    REGISTERED = 2  # content and checksum known; in the index
    DRAINING = 3  # evicted from the index; bytes still being copied out


@dataclass(frozen=True, slots=True)
class Victim:
    slot: int
    key: BlockKey
    checksum: int | None
    anchor: int = 0


class Registered(NamedTuple):
    """A REGISTERED slot as a mover copies it: which registration (`serial`)
    it held when read, so a copy made without a pin can be checked after."""

    slot: int
    serial: int
    key: BlockKey
    checksum: int | None
    anchor: int


class SlotTable:
    """Invariants, checked by `check()` and the property tests:

    - every slot is in exactly one state;
    - the free heap holds exactly the FREE slots;
    - the index maps a key to a slot only when that slot is REGISTERED under
      that key, and every REGISTERED slot is in the index;
    - the eviction policy holds exactly the REGISTERED slots with no pins, so
      a pinned block is never evicted;
    - pins are only ever held on REGISTERED slots;
    - `unsummed` holds exactly the REGISTERED slots without a checksum;
    - a slot's bytes do not change while it stays REGISTERED under one
      `serial` (a new registration gets a new one).
    Allocation hands out the lowest free slots, so batches copy as few runs.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"a tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.state = [SlotState.FREE] * num_slots
        self.keys: list[BlockKey | None] = [None] * num_slots
        self.checksums: list[int | None] = [None] * num_slots
        # the first key of the block's group, as a sequence hash (0: not
        # known): a sharded index places the key by it (kvbm/block_key.py)
        self.anchors: list[int] = [0] * num_slots
        self.pins = [0] * num_slots
        self.serial = [0] * num_slots  # which registration a slot holds
        self._serials = itertools.count(1)
        self.unsummed: dict[int, None] = {}  # in registration order
        self.index: dict[BlockKey, int] = {}
        # The index, read-only, for owners: `key in table.held` costs a dict probe.
        self.held: Mapping[BlockKey, int] = MappingProxyType(self.index)
        self.policy = LruPolicy()
        self._free = list(range(num_slots))  # already a heap
        # Keys that entered or left the index since the owner last looked
        # (None: nobody looks, so nothing is recorded).
        self._changed: dict[BlockKey, None] | None = None  # an ordered set

    # -- queries -----------------------------------------------------------
    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def registered_count(self) -> int:
        return len(self.index)

    @property
    def unsummed_count(self) -> int:
        return len(self.unsummed)

    def get(self, key: BlockKey) -> int | None:
        return self.index.get(key)

    def checksums_of(self, slots: Iterable[int]) -> list[int | None]:
        """Each slot's checksum (None: not taken yet)."""
        sums = self.checksums
        return [sums[s] for s in slots]

    def registered(self, slots: Iterable[int]) -> list[Registered]:
        """What each of these REGISTERED slots holds now."""
        return [self._registered(s) for s in slots]

    def oldest(self, n: int) -> Iterator[Registered]:
        """Up to `n` unpinned REGISTERED slots, least recently used first, left
        where they are in the eviction order (read lazily: stop early freely,
        change nothing while reading)."""
        for s in self.policy.oldest(n):
            yield self._registered(s)

    def holds(self, slot: int, serial: int) -> bool:
        """Whether `slot` still holds registration `serial` (so bytes read
        from it since were that block's)."""
        return self.state[slot] == SlotState.REGISTERED and self.serial[slot] == serial

    def anchors_of(self, keys: Iterable[BlockKey]) -> dict[BlockKey, int]:
        """The anchor kept with each of `keys` held here (0: none known);
        keys not held are left out."""
        index, anchors = self.index, self.anchors
        return {k: anchors[s] for k in keys if (s := index.get(k)) is not None}

    def summed_prefix(self, keys: Sequence[BlockKey]) -> list[tuple[BlockKey, int, int]]:
        """(key, slot, checksum) of the longest prefix of `keys` held here
        with a checksum taken."""
        index, sums, out = self.index, self.checksums, []
        for k in keys:
            slot = index.get(k)
            csum = None if slot is None else sums[slot]
            if csum is None:
                break
            out.append((k, slot, csum))
        return out

    # -- what changed (for the index) ----------------------------------------
    def track_changes(self) -> None:
        """Start recording the keys that enter or leave the index (`take_changes`)."""
        if self._changed is None:
            self._changed = {}

    def take_changes(self) -> dict[BlockKey, None]:
        """The keys that entered or left the index since the last call, in
        the order of each one's last change, and a fresh record from now
        on; empty while changes are not tracked."""
        taken = self._changed
        if taken is None:
            return {}
        self._changed = {}
        return taken

    def _record_change(self, key: BlockKey) -> None:
        if self._changed is not None:
            self._changed.pop(key, None)
            self._changed[key] = None  # at the end: the order of the last change

    # -- writes ------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Up to `n` free slots (the lowest), now FILLING."""
        out = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        for s in out:
            self.state[s] = SlotState.FILLING
        return out

    def claim(self, slots: list[int]) -> None:
        """Specific FREE slots -> FILLING (recovery of a disk arena)."""
        for s in slots:
            self._expect(s, SlotState.FREE)
            self.state[s] = SlotState.FILLING
        if slots:
            self._free = [s for s in self._free if self.state[s] == SlotState.FREE]
            heapq.heapify(self._free)

    def register(self, slot: int, key: BlockKey, checksum: int | None, anchor: int = 0) -> bool:
        """FILLING -> REGISTERED. False (and the slot freed) if the key was already here."""
        self._expect(slot, SlotState.FILLING)
        if key in self.index:
            self._free_slot(slot)
            return False
        self.state[slot] = SlotState.REGISTERED
        self.keys[slot] = key
        self.checksums[slot] = checksum
        self.anchors[slot] = anchor
        self.serial[slot] = next(self._serials)
        if checksum is None:
            self.unsummed[slot] = None
        self.index[key] = slot
        self.policy.insert(slot)
        self._record_change(key)
        return True

    def abort(self, slot: int) -> None:
        """FILLING -> FREE: the write failed or was not wanted."""
        self._expect(slot, SlotState.FILLING)
        self._free_slot(slot)

    # -- readers -----------------------------------------------------------
    def pin(self, slot: int) -> None:
        self._expect(slot, SlotState.REGISTERED)
        self.pins[slot] += 1
        self.policy.remove(slot)

    def unpin(self, slot: int) -> None:
        self._expect(slot, SlotState.REGISTERED)
        if self.pins[slot] <= 0:
            raise AssertionError(f"unpin of unpinned slot {slot}")
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self.policy.insert(slot)  # a read counts as a use

    def set_checksum(self, slot: int, checksum: int) -> None:
        """Record the checksum of a block its caller holds pinned (so its bytes are still its)."""
        self._expect(slot, SlotState.REGISTERED)
        if self.pins[slot] <= 0:
            raise AssertionError(f"checksum of unpinned slot {slot}")
        self.checksums[slot] = checksum
        self.unsummed.pop(slot, None)

    def newest_unsummed(self, n: int) -> list[tuple[int, int]]:
        """Up to `n` (slot, serial) of the newest REGISTERED slots without a checksum."""
        return [(s, self.serial[s]) for s in itertools.islice(reversed(self.unsummed), n)]

    def record_checksum(self, slot: int, serial: int, checksum: int) -> bool:
        """Record a checksum taken without a pin: only if the slot still holds
        registration `serial` (so the bytes summed were this block's)."""
        if self.state[slot] != SlotState.REGISTERED or self.serial[slot] != serial:
            return False
        self.checksums[slot] = checksum
        self.unsummed.pop(slot, None)
        return True

    def touch(self, slot: int) -> None:
        self.policy.touch(slot)

    # -- eviction ----------------------------------------------------------
    def take_victims(self, n: int) -> list[Victim]:
        """Up to `n` least recently used unpinned blocks, now DRAINING and out of the index."""
        out = []
        for s in self.policy.pop_oldest(n):
            key = self.keys[s]
            assert key is not None and self.pins[s] == 0
            del self.index[key]
            self.state[s] = SlotState.DRAINING
            self.unsummed.pop(s, None)
            out.append(Victim(s, key, self.checksums[s], self.anchors[s]))
            self._record_change(key)
        return out

    def release(self, slot: int) -> None:
        """DRAINING -> FREE once its bytes have been copied out (or given up)."""
        self._expect(slot, SlotState.DRAINING)
        self._free_slot(slot)

    def drop(self, key: BlockKey) -> bool:
        """Forget an unpinned block (found corrupt, or superseded). False if absent or pinned."""
        slot = self.index.get(key)
        if slot is None or self.pins[slot]:
            return False
        del self.index[key]
        self.policy.remove(slot)
        self._free_slot(slot)
        self._record_change(key)
        return True

    # -- internals ---------------------------------------------------------
    def _registered(self, s: int) -> Registered:
        self._expect(s, SlotState.REGISTERED)
        key = self.keys[s]
        assert key is not None
        return Registered(s, self.serial[s], key, self.checksums[s], self.anchors[s])

    def _free_slot(self, slot: int) -> None:
        self.state[slot] = SlotState.FREE
        self.keys[slot] = None
        self.checksums[slot] = None
        self.anchors[slot] = 0
        self.unsummed.pop(slot, None)
        self.pins[slot] = 0
        heapq.heappush(self._free, slot)

    def _expect(self, slot: int, state: SlotState) -> None:
        if self.state[slot] != state:
            raise AssertionError(f"slot {slot} is {self.state[slot].name}, expected {state.name}")

    def check(self) -> None:
        """Assert every invariant in the class docstring (tests; O(num_slots))."""
        free = set(self._free)
        assert len(free) == len(self._free), "a slot is twice in the free heap"
        for s in range(self.num_slots):
            st = self.state[s]
            assert (st == SlotState.FREE) == (s in free), f"slot {s}: free heap disagrees"
            registered = st == SlotState.REGISTERED
            key = self.keys[s]
            assert registered == (key is not None and self.index.get(key) == s), f"slot {s}: index"
            assert (registered and self.pins[s] == 0) == (s in self.policy), f"slot {s}: policy"
            assert self.pins[s] == 0 or registered, f"slot {s}: pinned but {st.name}"
            unsummed = registered and self.checksums[s] is None
            assert unsummed == (s in self.unsummed), f"slot {s}: unsummed set"
        assert len(self.index) == sum(st == SlotState.REGISTERED for st in self.state)
