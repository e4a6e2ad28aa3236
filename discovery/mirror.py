"""A node's local copy of one namespace of the index, in plain dicts.

Fed by etcd watch events (or directly, by the in-memory index). Lookups are
local reads, never an etcd round trip; the view may be a little stale, which
is safe: every pulled block is verified by the transport anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from discovery.records import LookupResult, NodeRecord, PeerRun, Tier
from discovery.schema import namespace_prefix, parse_path, parse_tier

log = logging.getLogger("discovery.mirror")


class IndexMirror:
    """Invariant: `locations[key][node]` exists only while the etcd key for it
    does (as far as the events applied so far tell); `revision` is the etcd
    revision of the last event applied, so a watch resumes at revision + 1."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = namespace_prefix(namespace)
        self.nodes: dict[str, NodeRecord] = {}
        self.locations: dict[bytes, dict[str, Tier]] = {}
        self.revision = 0
        self.malformed = 0
        self._names: dict[str, str] = {}  # one str object per node id, not per location

    # -- feeding -----------------------------------------------------------
    def put(self, path: bytes, value: bytes, revision: int = 0) -> None:
        """Apply one PUT; a malformed key or value is logged and skipped."""
        self.revision = max(self.revision, revision)
        try:
            parsed = parse_path(self.prefix, path)
            if parsed.key is None:
                record = NodeRecord.decode(value)
                if record.node_id != parsed.node_id:
                    raise ValueError("node record under another node's key")
                self.nodes[parsed.node_id] = record
            else:
                name = self._names.setdefault(parsed.node_id, parsed.node_id)
                self.locations.setdefault(parsed.key, {})[name] = parse_tier(value)
        except ValueError as e:
            self.malformed += 1
            log.warning("skipping malformed index entry key=%r error=%s", path[:120], e)

    def delete(self, path: bytes, revision: int = 0) -> None:
        self.revision = max(self.revision, revision)
        try:
            parsed = parse_path(self.prefix, path)
        except ValueError:
            return
        if parsed.key is None:
            self.nodes.pop(parsed.node_id, None)
            return
        holders = self.locations.get(parsed.key)
        if holders is not None:
            holders.pop(parsed.node_id, None)
            if not holders:
                del self.locations[parsed.key]

    def clear(self) -> None:
        self.nodes.clear()
        self.locations.clear()

    # -- reading -----------------------------------------------------------
    def holders(self, key: bytes) -> dict[str, Tier]:
        return self.locations.get(key, {})

    def lookup(self, keys: Sequence[bytes], local_node: str) -> LookupResult:
        """The prefix of `keys` the local node holds, then, greedily, the peer
        holding the longest run from each point on: for a contiguous prefix
        the farthest-reaching choice needs the fewest peers. Peers whose node
        record is gone (dead, or not yet seen) are skipped."""
        nodes, empty = self.nodes, {}
        holders = [self.locations.get(k, empty) for k in keys]
        n = len(holders)
        local = 0
        while local < n and local_node in holders[local]:
            local += 1
        runs: list[PeerRun] = []
        pos = local
        while pos < n:
            best, best_end = None, pos
            for node in holders[pos]:
                if node == local_node or node not in nodes:
                    continue
                end = pos + 1
                while end < n and node in holders[end]:
                    end += 1
                if end > best_end:
                    best, best_end = node, end
            if best is None:
                break
            runs.append(
                PeerRun(best, pos, best_end - pos, tuple(h[best] for h in holders[pos:best_end]))
            )
            pos = best_end
        return LookupResult(local, tuple(runs))
