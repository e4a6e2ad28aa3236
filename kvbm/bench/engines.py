"""`kvbm bench engines --engines N`: N engine processes against one node, each
issuing the connector's calls at full speed, against a raw unix-socket round
trip between two processes measured in the same run.

Each engine (a `NodeAttachment` in its own process, as a vLLM engine's
scheduler and worker hold one) issues, on prompts of 16 blocks, each of the
connector's calls in turn, every engine at once, for `seconds` each:
- `lookup`: what vLLM's scheduler does for every waiting request (the
  connector's `get_num_new_matched_tokens`): read the node's key view
  (kvbm/key_view.py), no round trip;
- `miss`: the same for a prompt nobody has;
- `node_lookup`: the node's own lookup, one round trip (also measured
  first with one engine alone, as the raw round trip is: the node call over
  the raw one, `rpc_vs_socket_roundtrip`);
- `load`: what a step with STEP_LOADS hits costs, as the connector does it:
  the scheduler pins them all in one `load_many`, the worker copies each
  into the engine's tensors and releases it;
- `store`: a prompt nobody has (`reserve`; the copy out; `commit`).
Per kind: p50/p99 latency (of one request: a load's share of its batch's
pin, its copy and its release), calls/s over all engines, and the node's
CPU per call (from /proc). The node runs with the in-memory index (no
etcd): what is measured is the engine wire, the node's event loop, the key
view and the copies.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import random
import socket
import statistics
import tempfile
import time
from multiprocessing.connection import Connection

from kvbm.bench.synthetic import SyntheticEngine
from kvbm.connector.attach import NodeAttachment
from kvbm.layout import ModelGeometry
from kvbm.node_process import NodeProcess

# Small blocks (16 KiB): the calls, not the copies, are what this bench is about.
GEOMETRY = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
PROMPT_BLOCKS = 16
SHARED_PROMPTS = 32  # stored before the clock starts: the lookups' and loads' hits
KINDS = ("lookup", "miss", "node_lookup", "load", "store")
PER_S = {  # each kind's calls/s figure
    "lookup": "lookups_per_s",
    "miss": "misses_per_s",
    "node_lookup": "node_lookups_per_s",
    "load": "load_release_per_s",
    "store": "stores_per_s",
}
STEP_LOADS = 8  # hits the scheduler pins in one call
PAUSE_S = 0.5  # between two phases


def _engine(sock: str, index: int, seconds: float, out: Connection) -> None:
    """One engine process: each call kind in turn, as fast as it goes, for
    `seconds` from its phase's start (every engine in the same phase). It
    says when it is ready and takes the start time then: engines that start
    slowly (8 of them importing torch on 2 cores) join every phase."""
    att = NodeAttachment(sock, GEOMETRY)
    engine = SyntheticEngine(GEOMETRY, PROMPT_BLOCKS)
    out.send("ready")
    start = out.recv()
    rng = random.Random(index)
    block_ids = list(range(PROMPT_BLOCKS))
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    fresh = wrong = 0
    for phase, kind in enumerate(KINDS):
        begin = start + phase * (seconds + PAUSE_S)
        while time.time() < begin:
            time.sleep(0.001)
        while time.time() < begin + seconds:
            if kind in ("store", "miss"):  # a prompt nobody has
                keys = att.keys([(index + 1) << 40 | fresh << 8 | i for i in block_ids])
                fresh += 1
            else:
                keys = att.keys(_prompt(rng.randrange(SHARED_PROMPTS)))
            if kind == "load":
                picks = [rng.randrange(SHARED_PROMPTS) for _ in range(STEP_LOADS)]
                batch = [att.keys(_prompt(i)) for i in picks]
                t0 = time.perf_counter()
                for pinned in att.prepare_loads(batch):
                    att.copy_in(engine.kv, pinned.slots, block_ids[: len(pinned.slots)])
                    att.complete_load(pinned.lease)
                took = (time.perf_counter() - t0) / STEP_LOADS
                times[kind] += [took] * STEP_LOADS
                continue
            t0 = time.perf_counter()
            if kind == "store":
                att.store(engine.kv, keys, block_ids)
            else:
                got = att.lookup(keys, ask_node=kind == "node_lookup")
            times[kind].append(time.perf_counter() - t0)
            if kind != "store" and got.local != (0 if kind == "miss" else PROMPT_BLOCKS):
                wrong += 1
    out.send((times, wrong))
    out.recv()  # still connected while the parent counts the node's leases
    att.close()


def _prompt(i: int) -> list[int]:
    return [(SHARED_PROMPTS + i) << 20 | j for j in range(PROMPT_BLOCKS)]


def _echo(path: str, ready: Connection) -> None:
    """The raw reference's far end: a process that sends back what it reads."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.send(True)
    conn, _ = srv.accept()
    while data := conn.recv(65536):
        conn.sendall(data)


