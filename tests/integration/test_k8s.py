"""The Kubernetes manifests, proven offline: every one validates against the
real Kubernetes 1.30 schemas (strict: unknown fields are errors), a broken
copy does not, and the configuration they carry is the configuration the
node and the connector read."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kvbm.config import ENV_PREFIX, KvbmConfig, load_config

K8S = Path(__file__).resolve().parents[2] / "k8s"
VERSION = "1.30.0"
FIELDS = {f for f in KvbmConfig.__dataclass_fields__}


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append(
                    (f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc)
                )
    return out


def find(kind: str, name: str) -> dict:
    for _, doc in documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in k8s/")


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_every_manifest_validates_strictly(where, doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    """Negative controls: the validation above can fail."""
    daemonset = find("DaemonSet", "kvbm-node")
    misspelled = copy.deepcopy(daemonset)
    c = container(misspelled)
    c["volumeMount"] = c.pop("volumeMounts")  # an unknown field
    wrong_type = copy.deepcopy(daemonset)
    container(wrong_type)["ports"][0]["containerPort"] = "7450"  # a string, not a port
    missing = copy.deepcopy(daemonset)
    del missing["spec"]["selector"]  # a required field
    for broken in (misspelled, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSION, strict=True)


def node_config() -> KvbmConfig:
    text = find("ConfigMap", "kvbm-node-config")["data"]["node.toml"]
    unknown = set(tomllib.loads(text)) - FIELDS
    assert not unknown, f"keys the node does not know: {unknown}"
    env = {"KVBM_LISTEN": "10.0.0.7:7450", "KVBM_NODE_ID": "gpu-node-7"}
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        return load_config(f.name, env=env)


def test_the_configmap_is_a_node_configuration_the_node_reads():
    cfg = node_config()
    assert cfg.etcd_endpoints and all(e.endswith(":2379") for e in cfg.etcd_endpoints)
    assert cfg.socket == "/run/kvbm/node.sock" and cfg.metrics_port == 9450
    assert cfg.disk_enabled and cfg.disk_cache_dir == "/var/cache/kvbm"
    assert cfg.listen_address == ("10.0.0.7", 7450)


def test_every_flag_and_variable_the_daemonset_uses_exists():
    c = container(find("DaemonSet", "kvbm-node"))
    assert c["args"][0] == "node"
    flags = [a for a in c["args"] if a.startswith("--")]
    known = {"--config"} | {"--" + f.replace("_", "-") for f in FIELDS}
    assert set(flags) <= known, set(flags) - known
    kvbm_env = [e["name"] for e in c["env"] if e["name"].startswith(ENV_PREFIX)]
    assert kvbm_env and all(n[len(ENV_PREFIX) :].lower() in FIELDS for n in kvbm_env)
    # the variables the values refer to are defined before them (Kubernetes expands in order)
    names = [e["name"] for e in c["env"]]
    for e in c["env"]:
        for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
            assert ref in names[: names.index(e["name"])], f"{e['name']} uses {ref} too early"
    # probes and the metrics Service point at the configured metrics port
    cfg = node_config()
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port["metrics"] == cfg.metrics_port
    assert port["peer-rpc"] == 7450 and "$(POD_IP):7450" in str(c["env"])
    service = find("Service", "kvbm-node-metrics")
    assert service["spec"]["ports"][0]["port"] == cfg.metrics_port
    # the secret file the args name is where the Secret is mounted
    secret_file = c["args"][c["args"].index("--secret-file") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert secret_file.startswith(mounts["peer-secret"] + "/")
    # memory covers the host tier, which lives in the pod's cgroup once touched
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 1024 >= cfg.host_cache_mb


def host_paths(workload: dict) -> dict[str, str]:
    """mountPath -> hostPath of a workload's first container."""
    volumes = {
        v["name"]: v["hostPath"]["path"]
        for v in workload["spec"]["template"]["spec"]["volumes"]
        if "hostPath" in v
    }
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in container(workload)["volumeMounts"]
        if m["name"] in volumes
    }


