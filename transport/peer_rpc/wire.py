"""What both ends of the peer RPC agree on: the calls every node serves
(a node may register more: server.py), the limits of a call, and what the
transport needs to know of the wire's versions."""

from __future__ import annotations

import re
from typing import Protocol

CALLS = ("hello", "auth", "pin", "unpin", "ok", "error")
MAX_KEYS_PER_PIN = 4096  # keys in one `pin` or `unpin` call
PRE_AUTH_MAX_FRAME = 64 << 10  # a hello is a nonce, a node id and a few fingerprints
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class WireVersions(Protocol):
    """The node's protocol version and its rule for another's (the numbers
    and the rule are the node's: kvbm/versions.py). The transport says `ours`
    in its signed hello and answer, and refuses a peer `refusal` names a
    reason for, sending that reason back; it never lets a version choose
    another handshake."""

    @property
    def ours(self) -> int: ...

    def refusal(self, theirs: object, them: str, us: str) -> str | None:
        """Why a side at version `ours` (`us`) will not talk to `them` saying
        `theirs` (None: said none), or None when they talk."""
        ...
