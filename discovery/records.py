"""Typed values that cross the package boundary: node records and lookups
(their tiers are discovery/tier.py's `Tier`).

Block keys are bytes here, read only as a head and a tail
(discovery/key_split.py), so this package never imports `kvbm`.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack

from discovery.tier import Tier

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
RECORD_VERSION = 1


def check_namespace(namespace: str) -> str:
    """Namespaces end up in etcd paths, block keys and file headers: keep them plain."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
    return namespace


def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"node id must match {_NODE_ID.pattern}, got {node_id!r}")
    return node_id


@dataclass(frozen=True)
class NodeRecord:
    """What a node tells the fleet about itself, under its lease. `version`
    is the node's software release, for people; `protocol` the version of
    the wire it speaks (kvbm/versions.py), which peers check before they
    connect. A record that says no protocol decodes with None: its node
    predates the field (the index does not judge; the node does)."""

    node_id: str
    address: str
    rpc_port: int
    nixl_agent: str = ""
    fingerprints: tuple[int, ...] = ()
    host_capacity_blocks: int = 0
    disk_capacity_blocks: int = 0
    version: str = ""
    protocol: int | None = None

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if not 0 <= self.rpc_port < 65536:
            raise ValueError(f"rpc_port out of range: {self.rpc_port}")
        if self.protocol is not None and (type(self.protocol) is not int or self.protocol < 0):
            raise ValueError(f"protocol must be a version number, got {self.protocol!r}")

    def encode(self) -> bytes:
        said = {} if self.protocol is None else {"protocol": self.protocol}
        return msgpack.packb(
            {
                "v": RECORD_VERSION,
                "node_id": self.node_id,
                "address": self.address,
                "rpc_port": self.rpc_port,
                "nixl_agent": self.nixl_agent,
                "fingerprints": list(self.fingerprints),
                "host_capacity_blocks": self.host_capacity_blocks,
                "disk_capacity_blocks": self.disk_capacity_blocks,
                "version": self.version,
                **said,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        """Raises ValueError on anything `encode` did not produce."""
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise ValueError(f"node record is not msgpack: {e}") from None
        if not isinstance(d, dict) or d.get("v") != RECORD_VERSION:
            raise ValueError("node record of an unknown version")
        try:
            return cls(
                node_id=d["node_id"],
                address=str(d["address"]),
                rpc_port=int(d["rpc_port"]),
                nixl_agent=str(d.get("nixl_agent", "")),
                fingerprints=tuple(int(f) for f in d.get("fingerprints", ())),
                host_capacity_blocks=int(d.get("host_capacity_blocks", 0)),
                disk_capacity_blocks=int(d.get("disk_capacity_blocks", 0)),
                version=str(d.get("version", "")),
                protocol=d.get("protocol"),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"node record is missing or mistypes a field: {e!r}") from None


@dataclass(frozen=True)
class PeerRun:
    """`length` consecutive keys from `start` that peer `node_id` holds."""

    node_id: str
    start: int
    length: int
    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class LookupResult:
    """The keys held locally (a prefix), then runs on peers that continue it."""

    local: int
    runs: tuple[PeerRun, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.local + sum(r.length for r in self.runs)


def runs_of(
    groups: Sequence[Mapping[str, Tier]],
    starts: Sequence[int],
    local_node: str,
    live: Container[str],
) -> LookupResult:
    """A lookup's answer from who holds each group of consecutive keys
    (group g: keys starts[g] to starts[g + 1], one holders map; a key per
    group is fine): the prefix `local_node` holds, then, greedily, the live
    peer holding the longest run from each point on (for a contiguous
    prefix the farthest-reaching choice needs the fewest peers)."""
    g, ng = 0, len(groups)
    while g < ng and local_node in groups[g]:
        g += 1
    local = starts[g]
    runs = []
    while g < ng:
        best, best_end = None, g
        for node in groups[g]:
            if node == local_node or node not in live:
                continue
            end = g + 1
            while end < ng and node in groups[end]:
                end += 1
            if end > best_end:
                best, best_end = node, end
        if best is None:
            break
        tiers: list[Tier] = []
        for j in range(g, best_end):
            tiers += (groups[j][best],) * (starts[j + 1] - starts[j])
        runs.append(PeerRun(best, starts[g], starts[best_end] - starts[g], tuple(tiers)))
        g = best_end
    return LookupResult(local, tuple(runs))
