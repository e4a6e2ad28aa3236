"""The peer control RPC over asyncio TCP, in authenticated frames (frames.py).

A connection opens with a handshake: `hello` (signed: the client's fresh
nonce, its node id, layout fingerprints and protocol version; a peer without
a common fingerprint is refused, and one of a version the node does not talk
to gets a signed refusal naming both versions) is answered with the server's
nonce, node id, protocol version and proof of the secret; from then on
every frame is sealed under this connection's keys, and `auth` (sealed,
empty) is answered with the server's NIXL metadata, arena base and size.
Only the client loads the other's metadata: READs need the target's, never
the initiator's, so a server parses no peer's NIXL metadata and learns none
of its clients'. A peer is the node id of its hello (its pins and caps are
that node's). Then `pin` (the longest held prefix of some keys, pinned, with
arena offsets and checksums) and `unpin`, and whatever calls the node
registers with the server (a dispatch table: the transport does not know
what they mean).

The parts, one job each: wire.py (the calls and limits both ends share, and
`WireVersions`, what the node tells both ends of versions: kvbm/versions.py),
server.py (`PeerServer`: the handshake, pins and their caps, the registered
calls), client.py (`PeerClient`: one connection, calls multiplexed on it),
pull.py (`pull`: the pipelined pin -> READ -> verify algorithm).
"""

from transport.peer_rpc.client import PeerClient
from transport.peer_rpc.pull import pull, round_blocks
from transport.peer_rpc.server import (
    HELLO_TIMEOUT_S,
    IDLE_CLOSE_S,
    MAX_UNAUTHENTICATED_PER_ADDRESS,
    PeerCall,
    PeerServer,
)
from transport.peer_rpc.wire import CALLS, MAX_KEYS_PER_PIN

__all__ = [
    "CALLS",
    "HELLO_TIMEOUT_S",
    "IDLE_CLOSE_S",
    "MAX_KEYS_PER_PIN",
    "MAX_UNAUTHENTICATED_PER_ADDRESS",
    "PeerCall",
    "PeerClient",
    "PeerServer",
    "pull",
    "round_blocks",
]
