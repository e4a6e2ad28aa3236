"""A hostile peer that holds the fleet's secret (a stolen key, a buggy build)
against a real `kvbm node`: absurd counts and sizes, a second hello, replayed
and stale frames, a pin flood from several identities, a connection flood.
Each attack ends that peer's connection (or its request) with a logged
reason; the node's memory stays flat, its own engine keeps storing, and a
well-behaved peer still pulls bit-exact blocks from it afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
import time

import msgpack
import numpy as np
import pytest

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.node_daemon import until
from tests.harness.peer_attacks import hello, raw_session, rss_mb
from tests.harness.support import GEOMETRY, Engine
from transport.errors import TransportError
from transport.frames import MAX_ITEMS, NONCE_BYTES, Message
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import MAX_KEYS_PER_PIN, MAX_UNAUTHENTICATED_PER_ADDRESS, PeerClient

SECRET = b"0123456789abcdef0123456789abcdef"
HOST_MB = 4  # 256 blocks of 16 KiB: a peer may pin 64, all peers 128
BLOCKS = 100


def signed(payload: bytes) -> bytes:
    """A frame around any payload, with a valid HMAC: only the content is hostile."""
    mac = hmac.new(SECRET, payload, hashlib.sha256).digest()
    return struct.pack(">I", len(mac) + len(payload)) + mac + payload


class Hostile:
    """Peer identities of the attacker: each a NIXL agent of its own (names must
    differ, or they would be one peer to the node)."""

    def __init__(self) -> None:
        self.memory = np.zeros(1 << 20, dtype=np.uint8)
        self.agents: list[NixlAgent] = []

    def agent(self) -> NixlAgent:
        a = NixlAgent(f"hostile-{len(self.agents)}", self.memory.ctypes.data, self.memory.size)
        self.agents.append(a)
        return a

    async def client(self, host: str, port: int) -> PeerClient:
        c = PeerClient(self.agent(), SECRET, [GEOMETRY.fingerprint])
        await c.connect(host, port)
        return c

    def close(self) -> None:
        for a in self.agents:
            a.close()


async def hung_up(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """Whether the node closes the connection within `timeout` (reads to
    EOF, skipping any reply)."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            while await reader.read(1 << 16):
                pass
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


@pytest.fixture
def secret_file(tmp_path) -> str:
    path = tmp_path / "peer-secret"
    path.write_bytes(SECRET)
    path.chmod(0o400)
    return str(path)


