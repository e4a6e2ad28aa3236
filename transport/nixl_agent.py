"""The node's NIXL agent: one per node, UCX with the progress thread off (it
costs 2-3x on small machines; polling a transfer drives it), the host arena
registered once as DRAM, and batched READs polled to completion under a
deadline. NIXL types never leave this module: callers pass addresses.

A node does not run this in its own process: its agents are confined to
children that map the arena and nothing else, the one peers reach read-only
(confined_agent.py, agent_child.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from transport.agent import Peer
from transport.errors import TransportError

try:  # the `nixl` meta package where installed, else NIXL's CPU/CUDA 12 build itself
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    from nixl_cu12._api import nixl_agent, nixl_agent_config


class NixlAgent:
    """Owns the NIXL agent and the arena's registration; `close()` is safe twice.

    Invariants: a transfer handle never outlives the `read` that made it, so a
    peer that dies mid-transfer costs one timeout, never a leaked handle; one
    thread at a time drives the agent (`_lock`): a UCX worker is not
    thread-safe, and a node reads in worker threads while its event loop
    serves peers.
    """

    drives_itself = False
    generation = 0  # never restarts

    def __init__(self, name: str, arena_addr: int, arena_size: int, backend: str = "UCX") -> None:
        if arena_size <= 0:
            raise ValueError("arena_size must be positive")
        self.name = name
        self.backend = backend
        self.arena = (arena_addr, arena_size)
        try:
            config = nixl_agent_config(enable_prog_thread=False, backends=[backend])
            self._agent: Any = nixl_agent(name, config)
            self._reg = self._agent.register_memory([(arena_addr, arena_size, 0, "")], "DRAM")
        except Exception as e:
            raise TransportError(f"cannot start NIXL agent {name!r} ({backend}): {e}") from e
        self._peers: dict[str, int] = {}  # remote agent -> holders (client and server sides)
        self._lock = threading.Lock()

    @property
    def local_arena(self) -> tuple[int, int]:
        """The same arena: one agent here both serves and pulls."""
        return self.arena

    @property
    def metadata(self) -> bytes:
        """What a peer needs to read from this node (sent in the RPC hello)."""
        return self._agent.get_agent_metadata()

    def progress(self) -> None:
        """Drive this agent's transports once. With the progress thread off, a
        node serving reads must call this often (its RPC server's loop does):
        a peer's first READ needs this side to complete the connection.
        Skipped while a read runs: its polling drives the agent meanwhile."""
        if self._lock.acquire(blocking=False):
            try:
                self._agent.get_new_notifs()
            finally:
                self._lock.release()

    def add_peer(self, metadata: bytes) -> Peer:
        """Load a peer's metadata; each add is matched by one `remove_peer`."""
        try:
            with self._lock:
                name = self._agent.add_remote_agent(metadata)
        except Exception as e:
            raise TransportError(f"bad NIXL metadata from a peer: {e}") from e
        name = name.decode() if isinstance(name, bytes) else name
        self._peers[name] = self._peers.get(name, 0) + 1
        return Peer(name)

    def knows(self, peer: Peer) -> bool:
        return peer.name in self._peers

    def remove_peer(self, peer: Peer) -> None:
        """The remote agent is unloaded when its last holder removes it."""
        name = peer.name
        held = self._peers.get(name, 0)
        if held > 1:
            self._peers[name] = held - 1
        elif held == 1:
            del self._peers[name]
            with self._lock:
                self._agent.remove_remote_agent(name)

    def read(self, peer: Peer, local: np.ndarray, remote: np.ndarray, timeout: float) -> bool:
        """One batched READ: row i copies `remote[i] = (addr, len)` on `peer` into
        `local[i] = (addr, len)` here. True once every byte has landed; False on
        any error or when `timeout` seconds pass (the bytes may then be partial:
        the caller must not use them)."""
        if peer.name not in self._peers:
            raise ValueError(f"unknown peer {peer.name!r}")
        if local.shape != remote.shape or local.ndim != 2 or local.shape[1] != 2:
            raise ValueError("local and remote must both be (n, 2) arrays of (addr, len)")
        if not np.array_equal(local[:, 1], remote[:, 1]):
            raise ValueError("local and remote lengths differ")
        if len(local) == 0:
            return True
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            return False  # another read held the agent for all of our time
        try:
            return self._read_locked(peer.name, local, remote, deadline)
        finally:
            self._lock.release()

    def read_chunks(
        self,
        peer: Peer,
        chunks: Sequence[tuple[np.ndarray, np.ndarray]],
        timeout: float,
        landed: Callable[[int], bool],
    ) -> int:
        """READ each (local, remote) chunk in turn, calling `landed(i)` once
        chunk i's bytes are all here (it returns False to stop). Returns how
        many chunks landed; a chunk that fails or times out ends the reads."""
        deadline = time.monotonic() + timeout
        for i, (local, remote) in enumerate(chunks):
            if not self.read(peer, local, remote, max(0.0, deadline - time.monotonic())):
                return i
            if not landed(i):
                return i + 1
        return len(chunks)

    def _read_locked(
        self, peer: str, local: np.ndarray, remote: np.ndarray, deadline: float
    ) -> bool:
        zeros = np.zeros((len(local), 1), dtype=np.uint64)
        handle = None
        try:
            ldesc = self._agent.get_xfer_descs(np.hstack([local.astype(np.uint64), zeros]), "DRAM")
            rdesc = self._agent.get_xfer_descs(np.hstack([remote.astype(np.uint64), zeros]), "DRAM")
            handle = self._agent.initialize_xfer("READ", ldesc, rdesc, peer)
            state = self._agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    return False
                state = self._agent.check_xfer_state(handle)
            return state == "DONE"
        except Exception:
            return False
        finally:
            if handle is not None:
                # A transfer to a dead peer may refuse release; the agent owns it then.
                with contextlib.suppress(Exception):
                    self._agent.release_xfer_handle(handle)

    def close(self) -> None:
        if self._agent is None:
            return
        for name in list(self._peers):
            self._peers[name] = 1
            self.remove_peer(Peer(name))
        try:
            with self._lock:
                self._agent.deregister_memory(self._reg)
        finally:
            self._agent = None
