"""`kvbm bench e2e`: time to first token with real vLLM (CPU) on a random
8-layer, 1024-hidden fp32 Llama and 1024-token prompts, block size 32.

Measured in one run, each engine its own process (VLLM_CPU_NUM_OF_RESERVED_CPU=1),
the three hit figures side by side, prompt by prompt, so that they share the
machine's state:
- recompute: vLLM alone, prefix caching off;
- engine prefix hit: vLLM alone with its own prefix cache, the prompt seen
  before (the physical reference: an offload tier cannot beat it);
- local host hit: an engine on node A, prefix caching off, the prompt in A's
  host tier;
- remote host / remote disk hit: an engine on node B, the prompt only in A's
  host tier / only on A's disk.
TTFT is the wall time of a request with max_tokens 1; each figure is a median
over several prompts. Every request's token is compared with vLLM alone's.
"""

from __future__ import annotations

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
from kvbm.bench.model import build_llama
from kvbm.connector.attach import NodeAttachment
from kvbm.layout import ModelGeometry
from kvbm.node_process import NodeProcess

LAYERS, HIDDEN, HEADS, KV_HEADS, BLOCK, PROMPT = 8, 1024, 8, 8, 32, 1024
VOCAB = 4096
GEOMETRY = ModelGeometry(LAYERS, KV_HEADS, HIDDEN // HEADS, BLOCK)
ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "ERROR",  # vLLM logs to stdout; the caller prints there
}


def _engine(model: str, extra: dict | None, prefix_caching: bool, conn: Connection) -> None:
    """One vLLM engine: answers (prompt, max_tokens) with (tokens, seconds)."""
    os.environ.update(ENV)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvbm.connector.vllm import kv_transfer_config

    transfer = kv_transfer_config(extra) if extra is not None else None
    llm = LLM(
        model=model,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=2 * PROMPT,
        enforce_eager=True,
        enable_prefix_caching=prefix_caching,
        kv_transfer_config=transfer,
        seed=0,
    )
    conn.send("ready")
    try:
        while (msg := conn.recv()) is not None:
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
    def __init__(self, model: str, extra: dict | None = None, prefix_caching: bool = False):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine, args=(model, extra, prefix_caching, child))
        self.proc.start()
        if not self.conn.poll(600) or self.conn.recv() != "ready":
            raise RuntimeError("the vLLM engine did not start")

    def ask(self, prompt: list[int], max_tokens: int = 1) -> tuple[list[int], float]:
        self.conn.send((prompt, max_tokens))
        if not self.conn.poll(600):
            raise RuntimeError("the vLLM engine did not answer")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(120)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


def _ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 1)


def run(prompts: int = 6, workdir: str | None = None) -> dict:
    rng = random.Random(0)
    host_set = [[rng.randrange(4, VOCAB) for _ in range(PROMPT)] for _ in range(prompts)]
    disk_set = [[rng.randrange(4, VOCAB) for _ in range(PROMPT)] for _ in range(prompts)]
    set_mb = prompts * (PROMPT // BLOCK) * GEOMETRY.slot_bytes >> 20
    out: dict = {
        "bench": "e2e",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "model": {"layers": LAYERS, "hidden": HIDDEN, "kv_heads": KV_HEADS, "dtype": "float32"},
        "prompt_tokens": PROMPT,
        "block_size": BLOCK,
        "prompts_per_figure": prompts,
    }
    with (
        tempfile.TemporaryDirectory(prefix="kvbm-bench-e2e-", dir=workdir) as d,
        EtcdServer() as etcd,
    ):
        model = build_llama(os.path.join(d, "model"), LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB)
        reference: dict[tuple[int, ...], list[int]] = {}
        same = True

        def timed(engine: Engine, batch: list[list[int]]) -> list[float]:
            nonlocal same
            seconds = []
            for p in batch:
                tokens, took = engine.ask(p)
                same &= reference.setdefault(tuple(p), tokens) == tokens
                seconds.append(took)
            return seconds

        alone = Engine(model)
        try:
            out["recompute_ttft_ms"] = _ms(timed(alone, host_set + disk_set))
        finally:
            alone.close()
        # A's host tier holds one prompt set exactly: the second pushes the first to disk
        a_tiers = ["--host-cache-mb", str(set_mb), "--disk-cache-mb", str(2 * set_mb)]
        a_tiers += ["--disk-cache-dir", os.path.join(d, "a-disk")]
        index = ["--etcd", etcd.endpoint, "--disk-admit-min-uses", "1"]
        nodes = [NodeProcess(d, "node-a", "127.0.0.2", *index, *a_tiers)]
        engines: list[Engine] = []
        try:
            b_tiers = ["--host-cache-mb", str(3 * set_mb)]
            nodes.append(NodeProcess(d, "node-b", "127.0.0.3", *index, *b_tiers))
            on_a = Engine(model, {"node": os.path.join(d, "node-a.sock")})
            engines.append(on_a)
            timed(on_a, disk_set + host_set)  # computed and saved; disk_set spills
            cached = Engine(model, prefix_caching=True)
            engines.append(cached)
            timed(cached, host_set)  # seen once
            remote = {"node": os.path.join(d, "node-b.sock"), "remote_tiers": ["host", "disk"]}
            on_b = Engine(model, remote)
            engines.append(on_b)
            # Side by side, prompt by prompt: the same machine state for all three.
            figures: dict[str, list[float]] = {"engine": [], "local": [], "remote": []}
            for p in host_set:
                figures["engine"] += timed(cached, [p])
                figures["local"] += timed(on_a, [p])
                figures["remote"] += timed(on_b, [p])  # its first sight of p: from A
            out["engine_prefix_hit_ttft_ms"] = _ms(figures["engine"])
            out["local_host_hit_ttft_ms"] = _ms(figures["local"])
            out["remote_host_hit_ttft_ms"] = _ms(figures["remote"])
            out["remote_disk_hit_ttft_ms"] = _ms(timed(on_b, disk_set))
            probe = NodeAttachment(os.path.join(d, "node-b.sock"), GEOMETRY)
            served = out["node_b_engine_blocks"] = probe.stats()["engine_blocks"]
            probe.close()
            # every hit came from where its figure says
            each = prompts * ((PROMPT - 1) // BLOCK)
            out["sources_as_labelled"] = served["remote_host"] == served["remote_disk"] == each
        finally:
            for engine in engines:
                engine.close()
            for node in nodes:
                node.stop()
        out["outputs_identical"] = same
    hit = out["local_host_hit_ttft_ms"]
    out["local_host_vs_engine_hit"] = round(hit / out["engine_prefix_hit_ttft_ms"], 3)
    out["remote_host_vs_local_host"] = round(out["remote_host_hit_ttft_ms"] / hit, 3)
    out["recompute_vs_remote_host"] = round(
        out["recompute_ttft_ms"] / out["remote_host_hit_ttft_ms"], 3
    )
    return out
