"""The tests' model: 2 layers, hidden 128, 4 heads, 2 KV heads (head_dim 32),
random weights (kvbm/bench/model.py)."""

from __future__ import annotations

from kvbm.bench.model import build_llama


def build(path: str) -> str:
    return build_llama(path)
