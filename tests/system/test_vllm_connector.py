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

import contextlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvbm.connector.attach import Available, NodeAttachment
from kvbm.connector.identity import checkpoint_identity
from kvbm.disk_faults import corrupt_disk
from kvbm.layout import ModelGeometry
from tests.harness.node_daemon import until
from tests.harness.support import Engine
from tests.harness.tiny_llama import build

BLOCK = 32
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


def prompt(seed: int, n: int = 3 * BLOCK + 4) -> list[int]:
    return [4 + (seed * 131 + i * 37) % 500 for i in range(n)]


def engine_answer(
    model: str,
    prompts: list[list[int]],
    socket: str = "",
    remote: str = "",
    max_tokens: int = 16,
    prefix_caching: bool = False,
    kv_blocks: int = 0,
    env: dict | None = None,
) -> dict:
    """One engine process's answer line (no `socket`: vLLM alone, no
    connector; `kv_blocks`: a KV cache that small, the prompts all at once),
    and its stderr."""
    node = [socket, remote] if socket else []
    out = subprocess.run(
        [sys.executable, "-m", "tests.harness.vllm_engine", model, json.dumps(prompts), *node],
        capture_output=True,
        text=True,
        timeout=400,
        env={
            **os.environ,
            "TEST_MAX_TOKENS": str(max_tokens),
            "TEST_PREFIX_CACHING": "1" if prefix_caching else "0",
            "TEST_KV_BLOCKS": str(kv_blocks),
            **(env or {}),
        },
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"outputs"')]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return {**json.loads(lines[-1]), "stderr": out.stderr}


def run_engine(model: str, prompts: list[list[int]], *args, **kwargs) -> list:
    return engine_answer(model, prompts, *args, **kwargs)["outputs"]


class LiveEngine:
    """An engine process the test talks to between batches of prompts."""

    def __init__(
        self, model: str, socket: str, remote: str, log_path, env: dict | None = None
    ) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.vllm_engine", model, "-", socket, remote],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._answer("ready", 300)

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):
                self.lines.put(line)

    def _answer(self, key: str, timeout: float) -> object:
        try:
            return json.loads(self.lines.get(timeout=timeout))[key]
        except queue.Empty:
            raise AssertionError(f"engine gave no {key} in {timeout} s") from None

    def run(self, prompts: list[list[int]]) -> list:
        self._send(prompts)
        return self._answer("outputs", 120)  # type: ignore[return-value]

    def abort_after(self, steps: int, prompts: list[list[int]]) -> tuple[int, int]:
        """The node's engine leases just before the abort, and after it."""
        self._send({"abort_after_steps": steps, "prompts": prompts})
        answer = json.loads(self.lines.get(timeout=120))
        return answer["leases_before"], answer["leases_after"]

    def _send(self, order: object) -> None:
        self.proc.stdin.write(json.dumps(order) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def test_an_engine_on_node_b_gets_a_prefix_from_node_a_host_then_disk(
    model, etcd, daemons, tmp_path
):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--disk-admit-min-uses", "1"]
    disk = ["--disk-cache-dir", str(tmp_path / "a-disk"), "--disk-cache-mb", "8"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "1", *disk)
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    p1, p2, p3, p4 = prompt(1), prompt(2), prompt(3), prompt(4)
    usable = (len(p1) - 1) // BLOCK  # vLLM always computes the last prompt token

    reference = run_engine(model, [p1, p2, p3, p4], a.socket)
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

    engine = LiveEngine(model, b.socket, "host,disk", tmp_path / "engine-b.log")
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


def test_a_chats_second_turn_on_another_node_loads_the_first_answer_too(
    model, etcd, daemons, tmp_path
):
    """Turn 1 (a prompt, then a 64-token answer) runs on A; turn 2 (turn 1's
    prompt, its answer, a new message) on B. B loads every full block of
    turn 1's prompt *and* answer from A and answers as vLLM alone does. Only
    prompt blocks were stored before: B then got 3 of these 5 blocks."""
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "8")
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    turn1 = prompt(5)  # 100 tokens
    answer = run_engine(model, [turn1], a.socket, max_tokens=64)[0]
    turn2 = turn1 + answer + prompt(6, 40)
    reference = run_engine(model, [turn2])  # vLLM alone
    # the answer's last token was never an input: KV exists for 163 tokens
    full = (len(turn1) + len(answer) - 1) // BLOCK
    assert full == 5
    on_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        ks = on_b.keys(engine_hashes(on_b, model, turn1 + answer)[:full])
        until(lambda: on_b.lookup(ks) == Available(0, full, 0), 10, "A's blocks not seen")
        assert run_engine(model, [turn2], b.socket, "host") == reference
        assert on_b.stats()["engine_blocks"]["remote_host"] == full
    finally:
        on_b.close()


