"""What a node builds once the first engine's hello names the model geometry:
the block manager and its key view, the NIXL agent on the host arena (in a
process of its own: transport/confined_agent.py), the peer RPC server,
onboarding and the tiers' background upkeep (upkeep.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from discovery.records import NodeRecord
from kvbm import __version__
from kvbm.config import KvbmConfig, child_environment
from kvbm.hashing import Verify
from kvbm.key_view import KeyView
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager
from kvbm.metrics import PeerFigures
from kvbm.node.build import build_manager
from kvbm.node.index_choice import IndexChoice
from kvbm.node.onboarding import Onboarding
from kvbm.node.peer_pool import PeerPool
from kvbm.node.publisher import Publisher
from kvbm.node.upkeep import Upkeep
from kvbm.peer_blocks import ManagerBlocks
from kvbm.versions import Compatibility
from transport.confined_agent import ConfinedAgent
from transport.peer_rpc import PeerServer

log = logging.getLogger("kvbm.node")
VIEW_MIN_KEYS = 4096


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


@dataclass(frozen=True)
class NodeParts:
    """The node's parts that exist before it serves, which serving uses."""

    cfg: KvbmConfig
    node_id: str
    secret: bytes
    verify: Verify
    peers: PeerPool
    index: IndexChoice
    publisher: Publisher
    versions: Compatibility  # what the node speaks, and talks to (kvbm/versions.py)


async def build_serving(parts: NodeParts, geometry: ModelGeometry) -> Serving:
    """The node's tiers for `geometry`, its peer port open, its record and
    blocks published."""
    cfg, node_id = parts.cfg, parts.node_id
    mgr = await asyncio.to_thread(
        build_manager, cfg, geometry, parts.verify, secret=parts.secret, node_id=node_id
    )
    arena = mgr.host.arena
    agent = server = view = None
    try:
        view = _key_view(cfg, mgr)
        mgr.share_keys(view)
        tiers = ManagerBlocks(mgr)
        host, port = cfg.listen_address
        # a node with no fleet (no etcd) has no peers: no NIXL agent, no peer port
        if cfg.etcd_endpoints:
            agent = await asyncio.to_thread(
                ConfinedAgent,
                f"kvbm-{node_id}",
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
                parts.secret,
                max_pins_per_peer=per_peer,
                max_pins_total=total,
                node_id=node_id,
                max_connections=cfg.max_peer_connections,
                calls=parts.index.peer_calls,
                versions=parts.versions,
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
        node_id,
        host,
        port,
        nixl_agent=agent.name if agent is not None else "",
        fingerprints=(geometry.fingerprint,),
        host_capacity_blocks=mgr.host.num_slots,
        disk_capacity_blocks=mgr.disk.num_slots if mgr.disk else 0,
        version=__version__,
        protocol=parts.versions.ours,
    )
    peers = parts.peers
    if agent is not None:
        peers.open(agent, geometry.fingerprint)
        parts.index.serving()
    onboarding = Onboarding(mgr, tiers, peers, parts.publisher, cfg.peer_timeout_ms / 1000)
    # summed blocks matter where blocks leave G2: to peers or to disk
    checksums = bool(cfg.etcd_endpoints) or mgr.disk is not None
    ahead = (cfg.disk_write_ahead_mb << 20) // geometry.slot_bytes
    upkeep = Upkeep(mgr, checksums, min(ahead, mgr.host.num_slots // 4))
    huge_mb = arena.huge_page_bytes() >> 20
    serving = Serving(mgr, agent, server, peers, onboarding, upkeep, huge_mb)
    if server is not None:
        mgr.metrics.watch_peers(_peer_figures(parts.publisher, peers, server))
    await parts.publisher.serve(mgr, record)
    upkeep.start()
    _log_serving(geometry, port, arena.directory, huge_mb)
    return serving


def _peer_figures(
    publisher: Publisher, peers: PeerPool, server: PeerServer
) -> Callable[[], PeerFigures]:
    def figures() -> PeerFigures:
        return PeerFigures(
            index_nodes=len(publisher.peers()),
            avoided=len(peers.avoided_now()),
            connections=server.connections,
            closed_idle=server.closed_idle,
        )

    return figures


def _key_view(cfg: KvbmConfig, mgr: BlockManager) -> KeyView:
    """Engines read which keys the node could serve without asking it
    (kvbm/key_view.py): its own, and as many again of its peers'; at least
    VIEW_MIN_KEYS, as a key let go stays a moment (a tier of a few blocks
    churns through several times its size between ticks)."""
    local = mgr.host.num_slots + (mgr.disk.num_slots if mgr.disk else 0)
    return KeyView.create(
        f"{mgr.host.arena.name}.keys",
        max(VIEW_MIN_KEYS, 2 * local if cfg.etcd_endpoints else local),
        mgr.host.arena.directory,
        mode=0o600 if cfg.shared_gid is None else 0o640,
        gid=cfg.shared_gid,
    )


def _log_serving(geometry: ModelGeometry, port: int, directory: str, huge_mb: int) -> None:
    log.info(
        "serving geometry=%s peer_port=%d arena=%s huge_page_mb=%d",
        geometry,
        port,
        directory,
        huge_mb,
    )
    if not huge_mb:
        log.info(
            "the host arena has 4 KiB pages: a tmpfs mounted huge=always as "
            "host_arena_dir makes peers' reads of it about 2-3x as fast"
        )
