"""What crosses from the scheduler side to the workers each step: vLLM
pickles one `KvbmMetadata` per step into every worker process, and the two
sides share nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvbm.block_key import Groups


@dataclass
class Load:
    """Arena slots the node pinned, per rank (stage and tensor-parallel
    rank), and the vLLM block ids they are copied into, per KV cache group
    (-1 where a group has no block: its layers of that slot stay in the
    arena, behind the group's window).

    Invariants: `leases` and `slots` have one entry per rank; every rank's
    slots, and every group's ids, are `count` (the scheduler cuts them to
    the shortest rank's pin). A lease is settled exactly once, by the
    worker of its rank after the copy, or by the scheduler for a load it
    never sends.
    """

    leases: list[int]
    slots: list[list[int]]
    block_ids: list[list[int]]
    req_id: str = ""
    # The request waits for it (vLLM's asynchronous load, for a windowed
    # group): it is reported received in a later step, and a failure fails
    # the whole hit, which vLLM then recomputes from the first token. vLLM
    # rolls a failed block back to that block, behind which a window's
    # blocks were never loaded: only the whole hit can fail for such a group.
    waiting: bool = False

    @property
    def count(self) -> int:
        """The blocks (positions) it loads."""
        return len(self.block_ids[0]) if self.block_ids else 0


@dataclass
class Save:
    """Full blocks a request completes in this step: their sequence hashes,
    their vLLM block ids per KV cache group, and their groups of keys
    (kvbm/block_key.py's `Groups`, another meaning: a step's keys sharing
    a parent), one of each per block."""

    seq_hashes: list[int]
    block_ids: list[list[int]]
    req_id: str = ""
    groups: Groups | None = None


@dataclass
class KvbmMetadata(KVConnectorMetadata):
    """One step's orders for the workers.

    `failed` lists promised blocks the node did not pin: the workers report
    them to vLLM as load errors, so it recomputes from them; `failed_waits`
    the waiting requests (`Load.waiting`) whose loads the node did not pin,
    which the workers report failed whole. `released` lists requests the
    scheduler held after a failed load and lets save again (vLLM has
    recomputed the block that failed)."""

    arena: str = ""  # the node's arena the slots refer to (a restarted node has another)
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # promised blocks the node did not pin
    # vLLM may hand blocks that saves in flight still read to other requests
    # before this step's forward: a preemption, or blocks freed behind a window
    blocks_reused: bool = False
    released: list[str] = field(default_factory=list)  # requests that may save again
    failed_waits: list[str] = field(default_factory=list)  # waiting loads the node did not pin
