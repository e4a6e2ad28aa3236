"""Certificates for a TLS etcd in tests: a CA, etcd's server certificate for
127.0.0.1, a node's client certificate from that CA, and one from a CA etcd
does not trust (an attacker's)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from discovery.tls import EtcdTls


@dataclass
class Pki:
    server: EtcdTls  # etcd's certificate and key, and the CA its clients need
    node: EtcdTls  # what a node is configured with
    stranger: EtcdTls  # a client certificate from another CA


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn: str, issuer: tuple | None, usage, directory: Path, ca: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_name, signer_key = issuer if issuer else (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        alt = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert, key, str(cert_path), str(key_path)


def make_pki(directory: Path) -> Pki:
    ca, ca_key, ca_file, _ = _issue("kvbm-ca", None, None, directory, ca=True)
    other, other_key, _, _ = _issue("other-ca", None, None, directory, ca=True)
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    _, _, server_cert, server_key = _issue("etcd", (ca.subject, ca_key), both, directory)
    _, _, node_cert, node_key = _issue("kvbm-node", (ca.subject, ca_key), client, directory)
    _, _, bad_cert, bad_key = _issue("stranger", (other.subject, other_key), client, directory)
    return Pki(
        server=EtcdTls(ca_file, server_cert, server_key),
        node=EtcdTls(ca_file, node_cert, node_key),
        stranger=EtcdTls(ca_file, bad_cert, bad_key),
    )