def test_a_hostile_peer_with_the_key_gets_nothing_and_takes_nothing(
    etcd, daemons, secret_file, caplog
):
    common = ["--etcd", etcd.endpoint, "--secret-file", secret_file, "--host-cache-mb"]
    a = daemons("node-a", "127.0.0.2", *common, str(HOST_MB))
    b = daemons("node-b", "127.0.0.3", *common, str(HOST_MB))
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    hostile = Hostile()
    try:
        ks = eng_a.keys(list(range(1000, 1000 + BLOCKS)))
        made = Engine(BLOCKS)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == BLOCKS
        stats = eng_a.stats()
        assert stats["tiers"]["host"]["capacity"] == 256
        host, port = stats["peer_address"].rsplit(":", 1)
        wire = list(ks)
        rss_before = rss_mb(a.proc.pid)

        async def attacks() -> None:
            p = int(port)
            # 1. absurd counts and sizes in calls: each costs the attacker its connection
            for body in (
                {"keys": wire * (MAX_KEYS_PER_PIN // BLOCKS + 1)},  # too many keys
                {"keys": [b"k" * 100_000]},  # an absurd key
                {"keys": [b"\x01not-a-block-key"]},
                {"keys": 2**62},
            ):
                c = await hostile.client(host, p)
                with pytest.raises(TransportError):
                    await c.call("pin", body, 10)
                await c.close()
            # 2. frames whose msgpack headers announce absurd sizes, validly signed
            for payload in (
                b"\xdd" + struct.pack(">I", 2**32 - 1),  # array of 4 billion items
                b"\xdd\x00\x0f\xff\xff" * 1000,  # nested arrays of a million items each
                b"\xdf" + struct.pack(">I", 2**32 - 1),  # map of 4 billion entries
                b"\xdb" + struct.pack(">I", 2**32 - 1),  # string of 4 GiB
                msgpack.packb([0] * (MAX_ITEMS + 1)),
            ):
                reader, writer, session, _ = await raw_session(host, p)
                writer.write(session.seal(payload))
                await writer.drain()
                assert await hung_up(reader)
                writer.close()
            # 3. a length prefix of 4 GiB: refused before anything is read or allocated
            reader, writer, _, _ = await raw_session(host, p)
            writer.write(struct.pack(">I", 2**32 - 1) + b"x" * 64)
            await writer.drain()
            assert await hung_up(reader)
            # 4. a second hello, and a sealed frame sent twice, in a session
            reader, writer, session, _ = await raw_session(host, p)
            writer.write(session.encode(Message("hello", 2, {})))
            await writer.drain()
            assert await hung_up(reader)
            reader, writer, session, _ = await raw_session(host, p)
            sealed = session.encode(Message("unpin", 2, {"keys": wire[:1]}))
            writer.write(sealed + sealed)  # the second copy does not open: a replay
            await writer.drain()
            assert await hung_up(reader)
            # a stale hello, one of an unknown version, a hello replayed on another connection
            for bad in (
                hello(ts=time.time() - 3600),
                signed(
                    msgpack.packb(
                        {
                            "v": 99,
                            "call": "hello",
                            "id": 1,
                            "ts": time.time(),
                            "nonce": os.urandom(NONCE_BYTES),
                            "body": {},
                        }
                    )
                ),
            ):
                reader, writer = await asyncio.open_connection(host, p)
                writer.write(bad)
                await writer.drain()
                assert await hung_up(reader)
            captured = hello()
            reader, writer = await asyncio.open_connection(host, p)
            writer.write(captured)  # the first time it is answered
            await writer.drain()
            n = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 10))[0]
            await reader.readexactly(n)
            reader, writer = await asyncio.open_connection(host, p)
            writer.write(captured)  # replayed on another connection
            await writer.drain()
            assert await hung_up(reader)
            # 5. a pin flood from three identities: a quarter of the arena each,
            # half of it in all, whatever they ask
            flood = [await hostile.client(host, p) for _ in range(3)]
            got = [len((await c.call("pin", {"keys": wire}, 10))["blocks"]) for c in flood]
            assert got == [64, 64, 0], got
            assert eng_a.stats()["pinned_for_peers"] == 128
            # ... and the node's own engine still finds room to store
            fresh = eng_a.keys(list(range(5000, 5064)))
            mine = Engine(64)
            assert await asyncio.to_thread(eng_a.store, mine.kv, fresh, mine.compute(fresh)) == 64
            for c in flood:
                await c.close()
            # 6. a connection flood from one address: beyond the cap on connections
            # before hello, each is refused at once; those within it stay open
            cap = MAX_UNAUTHENTICATED_PER_ADDRESS
            conns = [await asyncio.open_connection(host, p) for _ in range(cap + 8)]
            closed = await asyncio.gather(*(hung_up(r, 2.0) for r, _ in conns))
            assert list(closed) == [False] * cap + [True] * 8, closed
            for _, w in conns:
                w.close()

        asyncio.run(asyncio.wait_for(attacks(), 120))
        # the flood's pins were released with the connections' unpins or expire
        until(lambda: eng_a.stats()["pinned_for_peers"] == 0, 20, "flood pins were kept")
        assert rss_mb(a.proc.pid) - rss_before < 50
        log = a.log()
        for reason in ("bad key list", "hello must come first", "stale", "replay", "version"):
            assert reason in log, reason
        assert "exceeds" in log and "more than" in log
        # the node kept serving: a well-behaved peer gets the blocks bit-exact
        until(lambda: eng_b.lookup(ks) == Available(0, BLOCKS), 10, "B never saw A's blocks")
        got = Engine(BLOCKS)
        loaded, sources = eng_b.load(got.kv, ks, list(range(BLOCKS)))
        assert loaded == BLOCKS and sources["remote_host"] == BLOCKS
        assert all(got.holds(k, i) for i, k in enumerate(ks))
    finally:
        eng_a.close()
        eng_b.close()
        hostile.close()
