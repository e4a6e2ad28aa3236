"""Protocol versions at each hello (kvbm/versions.py), this release against
versions it acts: the peer RPC's handshake between real tiers and NIXL
agents in this process, and the engine socket of a real `kvbm node`. One
version apart, either way, they talk (a pull arrives bit-exact); further
apart, the side that refuses says both versions, and the other is told.
(The previous release itself, built from git: test_version_skew.py.)"""

from __future__ import annotations

import asyncio

import pytest

from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.engine_wire import EngineLink, geometry_to_wire
from kvbm.hashing import HASH_VERSION
from kvbm.peer_blocks import ManagerBlocks
from kvbm.versions import Compatibility
from tests.harness import versioned_node
from tests.harness.support import GEOMETRY, keys, store
from transport.errors import TransportError, VersionError
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient, PeerServer, pull

SECRET = b"k" * 32
V = Compatibility  # a side at version V(n): the rule of this release from n


def agent_for(mgr, name: str) -> NixlAgent:
    return NixlAgent(name, mgr.host.arena.array.ctypes.data, mgr.host.arena.size)


async def handshake(a, b, server_v: V | None, client_v: V | None, secret: bytes = SECRET):
    """Node B (client at `client_v`) pulls A's first two blocks from node A
    (server at `server_v`; None: a side that says no version, as the
    previous release). Returns (what arrived, the client's view of the
    server's version), or raises what the client's connect raised."""
    agent_a, agent_b = agent_for(a, "node-a"), agent_for(b, "node-b")
    server = PeerServer(ManagerBlocks(a), agent_a, SECRET, node_id="node-a", versions=server_v)
    port = await server.start("127.0.0.1", 0)
    client = PeerClient(agent_b, secret, [a.geometry.fingerprint], "node-b", versions=client_v)
    try:
        await client.connect("127.0.0.1", port, timeout=5)
        return await pull(client, keys(0, 2), ManagerBlocks(b)), client.remote_protocol
    finally:
        await client.close()
        await server.close()
        agent_a.close()
        agent_b.close()


@pytest.mark.parametrize(
    ("server_v", "client_v", "heard"),
    [
        (V(2), V(2), 2),
        (V(2), None, 2),  # a client of the previous release (no version said)
        (None, V(2), None),  # a server of the previous release
        (V(3), V(2), 3),  # the next release serves this one
        (V(2), V(3), 2),
    ],
)
def test_peers_one_version_apart_pull_bit_exact(make_manager, server_v, client_v, heard):
    a, b = make_manager(host_slots=8), make_manager(host_slots=8)
    assert store(a, keys(0, 2)) == 2
    arrived, said = asyncio.run(asyncio.wait_for(handshake(a, b, server_v, client_v), 60))
    assert arrived == keys(0, 2) and said == heard


@pytest.mark.parametrize(
    ("server_v", "client_v", "words"),
    [
        # the server refuses, and tells the client (signed, with its proof)
        (V(2), V(4), "the peer refused us: peer node-b speaks kvbm protocol 4, node node-a 2"),
        (V(4), None, "the peer refused us: peer node-b speaks kvbm protocol 1, node node-a 4"),
        # a server that would talk (a wider window), refused by the client
        (V(4, window=3), V(2), "peer node-a speaks kvbm protocol 4, node node-b 2"),
    ],
)
def test_peers_further_apart_are_refused_naming_both_versions(
    make_manager, caplog, server_v, client_v, words
):
    a, b = make_manager(host_slots=8), make_manager(host_slots=8)
    assert store(a, keys(0, 2)) == 2
    with pytest.raises(VersionError) as refused:
        asyncio.run(asyncio.wait_for(handshake(a, b, server_v, client_v), 60))
    assert words in str(refused.value), str(refused.value)
    assert b.lookup(keys(0, 2)).num_blocks == 0  # nothing arrived: B's engine recomputes
    if server_v is not None and client_v is not None and server_v.window == 1:
        assert "closing peer connection" in caplog.text and words.split(": ")[1] in caplog.text


def test_a_version_opens_nothing_without_the_secret(make_manager):
    # Whatever version a client says (the oldest included), it goes through
    # the one handshake: without the secret the server hangs up on its hello.
    a, b = make_manager(host_slots=8), make_manager(host_slots=8)
    for said in (None, V(1), V(2)):
        with pytest.raises(TransportError, match="hung up during the handshake"):
            asyncio.run(asyncio.wait_for(handshake(a, b, V(2), said, secret=b"w" * 32), 60))


def hello(link: EngineLink, protocol: object) -> dict:
    """An engine's hello as this release sends it, saying `protocol`
    (absent: as the previous release, which says none)."""
    body = {
        "geometry": geometry_to_wire(GEOMETRY),
        "engine": "pid-test",
        "hash": {"version": HASH_VERSION},
    }
    if protocol != "absent":
        body["protocol"] = protocol
    return link.call("hello", body)


def test_the_engine_socket_talks_to_engines_a_version_apart_and_names_both_otherwise(daemons):
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2")
    for said in ("absent", 1, 2, 3):
        link = EngineLink(node.socket)
        try:
            assert hello(link, said)["protocol"] == 2
        finally:
            link.close()
    for said, words in [
        (4, "the engine speaks kvbm protocol 4, node solo 2"),
        (0, "the engine speaks kvbm protocol 0, node solo 2"),
        ("2", "the engine sends '2' for its kvbm protocol version; node solo speaks 2"),
        (True, "the engine sends True"),
    ]:
        link = EngineLink(node.socket)
        try:
            with pytest.raises(NodeError, match="hello: ") as refused:
                hello(link, said)
            assert words in str(refused.value)
        finally:
            link.close()
    assert node.log().count("refusing an engine") == 4  # each version once
    # the attachment an engine's connector makes: refused, a NodeError the
    # connector turns into "not cached" (the engine recomputes)
    with pytest.raises(NodeError, match=r"protocol 4, node solo 2: .* upgrade node solo"):
        NodeAttachment(node.socket, GEOMETRY, versions=V(4))
    one_ahead = NodeAttachment(node.socket, GEOMETRY, versions=V(3))
    try:
        assert one_ahead.protocol == 2  # the two speak the older one's wire
    finally:
        one_ahead.close()


def test_an_engine_refuses_a_node_whose_version_it_does_not_talk_to(daemons):
    # a node at 4 that would talk to this engine (a wider window): the engine refuses it
    command = (*versioned_node.COMMAND, "4", "--acting-window", "3")
    node = daemons("ahead", "127.0.0.2", "--host-cache-mb", "2", command=command)
    with pytest.raises(NodeError, match="the node speaks kvbm protocol 4, this engine 2"):
        NodeAttachment(node.socket, GEOMETRY)
    acting = NodeAttachment(node.socket, GEOMETRY, versions=V(4))  # one of its own version
    try:
        assert acting.protocol == 4
    finally:
        acting.close()
