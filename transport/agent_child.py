"""The process a node's NIXL agent lives in (started by agent_process.py).

It maps the host arena and holds nothing else of value: no secret, no etcd
client, no engine state, none of the node's memory (it is a fresh
interpreter, not a fork). A peer that holds this agent's metadata can reach
this process's memory through UCX (on TCP and CMA the bounds check is the
reader's own), so that is all it can reach; a NIXL abort on damaged metadata
ends this process, and the node starts another.

    python -m transport.agent_child CHANNEL_FD ARENA_FD ARENA_BYTES NAME BACKEND PARENT_PID ROLE

ROLE `serve`: the agent whose metadata peers get. It maps the arena
read-only from a read-only descriptor (it refuses a writable one), so no
mapping of the arena in this process can be written, by a peer's WRITE or
by mprotect; it loads no peer and reads nothing. ROLE `pull`: the agent
that READs from peers into the arena, mapped read-write; its metadata is
never sent, not even to the node.

It answers one call at a time on its channel and, while idle, drives its
agent's transports (NIXL's progress thread is off: see nixl_agent.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import select
import signal
import socket
import sys

import numpy as np

from transport.agent import Peer
from transport.errors import TransportError
from transport.frames import Message, PlainCodec
from transport.nixl_agent import NixlAgent

log = logging.getLogger("transport.agent")
CALLS = ("ready", "add_peer", "remove_peer", "read", "ok", "error")
MAX_FRAME = 4 << 20  # a read of 4096 blocks is 128 KiB of addresses
# How often an idle agent drives its transports: a serving one often (a
# peer's first READ waits for it, and under TCP every READ does); a pulling
# one drives its own while it reads, so idle it only keeps its connections.
PROGRESS_S = {"serve": 0.002, "pull": 0.05}
_PR_SET_PDEATHSIG = 1
ROLES = tuple(PROGRESS_S)


def main(argv: list[str]) -> int:
    channel_fd, arena_fd, size = (int(a) for a in argv[:3])
    name, backend, parent, role = argv[3], argv[4], int(argv[5]), argv[6]
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    _die_with(parent)
    codec = PlainCodec(CALLS, MAX_FRAME)
    channel = socket.socket(fileno=channel_fd)
    try:
        address = _map(arena_fd, size, role)
        agent = NixlAgent(name, address, size, backend)
    except (OSError, ValueError, TransportError) as e:
        channel.sendall(codec.encode(Message("error", 0, {"error": str(e)})))
        return 1
    metadata = agent.metadata if role == "serve" else b""
    ready = {"metadata": metadata, "arena": address, "arena_bytes": size}
    channel.sendall(codec.encode(Message("ready", 0, ready)))
    try:
        serve(agent, channel, codec, role)
    finally:
        agent.close()
    return 0


_MAPPINGS: list[mmap.mmap] = []  # held for the life of the process


def _map(fd: int, size: int, role: str) -> int:
    """Map the arena (read-only to serve: from a read-only descriptor, so the
    mapping can never be made writable) and close its descriptor; the address."""
    try:
        if role not in ROLES:
            raise ValueError(f"{role!r} is not a role")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if role == "serve":
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                raise ValueError("a serving agent takes a read-only descriptor only")
            mapping = mmap.mmap(fd, size, flags, mmap.PROT_READ)
        else:
            mapping = mmap.mmap(fd, size, flags)
    finally:
        os.close(fd)
    _MAPPINGS.append(mapping)
    return np.frombuffer(mapping, dtype=np.uint8).ctypes.data


def serve(agent: NixlAgent, channel: socket.socket, codec: PlainCodec, role: str) -> None:
    """Calls until the node closes the channel (or dies: then so do we). Polled,
    not selected: the channel keeps the node's descriptor number, which a
    node with many peers has above select's 1024."""
    readable = select.poll()
    readable.register(channel, select.POLLIN)
    while True:
        if not readable.poll(PROGRESS_S[role] * 1000):
            agent.progress()
            continue
        try:
            msg = codec.recv(channel)
        except ConnectionError:
            return
        try:
            if role != "pull":
                raise ValueError(f"a {role} agent takes no {msg.call!r}")
            reply = Message("ok", msg.id, _call(agent, msg))
        except (TransportError, ValueError, KeyError, TypeError) as e:
            reply = Message("error", msg.id, {"error": str(e)})
        channel.sendall(codec.encode(reply))


def _call(agent: NixlAgent, msg: Message) -> dict:
    body = msg.body
    if msg.call == "add_peer":
        return {"name": agent.add_peer(body["metadata"]).name}
    if msg.call == "remove_peer":
        agent.remove_peer(Peer(body["name"]))
        return {}
    if msg.call == "read":
        local = np.frombuffer(body["local"], dtype=np.uint64).reshape(-1, 2)
        remote = np.frombuffer(body["remote"], dtype=np.uint64).reshape(-1, 2)
        base, size = agent.arena
        ends = local[:, 0] + local[:, 1]
        if len(local) and (local[:, 0].min() < base or ends.max() > base + size):
            raise ValueError("a local address outside the arena")
        return {"done": agent.read(Peer(body["name"]), local, remote, float(body["timeout"]))}
    raise ValueError(f"{msg.call!r} is not a call")


def _die_with(parent: int) -> None:
    """SIGKILL when the node dies, however it dies (and now, if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
