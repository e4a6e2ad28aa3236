"""A node's local copy of one namespace of the index, in plain dicts.

Fed by etcd watch events (or directly, by the in-memory index). Lookups are
local reads, never an etcd round trip; the view may be a little stale, which
is safe: every pulled block is verified by the transport anyway.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from itertools import groupby

from discovery.records import LookupResult, NodeRecord, PeerRun, Tier
from discovery.schema import namespace_prefix, parse_path, parse_tier

log = logging.getLogger("discovery.mirror")


class Holders(dict):
    """Which nodes hold a block, and in which tier: {node_id: Tier}. Shared by
    every block with the same holders and never changed in place (a change
    swaps in another one), so neighbouring blocks of a prompt usually point at
    one object: a lookup compares them by identity, and a location costs a
    dict slot, not a dict."""

    __slots__ = ("__weakref__",)


_NOBODY = Holders()


class IndexMirror:
    """Invariant: `locations[key]` holds node `n` only while the etcd key for it
    does (as far as the events applied so far tell), and is never empty;
    `revision` is the etcd revision of the last event applied, so a watch
    resumes at revision + 1."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = namespace_prefix(namespace)
        self.nodes: dict[str, NodeRecord] = {}
        self.locations: dict[bytes, Holders] = {}
        self.revision = 0
        self.malformed = 0
        self._names: dict[str, str] = {}  # one str object per node id, not per location
        self._shared: weakref.WeakValueDictionary[frozenset, Holders] = (
            weakref.WeakValueDictionary()
        )

    def _holders(self, items: dict[str, Tier]) -> Holders:
        signature = frozenset(items.items())
        found = self._shared.get(signature)
        if found is None:
            found = self._shared[signature] = Holders(items)
        return found

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
                return
            tier = parse_tier(value)
        except Exception as e:  # whatever a hostile value raises, it is skipped
            self.malformed += 1
            log.warning("skipping malformed index entry key=%r error=%s", path[:120], e)
            return
        name = self._names.setdefault(parsed.node_id, parsed.node_id)
        old = self.locations.get(parsed.key, _NOBODY)
        if old.get(name) is not tier:
            self.locations[parsed.key] = self._holders({**old, name: tier})

    def delete(self, path: bytes, revision: int = 0) -> None:
        self.revision = max(self.revision, revision)
        try:
            parsed = parse_path(self.prefix, path)
        except ValueError:
            return
        if parsed.key is None:
            self.nodes.pop(parsed.node_id, None)
            return
        old = self.locations.get(parsed.key)
        if old is None or parsed.node_id not in old:
            return
        rest = {n: t for n, t in old.items() if n != parsed.node_id}
        if rest:
            self.locations[parsed.key] = self._holders(rest)
        else:
            del self.locations[parsed.key]

    def adopt(self, fresh: IndexMirror) -> None:
        """Take over another mirror's content in one step (a resync), so lookups
        see the old view or the new one, never a half-built one."""
        self.nodes, self.locations = fresh.nodes, fresh.locations
        self._names, self._shared = fresh._names, fresh._shared
        self.revision = fresh.revision
        self.malformed += fresh.malformed

    def clear(self) -> None:
        self.nodes.clear()
        self.locations.clear()

    # -- reading -----------------------------------------------------------
    def holders(self, key: bytes) -> dict[str, Tier]:
        return dict(self.locations.get(key, _NOBODY))

    def lookup(self, keys: Sequence[bytes], local_node: str) -> LookupResult:
        """The prefix of `keys` the local node holds, then, greedily, the peer
        holding the longest run from each point on: for a contiguous prefix
        the farthest-reaching choice needs the fewest peers. Peers whose node
        record is gone (dead, or not yet seen) are skipped.

        Works on groups of consecutive keys sharing one Holders object, so a
        prompt whose blocks sit on the same nodes costs one dict probe per key
        (in C) and a few Python steps per group.
        """
        # Consecutive keys with one Holders object form a group; groupby
        # compares identity first, in C, so this loop runs once per group.
        groups: list[Holders] = []
        starts = [0]
        for holders, run in groupby(map(self.locations.get, keys)):
            if holders is None:
                break
            groups.append(holders)
            starts.append(starts[-1] + len(list(run)))
        g, ng = 0, len(groups)
        while g < ng and local_node in groups[g]:
            g += 1
        local = starts[g]
        nodes, runs = self.nodes, []
        while g < ng:
            best, best_end = None, g
            for node in groups[g]:
                if node == local_node or node not in nodes:
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
