"""The Kubernetes manifests, proven offline: every kustomization under k8s/
renders with `kubectl kustomize` and every object it renders validates
against the real Kubernetes 1.30 schemas (strict: unknown fields are errors);
a broken object or overlay does not; every manifest file is in some
rendering; and the configuration each overlay's objects carry is the
configuration the node, etcd and the connector read. The overlays' etcd and
node are run as deployed in test_k8s_runs.py."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from discovery.etcd_server import etcd_binary
from kvbm.config import ENV_PREFIX, KvbmConfig
from tests.harness.k8s_render import (
    K8S,
    NODE_OVERLAYS,
    RenderError,
    container,
    find,
    host_paths,
    kinds,
    kustomization,
    kustomizations,
    node_config,
    pod_env,
    render,
    rendered,
    toml_keys,
    volumes,
)

VERSION = "1.30.0"
FIELDS = set(KvbmConfig.__dataclass_fields__)


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            e.add_note(f"in {doc['kind']}/{doc['metadata']['name']}")
            raise


@pytest.mark.parametrize("name", kustomizations())
def test_every_kustomization_renders_and_validates_strictly(name):
    docs = rendered(name)
    assert docs, f"k8s/{name} renders nothing"
    validate_all(docs)


def test_every_kustomization_the_tests_name_exists():
    assert set(NODE_OVERLAYS) | set(NODE_OVERLAYS.values()) <= set(kustomizations())
    assert {"base", "etcd", "monitoring"} <= set(kustomizations())


def referenced(directory: Path) -> set[Path]:
    """The files and directories a kustomization or component names."""
    k = kustomization(directory)
    names = [*k.get("resources", []), *k.get("components", [])]
    names += [p["path"] for p in k.get("patches", [])]
    names += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
    return {(directory / n).resolve() for n in names}


def test_every_manifest_file_is_in_a_kustomization():
    """A file no kustomization names is never rendered, so never validated."""
    named = set().union(*(referenced(p.parent) for p in K8S.rglob("kustomization.yaml")))
    files = {
        p.resolve()
        for p in K8S.rglob("*")
        if p.suffix in (".yaml", ".json") and p.name != "kustomization.yaml"
    }
    assert files - named == set(), "files no kustomization names"
    components = {p.parent.resolve() for p in K8S.glob("components/*/kustomization.yaml")}
    assert components and components <= named, "components no kustomization uses"


def test_a_broken_object_is_caught():
    """Negative controls: the validation above can fail."""
    daemonset = find(rendered("overlays/production"), "DaemonSet", "kvbm-node")
    misspelled = copy.deepcopy(daemonset)
    c = container(misspelled)
    c["volumeMount"] = c.pop("volumeMounts")  # an unknown field
    wrong_type = copy.deepcopy(daemonset)
    container(wrong_type)["ports"][0]["containerPort"] = "7450"  # a string, not a port
    missing = copy.deepcopy(daemonset)
    del missing["spec"]["selector"]  # a required field
    for broken in (misspelled, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_all([broken])


def break_copy(tmp_path: Path, file: str, old: str, new: str) -> Path:
    """A copy of k8s/ with `old` replaced by `new` in `file`."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    path = root / file
    text = path.read_text()
    assert old in text, (file, old)
    path.write_text(text.replace(old, new, 1))
    return root


