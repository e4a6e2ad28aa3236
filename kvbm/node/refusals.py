"""Engines that run without kvbm, as their connectors told this node: the
last few distinct refusals (kvbm/engine_wire.py `Refusal`), for `kvbm status`
and the node's metrics.

Any engine that may use the node's socket may send refusals, as many as it
likes: the node keeps a fixed number of them, so a stream of distinct ones
costs a bounded table, never memory that grows."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvbm.engine_wire import REFUSAL_KINDS, Refusal

MAX_REFUSALS = 16  # distinct (model, reason) pairs kept


@dataclass
class Refused:
    """One distinct refusal: how often engines told it, and when last."""

    refusal: Refusal
    count: int
    last_seen: float  # seconds since the epoch

    def to_wire(self) -> dict:
        return {**self.refusal.to_wire(), "count": self.count, "last_seen": self.last_seen}


class Refusals:
    """Invariants: at most `cap` entries, one per (model, reason), in the
    order they were last told (the oldest is dropped for a new one);
    `told` counts every refusal by kind since the node started, dropped
    entries' included, and its keys are REFUSAL_KINDS only."""

    def __init__(self, cap: int = MAX_REFUSALS, clock: Callable[[], float] = time.time) -> None:
        self.cap = cap
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], Refused] = OrderedDict()
        self.told: Counter[str] = Counter({kind: 0 for kind in REFUSAL_KINDS})

    def add(self, refusal: Refusal) -> bool:
        """Count `refusal`; True when it is new here (or was dropped since)."""
        assert refusal.kind in REFUSAL_KINDS
        self.told[refusal.kind] += 1
        key = (refusal.model, refusal.reason)
        entry = self._entries.get(key)
        now = self.clock()
        if entry is not None:
            entry.count += 1
            entry.last_seen = now
            entry.refusal = refusal  # the kind last told, should an engine change it
            self._entries.move_to_end(key)
            return False
        self._entries[key] = Refused(refusal, 1, now)
        while len(self._entries) > self.cap:
            self._entries.popitem(last=False)
        return True

    def listed(self) -> list[dict]:
        """Every entry kept, the most recently told first (`kvbm status`)."""
        return [entry.to_wire() for entry in reversed(self._entries.values())]

    def counts(self) -> dict[str, int]:
        """Refusals told since the node started, by kind (its metrics)."""
        return dict(self.told)
