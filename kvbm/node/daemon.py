"""`kvbm node`: the daemon a DaemonSet runs, one per machine.

Wiring and life cycle only. At start the node joins the index (the
publisher, publisher.py, with the index index_choice.py picks: a record with
no engine yet; a live node with the same id stops it here). The engine
server (engine_server.py) takes engines' calls; the first engine's hello
builds the tiers for its model geometry (serving.py; one geometry per node,
another is refused with a clear error); then the publisher publishes the
full record and every block.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from prometheus_client import CollectorRegistry

from discovery.errors import DuplicateNode
from discovery.records import NodeRecord
from discovery.signing import IndexSigner
from kvbm import __version__
from kvbm.config import KvbmConfig
from kvbm.errors import GeometryMismatch
from kvbm.hashing import HashKey, Verify, content_matches
from kvbm.layout import ModelGeometry
from kvbm.metrics import BuildInfo, EngineRefusals
from kvbm.node.build import check_directories
from kvbm.node.engine_server import EngineServer
from kvbm.node.file_limit import fit_file_limit
from kvbm.node.http import MetricsServer
from kvbm.node.index_calls import INDEX_CALLS, OwnerClient
from kvbm.node.index_choice import choose_index
from kvbm.node.node_stats import node_stats
from kvbm.node.peer_pool import PeerPool
from kvbm.node.publisher import Publisher
from kvbm.node.serving import NodeParts, Serving, build_serving
from kvbm.owned_dir import own_directory
from kvbm.versions import THIS, Compatibility
from transport.secret import load_secret

log = logging.getLogger("kvbm.node")
INDEX_FIRST_WAIT_S = 5.0


class Node:
    """Invariants: `serving` is set once and never changes geometry; the node
    is in the index from its start (its record says whether it serves yet),
    and a node whose id a live node holds does not start."""

    def __init__(
        self,
        cfg: KvbmConfig,
        secret: bytes,
        verify: Verify = content_matches,
        versions: Compatibility = THIS,
    ) -> None:
        """`versions`: the protocol version the node speaks and its rule for
        engines' and peers' (kvbm/versions.py; a test acts another release
        with another)."""
        self.cfg = cfg
        self.node_id = cfg.node_name
        self.serving: Serving | None = None
        self.ready = False
        self._setup = asyncio.Lock()
        self.engines = EngineServer(
            cfg, self.node_id, self.serve, self.stats, HashKey.derive(secret), versions
        )
        self._metrics: MetricsServer | None = None
        # what /metrics shows before an engine attaches too: the node's
        # version (a rolling upgrade's progress) and engines refused so far
        self._always = (BuildInfo(__version__), EngineRefusals(self.engines.refusals.counts))
        self._idle_registry = CollectorRegistry()
        for collector in self._always:
            self._idle_registry.register(collector)
        host, _ = cfg.listen_address
        # peers are found by their records in the index; the index's calls
        # to owners (a sharded index) go through the peers' connections
        peers = PeerPool(
            self.node_id, secret, host, self._peer_record, cfg.peer_backoff_s, INDEX_CALLS, versions
        )
        index = choose_index(cfg, IndexSigner(secret), OwnerClient(peers))
        # its record until an engine attaches: no peer port yet
        idle = NodeRecord(self.node_id, host, 0, version=__version__, protocol=versions.ours)
        self.publisher = Publisher(idle, index.open, index.places_by_anchor)
        self.parts = NodeParts(
            cfg, self.node_id, secret, verify, peers, index, self.publisher, versions
        )

    def _peer_record(self, node_id: str) -> NodeRecord | None:
        return self.publisher.peer(node_id)

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
                self.serving = await build_serving(self.parts, geometry)
                for collector in self._always:
                    self.serving.mgr.metrics.registry.register(collector)
            elif self.serving.mgr.geometry != geometry:
                raise GeometryMismatch(
                    f"this node serves {self.serving.mgr.geometry}; an engine of "
                    f"{geometry} needs a node of its own (another --socket)"
                )
            return self.serving

    def _registry(self) -> CollectorRegistry:
        return self.serving.mgr.metrics.registry if self.serving else self._idle_registry

    def stats(self) -> dict:
        """The node's state for `kvbm status`."""
        return node_stats(self)


def run(cfg: KvbmConfig, verify: Verify = content_matches, versions: Compatibility = THIS) -> int:
    """Run a node until SIGTERM or SIGINT; 0 on a clean stop."""
    # the socket's directory first: the node's own secret (no fleet) lives there
    own_directory(os.path.dirname(os.path.abspath(cfg.socket)), cfg.shared_gid)
    secret = load_secret(cfg.secret_file, bool(cfg.etcd_endpoints), cfg.own_secret_path)
    fit_file_limit(cfg.max_peer_connections)

    async def main() -> None:
        node = Node(cfg, secret, verify, versions)
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
