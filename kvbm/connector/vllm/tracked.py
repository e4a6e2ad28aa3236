"""What the scheduler side keeps per request (`TrackedRequest`), and the
blocks it promised from the key view until they are pinned (`Promise`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvbm.block_key import Groups
from kvbm.connector.vllm.metadata import Load

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass
class TrackedRequest:
    """What the scheduler side keeps per request.

    Invariants: `seq_hashes[:saved]` are in the node, promised or being
    loaded (a save never repeats them); `seed` None means not cached (no
    keys, no loads, no saves); `hold_from` set means the block at that
    index never loaded, and nothing from it on is saved until vLLM has
    recomputed from it; `pinned` and `promised` are never both set."""

    request: Request
    seed: int | None  # the hash before its first block; None: not cached (see _hash_prompt)
    seq_hashes: list[int]  # of its full blocks so far (prompt, then generated tokens)
    extras: dict[int, bytes] = field(default_factory=dict)  # by block (kvbm/connector/identity.py)
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group
    saved: int = 0  # leading blocks known to be in the node
    had_saves: bool = False  # a save was planned: with async copies, freeing waits for it
    hold_from: int | None = None  # a block that never loaded: no saves until recomputed from it
    pinned: Load | None = None  # pinned by get_num_new_matched_tokens, not yet sent
    promised: int = 0  # blocks promised from the key view, not yet allocated
    pinned_from: int = 0  # the block `pinned` starts at (a window's, or first_block)
    waiting: bool = False  # the hit told vLLM was asynchronous (a windowed group's)
    first_block: int = 0

    def hold(self, bad: set[int]) -> None:
        """Hold this request's saves from its first block in `bad` on."""
        for group in self.block_ids:
            for i, block in enumerate(group):
                if block in bad:
                    self.hold_from = i if self.hold_from is None else min(self.hold_from, i)
                    self.saved = min(self.saved, i)
                    break


@dataclass
class Promise:
    """Blocks `get_num_new_matched_tokens` promised from the key view, with
    the vLLM blocks allocated for them: pinned in one batch per step."""

    tracked: TrackedRequest
    first: int
    block_ids: list[list[int]]  # per KV cache group, as metadata.Load's
    waiting: bool = False  # an asynchronous load (metadata.Load.waiting)

    @property
    def count(self) -> int:
        return len(self.block_ids[0]) if self.block_ids else 0

    def hashes(self) -> list[int]:
        return self.tracked.seq_hashes[self.first : self.first + self.count]

    def groups(self) -> Groups:
        return Groups.of(self.tracked.seq_hashes, self.first, self.first + self.count)
