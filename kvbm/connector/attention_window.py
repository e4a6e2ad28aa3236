"""Which blocks a KV cache group of windowed attention needs.

A sliding-window layer attends to the last `tokens` tokens; a chunked-local
one to the tokens of its own chunk. vLLM frees a request's blocks that fall
behind the window as its computation moves on, and puts its null block
(block id 0) in their place (vllm/v1/core/single_type_kv_cache_manager.py,
`get_num_skipped_tokens`). So a hit of n blocks needs only the blocks from
the first the next token still sees: those are the ones loaded, pinned and
pulled from a peer, and a prefix whose early blocks were evicted still hits
as far as its window's blocks are held.

The window is not in the layout fingerprint: a block's KV is the same bytes
whether an engine keeps every block (an engine with vLLM's hybrid manager
off, `--disable-hybrid-kv-cache-manager`, stores sliding-window layers as
full attention) or frees the ones behind the window. What the window is
(and so what the KV is) comes from the checkpoint's config and
`hf_overrides`, both in the model's identity (kvbm/connector/identity.py),
so engines that attend over other windows never share keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NULL_BLOCK = 0  # vLLM's null block: the first block of its pool, never a request's own


@dataclass(frozen=True)
class AttentionWindow:
    """A group's window as vLLM's block manager applies it.

    Invariant: `tokens` > 0; `kind` is "sliding" (the last `tokens` tokens)
    or "chunked" (chunks of `tokens` tokens)."""

    kind: str
    tokens: int
    block_size: int
    retained: int = 0  # tokens vLLM keeps behind a sliding window (speculative decoding's)

    def __post_init__(self) -> None:
        if (
            self.kind not in ("sliding", "chunked")
            or self.tokens <= 0
            or self.block_size <= 0
            or self.retained < 0
        ):
            raise ValueError(f"not an attention window: {self}")

    def first_needed(self, computed_blocks: np.ndarray) -> np.ndarray:
        """For each count of computed blocks, the first block the next token
        still attends to (vLLM's skipped tokens, in whole blocks)."""
        p = np.asarray(computed_blocks, dtype=np.int64) * self.block_size
        if self.kind == "sliding":
            skipped = np.maximum(0, p - self.tokens + 1 - self.retained)
        else:
            skipped = p // self.tokens * self.tokens
        return skipped // self.block_size

    def first_loaded(self, computed: np.ndarray | int, first: int) -> np.ndarray:
        """For each count of computed blocks (a hit ending there), the first
        block it loads: the first the next token attends to, at least the
        hit's last block (a hit is never made of nothing held), and never one
        before `first` (the engine's own)."""
        computed = np.asarray(computed, dtype=np.int64)
        return np.maximum(np.minimum(self.first_needed(computed), computed - 1), first)

    def longest_hit(self, held: np.ndarray, first: int) -> int:
        """The most blocks computed, `first` plus up to len(held), such that
        every block the next token needs at or after `first` is held, and the
        last block at least (`held[i]`: block first + i). Blocks before
        `first` are the engine's own. Returns `first` when nothing beyond it
        can be served."""
        held = np.asarray(held, dtype=bool)
        if held.size == 0:
            return first
        missing = np.concatenate(([0], np.cumsum(~held)))
        n = np.arange(first + 1, first + held.size + 1)
        lo = self.first_loaded(n, first) - first
        ok = missing[n - first] - missing[lo] == 0
        hits = n[ok]
        return int(hits[-1]) if hits.size else first


def leading_nulls(block_ids: list[int]) -> int:
    """How many of `block_ids` lead with vLLM's null block (blocks freed
    behind a window, or never allocated for it)."""
    n = 0
    while n < len(block_ids) and block_ids[n] == NULL_BLOCK:
        n += 1
    return n


def loaded_ids(
    group_ids: tuple[list[int], ...] | list[list[int]], first: int, n: int
) -> tuple[list[list[int]], int]:
    """What a hit of blocks [first, first + n) loads, from vLLM's block ids
    of every KV cache group: how many leading positions no group has a
    block at (behind every group's window: not loaded at all), and per
    group the ids from there on, -1 where that group has none (vLLM's null
    block: its layers of that slot are left alone)."""
    ids = [list(g[first : first + n]) for g in group_ids]
    skip = min(leading_nulls(g) for g in ids) if ids else 0
    return [[b if b != NULL_BLOCK else -1 for b in g[skip:]] for g in ids], skip
