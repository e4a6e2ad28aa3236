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


class RawDisk:
    """Plain O_DIRECT writes and reads of `buffer` in `io_bytes` calls, to a file
    on `directory`'s file system: the disk reference. Pass the memory the
    measured path moves (the host arena), so both move the same bytes from the
    same kind of memory with the same I/O size."""

    def __init__(self, directory: str, buffer: np.ndarray, io_bytes: int) -> None:
        self.path = os.path.join(directory, f"kvbm-bench-raw-{os.getpid()}.bin")
        self.buffer = buffer
        self.nbytes = buffer.nbytes
        self.io_bytes = min(io_bytes, self.nbytes)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
            self.direct_io = True
        except OSError:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self.direct_io = False
        os.posix_fallocate(self.fd, 0, self.nbytes)

    def _chunks(self):
        for off in range(0, self.nbytes, self.io_bytes):
            yield off, self.buffer[off : off + self.io_bytes]

    def write(self) -> None:
        for off, chunk in self._chunks():
            os.pwritev(self.fd, [chunk], off)

    def read(self) -> None:
        for off, chunk in self._chunks():
            os.preadv(self.fd, [chunk], off)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
