"""The connector with real vLLM (CPU build), a random tiny Llama built here, a
real etcd and two `kvbm node` daemons on 127.0.0.2 and 127.0.0.3.

Engine 1 on node A computes three prompts (its outputs are the recompute
reference). The second prompt is then pushed out of A's host tier to A's
disk. Engine 2 on node B gets the first prompt's prefix from A's host tier and
the second's from A's disk tier, and its greedy outputs equal the reference.
Negative control: B holds wrong KV under the third prompt's keys, and engine
2's output for it changes, so the loaded KV is really what vLLM uses.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvbm.connector.attach import Available, NodeAttachment
from kvbm.hashing import salt_hash, sequence_hashes
from kvbm.layout import ModelGeometry
from tests.node_daemon import until
from tests.support import Engine
from tests.tiny_llama import build

BLOCK = 32
# what vLLM makes of tests/tiny_llama.py: 2 layers, 2 KV heads of 32, fp32
GEOMETRY = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=32, block_size=BLOCK)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build(str(tmp_path_factory.mktemp("tiny-llama")))


def prompt(seed: int, n: int = 3 * BLOCK + 4) -> list[int]:
    return [4 + (seed * 131 + i * 37) % 500 for i in range(n)]


def run_engine(model: str, prompts: list[list[int]], socket: str, remote: str = "") -> list:
    out = subprocess.run(
        [sys.executable, "-m", "tests.vllm_engine", model, json.dumps(prompts), socket, remote],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"outputs"')]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(lines[-1])["outputs"]


def test_an_engine_on_node_b_gets_a_prefix_from_node_a_host_then_disk(
    model, etcd, daemons, tmp_path
):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--disk-admit-min-uses", "1"]
    disk = ["--disk-cache-dir", str(tmp_path / "a-disk"), "--disk-cache-mb", "8"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "1", *disk)
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    p1, p2, p3 = prompt(1), prompt(2), prompt(3)
    usable = (len(p1) - 1) // BLOCK  # vLLM always computes the last prompt token

    reference = run_engine(model, [p1, p2, p3], a.socket)

    salt = salt_hash(model)
    on_a = NodeAttachment(a.socket, GEOMETRY)
    on_b = NodeAttachment(b.socket, GEOMETRY, remote=["host", "disk"])
    try:
        k1, k2, k3 = (on_a.keys(sequence_hashes(p, BLOCK, salt)[:usable]) for p in (p1, p2, p3))
        for ks in (k1, k2, k3):
            assert on_a.lookup(ks).local == usable, "engine 1 saved its prompts"
        # Push p2 (and p3) out to A's disk, keeping p1 in A's host tier: use
        # p1 last, then store filler until only p1 is left of them.
        assert on_a.load(Engine(usable, GEOMETRY).kv, k1, list(range(usable)))[0] == usable
        filler = on_a.keys(list(range(10**6, 10**6 + on_a.num_slots - usable)))
        fill = Engine(len(filler), GEOMETRY)
        on_a.store(fill.kv, filler, fill.compute(filler))
        until(lambda: on_b.lookup(k1) == Available(0, usable, 0), 10, "p1 not in A's host")
        until(lambda: on_b.lookup(k2) == Available(0, 0, usable), 10, "p2 not on A's disk")
        # negative control: B holds wrong KV under p3's keys
        wrong = Engine(usable, GEOMETRY)
        assert on_b.store(wrong.kv, k3, wrong.compute(k3)) == usable
    finally:
        on_a.close()

    try:
        served = run_engine(model, [p1, p2, p3], b.socket, "host,disk")
        counted = on_b.stats()["engine_blocks"]
    finally:
        on_b.close()
    assert served[0] == reference[0], "prefix from A's host tier"
    assert served[1] == reference[1], "prefix from A's disk tier"
    assert counted["remote_host"] == usable and counted["remote_disk"] == usable
    assert counted["local_host"] == usable  # the wrong KV was loaded ...
    assert served[2] != reference[2], "... and used: the output changed"
