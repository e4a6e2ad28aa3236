"""What the security tests share: nodes with a known secret (one alone, or a
pair on one etcd where A holds a prompt B has seen), reached as a peer would
reach them, with frames built by hand (so only what the test means to be
hostile is)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from kvbm.connector.attach import Available, NodeAttachment
from kvbm.peer_blocks import ManagerBlocks
from tests.harness.node_daemon import Daemon, until
from tests.harness.support import GEOMETRY, Engine
from transport.frames import (
    HANDSHAKE_NONCE_BYTES,
    NONCE_BYTES,
    FrameCodec,
    Message,
    SessionCodec,
    session_keys,
)
from transport.peer_rpc import CALLS, PeerClient, pull

SECRET = b"0123456789abcdef0123456789abcdef"


def agent_pid(node_pid: int, role: str = "serve") -> int | None:
    """The pid of a node's NIXL agent process of `role` (`serve`: the one
    peers reach; `pull`: the one its pulls land through); None while it is
    being replaced."""
    kids = []
    for task in os.listdir(f"/proc/{node_pid}/task"):
        with open(f"/proc/{node_pid}/task/{task}/children") as f:
            for pid in f.read().split():
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as g:
                    if g.read().split(b"\0")[-2:-1] == [role.encode()]:
                        kids.append(int(pid))
    assert len(kids) <= 1, kids
    return kids.pop() if kids else None


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@dataclass
class Pair:
    """Two nodes: A holds `keys` in its host tier, and B (its engine allowed
    remote host tiers) has seen them in the index."""

    a: Daemon
    b: Daemon
    eng_a: NodeAttachment
    eng_b: NodeAttachment
    keys: list[bytes]
    host: str  # A's peer RPC
    port: int


@contextlib.contextmanager
def two_nodes(
    etcd, daemons, tmp_path, blocks: int, *flags: str, b_flags: tuple[str, ...] = ()
) -> Iterator[Pair]:
    """node-a on 127.0.0.2 and node-b on 127.0.0.3, on `etcd` with one secret;
    their engines are closed afterwards (the daemons by the fixture)."""
    common = ["--etcd", etcd.endpoint, "--secret-file", write_secret(tmp_path / "secret")]
    a = daemons("node-a", "127.0.0.2", *common, *flags)
    b = daemons("node-b", "127.0.0.3", *common, *flags, *b_flags)
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        ks = eng_a.keys(list(range(blocks)))
        made = Engine(blocks)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == blocks
        host, port = eng_a.stats()["peer_address"].rsplit(":", 1)
        until(lambda: eng_b.lookup(ks) == Available(0, blocks), 10, "B never saw A's blocks")
        yield Pair(a, b, eng_a, eng_b, ks, host, int(port))
    finally:
        eng_a.close()
        eng_b.close()


def write_secret(path, mode: int = 0o400) -> str:
    path.write_bytes(SECRET)
    path.chmod(mode)
    return str(path)


def frame(call: str, body: object, ts: float | None = None, secret: bytes = SECRET) -> bytes:
    """A frame signed with `secret`, every field as given."""
    fields = {"v": 1, "call": call, "id": 1, "ts": time.time() if ts is None else ts}
    fields |= {"nonce": os.urandom(NONCE_BYTES), "body": body}
    payload = msgpack.packb(fields, use_bin_type=True)
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return struct.pack(">I", len(mac) + len(payload)) + mac + payload


def serving(daemon) -> tuple[str, int, NodeAttachment]:
    """Attach an engine (which makes the node build its tiers and open its peer
    port); the port, and the engine (the caller closes it)."""
    engine = NodeAttachment(daemon.socket, GEOMETRY)
    host, port = engine.stats()["peer_address"].rsplit(":", 1)
    return host, int(port), engine


async def answer(host: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection; what the node sends back before it
    closes the connection (b"" when it hangs up without a word)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        got = b""
        while chunk := await asyncio.wait_for(reader.read(1 << 16), timeout):
            got += chunk
            if len(got) >= 4 and len(got) >= 4 + struct.unpack(">I", got[:4])[0]:
                break  # one whole reply frame
        return got
    finally:
        writer.close()


def hello(nonce: bytes | None = None, **fields: object) -> bytes:
    """A client's first frame, as the handshake wants it (fields override)."""
    body = {
        "nonce": nonce or os.urandom(HANDSHAKE_NONCE_BYTES),
        "fingerprints": [GEOMETRY.fingerprint],
        "node": "attacker",
    }
    return frame("hello", body, **fields)  # type: ignore[arg-type]


async def raw_session(
    host: str, port: int, secret: bytes = SECRET
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, SessionCodec, dict]:
    """A hand-driven handshake, through `auth`: a connection whose later frames
    the node judges, the session that seals them (any payload: `seal`), and
    the node's answer to `auth` (its NIXL metadata and arena)."""
    reader, writer = await asyncio.open_connection(host, port)
    nonce = os.urandom(HANDSHAKE_NONCE_BYTES)
    writer.write(hello(nonce))
    await writer.drain()
    n = struct.unpack(">I", await reader.readexactly(4))[0]
    reply = FrameCodec(secret, CALLS).decode(await reader.readexactly(n))
    to_server, to_client = session_keys(secret, nonce, reply.body["nonce"])
    session = SessionCodec(to_server, to_client, CALLS)
    writer.write(session.encode(Message("auth", 1, {})))
    await writer.drain()
    reply = await session.read(reader)
    return reader, writer, session, reply.body


def recorded_pull(
    host: str, port: int, agent, mgr, keys: list[bytes], secret: bytes = SECRET
) -> tuple[list[bytes], bytes]:
    """Pull `keys` from the node at host:port into `mgr` through a man in
    the middle on 127.0.0.4 that records both directions and passes them on:
    (the keys pulled, every byte that crossed it)."""
    wire: list[bytes] = []

    async def relay(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, port)

        async def pump(src, dst) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(1 << 16):
                    wire.append(chunk)
                    dst.write(chunk)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def session() -> list[bytes]:
        proxy = await asyncio.start_server(relay, "127.0.0.4", 0)
        client = PeerClient(agent, secret, [GEOMETRY.fingerprint])
        try:
            await client.connect("127.0.0.4", proxy.sockets[0].getsockname()[1], 10)
            return await pull(client, keys, ManagerBlocks(mgr), timeout=20)
        finally:
            await client.close()
            proxy.close()

    pulled = asyncio.run(asyncio.wait_for(session(), 60))
    return pulled, b"".join(wire)
