"""`python -m kvbm.gpu_check` (run by scripts/gpu-check, which installs vLLM
for CUDA first): the connector with a GPU engine, end to end, on one machine.

An etcd, node A on 127.0.0.2 and node B on 127.0.0.3, a random small Llama
(4 layers, 4 heads of 128), vLLM's own defaults otherwise (its attention
backend, its KV cache layout, CUDA graphs). fp32 by default: a block loaded
is then the same computation as recomputing it, so greedy outputs must be
equal (`--dtype bfloat16` takes the FlashAttention path; there a loaded
prompt's last token is computed in another GEMM shape than in a full
prefill, and a greedy token of a random model may flip: the line then
reports the share of equal tokens):
1. vLLM alone answers the prompts: the reference;
2. engine 1 on node A computes them (its connector saves every full block);
3. engine 2 on node B loads them from A's host tier and answers again, then
   once more from its own host tier.
Prints one JSON line: outputs equal the reference, the blocks each step
loaded, the layout the engines registered; exit 0 when all of it holds.
Without a CUDA device it says so and exits 3.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 4, 512, 4, 4, 1024
BLOCK, PROMPTS, BLOCKS_PER_PROMPT, ANSWER = 16, 4, 6, 16
NO_DEVICE = 3


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="gpu-check")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"check": "gpu", "ok": False, "dtype": args.dtype}
    if not torch.cuda.is_available():
        out["reason"] = "no CUDA device (torch.cuda.is_available() is False)"
        print(json.dumps(out))
        return NO_DEVICE
    out["device"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    try:
        out.update(_check(args.dtype))
    except Exception as e:  # one JSON line whatever happens
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
    return 0 if out["ok"] else 1


def _check(dtype: str) -> dict[str, Any]:
    import random

    import vllm

    from discovery.etcd_server import EtcdServer
    from kvbm.bench.e2e import Engine
    from kvbm.connector.attach import NodeAttachment, node_stats
    from kvbm.connector.identity import checkpoint_identity
    from kvbm.engine_wire import geometry_from_wire
    from kvbm.node_process import NodeProcess, fleet_secret
    from kvbm.random_llama import build_llama

    rng = random.Random(0)
    tokens = BLOCKS_PER_PROMPT * BLOCK + 1
    prompts = [[rng.randrange(4, VOCAB) for _ in range(tokens)] for _ in range(PROMPTS)]
    usable = (tokens - 1) // BLOCK
    llm_args = {
        "dtype": dtype,
        "block_size": BLOCK,
        "max_model_len": 1024,
        "enforce_eager": False,
        "gpu_memory_utilization": 0.3,
    }
    res: dict[str, Any] = {"vllm": vllm.__version__}
    with tempfile.TemporaryDirectory(prefix="kvbm-gpu-check-") as d, EtcdServer() as etcd:
        model = build_llama(os.path.join(d, "model"), LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB)
        index = ["--etcd", etcd.endpoint, "--lease-ttl", "3", *fleet_secret(d)]
        a = NodeProcess(d, "node-a", "127.0.0.2", *index, "--host-cache-mb", "512")
        b = None
        try:
            b = NodeProcess(d, "node-b", "127.0.0.3", *index, "--host-cache-mb", "512")

            def answers(extra: dict | None) -> list[list[int]]:
                engine = Engine(model, extra, llm_args=llm_args)
                try:
                    return [engine.ask(p, ANSWER)[0] for p in prompts]
                finally:
                    engine.close()

            reference = answers(None)
            first = answers({"node": a.socket})
            geometry = geometry_from_wire(node_stats(a.socket)["geometry"])
            probe = NodeAttachment(b.socket, geometry, remote=["host"])
            try:
                seed = probe.hasher.seed(checkpoint_identity(model, dtype=dtype))
                keys = [
                    probe.keys(probe.hasher.sequence_hashes(p, BLOCK, seed)[:usable])
                    for p in prompts
                ]
                deadline = time.monotonic() + 15
                while any(probe.lookup(k).total < usable for k in keys):
                    if time.monotonic() > deadline:
                        raise RuntimeError("node B never saw node A's blocks")
                    time.sleep(0.1)
                engine = Engine(
                    model, {"node": b.socket, "remote_tiers": ["host"]}, False, llm_args
                )
                try:
                    second = [engine.ask(p, ANSWER)[0] for p in prompts]
                    after_remote = dict(probe.stats()["engine_blocks"])
                    third = [engine.ask(p, ANSWER)[0] for p in prompts]
                    after_local = dict(probe.stats()["engine_blocks"])
                finally:
                    engine.close()
                res["geometry"] = probe.stats()["geometry"]
                res["leases_left"] = probe.stats()["engine_leases"]
            finally:
                probe.close()
        finally:
            if b is not None:
                b.stop()
            a.stop()
    want = PROMPTS * usable
    runs = (first, second, third)
    same = sum(
        x == y
        for run in runs
        for o, r in zip(run, reference, strict=True)
        for x, y in zip(o, r, strict=True)
    )
    res.update(
        outputs_identical=all(run == reference for run in runs),
        equal_token_fraction=round(same / (len(runs) * PROMPTS * ANSWER), 3),
        blocks_expected=want,
        remote_host_blocks=after_remote["remote_host"],
        local_host_blocks=after_local["local_host"] - after_remote["local_host"],
    )
    res["ok"] = (
        (res["outputs_identical"] or dtype != "float32")
        and res["remote_host_blocks"] == want
        and res["local_host_blocks"] == want
        and res["leases_left"] == 0
    )
    return res


if __name__ == "__main__":
    sys.exit(main())
