"""The node's NIXL agents, confined to processes of their own
(agent_process.py, agent_child.py): one serves peers, one pulls from them.

A holder of an agent's metadata can read and write the memory of the process
the agent lives in, beyond the registered region (UCX on TCP and CMA checks
bounds on the reader's side only; on RDMA the memory key covers the whole
registered arena). So the node keeps its agents in children that map the
host arena and hold nothing else: the secret, etcd, the engines' state and
the tiers' tables stay out of reach. A NIXL abort (a UCX assertion on damaged
metadata) ends a child, not the node; the node starts another.

Peers get the metadata of the serving child only, and that child maps the
arena read-only, from a read-only descriptor (so the mapping cannot be made
writable either): a peer's WRITE into it fails (EFAULT under CMA) or faults
the serving child (TCP), which the node replaces; it never lands in a block
the node then serves as its own. The pulling child maps the arena
read-write, since peers' blocks land there; its metadata never leaves the
node (a READ needs only the target's), and it loads peers' metadata.

The cost is one local round trip per call (a batched READ is one call) and
one more process.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from transport.agent import Peer
from transport.agent_process import READ_GRACE_S, AgentProcess, Child
from transport.errors import ProtocolError, TransportError
from transport.frames import Message

log = logging.getLogger("transport.agent")
CALL_TIMEOUT_S = 10.0  # loading or unloading a peer


class ConfinedAgent:
    """Two agent processes behind the `Agent` protocol: `metadata`, `arena`
    and `generation` are the serving child's (what peers get and reach);
    peers loaded here, their `Peer.generation` and every READ are the
    pulling child's, whose arena address is `local_arena`. Either child is
    replaced on its own when it dies."""

    drives_itself = True  # the children drive their transports while idle

    def __init__(
        self,
        name: str,
        arena_fd: int,
        arena_size: int,
        *,
        env: Mapping[str, str],
        backend: str = "UCX",
    ) -> None:
        """Takes ownership of `arena_fd` (a read-write descriptor of the
        arena's file); `env` is the children's whole environment: leave
        secrets out of it."""
        if arena_size <= 0:
            raise ValueError("arena_size must be positive")
        self.name = name
        self.backend = backend
        self.arena_size = arena_size
        self._arena_fd = arena_fd
        common = (arena_size, env, backend)
        try:  # both at once: each is an interpreter importing NIXL and starting UCX
            self._serving = AgentProcess(name, "serve", self._read_only, *common)
            try:
                self._pulling = AgentProcess(
                    f"{name}-pull", "pull", lambda: os.dup(arena_fd), *common
                )
                try:
                    self._serving.up()
                    self._pulling.up()
                except BaseException:
                    self._pulling.close()
                    raise
            except BaseException:
                self._serving.close()
                raise
        except BaseException:
            os.close(arena_fd)
            raise

    def _read_only(self) -> int:
        """A read-only open of the arena's file, for a serving child: reopened
        through /proc, not a copy of our read-write descriptor, so the
        child's mapping has no right to become writable (mprotect refuses)."""
        return os.open(f"/proc/self/fd/{self._arena_fd}", os.O_RDONLY | os.O_CLOEXEC)

    # -- what peers see ------------------------------------------------------
    @property
    def metadata(self) -> bytes:
        return self._serving_child().metadata

    @property
    def arena(self) -> tuple[int, int]:
        return self._serving_child().base, self.arena_size

    @property
    def generation(self) -> int:
        return self._serving_child().generation

    @property
    def pid(self) -> int:
        """The serving child, the process peers' READs reach."""
        return self._serving_child().proc.pid

    # -- what our pulls use --------------------------------------------------
    @property
    def local_arena(self) -> tuple[int, int]:
        return self._pulling.live().base, self.arena_size

    @property
    def pulling_pid(self) -> int:
        return self._pulling.live().proc.pid

    def state(self) -> dict:
        """For `kvbm status`: each child, or that it is being replaced."""
        return {"serving": self._serving.state(), "pulling": self._pulling.state()}

    def _serving_child(self) -> Child:
        return self._serving.live()

    # -- calls ---------------------------------------------------------------
    def progress(self) -> None:
        """Nothing to do: the children drive their own transports."""

    def add_peer(self, metadata: bytes) -> Peer:
        body, generation = self._pulling.call("add_peer", {"metadata": metadata}, CALL_TIMEOUT_S)
        name = body.get("name")
        if not isinstance(name, str):
            raise TransportError("the NIXL agent named no peer")
        return Peer(name, generation)

    def knows(self, peer: Peer) -> bool:
        child = self._pulling.child
        return child is not None and child.generation == peer.generation

    def remove_peer(self, peer: Peer) -> None:
        if not self.knows(peer):
            return  # loaded in a child that has gone: nothing to unload
        try:
            self._pulling.call("remove_peer", {"name": peer.name}, CALL_TIMEOUT_S, peer.generation)
        except TransportError as e:
            log.info("peer not unloaded peer=%s error=%s", peer.name, e)

    def read(self, peer: Peer, local: np.ndarray, remote: np.ndarray, timeout: float) -> bool:
        """As `NixlAgent.read`; also False when the pulling child restarted
        since `peer` was loaded (its addresses are in `local_arena` as it is now)."""
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
        pulling = self._pulling
        if not pulling.lock.acquire(timeout=max(0.0, timeout)):
            return 0  # another read held the agent for all of our time
        try:
            child = pulling.live()
            if child.generation != peer.generation:
                return 0
            return self._read_chunks(child, peer, chunks, deadline, landed)
        except TransportError as e:
            log.info("read failed peer=%s error=%s", peer.name, e)
            return 0
        finally:
            pulling.lock.release()

    def _read_chunks(
        self,
        child: Child,
        peer: Peer,
        chunks: Sequence[tuple[np.ndarray, np.ndarray]],
        deadline: float,
        landed: Callable[[int], bool],
    ) -> int:
        pulling = self._pulling
        sent: collections.deque[int] = collections.deque()  # ids of READs not answered yet

        def send(i: int) -> None:
            local, remote = chunks[i]
            body = {
                "name": peer.name,
                "local": np.ascontiguousarray(local, np.uint64).tobytes(),
                "remote": np.ascontiguousarray(remote, np.uint64).tobytes(),
                "timeout": max(0.0, deadline - time.monotonic()),
            }
            msg_id = next(pulling.ids)
            child.channel.sendall(pulling.codec.encode(Message("read", msg_id, body)))
            sent.append(msg_id)

        def answer() -> bool:
            child.channel.settimeout(max(0.0, deadline - time.monotonic()) + READ_GRACE_S)
            reply = pulling.codec.recv(child.channel)
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
            pulling.end(child, f"read failed: {e!r}")
        return done

    def close(self) -> None:
        """Stop both children (their channels close: they unload and exit).
        Safe twice."""
        if self._arena_fd < 0:
            return
        self._serving.close()
        self._pulling.close()
        os.close(self._arena_fd)
        self._arena_fd = -1
