"""Issue 30: a block key read from etcd or a peer's wire says nothing about
its prompt without the fleet secret. Version 1 keys were xxh3 of the token
ids under a public seed, so whoever read etcd could hash a known prompt and
see whether (and where) the fleet held it. Against real node processes and
a real etcd: the heads of a known prompt as version 1 made them, and as a
holder of another secret would make them, appear nowhere in etcd (keys and
values) or in a recorded peer session that pulled those very blocks; the
heads under the fleet's own key do appear in etcd, so the search can find
what is there."""

from __future__ import annotations

import asyncio
import struct

import aetcd
import xxhash

from kvbm.connector.attach import NodeAttachment
from kvbm.connector.direct import onboard
from kvbm.hashing import BlockHasher, HashKey
from tests.harness.node_daemon import until
from tests.harness.peer_attacks import recorded_pull, write_secret
from tests.harness.support import GEOMETRY, Engine
from transport.nixl_agent import NixlAgent

BLOCKS = 8
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOKENS = [(i * 7919) % 32000 for i in range(BLOCKS * GEOMETRY.block_size)]  # "a known prompt"


def v1_heads(tokens: list[int], block_size: int, model: str) -> list[bytes]:
    """Version 1's key heads of a prompt, written out: xxh3-64, chained,
    under a seed anyone could compute."""
    parts = [b"kvbm-salt-v1", model.encode(), b"", b""]
    seed = xxhash.xxh3_64_intdigest(b"".join(struct.pack("<I", len(p)) + p for p in parts))
    out, prev = [], None
    for i in range(0, len(tokens) - block_size + 1, block_size):
        block = struct.pack(f"<{block_size}I", *tokens[i : i + block_size])
        h = xxhash.xxh3_64_intdigest(block, seed=seed)
        prev = h if prev is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, h), seed)
        out.append(prev.to_bytes(8, "little"))
    return out


def heads_under(hasher: BlockHasher) -> list[bytes]:
    hashes = hasher.sequence_hashes(TOKENS, GEOMETRY.block_size, hasher.seed(MODEL))
    return [h.to_bytes(16, "little") for h in hashes]


async def etcd_contents(etcd) -> bytes:
    client = aetcd.Client(host=etcd.host, port=etcd.client_port)
    await client.connect()
    try:
        got = await client.get_all()
        return b"".join(kv.key + kv.value for kv in got)
    finally:
        await client.close()


def test_keys_in_etcd_and_on_the_wire_reveal_no_known_prompt(etcd, daemons, make_manager, tmp_path):
    secret = write_secret(tmp_path / "secret")
    node = daemons("node-a", "127.0.0.2", "--etcd", etcd.endpoint, "--secret-file", secret)
    engine = NodeAttachment(node.socket, GEOMETRY)
    mgr = make_manager(host_slots=2 * BLOCKS)
    agent = NixlAgent("recorder", mgr.host.arena.array.ctypes.data, mgr.host.arena.size)
    try:
        fleet_heads = heads_under(engine.hasher)
        ks = engine.keys([int.from_bytes(h, "little") for h in fleet_heads])
        made = Engine(BLOCKS)
        assert engine.store(made.kv, ks, made.compute(ks)) == BLOCKS
        # published: the fleet's own heads are in etcd (the search finds what is there)
        until(
            lambda: all(h in asyncio.run(etcd_contents(etcd)) for h in fleet_heads),
            15,
            "the node never published the prompt's blocks",
        )
        host, port = engine.stats()["peer_address"].rsplit(":", 1)
        pulled, recorded = recorded_pull(host, int(port), agent, mgr, ks)
        assert pulled == ks  # the blocks crossed the recorder
        got = Engine(BLOCKS)
        assert onboard(mgr, got.kv, ks, list(range(BLOCKS))) == BLOCKS
        assert all(got.holds(k, i) for i, k in enumerate(ks))

        in_etcd = asyncio.run(etcd_contents(etcd))
        assert len(recorded) > 1000
        other = BlockHasher(HashKey.derive(b"a secret that is not the fleet's"))
        guesses = {
            "version 1": v1_heads(TOKENS, GEOMETRY.block_size, MODEL),
            "another secret": heads_under(other),
            "another secret, first 8 bytes": [h[:8] for h in heads_under(other)],
        }
        for what, heads in guesses.items():
            assert not any(h in in_etcd for h in heads), f"{what}: a head found in etcd"
            assert not any(h in recorded for h in heads), f"{what}: a head found on the wire"
        # sealed: not even the fleet's own heads cross the wire in clear
        assert not any(h in recorded for h in fleet_heads)
    finally:
        agent.close()
        engine.close()
