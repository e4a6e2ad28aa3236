"""The reference of `kvbm bench engines`: a raw round trip between two
processes over a unix socket, against the node's lookup from one engine
alone, both measured with the same placement and at the same time.

Where the two ends run decides what a round trip costs more than anything
else on a small machine: on one core a round trip is the two processes' CPU
(about 11 us raw here), across two cores it adds the wake-up of the other
core (about 30-35 us raw here, a virtual machine's cross-core interrupt).
Left to the scheduler, a run found either, and the ratio of the node's call
to the raw one moved from 3.3 to 7.0 between runs. Both are measured with
this process on one core and the far end (the echo, every thread of the
node) on another: the place of an engine and its node, on two cores. And
the two are measured in alternating rounds: a disturbance from outside
(another user of the machine) falls on both, not on one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from kvbm.errors import KvbmError

Cores = tuple[int, int]  # (this process's core, the far end's)
START_TIMEOUT_S = 60.0


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


def cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has spent, all its threads, to the
    nanosecond: Linux's CPU-time clock of a process (the id
    clock_getcpuclockid gives, made as the kernel makes it), where /proc's
    ticks are 10 ms."""
    return time.clock_gettime(((~pid) << 3) | 2)


@dataclass(frozen=True)
class Reference:
    """The p50s of a raw round trip and of the node's call, and what each
    cost in CPU per call: the raw one both ends', the node's call the
    calling engine's and the node's. What a p50 has beyond its CPU is
    waiting: mostly the wake-up of the other core."""

    raw_us: float
    raw_cpu_us: float
    node_us: float
    node_engine_cpu_us: float
    node_cpu_us: float


def reference(
    directory: str,
    cores: Cores | None,
    node_call: Callable[[], object],
    node_pid: int,
    rounds: int = 10,
    n: int = 500,
) -> Reference:
    """A raw round trip of a lookup-sized frame (700 bytes) between two
    Python processes over a unix socket, and `node_call` to the node
    `node_pid`, both placed on `cores`. They are measured in alternating
    rounds, so that both see the machine as it is at the time (a quiet
    second or a busy one shifts both, not one of them)."""
    raw: list[float] = []
    node: list[float] = []
    cpu = {"raw": 0.0, "engine": 0.0, "node": 0.0}
    with _Echo(directory, 700) as echo:
        for _ in range(rounds):
            with placed(cores, echo.proc.pid):
                mine, theirs = time.process_time(), cpu_s(echo.proc.pid)
                raw += _times(echo.roundtrip, n)
                cpu["raw"] += time.process_time() - mine + cpu_s(echo.proc.pid) - theirs
            with placed(cores, node_pid):
                mine, theirs = time.process_time(), cpu_s(node_pid)
                node += _times(node_call, n)
                cpu["engine"] += time.process_time() - mine
                cpu["node"] += cpu_s(node_pid) - theirs
    per_call = {k: round(v / (rounds * n) * 1e6, 1) for k, v in cpu.items()}
    return Reference(
        _p50_us(raw), per_call["raw"], _p50_us(node), per_call["engine"], per_call["node"]
    )


def _times(call: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _p50_us(times: list[float]) -> float:
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


class _Echo:
    """The raw reference: a process that sends back what it reads, and this
    process's connection to it."""

    def __init__(self, directory: str, payload: int) -> None:
        self.path = os.path.join(directory, "echo.sock")
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_echo, args=(self.path, child), daemon=True)
        self.proc.start()
        child.close()  # the echo's end lives on in the echo alone: its exit is an EOF here
        self.cli: socket.socket | None = None
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise KvbmError(f"the echo process did not start in {START_TIMEOUT_S:g} s")
            parent.recv()
            self.cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.cli.connect(self.path)
        except EOFError:
            self.close()
            raise KvbmError("the echo process ended before it listened") from None
        except BaseException:
            self.close()
            raise
        self.payload, self.data = payload, b"x" * payload

    def roundtrip(self) -> None:
        assert self.cli is not None
        self.cli.sendall(self.data)
        got = 0
        while got < self.payload:
            got += len(self.cli.recv(65536))

    def __enter__(self) -> _Echo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.cli is not None:
            self.cli.close()
        self.proc.kill()
        self.proc.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
