"""`kvbm node`: the daemon a DaemonSet runs, one per machine.

It owns the node's tiers, created for the model geometry of the first engine
that attaches (a node serves one geometry; an engine of another model is
refused with a clear error), the NIXL agent on the host arena, the peer RPC
server, the index (etcd, or in memory for one node) with a publisher that
feeds it every change of the tiers, and the unix socket engines attach to.

An engine's `load` is where the tiers meet: the local prefix (G2, G3 staged
into G2), then, where the engine allows remote tiers, the runs that peers hold
after it (from the index mirror: no etcd round trip), pulled and verified into
G2, all of it pinned until the engine has copied it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from discovery.errors import IndexUnavailable
from discovery.etcd_index import EtcdIndex
from discovery.memory import MemoryIndex
from discovery.records import NodeRecord
from discovery.records import Tier as IndexTier
from kvbm import __version__, engine_wire
from kvbm.block_key import BlockKey
from kvbm.config import KvbmConfig
from kvbm.errors import GeometryMismatch, KvbmError
from kvbm.hashing import Verify, content_matches
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager, LoadPlan, StorePlan, build_manager
from kvbm.node.http import MetricsServer
from kvbm.peer_tiers import ManagerTiers
from transport.errors import ProtocolError, TransportError
from transport.frames import Message
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import ROUND_BLOCKS, PeerClient, PeerServer, pull
from transport.secret import load_secret

log = logging.getLogger("kvbm.node")
PUBLISH_INTERVAL_S = 0.02
INDEX_RETRY_S = 2.0
INDEX_FIRST_WAIT_S = 5.0
MAX_KEYS = 8192
SEAL_BATCH = 16  # blocks summed per step of the background sealer
SEAL_IDLE_S = 0.05  # how often the sealer looks for new blocks when it has none
_NO_METRICS = CollectorRegistry()  # what /metrics shows before an engine attaches


@dataclass
class Lease:
    """Pins (a load) or reserved slots (a store) an engine holds. Any engine
    connection of the node may settle it by id (vLLM's scheduler takes a load
    and its worker, another process, releases it after copying); if nobody
    does, it is settled when the connection that took it ends."""

    plan: LoadPlan | StorePlan
    owner: int  # the engine connection that took it


@dataclass
class Serving:
    """What exists once the first engine has said which geometry it needs."""

    mgr: BlockManager
    tiers: ManagerTiers
    agent: NixlAgent
    peer_server: PeerServer
    peer_address: str  # HOST:PORT peers call


class Node:
    """Invariants: `serving` is set once and never changes geometry; every
    lease is settled exactly once: by an engine, or when the connection that
    took it ends; `index` is None only while etcd has not been reached
    yet (local serving goes on meanwhile)."""

    def __init__(self, cfg: KvbmConfig, secret: bytes, verify: Verify = content_matches) -> None:
        self.cfg = cfg
        self.secret = secret
        self.verify = verify
        self.node_id = cfg.node_id or default_node_id()
        self.serving: Serving | None = None
        self.index: EtcdIndex | MemoryIndex | None = None
        self.peers: dict[str, PeerClient] = {}
        self._closing: set[asyncio.Task] = set()  # clients of forgotten peers, closing
        self.avoided: dict[str, float] = {}  # peer -> monotonic time it may be asked again
        self.ready = False
        self._setup = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._engines: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._metrics: MetricsServer | None = None
        self._lease_ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.leases: dict[int, Lease] = {}

    # -- life cycle --------------------------------------------------------
    async def start(self) -> None:
        arena_dir = self.cfg.host_arena_dir  # fail at start, not at the first engine's hello
        if not os.path.isdir(arena_dir) or not os.access(arena_dir, os.W_OK | os.X_OK):
            raise KvbmError(f"host_arena_dir {arena_dir} is not a writable directory")
        if self.cfg.disk_enabled:  # fail at start, not at the first engine's hello
            directory = self.cfg.disk_cache_dir
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise KvbmError(f"disk_cache_dir {directory} is unusable: {e}") from e
            if not os.access(directory, os.W_OK | os.X_OK):
                raise KvbmError(f"disk_cache_dir {directory} is not writable")
        path = self.cfg.socket
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _claim_socket_path(path)
        self._engines = await asyncio.start_unix_server(self._serve_engine, path)
        os.chmod(path, 0o660)
        if self.cfg.shared_gid is not None:
            os.chown(path, -1, self.cfg.shared_gid)
        if self.cfg.metrics_port:
            host, _ = self.cfg.listen_address
            self._metrics = MetricsServer(lambda: self.ready, self._registry)
            await self._metrics.start(host, self.cfg.metrics_port)
        self.ready = True
        log.info("node ready node=%s socket=%s", self.node_id, path)

    async def stop(self) -> None:
        """Stop accepting, end engine connections (settling their leases),
        publish the last changes, revoke the lease, free everything."""
        self.ready = False
        if self._engines is not None:
            self._engines.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.serving is not None and self.index is not None:
            self._publish()
        if self.index is not None:
            await self.index.close()
        for client in self.peers.values():
            await client.close()
        if self._closing:
            await asyncio.wait(list(self._closing))
        if self.serving is not None:
            await self.serving.peer_server.close()
            self.serving.agent.close()
            self.serving.mgr.close()
        if self._metrics is not None:
            await self._metrics.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.socket)
        log.info("node stopped node=%s", self.node_id)

    async def serve(self, geometry: ModelGeometry) -> Serving:
        """The node's tiers, built for the first geometry an engine brings."""
        async with self._setup:
            if self.serving is not None:
                if self.serving.mgr.geometry != geometry:
                    raise GeometryMismatch(
                        f"this node serves {self.serving.mgr.geometry}; an engine of "
                        f"{geometry} needs a node of its own (another --socket)"
                    )
                return self.serving
            mgr = await asyncio.to_thread(build_manager, self.cfg, geometry, self.verify)
            agent = server = None
            try:
                mgr.track_changes()
                agent = NixlAgent(
                    f"kvbm-{self.node_id}", mgr.host.arena.array.ctypes.data, mgr.host.arena.size
                )
                tiers = ManagerTiers(mgr)
                # a peer may pin a quarter of the arena, all peers half of it
                # (but always two pull rounds: a small arena is no use otherwise)
                per_peer = max(2 * ROUND_BLOCKS, mgr.host.num_slots // 4)
                total = max(per_peer, mgr.host.num_slots // 2)
                server = PeerServer(
                    tiers, agent, self.secret, max_pins_per_peer=per_peer, max_pins_total=total
                )
                host, port = self.cfg.listen_address
                port = await server.start(host, port)
            except BaseException:
                if server is not None:
                    await server.close()
                if agent is not None:
                    agent.close()
                mgr.close()
                raise
            record = NodeRecord(
                self.node_id,
                host,
                port,
                nixl_agent=agent.name,
                fingerprints=(geometry.fingerprint,),
                host_capacity_blocks=mgr.host.num_slots,
                disk_capacity_blocks=mgr.disk.num_slots if mgr.disk else 0,
                version=__version__,
            )
            self.serving = Serving(mgr, tiers, agent, server, f"{host}:{port}")
            joined = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._join_index(record, joined)))
            if self.cfg.etcd_endpoints or mgr.disk is not None:  # else no block leaves G2
                self._tasks.append(asyncio.create_task(self._seal_in_background(mgr)))
            # The first engine's first request should already see its peers: wait
            # for the index a little (if etcd is away, serving starts without it).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(joined.wait(), INDEX_FIRST_WAIT_S)
            log.info(
                "serving geometry=%s peer_port=%d arena=%s huge_page_mb=%d",
                geometry,
                port,
                mgr.host.arena.directory,
                mgr.host.arena.huge_page_bytes() >> 20,
            )
            return self.serving

    async def _seal_in_background(self, mgr: BlockManager) -> None:
        """Checksum new host blocks soon after they are stored, so a peer's pin
        and a drain to disk find them sealed. Rests as long as it worked
        (at most half a core), so it never crowds out the engines' copies."""
        while True:
            t0 = time.monotonic()
            batch = asyncio.ensure_future(asyncio.to_thread(mgr.seal_newest, SEAL_BATCH))
            try:
                n = await asyncio.shield(batch)
            except asyncio.CancelledError:
                await asyncio.wait([batch])  # the arena must outlive the batch's reads
                raise
            except Exception:
                log.exception("background sealing failed")
                n = 0
            await asyncio.sleep(time.monotonic() - t0 if n else SEAL_IDLE_S)

    async def _join_index(self, record: NodeRecord, joined: asyncio.Event) -> None:
        """Register in the index (retrying while etcd is away), then publish
        every change of the tiers."""
        endpoints = self.cfg.etcd_endpoints
        while True:
            index: EtcdIndex | MemoryIndex
            if endpoints:
                index = EtcdIndex(endpoints, self.cfg.namespace, record, self.cfg.lease_ttl)
            else:
                index = MemoryIndex(self.cfg.namespace, record)
            try:
                await index.start()
                break
            except IndexUnavailable as e:
                log.warning("index unavailable, serving local tiers only: %s", e)
            except Exception:
                log.exception("index failed to start, serving local tiers only")
            await asyncio.sleep(INDEX_RETRY_S)
        self.index = index
        assert self.serving is not None
        self.serving.mgr.take_changes()  # superseded by the full state below
        self._publish(everything=True)
        joined.set()
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                self._publish()
            except Exception:  # never let one bad batch stop every later one
                log.exception("publishing to the index failed")

    def _publish(self, everything: bool = False) -> None:
        assert self.serving is not None and self.index is not None
        mgr = self.serving.mgr
        changes = mgr.held() if everything else mgr.take_changes()
        if changes:
            self.index.publish(
                {k.encode(): IndexTier(t.value) for k, t in changes.items() if t is not None},
                [k.encode() for k, t in changes.items() if t is None],
            )

    # -- what engines call -------------------------------------------------
    def lookup(self, keys: list[BlockKey], remote: Sequence[str]) -> dict[str, int]:
        """Leading blocks held here, then how many more peers hold after them,
        by the tier the index shows them in."""
        assert self.serving is not None
        local = self.serving.mgr.lookup(keys).num_blocks
        out = {"local": local, "remote_host": 0, "remote_disk": 0}
        for _, _, _, tiers in self._peer_runs(keys[local:], remote):
            for t in tiers:
                out[f"remote_{t}"] += 1
        return out

    def _peer_runs(
        self, keys: list[BlockKey], remote: Sequence[str]
    ) -> list[tuple[str, int, int, tuple[str, ...]]]:
        """(peer, start, length, tiers): consecutive runs from keys[0] on, in the
        tiers the engine allows."""
        if not remote or not keys or self.index is None:
            return []
        result = self.index.lookup([k.encode() for k in keys])
        runs, pos = [], 0
        if result.local:
            return []  # the mirror thinks this node holds them: it is behind, try later
        now = time.monotonic()
        for run in result.runs:
            if run.start != pos or self.avoided.get(run.node_id, 0.0) > now:
                break
            n = next((i for i, t in enumerate(run.tiers) if t.value not in remote), run.length)
            if n == 0:
                break
            runs.append((run.node_id, pos, n, tuple(t.value for t in run.tiers[:n])))
            pos += n
            if n < run.length:
                break
        return runs

    async def load(
        self, keys: list[BlockKey], remote: Sequence[str]
    ) -> tuple[LoadPlan, dict[str, int]]:
        """Pin the longest prefix available to this engine in G2, pulling from
        peers what only they hold. Returns the plan and where its blocks came from."""
        assert self.serving is not None
        mgr, tiers = self.serving.mgr, self.serving.tiers
        local = mgr.lookup(keys)
        sources = {"local_host": 0, "local_disk": 0, "remote_host": 0, "remote_disk": 0}
        pulled: list[str] = []
        start = local.num_blocks
        timeout = self.cfg.peer_timeout_ms / 1000
        for peer, offset, n, run_tiers in self._peer_runs(keys[start:], remote):
            client = await self._peer(peer, timeout)
            if client is None:
                self._avoid(peer, "unreachable")
                break
            want = [k.encode() for k in keys[start + offset : start + offset + n]]
            t0 = time.monotonic()
            got = await pull(client, want, tiers, timeout)
            pulled += run_tiers[: len(got)]
            if len(got) < n:
                # fewer blocks than the index said: evicted there meanwhile (fine),
                # or a peer that is gone or too slow (leave it alone for a while,
                # on a new connection: a request stuck in this one's socket would
                # hold up every later one until TCP retransmits it)
                if not client.usable:
                    self._avoid(peer, "connection lost")
                elif time.monotonic() - t0 >= 0.9 * timeout:
                    self._avoid(peer, "timed out")
                    self._forget(peer)
                break
        plan = await asyncio.to_thread(mgr.prepare_load, keys)
        for t in local.tiers[: plan.num_blocks]:
            sources[f"local_{t.value}"] += 1
        for t in pulled[: max(0, plan.num_blocks - start)]:
            sources[f"remote_{t}"] += 1
        for source, n in sources.items():
            if n:
                mgr.metrics.engine_blocks.labels(source).inc(n)
        return plan, sources

    def _avoid(self, peer: str, why: str) -> None:
        log.warning(
            "leaving a peer alone peer=%s reason=%s seconds=%d", peer, why, self.cfg.peer_backoff_s
        )
        self.avoided[peer] = time.monotonic() + self.cfg.peer_backoff_s

    def _forget(self, node_id: str) -> None:
        """Drop a peer's client; it closes in the background (closing waits a
        little for its unpins, which a partitioned peer never answers)."""
        client = self.peers.pop(node_id, None)
        if client is not None:
            task = asyncio.create_task(client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _peer(self, node_id: str, timeout: float) -> PeerClient | None:
        """A connected client for a peer the index knows, or None (also when
        connecting takes longer than `timeout`: a frozen peer still accepts)."""
        client = self.peers.get(node_id)
        if client is not None and client.usable:
            return client
        self._forget(node_id)
        assert self.serving is not None and self.index is not None
        record = self.index.mirror.nodes.get(node_id)
        fingerprint = self.serving.mgr.geometry.fingerprint
        if record is None or fingerprint not in record.fingerprints:
            return None
        client = PeerClient(self.serving.agent, self.secret, [fingerprint])
        host, _ = self.cfg.listen_address
        try:
            await client.connect(record.address, record.rpc_port, timeout, local_host=host)
        except (OSError, TimeoutError, TransportError) as e:
            log.info("peer unreachable peer=%s error=%r", node_id, e)
            await client.close()
            return None
        self.peers[node_id] = client
        return client

    def _registry(self) -> CollectorRegistry:
        return self.serving.mgr.metrics.registry if self.serving else _NO_METRICS

    def stats(self) -> dict:
        """The node's state for `kvbm status`."""
        out: dict = {"node_id": self.node_id, "namespace": self.cfg.namespace, "ready": self.ready}
        out["index"] = (
            "none yet"
            if self.index is None
            else "memory"
            if isinstance(self.index, MemoryIndex)
            else "etcd up"
            if self.index.connected
            else "etcd down"
        )
        if self.serving is None:
            return out
        mgr = self.serving.mgr
        m = mgr.metrics
        out["peer_address"] = self.serving.peer_address
        out["engine_leases"] = len(self.leases)
        out["pinned_for_peers"] = sum(len(h) for h in self.serving.peer_server.pins.values())
        out["tiers"] = {
            tier: {
                "blocks": int(m.value("kvbm_tier_blocks", tier=tier)),
                "capacity": int(m.value("kvbm_tier_capacity_blocks", tier=tier)),
            }
            for tier in ("host", "disk")
            if tier == "host" or mgr.disk is not None
        }
        out["tiers"]["host"]["unsealed"] = len(mgr.host.table.unsealed)  # no checksum yet
        out["engine_blocks"] = {
            s: int(m.value("kvbm_engine_blocks_total", source=s))
            for s in ("local_host", "local_disk", "remote_host", "remote_disk")
        }
        out["peers"] = sorted(self.index.mirror.nodes) if self.index is not None else []
        now = time.monotonic()
        out["avoided_peers"] = sorted(p for p, until in self.avoided.items() if until > now)
        return out

    # -- the engine socket -------------------------------------------------
    async def _serve_engine(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        codec = engine_wire.codec()
        conn = next(self._conn_ids)
        try:
            while True:
                msg = await codec.read(reader)
                try:
                    reply = Message("ok", msg.id, await self._engine_call(msg, conn))
                except (KvbmError, ValueError, KeyError, TypeError, ProtocolError) as e:
                    reply = Message("error", msg.id, {"error": f"{msg.call}: {e}"})
                except Exception as e:  # a fault below (I/O, a bug): this call fails, not the node
                    log.exception("engine call failed call=%s", msg.call)
                    reply = Message("error", msg.id, {"error": f"{msg.call}: {e!r}"})
                writer.write(codec.encode(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except ProtocolError as e:
            log.warning("closing engine connection reason=%s", e)
        finally:
            for lease_id in [i for i, lease in self.leases.items() if lease.owner == conn]:
                self._settle(self.leases.pop(lease_id), ok=False)
            writer.close()
            self._connections.discard(task)

    def _lease(self, plan: LoadPlan | StorePlan, conn: int) -> int:
        lease_id = next(self._lease_ids)
        self.leases[lease_id] = Lease(plan, conn)
        return lease_id

    def _settle(self, lease: Lease, ok: bool) -> int:
        """Release a load's pins, or commit (ok) or abort a store. Returns blocks added."""
        assert self.serving is not None
        if isinstance(lease.plan, LoadPlan):
            self.serving.mgr.complete_load(lease.plan)
            return 0
        return self.serving.mgr.complete_store(lease.plan, success=ok)

    async def _engine_call(self, msg: Message, conn: int) -> dict:
        body = msg.body
        if msg.call == "hello":
            geometry = engine_wire.geometry_from_wire(body.get("geometry"))
            s = await self.serve(geometry)
            arena = s.mgr.host.arena
            return {
                "arena": arena.name,
                "arena_dir": arena.directory,
                "arena_bytes": arena.size,
                "slot_bytes": geometry.slot_bytes,
                "num_slots": s.mgr.host.num_slots,
                "step_blocks": s.mgr.max_load_blocks,
                "namespace": self.cfg.namespace,
                "fingerprint": geometry.fingerprint,
                "node_id": self.node_id,
            }
        if msg.call == "stats":
            return self.stats()
        if self.serving is None:
            raise ProtocolError("say hello first")
        mgr = self.serving.mgr
        if msg.call == "lookup":
            return self.lookup(_keys(body), _remote(body))
        if msg.call == "load":
            keys = _keys(body)
            plan, sources = await self.load(keys, _remote(body))
            lease = self._lease(plan, conn)
            # cut short by the size of one load step, not by a miss: ask again
            more = plan.num_blocks == mgr.max_load_blocks < len(keys)
            return {"lease": lease, "slots": plan.slots, "sources": sources, "more": more}
        if msg.call == "reserve":
            store = await asyncio.to_thread(mgr.prepare_store, _keys(body))
            lease = self._lease(store, conn)
            return {"lease": lease, "slots": store.slots, "positions": store.positions}
        if msg.call in ("commit", "release"):
            lease_id = int(body["lease"])
            held = self.leases.get(lease_id)
            if held is None:
                raise ValueError(f"no lease {lease_id} (settled already, or never granted)")
            if isinstance(held.plan, LoadPlan) != (msg.call == "release"):
                raise ValueError("a load lease is released, a store lease committed")
            del self.leases[lease_id]
            ok = bool(body.get("ok", False))
            return {"added": await asyncio.to_thread(self._settle, held, ok)}
        raise ProtocolError(f"{msg.call!r} is not a request")


def _keys(body: dict) -> list[BlockKey]:
    keys = body["keys"]
    if not isinstance(keys, list) or len(keys) > MAX_KEYS:
        raise ValueError(f"keys must be a list of at most {MAX_KEYS}")
    return [BlockKey.decode(k) for k in keys]


def _remote(body: dict) -> tuple[str, ...]:
    remote = body.get("remote", [])
    if not isinstance(remote, list) or not set(remote) <= {"host", "disk"}:
        raise ValueError("remote must list host and/or disk")
    return tuple(remote)


def _claim_socket_path(path: str) -> None:
    """Remove a socket file left by a dead node; refuse one a live node serves."""
    if not os.path.exists(path):
        return
    if engine_wire.node_listening(path):
        raise KvbmError(f"another node already serves {path}")
    os.unlink(path)  # nobody listens: stale


def default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].strip("-.")
    return name or "node"


def run(cfg: KvbmConfig, verify: Verify = content_matches) -> int:
    """Run a node until SIGTERM or SIGINT; 0 on a clean stop."""
    host, _ = cfg.listen_address
    secret = load_secret(cfg.secret_file, host, cfg.dev_insecure)

    async def main() -> None:
        node = Node(cfg, secret, verify)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await node.start()
        try:
            await stop.wait()
        finally:
            await node.stop()

    asyncio.run(main())
    return 0
