"""`python -m kvbm.gpu_check` (run by scripts/gpu-check, which installs vLLM
for CUDA first): the connector with GPU engines, end to end, on one machine,
one row at a time (kvbm/gpu_rows.py; `--list` prints them, `--row NAME`
picks some, every row runs by default).

Each row builds a random model on the spot (kvbm/gpu_models.py) and runs it
with vLLM's own defaults otherwise (its attention backend, its KV cache
layout, CUDA graphs). fp32 by default: a block loaded is then the same
computation as recomputing it, so greedy outputs must be equal (`--dtype
bfloat16` takes the FlashAttention path; there a loaded prompt's last token
is computed in another GEMM shape than in a full prefill, and a greedy
token of a random model may flip: the line then reports the share of equal
tokens). A row kvbm serves (an etcd, node A on 127.0.0.2, node B on
127.0.0.3):
1. vLLM alone answers the prompts: the reference;
2. engine 1 on node A computes them (its connector saves every full block);
3. engine 2 on node B loads them from A's host tier and answers again, then
   once more from its own host tier.
A row kvbm turns itself off for (one node): vLLM alone answers, then an
engine with kvbm configured; it must start, answer the same, and the node
must show why kvbm is off and hold no block.

Prints one JSON line per row; exit 0 when every row holds. Without a CUDA
device it says so and exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

from kvbm.gpu_models import VOCAB
from kvbm.gpu_rows import Expect, GpuRow, rows_named

BLOCK, PROMPTS, BLOCKS_PER_PROMPT, ANSWER = 16, 4, 6, 16
NO_DEVICE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--row", action="append", metavar="NAME", help="a row to run (repeat)")
    parser.add_argument("--list", action="store_true", help="print the rows, run nothing")
    args = parser.parse_args(argv)
    try:
        rows = rows_named(args.row)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        for row in rows:
            print(json.dumps(row.plan()))
        return 0
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        print(json.dumps({"check": "gpu", "ok": False, "reason": reason}))
        return NO_DEVICE
    failed = 0
    for row in rows:
        out: dict[str, Any] = {"check": "gpu", "row": row.name, "ok": False, "dtype": args.dtype}
        out.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
        try:
            out.update(run_row(row, args.dtype))
        except Exception as e:  # one JSON line a row whatever happens
            out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out), flush=True)
        failed += not out["ok"]
    return 1 if failed else 0


def prompts() -> list[list[int]]:
    """The rows' prompts: six full blocks and one token each, random ids."""
    rng = random.Random(0)
    tokens = BLOCKS_PER_PROMPT * BLOCK + 1
    return [[rng.randrange(4, VOCAB) for _ in range(tokens)] for _ in range(PROMPTS)]


def llm_args(row: GpuRow, dtype: str) -> dict[str, Any]:
    """vLLM's arguments for the row's engines (the row's over the check's)."""
    args = {
        "dtype": dtype,
        "block_size": BLOCK,
        "max_model_len": 1024,
        "enforce_eager": False,
        "gpu_memory_utilization": 0.3,
    }
    args.update(row.vllm_args)
    return args


def run_row(row: GpuRow, dtype: str) -> dict[str, Any]:
    import vllm

    from kvbm.gpu_models import BUILDERS

    with tempfile.TemporaryDirectory(prefix="kvbm-gpu-check-") as d:
        model = BUILDERS[row.model](os.path.join(d, "model"))
        check = _served if row.expect is Expect.SERVED else _off
        res = check(d, model, llm_args(row, dtype))
    res["vllm"] = vllm.__version__
    return res


def _answers(model: str, extra: dict | None, args: dict, asked: list[list[int]]) -> list:
    """One engine's greedy answers (`extra`: the connector's; None: vLLM alone)."""
    from kvbm.bench.e2e import Engine

    engine = Engine(model, extra, llm_args=args)
    try:
        return [engine.ask(p, ANSWER)[0] for p in asked]
    finally:
        engine.close()