def test_the_vllm_example_attaches_to_the_node_the_daemonset_runs():
    from kvbm.config import engine_config
    from kvbm.connector.vllm import KvbmConnector

    engine = find("Deployment", "vllm-llama")
    args = container(engine)["args"]
    transfer = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == KvbmConnector.__name__
    assert transfer["kv_connector_module_path"] == KvbmConnector.__module__
    assert transfer["kv_load_failure_policy"] == "recompute"
    assert int(args[args.index("--block-size") + 1]) % 32 == 0
    extra = transfer["kv_connector_extra_config"]
    cfg = engine_config(extra)
    assert cfg.remote_tier_list == ("host", "disk")
    # the socket the engine names is the node's, through the same host directory
    node = find("DaemonSet", "kvbm-node")
    assert cfg.socket == node_config().socket
    node_paths, engine_paths = host_paths(node), host_paths(engine)
    sock_dir = str(Path(cfg.socket).parent)
    assert node_paths[sock_dir] == engine_paths[sock_dir]
    # read-only in the engine: it connects, it cannot replace the socket
    mounts = {m["mountPath"]: m for m in container(engine)["volumeMounts"]}
    assert mounts[sock_dir].get("readOnly") is True
    # and the arena's directory is the same host directory in both pods
    arena = node_config().host_arena_dir
    assert node_paths[arena] == engine_paths[arena] == arena