def raw_roundtrip_us(directory: str, payload: int = 700, n: int = 5000) -> float:
    """p50 of a round trip of `payload` bytes (about a 16-key lookup's frame)
    between two Python processes over a unix socket."""
    path = os.path.join(directory, "echo.sock")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(path, child), daemon=True)
    proc.start()
    try:
        parent.recv()
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.connect(path)
        data, times = b"x" * payload, []
        for _ in range(n):
            t0 = time.perf_counter()
            cli.sendall(data)
            got = 0
            while got < payload:
                got += len(cli.recv(65536))
            times.append(time.perf_counter() - t0)
        cli.close()
        return statistics.median(times) * 1e6
    finally:
        proc.kill()
        proc.join(5)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(engines: int = 4, seconds: float = 5.0) -> dict:
    out: dict = {
        "bench": "engines",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "engines": engines,
        "prompt_blocks": PROMPT_BLOCKS,
        "block_kib": GEOMETRY.block_bytes >> 10,
    }
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        out["raw_socket_roundtrip_us"] = round(raw_roundtrip_us(d), 1)
        node = NodeProcess(d, "node", "127.0.0.2", "--host-cache-mb", "256")
        try:
            att = NodeAttachment(node.socket, GEOMETRY)
            primer = SyntheticEngine(GEOMETRY, PROMPT_BLOCKS)
            ids = list(range(PROMPT_BLOCKS))
            for i in range(SHARED_PROMPTS):
                keys = att.keys(_prompt(i))
                primer.compute(keys, ids)
                att.store(primer.kv, keys, ids)
            # the node's call as the raw reference is measured: one client alone
            keys = att.keys(_prompt(0))
            alone = []
            for _ in range(3000):
                t0 = time.perf_counter()
                att.lookup(keys, ask_node=True)
                alone.append(time.perf_counter() - t0)
            out["node_call_alone_p50_us"] = round(statistics.median(alone) * 1e6, 1)
            pipes, procs = [], []
            for i in range(engines):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_engine, args=(node.socket, i, seconds, child))
                proc.start()
                pipes.append(parent)
                procs.append(proc)
            for pipe in pipes:  # every engine connected and waiting
                if not pipe.poll(120) or pipe.recv() != "ready":
                    raise RuntimeError("an engine process never got ready")
            start = time.time() + 0.5
            for pipe in pipes:
                pipe.send(start)
            cpu = []
            for phase in range(len(KINDS)):
                begin = start + phase * (seconds + PAUSE_S)
                time.sleep(max(0.0, begin - time.time()))
                before = _cpu_s(node.proc.pid)
                time.sleep(max(0.0, begin + seconds - time.time()))
                cpu.append(_cpu_s(node.proc.pid) - before)
            results, wrong = zip(*[p.recv() for p in pipes], strict=True)
            # every engine still connected: a lease it failed to settle is still held
            leases = att.stats()["engine_leases"]
            for pipe in pipes:
                pipe.send("bye")
            for proc in procs:
                proc.join(30)
            att.close()
        finally:
            node.stop()
    for kind, node_cpu in zip(KINDS, cpu, strict=True):
        times = sorted(t for r in results for t in r[kind])
        out[f"{kind}_p50_us"] = round(times[len(times) // 2] * 1e6, 1)
        out[f"{kind}_p99_us"] = round(times[int(len(times) * 0.99)] * 1e6, 1)
        out[PER_S[kind]] = round(len(times) / seconds)
        out[f"node_cpu_us_per_{kind}"] = round(node_cpu / max(1, len(times)) * 1e6, 1)
    out["scheduler_lookup_p50_us"] = out["lookup_p50_us"]
    out["scheduler_miss_p50_us"] = out["miss_p50_us"]
    raw = out["raw_socket_roundtrip_us"]
    out["rpc_vs_socket_roundtrip"] = round(out["node_call_alone_p50_us"] / raw, 2)
    out["leases_left"] = leases  # every load released, every store committed
    out["lookups_wrong"] = sum(wrong)  # a hit not seen whole, or a miss seen
    return out
