"""The node's HTTP endpoint: Prometheus `/metrics` and a `/healthz` readiness
probe, for anyone who reaches the metrics port, with what each connection
may cost bounded: at most MAX_CONNECTIONS open at once (MAX_PER_ADDRESS
from one address; at the cap a new one takes the place of the oldest of the
busiest address: transport/preauth.py), a request head of at most
MAX_HEAD_BYTES, read within HEAD_TIMEOUT_S in all (not per byte), an answer
written within WRITE_TIMEOUT_S, one request per connection. So idle or
slow connections from any number of addresses hold a few dozen descriptors
and a few MB, far under the node's limit (daemon.fit_file_limit), and a
prober's /healthz still gets in at once.

Why not a well-kept server: of those installed beside vLLM, uvicorn and
aiohttp have header size limits but neither a cap on open connections
(uvicorn's `limit_concurrency` still accepts and answers 503 past it) nor a
deadline for the whole request head (each waits per read or for keep-alive
only), and a node's dependencies would grow by a web stack for two GET
routes. The cap and the deadline would still have to be written here, so
the few lines of asyncio stay, with the limits stated."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from transport.preauth import Gate, deepen_backlog, quiet_accept_errors

log = logging.getLogger("kvbm.http")
MAX_CONNECTIONS = 64  # a few scrapers and probers; far under the node's descriptors
MAX_PER_ADDRESS = 16
MAX_HEAD_BYTES = 8 << 10  # the request line and headers
HEAD_TIMEOUT_S = 3.0  # from accept to the end of the headers
WRITE_TIMEOUT_S = 5.0  # for a reader that takes the answer slowly


class MetricsServer:
    """`ready()` answers the probe; `registry()` is what a scrape reads (the
    tiers' registry, which exists once an engine has attached)."""

    def __init__(
        self, ready: Callable[[], bool], registry: Callable[[], CollectorRegistry]
    ) -> None:
        self.ready = ready
        self.registry = registry
        self.gate = Gate(MAX_CONNECTIONS, MAX_PER_ADDRESS, "HTTP connections", log)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        quiet_accept_errors()
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD_BYTES)
        deepen_backlog(self._server)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        task = asyncio.current_task()
        assert task is not None
        ticket = self.gate.admit(str(addr[0]) if isinstance(addr, tuple) else "?", task)
        try:
            if ticket is None:  # its address holds its share already: closed unread
                return
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                request = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(request))
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass  # a head too long, too slow or cut short: closed without an answer
        except (ConnectionError, asyncio.CancelledError):
            pass  # gone, or closed for a newer connection
        finally:
            if ticket is not None:
                ticket.release()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, request: bytes) -> bytes:
        method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if method != "GET":
            status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif path == "/metrics":
            status, body = "200 OK", generate_latest(self.registry())
            kind = "text/plain; version=0.0.4"
        elif path == "/healthz":
            ok = self.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            body, kind = (b"ok\n" if ok else b"not ready\n"), "text/plain"
        else:
            status, body, kind = "404 Not Found", b"/metrics or /healthz\n", "text/plain"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body
