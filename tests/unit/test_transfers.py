"""kvbm.connector.transfers: the worker's copiers. A thread copier hands a
load over layer by layer and a save's reads are done when `reads_done`
returns; errors end up in the ticket, never in the engine. (CUDA's copier
runs the same staged copies, tested in tests/integration/test_kv_layouts.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm.connector.copy import ArenaBlocks
from kvbm.connector.engine_kv import EngineKV, new_caches
from kvbm.connector.transfers import SyncCopier, ThreadCopier
from kvbm.layout import ModelGeometry

# 4 layers of 2 heads x 64 tokens x 2*64 fp32 = 64 KiB per layer: copies take a while
GEOMETRY = ModelGeometry(4, 2, 64, 64, "float32", "LBNHC")
BLOCKS = 48


def caches(seed: int | None) -> list[torch.Tensor]:
    layers = new_caches(GEOMETRY, BLOCKS)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for t in layers:
            t.copy_(torch.randn(t.shape, generator=gen))
    return layers


@pytest.fixture
def arena() -> ArenaBlocks:
    return ArenaBlocks(GEOMETRY, np.zeros(BLOCKS * GEOMETRY.slot_bytes, dtype=np.uint8), BLOCKS)


@pytest.mark.parametrize("kind", [SyncCopier, ThreadCopier])
def test_a_save_then_a_load_round_trip(arena, kind):
    src, dst = caches(seed=1), caches(seed=None)
    ids = list(range(BLOCKS))[::-1]
    saver, loader = kind(arena, EngineKV(GEOMETRY, src)), kind(arena, EngineKV(GEOMETRY, dst))
    try:
        save = saver.save(ids, list(range(BLOCKS)))
        saver.reads_done()
        assert save.wait() is None and save.done()
        load = loader.load(list(range(BLOCKS)), ids)
        for i in range(GEOMETRY.num_layers):
            load.wait_layer(i)
            assert load.layers > i
            assert torch.equal(dst[i], src[i]), f"layer {i} not in place when handed over"
        assert load.wait() is None
    finally:
        saver.close()
        loader.close()


def test_a_thread_load_hands_over_before_it_ends(arena):
    """The forward may start on layer 0 while the last layers still copy."""
    src = caches(seed=2)
    SyncCopier(arena, EngineKV(GEOMETRY, src)).save(list(range(BLOCKS)), list(range(BLOCKS)))
    dst = caches(seed=None)
    copier = ThreadCopier(arena, EngineKV(GEOMETRY, dst))
    try:
        early = 0
        for _ in range(20):
            ticket = copier.load(list(range(BLOCKS)), list(range(BLOCKS)))
            ticket.wait_layer(0)
            early += ticket.layers < GEOMETRY.num_layers
            ticket.wait()
        assert early > 0  # 20 tries: the hand-over came before the end at least once
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        copier.close()


@pytest.mark.parametrize("kind", [SyncCopier, ThreadCopier])
def test_a_bad_batch_ends_its_ticket_with_the_error(arena, kind):
    copier = kind(arena, EngineKV(GEOMETRY, caches(seed=None)))
    try:
        load = copier.load([BLOCKS + 5], [0])
        load.wait_layer(GEOMETRY.num_layers - 1)  # returns: the copy has ended
        assert isinstance(load.wait(), ValueError)
        save = copier.save([0, 1], [0])
        assert isinstance(save.wait(), ValueError)
        ok = copier.save([0], [0])  # the copier goes on
        assert ok.wait() is None
    finally:
        copier.close()


def test_reads_done_waits_for_every_save_started(arena):
    copier = ThreadCopier(arena, EngineKV(GEOMETRY, caches(seed=3)))
    try:
        tickets = [copier.save([i], [i]) for i in range(BLOCKS)]
        copier.reads_done()
        assert all(t.done() for t in tickets)
    finally:
        copier.close()
