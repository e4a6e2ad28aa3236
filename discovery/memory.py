"""The in-memory index: one node, no etcd (the embedded default, and unit tests).

Same interface as the etcd index; publishing applies straight to the mirror.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from discovery.mirror import IndexMirror
from discovery.records import LookupResult, NodeRecord, Tier
from discovery.runs import RunBook
from discovery.schema import node_path


class MemoryIndex:
    def __init__(self, namespace: str, node: NodeRecord) -> None:
        self.node = node
        self.mirror = IndexMirror(namespace)
        self.book = RunBook()

    async def start(self) -> None:
        self.mirror.put(node_path(self.mirror.namespace, self.node.node_id), self.node.encode())

    async def set_record(self, record: NodeRecord) -> None:
        self.node = record
        await self.start()

    def publish(
        self,
        changes: Mapping[bytes, Tier | None],
        removes: Iterable[bytes] = (),
        anchors: Mapping[bytes, int] | None = None,
    ) -> None:
        """The same runs the etcd index writes, applied in the same order
        (`anchors`: for a sharded index; not used here)."""
        self.book.apply({**dict.fromkeys(removes), **changes})
        self.mirror.apply_runs(self.node.node_id, self.book.take_records())

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        return self.mirror.lookup(keys, self.node.node_id)

    async def locate(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult:
        return self.lookup(keys)

    async def flush(self) -> None:
        """Nothing is buffered here."""

    async def close(self) -> None:
        self.mirror.clear()
