"""What a connection may cost a node before it has proved anything: the
admission both of the node's listeners (the peer port before a valid
handshake, the metrics port for a connection's whole life) put every
accepted connection through, and logs that a flood cannot flood.

A cap per source address alone does not bound a stranger who has many
addresses (a /64 of IPv6, or 127.0.0.0/8 on the host), and a global cap
alone lets one address take every place. So both: an address past its
share is refused at once (closed, nothing read); at the global cap the
newcomer is still taken, in the place of the oldest connection of the
address holding the most. An honest client (one connection from its own
address, which it uses at once) is then the last to go, however many
addresses the idle ones come from, while descriptors and buffers stay
bounded by the global cap. Refusing newcomers at the global cap instead
would let a few hundred idle connections lock out every honest one until
they time out.

Accepts that fail for want of descriptors (EMFILE) are asyncio's to retry
(it pauses the listener a second); by default it logs each with a
traceback. `quiet_accept_errors` logs them at most every LOG_EVERY_S with a
count instead."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from typing import Any

log = logging.getLogger("transport.preauth")
LOG_EVERY_S = 10.0
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message for EMFILE & co.
# The kernel's queue of connections not yet accepted. Once it is full the
# kernel drops new SYNs and a client retries after a second, so an honest
# prober behind a burst of a stranger's connects would wait that second; a
# deeper queue holds the burst, which the gate sheds at the cost of an accept
# and a close each. (The kernel caps it at somaxconn.)
BACKLOG = 4096


def deepen_backlog(server: asyncio.Server) -> None:
    """Give `server`'s listeners a queue of BACKLOG. Not through
    `start_server(backlog=)`: asyncio also accepts that many in one go before
    any handler runs (thousands of descriptors and buffers at once), so it
    stays at its default of 100 there, and `listen` is called again here on a
    duplicate of each listener (which changes the queue of the socket itself)."""
    for sock in server.sockets:
        with sock.dup() as again:
            again.listen(BACKLOG)


class Throttled:
    """A warning that repeats at most every LOG_EVERY_S, with how many times
    it happened since it was last logged."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.count = 0
        self.last = -LOG_EVERY_S

    def note(self, reason: str, addr: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.logger.warning(
                "%s reason=%s addr=%s count=%d", self.what, reason, addr, self.count
            )
            self.count, self.last = 0, now


class Ticket:
    """One admitted connection's place; `release` gives it back (once)."""

    __slots__ = ("gate", "held", "ip", "seq", "task")

    def __init__(self, gate: Gate, ip: str, task: asyncio.Task, seq: int) -> None:
        self.gate, self.ip, self.task, self.seq, self.held = gate, ip, task, seq, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate._drop(self)


class Gate:
    """At most `total` connections admitted at once, at most `per_address`
    from one address. Invariant: `held` is the number of tickets in
    `by_address`, each address's in the order they were admitted."""

    def __init__(self, total: int, per_address: int, what: str, logger: logging.Logger) -> None:
        self.total = total
        self.per_address = per_address
        self.what = what
        self.by_address: dict[str, dict[Ticket, None]] = {}
        self.held = 0
        self.evicted = 0
        self._seq = itertools.count()
        self._refused = Throttled(logger, "refusing connections")
        self._closed = Throttled(logger, "closing the oldest connection of the busiest address")

    def admit(self, ip: str, task: asyncio.Task) -> Ticket | None:
        """The connection served by `task` from `ip`: its ticket, or None when
        that address holds its share already (the caller closes it). At the
        global cap another connection's task is cancelled to make room."""
        mine = self.by_address.get(ip)
        if mine is not None and len(mine) >= self.per_address:
            self._refused.note(f"more than {self.per_address} {self.what} from one address", ip)
            return None
        if self.held >= self.total:
            self._evict()
        ticket = Ticket(self, ip, task, next(self._seq))
        self.by_address.setdefault(ip, {})[ticket] = None
        self.held += 1
        return ticket

    def _evict(self) -> None:
        """Cancel the oldest connection of the address holding the most (of
        those, the address whose oldest is oldest)."""
        busiest = max(self.by_address.values(), key=lambda t: (len(t), -next(iter(t)).seq))
        victim = next(iter(busiest))
        victim.release()
        victim.task.cancel()  # its handler closes the connection as it ends
        self.evicted += 1
        self._closed.note(f"more than {self.total} {self.what} from all addresses", victim.ip)

    def _drop(self, ticket: Ticket) -> None:
        mine = self.by_address[ticket.ip]
        del mine[ticket]
        if not mine:
            del self.by_address[ticket.ip]
        self.held -= 1


_QUIETED: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def quiet_accept_errors() -> None:
    """On the running loop: failed accepts (out of descriptors or memory) are
    logged at a bounded rate, without a traceback; everything else goes to
    the handler that was there before. Idempotent."""
    loop = asyncio.get_running_loop()
    if loop in _QUIETED:
        return
    _QUIETED.add(loop)
    before = loop.get_exception_handler()
    failed = Throttled(log, "accept failed (the listener retries in a second)")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if context.get("message") == ACCEPT_FAILED and isinstance(error, OSError):
            sock = context.get("socket")
            failed.note(error.strerror or str(error), sock.getsockname() if sock else "?")
        elif before is not None:
            before(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
