"""Eviction order of one tier: least recently used first. Ordering only; the
slot table decides what may be evicted (only unpinned, registered slots are
ever handed to the policy)."""

from __future__ import annotations

import itertools
from collections import OrderedDict


class LruPolicy:
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, slot: int) -> bool:
        return slot in self._order

    def insert(self, slot: int) -> None:
        """Add as most recently used (or move there)."""
        self._order[slot] = None
        self._order.move_to_end(slot)

    def touch(self, slot: int) -> None:
        if slot in self._order:
            self._order.move_to_end(slot)

    def remove(self, slot: int) -> None:
        self._order.pop(slot, None)

    def pop_oldest(self, n: int) -> list[int]:
        out: list[int] = []
        while self._order and len(out) < n:
            out.append(self._order.popitem(last=False)[0])
        return out

    def oldest(self, n: int) -> list[int]:
        """Up to `n` slots, oldest first, left where they are."""
        return list(itertools.islice(self._order, n))

    def order(self) -> list[int]:
        """Oldest first; for tests and status."""
        return list(self._order)
