"""The node's state as `kvbm status` shows it: one dict, read from the
node's parts (nothing here changes them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.engine_wire import geometry_to_wire
from kvbm.hashing import HASH_VERSION

if TYPE_CHECKING:
    from kvbm.node.daemon import Node


def node_stats(node: Node) -> dict:
    out: dict = {"node_id": node.node_id, "namespace": node.cfg.namespace, "ready": node.ready}
    out["index"] = node.publisher.state()
    out["index_layout"] = node.cfg.index_layout
    # every node of a fleet shows the same: another id is another fleet secret
    key_id = node.engines.hash_key.key_id
    out["block_hash"] = {"version": HASH_VERSION, "key_id": f"{key_id:016x}"}
    out["protocol"] = node.engines.versions.ours  # of its wire (kvbm/versions.py)
    # engines' hellos by the version they said: which engines are of another release
    out["engine_hellos_by_protocol"] = {str(v): n for v, n in sorted(node.engines.hellos.items())}
    out.update(node.publisher.stats())  # the mirror's keys, or the node's shards
    # engines running without kvbm, the most recent first (often before any engine attached)
    out["engine_refusals"] = node.engines.refusals.listed()
    s = node.serving
    if s is None:
        return out
    record = node.publisher.record
    out["peer_address"] = f"{record.address}:{record.rpc_port}"
    out["geometry"] = geometry_to_wire(s.mgr.geometry)  # the layout included
    out["engine_leases"] = len(node.engines.leases)
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
    out["peers"] = node.publisher.peers()
    out["avoided_peers"] = s.peers.avoided_now()
    return out
