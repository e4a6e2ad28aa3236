"""The in-memory index: one node, no etcd (the embedded default, and unit tests).

Same interface as the etcd index; publishing applies straight to the mirror.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from discovery.mirror import IndexMirror
from discovery.records import LookupResult, NodeRecord, Tier
from discovery.schema import block_path, node_path


class MemoryIndex:
    def __init__(self, namespace: str, node: NodeRecord) -> None:
        self.node = node
        self.mirror = IndexMirror(namespace)

    async def start(self) -> None:
        self.mirror.put(node_path(self.mirror.namespace, self.node.node_id), self.node.encode())

    async def set_record(self, record: NodeRecord) -> None:
        self.node = record
        await self.start()

    def publish(self, adds: Mapping[bytes, Tier], removes: Iterable[bytes] = ()) -> None:
        ns, me = self.mirror.namespace, self.node.node_id
        for key in removes:
            self.mirror.delete(block_path(ns, key, me))
        for key, tier in adds.items():
            self.mirror.put(block_path(ns, key, me), Tier(tier).value.encode())

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        return self.mirror.lookup(keys, self.node.node_id)

    async def flush(self) -> None:
        """Nothing is buffered here."""

    async def close(self) -> None:
        self.mirror.clear()
