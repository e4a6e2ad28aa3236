"""`kvbm bench soak`: three nodes under a random load with a fault every few
seconds; every block that reaches an engine is checked against the bytes
first written for its key.

Load: an engine on every node asks for prompts drawn from one pool (shared
document prefixes, skewed popularity), loads what the mesh holds (its node's
tiers, or pulled from a peer's host or disk), checks it, computes the rest
and stores it. Tiers are small, so blocks keep moving G2 -> G3 and out.

Faults, every kind once per turn in a random order, at any moment of the
load: a node SIGKILLed and restarted on its disk arena, a node frozen
(SIGSTOP) for a while, etcd SIGKILLed and restarted, bytes flipped in a
node's disk arena. Node 0 is never killed: its memory growth after the
warm-up is `rss_growth_mb`. `max_pull_ms` is the longest load of an engine
whose own node was not frozen meanwhile (a frozen peer costs its timeout).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from discovery.etcd_server import EtcdServer
from kvbm.bench.synthetic import SyntheticEngine
from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.disk_faults import corrupt_disk
from kvbm.errors import KvbmError
from kvbm.hashing import BlockHasher
from kvbm.layout import ModelGeometry
from kvbm.node_process import NODE_COMMAND, NodeProcess, fleet_secret

GEOMETRY = ModelGeometry(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16)  # 64 KiB
FAULTS = ("kill", "freeze", "etcd", "corrupt")
NODES = 3
PROMPT_BLOCKS = 8
DOCUMENTS = 24  # prompts share a document's first half
PROMPTS = 96
FREEZE_S = 1.5
WARMUP_S = 20.0


@dataclass
class Tally:
    operations: int = 0
    requests: int = 0
    blocks_checked: int = 0
    bytes_moved: int = 0
    wrong_blocks: int = 0
    fallbacks: int = 0
    max_pull_ms: float = 0.0
    sources: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None


class Seat:
    """One engine on one node: its attachment comes and goes with the node."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.att: NodeAttachment | None = None
        self.engine = SyntheticEngine(GEOMETRY, PROMPT_BLOCKS)
        # loads that overlap a freeze of their own node are not timed
        self.frozen = False
        self.thawed_at = 0.0

    def attachment(self) -> NodeAttachment | None:
        if self.att is None:
            try:
                self.att = NodeAttachment(
                    self.node.socket, GEOMETRY, remote=["host", "disk"], timeout=10
                )
            except (NodeError, OSError):
                return None
        return self.att

    def drop(self) -> None:
        if self.att is not None:
            self.att.close()
            self.att = None


class Cluster:
    def __init__(self, tmp: str, etcd: EtcdServer, node_command: Sequence[str]) -> None:
        self.tmp, self.etcd, self.node_command = tmp, etcd, node_command
        self.nodes = [self._start(i) for i in range(NODES)]

    def flags(self, i: int) -> list[str]:
        return [
            "--etcd", self.etcd.endpoint, "--lease-ttl", "3", *fleet_secret(self.tmp),
            "--host-cache-mb", "4",
            "--disk-cache-dir", self.disk_dir(i), "--disk-cache-mb", "16",
            "--disk-admit-min-uses", "1",
            "--peer-timeout-ms", "1000", "--peer-backoff-s", "2",
            "--log-level", "warning",
        ]  # fmt: skip

    def disk_dir(self, i: int) -> str:
        return os.path.join(self.tmp, f"disk-{i}")

    def _start(self, i: int) -> NodeProcess:
        host = f"127.0.0.{i + 2}"
        return NodeProcess(self.tmp, f"node-{i}", host, *self.flags(i), command=self.node_command)

    def restart(self, i: int) -> None:
        self.nodes[i] = self._start(i)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)  # a frozen node cannot take SIGTERM
            node.stop()


def _hasher(node: NodeProcess) -> BlockHasher:
    """The fleet's block hasher, as an engine gets it when it attaches."""
    att = NodeAttachment(node.socket, GEOMETRY, timeout=10, map_arena=False)
    try:
        return att.hasher
    finally:
        att.close()


