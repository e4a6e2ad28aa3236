"""The node's side of the engine wire (kvbm/engine_wire.py): the unix socket
engines attach to, one connection per engine process, calls dispatched by
name, and the leases (pins of a load, slots of a store) engines hold."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from discovery.tier import Tier
from kvbm import engine_wire
from kvbm.block_key import BlockKey, Groups, check_keys
from kvbm.config import KvbmConfig
from kvbm.engine_wire import MAX_BATCH, MAX_KEYS
from kvbm.errors import KvbmError
from kvbm.hashing import HASH_VERSION, HashKey
from kvbm.layout import ModelGeometry
from kvbm.manager import BlockManager
from kvbm.node.onboarding import Onboarding
from kvbm.node.refusals import Refusals
from kvbm.owned_dir import own_directory
from kvbm.plans import LoadPlan, StorePlan
from kvbm.versions import THIS, UNVERSIONED, Compatibility, VersionRefused
from transport.errors import ProtocolError
from transport.frames import Message

log = logging.getLogger("kvbm.node")


class ServingView(Protocol):
    """What the engine server serves from, once the first engine's hello has
    built it (see `Serving` in daemon.py)."""

    mgr: BlockManager
    onboarding: Onboarding


@dataclass
class Lease:
    """Pins (a load) or reserved slots (a store) an engine holds. Any engine
    connection of the node may settle it by id (vLLM's scheduler takes a load
    and its worker, another process, releases it after copying); if nobody
    does, it is settled when the connection that took it ends."""

    plan: LoadPlan | StorePlan
    owner: int  # the engine connection that took it


class EngineServer:
    """Invariant: every lease is settled exactly once: by an engine's
    `release` or `commit`, or when the connection that took it ends."""

    def __init__(
        self,
        cfg: KvbmConfig,
        node_id: str,
        serve: Callable[[ModelGeometry], Awaitable[ServingView]],
        stats: Callable[[], dict],
        hash_key: HashKey,
        versions: Compatibility = THIS,
    ) -> None:
        """`versions`: this node's protocol version and its rule for an
        engine's (kvbm/versions.py)."""
        self.path = cfg.socket
        self.gid = cfg.shared_gid
        self.namespace = cfg.namespace  # an engine's keys must be of it
        self.node_id = node_id
        self.serve = serve  # the tiers for an engine's geometry (built by the first hello)
        self.stats = stats
        self.hash_key = hash_key  # engines hash block keys under it (never the secret)
        self.versions = versions
        self._refused_versions: set[str] = set()  # engines' versions refused, logged once each
        # hellos since the start by the version each engine said (none: 1),
        # so that `kvbm status` shows which engines are of another release
        self.hellos: Counter[int] = Counter()
        self.leases: dict[int, Lease] = {}
        self.refusals = Refusals()  # engines whose connectors turned themselves off
        self._tiers: ServingView | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._conn_ids = itertools.count(1)
        self._calls: dict[str, Callable[[dict, int], Awaitable[dict]]] = {
            "hello": self._hello,
            "stats": self._stats,
            "refused": self._refused,
            "lookup": self._lookup,
            "load": self._load,
            "load_many": self._load_many,
            "reserve": self._reserve,
            "commit": self._commit,
            "release": self._release,
        }

    async def start(self) -> None:
        """The socket is bound under a temporary name in the node's own
        directory (kvbm/owned_dir.py), born with its final mode (0600, or 0660
        to `shared_group`), then moved into place: engines never see it half
        set up, and no path another user could swap is chmod-ed or followed."""
        directory = os.path.dirname(os.path.abspath(self.path))
        own_directory(directory, self.gid)
        _claim_socket_path(self.path)
        temporary = os.path.join(directory, f".{secrets.token_hex(4)}.sock")
        umask = os.umask(0o177 if self.gid is None else 0o117)
        try:
            self._server = await asyncio.start_unix_server(self._serve, temporary)
        finally:
            os.umask(umask)
        try:
            if self.gid is not None:
                os.chown(temporary, -1, self.gid, follow_symlinks=False)
            os.rename(temporary, self.path)
        except BaseException:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    async def close(self) -> None:
        """Stop accepting, end engine connections (settling their leases)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        codec = engine_wire.codec()
        conn = next(self._conn_ids)
        try:
            stranger = self._stranger(writer)
            if stranger:
                log.warning("refusing an engine connection reason=%s", stranger)
                return
            while True:
                msg = await codec.read(reader)
                try:
                    call = self._calls.get(msg.call)
                    if call is None:
                        raise ProtocolError(f"{msg.call!r} is not a request")
                    reply = Message("ok", msg.id, await call(msg.body, conn))
                except (KvbmError, ValueError, KeyError, TypeError, ProtocolError) as e:
                    reply = Message("error", msg.id, {"error": f"{msg.call}: {e}"})
                except Exception as e:  # a fault below (I/O, a bug): this call fails, not the node
                    log.exception("engine call failed call=%s", msg.call)
                    reply = Message("error", msg.id, {"error": f"{msg.call}: {e!r}"})
                writer.write(codec.encode(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except ProtocolError as e:
            log.warning("closing engine connection reason=%s", e)
        finally:
            for lease_id in [i for i, lease in self.leases.items() if lease.owner == conn]:
                self._settle(self.leases.pop(lease_id), ok=False)
            writer.close()
            self._connections.discard(task)

    def _stranger(self, writer: asyncio.StreamWriter) -> str | None:
        """Why the process at the other end may not use this node, or None. The
        socket's mode is the first guard; its peer's credentials (SO_PEERCRED)
        the second, should a mount or a chmod have opened the socket wider: the
        node's own user, root, or a member of `shared_group`."""
        sock = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, engine_wire.CREDS.size)
        pid, uid, gid = engine_wire.CREDS.unpack(raw)
        if uid in (0, os.getuid()):
            return None
        if self.gid is not None and (gid == self.gid or self.gid in _groups_of(uid, gid)):
            return None
        return f"pid {pid} runs as uid {uid}: neither this node's user nor in its shared_group"

    # -- calls ---------------------------------------------------------------
    async def _hello(self, body: dict, conn: int) -> dict:
        said = self._check_version(body.get("protocol"), body.get("engine"))
        self._check_hashing(body.get("hash"))
        geometry = engine_wire.geometry_from_wire(body.get("geometry"))
        self._tiers = await self.serve(geometry)
        self.hellos[said] += 1
        mgr = self._tiers.mgr
        arena = mgr.host.arena
        return {
            "arena": arena.name,
            "arena_dir": arena.directory,
            "arena_bytes": arena.size,
            "view": mgr.view.name if mgr.view else "",
            "view_bytes": mgr.view.size if mgr.view else 0,
            "slot_bytes": geometry.slot_bytes,
            "num_slots": mgr.host.num_slots,
            "step_blocks": mgr.max_load_blocks,
            "namespace": self.namespace,
            "fingerprint": geometry.fingerprint,
            "node_id": self.node_id,
            "protocol": self.versions.ours,
            "hash": {
                "version": HASH_VERSION,
                "key": self.hash_key.key,
                "key_id": self.hash_key.key_id,
            },
        }

    def _check_version(self, said: object, engine: object) -> int:
        """The engine's protocol version (1 where it says none); an engine of
        a version this node does not talk to is refused (it runs without the
        node, recomputing), naming both versions. The engine's connector
        retries every few seconds, so each version is logged once."""
        why = self.versions.refusal(said, "the engine", f"node {self.node_id}")
        if why is None:
            assert said is None or type(said) is int
            return UNVERSIONED if said is None else said
        if repr(said) not in self._refused_versions and len(self._refused_versions) < 16:
            self._refused_versions.add(repr(said))
            log.warning("refusing an engine engine=%.64r reason=%s", engine, why)
        raise VersionRefused(why)

    def _check_hashing(self, said: object) -> None:
        """An engine that hashes block keys otherwise than this node would
        publish keys no peer ever asks for, and find none: refuse it, saying
        why. An engine says its hash version, and the id of the key it holds
        when it attaches again (a node restarted on another secret)."""
        if not isinstance(said, dict) or said.get("version") != HASH_VERSION:
            # an engine of hash version 1 (before keyed hashes) says none
            version = said.get("version") if isinstance(said, dict) else "1 (it says none)"
            raise ValueError(
                f"the engine hashes block keys with version {version}, this node with "
                f"{HASH_VERSION}: run the same kvbm version in the engine and the node"
            )
        key_id = said.get("key_id")
        if key_id is not None and type(key_id) is not int:
            raise ValueError("the engine's hashing key id is not an int")
        if key_id is not None and key_id != self.hash_key.key_id:
            raise ValueError(
                f"the engine hashes under key id {key_id:#x}, this node under "
                f"{self.hash_key.key_id:#x} (another fleet secret): restart the engine"
            )

    async def _stats(self, body: dict, conn: int) -> dict:
        return self.stats()

    async def _refused(self, body: dict, conn: int) -> dict:
        """An engine's connector turned itself off for the engine's model:
        kept for `kvbm status`. Like `stats`, it needs no hello (an engine
        refused has no geometry to bring): the socket's mode and its peer's
        credentials (`_stranger`) are its guard, as for every call. Logged
        when new, not at every repeat, so a chatty engine cannot flood the
        node's log with one refusal."""
        refusal = engine_wire.Refusal.from_wire(body)
        if self.refusals.add(refusal):
            log.warning(
                "an engine runs without kvbm model=%r kind=%s reason=%r",
                refusal.model,
                refusal.kind,
                refusal.reason,
            )
        return {}

    async def _lookup(self, body: dict, conn: int) -> dict:
        tiers = self._served()
        keys = self._keys(body)
        found = await tiers.onboarding.lookup(keys, _remote(body), _anchors(body, keys))
        return found.to_wire()

    async def _load(self, body: dict, conn: int) -> dict:
        tiers = self._served()
        keys = self._keys(body)
        loaded = await tiers.onboarding.load(keys, _remote(body), _anchors(body, keys))
        plan = loaded.plan
        lease = self._lease(plan, conn)
        sources = {s.value: n for s, n in loaded.sources.items() if n}
        return {"lease": lease, "slots": plan.slots, "sources": sources, "more": plan.more}

    async def _load_many(self, body: dict, conn: int) -> dict:
        """One `load` per request, in order (vLLM's scheduler pins a step's
        hits in one round trip); if one fails, none is granted."""
        requests = body.get("requests")
        if not isinstance(requests, list) or len(requests) > MAX_BATCH:
            raise ValueError(f"requests must be a list of at most {MAX_BATCH} key lists")
        if sum(len(r) if isinstance(r, list) else 0 for r in requests) > MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} keys in all")
        groups = body.get("groups", [None] * len(requests))
        if not isinstance(groups, list) or len(groups) != len(requests):
            raise ValueError("groups must name each request's, or be left out")
        granted: list[dict] = []
        try:
            remote = body.get("remote", [])
            for keys, g in zip(requests, groups, strict=True):
                one = {"keys": keys, "remote": remote, "groups": g}
                granted.append(await self._load(one, conn))
        except BaseException:
            for reply in granted:
                self._settle(self.leases.pop(reply["lease"]), ok=False)
            raise
        return {"loads": granted}

    async def _reserve(self, body: dict, conn: int) -> dict:
        keys = self._keys(body)
        anchors = _anchors(body, keys)
        store = await asyncio.to_thread(self._served().mgr.prepare_store, keys, anchors)
        lease = self._lease(store, conn)
        return {"lease": lease, "slots": store.slots, "positions": store.positions}

    # Settling is bookkeeping under the manager's lock, no I/O: made on the loop.
    async def _commit(self, body: dict, conn: int) -> dict:
        ok = body.get("ok", False)
        if type(ok) is not bool:
            raise ValueError("ok must be true or false")
        held = self._take_lease(body, load=False)
        return {"added": self._settle(held, ok)}

    async def _release(self, body: dict, conn: int) -> dict:
        self._settle(self._take_lease(body, load=True), False)
        return {"added": 0}

    # -- helpers -------------------------------------------------------------
    def _served(self) -> ServingView:
        if self._tiers is None:
            raise ProtocolError("say hello first")
        return self._tiers

    def _keys(self, body: dict) -> list[BlockKey]:
        geometry = self._served().mgr.geometry
        return check_keys(body["keys"], self.namespace, geometry.fingerprint, MAX_KEYS)

    def _take_lease(self, body: dict, load: bool) -> Lease:
        self._served()
        lease_id = body.get("lease")
        if type(lease_id) is not int:  # not a float, not a bool: an id handed out
            raise ValueError("lease must be the integer id a load or reserve returned")
        held = self.leases.get(lease_id)
        if held is None:
            raise ValueError(f"no lease {lease_id} (settled already, or never granted)")
        if isinstance(held.plan, LoadPlan) != load:
            raise ValueError("a load lease is released, a store lease committed")
        return self.leases.pop(lease_id)

    def _lease(self, plan: LoadPlan | StorePlan, conn: int) -> int:
        """A new lease's id: unguessable, so an engine settles only the leases
        whose ids it was given (vLLM's worker gets its scheduler's in metadata)."""
        lease_id = secrets.randbits(63)
        while lease_id in self.leases:
            lease_id = secrets.randbits(63)
        self.leases[lease_id] = Lease(plan, conn)
        return lease_id

    def _settle(self, lease: Lease, ok: bool) -> int:
        """Release a load's pins, or commit (ok) or abort a store. Returns blocks added."""
        assert self._tiers is not None
        mgr = self._tiers.mgr
        if isinstance(lease.plan, LoadPlan):
            mgr.complete_load(lease.plan)
            return 0
        return mgr.complete_store(lease.plan, success=ok)


def _groups_of(uid: int, gid: int) -> list[int]:
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return [gid]  # a uid with no name here: its primary group only


def _anchors(body: dict, keys: list[BlockKey]) -> np.ndarray | None:
    """Each key's group anchor, from the call's `groups` (None: not named)."""
    raw = body.get("groups")
    return None if raw is None else Groups.from_wire(raw, len(keys)).per_key(len(keys))


def _remote(body: dict) -> frozenset[Tier]:
    remote = body.get("remote", [])
    if not isinstance(remote, list) or not set(remote) <= {t.value for t in Tier}:
        raise ValueError("remote must list host and/or disk")
    return frozenset(Tier(t) for t in remote)


def _claim_socket_path(path: str) -> None:
    """Remove a socket file left by a dead node; refuse one a live node serves."""
    if not os.path.exists(path):
        return
    if engine_wire.node_listening(path):
        raise KvbmError(f"another node already serves {path}")
    os.unlink(path)  # nobody listens: stale
