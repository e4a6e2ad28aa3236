"""Test support: a small geometry and a synthetic engine whose block bytes are a
pure function of the block's key, so every reload can be checked bit for bit."""

from __future__ import annotations

import errno
import os

import torch

from discovery.records import Tier
from kvbm.block_key import BlockKey, KeySpace, seq_hash
from kvbm.connector.direct import offload
from kvbm.connector.engine_kv import EngineKV, torch_dtype
from kvbm.layout import ModelGeometry

# 2 layers x 2 KV heads x 32 tokens x 2*16 dims x fp32 = 16 KiB blocks.
GEOMETRY = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=16, block_size=32)
SPACE = KeySpace("test", GEOMETRY.fingerprint)
DISK_KEY = bytes(range(32))  # the disk tier's key (kvbm/disk_seal.py) where a test builds one


def keys(start: int, n: int) -> list[BlockKey]:
    return SPACE.keys(list(range(start, start + n)))


class Engine:
    """Per-layer KV tensors like vLLM's CPU cache; block content derives from its key."""

    def __init__(self, num_blocks: int, geometry: ModelGeometry = GEOMETRY) -> None:
        self.geometry = geometry
        self.layers = [
            torch.zeros(num_blocks, *geometry.layer_shape, dtype=torch_dtype(geometry))
            for _ in range(geometry.num_layers)
        ]
        self.kv = EngineKV(geometry, self.layers)

    def content(self, key: BlockKey) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seq_hash(key) & (2**63 - 1))
        shape = self.geometry.layer_shape
        return [
            torch.randn(shape, generator=gen).to(torch_dtype(self.geometry)) for _ in self.layers
        ]

    def compute(self, ks: list[BlockKey], block_ids: list[int] | None = None) -> list[int]:
        ids = list(range(len(ks))) if block_ids is None else block_ids
        for k, b in zip(ks, ids, strict=True):
            for layer, data in zip(self.layers, self.content(k), strict=True):
                layer[b] = data
        return ids

    def fill(self, value: float) -> None:
        for layer in self.layers:
            layer.fill_(value)

    def holds(self, key: BlockKey, block_id: int) -> bool:
        return all(
            torch.equal(layer[block_id], data)
            for layer, data in zip(self.layers, self.content(key), strict=True)
        )


def store(mgr, ks: list[BlockKey]) -> int:
    """Compute `ks` in a fresh engine and offload them; returns blocks added."""
    eng = Engine(len(ks))
    return offload(mgr, eng.kv, eng.compute(ks), ks)


def fill_up(directory: str) -> None:
    """Fill the file system under `directory` to the last byte, as another
    program would (a file named `filler`). Unbuffered: a buffered file would
    try its last bytes again on close, and raise there."""
    try:
        f = open(os.path.join(directory, "filler"), "wb", buffering=0)  # noqa: SIM115
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return  # full already: not even room for a name
        raise
    with f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


def push_to_disk(mgr, ks) -> None:
    """Store `ks`, then enough other blocks that `ks` drain from G2 to G3."""
    store(mgr, ks)
    store(mgr, keys(10_000, mgr.host.num_slots))
    assert mgr.lookup(ks).tiers == (Tier.DISK,) * len(ks)


def slot_offset(mgr, key) -> int:
    """Where a block's data starts in the disk file."""
    return mgr.disk.data_offset(mgr.disk.table.get(key))


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
