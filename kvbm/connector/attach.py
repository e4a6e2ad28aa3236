"""An engine's attachment to its node: the socket link (kvbm/node/engine_wire.py)
and the node's host arena mapped into the engine process.

The engine copies whole blocks between its KV tensors (G1) and the arena
slots the node hands out; the node never touches engine memory. Every node
failure surfaces as NodeError, which a connector turns into "not cached"
(the engine recomputes), never into an engine crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvbm.block_key import BlockKey, Groups, KeySpace
from kvbm.connector.copy import ArenaBlocks, load_in_steps, store_in_steps
from kvbm.connector.engine_kv import EngineKV
from kvbm.engine_wire import (
    MAX_BATCH,
    MAX_KEYS,
    Available,
    EngineLink,
    NodeError,
    Refusal,
    geometry_to_wire,
)
from kvbm.errors import ArenaError
from kvbm.hashing import HASH_VERSION, BlockHasher, HashKey
from kvbm.key_view import LOCAL, REMOTE_DISK, REMOTE_HOST, UNSURE, KeyViewReader
from kvbm.layout import ModelGeometry
from kvbm.shm_arena import SHM_DIR, SharedArena
from kvbm.versions import THIS, Compatibility, VersionRefused

log = logging.getLogger("kvbm.connector")

__all__ = ["Available", "NodeAttachment", "NodeError", "Pinned", "Refusal", "report_refusal"]


@dataclass(frozen=True)
class Pinned:
    """Blocks the node pinned in its host arena for this engine: `slots[i]`
    holds the i-th requested key; `more` when a load step cut it short."""

    lease: int
    slots: list[int]
    sources: dict[str, int]
    more: bool


def node_stats(socket_path: str, timeout: float = 10.0, node_uid: int | None = None) -> dict:
    """A node's stats (`kvbm status`), asked without attaching: no hello,
    so the node sets nothing up for an engine."""
    link = EngineLink(socket_path, timeout, node_uid)
    try:
        return link.call("stats", {})
    finally:
        link.close()


def report_refusal(
    socket_path: str, refusal: Refusal, timeout: float = 5.0, node_uid: int | None = None
) -> None:
    """Tell the node that an engine runs without kvbm, and why (`kvbm
    status` shows it). Like `node_stats`, one call without a hello: an
    engine refused has no geometry to attach with. NodeError when the node
    is away or does not take it."""
    link = EngineLink(socket_path, timeout, node_uid)
    try:
        link.call("refused", refusal.to_wire())
    finally:
        link.close()


class NodeAttachment:
    """Invariant: every lease the node grants here is settled (released or
    committed) before the call that took it returns, error or not."""

    def __init__(
        self,
        socket_path: str,
        geometry: ModelGeometry,
        rank: int = 0,
        remote: Sequence[str] = (),
        timeout: float = 30.0,
        map_arena: bool = True,
        key_id: int | None = None,
        node_uid: int | None = None,
        versions: Compatibility = THIS,
    ) -> None:
        """`map_arena=False`: a link that only asks (a scheduler), never copies.
        `key_id`: the hashing key's id this engine already hashes under (when
        it attaches again); the node refuses the engine if it has another.
        `node_uid`: the user the node runs as (unset: this user or root); a
        socket or an arena of another user is refused (kvbm/engine_wire.py).
        `versions`: this engine's protocol version and the rule for the
        node's (kvbm/versions.py); either side refusing the other is a
        NodeError that names both versions."""
        self.geometry = geometry
        self.remote = list(remote)
        self.link = EngineLink(socket_path, timeout, node_uid)
        hashing: dict = {"version": HASH_VERSION}
        if key_id is not None:
            hashing["key_id"] = key_id
        hello = self.link.call(
            "hello",
            {
                "geometry": geometry_to_wire(geometry),
                "engine": f"pid-{os.getpid()}",
                "hash": hashing,
                "protocol": versions.ours,
            },
        )
        try:  # first: a node of another version may mean otherwise by the rest
            self.protocol = versions.check(hello.get("protocol"), "the node", "this engine")
        except VersionRefused as e:
            self.link.close()
            raise NodeError(str(e)) from None
        if hello["fingerprint"] != geometry.fingerprint:
            raise NodeError("the node answered for another layout fingerprint")
        try:
            said = hello.get("hash", {"version": 1})  # a node of hash version 1 says none
            if said["version"] != HASH_VERSION:
                theirs = said["version"]
                raise ValueError(f"it hashes with version {theirs}, this engine {HASH_VERSION}")
            key = HashKey(said["key"], said["key_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise NodeError(f"the node's block hashing is not this engine's: {e!r}") from None
        if key_id is not None and key.key_id != key_id:
            raise NodeError("the node hashes under another key than this engine")
        self.hasher = BlockHasher(key)  # the engine's block keys, under the fleet's key
        self.node_id: str = hello["node_id"]
        self.space = KeySpace(hello["namespace"], geometry.fingerprint, rank)
        self.num_slots: int = hello["num_slots"]
        self.step_blocks: int = hello["step_blocks"]  # most blocks one load or store step moves
        self.arena_name: str = hello["arena"]  # changes when the node restarts
        self.arena: SharedArena | None = None
        self.blocks: ArenaBlocks | None = None
        self.view: KeyViewReader | None = None
        self._remote_bits = (REMOTE_HOST if "host" in self.remote else 0) | (
            REMOTE_DISK if "disk" in self.remote else 0
        )
        if hello.get("view"):
            try:
                self.view = KeyViewReader(
                    hello["view"], hello["view_bytes"], hello.get("arena_dir", SHM_DIR)
                )
            except (ArenaError, ValueError) as e:  # every lookup asks the node instead
                log.warning("cannot map the node's key view, lookups ask the node: %s", e)
        if map_arena:
            self.arena = SharedArena.attach(
                hello["arena"],
                hello["arena_bytes"],
                hello.get("arena_dir", SHM_DIR),
                owner_uid=self.link.node_uid,
            )
            self.blocks = ArenaBlocks(geometry, self.arena.array, self.num_slots)

    def keys(self, seq_hashes: list[int]) -> list[BlockKey]:
        return self.space.keys(seq_hashes)

    def lookup(
        self, keys: Sequence[BlockKey], ask_node: bool = False, groups: Groups | None = None
    ) -> Available:
        """What the node could serve of `keys`: from its key view when that
        can tell (no round trip), else (or with `ask_node`) the node's own
        answer, exact as of now. `groups`, here and below: the keys' group
        anchors (kvbm/block_key.py), which a sharded index places keys by;
        without them each key is its own, and a sharded fleet finds them
        only where they were stored without them too."""
        seen = None if ask_node else self.seen(keys)
        if seen is not None:
            return seen
        body = {"keys": _wire(keys), "remote": self.remote}
        return Available.from_wire(self.link.call("lookup", _grouped(body, groups)))

    def seen(self, keys: Sequence[BlockKey]) -> Available | None:
        """The lookup as the node's key view shows it (kvbm/key_view.py), or
        None where it cannot tell. Advice: a load pins what is really there."""
        if self.view is None or not self.view.alive():
            return None
        bits = self.view.bits(keys)
        if bits is None:
            return None
        n = len(bits)
        held = (bits & LOCAL) != 0
        local = n if held.all() else int(held.argmin())
        rest = bits[local:]
        peers = (rest & self._remote_bits) != 0
        m = len(rest) if peers.all() else int(peers.argmin())
        if local + m < n and bits[local + m] == UNSURE:
            return None
        if m and self.view.peers_avoided():
            return None  # the node leaves some peer alone: only it knows whose keys
        if local < n and self.view.peers_elsewhere():
            return None  # a sharded index: only the node (asking owners) knows the rest
        on_host = 0
        if self._remote_bits & REMOTE_HOST:
            on_host = int(np.count_nonzero(rest[:m] & REMOTE_HOST))
        return Available(local, on_host, m - on_host)

    def held(self, keys: Sequence[BlockKey]) -> np.ndarray | None:
        """Which of `keys` the node could serve (held here, or by a peer in a
        remote tier this engine asks for), as its key view shows them; None
        where the view cannot tell one of them. For a windowed group, which
        needs a prefix's last blocks, not the whole prefix. Advice, as
        `seen`'s."""
        if self.view is None or not self.view.alive():
            return None
        bits = self.view.bits(keys)
        if bits is None or (bits == UNSURE).any():
            return None
        local = (bits & LOCAL) != 0
        if local.all():
            return local
        if self.view.peers_elsewhere():
            return None  # a sharded index: only the node (asking owners) knows
        remote = (bits & self._remote_bits) != 0
        if (remote & ~local).any() and self.view.peers_avoided():
            return None  # the node leaves some peer alone: only it knows whose keys
        return local | remote

    def load(
        self,
        kv: EngineKV,
        keys: Sequence[BlockKey],
        block_ids: Sequence[int],
        groups: Groups | None = None,
    ) -> tuple[int, dict[str, int]]:
        """Copy the longest available prefix of `keys` into engine blocks
        `block_ids` (one per key). Returns (blocks loaded, by source)."""

        def prepare(rest: Sequence[BlockKey]) -> tuple[list[int], Pinned, bool]:
            part = None if groups is None else groups.part(len(keys) - len(rest), len(rest))
            got = self.prepare_load(rest, part)
            return got.slots, got, got.more

        def complete(got: object) -> None:
            assert isinstance(got, Pinned)
            self.complete_load(got.lease)

        loaded, steps = load_in_steps(self._blocks(), kv, keys, block_ids, prepare, complete)
        sources: dict[str, int] = {}
        for got in steps:
            assert isinstance(got, Pinned)
            for source, n in got.sources.items():
                sources[source] = sources.get(source, 0) + n
        return loaded, sources

    def prepare_load(self, keys: Sequence[BlockKey], groups: Groups | None = None) -> Pinned:
        """Have the node stage (and pull from peers) the longest available
        prefix of `keys` into its host arena and pin it until `complete_load`."""
        body = {"keys": _wire(keys), "remote": self.remote}
        reply = self.link.call("load", _grouped(body, groups))
        return Pinned(reply["lease"], list(reply["slots"]), dict(reply["sources"]), reply["more"])

    def prepare_loads(
        self, requests: Sequence[Sequence[BlockKey]], groups: Sequence[Groups] | None = None
    ) -> list[Pinned]:
        """`prepare_load` for several requests (`groups`: each one's), in as
        few round trips as the node's limits allow (MAX_BATCH requests,
        MAX_KEYS keys a call): all granted, or (NodeError) none."""
        pinned: list[Pinned] = []
        try:
            for at, batch in _batches(requests):
                body: dict = {"requests": [_wire(k) for k in batch], "remote": self.remote}
                if groups is not None:
                    body["groups"] = [g.to_wire() for g in groups[at : at + len(batch)]]
                reply = self.link.call("load_many", body)
                pinned += [
                    Pinned(r["lease"], list(r["slots"]), dict(r["sources"]), r["more"])
                    for r in reply["loads"]
                ]
        except NodeError:
            for p in pinned:
                with contextlib.suppress(NodeError):
                    self.complete_load(p.lease)
            raise
        return pinned

    def complete_load(self, lease: int) -> None:
        self.link.call("release", {"lease": lease})

    def copy_in(self, kv: EngineKV, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Arena slots -> engine blocks (whole blocks, one copy per span of slots)."""
        if len(slots):
            self._blocks().scatter(kv, slots, block_ids)

    def store(
        self,
        kv: EngineKV,
        keys: Sequence[BlockKey],
        block_ids: Sequence[int],
        groups: Groups | None = None,
    ) -> int:
        """Write engine blocks through to the node's G2. Returns blocks added."""
        done = 0

        def reserve(chunk: Sequence[BlockKey]) -> tuple[list[int], list[int], int]:
            nonlocal done
            got = self.reserve(chunk, None if groups is None else groups.part(done, len(chunk)))
            done += len(chunk)
            return got

        blocks = self._blocks()
        return store_in_steps(blocks, kv, keys, block_ids, self.step_blocks, reserve, self.commit)

    def reserve(
        self, keys: Sequence[BlockKey], groups: Groups | None = None
    ) -> tuple[list[int], list[int], int]:
        """Slots for those of `keys` (at most step_blocks) the node does not
        hold yet -> (slots, their positions in keys, lease). Write them, then
        `commit` the lease, whatever the write did."""
        reply = self.link.call("reserve", _grouped({"keys": _wire(keys)}, groups))
        return reply["slots"], reply["positions"], reply["lease"]

    def commit(self, lease: object, ok: bool) -> int:
        """Publish the reserved slots (`ok`), or give them back. Returns blocks added."""
        return self.link.call("commit", {"lease": lease, "ok": ok})["added"]

    def _blocks(self) -> ArenaBlocks:
        if self.blocks is None:
            raise NodeError("this attachment does not map the arena")
        return self.blocks

    def stats(self) -> dict:
        return self.link.call("stats", {})

    def close(self) -> None:
        """Safe to call twice."""
        self.link.close()
        self.blocks = None  # drop views before unmapping
        if self.arena is not None:
            self.arena.close()
        if self.view is not None:
            self.view.close()


def _batches(
    requests: Sequence[Sequence[BlockKey]],
) -> list[tuple[int, Sequence[Sequence[BlockKey]]]]:
    """(index of the first, requests) for each call the node's limits allow."""
    out: list[tuple[int, Sequence[Sequence[BlockKey]]]] = []
    start = keys = 0
    for i, r in enumerate(requests):
        if i > start and (i - start == MAX_BATCH or keys + len(r) > MAX_KEYS):
            out.append((start, requests[start:i]))
            start, keys = i, 0
        keys += len(r)
    if start < len(requests):
        out.append((start, requests[start:]))
    return out


def _grouped(body: dict, groups: Groups | None) -> dict:
    if groups is not None:
        body["groups"] = groups.to_wire()
    return body


def _wire(keys: Sequence[BlockKey]) -> list[bytes]:
    return keys if isinstance(keys, list) else list(keys)