def run(
    minutes: float,
    faults: tuple[str, ...] = FAULTS,
    fault_every_s: float = 4.0,
    seed: int = 1,
    node_command: Sequence[str] = NODE_COMMAND,
) -> dict:
    """`node_command` runs the nodes another way (a test's unverified node)."""
    rng = random.Random(seed)
    docs = [
        [rng.randrange(32000) for _ in range(PROMPT_BLOCKS // 2 * 16)] for _ in range(DOCUMENTS)
    ]
    tokens = [
        docs[i % DOCUMENTS] + [rng.randrange(32000) for _ in range(PROMPT_BLOCKS // 2 * 16)]
        for i in range(PROMPTS)
    ]
    weights = [1 / (i + 1) ** 0.8 for i in range(PROMPTS)]
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="kvbm-soak-") as tmp, EtcdServer() as etcd:
        cluster = Cluster(tmp, etcd, node_command)
        seats = [Seat(n) for n in cluster.nodes]
        hasher = _hasher(cluster.nodes[0])
        seed_hash = hasher.seed("kvbm-soak")
        prompts = [hasher.sequence_hashes(t, GEOMETRY.block_size, seed_hash) for t in tokens]
        faulter = Faulter(cluster, seats, faults, fault_every_s, seed)
        deadline = time.monotonic() + minutes * 60
        engines = [
            threading.Thread(
                target=_engine,
                args=(seat, prompts, weights, random.Random(seed * 100 + i), deadline, tally),
                daemon=True,
            )
            for i, seat in enumerate(seats)
        ]
        try:
            faulter.start()
            for t in engines:
                t.start()
            time.sleep(min(WARMUP_S, minutes * 15))
            rss_start = _rss_mb(cluster.nodes[0].proc.pid)
            for t in engines:
                t.join()
            faulter.finish()
            if faulter.error is not None:
                raise KvbmError(f"soak: a fault left the cluster broken: {faulter.error}")
            for seat in seats:
                seat.drop()
            leaked = _settle(cluster)
            caught = faulter.caught + sum(_checksum_failures(n) for n in cluster.nodes)
            rss_end = _rss_mb(cluster.nodes[0].proc.pid)
        finally:
            faulter.finish()
            for t in engines:
                t.join()
            for seat in seats:
                seat.drop()
            cluster.stop()
        if tally.error is not None:
            raise KvbmError(f"soak: an engine failed: {tally.error!r}")
    tally.faults = faulter.injected
    return {
        "minutes": minutes,
        "operations": tally.operations,
        "requests": tally.requests,
        "blocks_checked": tally.blocks_checked,
        "bytes_moved": tally.bytes_moved,
        "wrong_blocks": tally.wrong_blocks,
        "blocks_flipped": faulter.flipped,
        "checksum_failures": caught,  # corrupt blocks the nodes caught (served as misses)
        "fallbacks": tally.fallbacks,
        "faults_injected": sum(tally.faults.values()),
        "faults_by_kind": dict(tally.faults),
        "blocks_by_source": dict(tally.sources),
        "max_pull_ms": round(tally.max_pull_ms, 1),
        "rss_growth_mb": round(rss_end - rss_start, 1),
        "leaked_pins": leaked,
    }


def _engine(
    seat: Seat,
    prompts: list[list[int]],
    weights: list[float],
    rng: random.Random,
    deadline: float,
    tally: Tally,
) -> None:
    """One engine on one node, in a thread of its own: engines do not wait for
    each other, so a fault can catch any of them at any point."""
    try:
        while time.monotonic() < deadline:
            att = seat.attachment()
            if att is None:  # its node is down: the engine recomputes
                with tally.lock:
                    tally.fallbacks += 1
                    tally.requests += 1
                time.sleep(0.05)
                continue
            hashes = rng.choices(prompts, weights)[0]
            try:
                if rng.random() < 0.2:
                    att.lookup(att.keys(hashes))
                    with tally.lock:
                        tally.operations += 1
                else:
                    _request(seat, att, hashes, tally)
            except NodeError:
                with tally.lock:
                    tally.fallbacks += 1
                seat.drop()
    except BaseException as e:  # reported by run(): a soak must not hide a crash
        tally.error = e


def _request(seat: Seat, att: NodeAttachment, hashes: list[int], tally: Tally) -> None:
    """Load what the mesh holds, check every block, compute the rest, store all."""
    keys = att.keys(hashes)
    ids = list(range(len(keys)))
    engine = seat.engine
    engine.clear()
    frozen = seat.frozen
    t0 = time.monotonic()
    loaded, sources = att.load(engine.kv, keys, ids)
    ms = (time.monotonic() - t0) * 1000
    if not (frozen or seat.frozen or seat.thawed_at > t0):
        with tally.lock:
            tally.max_pull_ms = max(tally.max_pull_ms, ms)
    wrong = sum(not engine.matches(keys[i], i) for i in range(loaded))
    engine.compute(keys[loaded:], ids[loaded:])
    added = att.store(engine.kv, keys, ids)
    with tally.lock:
        tally.requests += 1
        tally.blocks_checked += loaded
        tally.wrong_blocks += wrong
        tally.sources.update(sources)
        tally.operations += 2
        tally.bytes_moved += (loaded + added) * GEOMETRY.block_bytes


class Faulter(threading.Thread):
    """Injects a fault every `every_s` seconds, at whatever point the load is
    (mid-pull, mid-store): a fault never waits for a quiet moment."""

    def __init__(
        self,
        cluster: Cluster,
        seats: list[Seat],
        kinds: tuple[str, ...],
        every_s: float,
        seed: int,
    ) -> None:
        super().__init__(daemon=True)
        for kind in kinds:
            if kind not in FAULTS:
                raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        self.cluster, self.seats, self.kinds, self.every_s = cluster, seats, kinds, every_s
        self.rng = random.Random(seed + 1)
        self.injected: Counter = Counter()
        self.flipped = 0  # disk blocks corrupted
        self.caught = 0  # checksum failures counted by nodes before they were killed
        self.stopping = threading.Event()
        self.error: Exception | None = None  # a node that did not come back, say

    def run(self) -> None:
        turn: list[str] = []
        while self.kinds and not self.stopping.wait(self.every_s):
            if not turn:  # every kind once per turn, in a random order
                turn = self.rng.sample(self.kinds, len(self.kinds))
            kind = turn.pop()
            try:
                happened = self.inject(kind)
            except Exception as e:
                self.error = e
                return
            if happened:
                self.injected[kind] += 1

    def finish(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join()

    def inject(self, kind: str) -> bool:
        """Inject one fault of `kind`; whether it happened."""
        cluster, rng = self.cluster, self.rng
        if kind == "kill":  # never node 0: its memory is the one measured
            i = rng.randrange(1, NODES)
            self.caught += _checksum_failures(cluster.nodes[i])  # its count dies with it
            cluster.nodes[i].proc.kill()
            cluster.nodes[i].proc.wait(10)
            cluster.restart(i)
            self.seats[i].node = cluster.nodes[i]  # the engine re-attaches to it
        elif kind == "freeze":
            seat = rng.choice(self.seats)
            seat.frozen = True
            os.kill(seat.node.proc.pid, signal.SIGSTOP)
            self.stopping.wait(FREEZE_S)
            os.kill(seat.node.proc.pid, signal.SIGCONT)
            seat.thawed_at = time.monotonic()
            seat.frozen = False
        elif kind == "etcd":
            cluster.etcd.kill()
            time.sleep(0.5)
            cluster.etcd.start()
        else:
            flipped = corrupt_disk(cluster.disk_dir(rng.randrange(NODES)), rng, 8, GEOMETRY)
            self.flipped += flipped
            return flipped > 0  # a disk with nothing on it yet: no fault happened
        return True


def _stats(node: NodeProcess) -> dict:
    """A node's `stats`, or {} where it does not answer."""
    try:
        att = NodeAttachment(node.socket, GEOMETRY, timeout=10, map_arena=False)
    except NodeError:
        return {}
    try:
        return att.stats()
    except NodeError:
        return {}
    finally:
        att.close()


def _checksum_failures(node: NodeProcess) -> int:
    """Blocks a node found corrupt (on its disk, or pulled from a peer) so far."""
    return sum(_stats(node).get("checksum_failures", {}).values())


def _settle(cluster: Cluster, timeout: float = 20.0) -> int:
    """Pins and leases still held once every engine has gone and peer pins had
    time to expire: 0 unless something leaked."""
    deadline = time.monotonic() + timeout
    while True:
        held = 0
        for node in cluster.nodes:
            stats = _stats(node)
            held += stats.get("pinned_for_peers", 0) + stats.get("engine_leases", 0)
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