def test_a_broken_overlay_is_caught(tmp_path):
    """Negative controls through the overlays themselves: a patch with an
    unknown field renders but does not validate; a patch whose target is
    gone, or a component that is gone, does not render."""
    patch = "components/etcd-client/node-etcd-client.yaml"
    root = break_copy(tmp_path / "field", patch, "volumeMounts:", "mounts:")
    docs = render(root / "overlays/production")
    with pytest.raises(kubernetes_validate.ValidationError, match="mounts"):
        validate_all(docs)
    root = break_copy(
        tmp_path / "target", "overlays/dev/one-etcd-member.yaml", "name: kvbm-etcd", "name: etcd"
    )
    with pytest.raises(RenderError):
        render(root / "overlays/dev")
    root = break_copy(
        tmp_path / "gone",
        "overlays/production/kustomization.yaml",
        "components/network-policy",
        "components/network-policies",
    )
    with pytest.raises(RenderError):
        render(root / "overlays/production")


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_each_overlays_node_reads_its_configuration(overlay):
    docs = rendered(overlay)
    unknown = toml_keys(docs) - FIELDS
    assert not unknown, f"keys the node does not know: {unknown}"
    cfg = node_config(docs)
    assert cfg.socket == "/run/kvbm/node.sock" and cfg.metrics_port == 9450
    assert cfg.disk_enabled and cfg.disk_cache_dir == "/var/cache/kvbm"
    assert cfg.listen_address == ("10.0.0.7", 7450) and cfg.node_id == "gpu-node-7"
    c = container(find(docs, "DaemonSet", "kvbm-node"))
    # memory covers the host tier, which lives in the pod's cgroup once touched
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 1024 >= cfg.host_cache_mb + 1024
    assert c["resources"]["requests"]["memory"] == limit


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_every_flag_and_variable_the_daemonset_uses_exists(overlay):
    docs = rendered(overlay)
    c = container(find(docs, "DaemonSet", "kvbm-node"))
    assert c["args"][0] == "node"
    flags = [a for a in c["args"] if a.startswith("--")]
    known = {"--config"} | {"--" + f.replace("_", "-") for f in FIELDS}
    assert set(flags) <= known, set(flags) - known
    kvbm_env = [e["name"] for e in c["env"] if e["name"].startswith(ENV_PREFIX)]
    assert kvbm_env and all(n[len(ENV_PREFIX) :].lower() in FIELDS for n in kvbm_env)
    pod_env(c, {"POD_IP": "10.0.0.7", "NODE_NAME": "n"})  # each $(VAR) defined before its use
    # probes and the metrics Service point at the configured metrics port
    cfg = node_config(docs)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port["metrics"] == cfg.metrics_port and port["peer-rpc"] == cfg.listen_address[1]
    service = find(docs, "Service", "kvbm-node-metrics")
    assert service["spec"]["ports"][0]["port"] == cfg.metrics_port
    # the secret file the args name is where the Secret is mounted
    secret_file = c["args"][c["args"].index("--secret-file") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert secret_file.startswith(mounts["peer-secret"] + "/")


def etcd_flags() -> set[str]:
    """The flags of the etcd the tests run (3.5, as the StatefulSet's image)."""
    out = subprocess.run([etcd_binary(), "--help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+--([a-z0-9-]+)", out.stdout + out.stderr, re.MULTILINE))


def etcd_settings(docs: list[dict]) -> dict[str, str]:
    """etcd's settings in the StatefulSet, flag name -> value, from its
    command and its ETCD_* variables (expanded for member 0)."""
    c = container(find(docs, "StatefulSet", "kvbm-etcd"))
    env = pod_env(c, {"POD_NAME": "kvbm-etcd-0"})
    settings = {
        k[len("ETCD_") :].lower().replace("_", "-"): v
        for k, v in env.items()
        if k.startswith("ETCD_")
    }
    for arg in c["command"][1:]:
        name, _, value = arg[2:].partition("=")
        assert name not in settings, f"--{name} both as a flag and a variable: etcd refuses"
        settings[name] = value.replace("$(POD_NAME)", "kvbm-etcd-0") or "true"
    return settings


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_the_node_names_every_etcd_member_and_no_other(overlay):
    docs = rendered(overlay)
    settings = etcd_settings(docs)
    assert set(settings) <= etcd_flags(), set(settings) - etcd_flags()
    replicas = find(docs, "StatefulSet", "kvbm-etcd")["spec"]["replicas"]
    members = [f"kvbm-etcd-{i}.kvbm-etcd.kvbm.svc" for i in range(replicas)]
    scheme = "https" if "cert-file" in settings else "http"
    assert settings["initial-cluster"] == ",".join(
        f"kvbm-etcd-{i}={scheme}://{m}:2380" for i, m in enumerate(members)
    )
    for url in ("listen-client-urls", "advertise-client-urls", "listen-peer-urls"):
        assert settings[url].startswith(f"{scheme}://"), (url, settings[url])
    assert node_config(docs).etcd_endpoints == tuple(f"{m}:2379" for m in members)


def test_production_etcd_takes_only_clients_with_a_certificate_and_the_node_has_one():
    """etcd serves clients and members in TLS and asks both for a certificate
    of its CA; the node reaches it in TLS with the client certificate of the
    Secret make-certs.sh creates, mounted where its configuration looks. The
    probes stay on a plain port of their own."""
    docs = rendered("overlays/production")
    settings = etcd_settings(docs)
    assert settings["client-cert-auth"] == settings["peer-client-cert-auth"] == "true"
    assert settings["listen-metrics-urls"] == "http://0.0.0.0:2381"
    statefulset = find(docs, "StatefulSet", "kvbm-etcd")
    etcd = container(statefulset)
    for probe in (etcd["readinessProbe"], etcd["livenessProbe"]):
        assert probe["httpGet"]["port"] == "health"
    tls_dir = next(m["mountPath"] for m in etcd["volumeMounts"] if m["name"] == "tls")
    files = ("cert-file", "key-file", "trusted-ca-file")
    for name in files + tuple(f"peer-{f}" for f in files):
        assert Path(settings[name]).parent == Path(tls_dir), name
    assert volumes(statefulset)["tls"]["secret"] == {
        "secretName": "kvbm-etcd-tls",
        "defaultMode": 0o400,
    }

    cfg = node_config(docs)
    assert cfg.etcd_tls is not None and cfg.etcd_tls.cert_file and cfg.etcd_tls.key_file
    daemonset = find(docs, "DaemonSet", "kvbm-node")
    mounts = {m["name"]: m["mountPath"] for m in container(daemonset)["volumeMounts"]}
    assert volumes(daemonset)["etcd-client"]["secret"]["secretName"] == "kvbm-etcd-client"
    for path in (cfg.etcd_tls.ca_file, cfg.etcd_tls.cert_file, cfg.etcd_tls.key_file):
        assert Path(path).parent == Path(mounts["etcd-client"]), path
    script = (K8S / "etcd" / "make-certs.sh").read_text()
    for secret in ("kvbm-etcd-tls", "kvbm-etcd-client"):
        assert f"secret generic {secret}" in script


def secrets_used(docs: list[dict]) -> set[str]:
    return {
        v["secret"]["secretName"]
        for doc in docs
        if doc["kind"] in ("DaemonSet", "StatefulSet")
        for v in doc["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }


def test_the_recipe_for_an_etcd_of_your_own_renders(tmp_path):
    """docs/operations.md, step 3: the base with the components etcd-client
    and network-policy, and no etcd of k8s/."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    own = root / "overlays" / "own-etcd"
    own.mkdir()
    (own / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [../../base]\n"
        "components: [../../components/etcd-client, ../../components/network-policy]\n"
    )
    docs = render(own)
    validate_all(docs)
    assert "StatefulSet" not in kinds(docs)
    assert node_config(docs).etcd_tls is not None
    assert secrets_used(docs) == {"kvbm-peer-secret", "kvbm-etcd-client"}


def test_dev_needs_no_certificate_and_no_secret_but_the_peer_secret():
    docs = rendered("overlays/dev")
    assert node_config(docs).etcd_tls is None
    assert secrets_used(docs) == {"kvbm-peer-secret"}
    assert "NetworkPolicy" not in kinds(docs)
    assert find(docs, "StatefulSet", "kvbm-etcd")["spec"]["replicas"] == 1


@pytest.mark.parametrize(("overlay", "engines"), NODE_OVERLAYS.items())
def test_the_vllm_example_attaches_to_the_node_the_overlay_runs(overlay, engines):
    from kvbm.config import engine_config
    from kvbm.connector.vllm import KvbmConnector

    docs = rendered(overlay)
    engine = find(rendered(engines), "Deployment", "vllm-llama")
    args = container(engine)["args"]
    transfer = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == KvbmConnector.__name__
    assert transfer["kv_connector_module_path"] == KvbmConnector.__module__
    assert transfer["kv_load_failure_policy"] == "recompute"
    assert int(args[args.index("--block-size") + 1]) % 32 == 0
    cfg = engine_config(transfer["kv_connector_extra_config"])
    assert cfg.remote_tier_list == ("host", "disk")
    # the socket the engine names is the node's, through the same host directory
    node_cfg = node_config(docs)
    assert cfg.socket == node_cfg.socket
    assert shares_the_nodes_files(find(docs, "DaemonSet", "kvbm-node"), engine, node_cfg)
    # read-only in the engine: it connects, it cannot replace the socket
    mounts = {m["mountPath"]: m for m in container(engine)["volumeMounts"]}
    assert mounts[str(Path(cfg.socket).parent)].get("readOnly") is True


def shares_the_nodes_files(node: dict, engine: dict, cfg: KvbmConfig) -> bool:
    """The socket's directory and the arena's are the same host directories
    in both pods, at the paths the node names."""
    node_paths, engine_paths = host_paths(node), host_paths(engine)
    shared = (str(Path(cfg.socket).parent), cfg.host_arena_dir)
    return all(p in node_paths and node_paths[p] == engine_paths.get(p) for p in shared)


def test_engines_of_the_wrong_example_are_caught():
    """Negative control: plain engines beside huge-page nodes map another arena."""
    docs = rendered("overlays/production-huge-pages")
    plain = find(rendered("examples/vllm"), "Deployment", "vllm-llama")
    node = find(docs, "DaemonSet", "kvbm-node")
    assert not shares_the_nodes_files(node, plain, node_config(docs))


def test_the_huge_page_overlay_mounts_the_hosts_huge_page_tmpfs_and_never_creates_it():
    docs = rendered("overlays/production-huge-pages")
    node = find(docs, "DaemonSet", "kvbm-node")
    arena = volumes(node)["arena"]["hostPath"]
    assert arena == {"path": "/dev/kvbm-huge", "type": "Directory"}
    assert host_paths(node)[node_config(docs).host_arena_dir] == "/dev/kvbm-huge"
    # only the arena moved: the rest is production's
    plain = find(rendered("overlays/production"), "DaemonSet", "kvbm-node")
    volumes(plain)["arena"]["hostPath"] = arena
    assert volumes(node) == volumes(plain)
    assert "arena" not in volumes(find(docs, "StatefulSet", "kvbm-etcd"))


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_the_node_runs_with_no_capability_and_the_runtimes_seccomp_profile(overlay):
    node = find(rendered(overlay), "DaemonSet", "kvbm-node")
    pod = node["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container(node)["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # the arena has a host directory of its own, not the whole host /dev/shm
    assert "/dev/shm" not in host_paths(node).values()


@pytest.mark.parametrize("overlay", ["overlays/production", "overlays/production-huge-pages"])
def test_network_policies_let_only_kvbm_pods_reach_kvbm_ports(overlay):
    docs = rendered(overlay)
    node_labels = find(docs, "DaemonSet", "kvbm-node")["spec"]["template"]["metadata"]["labels"]
    etcd_labels = find(docs, "StatefulSet", "kvbm-etcd")["spec"]["template"]["metadata"]["labels"]
    node = find(docs, "NetworkPolicy", "kvbm-node")["spec"]
    assert node["podSelector"]["matchLabels"].items() <= node_labels.items()
    # every port from node pods (the peer RPC, UCX's own), /metrics only from
    # the namespace the dashboard goes to (a stranger's pod elsewhere reaches no port)
    from_nodes, metrics = node["ingress"]
    assert from_nodes["from"][0]["podSelector"]["matchLabels"].items() <= node_labels.items()
    assert "ports" not in from_nodes
    monitoring = kustomization(K8S / "monitoring")["namespace"]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring}}}
    ]
    assert [p["port"] for p in metrics["ports"]] == [node_config(docs).metrics_port]
    etcd = find(docs, "NetworkPolicy", "kvbm-etcd")["spec"]
    assert etcd["podSelector"]["matchLabels"].items() <= etcd_labels.items()
    clients, peers = etcd["ingress"]
    assert clients["from"][0]["podSelector"]["matchLabels"].items() <= node_labels.items()
    assert [p["port"] for p in clients["ports"]] == [2379]
    assert peers["from"][0]["podSelector"]["matchLabels"].items() <= etcd_labels.items()


def test_an_upgrade_replaces_one_node_at_a_time_each_ready_before_the_next():
    node = find(rendered("overlays/production"), "DaemonSet", "kvbm-node")
    strategy = node["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert node["spec"]["minReadySeconds"] >= 10
    # the image an upgrade changes is the overlay's
    images = kustomization(K8S / "overlays/production")["images"]
    tag = next(i["newTag"] for i in images if i["name"] == "ghcr.io/kvbm-mesh/kvbm-node")
    assert container(node)["image"] == f"ghcr.io/kvbm-mesh/kvbm-node:{tag}"
