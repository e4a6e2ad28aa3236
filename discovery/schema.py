"""The etcd key layout: the only place that knows it.

    /kvbm/v1/<namespace>/nodes/<node_id>              -> NodeRecord (msgpack)
    /kvbm/v1/<namespace>/blocks/<key hex>/<node_id>   -> "host" | "disk"

Every key is written under its node's lease, so a dead node's record and
block locations vanish by themselves. `etcdctl get --prefix /kvbm/v1/<ns>/`
shows the whole index of a namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery.records import Tier, check_namespace, check_node_id

ROOT = "/kvbm/v1"


def namespace_prefix(namespace: str) -> bytes:
    return f"{ROOT}/{check_namespace(namespace)}/".encode()


def node_path(namespace: str, node_id: str) -> bytes:
    return namespace_prefix(namespace) + b"nodes/" + check_node_id(node_id).encode()


def block_path(namespace: str, key: bytes, node_id: str) -> bytes:
    return namespace_prefix(namespace) + b"blocks/" + key.hex().encode() + b"/" + node_id.encode()


@dataclass(frozen=True, slots=True)
class Parsed:
    """One etcd key of a namespace, understood: a node record or a block location."""

    node_id: str
    key: bytes | None  # None: the node record


def parse_path(prefix: bytes, path: bytes) -> Parsed:
    """Raises ValueError for a key under the namespace that is not ours."""
    if not path.startswith(prefix):
        raise ValueError("key outside the namespace")
    parts = path[len(prefix) :].split(b"/")
    try:
        if parts[0] == b"nodes" and len(parts) == 2:
            return Parsed(check_node_id(parts[1].decode()), None)
        if parts[0] == b"blocks" and len(parts) == 3:
            return Parsed(check_node_id(parts[2].decode()), bytes.fromhex(parts[1].decode()))
    except (UnicodeDecodeError, ValueError):
        pass
    raise ValueError(f"not an index key: {path[:120]!r}")


def parse_tier(value: bytes) -> Tier:
    try:
        return Tier(value.decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a tier: {value[:40]!r}") from None
