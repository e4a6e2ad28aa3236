"""G2: the node's host-memory tier, one shared-memory arena cut into slots."""

from __future__ import annotations

import os
import secrets

import numpy as np

from kvbm.hashing import checksum
from kvbm.layout import ModelGeometry
from kvbm.shm_arena import SHM_DIR, SharedArena
from kvbm.slot_table import SlotTable

ARENA_PREFIX = "kvbm-g2-"


class HostPool:
    """Slot `s` holds one block's bytes at [s * slot_bytes, s * slot_bytes + block_bytes).

    The arena is one region (so NIXL registers it once) that engine processes
    map by `arena.name`. Bookkeeping lives in `table`; this class adds bytes.
    """

    def __init__(
        self,
        geometry: ModelGeometry,
        capacity_bytes: int,
        arena_name: str | None = None,
        mode: int = 0o600,
        gid: int | None = None,
        directory: str = SHM_DIR,
    ) -> None:
        num_slots = capacity_bytes // geometry.slot_bytes
        if num_slots < 1:
            raise ValueError(
                f"host tier of {capacity_bytes} bytes cannot hold one "
                f"{geometry.slot_bytes}-byte block"
            )
        SharedArena.sweep_stale(ARENA_PREFIX, directory)
        name = arena_name or f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.geometry = geometry
        self.arena = SharedArena.create(name, num_slots * geometry.slot_bytes, mode, gid, directory)
        self.table = SlotTable(num_slots)
        self._bytes = memoryview(self.arena.array)

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    def slot_buffer(self, slot: int) -> np.ndarray:
        """The whole page-aligned slot (block bytes + padding): what disk I/O moves."""
        stride = self.geometry.slot_bytes
        return self.arena.array[slot * stride : (slot + 1) * stride]

    def block_view(self, slot: int) -> memoryview:
        start = slot * self.geometry.slot_bytes
        return self._bytes[start : start + self.geometry.block_bytes]

    def checksums(self, slots: list[int]) -> list[int]:
        mv, stride, size = self._bytes, self.geometry.slot_bytes, self.geometry.block_bytes
        return [checksum(mv[s * stride : s * stride + size]) for s in slots]

    def close(self) -> None:
        # Drop every view of the arena first, so it can really be unmapped.
        self._bytes.release()
        self.arena.close()
