"""The etcd key layout: the only place that knows it.

    /kvbm/v1/<namespace>/nodes/<node_id>              -> NodeRecord (msgpack)
    /kvbm/v1/<namespace>/runs/<node_id>/<run id hex>  -> RunRecord (msgpack: a run of
                                                         a prompt's block keys, their tiers)

Every key is written under its node's lease, so a dead node's record and
runs vanish by themselves. `etcdctl get --prefix /kvbm/v1/<ns>/`
shows the whole index of a namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from discovery.records import check_namespace, check_node_id

ROOT = "/kvbm/v1"
_HEX = re.compile(rb"[0-9a-f]{1,16}")


def namespace_prefix(namespace: str) -> bytes:
    return f"{ROOT}/{check_namespace(namespace)}/".encode()


def nodes_prefix(namespace: str) -> bytes:
    """Where the node records are (all a sharded index watches)."""
    return namespace_prefix(namespace) + b"nodes/"


def node_path(namespace: str, node_id: str) -> bytes:
    return namespace_prefix(namespace) + b"nodes/" + check_node_id(node_id).encode()


def run_path(namespace: str, node_id: str, run_id: int) -> bytes:
    return namespace_prefix(namespace) + b"runs/" + node_id.encode() + b"/" + b"%x" % run_id


@dataclass(frozen=True, slots=True)
class Parsed:
    """One etcd key of a namespace, understood: a node record or a run of its blocks."""

    node_id: str
    run_id: int | None  # None: the node record


def parse_path(prefix: bytes, path: bytes) -> Parsed:
    """Raises ValueError for a key under the namespace that is not ours."""
    if not path.startswith(prefix):
        raise ValueError("key outside the namespace")
    parts = path[len(prefix) :].split(b"/")
    try:
        if parts[0] == b"nodes" and len(parts) == 2:
            return Parsed(check_node_id(parts[1].decode()), None)
        if parts[0] == b"runs" and len(parts) == 3 and _HEX.fullmatch(parts[2]):
            return Parsed(check_node_id(parts[1].decode()), int(parts[2], 16))
    except (UnicodeDecodeError, ValueError):
        pass
    raise ValueError(f"not an index key: {path[:120]!r}")
