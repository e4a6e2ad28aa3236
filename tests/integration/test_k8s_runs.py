"""An overlay's etcd and node run as deployed: the rendered StatefulSet's
etcd members (one process each, with the container's flags and ETCD_*
variables; in production in TLS with the Secrets `make-certs.sh --apply`
creates) and `kvbm node` with the rendered DaemonSet's arguments and
environment (its `$(POD_IP)` and `$(NODE_NAME)` expanded as Kubernetes
does) and the ConfigMap as its file. Mount points move under a temporary
directory and etcd's cluster names to loopback ports (tests/harness/
k8s_pods.py), and the two tier sizes come from the environment, which
overrides the file; nothing else is changed. The node starts, answers
/healthz on the DaemonSet's metrics port, serves an engine on its socket and
is in the index under its node's name; in production a client without a
certificate is refused by the same etcd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from discovery.errors import DiscoveryError
from discovery.etcd_index import snapshot
from discovery.signing import IndexSigner
from kvbm.config import load_config
from kvbm.connector.attach import NodeAttachment
from tests.harness.etcd_pki import applied_secrets
from tests.harness.k8s_pods import EtcdMembers, PodFiles, names_nothing_of_the_cluster
from tests.harness.k8s_render import container, expand, find, pod_env, rendered
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY

PEER_SECRET = b"s" * 32
DOWNWARD = {"POD_IP": "127.0.0.2", "NODE_NAME": "gpu-node-7"}


def peer_secret(secrets_dir: Path) -> Path:
    """The Secret docs/operations.md has the operator create by hand."""
    secret = secrets_dir / "kvbm-peer-secret"
    secret.mkdir(parents=True)
    (secret / "peer-secret").write_bytes(PEER_SECRET)
    (secret / "peer-secret").chmod(0o400)
    return secret


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/production"])
def test_the_overlays_etcd_and_node_run_as_deployed(overlay, tmp_path):
    docs = rendered(overlay)
    secrets = applied_secrets(tmp_path / "pki")
    secrets["kvbm-peer-secret"] = peer_secret(tmp_path / "pki" / "secrets")
    with EtcdMembers(docs, tmp_path / "etcd", secrets) as etcd:
        daemonset = find(docs, "DaemonSet", "kvbm-node")
        files = PodFiles(daemonset, docs, tmp_path / "node", secrets, rewrite=etcd.address)
        c = container(daemonset)
        pod = pod_env(c, DOWNWARD)
        env = {k: files.move(etcd.address(v)) for k, v in pod.items()}
        args = [files.move(expand(a, pod)) for a in c["args"]]
        config = Path(args[args.index("--config") + 1])
        in_file = {k: str(v) for k, v in tomllib.loads(config.read_text()).items()}
        names_nothing_of_the_cluster(env | in_file, "the node")
        env |= {"KVBM_HOST_CACHE_MB": "8", "KVBM_DISK_CACHE_MB": "8"}
        cfg = load_config(str(config), env=env)
        assert set(cfg.etcd_endpoints) == set(etcd.endpoints)  # every member, moved
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KVBM_", "ETCD_"))}
        log = tmp_path / "node.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(
                [sys.executable, "-m", "kvbm.cli", *args],
                env=base | env,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        try:
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
            url = f"http://{DOWNWARD['POD_IP']}:{port}/healthz"
            until(lambda: healthy(url), 30, f"never healthy: {log.read_text()[-2000:]}")
            engine = NodeAttachment(cfg.socket, GEOMETRY)
            try:
                assert engine.stats()["peer_address"] == "127.0.0.2:7450"
            finally:
                engine.close()
            signer = IndexSigner(PEER_SECRET)
            endpoints = etcd.endpoints
            mirror = asyncio.run(snapshot(endpoints, cfg.namespace, signer, tls=cfg.etcd_tls))
            assert set(mirror.nodes) == {"gpu-node-7"}
            if cfg.etcd_tls is not None:  # and a client without a certificate is turned away
                with pytest.raises(DiscoveryError):
                    asyncio.run(snapshot(endpoints, cfg.namespace, signer, timeout=2.0))
            node.send_signal(signal.SIGTERM)
            assert node.wait(30) == 0
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(10)
