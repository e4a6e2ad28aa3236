"""The node's HTTP endpoint: Prometheus `/metrics` and a `/healthz` readiness
probe. Two GET routes do not need a web framework: a few lines of asyncio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest


class MetricsServer:
    """`ready()` answers the probe; `registry()` is what a scrape reads (the
    tiers' registry, which exists once an engine has attached)."""

    def __init__(
        self, ready: Callable[[], bool], registry: Callable[[], CollectorRegistry]
    ) -> None:
        self.ready = ready
        self.registry = registry
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
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
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
