"""`kvbm demo`: the mesh on one machine, on embedded defaults.

An etcd started for the run, two node daemons on 127.0.0.2 (A: a small host
tier and a disk tier) and 127.0.0.3 (B), and an engine on each node.

1. Engine 1 on node A computes every prompt; A's host tier is small, so the
   older prompts spill to A's disk.
2. Engine 2 on node B asks for the same prompts: the recent ones come from
   A's host tier, the older ones from A's disk, pulled over NIXL and verified.
3. Engine 2 asks again: now they are local hits in B's host tier.

The engines are vLLM on a random tiny Llama when vLLM is installed (`./scripts/test`
installs it), each output checked against the recompute; otherwise synthetic
engines whose blocks derive from their keys, checked bit for bit.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TextIO

from discovery.etcd_server import EtcdServer
from kvbm.bench.synthetic import SyntheticEngine
from kvbm.block_key import BlockKey
from kvbm.config_text import from_args
from kvbm.connector.attach import NodeAttachment
from kvbm.layout import ModelGeometry
from kvbm.logs import setup_logging
from kvbm.node_process import NodeProcess, fleet_secret

SYNTHETIC = ModelGeometry(num_layers=4, num_kv_heads=4, head_dim=64, block_size=32)
TINY_LLAMA = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=32, block_size=32)
DEMO_DEFAULTS = {"host_cache_mb": 2}  # node A's host tier: small, so prompts spill to disk
HOST_B_MB = 256
SOURCES = ("local_host", "local_disk", "remote_host", "remote_disk")


@dataclass
class Phase:
    title: str
    blocks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    computed: int = 0
    seconds: float = 0.0
    checked: int = 0
    wrong: int = 0


def main(args: argparse.Namespace) -> int:
    cfg = from_args(args, defaults=DEMO_DEFAULTS)
    setup_logging(cfg.log_level)
    use_vllm = args.engine == "vllm" or (args.engine == "auto" and _has_vllm())
    with tempfile.TemporaryDirectory(prefix="kvbm-demo-") as tmp:
        try:
            etcd = EtcdServer()
        except Exception as e:
            print(
                f"kvbm demo: cannot start etcd ({e}); ./scripts/demo installs one", file=sys.stderr
            )
            return 2
        with etcd:
            index = ["--etcd", etcd.endpoint, "--namespace", cfg.namespace, *fleet_secret(tmp)]
            index += ["--disk-admit-min-uses", "1", "--log-level", cfg.log_level]
            disk_dir = cfg.disk_cache_dir or os.path.join(tmp, "a-disk")
            disk_mb = cfg.disk_cache_mb or 256
            disk = ["--disk-cache-dir", disk_dir, "--disk-cache-mb", str(disk_mb)]
            host_a = ["--host-cache-mb", str(cfg.host_cache_mb)]
            print(
                f"kvbm demo: etcd at {etcd.endpoint}; node A on 127.0.0.2 (host "
                f"{cfg.host_cache_mb} MiB, disk {disk_mb} MiB), node B on 127.0.0.3 (host "
                f"{HOST_B_MB} MiB)"
            )
            nodes = [NodeProcess(tmp, "node-a", "127.0.0.2", *index, *host_a, *disk)]
            try:
                host_b = ["--host-cache-mb", str(HOST_B_MB)]
                nodes.append(NodeProcess(tmp, "node-b", "127.0.0.3", *index, *host_b))
                run = _run_vllm if use_vllm else _run_synthetic
                phases = run(tmp, nodes[0].socket, nodes[1].socket, args)
            finally:
                for node in nodes:
                    node.stop()
    _summary(phases, sys.stdout)
    return 1 if any(p.wrong for p in phases) else 0


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def _wait_visible(b: NodeAttachment, keys: list[BlockKey], timeout: float = 10.0) -> None:
    """Until B's index mirror shows what A published (one flush: 0.5 s at most)."""
    deadline = time.monotonic() + timeout
    while b.lookup(keys).total < len(keys) and time.monotonic() < deadline:
        time.sleep(0.02)


