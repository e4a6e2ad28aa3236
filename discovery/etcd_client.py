"""How a node reaches etcd: one gRPC channel per endpoint, in TLS with a
client certificate when configured (etcd's --client-cert-auth: then only
holders of a certificate its CA signed read or write the index), every
received message bounded, and a namespace read in pages at one revision (so
no single message holds a whole fleet's index)."""

from __future__ import annotations

import aetcd
import aetcd.exceptions
import aetcd.utils
import aetcd.watcher
import grpc
from aetcd import rpc

from discovery.errors import DiscoveryError
from discovery.tls import EtcdTls

MAX_MESSAGE_BYTES = 64 << 20  # a page, a watch batch: far below; a flood: refused
PAGE_KEYS = 10_000
# A subchannel pool of the client's own: with gRPC's process-wide pool a new
# client after a partition inherits the stalled connection attempt and its
# back-off (measured: back 9 s after the heal instead of 1 s).
_GRPC_OPTIONS = {
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.use_local_subchannel_pool": 1,
}


def _credentials(tls: EtcdTls) -> grpc.ChannelCredentials:
    def read(path: str) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DiscoveryError(f"cannot read etcd TLS file {path}: {e}") from e

    return grpc.ssl_channel_credentials(read(tls.ca_file), read(tls.key_file), read(tls.cert_file))


class _TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel (aetcd 1.0 opens plain channels only).
    Same stubs as its `connect` makes; user/password auth is not used here."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._credentials, self._options.items())
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def open_client(endpoint: str, timeout: float, tls: EtcdTls | None = None) -> aetcd.Client:
    """A client for HOST:PORT (not connected yet)."""
    host, port = endpoint.rsplit(":", 1)
    kwargs = {"host": host, "port": int(port), "timeout": timeout, "options": _GRPC_OPTIONS}
    if tls is None:
        return aetcd.Client(**kwargs)  # type: ignore[arg-type]
    return _TlsClient(_credentials(tls), **kwargs)


async def read_prefix(client: aetcd.Client, prefix: bytes) -> tuple[int, int, list]:
    """Every key under `prefix` as of one revision, in pages: (revision,
    cluster id, key-values). A page over MAX_MESSAGE_BYTES (values written
    huge on purpose) is asked again ten times smaller, down to one key,
    which etcd bounds (its --max-request-bytes)."""
    end = aetcd.utils.prefix_range_end(prefix)
    kvs: list = []
    start, revision, cluster, limit = prefix, 0, 0, PAGE_KEYS
    await client.connect()
    while True:
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
        try:
            page = await client.kvstub.Range(request, timeout=client._timeout)
        except rpc.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                limit = max(1, limit // 10)
                continue
            aetcd.exceptions._handle_exception(e)  # raises aetcd's error for it
            raise
        if not revision:
            revision, cluster = page.header.revision, page.header.cluster_id
        kvs.extend(page.kvs)
        if not page.more or not page.kvs:
            return revision, cluster, kvs
        start = page.kvs[-1].key + b"\x00"
