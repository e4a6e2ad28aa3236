"""What a node needs to reach etcd in TLS (read by the config; used by
etcd_client.py, which alone imports gRPC)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EtcdTls:
    """The CA that signed etcd's server certificate, and this node's client
    certificate and key (both, or neither: an etcd without client-cert-auth)."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if not self.ca_file:
            raise ValueError("TLS to etcd needs the CA certificate (etcd_ca_file)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("an etcd client certificate needs its key, and a key its certificate")