def _run_synthetic(tmp: str, sock_a: str, sock_b: str, args: argparse.Namespace) -> list[Phase]:
    g, n = SYNTHETIC, args.blocks_per_prompt
    print(
        f"engines: synthetic ({g.block_bytes >> 10} KiB blocks), {args.prompts} prompts "
        f"of {n} blocks"
    )
    rng = random.Random(7)
    a = NodeAttachment(sock_a, g)
    b = NodeAttachment(sock_b, g, remote=["host", "disk"])
    try:
        seed = a.hasher.seed("kvbm-demo-model")
        prompts = [
            a.keys(
                a.hasher.sequence_hashes(
                    [rng.randrange(32000) for _ in range(n * g.block_size)], g.block_size, seed
                )
            )
            for _ in range(args.prompts)
        ]

        def phase(title: str, node: NodeAttachment, order: list[list[BlockKey]]) -> Phase:
            done, engine = Phase(title), SyntheticEngine(g, n)
            for i, keys in enumerate(order):
                t0 = time.perf_counter()
                loaded, sources = node.load(engine.kv, keys, list(range(n)))
                done.seconds += time.perf_counter() - t0
                for s in SOURCES:
                    done.blocks[s] += sources.get(s, 0)
                done.checked += loaded
                done.wrong += sum(not engine.matches(keys[j], j) for j in range(loaded))
                engine.compute(keys[loaded:], list(range(loaded, n)))
                done.computed += n - loaded
                node.store(engine.kv, keys, list(range(n)))
                _progress(done, i + 1, len(prompts))
            print()
            return done

        phases = [phase("engine 1 on node A computes", a, prompts)]
        _wait_visible(b, prompts[0])
        _wait_visible(b, prompts[-1])
        # newest first: A's host tier still holds those; reading the older ones
        # from A's disk stages them through A's host tier, pushing the newest out
        phases.append(phase("engine 2 on node B asks", b, prompts[::-1]))
        phases.append(phase("engine 2 on node B asks again", b, prompts))
        return phases
    finally:
        a.close()
        b.close()


def _run_vllm(tmp: str, sock_a: str, sock_b: str, args: argparse.Namespace) -> list[Phase]:
    from kvbm.bench.e2e import Engine
    from kvbm.random_llama import build_llama

    g = TINY_LLAMA
    model = build_llama(os.path.join(tmp, "model"))
    rng = random.Random(7)
    tokens = args.blocks_per_prompt * g.block_size + 1
    prompts = [[rng.randrange(4, 512) for _ in range(tokens)] for _ in range(args.prompts)]
    print(
        f"engines: vLLM (CPU) on a random tiny Llama, {args.prompts} prompts of "
        f"{tokens} tokens; starting engine 1 (about a minute)"
    )
    probe_b = NodeAttachment(sock_b, g)

    def phase(
        title: str, engine: Engine, order: list[int], reference: list[list[int]] | None = None
    ) -> tuple[Phase, list[list[int]]]:
        """The prompts in `order`; sources from B's counters, outputs checked
        against `reference` where given."""
        done, outputs = Phase(title), [[] for _ in prompts]
        before = probe_b.stats()["engine_blocks"]
        for step, i in enumerate(order):
            outputs[i], seconds = engine.ask(prompts[i], 8)
            done.seconds += seconds
            if reference is not None:
                done.checked += 1
                done.wrong += outputs[i] != reference[i]
            _progress(done, step + 1, len(prompts))
        print()
        after = probe_b.stats()["engine_blocks"]
        done.blocks = {s: after[s] - before[s] for s in SOURCES}
        done.computed = -1  # vLLM computes what it did not load
        return done, outputs

    forward = list(range(len(prompts)))
    try:
        engine = Engine(model, {"node": sock_a, "remote_tiers": []})
        try:
            first, reference = phase("engine 1 on node A computes", engine, forward)
        finally:
            engine.close()
        print("starting engine 2 (about a minute)")
        engine = Engine(model, {"node": sock_b, "remote_tiers": ["host", "disk"]})
        try:
            # newest first, as in the synthetic run
            second, _ = phase("engine 2 on node B asks", engine, forward[::-1], reference)
            third, _ = phase("engine 2 on node B asks again", engine, forward, reference)
        finally:
            engine.close()
    finally:
        probe_b.close()
    return [first, second, third]


def _progress(phase: Phase, done: int, total: int) -> None:
    """One line per phase, rewritten in place on a terminal."""
    if sys.stdout.isatty():
        print(f"\r  {phase.title}: prompt {done}/{total}", end="", flush=True)
    elif done == total:
        print(f"  {phase.title}: {total} prompts", end="", flush=True)


def _summary(phases: list[Phase], out: TextIO) -> None:
    print(
        "\nphase                            local host  local disk  remote host  remote disk"
        "  computed    seconds  checked  wrong",
        file=out,
    )
    for p in phases:
        b = p.blocks
        computed = "-" if p.computed < 0 else str(p.computed)
        print(
            f"{p.title:<32} {b['local_host']:10d}  {b['local_disk']:10d}  "
            f"{b['remote_host']:11d}  {b['remote_disk']:11d}  {computed:>8}  "
            f"{p.seconds:9.3f}  {p.checked:7d}  {p.wrong:5d}",
            file=out,
        )
    print(
        "(blocks by where they came from; vLLM runs check whole outputs against "
        "engine 1's, synthetic runs every loaded block's bytes)",
        file=out,
    )
