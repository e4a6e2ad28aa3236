"""The versions of kvbm's wire and files, and the one rule for what two
sides of different versions do together.

Why a rule at all: the node ships in the DaemonSet's image and the connector
in the engine's, so a fleet in a rolling upgrade runs two releases at once:
engines of one on nodes of the other, and nodes of both pulling from each
other. Each side must know, at its first message, whether it understands
the other, and say so when it does not, rather than misread a call.

`PROTOCOL` names what the engine socket's calls (kvbm/engine_wire.py), the
peer RPC's calls (transport/peer_rpc/) and a node's index record
(discovery/records.py) mean. Every hello carries it (the engine's, the
node's answer, the peer's signed hello and the signed answer) and so does
the node record; a change to any call's body, or to what a record says,
bumps it. Version 1 is the wire of main before versions were said (from
0b8f84c, the keyed block hash, to 4b137c8): a hello or a record without a
version is version 1.

The rule: two sides talk when their versions are at most one apart (this
release and the previous one, whichever is newer). The newer side knows the
older wire and speaks it on that connection (its version is the lower of
the two); the older side takes the newer's word for it. Any other pair is
refused at the hello with an error that names both versions (`refusal`):
an engine then runs without the node, recomputing, as it does when no node
answers; a node does not pull from a peer it refused, and loads that would
have come from there are recomputed. Never wrong KV, never an engine error.

From 1 to 2 only the version fields were added, which version 1 ignores (it
reads the fields it knows, by name), so 1 and 2 need nothing else.

What a version never does: choose a weaker protocol. Every version this
node accepts speaks the one handshake (a signed hello, the server's proof,
sealed frames after it); the version is a field inside the signed hello
and its signed answer, which no one without the secret can write or
change, and no version selects less. There is no fallback: a pair refused
stays refused until one side is upgraded.

Versions outside this rule, each with its own reason:
- block identity (`HASH_VERSION`, kvbm/hashing.py) must be equal: keys of
  two hash functions name different blocks, so engines and nodes of two
  hash versions are refused at the hello, naming both;
- the disk tier's file (`DISK_FILE`, `DISK_SLOT` below) is read back by the
  node that restarts on it. A node recovers a file of its own layout (which
  the previous release wrote too while the layout is unchanged, as from
  protocol 1 to 2) and starts any other empty, logging both versions: a
  cache that lost its contents, never a node that will not start;
- frames (transport/frames.py) and the index's values (discovery/) keep
  their formats' own version bytes; a change there also bumps PROTOCOL.

When the wire changes next: bump PROTOCOL, keep the previous bodies for a
connection whose version (`Compatibility.check`) is the previous one, and
move tests/harness/old_tree.py's PREVIOUS to main's last commit of the
previous protocol. docs/operations.md ("Which versions work together")
says the rule for operators.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL = 2
UNVERSIONED = 1  # what a hello or a record that says no version speaks
# How far apart two versions may be and still talk (the newer side adapts).
WINDOW = 1

# The disk tier's file (kvbm/disk_pool.py): the superblock's layout, 3 since
# its sum is keyed, and a slot header's, 5 since keyed sums (4: 16-byte
# keyed block hashes). Older slot headers are counted and dropped at
# recovery: not sealed by the node's key, nor named by keys engines ask for.
DISK_FILE = 3
DISK_SLOT = 5
DISK_SLOT_DROPPED = (2, 3, 4)


class VersionRefused(ValueError):
    """The other side's version is one this side does not talk to; the
    message names both."""


@dataclass(frozen=True)
class Compatibility:
    """One side's version and the rule applied to another's. A node and an
    engine use `THIS`; tests build other versions to act a release that is
    not this one."""

    ours: int = PROTOCOL
    window: int = WINDOW

    def refusal(self, theirs: object, them: str, us: str) -> str | None:
        """Why `us` (a side at version `ours`) will not talk to `them` saying
        version `theirs` (None: said none, so version 1), or None when they
        talk. The reason names both sides and both versions."""
        said = UNVERSIONED if theirs is None else theirs
        if type(said) is not int:  # not a bool, not a float: a version a release sends
            shown = f"{said!r:.40}"
            return f"{them} sends {shown} for its kvbm protocol version; {us} speaks {self.ours}"
        if abs(said - self.ours) <= self.window:
            return None
        older = us if self.ours < said else them
        return (
            f"{them} speaks kvbm protocol {said}, {us} {self.ours}: versions more than "
            f"{self.window} apart do not talk; upgrade {older}"
        )

    def check(self, theirs: object, them: str, us: str) -> int:
        """The version `us` and `them` speak together (the lower of the
        two); VersionRefused, with `refusal`'s reason, when they do not talk."""
        why = self.refusal(theirs, them, us)
        if why is not None:
            raise VersionRefused(why)
        assert theirs is None or type(theirs) is int
        return min(self.ours, UNVERSIONED if theirs is None else theirs)


THIS = Compatibility()
