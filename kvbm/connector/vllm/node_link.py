"""One side's way to the node: attached as the engine starts (where the
node is not there yet, at the first hook that needs it), and attached again
after a failure, never more often than every `RETRY_S`. A node that is gone
makes every request a miss until it is back, never an engine error."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.connector.vllm.engine_setup import EngineSetup
from kvbm.connector.vllm.metadata import Load
from kvbm.errors import KvbmError
from kvbm.hashing import BlockHasher

log = logging.getLogger("kvbm.connector.vllm")
RETRY_S = 2.0  # after a node failure, try to reattach this often


class NodeLink:
    """The attachments to one node socket, one per rank this side speaks
    for (its stage and tensor-parallel rank).

    Invariants: `current` is None or holds one attachment per rank asked,
    all to one node; after a failure no attach is tried before the retry
    time; the hashing key of the first node attached is kept, and a node
    that hashes under another key is refused (its keys would name other
    blocks). `before_close` runs before any attachment closes: a worker
    waits there for its copies in flight, whose arena mapping the close
    unmaps."""

    def __init__(
        self, setup: EngineSetup, map_arena: bool, before_close: Callable[[], None] = lambda: None
    ) -> None:
        self._setup = setup
        self._map_arena = map_arena
        self._before_close = before_close
        self._node: list[NodeAttachment] | None = None
        self._retry_at = 0.0
        self.hasher: BlockHasher | None = None  # from the node, at the first attach

    @property
    def current(self) -> list[NodeAttachment] | None:
        """The attachments made, without trying to make them."""
        return self._node

    def attached(self, ranks: Sequence[int]) -> list[NodeAttachment] | None:
        """The attachments for `ranks` (the scheduler: every rank's keys; a
        worker: its own, with the arena mapped); None while the node is away."""
        if self._node is not None:
            return self._node
        setup = self._setup
        if setup.off or time.monotonic() < self._retry_at:
            return None
        made: list[NodeAttachment] = []
        try:
            for rank in ranks:
                made.append(
                    NodeAttachment(
                        setup.socket,
                        setup.geometry,
                        rank,
                        setup.cfg.remote_tier_list,
                        map_arena=self._map_arena,
                        key_id=self.hasher.key.key_id if self.hasher else None,
                        node_uid=setup.cfg.node_uid,
                    )
                )
        except (NodeError, KvbmError, OSError) as e:
            for a in made:
                a.close()
            self.lost(e)
            return None
        self._node = made
        self.hasher = self.hasher or made[0].hasher
        return made

    def reattach(self) -> None:
        """Close the attachments; the next `attached` makes new ones at once."""
        self.close()
        self._retry_at = 0.0

    def lost(self, error: BaseException) -> None:
        """The node failed: close, and try again after `RETRY_S`."""
        log.warning("kvbm node unavailable, serving without it: %s", error)
        self.reattach()
        self._retry_at = time.monotonic() + RETRY_S

    def release(self, load: Load) -> None:
        """Give back a load's pins (every rank's lease) without copying."""
        node = self._node
        if node is None:
            return  # the node is gone, and its pins with it
        try:
            for lease in load.leases:
                node[0].complete_load(lease)
        except NodeError as e:
            self.lost(e)

    def close(self) -> None:
        self._before_close()
        for a in self._node or []:
            a.close()
        self._node = None
