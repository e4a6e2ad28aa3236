"""What both ends of the peer RPC agree on: the calls every node serves
(a node may register more: server.py) and the limits of a call."""

from __future__ import annotations

import re

CALLS = ("hello", "auth", "pin", "unpin", "ok", "error")
MAX_KEYS_PER_PIN = 4096  # keys in one `pin` or `unpin` call
PRE_AUTH_MAX_FRAME = 64 << 10  # a hello is a nonce, a node id and a few fingerprints
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
