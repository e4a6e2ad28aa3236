"""Which blocks a windowed group needs (kvbm/connector/attention_window.py);
against vLLM's own count of the tokens it skips in
tests/integration/test_attention_window_vllm.py (the unit tier has no vLLM)."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.connector.attention_window import AttentionWindow, leading_nulls

BS = 32


def test_a_sliding_hit_needs_only_the_blocks_the_next_token_sees():
    w = AttentionWindow("sliding", 64, BS)  # 6 blocks computed: the next token sees 4 and 5
    held = np.array([False] * 4 + [True] * 2)
    assert w.longest_hit(held, 0) == 6
    held[4] = False  # 5 blocks need 3 and 4; 4 blocks need 2 and 3: neither held
    assert w.longest_hit(held, 0) == 0
    held = np.array([True] * 4 + [False, True])
    assert w.longest_hit(held, 0) == 4  # a prefix the window cannot serve is not promised


def test_blocks_before_first_are_the_engines_own():
    w = AttentionWindow("sliding", 64, BS)
    assert w.longest_hit(np.array([True, False]), 3) == 4  # block 3 held; 4 missing
    assert w.longest_hit(np.array([False, True]), 3) == 3  # 5 blocks need 3, not held
    assert w.longest_hit(np.zeros(0, bool), 3) == 3


def test_a_hit_holds_at_least_its_last_block():
    w = AttentionWindow("chunked", 64, BS)  # at a chunk's end the next token sees nothing before
    assert w.longest_hit(np.zeros(4, bool), 0) == 0
    assert w.longest_hit(np.array([False, True, False, False]), 0) == 2


def test_leading_nulls_and_bad_windows():
    assert leading_nulls([0, 0, 7, 0]) == 2 and leading_nulls([]) == 0
    with pytest.raises(ValueError):
        AttentionWindow("global", 64, BS)
    with pytest.raises(ValueError):
        AttentionWindow("sliding", 0, BS)
