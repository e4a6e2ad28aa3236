"""Disk admission: a block evicted from the host tier earns a disk slot only once
it has been used `min_count` times (stored or loaded), so one-off prompts do
not churn the disk. Counts halve when the table grows past `max_tracked`, so
old popularity fades."""

from __future__ import annotations

from collections.abc import Iterable

from kvbm.block_key import BlockKey


class FrequencyFilter:
    def __init__(self, min_count: int = 2, max_tracked: int = 1 << 20) -> None:
        if min_count < 1 or max_tracked < 1:
            raise ValueError("min_count and max_tracked must be positive")
        self.min_count = min_count
        self.max_tracked = max_tracked
        self._counts: dict[BlockKey, int] = {}

    def record(self, keys: Iterable[BlockKey]) -> None:
        counts = self._counts
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        if len(counts) > self.max_tracked:
            self._counts = {k: c // 2 for k, c in counts.items() if c > 1}

    def admit(self, key: BlockKey) -> bool:
        return self._counts.get(key, 0) >= self.min_count
