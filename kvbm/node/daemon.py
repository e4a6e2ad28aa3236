"""`kvbm node`: the daemon a DaemonSet runs, one per machine.

Wiring and life cycle only. At start the node joins the index (the
publisher, publisher.py: a record with no engine yet; a live node with the
same id stops it here). The engine server (engine_server.py) takes engines'
calls; the first engine's hello builds the tiers for its model geometry (one
geometry per node; another is refused with a clear error): the block
manager, the NIXL agent on the host arena (in a process of its own:
transport/confined_agent.py), the peer RPC server, the peer pool
(peer_pool.py), onboarding, the tiers' background upkeep (upkeep.py); then
the publisher publishes the full record and every block.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from discovery.errors import DuplicateNode
from discovery.records import NodeRecord
from discovery.signing import IndexSigner
from kvbm import __version__
from kvbm.config import KvbmConfig, child_environment
from kvbm.engine_wire import geometry_to_wire
from kvbm.errors import GeometryMismatch
from kvbm.hashing import HASH_VERSION, HashKey, Verify, content_matches
from kvbm.key_view import KeyView
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager
from kvbm.node.build import build_manager, check_directories
from kvbm.node.engine_server import EngineServer
from kvbm.node.http import MetricsServer
from kvbm.node.onboarding import Onboarding
from kvbm.node.peer_pool import PeerPool
from kvbm.node.publisher import Publisher
from kvbm.node.upkeep import Upkeep
from kvbm.owned_dir import own_directory
from kvbm.peer_tiers import ManagerTiers
from transport.confined_agent import ConfinedAgent
from transport.peer_rpc import PeerServer
from transport.secret import load_secret

log = logging.getLogger("kvbm.node")
INDEX_FIRST_WAIT_S = 5.0
VIEW_MIN_KEYS = 4096
FILES_BESIDES_PEERS = 1024  # engines, etcd, metrics, the arenas and the disk tier
_NO_METRICS = CollectorRegistry()  # what /metrics shows before an engine attaches


@dataclass
class Serving:
    """What exists once the first engine has said which geometry it needs."""

    mgr: BlockManager
    agent: ConfinedAgent | None  # None: no fleet (no etcd), no peers, no port
    peer_server: PeerServer | None
    peers: PeerPool
    onboarding: Onboarding
    upkeep: Upkeep
    huge_page_mb: int  # how much of the host arena the kernel gave 2 MiB pages

    async def close(self) -> None:
        await self.upkeep.close()
        await self.peers.close()
        if self.peer_server is not None:
            await self.peer_server.close()
        if self.agent is not None:
            self.agent.close()
        view = self.mgr.view
        self.mgr.close()
        if view is not None:
            view.close()


class Node:
    """Invariants: `serving` is set once and never changes geometry; the node
    is in the index from its start (its record says whether it serves yet),
    and a node whose id a live node holds does not start."""

    def __init__(self, cfg: KvbmConfig, secret: bytes, verify: Verify = content_matches) -> None:
        self.cfg = cfg
        self.secret = secret
        self.verify = verify
        self.node_id = cfg.node_name
        self.serving: Serving | None = None
        self.ready = False
        self._setup = asyncio.Lock()
        self.engines = EngineServer(
            cfg, self.node_id, self.serve, self.stats, HashKey.derive(secret)
        )
        self._metrics: MetricsServer | None = None
        host, _ = cfg.listen_address
        idle = NodeRecord(self.node_id, host, 0, version=__version__)  # no engine yet
        self.publisher = Publisher(idle, cfg, IndexSigner(secret))

    async def start(self) -> None:
        """Raises DuplicateNode when a live node holds this node's id.
        `/healthz` answers from the first moment: 503 until the node is ready."""
        check_directories(self.cfg)  # at start, not at the first engine's hello
        if self.cfg.metrics_port:
            host, _ = self.cfg.listen_address
            self._metrics = MetricsServer(lambda: self.ready, self._registry)
            await self._metrics.start(host, self.cfg.metrics_port)
        self.publisher.start()
        # in the index before engines come (if etcd is away, the node starts
        # without it); a stale record of this id waits out one keepalive period
        try:
            await self.publisher.joined(INDEX_FIRST_WAIT_S + self.cfg.lease_ttl / 3 + 1)
        except DuplicateNode:
            await self.publisher.close()
            if self._metrics is not None:
                await self._metrics.close()
            raise
        await self.engines.start()
        self.ready = True
        log.info("node ready node=%s socket=%s", self.node_id, self.cfg.socket)

    async def stop(self) -> None:
        """Stop accepting, end engine connections (settling their leases),
        publish the last changes, revoke the lease, free everything."""
        self.ready = False
        await self.engines.close()
        await self.publisher.close()
        if self.serving is not None:
            await self.serving.close()
        if self._metrics is not None:
            await self._metrics.close()
        log.info("node stopped node=%s", self.node_id)

    async def serve(self, geometry: ModelGeometry) -> Serving:
        """The node's tiers, built for the first geometry an engine brings."""
        async with self._setup:
            if self.serving is None:
                self.serving = await self._build(geometry)
            elif self.serving.mgr.geometry != geometry:
                raise GeometryMismatch(
                    f"this node serves {self.serving.mgr.geometry}; an engine of "
                    f"{geometry} needs a node of its own (another --socket)"
                )
            return self.serving

    async def _build(self, geometry: ModelGeometry) -> Serving:
        cfg = self.cfg
        mgr = await asyncio.to_thread(
            build_manager, cfg, geometry, self.verify, secret=self.secret, node_id=self.node_id
        )
        arena = mgr.host.arena
        agent = server = view = None
        try:
            # engines read which keys the node could serve without asking it
            # (kvbm/key_view.py): its own, and as many again of its peers'; at
            # least VIEW_MIN_KEYS, as a key let go stays a moment (a tier of a
            # few blocks churns through several times its size between ticks)
            local = mgr.host.num_slots + (mgr.disk.num_slots if mgr.disk else 0)
            view = KeyView.create(
                f"{arena.name}.keys",
                max(VIEW_MIN_KEYS, 2 * local if cfg.etcd_endpoints else local),
                arena.directory,
                mode=0o600 if cfg.shared_gid is None else 0o640,
                gid=cfg.shared_gid,
            )
            mgr.share_keys(view)
            tiers = ManagerTiers(mgr)
            host, port = cfg.listen_address
            # a node with no fleet (no etcd) has no peers: no NIXL agent, no peer port
            if cfg.etcd_endpoints:
                agent = await asyncio.to_thread(
                    ConfinedAgent,
                    f"kvbm-{self.node_id}",
                    arena.reopen(),
                    arena.size,
                    env=child_environment(),
                )
                # a peer may pin a quarter of the arena, all peers half (a pull whose
                # rounds the cap cuts short asks again once its pins are released)
                per_peer = max(1, mgr.host.num_slots // 4)
                total = max(per_peer, mgr.host.num_slots // 2)
                server = PeerServer(
                    tiers,
                    agent,
                    self.secret,
                    max_pins_per_peer=per_peer,
                    max_pins_total=total,
                    node_id=self.node_id,
                    owner=self.publisher.locations,
                    max_connections=cfg.max_peer_connections,
                )
                port = await server.start(host, port)
            else:
                port = 0
        except BaseException:
            if server is not None:
                await server.close()
            if agent is not None:
                agent.close()
            mgr.close()
            if view is not None:
                view.close()
            raise
        record = NodeRecord(
            self.node_id,
            host,
            port,
            nixl_agent=agent.name if agent is not None else "",
            fingerprints=(geometry.fingerprint,),
            host_capacity_blocks=mgr.host.num_slots,
            disk_capacity_blocks=mgr.disk.num_slots if mgr.disk else 0,
            version=__version__,
        )
        publisher = self.publisher
        peers = PeerPool(
            self.node_id,
            agent,
            self.secret,
            geometry.fingerprint,
            host,
            publisher.peer,
            cfg.peer_backoff_s,
        )
        peers.on_avoid = view.avoid_peers_until  # engines then ask the node about peers' keys
        onboarding = Onboarding(mgr, tiers, peers, publisher.lookup, cfg.peer_timeout_ms / 1000)
        # sealed blocks matter where blocks leave G2: to peers or to disk
        seal = bool(cfg.etcd_endpoints) or mgr.disk is not None
        ahead = (cfg.disk_write_ahead_mb << 20) // geometry.slot_bytes
        upkeep = Upkeep(mgr, seal, min(ahead, mgr.host.num_slots // 4))
        huge_mb = arena.huge_page_bytes() >> 20
        serving = Serving(mgr, agent, server, peers, onboarding, upkeep, huge_mb)
        await publisher.serve(mgr, record, peers)
        upkeep.start()
        log.info(
            "serving geometry=%s peer_port=%d arena=%s huge_page_mb=%d",
            geometry,
            port,
            arena.directory,
            huge_mb,
        )
        if not huge_mb:
            log.info(
                "the host arena has 4 KiB pages: a tmpfs mounted huge=always as "
                "host_arena_dir makes peers' reads of it about 2-3x as fast"
            )
        return serving

    def _registry(self) -> CollectorRegistry:
        return self.serving.mgr.metrics.registry if self.serving else _NO_METRICS

    def stats(self) -> dict:
        """The node's state for `kvbm status`."""
        out: dict = {"node_id": self.node_id, "namespace": self.cfg.namespace, "ready": self.ready}
        out["index"] = self.publisher.state()
        out["index_layout"] = self.cfg.index_layout
        # every node of a fleet shows the same: another id is another fleet secret
        key_id = self.engines.hash_key.key_id
        out["block_hash"] = {"version": HASH_VERSION, "key_id": f"{key_id:016x}"}
        if self.publisher.index is not None and self.publisher.locations is None:
            out["index_mirror_keys"] = len(self.publisher.index.mirror.locations)
        locations = self.publisher.locations
        if locations is not None:
            out["index_shard"] = {
                "members": len(locations.ring.nodes),
                "locations_published": len(locations.held),
                "locations_owned": len(locations.table),
                "owned_bytes": locations.table.nbytes,
                "pending": locations.pending,
                "refused": locations.stale,
            }
        s = self.serving
        if s is None:
            return out
        out["peer_address"] = f"{self.publisher.record.address}:{self.publisher.record.rpc_port}"
        out["geometry"] = geometry_to_wire(s.mgr.geometry)  # the layout included
        out["engine_leases"] = len(self.engines.leases)
        if s.peer_server is not None:
            out["pinned_for_peers"] = s.peer_server.pinned_count
            out["peer_connections"] = {
                "open": s.peer_server.connections,
                "closed_idle": s.peer_server.closed_idle,
            }
        if s.agent is not None:
            out["nixl_agent"] = s.agent.state()
        out["tiers"] = s.mgr.usage()
        arena = s.mgr.host.arena
        out["host_arena"] = {"dir": arena.directory, "huge_page_mb": s.huge_page_mb}
        if s.mgr.view is not None:
            out["key_view"] = s.mgr.view.stats()
        failed = "kvbm_tier_checksum_failures_total"
        out["checksum_failures"] = {
            where: int(s.mgr.metrics.value(failed, tier=where)) for where in ("disk", "peer")
        }
        out["engine_blocks"] = s.onboarding.served()
        out["peer_pulls"] = s.onboarding.pulls()
        out["peers"] = self.publisher.peers()
        out["avoided_peers"] = s.peers.avoided_now()
        return out


def fit_file_limit(max_peer_connections: int) -> int:
    """Raise the soft limit on open files to what the node's peers need (a
    socket each way per peer, and room for the rest), as far as the hard
    limit allows: a common soft limit of 1024 would fail accepts past a few
    hundred peers. Returns the soft limit now."""
    want = 2 * max_peer_connections + FILES_BESIDES_PEERS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as e:  # a sandbox that forbids it: run as we are
            log.warning("cannot raise the limit on open files: %s", e)
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open files are limited to %d, under the %d that max_peer_connections=%d needs: "
            "raise the hard limit (ulimit -Hn) or lower max_peer_connections",
            soft,
            want,
            max_peer_connections,
        )
    return soft


def run(cfg: KvbmConfig, verify: Verify = content_matches) -> int:
    """Run a node until SIGTERM or SIGINT; 0 on a clean stop."""
    # the socket's directory first: the node's own secret (no fleet) lives there
    own_directory(os.path.dirname(os.path.abspath(cfg.socket)), cfg.shared_gid)
    secret = load_secret(cfg.secret_file, bool(cfg.etcd_endpoints), cfg.own_secret_path)
    fit_file_limit(cfg.max_peer_connections)

    async def main() -> None:
        node = Node(cfg, secret, verify)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await node.start()  # a duplicate node id ends here, with the error
        try:
            await stop.wait()
        finally:
            await node.stop()

    asyncio.run(main())
    return 0
