"""An engine's attachment to its node: the socket link (kvbm/node/engine_wire.py)
and the node's host arena mapped into the engine process.

The engine copies whole blocks between its KV tensors (G1) and the arena
slots the node hands out; the node never touches engine memory. Every node
failure surfaces as NodeError, which a connector turns into "not cached"
(the engine recomputes), never into an engine crash.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvbm.block_key import BlockKey, KeySpace
from kvbm.engine_wire import EngineLink, NodeError, geometry_to_wire
from kvbm.layout import ArenaBlocks, EngineKV, ModelGeometry
from kvbm.shm_arena import SHM_DIR, SharedArena

__all__ = ["Available", "NodeAttachment", "NodeError", "Pinned"]


@dataclass(frozen=True)
class Available:
    """Leading blocks of a request the node holds (`local`), then how many more
    its peers hold after them, by the tier the index shows them in."""

    local: int
    remote_host: int = 0
    remote_disk: int = 0

    @property
    def total(self) -> int:
        return self.local + self.remote_host + self.remote_disk


@dataclass(frozen=True)
class Pinned:
    """Blocks the node pinned in its host arena for this engine: `slots[i]`
    holds the i-th requested key; `more` when a load step cut it short."""

    lease: int
    slots: list[int]
    sources: dict[str, int]
    more: bool


class NodeAttachment:
    """Invariant: every lease the node grants here is settled (released or
    committed) before the call that took it returns, error or not."""

    def __init__(
        self,
        socket_path: str,
        geometry: ModelGeometry,
        tp_rank: int = 0,
        remote: Sequence[str] = (),
        timeout: float = 30.0,
        map_arena: bool = True,
    ) -> None:
        """`map_arena=False`: a link that only asks (a scheduler), never copies."""
        self.geometry = geometry
        self.remote = list(remote)
        self.link = EngineLink(socket_path, timeout)
        hello = self.link.call(
            "hello", {"geometry": geometry_to_wire(geometry), "engine": f"pid-{os.getpid()}"}
        )
        if hello["fingerprint"] != geometry.fingerprint:
            raise NodeError("the node answered for another layout fingerprint")
        self.node_id: str = hello["node_id"]
        self.space = KeySpace(hello["namespace"], geometry.fingerprint, tp_rank)
        self.num_slots: int = hello["num_slots"]
        self.arena_name: str = hello["arena"]  # changes when the node restarts
        self.arena: SharedArena | None = None
        self.blocks: ArenaBlocks | None = None
        if map_arena:
            self.arena = SharedArena.attach(
                hello["arena"], hello["arena_bytes"], hello.get("arena_dir", SHM_DIR)
            )
            self.blocks = ArenaBlocks(geometry, self.arena.tensor, self.num_slots)

    def keys(self, seq_hashes: list[int]) -> list[BlockKey]:
        return self.space.keys(seq_hashes)

    def lookup(self, keys: Sequence[BlockKey]) -> Available:
        reply = self.link.call("lookup", {"keys": _wire(keys), "remote": self.remote})
        return Available(int(reply["local"]), int(reply["remote_host"]), int(reply["remote_disk"]))

    def load(
        self, kv: EngineKV, keys: Sequence[BlockKey], block_ids: Sequence[int]
    ) -> tuple[int, dict[str, int]]:
        """Copy the longest available prefix of `keys` into engine blocks
        `block_ids` (one per key). Returns (blocks loaded, by source)."""
        if len(block_ids) != len(keys):
            raise ValueError("block_ids and keys must have equal length")
        ids = np.asarray(block_ids, dtype=np.int64)
        kv.check_ids(ids)
        loaded, sources = 0, {}
        while loaded < len(keys):
            got = self.pin(keys[loaded:])
            try:
                self.copy_in(kv, got.slots, ids[loaded : loaded + len(got.slots)])
            finally:
                self.release(got.lease)
            for source, n in got.sources.items():
                sources[source] = sources.get(source, 0) + n
            loaded += len(got.slots)
            if not got.more:
                break
        return loaded, sources

    def pin(self, keys: Sequence[BlockKey]) -> Pinned:
        """Have the node stage (and pull from peers) the longest available
        prefix of `keys` into its host arena and pin it until `release`."""
        reply = self.link.call("load", {"keys": _wire(keys), "remote": self.remote})
        return Pinned(reply["lease"], list(reply["slots"]), dict(reply["sources"]), reply["more"])

    def release(self, lease: int) -> None:
        self.link.call("release", {"lease": lease})

    def copy_in(self, kv: EngineKV, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Arena slots -> engine blocks (whole blocks, one copy per run of slots)."""
        if self.blocks is None:
            raise NodeError("this attachment does not map the arena")
        if len(slots):
            self.blocks.scatter(kv, slots, block_ids)

    def store(self, kv: EngineKV, keys: Sequence[BlockKey], block_ids: Sequence[int]) -> int:
        """Write engine blocks through to the node's G2. Returns blocks added."""
        if len(block_ids) != len(keys):
            raise ValueError("block_ids and keys must have equal length")
        ids = np.asarray(block_ids, dtype=np.int64)
        kv.check_ids(ids)
        step = max(1, self.num_slots // 2)  # the other half can drain meanwhile
        if self.blocks is None:
            raise NodeError("this attachment does not map the arena")
        added = 0
        for start in range(0, len(keys), step):
            reply = self.link.call("reserve", {"keys": _wire(keys[start : start + step])})
            ok = False
            try:
                if reply["slots"]:
                    chunk = ids[start:][np.asarray(reply["positions"], dtype=np.int64)]
                    self.blocks.gather(kv, chunk, reply["slots"])  # type: ignore[union-attr]
                ok = True
            finally:
                added += self.link.call("commit", {"lease": reply["lease"], "ok": ok})["added"]
        return added

    def stats(self) -> dict:
        return self.link.call("stats", {})

    def close(self) -> None:
        """Safe to call twice."""
        self.link.close()
        self.blocks = None  # drop views before unmapping
        if self.arena is not None:
            self.arena.close()


def _wire(keys: Sequence[BlockKey]) -> list[bytes]:
    return [k.encode() for k in keys]
