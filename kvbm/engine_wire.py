"""The engine wire: the socket between engines and their node, both ends.

The node's engine server and the engine-side attachment both import this
module (and nothing of each other). Frames are the plain frames of
transport/frames.py (length, msgpack; the same framing and bounds as the
peer RPC's, no MAC) over a unix socket.

Calls (engine -> node), each answered by `ok` or `error`:
  hello    {geometry, engine, hash, protocol}
                                 -> {arena, arena_dir, arena_bytes, view,
                                     view_bytes, slot_bytes, num_slots,
                                     step_blocks, namespace, fingerprint,
                                     node_id, hash, protocol}: `protocol` is
                                     each side's version (kvbm/versions.py:
                                     either side refuses one it does not
                                     talk to, naming both)
  lookup   {keys, remote, groups} -> {local, remote_host, remote_disk}: leading
                                     blocks held here, then how many more peers
                                     hold after them, by tier
  load     {keys, remote, groups} -> {lease, slots, sources}: the longest prefix
                                     staged into G2 (local disk, peer pulls) and
                                     pinned until `release`
  load_many {requests, remote, groups} -> {loads: [what `load` answers, per
                                     request]}: all granted, or none
  reserve  {keys, groups}        -> {lease, slots, positions}: host slots the
                                     engine fills, then `commit`s
  commit   {lease, ok}           -> {added}
  release  {lease}               -> {}
  stats    {}                    -> the node's state (for `kvbm status`)
  refused  {model, reason, kind} -> {}: a connector turned itself off for
                                     this engine's model (`Refusal`); no
                                     hello first, the engine has no geometry
`stats` and `refused` come without a hello, so without a version: their
bodies are the same in every version that talks.

Keys are `BlockKey.encode()` bytes. `groups` (optional; per request in
`load_many`) names each key's group anchor, `Groups.to_wire()`
(kvbm/block_key.py): exactly the anchors of the call's own keys. A
sharded index places keys by them; keys sent without are their own
anchors, and a sharded fleet finds them only where they were stored so.
Slots index the node's host arena, which the engine maps by name in
`arena_dir` (shared memory: the engine must see the same directory) and
copies whole blocks through; its key view
(kvbm/key_view.py) beside it answers lookups without a call. The socket's
file permissions guard it (and the peer's credentials, checked by the
node): frames carry no MAC, which a key every engine knows would not make
safer. A lease dies with its connection: an
engine that goes away never leaves a pin or a half-written slot behind.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from kvbm.errors import NodeError
from kvbm.layout import ModelGeometry
from transport.errors import ProtocolError
from transport.frames import Message, PlainCodec

CALLS = (
    "hello",
    "lookup",
    "load",
    "reserve",
    "commit",
    "release",
    "stats",
    "ok",
    "error",
    "load_many",
    "refused",
)
CREDS = struct.Struct("3i")  # SO_PEERCRED's struct ucred: pid, uid, gid
MAX_FRAME = 4 << 20
MAX_KEYS = 8192  # in one call (a frame of them stays well under MAX_FRAME)
MAX_BATCH = 1024  # requests in one `load_many`
# What a connector refuses an engine for: its KV cache's shape (geometry_of),
# or a model whose identity cannot be named. A short fixed set: the node's
# metrics label refusals by it, never by their free text.
REFUSAL_KINDS = ("kv_cache", "model_identity")
MAX_MODEL_CHARS = 256  # a refusal's model name
MAX_REASON_CHARS = 512  # a refusal's reason


def codec() -> PlainCodec:
    return PlainCodec(CALLS, MAX_FRAME)


def geometry_to_wire(g: ModelGeometry) -> dict[str, Any]:
    return dataclasses.asdict(g)


def geometry_from_wire(d: object) -> ModelGeometry:
    if not isinstance(d, dict):
        raise ProtocolError("geometry must be a map")
    names = {f.name for f in dataclasses.fields(ModelGeometry)}
    if set(d) - names:
        raise ProtocolError(f"unknown geometry fields {sorted(set(d) - names)}")
    try:
        return ModelGeometry(**d)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad geometry: {e}") from None


@dataclass(frozen=True)
class Available:
    """A `lookup`'s answer: leading blocks of a request the node holds
    (`local`), then how many more its peers hold after them, by the tier the
    index shows them in."""

    local: int
    remote_host: int = 0
    remote_disk: int = 0

    @property
    def total(self) -> int:
        return self.local + self.remote_host + self.remote_disk

    def to_wire(self) -> dict[str, int]:
        # not dataclasses.asdict: it deep-copies, ~10 us on every lookup's reply
        return {
            "local": self.local,
            "remote_host": self.remote_host,
            "remote_disk": self.remote_disk,
        }

    @classmethod
    def from_wire(cls, d: dict) -> Available:
        return cls(int(d["local"]), int(d["remote_host"]), int(d["remote_disk"]))


@dataclass(frozen=True)
class Refusal:
    """Why a connector turned itself off for an engine (the engine runs
    without kvbm): the body of a `refused` call, which the node keeps for
    `kvbm status`. Both fields are one line of printable text, bounded, so
    that whatever an engine sends can be shown to an operator as it is."""

    model: str
    reason: str
    kind: str  # one of REFUSAL_KINDS

    @classmethod
    def clipped(cls, model: str, reason: str, kind: str) -> Refusal:
        """The engine's side: an exception's message may hold newlines or run
        long, so control characters become spaces and long text is cut, and
        the node never refuses a refusal for its text."""
        if kind not in REFUSAL_KINDS:
            raise ValueError(f"a refusal's kind is one of {', '.join(REFUSAL_KINDS)}")
        return cls(_one_line(model, MAX_MODEL_CHARS), _one_line(reason, MAX_REASON_CHARS), kind)

    def to_wire(self) -> dict[str, str]:
        return {"model": self.model, "reason": self.reason, "kind": self.kind}

    @classmethod
    def from_wire(cls, body: object) -> Refusal:
        """The node's side: ValueError for a body that is not a refusal as
        `clipped` makes them (another field, another type, empty, too long,
        text that is not printable, a kind not in REFUSAL_KINDS)."""
        if not isinstance(body, dict) or set(body) != {"model", "reason", "kind"}:
            raise ValueError("a refusal is a map of model, reason and kind")
        model, reason, kind = body["model"], body["reason"], body["kind"]
        if kind not in REFUSAL_KINDS:
            raise ValueError(f"a refusal's kind is one of {', '.join(REFUSAL_KINDS)}")
        _check_text("model", model, MAX_MODEL_CHARS)
        _check_text("reason", reason, MAX_REASON_CHARS)
        return cls(model, reason, kind)


def _one_line(text: str, cap: int) -> str:
    flat = "".join(c if c.isprintable() else " " for c in text).strip() or "?"
    return flat if len(flat) <= cap else flat[: cap - 3] + "..."


def _check_text(name: str, value: object, cap: int) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"a refusal's {name} must be text")
    if len(value) > cap:
        raise ValueError(f"a refusal's {name} is over {cap} characters")
    if not value.isprintable():
        raise ValueError(f"a refusal's {name} must be printable text on one line")


def node_listening(path: str) -> bool:
    """Whether a node answers on the socket at `path` (a connect, nothing sent)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