def test_with_vllms_prefix_cache_on_the_connector_serves_what_vllm_lacks(
    model, etcd, daemons, tmp_path
):
    """vLLM's prefix cache on, as users run it: engine 2 on B first runs a
    prompt that shares X's first two blocks (vLLM caches them), then X
    itself: vLLM computes nothing of the first two blocks (its own hit), the
    connector loads the next two from A (`num_computed_tokens` > 0), and
    the output is vLLM alone's."""
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "8")
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    x = prompt(7, 4 * BLOCK + 4)  # 4 usable blocks
    y = x[: 2 * BLOCK] + prompt(8, BLOCK + 4)  # shares X's first two blocks
    reference = run_engine(model, [y, x])  # vLLM alone
    assert run_engine(model, [x], a.socket) == reference[1:]  # engine 1 computes X on A
    on_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        ks = on_b.keys(engine_hashes(on_b, model, x)[:4])
        until(lambda: on_b.lookup(ks) == Available(0, 4, 0), 10, "A's blocks not seen")
        served = run_engine(model, [y, x], b.socket, "host", prefix_caching=True)
        assert served == reference
        # Y loaded X's first two blocks from A; then vLLM had them itself, and
        # only X's blocks 2 and 3 came from A: 4 in all, not 6
        assert on_b.stats()["engine_blocks"]["remote_host"] == 4
    finally:
        on_b.close()


