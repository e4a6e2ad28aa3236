"""Certificates for a TLS etcd in tests, made by the script users run
(k8s/etcd/make-certs.sh): run twice, the second CA's client certificate is a
stranger's."""

from __future__ import annotations

import re
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


def applied_secrets(directory: Path) -> dict[str, Path]:
    """The Secrets `make-certs.sh DIR --apply` creates, each laid out as a
    pod sees it mounted (a directory of 0400 files named by its keys): the
    script is run for real and its `kubectl create secret` lines read, so a
    Secret or key it renames shows here as the pods would see it."""
    certs = directory / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(certs)], check=True, capture_output=True)
    script = MAKE_CERTS.read_text().replace("\\\n", " ")
    out = {}
    for name, files in re.findall(r"secret generic (\S+)((?: +--from-file=\S+)+)", script):
        secret = out[name] = directory / "secrets" / name
        secret.mkdir(parents=True)
        for key, source in re.findall(r"--from-file=([^=\s]+)=(\S+)", files):
            (secret / key).write_bytes((certs / source).read_bytes())
            (secret / key).chmod(0o400)
    return out
