"""Which network interface the native transport (UCX, under NIXL) may use.

UCX listens on every interface of the machine unless `UCX_NET_DEVICES` names
some. A node keeps it on the interface of its own listen address, so a node
listening on loopback is reachable from this machine only, and one on a
private network is not reachable from a public one. The variable is set in
this process's environment before NIXL loads (UCX reads it then), and
children inherit it. Only kvbm/config.py reads the environment
(tests/test_package_layout.py), so a user's own choice of devices comes in
as an argument.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

UCX_DEVICES_VAR = "UCX_NET_DEVICES"
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def pin_ucx_devices(listen_host: str, chosen: str | None) -> str | None:
    """Keep UCX on the interface holding `listen_host`, unless the user chose
    devices (`chosen`: UCX_NET_DEVICES as the user set it, or None). Returns
    the devices UCX will use (None: an address on no interface here, or a
    wildcard: UCX's own choice, every interface)."""
    if chosen is not None:
        return chosen
    device = interface_of(listen_host)
    if device is not None:
        os.environ[UCX_DEVICES_VAR] = device
    return device


def interface_of(host: str) -> str | None:
    """The network interface holding IPv4 address `host` (None: a wildcard or
    an address on no interface here)."""
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    if packed[0] == 127:
        return "lo"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(
                    s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
            except OSError:
                continue  # no IPv4 address on it
            if ifreq[20:24] == packed:
                return name
    return None