class EngineLink:
    """An engine's blocking connection to its node (the engine's hot path is
    synchronous). One caller at a time; not thread-safe.

    The process at the other end must run as the node's user (`node_uid`;
    unset: the engine's own user or root), checked with SO_PEERCRED at each
    connect: should another user have taken the socket's path, the engine
    would otherwise store its KV into their arena and load their bytes."""

    def __init__(self, path: str, timeout: float = 30.0, node_uid: int | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.trusted = {0, os.getuid()} if node_uid is None else {node_uid}
        self.node_uid: int | None = None  # the node's, once connected
        self._codec = codec()
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDS.size)
        except OSError as e:
            sock.close()
            raise NodeError(f"no node at {self.path}: {e}") from e
        pid, uid, _ = CREDS.unpack(raw)
        if uid not in self.trusted:
            sock.close()
            raise NodeError(
                f"the process serving {self.path} (pid {pid}) runs as uid {uid}, not as the "
                f"node's user {sorted(self.trusted)}: refusing it (set node_user if the node "
                "runs as another user)"
            )
        self.node_uid = uid
        self._sock = sock

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def call(self, name: str, body: dict[str, Any], timeout: float | None = None) -> dict:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        msg_id = next(self._ids)
        try:
            self._sock.settimeout(timeout or self.timeout)
            self._sock.sendall(self._codec.encode(Message(name, msg_id, body)))
            reply = self._codec.recv(self._sock)
        except (OSError, ProtocolError) as e:
            self.close()  # a half-read stream cannot be reused
            raise NodeError(f"node connection lost during {name}: {e}") from e
        if reply.id != msg_id:
            self.close()
            raise NodeError(f"reply to another call ({reply.id}, expected {msg_id})")
        if reply.call != "ok":
            raise NodeError(str(reply.body.get("error", "refused")))
        return reply.body

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
