"""Issue 30: two different 32-token blocks whose version 1 keys were equal
(a pair found by a collision search in CPU minutes, tests/unit/golden/
xxh3_collision.json). After a shared prefix, the second tenant's block
loaded the first tenant's KV. Against a real node: tenant 1 stores prefix +
block a; tenant 2's prompt, prefix + block b, finds and loads only the
prefix, never a's KV (with version 1 keys, all three blocks would load)."""

from __future__ import annotations

import json

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.support import GEOMETRY, Engine
from tests.unit.test_hashing import COLLISION, v1_block_hash

PAIR = json.loads(COLLISION.read_text())


def test_a_version_1_collision_never_loads_the_other_tenants_block(daemons):
    a, b = PAIR["a"], PAIR["b"]
    assert GEOMETRY.block_size == PAIR["block_size"] == 32
    assert v1_block_hash(a, PAIR["model_id"]) == v1_block_hash(b, PAIR["model_id"])
    node = daemons("node-a", "127.0.0.2")
    engine = NodeAttachment(node.socket, GEOMETRY)
    try:
        hasher = engine.hasher
        seed = hasher.seed(PAIR["model_id"])
        prefix = list(range(100, 164))  # two blocks both tenants share
        first = engine.keys(hasher.sequence_hashes(prefix + a, 32, seed))
        second = engine.keys(hasher.sequence_hashes(prefix + b, 32, seed))
        assert first[:2] == second[:2] and first[2] != second[2]
        made = Engine(3)
        assert engine.store(made.kv, first, made.compute(first)) == 3
        assert engine.lookup(first, ask_node=True) == Available(3)
        assert engine.lookup(second, ask_node=True) == Available(2)
        assert engine.lookup(second) == Available(2)  # the key view agrees
        got = Engine(3)
        loaded, _ = engine.load(got.kv, second, [0, 1, 2])
        assert loaded == 2
        assert got.holds(second[0], 0) and got.holds(second[1], 1)
        assert not got.holds(first[2], 2)  # block 2 was left to recompute
    finally:
        engine.close()