def test_the_node_runs_with_no_capability_and_the_runtimes_seccomp_profile():
    pod = find("DaemonSet", "kvbm-node")["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container(find("DaemonSet", "kvbm-node"))["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # the arena has a host directory of its own, not the whole host /dev/shm
    assert "/dev/shm" not in host_paths(find("DaemonSet", "kvbm-node")).values()


def test_network_policies_let_only_kvbm_pods_reach_kvbm_ports():
    node_labels = find("DaemonSet", "kvbm-node")["spec"]["template"]["metadata"]["labels"]
    etcd_labels = find("StatefulSet", "kvbm-etcd")["spec"]["template"]["metadata"]["labels"]
    node = find("NetworkPolicy", "kvbm-node")["spec"]
    assert node["podSelector"]["matchLabels"].items() <= node_labels.items()
    # every port from node pods (the peer RPC, UCX's own), /metrics only from
    # the monitoring namespace (a stranger's pod elsewhere reaches no port)
    from_nodes, metrics = node["ingress"]
    assert from_nodes["from"][0]["podSelector"]["matchLabels"].items() <= node_labels.items()
    assert "ports" not in from_nodes
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert [p["port"] for p in metrics["ports"]] == [9450]
    metrics_port = container(find("DaemonSet", "kvbm-node"))["ports"]
    assert [p["containerPort"] for p in metrics_port if p["name"] == "metrics"] == [9450]
    etcd = find("NetworkPolicy", "kvbm-etcd")["spec"]
    assert etcd["podSelector"]["matchLabels"].items() <= etcd_labels.items()
    clients, peers = etcd["ingress"]
    assert clients["from"][0]["podSelector"]["matchLabels"].items() <= node_labels.items()
    assert [p["port"] for p in clients["ports"]] == [2379]
    assert peers["from"][0]["podSelector"]["matchLabels"].items() <= etcd_labels.items()


def test_etcd_takes_only_clients_with_a_certificate_and_the_node_has_one():
    """etcd serves clients and members in TLS and asks both for a certificate
    of its CA; the node reaches it in TLS with the client certificate of the
    Secret make-certs.sh creates, mounted where its configuration looks."""
    etcd = container(find("StatefulSet", "kvbm-etcd"))
    args = etcd["command"]
    urls = [a.split("=", 1)[1] for a in args if "-urls=" in a and "metrics" not in a]
    assert urls and all(u.startswith("https://") for u in urls), urls
    assert {"--client-cert-auth", "--peer-client-cert-auth"} <= set(args)
    assert "--listen-metrics-urls=http://0.0.0.0:2381" in args  # probes: plain, own port
    for probe in (etcd["readinessProbe"], etcd["livenessProbe"]):
        assert probe["httpGet"]["port"] == "health"
    volumes = find("StatefulSet", "kvbm-etcd")["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "tls",
        "secret": {"secretName": "kvbm-etcd-tls", "defaultMode": 0o400},
    } in volumes

    cfg = node_config()
    assert cfg.etcd_tls is not None and cfg.etcd_tls.cert_file and cfg.etcd_tls.key_file
    daemonset = find("DaemonSet", "kvbm-node")
    mounts = {m["name"]: m["mountPath"] for m in container(daemonset)["volumeMounts"]}
    secrets = {
        v["name"]: v["secret"]["secretName"]
        for v in daemonset["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert secrets["etcd-client"] == "kvbm-etcd-client"
    for path in (cfg.etcd_tls.ca_file, cfg.etcd_tls.cert_file, cfg.etcd_tls.key_file):
        assert Path(path).parent == Path(mounts["etcd-client"]), path
    script = (K8S / "etcd" / "make-certs.sh").read_text()
    for secret in ("kvbm-etcd-tls", "kvbm-etcd-client"):
        assert f"secret generic {secret}" in script
    assert "--from-file=ca.crt=" in script and "--from-file=tls.key=" in script


def test_the_daemonsets_node_runs_as_deployed(tmp_path):
    """`kvbm node` with the DaemonSet's arguments and environment (its
    `$(POD_IP)` and `$(NODE_NAME)` expanded as Kubernetes does), the
    ConfigMap as its file, the peer secret a 0400 file and the etcd client
    certificate where the file names them, against an etcd that requires
    client certificates. Mount points move under a temporary directory and
    three machine-sized values (tier sizes, etcd's address) come from the
    environment, which overrides the file; nothing else is changed. The node
    starts, answers /healthz on the DaemonSet's metrics port, serves an
    engine on its socket and is in the index under its node's name."""
    from discovery.etcd_index import snapshot
    from discovery.etcd_server import EtcdServer
    from discovery.signing import IndexSigner
    from kvbm.connector.attach import NodeAttachment
    from tests.harness.etcd_pki import make_pki
    from tests.harness.node_daemon import until
    from tests.harness.support import GEOMETRY

    root = tmp_path / "pod"
    mounts = {
        p: root / p.strip("/")
        for p in ("/etc/kvbm", "/dev/shm/kvbm", "/run/kvbm", "/var/cache/kvbm")
    }
    for path in mounts.values():
        path.mkdir(parents=True)

    def mapped(text: str) -> str:
        for pod_path, here in mounts.items():
            text = text.replace(pod_path, str(here))
        return text

    (mounts["/etc/kvbm"] / "node.toml").write_text(
        mapped(find("ConfigMap", "kvbm-node-config")["data"]["node.toml"])
    )
    (mounts["/etc/kvbm"] / "secret").mkdir()
    secret = mounts["/etc/kvbm"] / "secret" / "peer-secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o400)
    pki = make_pki(tmp_path)
    client = mounts["/etc/kvbm"] / "etcd"
    client.mkdir()
    for src, name in ((pki.node.ca_file, "ca.crt"), (pki.node.cert_file, "tls.crt")):
        (client / name).write_bytes(Path(src).read_bytes())
    (client / "tls.key").write_bytes(Path(pki.node.key_file).read_bytes())
    (client / "tls.key").chmod(0o400)

    c = container(find("DaemonSet", "kvbm-node"))
    downward = {"POD_IP": "127.0.0.2", "NODE_NAME": "gpu-node-7"}
    env = {k: v for k, v in os.environ.items() if k != "KVBM_SECRET"} | downward
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    with EtcdServer(tls=pki.server) as etcd:
        env |= {"KVBM_HOST_CACHE_MB": "8", "KVBM_DISK_CACHE_MB": "8", "KVBM_ETCD": etcd.endpoint}
        args = [mapped(a) for a in c["args"]]
        node = subprocess.Popen(
            [sys.executable, "-m", "kvbm.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "node.log", "w"),  # noqa: SIM115
        )
        try:
            metrics = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
            health = f"http://127.0.0.2:{metrics}/healthz"

            def healthy() -> bool:
                try:
                    with urllib.request.urlopen(health, timeout=1) as r:
                        return r.status == 200
                except OSError:
                    return False

            until(
                healthy,
                30,
                "the node never became healthy: " + (tmp_path / "node.log").read_text()[-2000:],
            )
            engine = NodeAttachment(str(mounts["/run/kvbm"] / "node.sock"), GEOMETRY)
            try:
                assert engine.stats()["peer_address"] == "127.0.0.2:7450"
            finally:
                engine.close()
            signer = IndexSigner(b"s" * 32)
            mirror = asyncio.run(snapshot([etcd.endpoint], "default", signer, tls=pki.node))
            assert set(mirror.nodes) == {"gpu-node-7"}
            node.send_signal(signal.SIGTERM)
            assert node.wait(30) == 0
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(10)
