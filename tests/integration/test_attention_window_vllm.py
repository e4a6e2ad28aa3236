"""`AttentionWindow.first_needed` against vLLM's own count of the tokens
its block manager skips behind a window (the unit tier, without vLLM,
tests the rest of kvbm/connector/attention_window.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.connector.attention_window import AttentionWindow

BS = 32


def vllm_skipped_blocks(kind: str, tokens: int, computed_tokens: int, retained: int = 0) -> int:
    """vLLM's `get_num_skipped_tokens` (single_type_kv_cache_manager.py) in
    whole blocks, as its block manager pads a request's blocks with nulls."""
    from vllm.v1.core.single_type_kv_cache_manager import (
        ChunkedLocalAttentionManager,
        SlidingWindowManager,
    )

    if kind == "sliding":
        manager = object.__new__(SlidingWindowManager)
        manager.sliding_window, manager.extra_retained_tokens = tokens, retained
    else:
        manager = object.__new__(ChunkedLocalAttentionManager)
        manager.attention_chunk_size = tokens
    return manager.get_num_skipped_tokens(computed_tokens) // BS


@pytest.mark.parametrize(
    "kind,tokens,retained",
    [("sliding", 64, 0), ("sliding", 100, 0), ("sliding", 64, 40), ("chunked", 64, 0)],
)
def test_first_needed_is_vllms_count_of_skipped_blocks(kind, tokens, retained):
    """(`retained`: the tokens vLLM keeps behind a window for speculative decoding.)"""
    w = AttentionWindow(kind, tokens, BS, retained)
    n = np.arange(0, 40)
    want = [vllm_skipped_blocks(kind, tokens, b * BS, retained) for b in n]
    assert w.first_needed(n).tolist() == want
