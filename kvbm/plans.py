"""The two halves of every move through the tiers, as values: a plan is what
`prepare_*` reserved or pinned, and `complete_*` settles it exactly once
(its `done` guard). The block manager makes them; the node holds them for
engines between the two calls."""

from __future__ import annotations

from dataclasses import dataclass

from discovery.tier import Tier
from kvbm.block_key import BlockKey


@dataclass(frozen=True)
class PrefixMatch:
    """The longest prefix of a request's keys held locally, and where each block is."""

    tiers: tuple[Tier, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.tiers)


@dataclass
class StorePlan:
    """Host slots reserved for `keys[i]`; `positions[i]` is its index in the caller's list.
    `cut`: the caller's index of the first key not held that got no slot (G2 full
    of pinned blocks), or None: every caller key before it is held or reserved.
    `anchors[i]`: the anchor of `keys[i]`'s group (0: not known; slot_table.py)."""

    keys: list[BlockKey]
    slots: list[int]
    positions: list[int]
    done: bool = False
    cut: int | None = None
    anchors: list[int] | None = None


@dataclass
class LoadPlan:
    """The first `len(slots)` of the caller's keys, each pinned in a host slot.
    `more`: cut short by the size of one load step, not by a miss (ask again
    for the rest)."""

    keys: list[BlockKey]
    slots: list[int]
    done: bool = False
    more: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.slots)
