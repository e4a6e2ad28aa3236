"""The connector with real vLLM (CPU build), a random tiny Llama built here, a
real etcd and two `kvbm node` daemons on 127.0.0.2 and 127.0.0.3.

Engine 1 on node A computes three prompts (its outputs are the recompute
reference). The second prompt is then pushed out of A's host tier to A's
disk. Engine 2 on node B gets the first prompt's prefix from A's host tier and
the second's from A's disk tier, and its greedy outputs equal the reference.
Negative control: B holds wrong KV under the third prompt's keys, and engine
2's output for it changes, so the loaded KV is really what vLLM uses. Then
async copies under preemption, and an engine outliving its node, each
answering as vLLM alone.

These are the tests that prove outputs, each engine a process of its own
(forked by tests/harness/engine_forks.py), its scheduler and worker apart
as vLLM's default has them. The scheduler side's cases (promises, holds after a failed
load, preemption, aborts, generated blocks, vLLM's prefix cache) are tested
in seconds in tests/integration/test_vllm_scheduler.py, with vLLM's real scheduler.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest

from kvbm.connector.attach import Available, NodeAttachment
from kvbm.connector.identity import checkpoint_identity
from kvbm.layout import ModelGeometry
from tests.harness.node_daemon import until
from tests.harness.support import Engine
from tests.harness.tiny_llama import build
from tests.harness.vllm_runs import BLOCK, prompt

pytestmark = pytest.mark.slow
# what vLLM makes of tests/harness/tiny_llama.py: 2 layers, 2 KV heads of 32, fp32
GEOMETRY = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=32, block_size=BLOCK)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build(str(tmp_path_factory.mktemp("tiny-llama")))


def engine_hashes(att: NodeAttachment, model: str, tokens: list[int]) -> list[int]:
    """The sequence hashes the connector gives a plain prompt's blocks (no
    adapter, no cache salt) on the engines these tests run (float32)."""
    seed = att.hasher.seed(checkpoint_identity(model, dtype="float32"))
    return att.hasher.sequence_hashes(tokens, BLOCK, seed)


@pytest.mark.support("full-attention", "hits", "vllm-cpu")
@pytest.mark.support("full-attention", "remote", "vllm-cpu")
@pytest.mark.support("full-attention", "outputs", "vllm-cpu")
def test_an_engine_on_node_b_gets_a_prefix_from_node_a_host_then_disk(
    model, vllm_engines, etcd, daemons, tmp_path
):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--disk-admit-min-uses", "1"]
    disk = ["--disk-cache-dir", str(tmp_path / "a-disk"), "--disk-cache-mb", "8"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "1", *disk)
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    p1, p2, p3, p4 = prompt(1), prompt(2), prompt(3), prompt(4)
    usable = (len(p1) - 1) // BLOCK  # vLLM always computes the last prompt token

    reference = vllm_engines.outputs(model, [p1, p2, p3, p4], a.socket)
    on_a = NodeAttachment(a.socket, GEOMETRY)
    on_b = NodeAttachment(b.socket, GEOMETRY, remote=["host", "disk"])
    try:
        k1, k2, k3 = (on_a.keys(engine_hashes(on_a, model, p)[:usable]) for p in (p1, p2, p3))
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

    engine = vllm_engines.live(model, b.socket, "host,disk", tmp_path / "engine-b.log")
    try:
        served = engine.run([p1, p2, p3])
        counted = on_b.stats()["engine_blocks"]
        assert served[0] == reference[0], "prefix from A's host tier"
        assert served[1] == reference[1], "prefix from A's disk tier"
        assert counted["remote_host"] == usable and counted["remote_disk"] == usable
        assert counted["local_host"] == usable  # the wrong KV was loaded ...
        assert served[2] != reference[2], "... and used: the output changed"

        # A freezes while B pulls p4 from it, and is killed during the pull:
        # the request completes, recomputed, with the same output
        k4 = on_b.keys(engine_hashes(on_b, model, p4)[:usable])
        assert on_b.lookup(k4).total == usable  # on A (its disk, by now)
        a.proc.send_signal(signal.SIGSTOP)
        killer = threading.Timer(1.0, a.proc.send_signal, [signal.SIGKILL])
        killer.start()
        assert engine.run([p4]) == [reference[3]]
        killer.join()
        assert on_b.stats()["engine_blocks"] == counted
    finally:
        engine.close()
        on_b.close()


@pytest.mark.support("full-attention", "hits", "vllm-cpu")
@pytest.mark.support("full-attention", "outputs", "vllm-cpu")
def test_async_copies_under_preemption_answer_as_vllm_alone(model, vllm_engines, daemons):
    """engine_copies "async" (a GPU's default; one copy thread here): a load
    starts before the forward and is waited for layer by layer, a save ends
    in a later step's get_finished, its request's blocks kept from vLLM
    until then. Four prompts at once in a 12-block cache (vLLM preempts):
    engine 1 computes and saves them, engine 2 loads them; both answer as
    vLLM alone. Every request whose blocks were kept is given back, and no
    lease is left (an abort with saves in flight: tests/integration/test_vllm_scheduler.py)."""
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "8")
    prompts = [prompt(50 + i, 4 * BLOCK + 4) for i in range(4)]
    reference = vllm_engines.outputs(model, prompts, max_tokens=48)  # vLLM alone, room for all
    env = {"KVBM_ENGINE_COPIES": "async", "KVBM_LOG_LEVEL": "debug"}

    def run() -> dict:
        got = vllm_engines.answer(model, prompts, node.socket, max_tokens=48, kv_blocks=12, env=env)
        assert got["preemptions"] > 0, got["stderr"][-3000:]  # the case under test happened
        assert got["outputs"] == reference
        assert "copies between vLLM's KV cache and the node: ThreadCopier" in got["stderr"]
        kept = re.findall(r"blocks kept for saves in flight: request (\S+)", got["stderr"])
        freed = re.findall(r"saves ended, blocks back to vLLM: request (\S+)", got["stderr"])
        assert kept and sorted(kept) == sorted(freed), (kept, freed)
        return got

    run()  # engine 1 computes and saves
    probe = NodeAttachment(node.socket, GEOMETRY)
    try:
        for p in prompts:
            assert probe.lookup(probe.keys(engine_hashes(probe, model, p)[:4])).local == 4
        run()  # engine 2 loads
        assert probe.stats()["engine_blocks"]["local_host"] >= 16
        assert probe.stats()["engine_leases"] == 0
    finally:
        probe.close()


def test_the_engine_outlives_its_node_and_reattaches(model, vllm_engines, daemons, tmp_path):
    """The node is killed (SIGKILL) under a running engine: requests go on,
    recomputed, with the same outputs; a new node on the same socket is found
    again, and serves hits."""
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "4")
    p = prompt(7)
    usable = (len(p) - 1) // BLOCK
    engine = vllm_engines.live(model, node.socket, "", tmp_path / "engine.log")
    try:
        computed = engine.run([p])
        assert engine.run([p]) == computed  # a local hit
        probe = NodeAttachment(node.socket, GEOMETRY)
        assert probe.stats()["engine_blocks"]["local_host"] == usable
        probe.close()

        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        assert engine.run([p]) == computed  # no node: recomputed
        assert engine.run([p]) == computed

        again = daemons("solo", "127.0.0.2", "--host-cache-mb", "4")
        time.sleep(2.5)  # the connector retries a lost node every 2 s
        assert engine.run([p]) == computed  # stored into the new node
        assert engine.run([p]) == computed  # and loaded from it
        probe = NodeAttachment(again.socket, GEOMETRY)
        try:
            assert probe.stats()["engine_blocks"]["local_host"] == usable
        finally:
            probe.close()
    finally:
        engine.close()
