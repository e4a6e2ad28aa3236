"""Issue 31, finding 4: signed index values were bound to their etcd key only.
An etcd client without the fleet's secret copies a live node's signed record
and locations, the node dies, and the client puts the copies back: under a
lease of its own, and under a lease it grants itself with the dead node's
old lease id (etcd lets a client choose the id once the old lease expired).
Against real `kvbm node` processes on a real etcd, in both index layouts:
(a) the peer believes none of it: no location of the dead node in its
mirror, no lookup pointing at it, and the dead node is not in its ring;
(b) the node restarts with its own id although its replayed record is kept
alive; a genuinely live node of that id still refuses a second one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import aetcd
import aetcd.exceptions
import pytest

from discovery.etcd_client import read_prefix
from discovery.schema import namespace_prefix, node_path
from kvbm.connector.attach import Available, NodeAttachment, node_stats
from kvbm.errors import KvbmError
from tests.harness.node_daemon import until
from tests.harness.peer_attacks import two_nodes
from tests.harness.support import SPACE

BLOCKS = 8
TTL = 3
NS = SPACE.namespace

pytestmark = pytest.mark.slow


def _flags(layout: str) -> tuple[str, ...]:
    return ("--namespace", NS, "--lease-ttl", str(TTL), "--index-layout", layout)


class Replayer:
    """An etcd client without the secret: it keeps copies of what node-a
    wrote, and puts them back under a lease it keeps alive (in a thread of
    its own, as a separate process would)."""

    def __init__(self, etcd) -> None:
        self.etcd = etcd
        self.kvs: list = []
        self.old_lease = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _client(self) -> aetcd.Client:
        return aetcd.Client(host=self.etcd.host, port=self.etcd.client_port)

    def copy(self) -> None:
        async def go() -> None:
            raw = self._client()
            await raw.connect()
            try:
                _, _, kvs = await read_prefix(raw, namespace_prefix(NS))
            finally:
                await raw.close()
            ours = node_path(NS, "node-a")
            self.kvs = [kv for kv in kvs if kv.key == ours or b"/runs/node-a/" in kv.key]
            self.old_lease = next(kv.lease for kv in self.kvs if kv.key == ours)

        asyncio.run(go())
        assert self.old_lease

    def replay(self, old_id: bool) -> None:
        """Put the copies back under a fresh lease (or one granted with the
        dead node's lease id), refreshed until `stop`."""
        self.stop()
        self._stop.clear()
        ready = threading.Event()

        async def go() -> None:
            raw = self._client()
            await raw.connect()
            try:
                deadline = time.monotonic() + 4 * TTL
                while True:  # the old lease must have expired before its id can be granted
                    try:
                        lease = await raw.lease(TTL, self.old_lease if old_id else None)
                        break
                    except aetcd.exceptions.ClientError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                for kv in self.kvs:
                    await raw.put(kv.key, kv.value, lease=lease.id)
                ready.set()
                while not self._stop.is_set():
                    await raw.refresh_lease(lease.id)
                    await asyncio.sleep(0.3)
                with contextlib.suppress(aetcd.exceptions.ClientError):
                    await raw.revoke_lease(lease.id)
            finally:
                ready.set()
                await raw.close()

        self._thread = threading.Thread(target=asyncio.run, args=(go(),), daemon=True)
        self._thread.start()
        assert ready.wait(30)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(30)
            self._thread = None


@contextlib.contextmanager
def replayer(etcd) -> Iterator[Replayer]:
    r = Replayer(etcd)
    try:
        yield r
    finally:
        r.stop()


def _sees_nothing_of_a(b_socket: str, eng_b: NodeAttachment, keys, layout: str) -> bool:
    stats = node_stats(b_socket)
    if layout == "mirror" and stats.get("index_mirror_keys", 0) != 0:
        return False
    if layout == "sharded" and stats["index_shard"]["members"] != 1:
        return False
    return eng_b.lookup(keys) == Available(0)


def _kill(daemon) -> None:
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)


@pytest.mark.parametrize("layout", ["mirror", "sharded"])
def test_a_dead_nodes_replayed_values_are_not_believed(etcd, daemons, tmp_path, layout):
    with (
        replayer(etcd) as attacker,
        two_nodes(etcd, daemons, tmp_path, BLOCKS, *_flags(layout)) as n,
    ):
        attacker.copy()
        _kill(n.a)
        see_nothing = lambda: _sees_nothing_of_a(n.b.socket, n.eng_b, n.keys, layout)  # noqa: E731
        until(see_nothing, 4 * TTL, "B never forgot the dead node")
        for old_id in (False, True):  # under its own lease, then under the dead node's id
            attacker.replay(old_id)
            time.sleep(1.5)  # the watch has delivered the copies
            assert see_nothing(), f"B believes the replayed values (old lease id: {old_id})"
            if layout == "mirror":
                assert n.eng_b.lookup(n.keys) == Available(0)
            attacker.stop()


@pytest.mark.parametrize("layout", ["mirror", "sharded"])
def test_a_replayed_record_does_not_keep_its_node_from_restarting(etcd, daemons, tmp_path, layout):
    with (
        replayer(etcd) as attacker,
        two_nodes(etcd, daemons, tmp_path, BLOCKS, *_flags(layout)) as n,
    ):
        attacker.copy()
        _kill(n.a)
        attacker.replay(old_id=True)  # the dead node's record, under its old lease id, kept alive
        common = ["--etcd", etcd.endpoint, "--secret-file", str(tmp_path / "secret")]
        again = daemons(
            "node-a-again", "127.0.0.2", *common, *_flags(layout), "--node-id", "node-a"
        )
        time.sleep(TTL)  # past its join: it holds the id, the replayed record is gone
        assert again.proc.poll() is None
        # a genuinely live node-a still keeps a second one out
        with pytest.raises(KvbmError, match="held by a live node"):
            daemons("node-a-third", "127.0.0.4", *common, *_flags(layout), "--node-id", "node-a")
        assert again.proc.poll() is None
