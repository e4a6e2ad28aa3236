"""`kvbm status`: the fleet from etcd (every node of a namespace, its tiers'
capacity and the blocks it publishes; a sharded index keeps no blocks in
etcd, so there the blocks are each node's own to tell), or one node from its
socket (fill and where the blocks it handed to engines came from: hit rates,
and the engines whose connectors turned themselves off, with why)."""

from __future__ import annotations

import asyncio
from collections import Counter

from discovery.etcd_index import snapshot
from discovery.signing import IndexSigner
from discovery.tier import Tier
from kvbm.config import KvbmConfig
from kvbm.engine_wire import EngineLink
from kvbm.versions import UNVERSIONED
from transport.secret import load_secret


def fleet(cfg: KvbmConfig) -> dict:
    """Every node of the namespace, as etcd has it: what the fleet signed
    (values that fail the signature, with this node's secret, are counted)."""
    secret = load_secret(cfg.secret_file, True, "")  # a fleet's values: its secret
    signer = IndexSigner(secret)
    mirror = asyncio.run(snapshot(cfg.etcd_endpoints, cfg.namespace, signer, tls=cfg.etcd_tls))
    held: Counter[tuple[str, Tier]] = Counter()
    for holders in mirror.locations.values():
        for node, tier in holders.items():
            held[node, tier] += 1
    sharded = cfg.index_layout == "sharded"
    nodes = []
    for node_id, r in sorted(mirror.nodes.items()):
        nodes.append(
            {
                "node_id": node_id,
                "peer_rpc": f"{r.address}:{r.rpc_port}" if r.rpc_port else "no engine yet",
                "version": r.version,
                "protocol": UNVERSIONED if r.protocol is None else r.protocol,
                Tier.HOST.value: {
                    "blocks": None if sharded else held[node_id, Tier.HOST],
                    "capacity": r.host_capacity_blocks,
                },
                Tier.DISK.value: {
                    "blocks": None if sharded else held[node_id, Tier.DISK],
                    "capacity": r.disk_capacity_blocks,
                },
            }
        )
    return {
        "namespace": cfg.namespace,
        "index_layout": cfg.index_layout,
        "nodes": nodes,
        "locations": len(mirror.locations),
        "unsigned_values": mirror.rejected,  # not signed with this secret: forged, or another fleet
    }


def node(cfg: KvbmConfig) -> dict:
    """One node, asked over its engine socket."""
    link = EngineLink(cfg.socket, timeout=5.0, node_uid=cfg.node_uid)
    try:
        stats = link.call("stats", {})
    finally:
        link.close()
    served = stats.get("engine_blocks", {})
    total = sum(served.values())
    stats["hit_shares"] = {s: round(n / total, 3) for s, n in served.items()} if total else {}
    return stats


def render(result: dict) -> str:
    """A short table for people (`--json` gives everything)."""
    if "nodes" in result:
        lines = [f"namespace {result['namespace']}: {len(result['nodes'])} node(s)"]
        head = f"{'node':20} {'peer rpc':22} {'host blocks':>16} {'disk blocks':>16}"
        lines.append(f"{head} protocol")
        for n in result["nodes"]:
            seen = "?" if n["host"]["blocks"] is None else None  # sharded: not in etcd
            host = f"{seen or n['host']['blocks']}/{n['host']['capacity']}"
            disk = f"{seen or n['disk']['blocks']}/{n['disk']['capacity']}"
            row = f"{n['node_id']:20} {n['peer_rpc']:22} {host:>16} {disk:>16}"
            lines.append(f"{row} {n['protocol']:>8}")
        if result["unsigned_values"]:
            lines.append(
                f"{result['unsigned_values']} index values not signed with this node's secret "
                "were ignored (another secret, or forged)"
            )
        return "\n".join(lines)
    lines = [f"node {result['node_id']} ({result['namespace']}), index: {result['index']}"]
    if "protocol" in result:  # a node of an older release does not say
        lines[0] += f", protocol {result['protocol']}"
    for tier, t in result.get("tiers", {}).items():
        lines.append(f"  {tier:5} {t['blocks']}/{t['capacity']} blocks")
    if "host_arena" in result:
        arena = result["host_arena"]
        pages = "2 MiB pages" if arena["huge_page_mb"] else "4 KiB pages"
        lines.append(f"  host arena in {arena['dir']}: {pages}")
    if "key_view" in result:
        v = result["key_view"]
        lines.append(
            f"  key view: {v['keys']} keys in {v['ways']} ways, "
            f"{v['buckets_asking_the_node']} bucket(s) where engines ask the node"
        )
    for source, n in result.get("engine_blocks", {}).items():
        share = result["hit_shares"].get(source, 0.0)
        lines.append(f"  served from {source:12} {n:8} blocks ({share:.0%})")
    if "tiers" not in result:
        lines.append("  no engine has attached yet")
    for r in result.get("engine_refusals", []):
        times = "1 time" if r["count"] == 1 else f"{r['count']} times"
        lines.append(f"  engine refused: {r['model']}: {r['reason']} ({times})")
    return "\n".join(lines)
