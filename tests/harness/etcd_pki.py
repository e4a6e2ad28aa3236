"""Certificates for a TLS etcd in tests, made by the script users run
(k8s/etcd/make-certs.sh): run twice, the second CA's client certificate is a
stranger's."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from discovery.tls import EtcdTls

MAKE_CERTS = Path(__file__).parents[2] / "k8s" / "etcd" / "make-certs.sh"


@dataclass
class Pki:
    server: EtcdTls  # etcd's certificate and key, and the CA of its clients
    node: EtcdTls  # what a node is configured with
    stranger: EtcdTls  # a client certificate from another CA


def make_pki(directory: Path) -> Pki:
    ours, theirs = directory / "pki", directory / "other-pki"
    for d in (ours, theirs):
        subprocess.run(["bash", str(MAKE_CERTS), str(d)], check=True, capture_output=True)
    ca = str(ours / "ca.crt")
    return Pki(
        server=EtcdTls(ca, str(ours / "etcd.crt"), str(ours / "etcd.key")),
        node=EtcdTls(ca, str(ours / "kvbm-node.crt"), str(ours / "kvbm-node.key")),
        stranger=EtcdTls(ca, str(theirs / "kvbm-node.crt"), str(theirs / "kvbm-node.key")),
    )
