"""The in-memory index: one node, no etcd (the embedded default, and unit tests).

It meets the same contract as the etcd index (discovery/index.py);
publishing applies straight to the mirror.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from discovery.mirror import Follower, IndexMirror
from discovery.records import LookupResult, NodeRecord
from discovery.runs import RunBook
from discovery.schema import node_path
from discovery.tier import Tier


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

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult:
        return self.mirror.lookup(keys, self.node.node_id)

    def peer(self, node_id: str) -> NodeRecord | None:
        return self.mirror.nodes.get(node_id)

    def peers(self) -> list[str]:
        return sorted(self.mirror.nodes)

    def follow(self, follower: Follower) -> bool:
        """One node: no peer holds anything, and there is nothing to follow."""
        return True

    @property
    def state(self) -> str:
        return "memory"

    @property
    def refused(self) -> tuple[int, int]:
        return self.mirror.rejected + self.mirror.stale, self.mirror.over_cap

    def stats(self) -> dict:
        return {"index_mirror_keys": len(self.mirror.locations)}

    async def flush(self, timeout: float | None = None) -> None:
        """Nothing is buffered here."""

    async def close(self) -> None:
        self.mirror.clear()
