"""Engine processes that a bench drives phase by phase: each says when it is
ready, and the bench starts a phase only once every engine still in the crew
has answered the step before.

Both sides of the pipe between the bench and one engine live here. The
engine side (`serve`) sets its engine up (imports, attach), says `ready`,
then answers each `phase` message with its result until `bye`. The bench
side (`EngineCrew`) starts the processes, waits for every `ready` with a
deadline, and hands each phase a common start time so that every engine
measures the same seconds. An engine that fails, exits, or does not answer
in time leaves the crew with the reason, and the bench reports it instead of
failing as a whole.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol


class Say(enum.Enum):
    """What the bench and an engine send each other, first in each message:
    (READY,), (FAILED, why), (RESULT, what) from the engine; (PHASE, kind,
    begin, seconds), (BYE,) from the bench. EXITED is said for an engine
    that ended without a word."""

    READY = "ready"
    FAILED = "failed"
    RESULT = "result"
    EXITED = "exited"
    PHASE = "phase"
    BYE = "bye"


START_LEAD_S = 0.2  # from the bench's phase message to its start, for every engine to wake
BYE_TIMEOUT_S = 30.0


class Phases(Protocol):
    """One engine as a crew drives it."""

    def run(self, kind: str, begin: float, seconds: float) -> Any:
        """Make calls of `kind` from wall-clock time `begin` for `seconds`;
        the result goes to the bench (it must pickle)."""

    def close(self) -> None:
        """End the engine (detach from its node)."""


def serve(conn: Connection, start: Callable[[], Phases]) -> None:
    """The engine process's side: `start()` sets the engine up, then every
    phase the bench asks for is run and answered. Any failure is sent to the
    bench as one line naming it, so the bench can say which engine failed
    and why."""
    try:
        engine = start()
    except Exception as e:  # the bench names this engine and the reason
        _tell_failed(conn, e)
        return
    try:
        conn.send((Say.READY,))
        while (message := conn.recv())[0] is Say.PHASE:
            _, kind, begin, seconds = message
            conn.send((Say.RESULT, engine.run(kind, begin, seconds)))
    except (EOFError, OSError):
        pass  # the bench is gone: nobody to tell
    except Exception as e:  # the bench counts this engine out of the phases left
        _tell_failed(conn, e)
    finally:
        engine.close()


def _tell_failed(conn: Connection, e: Exception) -> None:
    with contextlib.suppress(OSError):
        conn.send((Say.FAILED, f"{type(e).__name__}: {e}"))


@dataclass(frozen=True)
class Absent:
    """An engine that left the crew: its index, and why in words."""

    engine: int
    why: str

    def to_json(self) -> dict:
        return {"engine": self.engine, "why": self.why}


class EngineCrew:
    """Engine processes started with `target(conn, *args[i])`, which must
    call `serve`. Invariant: `members` holds the engines that answered every
    step so far (`ready`, then each phase's result) within its deadline. An
    engine that misses one leaves `members` for good and is listed in
    `absent` with the reason; nothing it sends later is read."""

    def __init__(self, target: Callable[..., None], args: Sequence[tuple]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.absent: list[Absent] = []
        for each in args:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *each), daemon=True)
            proc.start()
            child.close()  # the child's end lives on in the child alone
            self.pipes.append(parent)
            self.procs.append(proc)
        self.members: list[int] = list(range(len(self.procs)))
        self._open: tuple[str, float] | None = None  # the phase started last, its deadline

    def __enter__(self) -> EngineCrew:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> list[Absent]:
        """Wait until every member says it is ready, at most `timeout`
        seconds. Returns the engines that did not (empty: all ready)."""
        before = len(self.absent)
        self._collect(Say.READY, time.monotonic() + timeout, f"not ready after {timeout:g} s")
        return self.absent[before:]

    def phase(self, kind: str, seconds: float, grace: float) -> float:
        """Start phase `kind` on every member at one wall-clock time, for
        `seconds`, and return that time; `results` then waits for each
        member's answer, at most `grace` seconds past the phase's end."""
        begin = time.time() + START_LEAD_S
        for i in self.members:
            self.pipes[i].send((Say.PHASE, kind, begin, seconds))
        self._open = (kind, time.monotonic() + START_LEAD_S + seconds + grace)
        return begin

    def results(self) -> dict[int, Any]:
        """Each member's result of the phase started last, by engine index.
        An engine that fails or does not answer in time leaves the crew."""
        if self._open is None:
            raise ValueError("no phase was started")
        kind, deadline = self._open
        self._open = None
        return self._collect(Say.RESULT, deadline, f"no result of phase {kind} in time")

    def _collect(self, expect: Say, deadline: float, late: str) -> dict[int, Any]:
        got: dict[int, Any] = {}
        waiting = set(self.members)
        while waiting:
            by_pipe = {self.pipes[i]: i for i in waiting}
            by_exit = {self.procs[i].sentinel: i for i in waiting}
            left = deadline - time.monotonic()
            ready = wait([*by_pipe, *by_exit], timeout=max(0.0, left)) if left > 0 else []
            if not ready:
                break
            for handle in ready:
                i = by_pipe.get(handle, by_exit.get(handle))  # type: ignore[arg-type]
                if i not in waiting:
                    continue
                waiting.discard(i)
                said, *rest = self._read(i)
                if said is expect:
                    got[i] = rest[0] if rest else None
                elif said in (Say.FAILED, Say.EXITED):
                    self._leave(i, rest[0])
                else:
                    self._leave(i, f"said {said} where {expect} was due")
        for i in sorted(waiting):
            self._leave(i, late)
        return dict(sorted(got.items()))

    def _read(self, i: int) -> tuple:
        """Engine i's next message, or why there is none (it exited)."""
        pipe = self.pipes[i]
        try:
            if pipe.poll():
                return pipe.recv()
        except (EOFError, OSError):
            pass
        self.procs[i].join(1.0)
        return (Say.EXITED, f"exited with code {self.procs[i].exitcode}")

    def _leave(self, i: int, why: str) -> None:
        self.members.remove(i)
        self.absent.append(Absent(i, why))

    def close(self) -> None:
        """Say bye to every member and wait for it to end; an engine that
        left the crew, or does not end in time, is killed. Safe to call twice."""
        for i, proc in enumerate(self.procs):
            if i not in self.members:
                proc.kill()
            with contextlib.suppress(OSError):
                self.pipes[i].send((Say.BYE,))
        deadline = time.monotonic() + BYE_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for pipe in self.pipes:
            pipe.close()
        self.pipes, self.procs, self.members = [], [], []
