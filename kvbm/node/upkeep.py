"""The node's background work on its own tiers, so that no engine or peer
waits on it: checksums taken soon after blocks are stored (so a peer's pin
and a drain to disk find them summed), and the coldest G2 blocks copied to
disk ahead of their eviction (so a load or a pull that evicts them frees
their slots without waiting on a disk write)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kvbm.manager import BlockManager

log = logging.getLogger("kvbm.node")
BATCH = 16  # blocks summed, or written ahead, per job and pass
IDLE_S = 0.05  # how often an idle upkeep looks for work


class Upkeep:
    """One task. Each pass runs each job (summing, writing ahead) on one batch
    in a worker thread; after a pass that worked it rests as long as the pass
    took (at most half a core), so it never crowds out the engines' copies.
    Summing comes first in each pass: a block written ahead unsummed is
    summed on the way anyway."""

    def __init__(self, mgr: BlockManager, checksums: bool, write_ahead_blocks: int) -> None:
        self.mgr = mgr
        self.jobs: list[Callable[[], int]] = []
        if checksums:
            self.jobs.append(lambda: mgr.checksum_newest(BATCH))
        if mgr.disk is not None and write_ahead_blocks > 0:
            self.jobs.append(lambda: mgr.write_ahead(write_ahead_blocks, BATCH))
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.jobs:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            worked = 0
            for job in self.jobs:
                batch = asyncio.ensure_future(asyncio.to_thread(job))
                try:
                    worked += await asyncio.shield(batch)
                except asyncio.CancelledError:
                    await asyncio.wait([batch])  # the arena must outlive the batch's reads
                    raise
                except Exception:
                    log.exception("background tier upkeep failed")
            await asyncio.sleep(time.monotonic() - t0 if worked else IDLE_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
