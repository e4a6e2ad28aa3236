"""The node's NIXL agent, confined to a process of its own (agent_child.py).

A holder of an agent's metadata can read and write the memory of the process
the agent lives in, beyond the registered region (UCX on TCP and CMA checks
bounds on the reader's side only; on RDMA the memory key covers the whole
registered arena). So the node keeps its agent in a child that maps the host
arena and holds nothing else: the secret, etcd, the engines' state and the
tiers' tables stay out of reach. A NIXL abort (a UCX assertion on damaged
metadata) ends the child, not the node; the node starts another.

The cost is one local round trip per call (a batched READ is one call).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

import transport
from transport.agent import Peer
from transport.agent_child import CALLS, MAX_FRAME
from transport.errors import ProtocolError, TransportError
from transport.frames import Message, PlainCodec

log = logging.getLogger("transport.agent")
START_TIMEOUT_S = 60.0  # a fresh interpreter importing NIXL and starting UCX
CALL_TIMEOUT_S = 10.0  # loading or unloading a peer
READ_GRACE_S = 5.0  # beyond a read's own deadline, before a silent child is ended
RESTART_MIN_S = 1.0  # between two starts: a child that keeps dying costs little


@dataclass
class _Child:
    proc: subprocess.Popen
    channel: socket.socket
    metadata: bytes
    base: int  # the arena's address in the child
    generation: int
    started: float  # monotonic


class ConfinedAgent:
    """Invariants: one call at a time crosses to the child (`_lock`), and each
    reply answers the call just sent; `_child` is the live child, or None
    while the next one starts; a child is one generation (its metadata, its
    arena address, its peers), so a `Peer` of an older one is not known. A
    call that fails on the channel (the child died, or stayed silent past the
    call's time) ends that child; the watcher thread starts the next. The
    child dies with the node (PDEATHSIG) and when its channel closes.
    """

    drives_itself = True  # the child drives its transports while idle

    def __init__(
        self,
        name: str,
        arena_fd: int,
        arena_size: int,
        *,
        env: Mapping[str, str],
        backend: str = "UCX",
    ) -> None:
        """Takes ownership of `arena_fd` (a descriptor of the arena's file);
        `env` is the child's whole environment: leave secrets out of it."""
        if arena_size <= 0:
            raise ValueError("arena_size must be positive")
        self.name = name
        self.backend = backend
        self.arena_size = arena_size
        self.starts = 0  # children that came up, the first included
        self._arena_fd = arena_fd
        root = os.path.dirname(os.path.dirname(os.path.abspath(transport.__file__)))
        path = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._env = {**env, "PYTHONPATH": path}  # the child runs this same code
        self._codec = PlainCodec(CALLS, MAX_FRAME)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        try:
            self._child: _Child | None = self._start(0)
        except BaseException:
            os.close(arena_fd)
            raise
        self._watcher = threading.Thread(target=self._watch, name="nixl-agent-watch", daemon=True)
        self._watcher.start()

    # -- what peers see ------------------------------------------------------
    @property
    def metadata(self) -> bytes:
        return self._live().metadata

    @property
    def arena(self) -> tuple[int, int]:
        return self._live().base, self.arena_size

    @property
    def pid(self) -> int:
        return self._live().proc.pid

    @property
    def generation(self) -> int:
        return self._live().generation

    def state(self) -> dict | str:
        """For `kvbm status`: the live child, or that it is being replaced."""
        child = self._child
        if child is None:
            return "restarting"
        return {"pid": child.proc.pid, "generation": child.generation, "starts": self.starts}

    def _live(self) -> _Child:
        child = self._child
        if child is None:
            raise TransportError("the NIXL agent is restarting")
        return child

    # -- calls ---------------------------------------------------------------
    def progress(self) -> None:
        """Nothing to do: the child drives its own transports."""

    def add_peer(self, metadata: bytes) -> Peer:
        body, generation = self._call("add_peer", {"metadata": metadata}, CALL_TIMEOUT_S)
        name = body.get("name")
        if not isinstance(name, str):
            raise TransportError("the NIXL agent named no peer")
        return Peer(name, generation)

    def knows(self, peer: Peer) -> bool:
        child = self._child
        return child is not None and child.generation == peer.generation

    def remove_peer(self, peer: Peer) -> None:
        if not self.knows(peer):
            return  # loaded in a child that has gone: nothing to unload
        try:
            self._call("remove_peer", {"name": peer.name}, CALL_TIMEOUT_S, peer.generation)
        except TransportError as e:
            log.info("peer not unloaded peer=%s error=%s", peer.name, e)

    def read(self, peer: Peer, local: np.ndarray, remote: np.ndarray, timeout: float) -> bool:
        """As `NixlAgent.read`; also False when the child restarted since
        `peer` was loaded (its addresses are in `arena` as it is now)."""
        return self.read_chunks(peer, [(local, remote)], timeout, lambda i: True) == 1

    def read_chunks(
        self,
        peer: Peer,
        chunks: Sequence[tuple[np.ndarray, np.ndarray]],
        timeout: float,
        landed: Callable[[int], bool],
    ) -> int:
        """As `NixlAgent.read_chunks`, pipelined: the child has the next two
        chunks' READs queued while `landed(i)` runs here, so whatever the
        caller does with a chunk (verify it, while its bytes are still in
        the cache) overlaps the next chunk's copy. Every READ sent is
        answered before this returns, so no READ still writes into a slot
        the caller frees afterwards (a child that fails is ended first)."""
        if not chunks or not self.knows(peer):
            return 0
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            return 0  # another read held the agent for all of our time
        try:
            child = self._live()
            if child.generation != peer.generation:
                return 0
            return self._read_chunks(child, peer, chunks, deadline, landed)
        except TransportError as e:
            log.info("read failed peer=%s error=%s", peer.name, e)
            return 0
        finally:
            self._lock.release()

    def _read_chunks(
        self,
        child: _Child,
        peer: Peer,
        chunks: Sequence[tuple[np.ndarray, np.ndarray]],
        deadline: float,
        landed: Callable[[int], bool],
    ) -> int:
        sent: collections.deque[int] = collections.deque()  # ids of READs not answered yet

        def send(i: int) -> None:
            local, remote = chunks[i]
            body = {
                "name": peer.name,
                "local": np.ascontiguousarray(local, np.uint64).tobytes(),
                "remote": np.ascontiguousarray(remote, np.uint64).tobytes(),
                "timeout": max(0.0, deadline - time.monotonic()),
            }
            msg_id = next(self._ids)
            child.channel.sendall(self._codec.encode(Message("read", msg_id, body)))
            sent.append(msg_id)

        def answer() -> bool:
            child.channel.settimeout(max(0.0, deadline - time.monotonic()) + READ_GRACE_S)
            reply = self._codec.recv(child.channel)
            if reply.id != sent.popleft():
                raise ProtocolError(f"a reply to call {reply.id}, out of order")
            return reply.call == "ok" and reply.body.get("done") is True

        done = 0
        try:
            try:
                for i in range(min(2, len(chunks))):
                    send(i)
                while sent:
                    if not answer():
                        break
                    if done + 2 < len(chunks):
                        send(done + 2)
                    done += 1
                    if not landed(done - 1):  # may raise: the READs queued still end first
                        break
            finally:
                while sent:  # READs still queued: let them finish before the caller frees slots
                    answer()
        except (OSError, ProtocolError) as e:  # a timeout is an OSError
            self._end(child, f"read failed: {e!r}")
        return done

    def _call(
        self,
        call: str,
        body: dict,
        timeout: float,
        generation: int | None = None,
        grace: float = 0.0,
    ) -> tuple[dict, int]:
        """One call to the live child (of `generation`, when given); its reply
        body and the child's generation. The lock is waited for within
        `timeout`; the reply for `timeout + grace`."""
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            raise TransportError(f"the NIXL agent was busy for all of {call}'s time")
        try:
            child = self._live()
            if generation is not None and generation != child.generation:
                raise TransportError("the NIXL agent restarted")
            msg_id = next(self._ids)
            try:
                child.channel.settimeout(timeout + grace)
                child.channel.sendall(self._codec.encode(Message(call, msg_id, body)))
                reply = self._codec.recv(child.channel)
                if reply.id != msg_id:
                    raise ProtocolError(f"a reply to call {reply.id}, not {msg_id}")
            except (OSError, ProtocolError) as e:  # a timeout is an OSError
                self._end(child, f"{call} failed: {e!r}")
                raise TransportError(f"the NIXL agent process failed during {call}") from e
        finally:
            self._lock.release()
        if reply.call != "ok":
            raise TransportError(str(reply.body.get("error", "refused")))
        return reply.body, child.generation

    # -- the child's life ----------------------------------------------------
    def _start(self, generation: int) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [theirs.fileno(), self._arena_fd, self.arena_size, self.name, self.backend]
        command = [sys.executable, "-m", "transport.agent_child", *map(str, args), str(os.getpid())]
        try:
            proc = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(), self._arena_fd),
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=2,  # UCX prints to stdout: keep it off ours (a bench prints JSON there)
            )
        except OSError as e:
            ours.close()
            raise TransportError(f"cannot start the NIXL agent process: {e}") from e
        finally:
            theirs.close()
        try:
            ours.settimeout(START_TIMEOUT_S)
            ready = self._codec.recv(ours)
            base, metadata = ready.body.get("arena"), ready.body.get("metadata")
            if ready.call != "ready" or type(base) is not int or not isinstance(metadata, bytes):
                raise TransportError(f"the NIXL agent did not start: {ready.body.get('error')}")
        except BaseException as e:
            _stop(proc, ours)
            if isinstance(e, OSError | ProtocolError):
                raise TransportError(f"the NIXL agent did not start: {e!r}") from e
            raise
        self.starts += 1
        log.info("NIXL agent process started pid=%d generation=%d", proc.pid, generation)
        return _Child(proc, ours, metadata, base, generation, time.monotonic())

    def _end(self, child: _Child, why: str) -> None:
        """End a child that failed a call (the watcher starts the next)."""
        log.warning("ending the NIXL agent process pid=%d reason=%s", child.proc.pid, why)
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(READ_GRACE_S)  # gone: no READ of its writes into the arena any more

    def _watch(self) -> None:
        """Wait for the child to end; unless we are closing, start the next."""
        child = self._child
        while child is not None:
            code = child.proc.wait()
            if self._closing.is_set():
                return
            log.error(
                "the NIXL agent process ended pid=%d code=%d; its peers reconnect",
                child.proc.pid,
                code,
            )
            with self._lock:
                self._child = None  # calls fail at once until the next one is up
            child.channel.close()
            nxt = None
            while nxt is None:
                wait = RESTART_MIN_S - (time.monotonic() - child.started)
                if self._closing.wait(max(0.0, wait)):
                    return
                try:
                    nxt = self._start(child.generation + 1)
                except TransportError as e:
                    log.error("the NIXL agent process failed to start error=%s", e)
                    child.started = time.monotonic()
            with self._lock:
                if self._closing.is_set():
                    _stop(nxt.proc, nxt.channel)
                    return
                self._child = child = nxt

    def close(self) -> None:
        """Stop the child (its channel closes: it unloads and exits). Safe twice."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            _stop(child.proc, child.channel)
        self._watcher.join(10)
        os.close(self._arena_fd)


def _stop(proc: subprocess.Popen, channel: socket.socket) -> None:
    channel.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
