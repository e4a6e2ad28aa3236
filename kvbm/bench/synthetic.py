"""A stand-in for an engine's KV cache whose every block derives from its key,
so any block an engine receives can be checked bit for bit (the demo, the
soak)."""

from __future__ import annotations

import torch

from kvbm.block_key import BlockKey, seq_hash
from kvbm.connector.engine_kv import EngineKV
from kvbm.layout import ModelGeometry


class SyntheticEngine:
    """Stands in for vLLM: per-layer KV tensors, and a 'forward pass' that fills
    a block with bytes derived from its key alone, so any load can be checked."""

    def __init__(self, geometry: ModelGeometry, num_blocks: int) -> None:
        self.geometry = geometry
        self.layers = [
            torch.zeros(num_blocks, *geometry.layer_shape) for _ in range(geometry.num_layers)
        ]
        self.kv = EngineKV(geometry, self.layers)

    def expected(self, key: BlockKey) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seq_hash(key) & (2**63 - 1))
        return [torch.randn(self.geometry.layer_shape, generator=gen) for _ in self.layers]

    def compute(self, keys: list[BlockKey], block_ids: list[int]) -> None:
        for key, b in zip(keys, block_ids, strict=True):
            for layer, data in zip(self.layers, self.expected(key), strict=True):
                layer[b] = data

    def matches(self, key: BlockKey, block_id: int) -> bool:
        return all(
            torch.equal(layer[block_id], data)
            for layer, data in zip(self.layers, self.expected(key), strict=True)
        )

    def clear(self) -> None:
        """NaN everywhere: no block matches until something writes it."""
        for layer in self.layers:
            layer.fill_(float("nan"))
