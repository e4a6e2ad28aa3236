"""What a local user sees of a node in /proc/net/tcp: the TCP ports that its
process, or any of its children (the NIXL agents), listens on."""

from __future__ import annotations

import ipaddress
import os

_LISTEN = "0A"


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def listening_ports(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of `pid` and its children."""
    inodes: set[str] = set()
    for p in descendants(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != _LISTEN or cols[9] not in inodes:
                continue
            address, port = cols[1].split(":")
            found.append((_address(address, family), int(port, 16)))
    return found


def _address(hex_address: str, family: int) -> str:
    """The kernel's hex (32-bit words, each in host byte order) as text."""
    raw = b"".join(
        bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8)
    )
    return str(ipaddress.ip_address(raw))


def reachable(address: str) -> str:
    """Where to connect to reach a socket listening on `address`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
