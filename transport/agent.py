"""What the peer RPC needs of a NIXL agent, declared here so that it works
with either kind: `NixlAgent` in this process (tests, tools) or
`ConfinedAgent`, the node's, in a process of its own. Neither NIXL nor a
child process is imported by importing this."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Peer:
    """A remote agent loaded into ours: its name (from its metadata) and the
    generation of our agent that loaded it. A confined agent that restarts
    starts a new generation with no peers; older handles are then unknown."""

    name: str
    generation: int = 0

    def __str__(self) -> str:
        return self.name


class Agent(Protocol):
    name: str

    @property
    def metadata(self) -> bytes:
        """What a peer needs to read from us (sent sealed, after the handshake)."""
        ...

    @property
    def arena(self) -> tuple[int, int]:
        """(base address, size) of the registered arena, in the address space
        peers' READs reach (what a server tells its peers)."""
        ...

    @property
    def local_arena(self) -> tuple[int, int]:
        """(base address, size) of the arena in the address space our own
        READs land in (the `local` rows of `read`). A node's are two
        processes: peers reach a read-only mapping, its pulls write another."""
        ...

    drives_itself: bool  # False: whoever serves peers must call `progress()` often

    @property
    def generation(self) -> int:
        """Changes when the agent restarts (new metadata: peers must reconnect)."""
        ...

    def progress(self) -> None: ...

    def add_peer(self, metadata: bytes) -> Peer: ...

    def remove_peer(self, peer: Peer) -> None: ...

    def knows(self, peer: Peer) -> bool:
        """Whether `peer` is loaded in the agent as it is now."""
        ...

    def read(self, peer: Peer, local: np.ndarray, remote: np.ndarray, timeout: float) -> bool: ...

    def read_chunks(
        self,
        peer: Peer,
        chunks: Sequence[tuple[np.ndarray, np.ndarray]],
        timeout: float,
        landed: Callable[[int], bool],
    ) -> int:
        """READ the chunks in order, calling `landed(i)` as each one's bytes
        are all here (False stops); how many landed. No READ is still
        writing when it returns."""
        ...

    def close(self) -> None: ...
