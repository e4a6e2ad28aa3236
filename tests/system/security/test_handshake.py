"""Issue 14, finding 2: a node's NIXL metadata went out in its first frame, in
clear, to whatever answered at a peer's address. Now both sides prove the
secret before any metadata moves, and it moves sealed. Against real node
processes: (1) a squatter on a dead node's address (its record still in the
index) receives a hello with a nonce, the caller's node id, layout and
protocol version and nothing else, and the node that called recomputes; (2)
a recorder between an honest client and a node sees neither side's metadata,
while the pull through it is bit-exact."""

from __future__ import annotations

import asyncio
import os
import signal

from kvbm.connector.attach import NodeAttachment
from kvbm.connector.direct import onboard
from tests.harness.peer_attacks import SECRET, recorded_pull, two_nodes, write_secret
from tests.harness.support import GEOMETRY, Engine
from transport.frames import FrameCodec
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import CALLS

BLOCKS = 8


async def squat(host: str, port: int, heard: list[bytes]) -> asyncio.Server:
    """A listener without the secret where a node used to be: it keeps what
    it hears and answers garbage."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 16), 5):
                heard.append(chunk)
                writer.write(b"\x00\x00\x00\x40" + os.urandom(64))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, port)


def test_a_squatter_on_a_dead_nodes_address_learns_no_metadata(etcd, daemons, tmp_path):
    with two_nodes(
        etcd, daemons, tmp_path, BLOCKS, "--lease-ttl", "10", b_flags=("--peer-timeout-ms", "1000")
    ) as n:
        n.eng_a.close()
        os.kill(n.a.proc.pid, signal.SIGKILL)  # its record lives on in B's mirror for the TTL
        n.a.proc.wait(10)
        heard: list[bytes] = []

        async def scenario() -> tuple[int, dict]:
            server = await squat(n.host, n.port, heard)
            try:
                got = Engine(BLOCKS)
                return await asyncio.to_thread(n.eng_b.load, got.kv, n.keys, list(range(BLOCKS)))
            finally:
                server.close()
                await server.wait_closed()

        loaded, sources = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert loaded == 0 and not sources.get("remote_host")  # B recomputes
        data = b"".join(heard)
        assert data, "B never called the squatter: the test proves nothing"
        # all it heard is one signed hello: a nonce, B's node id, the layout
        # and B's protocol version, no metadata
        first = FrameCodec(SECRET, CALLS).decode(data[4 : 4 + int.from_bytes(data[:4], "big")])
        said = {"nonce", "node", "fingerprints", "protocol"}
        assert first.call == "hello" and set(first.body) == said
        assert len(data) == 4 + int.from_bytes(data[:4], "big")


def test_a_recorder_on_the_wire_sees_no_metadata(etcd, daemons, make_manager, tmp_path):
    secret = write_secret(tmp_path / "secret")
    node = daemons("node-a", "127.0.0.2", "--etcd", etcd.endpoint, "--secret-file", secret)
    engine = NodeAttachment(node.socket, GEOMETRY)
    mgr = make_manager(host_slots=2 * BLOCKS)
    agent = NixlAgent("recorded", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    theirs: list[bytes] = []  # the node's metadata, as the client received it
    add_peer = agent.add_peer
    agent.add_peer = lambda metadata: (theirs.append(metadata), add_peer(metadata))[1]
    try:
        ks = engine.keys(list(range(BLOCKS)))
        made = Engine(BLOCKS)
        assert engine.store(made.kv, ks, made.compute(ks)) == BLOCKS
        host, port = engine.stats()["peer_address"].rsplit(":", 1)
        pulled, recorded = recorded_pull(host, int(port), agent, mgr, ks)
        assert pulled == ks  # pulled through it
        got = Engine(BLOCKS)
        assert onboard(mgr, got.kv, ks, list(range(BLOCKS))) == BLOCKS
        assert all(got.holds(k, i) for i, k in enumerate(ks))
        assert theirs and len(recorded) > 1000
        for metadata in (agent.metadata, theirs[0]):
            # not whole, and not in any 32-byte piece
            pieces = {metadata[i : i + 32] for i in range(0, len(metadata) - 32, 16)}
            assert not any(piece in recorded for piece in pieces)
    finally:
        agent.close()
        engine.close()
