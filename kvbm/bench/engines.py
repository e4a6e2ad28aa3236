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
A phase starts once every engine has said it is ready (imports and attach
done) and has answered the phase before, all at one wall-clock time
(kvbm/bench/engine_crew.py): what is measured is the node, not engines
still starting. Per kind: how many engines took part, p50/p99 latency (of
one request: a load's share of its batch's pin, its copy and its release),
calls/s over all engines, and the node's and the engines' CPU per call. The
node runs with the in-memory index (no etcd): what is measured is the
engine wire, the node's event loop, the key view and the copies.
"""

from __future__ import annotations

import datetime
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from kvbm.bench.engine_crew import Absent, EngineCrew, serve
from kvbm.bench.roundtrips import cpu_s, reference, reference_cores
from kvbm.bench.synthetic import SyntheticEngine
from kvbm.block_key import BlockKey
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
READY_TIMEOUT_S = 120.0  # for every engine's imports and attach (8 at once on 2 cores: ~11 s)
PHASE_GRACE_S = 45.0  # past a phase's end: an engine's last call (30 s timeout) and its result


@dataclass(frozen=True)
class EngineResult:
    """One engine's phase: each call's latency (s), the answers that were
    not the truth, and the CPU the engine process spent (s)."""

    times: list[float]
    wrong: int = 0
    cpu_s: float = 0.0


def engine_process(conn: Connection, sock: str, index: int) -> None:
    """One engine process: attached, it says it is ready, then runs each
    phase the bench starts (kvbm/bench/engine_crew.py)."""
    serve(conn, lambda: _Engine(sock, index))


class _Engine:
    """An engine's calls, as the connector makes them, through its own
    `NodeAttachment`. Each call function makes one call (a load: one step's),
    adds its latency to `times`, and returns 1 when the answer was wrong."""

    def __init__(self, sock: str, index: int) -> None:
        self.att = NodeAttachment(sock, GEOMETRY)
        self.engine = SyntheticEngine(GEOMETRY, PROMPT_BLOCKS)
        self.index = index
        self.rng = random.Random(index)
        self.fresh = 0  # prompts this engine made up so far: each one new
        self.block_ids = list(range(PROMPT_BLOCKS))
        self.calls: dict[str, Callable[[list[float]], int]] = {
            "lookup": self._lookup,
            "miss": self._miss,
            "node_lookup": self._node_lookup,
            "load": self._load,
            "store": self._store,
        }

    def run(self, kind: str, begin: float, seconds: float) -> EngineResult:
        call, times, wrong = self.calls[kind], [], 0
        time.sleep(max(0.0, begin - time.time()))
        cpu = time.process_time()
        while time.time() < begin + seconds:
            wrong += call(times)
        return EngineResult(times, wrong, time.process_time() - cpu)

    def close(self) -> None:
        self.att.close()

    def _held(self) -> list[BlockKey]:
        return self.att.keys(_prompt(self.rng.randrange(SHARED_PROMPTS)))

    def _new(self) -> list[BlockKey]:
        self.fresh += 1
        return self.att.keys([(self.index + 1) << 40 | self.fresh << 8 | i for i in self.block_ids])

    def _timed_lookup(self, keys: list[BlockKey], ask_node: bool, times: list[float]) -> int:
        t0 = time.perf_counter()
        got = self.att.lookup(keys, ask_node=ask_node)
        times.append(time.perf_counter() - t0)
        return got.local

    def _lookup(self, times: list[float]) -> int:
        return int(self._timed_lookup(self._held(), False, times) != PROMPT_BLOCKS)

    def _node_lookup(self, times: list[float]) -> int:
        return int(self._timed_lookup(self._held(), True, times) != PROMPT_BLOCKS)

    def _miss(self, times: list[float]) -> int:
        return int(self._timed_lookup(self._new(), False, times) != 0)

    def _load(self, times: list[float]) -> int:
        batch = [self._held() for _ in range(STEP_LOADS)]
        t0 = time.perf_counter()
        for pinned in self.att.prepare_loads(batch):
            self.att.copy_in(self.engine.kv, pinned.slots, self.block_ids[: len(pinned.slots)])
            self.att.complete_load(pinned.lease)
        times += [(time.perf_counter() - t0) / STEP_LOADS] * STEP_LOADS
        return 0

    def _store(self, times: list[float]) -> int:
        keys = self._new()
        t0 = time.perf_counter()
        self.att.store(self.engine.kv, keys, self.block_ids)
        times.append(time.perf_counter() - t0)
        return 0


def _prompt(i: int) -> list[int]:
    return [(SHARED_PROMPTS + i) << 20 | j for j in range(PROMPT_BLOCKS)]


def run(engines: int = 4, seconds: float = 5.0, ready_timeout: float = READY_TIMEOUT_S) -> dict:
    """The bench's figures; when some engine is not ready within
    `ready_timeout` seconds, `error` and `not_ready` instead of them."""
    if engines < 1 or seconds < 0 or ready_timeout < 0:
        raise ValueError("bench engines: --engines at least 1, --seconds and --ready-timeout >= 0")
    out: dict = {
        "bench": "engines",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "engines": engines,
        "prompt_blocks": PROMPT_BLOCKS,
        "block_kib": GEOMETRY.block_bytes >> 10,
    }
    with tempfile.TemporaryDirectory() as d:
        node = NodeProcess(d, "node", "127.0.0.2", "--host-cache-mb", "256")
        try:
            att = NodeAttachment(node.socket, GEOMETRY)
            try:
                _prime(att)
                out.update(_reference(d, att, node.proc.pid))
                started = time.monotonic()
                with EngineCrew(engine_process, [(node.socket, i) for i in range(engines)]) as crew:
                    not_ready = crew.wait_ready(ready_timeout)
                    if not_ready:
                        return {**out, **_not_ready(not_ready, ready_timeout)}
                    # from the engines' start to the last one's ready: what no phase measures
                    out["engines_ready_s"] = round(time.monotonic() - started, 1)
                    phases = [_phase(crew, kind, seconds, node.proc.pid) for kind in KINDS]
                    # every engine still connected: a lease it failed to settle is still held
                    leases = att.stats()["engine_leases"]
                    absent = [a.to_json() for a in crew.absent]
            finally:
                att.close()
        finally:
            node.stop()
    wrong = 0
    for kind, (results, cpu) in zip(KINDS, phases, strict=True):
        out.update(phase_figures(kind, results, seconds, cpu))
        wrong += sum(r.wrong for r in results)
    out["scheduler_lookup_p50_us"] = out["lookup_p50_us"]
    out["scheduler_miss_p50_us"] = out["miss_p50_us"]
    raw = out["raw_socket_roundtrip_us"]
    out["rpc_vs_socket_roundtrip"] = round(out["node_call_alone_p50_us"] / raw, 2)
    out["leases_left"] = leases  # every load released, every store committed
    out["lookups_wrong"] = wrong  # a hit not seen whole, or a miss seen
    out["engines_absent"] = absent  # engines that left during the phases, and why
    return out


def _prime(att: NodeAttachment) -> None:
    """Store the shared prompts: the lookups' and loads' hits."""
    primer = SyntheticEngine(GEOMETRY, PROMPT_BLOCKS)
    ids = list(range(PROMPT_BLOCKS))
    for i in range(SHARED_PROMPTS):
        keys = att.keys(_prompt(i))
        primer.compute(keys, ids)
        att.store(primer.kv, keys, ids)


def _reference(directory: str, att: NodeAttachment, node_pid: int) -> dict:
    """The raw round trip, and the node's lookup from one engine alone,
    measured the same way (kvbm/bench/roundtrips.py), nothing else running."""
    keys = att.keys(_prompt(0))
    cores = reference_cores()
    ref = reference(directory, cores, lambda: att.lookup(keys, ask_node=True), node_pid)
    return {
        "roundtrip_cores": list(cores) if cores else None,
        "raw_socket_roundtrip_us": ref.raw_us,
        "node_call_alone_p50_us": ref.node_us,
        # what each cost in CPU per call; the rest of a p50 is waiting
        "raw_socket_roundtrip_cpu_us": ref.raw_cpu_us,
        "node_call_alone_engine_cpu_us": ref.node_engine_cpu_us,
        "node_call_alone_node_cpu_us": ref.node_cpu_us,
    }


@dataclass(frozen=True)
class PhaseCpu:
    """CPU seconds spent over one phase: by the node, and by the whole
    machine of `cores` cores (every process, and what the host took from
    this virtual machine); what the engines spent comes with their results."""

    node_s: float
    machine_s: float
    cores: int


def _phase(
    crew: EngineCrew, kind: str, seconds: float, node_pid: int
) -> tuple[list[EngineResult], PhaseCpu]:
    """One phase on every engine in the crew -> each one's result, and the
    CPU spent over the phase."""
    begin = crew.phase(kind, seconds, PHASE_GRACE_S)
    time.sleep(max(0.0, begin - time.time()))
    node, machine = cpu_s(node_pid), _machine_busy_s()
    time.sleep(max(0.0, begin + seconds - time.time()))
    cpu = PhaseCpu(cpu_s(node_pid) - node, _machine_busy_s() - machine, os.cpu_count() or 1)
    return list(crew.results().values()), cpu


def _machine_busy_s() -> float:
    """CPU seconds the machine has not been idle, all cores together: user,
    nice, system, irq, softirq and steal from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def phase_figures(kind: str, results: list[EngineResult], seconds: float, cpu: PhaseCpu) -> dict:
    """One phase's figures from each engine's result: how many engines took
    part, p50/p99, calls/s over all of them, the node's and the engines' CPU
    per call, and the share of the machine's cores that anything else took
    (0 on an idle machine; a run's figures compare only where it is). A
    phase without a call has no latency or CPU per call (None) and 0
    calls/s."""
    times = sorted(t for r in results for t in r.times)
    n = len(times)
    engine_cpu = sum(r.cpu_s for r in results)
    others = None
    if seconds > 0:
        others = (cpu.machine_s - cpu.node_s - engine_cpu) / (cpu.cores * seconds)
        others = round(min(1.0, max(0.0, others)), 2)
    return {
        f"{kind}_p50_us": round(times[n // 2] * 1e6, 1) if n else None,
        f"{kind}_p99_us": round(times[int(n * 0.99)] * 1e6, 1) if n else None,
        PER_S[kind]: round(n / seconds) if n else 0,
        f"node_cpu_us_per_{kind}": round(cpu.node_s / n * 1e6, 1) if n else None,
        f"engine_cpu_us_per_{kind}": round(engine_cpu / n * 1e6, 1) if n else None,
        f"others_cpu_share_{kind}": others,
        f"{kind}_engines": len(results),
    }


def _not_ready(not_ready: list[Absent], timeout: float) -> dict:
    return {
        "error": f"{len(not_ready)} engine(s) not ready within {timeout:g} s; no phase was run",
        "not_ready": [a.to_json() for a in not_ready],
    }