def compare(runs: list[list[list[int]]], reference: list[list[int]]) -> dict[str, Any]:
    """How far every run's answers equal the reference's."""
    same = sum(
        x == y
        for run in runs
        for o, r in zip(run, reference, strict=True)
        for x, y in zip(o, r, strict=True)
    )
    return {
        "outputs_identical": all(run == reference for run in runs),
        "equal_token_fraction": round(same / (len(runs) * len(reference) * ANSWER), 3),
    }


def _served(d: str, model: str, args: dict) -> dict[str, Any]:
    from discovery.etcd_server import EtcdServer
    from kvbm.bench.e2e import Engine
    from kvbm.connector.attach import NodeAttachment, node_stats
    from kvbm.connector.identity import checkpoint_identity
    from kvbm.engine_wire import geometry_from_wire
    from kvbm.node_process import NodeProcess, fleet_secret

    asked = prompts()
    usable = BLOCKS_PER_PROMPT
    res: dict[str, Any] = {}
    with EtcdServer() as etcd:
        index = ["--etcd", etcd.endpoint, "--lease-ttl", "3", *fleet_secret(d)]
        a = NodeProcess(d, "node-a", "127.0.0.2", *index, "--host-cache-mb", "512")
        b = None
        try:
            b = NodeProcess(d, "node-b", "127.0.0.3", *index, "--host-cache-mb", "512")
            reference = _answers(model, None, args, asked)
            first = _answers(model, {"node": a.socket}, args, asked)
            geometry = geometry_from_wire(node_stats(a.socket)["geometry"])
            probe = NodeAttachment(b.socket, geometry, remote=["host"])
            try:
                seed = probe.hasher.seed(checkpoint_identity(model, dtype=args["dtype"]))
                keys = [
                    probe.keys(probe.hasher.sequence_hashes(p, BLOCK, seed)[:usable]) for p in asked
                ]
                deadline = time.monotonic() + 15
                while any(probe.lookup(k).total < usable for k in keys):
                    if time.monotonic() > deadline:
                        raise RuntimeError("node B never saw node A's blocks")
                    time.sleep(0.1)
                engine = Engine(model, {"node": b.socket, "remote_tiers": ["host"]}, False, args)
                try:
                    second = [engine.ask(p, ANSWER)[0] for p in asked]
                    after_remote = dict(probe.stats()["engine_blocks"])
                    third = [engine.ask(p, ANSWER)[0] for p in asked]
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
    res.update(compare([first, second, third], reference))
    res.update(
        blocks_expected=want,
        remote_host_blocks=after_remote["remote_host"],
        local_host_blocks=after_local["local_host"] - after_remote["local_host"],
    )
    res["ok"] = (
        (res["outputs_identical"] or args["dtype"] != "float32")
        and res["remote_host_blocks"] == want
        and res["local_host_blocks"] == want
        and res["leases_left"] == 0
    )
    return res


def _off(d: str, model: str, args: dict) -> dict[str, Any]:
    from kvbm.connector.attach import node_stats
    from kvbm.node_process import NodeProcess, fleet_secret

    asked = prompts()
    a = NodeProcess(d, "node-a", "127.0.0.2", *fleet_secret(d), "--host-cache-mb", "512")
    try:
        reference = _answers(model, None, args, asked)
        configured = _answers(model, {"node": a.socket}, args, asked)
        stats = node_stats(a.socket)
    finally:
        a.stop()
    res = compare([configured], reference)
    refusals = [r for r in stats.get("engine_refusals", []) if r["kind"] == "kv_cache"]
    res.update(
        refusals=[r["reason"] for r in refusals],
        host_blocks=stats["tiers"]["host"]["blocks"],
    )
    res["ok"] = (
        (res["outputs_identical"] or args["dtype"] != "float32")
        and len(refusals) == 1
        and res["host_blocks"] == 0
    )
    return res


if __name__ == "__main__":
    sys.exit(main())
