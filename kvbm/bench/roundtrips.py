"""The reference of `kvbm bench engines`: a raw round trip between two
processes over a unix socket, against the node's lookup from one engine
alone, both measured with the same placement.

Where the two ends run decides what a round trip costs more than anything
else on a small machine: on one core a round trip is the two processes' CPU
(about 11 us raw here), across two cores it adds the wake-up of the other
core (about 30-35 us raw here, a virtual machine's cross-core interrupt).
Left to the scheduler, a run found either, and the ratio of the node's call
to the raw one moved from 3.3 to 7.0 between runs. Both are measured with
this process on one core and the far end (the echo, every thread of the
node) on another: the place of an engine and its node, on two cores.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

Cores = tuple[int, int]  # (this process's core, the far end's)


def reference_cores() -> Cores | None:
    """Two cores this process may run on (None: it has only one)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


@contextlib.contextmanager
def placed(cores: Cores | None, far_pid: int) -> Iterator[None]:
    """This process on cores[0] and every thread of `far_pid` on cores[1]
    for the block; afterwards each runs where it ran before."""
    if cores is None:
        yield
        return
    mine, theirs = os.sched_getaffinity(0), _threads_affinity(far_pid)
    os.sched_setaffinity(0, {cores[0]})
    for tid in theirs:
        _set_affinity(tid, {cores[1]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        for tid, cpus in theirs.items():
            _set_affinity(tid, cpus)


def _threads_affinity(pid: int) -> dict[int, set[int]]:
    got = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            got[tid] = os.sched_getaffinity(tid)
    return got


def _set_affinity(tid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError):  # a thread that ended meanwhile
        os.sched_setaffinity(tid, cpus)


def p50_us(call: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def _echo(path: str, ready: Connection) -> None:
    """The raw reference's far end: a process that sends back what it reads."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.send(True)
    conn, _ = srv.accept()
    while data := conn.recv(65536):
        conn.sendall(data)


def raw_roundtrip_us(
    directory: str, cores: Cores | None, payload: int = 700, n: int = 5000
) -> float:
    """p50 of a round trip of `payload` bytes (about a 16-key lookup's frame)
    between two Python processes over a unix socket, placed on `cores`."""
    path = os.path.join(directory, "echo.sock")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(path, child), daemon=True)
    proc.start()
    try:
        parent.recv()
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.connect(path)
        data = b"x" * payload

        def roundtrip() -> None:
            cli.sendall(data)
            got = 0
            while got < payload:
                got += len(cli.recv(65536))

        with placed(cores, proc.pid):
            us = p50_us(roundtrip, n)
        cli.close()
        return us
    finally:
        proc.kill()
        proc.join(5)
