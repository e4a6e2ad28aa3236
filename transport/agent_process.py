"""One NIXL agent process of a node (agent_child.py): its start, its calls,
its end, and its replacement when it dies. A node runs two of them
(confined_agent.py): one serving peers, one pulling from them.

A child is one generation: its metadata, its arena address, the peers
loaded into it. A call that fails on the channel (the child died, or stayed
silent past the call's time) ends that child; the watcher thread starts the
next, no sooner than RESTART_MIN_S after the last start, so a child that
keeps dying costs little. The child dies with the node (PDEATHSIG) and when
its channel closes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import transport
from transport.agent_child import CALLS, MAX_FRAME
from transport.errors import ProtocolError, TransportError
from transport.frames import Message, PlainCodec

log = logging.getLogger("transport.agent")
START_TIMEOUT_S = 60.0  # a fresh interpreter importing NIXL and starting UCX
READ_GRACE_S = 5.0  # beyond a call's own deadline, before a silent child is ended
RESTART_MIN_S = 1.0  # between two starts


@dataclass
class Child:
    proc: subprocess.Popen
    channel: socket.socket
    metadata: bytes  # empty for a pulling child: its metadata never leaves it
    base: int  # the arena's address in the child
    generation: int
    started: float  # monotonic


class AgentProcess:
    """Invariants: one call at a time crosses to the child (`lock`), and each
    reply answers the call just sent; `child` is the live child, or None
    while the next one starts."""

    def __init__(
        self,
        name: str,
        role: str,
        open_arena: Callable[[], int],
        arena_size: int,
        env: Mapping[str, str],
        backend: str,
    ) -> None:
        """`open_arena()` gives a new descriptor of the arena's file for each
        child (closed here once the child has it): read-only for a serving
        child. `env` is the child's whole environment."""
        self.name = name
        self.role = role
        self.arena_size = arena_size
        self.backend = backend
        self.starts = 0  # children that came up, the first included
        self._open_arena = open_arena
        root = os.path.dirname(os.path.dirname(os.path.abspath(transport.__file__)))
        path = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._env = {**env, "PYTHONPATH": path}  # the child runs this same code
        self.codec = PlainCodec(CALLS, MAX_FRAME)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self._closing = threading.Event()
        self.child: Child | None = None
        self._watcher: threading.Thread | None = None
        self._spawned: tuple[subprocess.Popen, socket.socket] | None = self._spawn()

    def up(self) -> None:
        """Wait for the first child, spawned by the constructor, to be ready
        (so two can start at once), and watch it from then on. A child dies
        with the thread that spawned it (PDEATHSIG is per thread): the
        constructor's for the first (not a short-lived one, then), the
        watcher, which lives as long as this object, for the next."""
        assert self._spawned is not None
        spawned, self._spawned = self._spawned, None
        self.child = self._ready(*spawned, 0)
        self._watcher = threading.Thread(
            target=self._watch, name=f"nixl-agent-watch-{self.role}", daemon=True
        )
        self._watcher.start()

    def live(self) -> Child:
        child = self.child
        if child is None:
            raise TransportError(f"the {self.role} NIXL agent is restarting")
        return child

    def state(self) -> dict | str:
        """For `kvbm status`: the live child, or that it is being replaced."""
        child = self.child
        if child is None:
            return "restarting"
        return {"pid": child.proc.pid, "generation": child.generation, "starts": self.starts}

    def call(
        self, call: str, body: dict, timeout: float, generation: int | None = None
    ) -> tuple[dict, int]:
        """One call to the live child (of `generation`, when given); its reply
        body and the child's generation. The lock is waited for within
        `timeout`; the reply for as long again."""
        if not self.lock.acquire(timeout=max(0.0, timeout)):
            raise TransportError(f"the NIXL agent was busy for all of {call}'s time")
        try:
            child = self.live()
            if generation is not None and generation != child.generation:
                raise TransportError("the NIXL agent restarted")
            msg_id = next(self.ids)
            try:
                child.channel.settimeout(timeout)
                child.channel.sendall(self.codec.encode(Message(call, msg_id, body)))
                reply = self.codec.recv(child.channel)
                if reply.id != msg_id:
                    raise ProtocolError(f"a reply to call {reply.id}, not {msg_id}")
            except (OSError, ProtocolError) as e:  # a timeout is an OSError
                self.end(child, f"{call} failed: {e!r}")
                raise TransportError(f"the NIXL agent process failed during {call}") from e
        finally:
            self.lock.release()
        if reply.call != "ok":
            raise TransportError(str(reply.body.get("error", "refused")))
        return reply.body, child.generation

    def _start(self, generation: int) -> Child:
        return self._ready(*self._spawn(), generation)

    def _spawn(self) -> tuple[subprocess.Popen, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            arena_fd = self._open_arena()
        except OSError as e:
            ours.close()
            theirs.close()
            raise TransportError(f"cannot open the arena for the NIXL agent: {e}") from e
        args = [theirs.fileno(), arena_fd, self.arena_size, self.name, self.backend, os.getpid()]
        command = [sys.executable, "-m", "transport.agent_child", *map(str, args), self.role]
        try:
            proc = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(), arena_fd),
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=2,  # UCX prints to stdout: keep it off ours (a bench prints JSON there)
            )
        except OSError as e:
            ours.close()
            raise TransportError(f"cannot start the NIXL agent process: {e}") from e
        finally:
            theirs.close()
            os.close(arena_fd)
        return proc, ours

    def _ready(self, proc: subprocess.Popen, ours: socket.socket, generation: int) -> Child:
        try:
            ours.settimeout(START_TIMEOUT_S)
            ready = self.codec.recv(ours)
            base, metadata = ready.body.get("arena"), ready.body.get("metadata")
            if ready.call != "ready" or type(base) is not int or not isinstance(metadata, bytes):
                raise TransportError(f"the NIXL agent did not start: {ready.body.get('error')}")
        except BaseException as e:
            stop(proc, ours)
            if isinstance(e, OSError | ProtocolError):
                raise TransportError(f"the NIXL agent did not start: {e!r}") from e
            raise
        self.starts += 1
        log.info(
            "NIXL agent process started role=%s pid=%d generation=%d",
            self.role,
            proc.pid,
            generation,
        )
        return Child(proc, ours, metadata, base, generation, time.monotonic())

    def end(self, child: Child, why: str) -> None:
        """End a child that failed a call (the watcher starts the next)."""
        log.warning(
            "ending the NIXL agent process role=%s pid=%d reason=%s", self.role, child.proc.pid, why
        )
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(READ_GRACE_S)  # gone: no READ of its writes into the arena any more

    def _watch(self) -> None:
        """Wait for the child to end; unless we are closing, start the next."""
        child = self.child
        while child is not None:
            code = child.proc.wait()
            if self._closing.is_set():
                return
            log.error(
                "the NIXL agent process ended role=%s pid=%d code=%d; its peers reconnect",
                self.role,
                child.proc.pid,
                code,
            )
            with self.lock:
                self.child = None  # calls fail at once until the next one is up
            child.channel.close()
            nxt = None
            while nxt is None:
                wait = RESTART_MIN_S - (time.monotonic() - child.started)
                if self._closing.wait(max(0.0, wait)):
                    return
                try:
                    nxt = self._start(child.generation + 1)
                except TransportError as e:
                    log.error(
                        "the NIXL agent process failed to start role=%s error=%s", self.role, e
                    )
                    child.started = time.monotonic()
            with self.lock:
                if self._closing.is_set():
                    stop(nxt.proc, nxt.channel)
                    return
                self.child = child = nxt

    def close(self) -> None:
        """Stop the child (its channel closes: it unloads and exits). Safe twice."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._spawned is not None:  # spawned, never waited for
            stop(*self._spawned)
            self._spawned = None
        with self.lock:
            child, self.child = self.child, None
        if child is not None:
            stop(child.proc, child.channel)
        if self._watcher is not None:
            self._watcher.join(10)


def stop(proc: subprocess.Popen, channel: socket.socket) -> None:
    channel.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
