"""Bytes flipped in a disk arena behind its node's back, as a bad sector
would: the disk fault `kvbm bench soak` injects, and the fault tests use.
It reads the file layout kvbm/disk_pool.py writes (a slot is occupied where
its header starts with the slot magic) and nothing of a running node."""

from __future__ import annotations

import os
import random

from kvbm.disk_pool import SLOT_MAGIC, arena_path
from kvbm.layout import PAGE, ModelGeometry


def corrupt_disk(directory: str, rng: random.Random, blocks: int, geometry: ModelGeometry) -> int:
    """Flip one byte in each of up to `blocks` occupied slots of the disk
    arena of `geometry` under `directory`. Returns how many (0 where there
    is no arena yet)."""
    path = arena_path(directory, geometry)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        slot_bytes = geometry.slot_bytes
        num_slots = (os.fstat(fd).st_size - PAGE) // (PAGE + slot_bytes)
        used = [s for s in range(num_slots) if os.pread(fd, 8, PAGE + s * PAGE) == SLOT_MAGIC]
        for s in rng.sample(used, min(blocks, len(used))):
            at = PAGE * (1 + num_slots) + s * slot_bytes + rng.randrange(geometry.block_bytes)
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
        os.fsync(fd)
        return min(blocks, len(used))
    finally:
        os.close(fd)
