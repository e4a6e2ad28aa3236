"""The CUDA-only lines of the connector: the arena registered as pinned
host memory, a side stream, events. Everything they call (the staging
copies, the layouts) is device-agnostic torch, run and tested on CPU
(tests/integration/test_kv_layouts.py, tests/unit/test_transfers.py); this
module itself has not run on a GPU here (the README's "What ran where" says
what has).

APIs used, as documented by PyTorch: torch.cuda.cudart().cudaHostRegister /
cudaHostUnregister (flag 1: cudaHostRegisterPortable), torch.cuda.Stream,
torch.cuda.stream (context), Stream.wait_stream, torch.cuda.current_stream,
Stream.wait_event, torch.cuda.Event(record, query, synchronize),
Tensor.copy_(non_blocking=True) between pinned host memory and the device.
"""

from __future__ import annotations

import torch

from kvbm.connector.copy import ArenaBlocks, StagedCopies
from kvbm.connector.engine_kv import EngineKV
from kvbm.connector.transfers import Ids, Ticket

STAGING_BLOCKS = 32  # whole slots of staging on the GPU; larger batches go in chunks


class CudaTicket(Ticket):
    """A ticket whose progress is CUDA events: `events[i]` marks layer i in
    place, `end` everything the copy queued (recorded even when it failed
    halfway: what it did queue still runs). Waits for the forward are made by
    the compute stream, not the host."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.events: list[torch.cuda.Event] = []
        self.end_event: torch.cuda.Event | None = None

    def record(self, layers: int, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self.events += [event] * (layers - len(self.events))

    def record_end(self, stream: torch.cuda.Stream) -> None:
        self.end_event = torch.cuda.Event()
        self.end_event.record(stream)

    def wait_layer(self, i: int) -> None:
        ok = self.error is None and i < len(self.events)
        event = self.events[i] if ok else self.end_event
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def done(self) -> bool:
        return self.end_event is None or self.end_event.query()

    def wait(self) -> BaseException | None:
        if self.end_event is not None:
            try:
                self.end_event.synchronize()
            except RuntimeError as e:  # an asynchronous CUDA error surfaces here
                self.error = self.error or e
        return self.error


class CudaCopier:
    """Copies between a GPU cache and the pinned arena on one side stream,
    in order, through a staging buffer of STAGING_BLOCKS slots on the GPU."""

    def __init__(self, blocks: ArenaBlocks, kv: EngineKV) -> None:
        self.blocks, self.kv = blocks, kv
        self.stream = torch.cuda.Stream(device=kv.device)
        self.staged = StagedCopies(blocks, kv, STAGING_BLOCKS)  # GPU memory beside vLLM's
        self._reads: torch.cuda.Event | None = None
        # Pinned once per engine (seconds for a large arena: done when the
        # worker registers its caches, not in a step).
        self._pinned = blocks.bytes.data_ptr()
        err = int(torch.cuda.cudart().cudaHostRegister(self._pinned, blocks.bytes.numel(), 1))
        if err:
            raise RuntimeError(f"cudaHostRegister of the arena failed: cudaError {err}")

    def load(self, slots: Ids, block_ids: Ids) -> CudaTicket:
        ticket = CudaTicket(self.kv.geometry.num_layers)
        # after the work queued before: a block vLLM just gave this request may
        # still be read by an earlier step's kernels for the request it freed
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            try:
                for layers in self.staged.scatter_layers(slots, block_ids):
                    ticket.record(layers, self.stream)
            except Exception as e:  # reported through the ticket: vLLM recomputes
                ticket.error = e
            finally:
                ticket.record_end(self.stream)
        return ticket

    def save(self, block_ids: Ids, slots: Ids) -> CudaTicket:
        ticket = CudaTicket(self.kv.geometry.num_layers)
        self.stream.wait_stream(torch.cuda.current_stream())  # the forward wrote them
        with torch.cuda.stream(self.stream):
            try:
                self.staged.gather(block_ids, slots, after_reads=self._mark_reads)
            except Exception as e:  # the reservation is given back when it ends
                ticket.error = e
            finally:
                ticket.record_end(self.stream)
        return ticket

    def _mark_reads(self) -> None:
        self._reads = torch.cuda.Event()
        self._reads.record(self.stream)

    def reads_done(self) -> None:
        """Work queued after this on the compute stream (a forward writing
        blocks vLLM reused) runs after every save's gather from G1."""
        if self._reads is not None:
            torch.cuda.current_stream().wait_event(self._reads)

    def close(self) -> None:
        self.stream.synchronize()
        torch.cuda.cudart().cudaHostUnregister(self._pinned)
