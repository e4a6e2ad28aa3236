"""The worker's copies between its KV cache (G1) and the node's arena, as
vLLM's connector protocol lets them run: a load starts in `start_load_kv`
and the forward waits for each layer in `wait_for_layer_load`; a save starts
after the forward and finishes in a later step's `get_finished`.

A copier starts a batch and hands back a `Ticket`:
- `SyncCopier` copies before it returns (the CPU default: a lone request's
  first token came sooner than with a copy thread, and it frees blocks at
  once; docs/benchmarks.md, "Engine copies", has the figures);
- `ThreadCopier` copies on one thread, batches in order, so the protocol
  runs and is tested with real vLLM on CPU;
- `CudaCopier` (kvbm/connector/cuda.py) queues the copies on a side stream
  through a staging buffer on the GPU; its tickets are CUDA events.

Invariant for every copier: a save's reads of G1 are done before
`reads_done` returns, and a load's layer i is in place for the forward
once `wait_layer(i)` returns (for CUDA: for work queued after it on the
current stream).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from kvbm.connector.copy import ArenaBlocks, Ids
from kvbm.connector.engine_kv import EngineKV


class Ticket:
    """One batch's copy, started: how many layers are in place, and how it
    ended (an error is kept, never raised into the engine)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.layers = 0
        self.error: BaseException | None = None
        self._ended = False
        self._cond = threading.Condition()

    def progress(self, layers: int) -> None:
        with self._cond:
            self.layers = layers
            self._cond.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.error, self._ended = error, True
            self._cond.notify_all()

    def wait_layer(self, i: int) -> None:
        """Layer i is in place, or the copy has ended (check `error`)."""
        with self._cond:
            self._cond.wait_for(lambda: self._ended or self.layers > i)

    def done(self) -> bool:
        return self._ended

    def wait(self) -> BaseException | None:
        """The copy has ended: its error, if any."""
        with self._cond:
            self._cond.wait_for(lambda: self._ended)
        return self.error


class Copier(Protocol):
    def load(self, slots: Ids, block_ids: Ids) -> Ticket: ...
    def save(self, block_ids: Ids, slots: Ids) -> Ticket: ...
    def reads_done(self) -> None: ...
    def close(self) -> None: ...


def run_into(ticket: Ticket, steps: Iterator[int] | Callable[[], None]) -> Ticket:
    """Run a copy to its end on this thread, recording it in `ticket`."""
    try:
        if callable(steps):
            steps()
        else:
            for layers in steps:
                ticket.progress(layers)
        ticket.progress(ticket.num_layers)
        ticket.end()
    except Exception as e:  # reported through the ticket: vLLM recomputes
        ticket.end(e)
    return ticket


class SyncCopier:
    """Copies inline: every ticket is done when it is handed back."""

    def __init__(self, blocks: ArenaBlocks, kv: EngineKV) -> None:
        self.blocks, self.kv = blocks, kv

    def load(self, slots: Ids, block_ids: Ids) -> Ticket:
        ticket = Ticket(self.kv.geometry.num_layers)
        return run_into(ticket, lambda: self.blocks.scatter(self.kv, slots, block_ids))

    def save(self, block_ids: Ids, slots: Ids) -> Ticket:
        ticket = Ticket(self.kv.geometry.num_layers)
        return run_into(ticket, lambda: self.blocks.gather(self.kv, block_ids, slots))

    def reads_done(self) -> None:
        return

    def close(self) -> None:
        return


class ThreadCopier:
    """Copies on one thread, in the order they were started: a load hands
    the forward each layer as it lands (where the layout keeps layers apart)."""

    def __init__(self, blocks: ArenaBlocks, kv: EngineKV) -> None:
        self.blocks, self.kv = blocks, kv
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-copy")
        self._saves: list[Ticket] = []

    def load(self, slots: Ids, block_ids: Ids) -> Ticket:
        ticket = Ticket(self.kv.geometry.num_layers)
        ids, where = np.array(block_ids, dtype=np.int64), np.array(slots, dtype=np.int64)
        self._pool.submit(lambda: run_into(ticket, self.blocks.scatter_layers(self.kv, where, ids)))
        return ticket

    def save(self, block_ids: Ids, slots: Ids) -> Ticket:
        ticket = Ticket(self.kv.geometry.num_layers)
        ids, where = np.array(block_ids, dtype=np.int64), np.array(slots, dtype=np.int64)
        self._pool.submit(lambda: run_into(ticket, lambda: self.blocks.gather(self.kv, ids, where)))
        self._saves = [t for t in self._saves if not t.done()] + [ticket]
        return ticket

    def reads_done(self) -> None:
        """Every save started so far has read its blocks: vLLM may reuse them."""
        for ticket in self._saves:
            ticket.wait()
        self._saves = []

    def close(self) -> None:
        self._pool.shutdown(wait=True)