def test_requests_preempted_while_their_blocks_load_leak_nothing(model, etcd, daemons, tmp_path):
    """Four prompts A computed, run at once on B's engine with a KV cache of
    12 blocks (they need 24 by their end): vLLM preempts and resumes them,
    each resumed request is pinned and loaded again from A. Outputs equal
    vLLM alone's; afterwards neither node holds a lease or a pin."""
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "8")
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    prompts = [prompt(20 + i, 4 * BLOCK + 4) for i in range(4)]
    reference = run_engine(model, prompts, max_tokens=48)  # vLLM alone, room for all
    assert run_engine(model, prompts, a.socket, max_tokens=48) == reference
    on_a = NodeAttachment(a.socket, GEOMETRY)
    on_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        for p in prompts:
            ks = on_b.keys(engine_hashes(on_b, model, p)[:4])
            until(lambda ks=ks: on_b.lookup(ks) == Available(0, 4, 0), 10, "A not seen")
        got = engine_answer(model, prompts, b.socket, "host", max_tokens=48, kv_blocks=12)
        assert got["preemptions"] > 0, got  # the case under test happened
        assert got["outputs"] == reference
        assert on_b.stats()["engine_blocks"]["remote_host"] >= 16
        assert on_b.stats()["engine_leases"] == 0
        until(lambda: on_a.stats()["pinned_for_peers"] == 0, 15, "A kept pins")
    finally:
        on_a.close()
        on_b.close()


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_requests_aborted_while_waiting_leave_no_pins(model, etcd, daemons, tmp_path, policy):
    """Four prompts A holds, submitted at once to B's engine with a 12-block
    KV cache: after one step two of them wait for room; they are aborted
    then, with the engine alive. With kv_load_failure_policy "fail" the
    connector pins a hit before promising it, so the waiting requests hold
    leases: every one is settled at the abort (the connector's
    request_finished), not left for the connection's end. With "recompute"
    a hit is promised from the key view and pinned only with its step:
    nothing is pinned while a request waits."""
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "8")
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "8")
    prompts = [prompt(30 + i, 4 * BLOCK + 4) for i in range(4)]
    run_engine(model, prompts, a.socket)
    on_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    env = {"TEST_KV_BLOCKS": "12", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one step each
    env["TEST_LOAD_FAILURE_POLICY"] = policy
    engine = LiveEngine(model, b.socket, "host", tmp_path / "engine-b.log", env=env)
    try:
        for p in prompts:
            ks = on_b.keys(engine_hashes(on_b, model, p)[:4])
            until(lambda ks=ks: on_b.lookup(ks) == Available(0, 4, 0), 10, "A not seen")
        before, after = engine.abort_after(1, prompts)
        if policy == "fail":
            assert before > 0  # pins were held when the abort came
        else:
            assert before == 0
            assert on_b.stats()["engine_blocks"]["remote_host"] > 0  # the first step loaded
        assert after == 0
        assert on_b.stats()["engine_leases"] == 0  # the engine still attached
    finally:
        engine.close()
        on_b.close()


def test_async_copies_under_preemption_and_abort_answer_as_vllm_alone(model, daemons, tmp_path):
    """engine_copies "async" (a GPU's default; one copy thread here): a load
    starts before the forward and is waited for layer by layer, a save ends
    in a later step's get_finished, its request's blocks kept from vLLM
    until then. Four prompts at once in a 12-block cache (vLLM preempts):
    engine 1 computes and saves them, engine 2 loads them; both answer as
    vLLM alone. Every request whose blocks were kept is given back, and no
    lease is left, an abort in the middle included."""
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "8")
    prompts = [prompt(50 + i, 4 * BLOCK + 4) for i in range(4)]
    reference = run_engine(model, prompts, max_tokens=48)  # vLLM alone, room for all
    env = {"KVBM_ENGINE_COPIES": "async", "KVBM_LOG_LEVEL": "debug"}

    def run() -> dict:
        got = engine_answer(model, prompts, node.socket, max_tokens=48, kv_blocks=12, env=env)
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
        abort_env = {**env, "TEST_KV_BLOCKS": "12", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        engine = LiveEngine(model, node.socket, "", tmp_path / "engine.log", env=abort_env)
        try:
            _, after = engine.abort_after(2, [prompt(60 + i, 4 * BLOCK + 4) for i in range(4)])
            assert after == 0
        finally:
            engine.close()
        assert probe.stats()["engine_leases"] == 0
    finally:
        probe.close()


def test_blocks_promised_but_gone_when_pinned_are_recomputed(model, daemons, tmp_path):
    """The key view shows a prompt on the node's disk, but its bytes there
    were flipped: the step's pin finds nothing good (the staging rejects
    them), the workers report the promised blocks failed, vLLM recomputes
    them: the output is the one computed before, nothing wrong is saved,
    and the blocks recomputed are saved again (the next run loads them)."""
    disk = ["--disk-cache-dir", str(tmp_path / "disk"), "--disk-cache-mb", "8"]
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "1", "--disk-admit-min-uses", "1", *disk)
    p = prompt(40)
    usable = (len(p) - 1) // BLOCK
    engine = LiveEngine(model, node.socket, "", tmp_path / "engine.log")
    probe = NodeAttachment(node.socket, GEOMETRY)
    try:
        computed = engine.run([p])
        ks = probe.keys(engine_hashes(probe, model, p)[:usable])
        filler = probe.keys(list(range(10**6, 10**6 + probe.num_slots)))
        fill = Engine(len(filler), GEOMETRY)
        probe.store(fill.kv, filler, fill.compute(filler))  # p's blocks: on disk only
        until(lambda: probe.stats()["tiers"]["disk"]["blocks"] >= usable, 10, "p not on disk")
        assert corrupt_disk(str(tmp_path / "disk"), random.Random(3), 10**6, GEOMETRY) > 0
        assert probe.seen(ks) == Available(usable)  # what the scheduler reads: a hit
        assert engine.run([p]) == computed
        stats = probe.stats()
        assert stats["checksum_failures"]["disk"] > 0  # the promised blocks were refused
        assert stats["engine_blocks"]["local_disk"] == 0
        assert engine.run([p]) == computed
        assert probe.stats()["engine_blocks"]["local_host"] == usable  # saved again, loaded
    finally:
        engine.close()
        probe.close()


def test_the_engine_outlives_its_node_and_reattaches(model, daemons, tmp_path):
    """The node is killed (SIGKILL) under a running engine: requests go on,
    recomputed, with the same outputs; a new node on the same socket is found
    again, and serves hits."""
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "4")
    p = prompt(7)
    usable = (len(p) - 1) // BLOCK
    engine = LiveEngine(model, node.socket, "", tmp_path / "engine.log")
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
