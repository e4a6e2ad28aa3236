"""A port free on a loopback address, for a test that gives a node its
metrics or peer port itself (the product finds ports only for the etcd it
starts, discovery/etcd_server.py's `free_ports`)."""

from __future__ import annotations

from discovery.etcd_server import free_ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host)[0]
