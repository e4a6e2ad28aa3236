"""`kvbm bench e2e`: time to first token with real vLLM (CPU) on a random
8-layer, 1024-hidden fp32 Llama and 1024-token prompts, block size 32.

Every ratio comes from one engine's own measurements, interleaved prompt by
prompt, so both of its sides run in the same conditions (engines run one at
a time; VLLM_CPU_NUM_OF_RESERVED_CPU=1; vLLM's prefix cache on, as users run
it):
- engine A, on node A, for each prompt: cold (recompute; the connector
  stores it), again (vLLM's own prefix hit: the physical reference), vLLM's
  prefix cache reset, again (A's host tier): `local_host_vs_engine_hit`;
- engine B, on node B, for each prompt A holds in its host tier: first sight
  (a pull from A's host), reset, again (B's own host tier, where the pull
  left it): `remote_host_vs_local_host`; the same for prompts A pushed to
  its disk: `remote_disk_vs_local_host`;
- a two-turn chat: turn 1 (a 512-token prompt, a 64-token answer) on engine
  A; turn 2 (turn 1's prompt and answer, then 64 new tokens) on engine B:
  `turn2_cached_fraction` (blocks B loaded / the full blocks of turn 1's
  prompt and answer that have KV) and its TTFT against vLLM alone's.
The physical floors of the remote ratios, measured in the same run: a
prompt's blocks copied by the kernel from another process's arena (what a
READ is on one host: `remote_host_floor`) or read from A's disk
(`remote_disk_floor`), added to B's local hit and nothing else; and the copy
followed by one checksum pass over the blocks (`remote_host_floor_verified`,
the checksum timed from memory: a pull checks chunks still in the cache, a
little faster): a puller must check what a peer sent, and on a two-core
machine the copy and the checksum share one core, since vLLM's CPU worker is
bound to the other and spins (sched_yield) while its scheduler waits.
`node_b_pull_ms` is B's node's own mean time per pull, by the tier A held
the blocks in (`kvbm_peer_pull_seconds`), over the two sets' pulls.
`recompute_ttft_ms` is vLLM alone (prefix cache off). TTFT is the wall time
of a request with max_tokens 1; each figure is a median over the prompts.
Every request's token is compared with vLLM alone's.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from multiprocessing.connection import Connection

from discovery.etcd_server import EtcdServer
from kvbm.bench.reference import cma_gbps, raw_disk_read_gbps, verify_gbps
from kvbm.connector.attach import NodeAttachment
from kvbm.layout import ModelGeometry
from kvbm.node_process import NodeProcess, fleet_secret
from kvbm.random_llama import build_llama
from kvbm.shm_arena import SHM_DIR

LAYERS, HIDDEN, HEADS, KV_HEADS, BLOCK, PROMPT = 8, 1024, 8, 8, 32, 1024
TURN1, ANSWER, NEW_MESSAGE = 512, 64, 64  # the chat's turn 1 prompt and answer, turn 2's new tokens
CONCURRENT_ANSWER = 16  # tokens each request of the concurrency bench generates
VOCAB = 4096
GEOMETRY = ModelGeometry(LAYERS, KV_HEADS, HIDDEN // HEADS, BLOCK)
ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "ERROR",  # vLLM logs to stdout; the caller prints there
}


def _engine(
    model: str, extra: dict | None, prefix_caching: bool, llm_args: dict, conn: Connection
) -> None:
    """One vLLM engine: answers (prompt, max_tokens) with (tokens, seconds)."""
    os.environ.update(ENV)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvbm.connector.vllm import kv_transfer_config

    transfer = kv_transfer_config(extra) if extra is not None else None
    args = {
        "dtype": "float32",
        "block_size": BLOCK,
        "max_model_len": 2 * PROMPT,
        "enforce_eager": True,
        **llm_args,
    }
    llm = LLM(
        model=model,
        enable_prefix_caching=prefix_caching,
        kv_transfer_config=transfer,
        seed=0,
        **args,
    )
    conn.send("ready")
    try:
        while (msg := conn.recv()) is not None:
            if msg == "reset":  # forget vLLM's own prefix cache
                # refused while a finished request's blocks wait for its saves
                # (async copies): the engine's loop frees them within steps
                for _ in range(200):
                    if done := llm.reset_prefix_cache():
                        break
                    time.sleep(0.01)
                conn.send(done)
                continue
            if msg[0] == "batch":  # ("batch", prompts, max_tokens): all submitted at once
                _, batch, max_tokens = msg
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                t0 = time.perf_counter()
                asked = [TokensPrompt(prompt_token_ids=p) for p in batch]
                done = llm.generate(asked, params, use_tqdm=False)
                took = time.perf_counter() - t0
                conn.send(([list(o.outputs[0].token_ids) for o in done], took))
                continue
            prompt, max_tokens = msg
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            conn.send((list(out[0].outputs[0].token_ids), time.perf_counter() - t0))
    finally:
        # A multiprocessing child skips atexit: stop vLLM's engine-core and
        # worker processes here, or they outlive this one.
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()


class Engine:
    """A vLLM engine in a process of its own (`extra`: the connector's extra
    config, None: vLLM alone; `llm_args`: vLLM's arguments over the bench's)."""

    def __init__(
        self,
        model: str,
        extra: dict | None = None,
        prefix_caching: bool = False,
        llm_args: dict | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_engine, args=(model, extra, prefix_caching, llm_args or {}, child)
        )
        self.proc.start()
        if not self.conn.poll(600) or self.conn.recv() != "ready":
            raise RuntimeError("the vLLM engine did not start")

    def ask(self, prompt: list[int], max_tokens: int = 1) -> tuple[list[int], float]:
        self.conn.send((prompt, max_tokens))
        if not self.conn.poll(600):
            raise RuntimeError("the vLLM engine did not answer")
        return self.conn.recv()

    def ask_all(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
        """Every prompt submitted at once: (outputs, wall seconds)."""
        self.conn.send(("batch", prompts, max_tokens))
        if not self.conn.poll(1200):
            raise RuntimeError("the vLLM engine did not answer")
        return self.conn.recv()

    def reset(self) -> None:
        self.conn.send("reset")
        if not self.conn.poll(600) or self.conn.recv() is not True:
            raise RuntimeError("vLLM did not reset its prefix cache")

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(120)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


def _ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 1)


def run(prompts: int = 6, workdir: str | None = None, arena_dir: str = SHM_DIR) -> dict:
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(4, VOCAB) for _ in range(n)]

    host_set = [tokens(PROMPT) for _ in range(prompts)]
    disk_set = [tokens(PROMPT) for _ in range(prompts)]
    turn1, new_message = tokens(TURN1), tokens(NEW_MESSAGE)
    set_mb = prompts * (PROMPT // BLOCK) * GEOMETRY.slot_bytes >> 20
    chat_mb = -(-(TURN1 + ANSWER) // BLOCK) * GEOMETRY.slot_bytes >> 20
    out = _header("e2e")
    out.update(prompts_per_figure=prompts, arena_dir=arena_dir)
    with (
        tempfile.TemporaryDirectory(prefix="kvbm-bench-e2e-", dir=workdir) as d,
        EtcdServer() as etcd,
    ):
        model = build_llama(os.path.join(d, "model"), LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB)
        reference: dict[tuple[int, ...], list[int]] = {}
        same = True

        def timed(engine: Engine, p: list[int]) -> float:
            nonlocal same
            got, took = engine.ask(p)
            same &= reference.setdefault(tuple(p), got) == got
            return took

        alone = Engine(model)
        try:
            out["recompute_ttft_ms"] = _ms([timed(alone, p) for p in host_set + disk_set])
            answer, _ = alone.ask(turn1, ANSWER)
            turn2 = turn1 + answer + new_message
            recompute_turn2 = timed(alone, turn2)
        finally:
            alone.close()
        # A's host tier holds one prompt set and the chat's turn 1: the host set
        # pushes the disk set out, turn 1 the last of it
        a_host = set_mb + chat_mb
        # room on disk for the disk set and all that G2 writes there, ahead included
        a_tiers = ["--host-cache-mb", str(a_host), "--disk-cache-mb", str(3 * set_mb)]
        a_tiers += ["--disk-cache-dir", os.path.join(d, "a-disk")]
        index = ["--etcd", etcd.endpoint, "--disk-admit-min-uses", "1", *fleet_secret(d)]
        index += ["--host-arena-dir", arena_dir]
        nodes = [NodeProcess(d, "node-a", "127.0.0.2", *index, *a_tiers)]
        figures: dict[str, list[float]] = collections.defaultdict(list)
        try:
            nodes.append(
                NodeProcess(d, "node-b", "127.0.0.3", *index, "--host-cache-mb", str(3 * set_mb))
            )
            on_a = Engine(model, {"node": os.path.join(d, "node-a.sock")}, prefix_caching=True)
            try:
                for p in disk_set:  # computed and stored; the host set pushes them to disk
                    timed(on_a, p)
                for p in host_set:
                    figures["cold"].append(timed(on_a, p))
                    figures["engine_hit"].append(timed(on_a, p))
                    on_a.reset()
                    figures["local_host_a"].append(timed(on_a, p))
                on_a.ask(turn1, ANSWER)  # turn 1 of the chat: its answer's blocks go to A
            finally:
                on_a.close()
            remote = {"node": os.path.join(d, "node-b.sock"), "remote_tiers": ["host", "disk"]}
            on_b = Engine(model, remote, prefix_caching=True)
            probe = NodeAttachment(os.path.join(d, "node-b.sock"), GEOMETRY)
            try:
                for kind, batch in (("remote_host", host_set), ("remote_disk", disk_set)):
                    for p in batch:
                        figures[kind].append(timed(on_b, p))  # its first sight: from A
                        on_b.reset()
                        figures[f"local_host_after_{kind}"].append(timed(on_b, p))
                before_turn2 = probe.stats()
                served = dict(before_turn2["engine_blocks"])
                pulls = before_turn2["peer_pulls"]
                figures["turn2"].append(timed(on_b, turn2))
                stats = probe.stats()
                after = stats["engine_blocks"]
                # a peer B left alone (a pull that failed) misses every hit after it
                out["node_b_avoided_peers"] = stats["avoided_peers"]
            finally:
                probe.close()
                on_b.close()
        finally:
            for node in nodes:
                node.stop()
        out["outputs_identical"] = same
        # the physical floors, measured here now that the engines are gone: a
        # prompt's blocks copied by the kernel from another process's arena
        # (what a READ is on one host), and read from the disk A's tier is on
        prompt_bytes = (PROMPT - 1) // BLOCK * GEOMETRY.block_bytes
        cma = cma_gbps(prompt_bytes, GEOMETRY.block_bytes, arena_dir)
        disk = raw_disk_read_gbps(d, prompt_bytes)
        check = verify_gbps(1, prompt_bytes, GEOMETRY.block_bytes)
        out["prompt_kv_mb"] = prompt_bytes >> 20
        out["cma_arena_gbps"], out["disk_read_gbps"] = cma, disk
        out["verify_gbps_one_core"] = check
    each = prompts * ((PROMPT - 1) // BLOCK)
    out["node_b_engine_blocks"] = served
    # B's node's own timing of its pulls (kvbm_peer_pull_seconds), mean per tier
    out["node_b_pull_ms"] = {
        t: round(p["seconds"] / p["count"] * 1e3, 2) for t, p in pulls.items() if p["count"]
    }
    # every hit came from where its figure says: B pulled each set once, then
    # loaded it again from its own host tier
    out["sources_as_labelled"] = served["remote_host"] == served["remote_disk"] == each and (
        served["local_host"] == 2 * each
    )
    for name in ("cold", "engine_hit", "local_host_a", "remote_host", "remote_disk"):
        out[f"{name}_ttft_ms"] = _ms(figures[name])
    out["local_host_hit_ttft_ms"] = out.pop("local_host_a_ttft_ms")
    out["engine_prefix_hit_ttft_ms"] = out.pop("engine_hit_ttft_ms")
    out["remote_host_hit_ttft_ms"] = out.pop("remote_host_ttft_ms")
    out["remote_disk_hit_ttft_ms"] = out.pop("remote_disk_ttft_ms")
    out["local_host_vs_engine_hit"] = _ratio(figures["local_host_a"], figures["engine_hit"])
    out["remote_host_vs_local_host"] = _ratio(
        figures["remote_host"], figures["local_host_after_remote_host"]
    )
    out["remote_disk_vs_local_host"] = _ratio(
        figures["remote_disk"], figures["local_host_after_remote_disk"]
    )
    after_pulls = figures["local_host_after_remote_host"] + figures["local_host_after_remote_disk"]
    out["b_local_host_hit_ttft_ms"] = _ms(after_pulls)
    # no pull can beat its own copy: the ratio a remote hit would have if the
    # copy (or the disk read) were all it added to B's local hit
    local_ms = out["b_local_host_hit_ttft_ms"]
    if cma:
        out["remote_host_floor"] = round(1 + prompt_bytes / (cma * 1e6) / local_ms, 3)
        # and with the puller's checksum after the copy, on the same core:
        # vLLM's CPU worker holds the other one, spinning while it waits
        verified_ms = prompt_bytes / (cma * 1e6) + prompt_bytes / (check * 1e6)
        out["remote_host_floor_verified"] = round(1 + verified_ms / local_ms, 3)
    out["remote_disk_floor"] = round(1 + prompt_bytes / (disk * 1e6) / local_ms, 3)
    out["recompute_vs_remote_host"] = round(
        out["recompute_ttft_ms"] / out["remote_host_hit_ttft_ms"], 3
    )
    # the chat: blocks of turn 1's prompt and answer that have KV (its last
    # token was never an input), and how many of them B loaded for turn 2
    turn1_blocks = (TURN1 + ANSWER - 1) // BLOCK
    loaded = sum(after[k] - served[k] for k in ("remote_host", "remote_disk", "local_host"))
    out["turn2_cached_fraction"] = round(loaded / turn1_blocks, 3)
    out["turn2_ttft_ms"] = _ms(figures["turn2"])
    out["turn2_vs_recompute"] = round(figures["turn2"][0] / recompute_turn2, 3)
    return out


def run_concurrency(
    concurrency: int = 16,
    rounds: int = 2,
    workdir: str | None = None,
    engine_copies: str = "auto",
) -> dict:
    """`kvbm bench e2e --concurrency N`: throughput with the connector over
    vLLM alone, N requests submitted at once, on prompts nobody has seen (the
    miss path: what the connector costs when nothing hits: its lookups and
    its saves), and on a mix where half the prompts were computed just
    before and then forgotten by vLLM's own prefix cache (the node holds
    them). One engine at a time, in the order alone, with, with, alone
    (`rounds` rounds each, each side through the same prompts), so that a
    machine that drifts during the run favours neither side; a figure is the
    median over a side's rounds of (prompt + generated tokens) / wall
    seconds. `engine_copies`: the connector's (sync or async copies)."""
    rng = random.Random(1)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(4, VOCAB) for _ in range(n)]

    half, total = concurrency // 2, 2 * rounds
    misses = [[tokens(PROMPT) for _ in range(concurrency)] for _ in range(total)]
    held = [[tokens(PROMPT) for _ in range(half)] for _ in range(total)]
    mixes = [h + [tokens(PROMPT) for _ in range(concurrency - half)] for h in held]
    out = _header("e2e_concurrency")
    out.update(concurrency=concurrency, rounds_per_side=total, max_tokens=CONCURRENT_ANSWER)
    out["engine_copies"] = engine_copies
    rates = {side: collections.defaultdict(list) for side in ("without", "with")}
    outputs: dict[str, dict[tuple[str, int], list]] = {"without": {}, "with": {}}
    loaded = 0
    first, second = range(rounds), range(rounds, total)
    order = (("without", first), ("with", first), ("with", second), ("without", second))
    with tempfile.TemporaryDirectory(prefix="kvbm-bench-e2e-", dir=workdir) as d:
        model = build_llama(os.path.join(d, "model"), LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB)
        # room for one round: its held prompts, and the mix's others
        host_mb = 2 * concurrency * (PROMPT // BLOCK) * GEOMETRY.slot_bytes >> 20
        for phase, (side, which) in enumerate(order):
            node = None
            if side == "with":
                flags = ("--host-cache-mb", str(host_mb))
                node = NodeProcess(d, f"node-{phase}", "127.0.0.2", *flags)
            extra = {"node": node.socket, "engine_copies": engine_copies} if node else None
            engine = Engine(model, extra, prefix_caching=True)
            try:
                engine.ask_all([tokens(PROMPT)], CONCURRENT_ANSWER)  # warm-up
                for r in which:
                    got, took = engine.ask_all(misses[r], CONCURRENT_ANSWER)
                    rates[side]["miss"].append(_tokens(misses[r], got) / took)
                    outputs[side][("miss", r)] = got
                    engine.ask_all(held[r], CONCURRENT_ANSWER)  # computed (and stored) ...
                    engine.reset()  # ... and forgotten by vLLM's own prefix cache
                    got, took = engine.ask_all(mixes[r], CONCURRENT_ANSWER)
                    rates[side]["mixed"].append(_tokens(mixes[r], got) / took)
                    outputs[side][("mixed", r)] = got
                    engine.reset()
                if node is not None:
                    probe = NodeAttachment(node.socket, GEOMETRY)
                    try:
                        loaded += probe.stats()["engine_blocks"]["local_host"]
                    finally:
                        probe.close()
            finally:
                engine.close()
                if node is not None:
                    node.stop()
    for kind in ("miss", "mixed"):
        alone = statistics.median(rates["without"][kind])
        served = statistics.median(rates["with"][kind])
        out[f"{kind}_tokens_per_s_without"] = round(alone)
        out[f"{kind}_tokens_per_s_with"] = round(served)
        out[f"{kind}_throughput_vs_without"] = round(served / alone, 3)
    out["outputs_identical"] = outputs["without"] == outputs["with"]
    # the mixes' held prompts: all their blocks should have come from the node
    out["mixed_held_blocks_loaded_fraction"] = round(
        loaded / (total * half * ((PROMPT - 1) // BLOCK)), 3
    )
    return out


def _header(bench: str) -> dict:
    return {
        "bench": bench,
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "model": {"layers": LAYERS, "hidden": HIDDEN, "kv_heads": KV_HEADS, "dtype": "float32"},
        "prompt_tokens": PROMPT,
        "block_size": BLOCK,
    }


def _tokens(prompts: list[list[int]], outputs: list[list[int]]) -> int:
    return sum(map(len, prompts)) + sum(map(len, outputs))


def _ratio(path: list[float], reference: list[float]) -> float:
    """The median of per-prompt ratios: each pair measured back to back."""
    return round(statistics.median(p / r for p, r in zip(path, reference, strict=True)), 3)
