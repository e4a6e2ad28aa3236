"""Physical references, measured in the same run and interleaved with the figure
they judge: on a noisy machine only ratios taken side by side mean anything."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function; one warm-up call each, then
    `reps` rounds that call every function once. Each round starts one function
    later, so none always runs right after the same neighbour (a disk still
    flushing the previous write slows whatever comes next)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for r in range(reps):
        for name, fn in items[r % len(items) :] + items[: r % len(items)]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


class Memcpy:
    """numpy copyto of `nbytes` between two buffers: the memory reference."""

    def __init__(self, nbytes: int) -> None:
        self.src = np.frombuffer(os.urandom(nbytes), dtype=np.uint8).copy()
        self.dst = np.empty_like(self.src)

    def __call__(self) -> None:
        np.copyto(self.dst, self.src)


class RawDiskIO:
    """The disk reference: plain positional writes of `src` and reads into `dst`,
    `io_bytes` per call, at `offset` of an open file. The tiers bench points it
    at the disk tier's own file and data region (opened O_DIRECT) and at the
    same arena slots the tier moves, so the two differ only by the tier's own
    work: checksums, headers, bookkeeping."""

    def __init__(self, fd: int, offset: int, src: np.ndarray, dst: np.ndarray, io_bytes: int):
        if src.nbytes != dst.nbytes:
            raise ValueError("src and dst must be the same size")
        self.fd, self.offset, self.src, self.dst = fd, offset, src, dst
        self.io_bytes = min(io_bytes, src.nbytes)

    def write(self) -> None:
        for off in range(0, self.src.nbytes, self.io_bytes):
            os.pwritev(self.fd, [self.src[off : off + self.io_bytes]], self.offset + off)

    def read(self) -> None:
        for off in range(0, self.dst.nbytes, self.io_bytes):
            os.preadv(self.fd, [self.dst[off : off + self.io_bytes]], self.offset + off)
