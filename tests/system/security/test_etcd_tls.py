"""Issue 14, finding 8 (the etcd half): the index's etcd was open to any pod.
A node now reaches etcd in TLS with a client certificate (etcd_ca_file,
etcd_cert_file, etcd_key_file), so etcd can require one (--client-cert-auth,
as k8s/etcd/ does). Against a real etcd that requires certificates: two real
nodes share a prompt through it and `kvbm status` reads it; a client without
a certificate, or with one from another CA, can neither write nor read.
The certificates are those k8s/etcd/make-certs.sh makes (twice: the second
CA's client certificate is the stranger's)."""

from __future__ import annotations

import asyncio

import aetcd.exceptions
import pytest

from discovery.etcd_client import open_client
from discovery.etcd_server import EtcdServer
from discovery.schema import namespace_prefix
from tests.harness.etcd_pki import make_pki
from tests.harness.node_daemon import kvbm_json, loads_exactly
from tests.harness.peer_attacks import two_nodes, write_secret


@pytest.fixture
def tls_etcd(tmp_path):
    pki = make_pki(tmp_path)
    with EtcdServer(tls=pki.server) as server:
        yield server, pki


def test_nodes_share_a_prompt_through_an_etcd_that_wants_certificates(tls_etcd, daemons, tmp_path):
    server, pki = tls_etcd
    tls = ["--etcd-ca-file", pki.node.ca_file]
    tls += ["--etcd-cert-file", pki.node.cert_file, "--etcd-key-file", pki.node.key_file]
    with two_nodes(server, daemons, tmp_path, 8, *tls) as n:
        assert loads_exactly(n.eng_b, n.keys, "remote_host")
        secret = write_secret(tmp_path / "status-secret")
        fleet = kvbm_json("status", "--etcd", server.endpoint, "--secret-file", secret, *tls)
        assert {node["node_id"] for node in fleet["nodes"]} == {"node-a", "node-b"}


def test_without_a_certificate_from_its_ca_etcd_is_closed(tls_etcd):
    server, pki = tls_etcd
    key = namespace_prefix("default") + b"nodes/intruder"

    async def writes(tls) -> bool:
        client = open_client(server.endpoint, 3.0, tls)
        try:
            await client.put(key, b"a record pointing anywhere")
            return (await client.get(key)) is not None
        except (aetcd.exceptions.ClientError, OSError, TimeoutError):
            return False
        finally:
            await client.close()

    assert not asyncio.run(writes(None))  # plain text to a TLS port
    assert not asyncio.run(writes(pki.stranger))  # a certificate etcd's CA never signed
    assert asyncio.run(writes(pki.node))  # the control: the node's certificate works
